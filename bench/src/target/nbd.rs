//! An NBD export as a target (`filename=nbd://HOST:PORT/EXPORT`): chunkbench speaks the NBD
//! protocol itself — fixed newstyle handshake, NBD_OPT_GO, simple replies — so a job runs
//! against `chunkserver nbd` (or any NBD server) the way fio's nbd engine would. One
//! connection per clone; the clone's workers keep up to `iodepth` requests in flight on it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use dataplane::nbd::protocol::{self, command, option, reply};
use dataplane::net::queue::{oneshot, OneshotSender};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;

use super::{Target, WriteBuffer};

/// Where an NBD target points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Server address.
    pub addr: SocketAddr,
    /// Export name (may be empty: the server's default export).
    pub export: String,
}

impl NbdUri {
    /// Parses `nbd://HOST:PORT/EXPORT` (HOST an IP address).
    pub fn parse(uri: &str) -> Result<NbdUri, String> {
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| format!("`{uri}` is not nbd://HOST:PORT/EXPORT"))?;
        let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
        let addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` in `{uri}` is not IP:PORT"))?;
        Ok(NbdUri {
            addr,
            export: export.to_string(),
        })
    }
}

type SharedStream = dataplane::net::shared_stream::SharedStream<TcpStream>;

/// A reply: the error code and, for a successful read, the data.
type Reply = io::Result<(u32, Bytes)>;

struct Pending {
    /// Bytes of data that follow a successful reply (reads).
    data_len: usize,
    answer: OneshotSender<Reply>,
}

/// One clone's connection to the export.
pub struct NbdTarget {
    stream: SharedStream,
    /// One request is written at a time (header and data together).
    writing: Semaphore,
    pending: Rc<RefCell<HashMap<u64, Pending>>>,
    next_handle: Cell<u64>,
    size: u64,
    reader: Option<glommio::task::JoinHandle<()>>,
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.cancel();
        }
    }
}

/// A write buffer: plain memory sent after the request header.
pub struct NbdBuffer(Vec<u8>);

impl WriteBuffer for NbdBuffer {
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

fn bad(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl NbdTarget {
    /// Connects, negotiates the export with NBD_OPT_GO, and starts the reply reader.
    pub async fn connect(uri: &NbdUri) -> io::Result<NbdTarget> {
        let stream = TcpStream::connect(uri.addr)
            .await
            .map_err(io::Error::from)?;
        drop(stream.set_nodelay(true));
        let mut stream = SharedStream::new(stream);
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await?;
        if greeting[0..8] != protocol::NBD_MAGIC.to_be_bytes()
            || greeting[8..16] != protocol::IHAVEOPT.to_be_bytes()
        {
            return Err(bad(format!("{} is not a newstyle NBD server", uri.addr)));
        }
        let flags = protocol::CLIENT_FLAG_FIXED_NEWSTYLE | protocol::CLIENT_FLAG_NO_ZEROES;
        stream.write_all(&flags.to_be_bytes()).await?;
        let mut go = Vec::new();
        go.extend_from_slice(&protocol::IHAVEOPT.to_be_bytes());
        go.extend_from_slice(&option::GO.to_be_bytes());
        go.extend_from_slice(&(4 + uri.export.len() as u32 + 2).to_be_bytes());
        go.extend_from_slice(&(uri.export.len() as u32).to_be_bytes());
        go.extend_from_slice(uri.export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&go).await?;
        let mut size = None;
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header).await?;
            let kind = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
            let len = u32::from_be_bytes([header[16], header[17], header[18], header[19]]) as usize;
            if len > 64 << 10 {
                return Err(bad(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len];
            stream.read_exact(&mut data).await?;
            match kind {
                reply::INFO
                    if data.len() >= 12 && data[0..2] == protocol::info::EXPORT.to_be_bytes() =>
                {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(word));
                }
                reply::INFO => {}
                reply::ACK => break,
                error => {
                    let message = String::from_utf8_lossy(&data).into_owned();
                    return Err(bad(format!(
                        "export `{}` refused ({error:#x}): {message}",
                        uri.export
                    )));
                }
            }
        }
        let size = size.ok_or_else(|| bad("the server sent no export size".into()))?;
        let pending: Rc<RefCell<HashMap<u64, Pending>>> = Rc::default();
        let reader =
            glommio::spawn_local(read_replies(stream.clone(), Rc::clone(&pending))).detach();
        Ok(NbdTarget {
            stream,
            writing: Semaphore::new(1),
            pending,
            next_handle: Cell::new(1),
            size,
            reader: Some(reader),
        })
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn request(&self, command: u16, offset: u64, len: u32, data: &[u8]) -> io::Result<Bytes> {
        let handle = self.next_handle.get();
        self.next_handle.set(handle + 1);
        let (answer, receiver) = oneshot();
        let data_len = if command == command::READ {
            len as usize
        } else {
            0
        };
        self.pending
            .borrow_mut()
            .insert(handle, Pending { data_len, answer });
        let header = protocol::encode_request(&protocol::Request {
            flags: 0,
            command,
            handle,
            offset,
            len,
        });
        {
            let _turn = self
                .writing
                .acquire_permit(1)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            let mut stream = self.stream.clone();
            stream.write_all(&header).await?;
            if !data.is_empty() {
                stream.write_all(data).await?;
            }
        }
        let (error, body) = receiver.await.ok_or_else(|| {
            io::Error::new(io::ErrorKind::ConnectionAborted, "the connection closed")
        })??;
        if error != 0 {
            return Err(io::Error::other(format!(
                "NBD error {error} at offset {offset}"
            )));
        }
        Ok(body)
    }
}

/// Reads simple replies and hands each to its request; on a broken connection, fails them all.
async fn read_replies(mut stream: SharedStream, pending: Rc<RefCell<HashMap<u64, Pending>>>) {
    let failure = loop {
        let mut header = [0u8; 16];
        if let Err(error) = stream.read_exact(&mut header).await {
            break error;
        }
        if header[0..4] != protocol::SIMPLE_REPLY_MAGIC.to_be_bytes() {
            break bad("a reply with a bad magic".into());
        }
        let error = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let mut word = [0u8; 8];
        word.copy_from_slice(&header[8..16]);
        let handle = u64::from_be_bytes(word);
        let Some(request) = pending.borrow_mut().remove(&handle) else {
            break bad(format!("a reply for unknown handle {handle}"));
        };
        let mut data = vec![0u8; if error == 0 { request.data_len } else { 0 }];
        if let Err(failure) = stream.read_exact(&mut data).await {
            request
                .answer
                .send(Err(io::Error::new(failure.kind(), failure.to_string())));
            break failure;
        }
        request.answer.send(Ok((error, Bytes::from(data))));
    };
    for (_, request) in pending.borrow_mut().drain() {
        request
            .answer
            .send(Err(io::Error::new(failure.kind(), failure.to_string())));
    }
}

impl Target for NbdTarget {
    type Buffer = NbdBuffer;
    type ReadData = Bytes;

    fn alloc(&self, len: usize) -> NbdBuffer {
        NbdBuffer(vec![0; len])
    }

    async fn write(&self, offset: u64, data: NbdBuffer) -> io::Result<()> {
        let len = u32::try_from(data.0.len()).map_err(|e| io::Error::other(e.to_string()))?;
        self.request(command::WRITE, offset, len, &data.0)
            .await
            .map(|_| ())
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let len = u32::try_from(len).map_err(|e| io::Error::other(e.to_string()))?;
        self.request(command::READ, offset, len, &[]).await
    }

    async fn sync(&self) -> io::Result<()> {
        self.request(command::FLUSH, 0, 0, &[]).await.map(|_| ())
    }
}
