//! The TCP transport on glommio: one listener per shard, one connection per (local shard,
//! remote shard). Each connection runs two tasks on its shard: a reader that decodes frames
//! into payload buffers from the shard's allocator, and a writer that gathers every queued
//! frame (up to `coalesce_bytes_max`) into one send.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{Preallocated, TcpListener, TcpStream};

use super::accepting::{Accepting, SetUp};
use super::connection::{new_connection, Connection, ConnectionConfig, LinkSide};
use super::handshake::{self, Auth};
use super::payload::{freeze, PayloadAllocator};
use super::queue::Latch;
use super::{within, NetError};
use crate::protocol::frame::{Frame, FRAME_HEADER_LEN};

/// A shard's TCP listener; connections are set up (authenticated) side by side
/// (`net::accepting`).
pub struct TcpTransportListener {
    listener: Rc<TcpListener>,
    accepting: Accepting,
}

impl TcpTransportListener {
    /// Listens on `addr` (port 0 picks a free port; see [`local_addr`]).
    ///
    /// [`local_addr`]: TcpTransportListener::local_addr
    /// Incoming connections are authenticated with `auth`'s keys when it is set.
    pub fn bind(
        addr: SocketAddr,
        config: ConnectionConfig,
        allocator: Rc<dyn PayloadAllocator>,
        auth: Option<Rc<Auth>>,
    ) -> Result<TcpTransportListener, NetError> {
        let listener = Rc::new(crate::listen::listen(addr).map_err(|e| NetError::Io {
            context: format!("listen on tcp://{addr}"),
            reason: e.to_string(),
        })?);
        let set_up: SetUp = Rc::new(move |mut stream| {
            let (config, allocator, auth) = (config.clone(), Rc::clone(&allocator), auth.clone());
            Box::pin(async move {
                let role = match &auth {
                    Some(auth) => {
                        let label = stream_label(&stream);
                        let limit = config.connect_timeout;
                        Some(handshake::incoming(&mut stream, &auth.keys, &label, limit).await?)
                    }
                    None => None,
                };
                let connection = start_connection(stream, config, allocator)?;
                connection.set_peer_role(role);
                Ok(connection)
            })
        });
        Ok(TcpTransportListener {
            accepting: Accepting::new(Rc::clone(&listener), set_up),
            listener,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.listener.local_addr().map_err(|e| NetError::Io {
            context: "listener address".into(),
            reason: e.to_string(),
        })
    }

    /// The next connection from a peer (authenticated, when the listener asks for it).
    pub async fn accept(&self) -> Result<Connection, NetError> {
        self.accepting.accept().await
    }

    /// Closes the listening socket and every connection it set up that was not taken
    /// ([`Accepting::close`](super::accepting::Accepting::close)).
    pub async fn close(self) {
        let TcpTransportListener {
            listener,
            accepting,
        } = self;
        drop(listener);
        accepting.close().await;
    }
}

fn stream_label(stream: &TcpStream) -> String {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) => format!("tcp {local} -> {peer}"),
        _ => "tcp connection".to_string(),
    }
}

/// Connects to a peer's listener, within the configured connect timeout; with `auth`, proves
/// its role first.
pub async fn connect(
    addr: SocketAddr,
    config: ConnectionConfig,
    allocator: Rc<dyn PayloadAllocator>,
    auth: Option<&Auth>,
) -> Result<Connection, NetError> {
    let mut stream = TcpStream::connect_timeout(addr, config.connect_timeout)
        .await
        .map_err(|e| NetError::Connect {
            addr: format!("tcp://{addr}"),
            reason: e.to_string(),
        })?;
    if let Some(auth) = auth {
        let label = stream_label(&stream);
        handshake::outgoing(&mut stream, auth, &label, config.connect_timeout).await?;
    }
    start_connection(stream, config, allocator)
}

fn start_connection(
    stream: TcpStream,
    config: ConnectionConfig,
    allocator: Rc<dyn PayloadAllocator>,
) -> Result<Connection, NetError> {
    let local = stream
        .local_addr()
        .map_err(|e| NetError::io("local address", &e))?;
    let peer = stream
        .peer_addr()
        .map_err(|e| NetError::io("peer address", &e))?;
    // Requests are small and latency-bound; the writer already coalesces.
    stream
        .set_nodelay(true)
        .map_err(|e| NetError::io("set TCP_NODELAY", &e))?;
    let label = format!("tcp {local} -> {peer}");
    let (connection, link) = new_connection(label, config);
    let stream = SharedStream::new(stream.buffered());
    let stop = Latch::new();
    glommio::spawn_local(read_loop(
        stream.clone(),
        link.clone(),
        allocator,
        stop.clone(),
    ))
    .detach();
    glommio::spawn_local(write_loop(stream, link, stop)).detach();
    Ok(connection)
}

/// One socket shared by the reader and writer tasks of its connection, read through glommio's
/// preallocated receive buffer.
pub(crate) type SharedStream = super::shared_stream::SharedStream<TcpStream<Preallocated>>;

/// How reading ended.
enum ReadEnd {
    /// The peer closed its side at a frame boundary.
    PeerFinished,
    /// The connection is closed locally; nothing to report.
    LocallyClosed,
    /// The connection must close for this reason.
    Failed(NetError),
}

impl From<NetError> for ReadEnd {
    fn from(error: NetError) -> Self {
        ReadEnd::Failed(error)
    }
}

impl From<crate::protocol::frame::FrameError> for ReadEnd {
    fn from(error: crate::protocol::frame::FrameError) -> Self {
        ReadEnd::Failed(error.into())
    }
}

impl From<super::payload::AllocError> for ReadEnd {
    fn from(error: super::payload::AllocError) -> Self {
        ReadEnd::Failed(error.into())
    }
}

async fn read_loop(
    mut stream: SharedStream,
    link: LinkSide,
    allocator: Rc<dyn PayloadAllocator>,
    stop: Latch,
) {
    let end = future::or(read_frames(&mut stream, &link, &*allocator), async {
        future::or(stop.wait(), link.aborted()).await;
        ReadEnd::LocallyClosed
    })
    .await;
    match end {
        ReadEnd::PeerFinished => link.peer_finished(),
        ReadEnd::LocallyClosed => {}
        ReadEnd::Failed(reason) => {
            link.fail(reason);
            stop.set();
        }
    }
}

async fn read_frames(
    stream: &mut SharedStream,
    link: &LinkSide,
    allocator: &dyn PayloadAllocator,
) -> ReadEnd {
    match read_frames_until_error(stream, link, allocator).await {
        Ok(end) | Err(end) => end,
    }
}

async fn read_frames_until_error(
    stream: &mut SharedStream,
    link: &LinkSide,
    allocator: &dyn PayloadAllocator,
) -> Result<ReadEnd, ReadEnd> {
    let codec = link.config().codec();
    let io_timeout = link.config().io_timeout;
    let label = link.label().to_owned();
    let mut header = [0u8; FRAME_HEADER_LEN];
    loop {
        let first = stream
            .read(&mut header)
            .await
            .map_err(|e| NetError::io(format!("read from {label}"), &e))?;
        if first == 0 {
            return Ok(ReadEnd::PeerFinished);
        }
        let rest = header.get_mut(first..).unwrap_or_default();
        within(
            io_timeout,
            || format!("reading a frame header on {label}"),
            async {
                stream
                    .read_exact(rest)
                    .await
                    .map_err(|e| truncated(&label, &e))
            },
        )
        .await?;
        let frame_header = codec.decode_header(&header)?;
        let mut buffer = allocator.allocate(frame_header.payload_len as usize)?;
        within(
            io_timeout,
            || format!("reading a payload on {label}"),
            async {
                stream
                    .read_exact((*buffer).as_mut())
                    .await
                    .map_err(|e| truncated(&label, &e))
            },
        )
        .await?;
        codec.check_payload(&frame_header, (*buffer).as_ref())?;
        let frame = Frame {
            header: frame_header,
            payload: freeze(buffer),
        };
        if link.deliver(frame).await.is_err() {
            return Ok(ReadEnd::LocallyClosed);
        }
        glommio::yield_if_needed().await;
    }
}

fn truncated(label: &str, error: &io::Error) -> NetError {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        NetError::Closed {
            reason: format!("{label}: the peer closed the connection inside a frame"),
        }
    } else {
        NetError::io(format!("read from {label}"), error)
    }
}

async fn write_loop(mut stream: SharedStream, link: LinkSide, stop: Latch) {
    let coalesce_max = link.config().coalesce_bytes_max;
    let io_timeout = link.config().io_timeout;
    let label = link.label().to_owned();
    let mut batch: Vec<u8> = Vec::with_capacity(coalesce_max.min(1 << 20));
    loop {
        let next = future::or(link.outgoing().pop(), async {
            future::or(stop.wait(), link.aborted()).await;
            None
        })
        .await;
        let Some(first) = next else { break };
        if link.is_aborted() {
            break;
        }
        batch.clear();
        first.encode_into(&mut batch);
        while batch.len() < coalesce_max {
            let Some(frame) = link.outgoing().try_pop() else {
                break;
            };
            frame.encode_into(&mut batch);
        }
        let write = within(
            io_timeout,
            || format!("writing to {label} (peer not reading?)"),
            async {
                stream
                    .write_all(&batch)
                    .await
                    .map_err(|e| NetError::io(format!("write to {label}"), &e))
            },
        );
        let written = future::or(write, async {
            future::or(stop.wait(), link.aborted()).await;
            Err(NetError::Closed {
                reason: format!("{label}: stopped"),
            })
        })
        .await;
        if let Err(reason) = written {
            link.fail(reason);
            stop.set();
            return;
        }
    }
    // Closed locally (or the link failed): tell the peer we are done, then stop the reader.
    // An aborted link does not wait for the peer to take even that.
    if !link.is_aborted() {
        let _ = future::or(
            async {
                let _ = stream.close().await;
            },
            link.aborted(),
        )
        .await;
    }
    stop.set();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_lite::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::{Endpoint, Transport};
    use crate::net::message_suite::{context, start_echo_server};
    use crate::net::test_kit::run_case;
    use crate::net::transport::connect as connect_endpoint;
    use crate::net::Message;
    use crate::protocol::frame::{FrameCodec, FrameFlags, Opcode};

    /// Reads until the peer closes; returns what was read.
    async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        out
    }

    #[test]
    fn a_malformed_frame_closes_only_its_connection() {
        run_case(Duration::from_secs(30), || async {
            let context = context();
            let (endpoint, _) = start_echo_server(Transport::Tcp, &context).await;
            let good = connect_endpoint(&endpoint, &context)
                .await
                .expect("connect");
            let valid = Frame::new(Opcode::PING, FrameFlags::default(), 1, 0, Bytes::new());
            let mut bad_payload_crc = Frame::new(
                Opcode::PING,
                FrameFlags::default(),
                1,
                0,
                Bytes::from_static(b"abcd"),
            )
            .encode();
            let last = bad_payload_crc.len() - 1;
            bad_payload_crc[last] ^= 1;
            let mut oversized = valid.header;
            oversized.payload_len = context.connection.max_payload + 1;
            let cases: Vec<(&str, Vec<u8>)> = vec![
                ("garbage", vec![0xAB; 64]),
                ("zeroes", vec![0; 40]),
                ("bad payload checksum", bad_payload_crc),
                ("payload over the bound", oversized.encode().to_vec()),
                ("truncated frame then close", valid.encode()[..20].to_vec()),
            ];
            for (name, bytes) in cases {
                let mut raw = TcpStream::connect(endpoint.addr)
                    .await
                    .expect("raw connect");
                raw.write_all(&bytes).await.expect("write");
                if name.starts_with("truncated") {
                    raw.close().await.expect("half-close");
                }
                // The server closes this connection without answering anything.
                let answer = read_to_end(&mut raw).await;
                assert!(answer.is_empty(), "{name}: server answered {answer:?}");
                // ... and the other connection is untouched.
                let echoed = good
                    .call(Message::new(Opcode::PING, 3, Bytes::from_static(b"ok")))
                    .await
                    .unwrap_or_else(|e| panic!("{name}: healthy connection failed: {e}"));
                assert_eq!(&echoed.payload[..], b"ok");
            }
        });
    }

    #[test]
    fn a_peer_that_never_reads_times_the_connection_out() {
        run_case(Duration::from_secs(30), || async {
            let mut context = context();
            context.connection.io_timeout = Duration::from_millis(300);
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let holder = glommio::spawn_local(async move {
                // Accept and hold the socket without ever reading from it.
                let stream = listener.accept().await.expect("accept");
                glommio::timer::sleep(Duration::from_secs(10)).await;
                drop(stream);
            });
            let endpoint = Endpoint {
                transport: Transport::Tcp,
                addr,
            };
            let client = connect_endpoint(&endpoint, &context)
                .await
                .expect("connect");
            let mut sent = 0usize;
            let error = loop {
                match client
                    .send(Message::new(
                        Opcode::PING,
                        0,
                        Bytes::from(vec![7u8; 65_536]),
                    ))
                    .await
                {
                    Ok(()) => sent += 1,
                    Err(error) => break error,
                }
                assert!(sent < 100_000, "a peer that never reads absorbed 6 GB");
            };
            assert!(
                matches!(error, NetError::Timeout { .. }),
                "expected a write timeout, got {error}"
            );
            assert!(client.is_closed());
            drop(holder);
        });
    }

    #[test]
    fn a_half_closed_client_still_gets_its_responses() {
        run_case(Duration::from_secs(30), || async {
            let context = context();
            let (endpoint, _) = start_echo_server(Transport::Tcp, &context).await;
            let mut raw = TcpStream::connect(endpoint.addr).await.expect("connect");
            let mut requests = Vec::new();
            for id in 1..=3u64 {
                let payload = Bytes::from(format!("request {id}"));
                Frame::new(Opcode::PING, FrameFlags::default(), id, 9, payload)
                    .encode_into(&mut requests);
            }
            raw.write_all(&requests).await.expect("write");
            raw.close().await.expect("half-close");
            let answer = read_to_end(&mut raw).await;
            let codec = FrameCodec::default();
            let mut at = 0;
            let mut ids = Vec::new();
            while at < answer.len() {
                let (frame, used) = codec
                    .decode(&answer[at..])
                    .expect("valid response")
                    .expect("a whole response");
                assert!(frame.header.flags.contains(FrameFlags::RESPONSE));
                let expected = format!("request {}", frame.header.request_id);
                assert_eq!(&frame.payload[..], expected.as_bytes());
                ids.push(frame.header.request_id);
                at += used;
            }
            assert_eq!(ids, vec![1, 2, 3]);
        });
    }

    #[test]
    fn a_peer_connection_reconnects_after_the_server_restarts() {
        use crate::net::transport::{Backoff, Listener, PeerConnection};
        run_case(Duration::from_secs(30), || async {
            let context = context();
            let listener = Listener::bind(
                &Endpoint {
                    transport: Transport::Tcp,
                    addr: "127.0.0.1:0".parse().expect("addr"),
                },
                &context,
            )
            .await
            .expect("bind");
            let endpoint = listener.local_endpoint().expect("endpoint");
            let serve = |listener: Listener| {
                glommio::spawn_local(async move {
                    let connection = listener.accept().await.expect("accept");
                    crate::net::message_suite::serve_echo(connection, Default::default()).await;
                })
            };
            let first = serve(listener);
            let peer = PeerConnection::new(
                endpoint,
                context.clone(),
                Backoff {
                    initial: Duration::from_millis(20),
                    max: Duration::from_millis(200),
                    attempts_max: 20,
                },
            );
            let ping = || Message::new(Opcode::PING, 0, Bytes::from_static(b"p"));
            peer.call(ping()).await.expect("first call");
            // The server goes away, then comes back on the same port a little later.
            first.cancel().await;
            let restart = glommio::spawn_local(async move {
                glommio::timer::sleep(Duration::from_millis(150)).await;
                let listener = Listener::bind(&endpoint, &crate::net::message_suite::context())
                    .await
                    .expect("rebind");
                serve(listener).await;
            })
            .detach();
            // The old connection notices the close; the next call redials with backoff.
            let mut answered = false;
            for _ in 0..50 {
                if peer.call(ping()).await.is_ok() {
                    answered = true;
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            assert!(answered, "no answer after the server came back");
            drop(restart);
        });
    }
}
