//! The NBD server: a glommio TCP listener, the handshake, and the transmission phase with many
//! requests in flight per connection. A malformed message closes that one connection with a
//! logged reason; it never panics the shard.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;

use super::export::{Export, ExportError};
use super::protocol::{self, command, errno, option, reply, transmission, ProtocolError, Request};
use crate::shard::ShutdownSignal;

/// Limits of one server.
#[derive(Debug, Clone, Copy)]
pub struct NbdConfig {
    /// Requests executing at once per connection; more wait (back-pressure on the socket).
    pub max_in_flight: usize,
    /// The largest read or write accepted; a longer one closes the connection.
    pub max_request_len: u32,
    /// Options accepted during the handshake before the client is cut off.
    pub max_options: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            max_in_flight: 64,
            max_request_len: 32 << 20,
            max_options: 64,
        }
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The client asked for an export that does not exist, the old way (no reply possible).
    #[error("no export named `{0}`")]
    UnknownExport(String),
    /// Too many options in the handshake.
    #[error("more than {0} options in the handshake")]
    TooManyOptions(usize),
}

/// The exports a server offers, by name.
#[derive(Default)]
pub struct Exports {
    by_name: BTreeMap<String, Rc<dyn Export>>,
}

impl Exports {
    /// No exports.
    pub fn new() -> Exports {
        Exports::default()
    }

    /// Adds (or replaces) an export.
    pub fn insert(&mut self, name: &str, export: Rc<dyn Export>) {
        self.by_name.insert(name.to_string(), export);
    }

    /// The export named `name`; the empty name means the only export, when there is one.
    pub fn get(&self, name: &str) -> Option<Rc<dyn Export>> {
        if name.is_empty() && self.by_name.len() == 1 {
            return self.by_name.values().next().cloned();
        }
        self.by_name.get(name).cloned()
    }
}

/// Serves `exports` on `listener` until `shutdown` is raised; each connection runs as its own
/// task on this executor.
pub async fn serve(
    listener: TcpListener,
    exports: Rc<Exports>,
    config: NbdConfig,
    shutdown: ShutdownSignal,
) -> io::Result<()> {
    crate::listen::accept_until(&listener, shutdown, |accepted| {
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "nbd: accept failed");
                return;
            }
        };
        let peer = stream.peer_addr().ok();
        let exports = Rc::clone(&exports);
        glommio::spawn_local(async move {
            match serve_connection(stream, &exports, config).await {
                Ok(()) => tracing::debug!(?peer, "nbd: client disconnected"),
                Err(error) => tracing::warn!(?peer, %error, "nbd: connection closed"),
            }
        })
        .detach();
    })
    .await;
    Ok(())
}

/// Binds a listener for `serve`.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    crate::listen::listen(addr)
}

type SharedStream = crate::net::shared_stream::SharedStream<TcpStream>;

/// Runs one connection: handshake, then transmission until the client disconnects.
pub async fn serve_connection(
    stream: TcpStream,
    exports: &Exports,
    config: NbdConfig,
) -> Result<(), NbdError> {
    // Replies are small and latency matters more than packet count.
    drop(stream.set_nodelay(true));
    let mut stream = SharedStream::new(stream);
    let Some(negotiated) = handshake(&mut stream, exports, config).await? else {
        return Ok(());
    };
    transmit(stream, negotiated, config).await
}

/// What the handshake settled.
struct Negotiated {
    export: Rc<dyn Export>,
    structured: bool,
    flags: u16,
}

fn transmission_flags(export: &dyn Export) -> u16 {
    let mut flags = transmission::HAS_FLAGS
        | transmission::SEND_FLUSH
        | transmission::SEND_FUA
        | transmission::SEND_TRIM
        | transmission::SEND_WRITE_ZEROES
        | transmission::SEND_DF
        | transmission::CAN_MULTI_CONN;
    if export.read_only() {
        flags |= transmission::READ_ONLY;
    }
    flags
}

/// Where one option of the negotiation leaves it: `Continue` with the next option, or
/// `Break` with its end — `None` when the client aborted, the export otherwise.
type OptionStep = ControlFlow<Option<Negotiated>>;

/// The fixed-newstyle negotiation: the greeting, then options until the client chooses an
/// export (`Some`) or aborts (`None`); at most `config.max_options` of them.
async fn handshake(
    stream: &mut SharedStream,
    exports: &Exports,
    config: NbdConfig,
) -> Result<Option<Negotiated>, NbdError> {
    let no_zeroes = greet(stream).await?;
    let mut structured = false;

    for _ in 0..config.max_options {
        let (header, data) = read_option(stream).await?;
        let step = match header.option {
            option::EXPORT_NAME => {
                export_name(stream, exports, &data, no_zeroes, structured).await?
            }
            option::ABORT => abort(stream).await,
            option::LIST => list(stream, exports, &data).await?,
            option::STRUCTURED_REPLY => structured_reply(stream, &data, &mut structured).await?,
            option::INFO | option::GO => {
                info_or_go(stream, exports, config, header.option, &data, structured).await?
            }
            other => unsupported(stream, other).await?,
        };
        if let ControlFlow::Break(end) = step {
            return Ok(end);
        }
    }
    Err(NbdError::TooManyOptions(config.max_options))
}

/// Sends the server greeting and reads the client's flags, which must be fixed newstyle.
/// Returns whether the client asked for no zeroes after the export-name reply.
async fn greet(stream: &mut SharedStream) -> Result<bool, NbdError> {
    stream.write_all(&protocol::server_greeting()).await?;
    let mut client_flags = [0u8; 4];
    stream.read_exact(&mut client_flags).await?;
    let client_flags = u32::from_be_bytes(client_flags);
    if client_flags & protocol::CLIENT_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle(client_flags).into());
    }
    Ok(client_flags & protocol::CLIENT_FLAG_NO_ZEROES != 0)
}

/// Reads one option: its header, then its data.
async fn read_option(
    stream: &mut SharedStream,
) -> Result<(protocol::OptionHeader, Vec<u8>), NbdError> {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).await?;
    let header = protocol::decode_option_header(&header)?;
    let mut data = vec![0u8; header.len as usize];
    stream.read_exact(&mut data).await?;
    Ok((header, data))
}

/// `NBD_OPT_EXPORT_NAME`: the old way to choose an export. An unknown name ends the
/// connection (there is no reply for it); a known one is answered with its size and flags,
/// and transmission starts.
async fn export_name(
    stream: &mut SharedStream,
    exports: &Exports,
    data: &[u8],
    no_zeroes: bool,
    structured: bool,
) -> Result<OptionStep, NbdError> {
    let name = String::from_utf8_lossy(data).into_owned();
    let export = exports.get(&name).ok_or(NbdError::UnknownExport(name))?;
    let flags = transmission_flags(export.as_ref());
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&export.size().to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    stream.write_all(&out).await?;
    Ok(ControlFlow::Break(Some(Negotiated {
        export,
        structured,
        flags,
    })))
}

/// `NBD_OPT_ABORT`: acknowledged (if the client still listens), and the negotiation ends.
async fn abort(stream: &mut SharedStream) -> OptionStep {
    // The client may already have closed; a failed ack changes nothing.
    drop(
        stream
            .write_all(&protocol::option_reply(option::ABORT, reply::ACK, &[]))
            .await,
    );
    ControlFlow::Break(None)
}

/// `NBD_OPT_LIST`: one reply per export name, then an acknowledgement; refused when the
/// option carries data.
async fn list(
    stream: &mut SharedStream,
    exports: &Exports,
    data: &[u8],
) -> Result<OptionStep, NbdError> {
    if !data.is_empty() {
        stream
            .write_all(&protocol::option_reply(
                option::LIST,
                reply::ERR_INVALID,
                &[],
            ))
            .await?;
        return Ok(ControlFlow::Continue(()));
    }
    for name in exports.by_name.keys() {
        let mut entry = Vec::with_capacity(4 + name.len());
        entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        stream
            .write_all(&protocol::option_reply(option::LIST, reply::SERVER, &entry))
            .await?;
    }
    stream
        .write_all(&protocol::option_reply(option::LIST, reply::ACK, &[]))
        .await?;
    Ok(ControlFlow::Continue(()))
}

/// `NBD_OPT_STRUCTURED_REPLY`: without data, structured replies are on and acknowledged;
/// with data, refused.
async fn structured_reply(
    stream: &mut SharedStream,
    data: &[u8],
    structured: &mut bool,
) -> Result<OptionStep, NbdError> {
    if data.is_empty() {
        *structured = true;
        stream
            .write_all(&protocol::option_reply(
                option::STRUCTURED_REPLY,
                reply::ACK,
                &[],
            ))
            .await?;
    } else {
        stream
            .write_all(&protocol::option_reply(
                option::STRUCTURED_REPLY,
                reply::ERR_INVALID,
                &[],
            ))
            .await?;
    }
    Ok(ControlFlow::Continue(()))
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's size and flags (and block sizes when asked),
/// then an acknowledgement; `GO` then starts transmission. A malformed request or an unknown
/// export is refused, and the negotiation goes on.
async fn info_or_go(
    stream: &mut SharedStream,
    exports: &Exports,
    config: NbdConfig,
    requested: u32,
    data: &[u8],
    structured: bool,
) -> Result<OptionStep, NbdError> {
    let Some(request) = protocol::decode_info_request(data) else {
        stream
            .write_all(&protocol::option_reply(requested, reply::ERR_INVALID, &[]))
            .await?;
        return Ok(ControlFlow::Continue(()));
    };
    let Some(export) = exports.get(&request.name) else {
        let message = format!("no export named `{}`", request.name);
        stream
            .write_all(&protocol::option_reply(
                requested,
                reply::ERR_UNKNOWN,
                message.as_bytes(),
            ))
            .await?;
        return Ok(ControlFlow::Continue(()));
    };
    let flags = transmission_flags(export.as_ref());
    let info = protocol::info_export(export.size(), flags);
    stream
        .write_all(&protocol::option_reply(requested, reply::INFO, &info))
        .await?;
    if request.requests.contains(&protocol::info::BLOCK_SIZE) {
        let (minimum, preferred, maximum) = export.block_sizes();
        let maximum = maximum.min(config.max_request_len);
        let info = protocol::info_block_size(minimum, preferred, maximum);
        stream
            .write_all(&protocol::option_reply(requested, reply::INFO, &info))
            .await?;
    }
    stream
        .write_all(&protocol::option_reply(requested, reply::ACK, &[]))
        .await?;
    if requested == option::GO {
        return Ok(ControlFlow::Break(Some(Negotiated {
            export,
            structured,
            flags,
        })));
    }
    Ok(ControlFlow::Continue(()))
}

/// Any other option: refused as unsupported.
async fn unsupported(stream: &mut SharedStream, other: u32) -> Result<OptionStep, NbdError> {
    stream
        .write_all(&protocol::option_reply(other, reply::ERR_UNSUP, &[]))
        .await?;
    Ok(ControlFlow::Continue(()))
}

/// Checks a request against the export before anything runs; `Err` is the errno to answer.
fn check_request(request: &Request, negotiated: &Negotiated, size: u64) -> Result<(), u32> {
    let known_flags = command::FLAG_FUA | command::FLAG_NO_HOLE | command::FLAG_DF;
    if request.flags & !known_flags != 0 {
        return Err(errno::EINVAL);
    }
    let writes = matches!(
        request.command,
        command::WRITE | command::TRIM | command::WRITE_ZEROES
    );
    if writes && negotiated.flags & transmission::READ_ONLY != 0 {
        return Err(errno::EPERM);
    }
    if matches!(
        request.command,
        command::READ | command::WRITE | command::TRIM | command::WRITE_ZEROES
    ) {
        match request.offset.checked_add(u64::from(request.len)) {
            Some(end) if end <= size => {}
            _ => return Err(errno::EINVAL),
        }
    }
    Ok(())
}

async fn transmit(
    stream: SharedStream,
    negotiated: Negotiated,
    config: NbdConfig,
) -> Result<(), NbdError> {
    let (replies, outgoing) = local_channel::new_bounded::<Bytes>(config.max_in_flight.max(1));
    let mut writer_stream = stream.clone();
    let writer = glommio::spawn_local(async move {
        while let Some(reply) = outgoing.recv().await {
            writer_stream.write_all(&reply).await?;
        }
        writer_stream.flush().await
    });
    let in_flight = Rc::new(Semaphore::new(config.max_in_flight.max(1) as u64));
    let negotiated = Rc::new(negotiated);
    let replies = Rc::new(replies);
    let mut reader = stream;
    let size = negotiated.export.size();

    let result: Result<(), NbdError> = async {
        loop {
            let mut header = [0u8; protocol::REQUEST_LEN];
            match reader.read_exact(&mut header).await {
                Ok(()) => {}
                // A client that closes between requests has simply gone.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let request = protocol::decode_request(&header)?;
            if request.len > config.max_request_len
                && matches!(request.command, command::READ | command::WRITE)
            {
                return Err(ProtocolError::TooLong {
                    what: "request",
                    len: u64::from(request.len),
                    limit: u64::from(config.max_request_len),
                }
                .into());
            }
            let data = if request.command == command::WRITE {
                let mut data = BytesMut::zeroed(request.len as usize);
                reader.read_exact(&mut data).await?;
                data.freeze()
            } else {
                Bytes::new()
            };
            if request.command == command::DISC {
                return Ok(());
            }
            let permit = in_flight
                .acquire_static_permit(1)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            let negotiated = Rc::clone(&negotiated);
            let replies = Rc::clone(&replies);
            glommio::spawn_local(async move {
                let reply = execute(&request, data, &negotiated, size).await;
                // The writer is gone only when the connection is failing; nothing to tell.
                drop(replies.send(reply).await);
                drop(permit);
            })
            .detach();
        }
    }
    .await;
    // Let every request in flight finish and queue its reply before the writer is told to end.
    drop(in_flight.acquire(config.max_in_flight.max(1) as u64).await);
    drop(replies);
    let written = writer.await;
    result?;
    written.map_err(NbdError::from)
}

/// Runs one request and builds its reply.
async fn execute(request: &Request, data: Bytes, negotiated: &Negotiated, size: u64) -> Bytes {
    if let Err(code) = check_request(request, negotiated, size) {
        return error_reply(request, negotiated.structured, code, "request refused");
    }
    let export = negotiated.export.as_ref();
    let fua = request.flags & command::FLAG_FUA != 0;
    let outcome: Result<Option<Bytes>, ExportError> = match request.command {
        command::READ => export.read(request.offset, request.len).await.map(Some),
        command::WRITE => export.write(request.offset, data, fua).await.map(|()| None),
        command::FLUSH => export.flush().await.map(|()| None),
        command::TRIM => export
            .trim(request.offset, request.len)
            .await
            .map(|()| None),
        command::WRITE_ZEROES => export
            .write_zeroes(request.offset, request.len, fua)
            .await
            .map(|()| None),
        _ => Err(ExportError::Unsupported("this command")),
    };
    match outcome {
        Ok(payload) => ok_reply(request, negotiated.structured, payload),
        Err(error) => error_reply(
            request,
            negotiated.structured,
            error.errno(),
            &error.to_string(),
        ),
    }
}

fn ok_reply(request: &Request, structured: bool, payload: Option<Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    match (structured, payload) {
        (false, payload) => {
            out.extend_from_slice(&protocol::simple_reply(0, request.handle));
            if let Some(payload) = payload {
                out.extend_from_slice(&payload);
            }
        }
        (true, Some(payload)) => {
            let len = 8 + payload.len() as u32;
            out.extend_from_slice(&protocol::structured_reply(
                protocol::chunk::FLAG_DONE,
                protocol::chunk::OFFSET_DATA,
                request.handle,
                len,
            ));
            out.extend_from_slice(&request.offset.to_be_bytes());
            out.extend_from_slice(&payload);
        }
        (true, None) => {
            out.extend_from_slice(&protocol::structured_reply(
                protocol::chunk::FLAG_DONE,
                protocol::chunk::NONE,
                request.handle,
                0,
            ));
        }
    }
    out.freeze()
}

fn error_reply(request: &Request, structured: bool, code: u32, message: &str) -> Bytes {
    let mut out = BytesMut::new();
    if structured {
        let payload = protocol::structured_error_payload(code, message);
        out.extend_from_slice(&protocol::structured_reply(
            protocol::chunk::FLAG_DONE,
            protocol::chunk::ERROR,
            request.handle,
            payload.len() as u32,
        ));
        out.extend_from_slice(&payload);
    } else {
        out.extend_from_slice(&protocol::simple_reply(code, request.handle));
    }
    out.freeze()
}
