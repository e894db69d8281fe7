//! The RDMA message transport, written once against [`Verbs`]: `softrdma://` runs it over
//! `softverbs`, `rdma://` over ibverbs. docs/protocol.md has the wire layout.
//!
//! Per connection:
//! - **set-up** over a TCP connection (the out-of-band channel): each side creates an RC
//!   queue pair, posts its receive ring, sends a 64-byte hello (queue-pair address, ring depth
//!   and buffer size, landing-slot address, rkey, count and size), moves to ReadyToSend on the
//!   peer's hello, then both exchange a ready byte. The TCP connection stays open: its end is
//!   how each side learns the other closed or vanished.
//! - **receive ring** of `recv_ring_depth` buffers, always posted; **credits**: a side sends
//!   only while it knows the peer has a receive posted. Every message returns the credits for
//!   the buffers its sender re-posted; a credit-only message goes out when half the ring is
//!   owed (one credit is kept for it, so credits cannot deadlock). A frame is credited back
//!   only once the server queue has taken it, so a slow server stalls the sender (back-pressure).
//! - **small frames inline** in a send; **large payloads** (over the inline limit) by RDMA write
//!   from a registered staging slot into one of the peer's registered landing slots, followed
//!   by a send that carries the frame header and the slot number; the peer copies the payload
//!   into a buffer from the shard's allocator and returns the slot in a later message.
//! - **one pump task** per connection on the owning shard polls the completion queue, posts
//!   sends and receives, and waits (completion signal, new frames, timer) when idle; no call
//!   blocks the executor.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::connection::{new_connection, Connection, LinkSide};
use super::payload::{freeze, PayloadAllocator};
use super::queue::Latch;
use super::tcp::within;
use super::transport::NetContext;
use super::verbs::soft::SoftVerbs;
use super::verbs::{
    CompletionQueue, MemoryRegion, QpCaps, QpEndpoint, QueuePair, RemoteAddress, SendOp,
    SendRequest, Verbs, WcOpcode, WcStatus, WorkCompletion,
};
use super::NetError;
use crate::config::{Endpoint, Transport};
use crate::protocol::frame::{Frame, FrameCodec, FRAME_HEADER_LEN};

/// Sizes of the RDMA transport's rings and slots, per connection.
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// Receive buffers posted per connection (the credits a peer starts with). At least 4.
    pub recv_ring_depth: u16,
    /// Size of each receive buffer: frames up to about this size travel inline.
    pub recv_buffer_size: usize,
    /// Landing slots for large payloads (and as many staging slots to write from).
    pub landing_slots: u16,
    /// Size of each landing slot: the largest payload this side can receive. Must be at least
    /// `ConnectionConfig::max_payload`.
    pub landing_slot_size: usize,
    /// Device name for `rdma://` (first device when `None`).
    pub device: Option<String>,
    /// GID index for `rdma://` (RoCE v2 on the interface's IPv4 address is usually 1).
    pub gid_index: u8,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            recv_ring_depth: 64,
            recv_buffer_size: 8192,
            landing_slots: 4,
            landing_slot_size: crate::protocol::frame::DEFAULT_MAX_PAYLOAD as usize,
            device: None,
            gid_index: 1,
        }
    }
}

/// The transport prefix of every message (docs/protocol.md).
const PREFIX_LEN: usize = 8;
/// Room kept in every message for released landing-slot numbers.
const RELEASED_MAX: usize = 64;
const KIND_INLINE: u8 = 1;
const KIND_SLOT: u8 = 2;
const KIND_CREDIT: u8 = 3;
const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"CSR1");
const HELLO_LEN: usize = 64;
const WR_RECV: u64 = 1 << 56;
const WR_SEND: u64 = 2 << 56;
const WR_WRITE: u64 = 3 << 56;
const WR_INDEX_MASK: u64 = (1 << 56) - 1;
/// After this many idle turns spent yielding, a pump without a completion signal sleeps.
const IDLE_SPINS: u32 = 64;
/// The longest an idle pump waits without looking at its state (a safety net against a
/// missed wake-up, and the pace of a closing connection's grace periods). Measured: a 1 ms
/// tick more than doubled the softrdma round trip (glommio parks differently with a timer
/// due that soon); 50 ms costs nothing measurable.
const TICK: Duration = Duration::from_millis(50);
/// The first sleep of an idle pump that must poll; it doubles every 16 idle turns up to 32×
/// (1.6 ms), so a quiet connection costs a few hundred wake-ups a second, not tens of
/// thousands. Sending never waits for it: new frames wake the pump at once.
const IDLE_SLEEP: Duration = Duration::from_micros(50);

/// The verbs devices a shard has opened, shared by its listeners and connections.
#[derive(Default)]
pub struct RdmaDevices {
    soft: RefCell<HashMap<IpAddr, Rc<SoftVerbs>>>,
    #[cfg(feature = "rdma")]
    hardware: RefCell<Option<Rc<super::verbs::ibverbs::IbVerbs>>>,
}

impl RdmaDevices {
    fn soft(&self, ip: IpAddr) -> Result<Rc<SoftVerbs>, NetError> {
        if let Some(device) = self.soft.borrow().get(&ip) {
            return Ok(Rc::clone(device));
        }
        let device = Rc::new(SoftVerbs::open(ip).map_err(|e| NetError::Unavailable {
            reason: format!("softverbs on {ip}: {e}"),
        })?);
        self.soft.borrow_mut().insert(ip, Rc::clone(&device));
        Ok(device)
    }

    #[cfg(feature = "rdma")]
    fn hardware(
        &self,
        config: &RdmaConfig,
    ) -> Result<Rc<super::verbs::ibverbs::IbVerbs>, NetError> {
        if let Some(device) = self.hardware.borrow().as_ref() {
            return Ok(Rc::clone(device));
        }
        let device = Rc::new(
            super::verbs::ibverbs::IbVerbs::open(config.device.as_deref(), config.gid_index)
                .map_err(|e| NetError::Unavailable {
                    reason: e.to_string(),
                })?,
        );
        *self.hardware.borrow_mut() = Some(Rc::clone(&device));
        Ok(device)
    }
}

/// A shard's listener for `softrdma://` or `rdma://`: the out-of-band TCP listener, and the
/// verbs device its connections use.
pub struct RdmaListener {
    transport: Transport,
    listener: TcpListener,
    context: NetContext,
}

impl RdmaListener {
    /// Listens on `addr`; `rdma://` fails here, cleanly, when there is no RDMA device.
    pub async fn bind(
        transport: Transport,
        addr: SocketAddr,
        context: &NetContext,
    ) -> Result<RdmaListener, NetError> {
        check_config(context)?;
        // Open the device now, so a missing device is reported at start-up.
        match transport {
            Transport::SoftRdma => {
                context.rdma_devices.soft(addr.ip())?;
            }
            Transport::Rdma => {
                hardware_device(context)?;
            }
            Transport::Tcp => {
                return Err(NetError::Unavailable {
                    reason: "tcp:// is not an RDMA transport".into(),
                })
            }
        }
        let listener = TcpListener::bind(addr).map_err(|e| NetError::Io {
            context: format!("listen on {}://{addr}", transport.scheme()),
            reason: e.to_string(),
        })?;
        Ok(RdmaListener {
            transport,
            listener,
            context: context.clone(),
        })
    }

    /// The endpoint it listens on.
    pub fn local_endpoint(&self) -> Result<Endpoint, NetError> {
        let addr = self.listener.local_addr().map_err(|e| NetError::Io {
            context: "listener address".into(),
            reason: e.to_string(),
        })?;
        Ok(Endpoint {
            transport: self.transport,
            addr,
        })
    }

    /// The next connection.
    pub async fn accept(&self) -> Result<Connection, NetError> {
        loop {
            let stream = self.listener.accept().await.map_err(|e| NetError::Io {
                context: "accept".into(),
                reason: e.to_string(),
            })?;
            // A failed set-up concerns that one peer only: log it and wait for the next.
            match establish(self.transport, stream, &self.context).await {
                Ok(connection) => return Ok(connection),
                Err(error) => debug!(%error, "rdma connection set-up failed"),
            }
        }
    }
}

#[cfg(feature = "rdma")]
fn hardware_device(context: &NetContext) -> Result<(), NetError> {
    context.rdma_devices.hardware(&context.rdma).map(|_| ())
}

#[cfg(not(feature = "rdma"))]
fn hardware_device(_context: &NetContext) -> Result<(), NetError> {
    Err(NetError::Unavailable {
        reason: "rdma:// needs a build with feature `rdma` (use softrdma:// or tcp://)".into(),
    })
}

fn check_config(context: &NetContext) -> Result<(), NetError> {
    let rdma = &context.rdma;
    let bad = |reason: String| Err(NetError::Unavailable { reason });
    if !(4..=4096).contains(&rdma.recv_ring_depth) {
        return bad(format!(
            "recv_ring_depth {} is not in 4..=4096",
            rdma.recv_ring_depth
        ));
    }
    if rdma.recv_buffer_size < PREFIX_LEN + 2 * RELEASED_MAX + FRAME_HEADER_LEN + 64 {
        return bad(format!(
            "recv_buffer_size {} is too small",
            rdma.recv_buffer_size
        ));
    }
    if !(1..=1024).contains(&rdma.landing_slots) {
        return bad(format!(
            "landing_slots {} is not in 1..=1024",
            rdma.landing_slots
        ));
    }
    if rdma.landing_slot_size < context.connection.max_payload as usize {
        return bad(format!(
            "landing_slot_size {} is smaller than max_payload {}",
            rdma.landing_slot_size, context.connection.max_payload
        ));
    }
    Ok(())
}

/// Connects to an RDMA listener.
pub async fn connect(
    transport: Transport,
    addr: SocketAddr,
    context: &NetContext,
) -> Result<Connection, NetError> {
    check_config(context)?;
    let stream = TcpStream::connect_timeout(addr, context.connection.connect_timeout)
        .await
        .map_err(|e| NetError::Connect {
            addr: format!("{}://{addr}", transport.scheme()),
            reason: e.to_string(),
        })?;
    establish(transport, stream, context).await
}

async fn establish(
    transport: Transport,
    stream: TcpStream,
    context: &NetContext,
) -> Result<Connection, NetError> {
    let local = stream
        .local_addr()
        .map_err(|e| NetError::io("local address", &e))?;
    let peer = stream
        .peer_addr()
        .map_err(|e| NetError::io("peer address", &e))?;
    let label = format!("{} {local} -> {peer}", transport.scheme());
    let limit = context.connection.connect_timeout;
    match transport {
        Transport::SoftRdma => {
            let device = context.rdma_devices.soft(local.ip())?;
            within(
                limit,
                || format!("set-up of {label}"),
                set_up(device, stream, label.clone(), context),
            )
            .await
        }
        #[cfg(feature = "rdma")]
        Transport::Rdma => {
            let device = context.rdma_devices.hardware(&context.rdma)?;
            within(
                limit,
                || format!("set-up of {label}"),
                set_up(device, stream, label.clone(), context),
            )
            .await
        }
        _ => Err(NetError::Unavailable {
            reason: format!("{label}: no RDMA transport for this scheme in this build"),
        }),
    }
}

/// What a side tells its peer at set-up.
#[derive(Debug, Clone, Copy)]
struct Hello {
    endpoint: QpEndpoint,
    recv_ring_depth: u16,
    recv_buffer_size: u32,
    landing_slots: u16,
    landing_slot_size: u32,
    landing: RemoteAddress,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        out[4] = 1;
        out[6..32].copy_from_slice(&self.endpoint.encode());
        out[32..34].copy_from_slice(&self.recv_ring_depth.to_le_bytes());
        out[34..38].copy_from_slice(&self.recv_buffer_size.to_le_bytes());
        out[38..40].copy_from_slice(&self.landing_slots.to_le_bytes());
        out[40..44].copy_from_slice(&self.landing_slot_size.to_le_bytes());
        out[44..52].copy_from_slice(&self.landing.addr.to_le_bytes());
        out[52..56].copy_from_slice(&self.landing.rkey.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Hello, NetError> {
        let bad = |reason: &str| NetError::Protocol {
            reason: format!("rdma hello: {reason}"),
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        if u32_at(0) != HELLO_MAGIC {
            return Err(bad("bad magic"));
        }
        if bytes[4] != 1 {
            return Err(bad(&format!("unsupported version {}", bytes[4])));
        }
        let endpoint = QpEndpoint::decode(&bytes[6..32]).ok_or_else(|| bad("queue pair"))?;
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[44..52]);
        let hello = Hello {
            endpoint,
            recv_ring_depth: u16_at(32),
            recv_buffer_size: u32_at(34),
            landing_slots: u16_at(38),
            landing_slot_size: u32_at(40),
            landing: RemoteAddress {
                addr: u64::from_le_bytes(addr),
                rkey: u32_at(52),
            },
        };
        if !(4..=4096).contains(&hello.recv_ring_depth)
            || (hello.recv_buffer_size as usize) < PREFIX_LEN + 2 * RELEASED_MAX + FRAME_HEADER_LEN
            || !(1..=1024).contains(&hello.landing_slots)
        {
            return Err(bad("ring or slot sizes out of range"));
        }
        Ok(hello)
    }
}

/// Registered memory and queues of one connection, and its flow-control state. Owned by the
/// pump task alone.
struct RdmaLink<V: Verbs> {
    label: String,
    codec: FrameCodec,
    allocator: Rc<dyn PayloadAllocator>,
    qp: V::Qp,
    cq: V::Cq,
    recv_region: V::Region,
    send_region: V::Region,
    staging: V::Region,
    landing: V::Region,
    recv_buffer_size: usize,
    landing_slot_size: usize,
    peer: Hello,
    /// The peer's receive buffers we may still consume. Invariant: <= peer ring depth.
    credits: u32,
    /// Our receive buffers re-posted (and frames taken by the server) not yet credited back.
    owed: u32,
    free_send_buffers: Vec<usize>,
    /// Peer landing slots we may write. A slot leaves on use and returns when released.
    free_peer_slots: VecDeque<u16>,
    peer_slot_in_use: Vec<bool>,
    /// Staging slot k is written from while the RDMA write into peer slot k runs.
    staging_busy: Vec<bool>,
    /// Our landing slots whose payload was copied out, to announce to the peer.
    released: Vec<u16>,
    /// Frames received that the server queue had no room for yet. Invariant: at most the
    /// ring depth, since each holds back one credit.
    held: VecDeque<Frame>,
    /// A frame taken from the send queue that waits for credits, a buffer or a slot.
    waiting: Option<Frame>,
    completions: Vec<WorkCompletion>,
    scratch: Vec<u8>,
}

async fn set_up<V: Verbs + 'static>(
    device: Rc<V>,
    mut stream: TcpStream,
    label: String,
    context: &NetContext,
) -> Result<Connection, NetError> {
    let config = &context.rdma;
    let verbs_error = |what: &'static str| {
        let label = label.clone();
        move |e: super::verbs::VerbsError| NetError::Io {
            context: format!("{label}: {what}"),
            reason: e.to_string(),
        }
    };
    let depth = usize::from(config.recv_ring_depth);
    let slots = usize::from(config.landing_slots);
    let recv_region = device
        .register(depth * config.recv_buffer_size)
        .map_err(verbs_error("register the receive ring"))?;
    let send_region = device
        .register(depth * config.recv_buffer_size)
        .map_err(verbs_error("register the send buffers"))?;
    let staging = device
        .register(slots * config.landing_slot_size)
        .map_err(verbs_error("register the staging slots"))?;
    let landing = device
        .register(slots * config.landing_slot_size)
        .map_err(verbs_error("register the landing slots"))?;
    let cq = device
        .create_cq(u32::try_from(3 * depth + slots + 16).unwrap_or(u32::MAX))
        .map_err(verbs_error("create the completion queue"))?;
    let caps = QpCaps {
        max_send_wr: u32::try_from(depth + slots + 4).unwrap_or(u32::MAX),
        max_recv_wr: u32::from(config.recv_ring_depth),
        rnr_retry: 7,
    };
    let qp = device
        .create_qp(&cq, caps)
        .map_err(verbs_error("create the queue pair"))?;
    qp.to_init().map_err(verbs_error("queue pair to Init"))?;
    for index in 0..depth {
        qp.post_recv(
            WR_RECV | index as u64,
            &recv_region,
            index * config.recv_buffer_size,
            config.recv_buffer_size,
        )
        .map_err(verbs_error("post the receive ring"))?;
    }
    let hello = Hello {
        endpoint: qp.endpoint(),
        recv_ring_depth: config.recv_ring_depth,
        recv_buffer_size: u32::try_from(config.recv_buffer_size).unwrap_or(u32::MAX),
        landing_slots: config.landing_slots,
        landing_slot_size: u32::try_from(config.landing_slot_size).unwrap_or(u32::MAX),
        landing: landing.remote_address(0),
    };
    let io = |what: &'static str| {
        let label = label.clone();
        move |e: std::io::Error| NetError::io(format!("{label}: {what}"), &e)
    };
    stream
        .write_all(&hello.encode())
        .await
        .map_err(io("send the hello"))?;
    let mut peer_hello = [0u8; HELLO_LEN];
    stream
        .read_exact(&mut peer_hello)
        .await
        .map_err(io("read the peer's hello"))?;
    let peer = Hello::decode(&peer_hello)?;
    qp.to_ready_to_receive(&peer.endpoint)
        .map_err(verbs_error("queue pair to ReadyToReceive"))?;
    qp.to_ready_to_send()
        .map_err(verbs_error("queue pair to ReadyToSend"))?;
    // Neither side sends before both queue pairs can receive.
    stream.write_all(b"R").await.map_err(io("send ready"))?;
    let mut ready = [0u8; 1];
    stream
        .read_exact(&mut ready)
        .await
        .map_err(io("read ready"))?;
    if &ready != b"R" {
        return Err(NetError::Protocol {
            reason: format!("{label}: bad ready byte {ready:?}"),
        });
    }

    let (connection, link_side) = new_connection(label.clone(), context.connection.clone());
    let link = RdmaLink::<V> {
        label,
        codec: context.connection.codec(),
        allocator: Rc::clone(&context.allocator),
        qp,
        cq,
        recv_region,
        send_region,
        staging,
        landing,
        recv_buffer_size: config.recv_buffer_size,
        landing_slot_size: config.landing_slot_size,
        credits: u32::from(peer.recv_ring_depth),
        owed: 0,
        free_send_buffers: (0..depth).rev().collect(),
        free_peer_slots: (0..peer.landing_slots).collect(),
        peer_slot_in_use: vec![false; usize::from(peer.landing_slots)],
        staging_busy: vec![false; slots],
        released: Vec::new(),
        held: VecDeque::new(),
        waiting: None,
        completions: Vec::with_capacity(64),
        scratch: vec![0u8; PREFIX_LEN + 2 * RELEASED_MAX + FRAME_HEADER_LEN],
        peer,
    };
    let peer_gone = Latch::new();
    let stop_watch = Latch::new();
    let stream = Rc::new(RefCell::new(Some(stream)));
    glommio::spawn_local(watch_peer(
        Rc::clone(&stream),
        peer_gone.clone(),
        stop_watch.clone(),
    ))
    .detach();
    glommio::spawn_local(async move {
        let device = device;
        pump(link, link_side, peer_gone).await;
        // Close the out-of-band connection first: the peer learns of the close from it
        // before its queue pair sees ours disappear.
        stop_watch.set();
        stream.borrow_mut().take();
        glommio::timer::sleep(Duration::from_millis(20)).await;
        drop(device);
    })
    .detach();
    Ok(connection)
}

async fn tick_after(period: Duration) {
    glommio::timer::sleep(period).await
}

/// Reads the out-of-band connection until it ends: that is the peer closing or vanishing.
async fn watch_peer(stream: Rc<RefCell<Option<TcpStream>>>, peer_gone: Latch, stop: Latch) {
    let Some(mut stream) = stream.borrow_mut().take() else {
        return;
    };
    let mut byte = [0u8; 1];
    let ended = future::or(
        async {
            // Nothing is sent on it after set-up: any read result means the end.
            let _ = stream.read(&mut byte).await;
            true
        },
        async {
            stop.wait().await;
            false
        },
    )
    .await;
    if ended {
        peer_gone.set();
    }
    drop(stream);
}

/// Why the pump stopped.
enum PumpEnd {
    /// Closed locally and everything queued was sent.
    Closed,
    /// The peer closed or vanished.
    PeerGone,
    /// The connection failed.
    Failed(NetError),
}

async fn pump<V: Verbs>(mut link: RdmaLink<V>, side: LinkSide, peer_gone: Latch) {
    let end = link.run(&side, &peer_gone).await;
    match end {
        PumpEnd::Closed => {}
        PumpEnd::PeerGone => side.peer_finished(),
        PumpEnd::Failed(reason) => side.fail(reason),
    }
    link.qp.to_error();
    // Requests still in flight fail as the connection closes (peer_finished or fail did it);
    // anything still held for the server is dropped with the link.
    side.fail(NetError::Closed {
        reason: format!("{}: closed", link.label),
    });
}

impl<V: Verbs> RdmaLink<V> {
    async fn run(&mut self, side: &LinkSide, peer_gone: &Latch) -> PumpEnd {
        let mut idle_turns = 0u32;
        let mut gone_since: Option<Instant> = None;
        let mut closing_since: Option<Instant> = None;
        // One timer for the whole loop, re-armed only when it fires.
        let mut tick: Pin<Box<dyn Future<Output = ()>>> = Box::pin(tick_after(TICK));
        loop {
            let mut progress = match self.poll_completions(side) {
                Ok(progress) => progress,
                Err(error) => {
                    if peer_gone.is_set() {
                        return PumpEnd::PeerGone;
                    }
                    // The completion error may be the peer closing; its out-of-band close
                    // usually arrives at once.
                    let waited = future::or(
                        async {
                            peer_gone.wait().await;
                            true
                        },
                        async {
                            glommio::timer::sleep(Duration::from_millis(50)).await;
                            false
                        },
                    )
                    .await;
                    return if waited {
                        PumpEnd::PeerGone
                    } else {
                        PumpEnd::Failed(error)
                    };
                }
            };
            progress |= self.hand_over_held(side);
            match self.send_queued(side) {
                Ok(sent) => progress |= sent,
                Err(error) => return PumpEnd::Failed(error),
            }
            if let Err(error) = self.maybe_return_credits() {
                return PumpEnd::Failed(error);
            }
            if peer_gone.is_set() {
                // Deliver what already arrived, then stop.
                let since = *gone_since.get_or_insert_with(Instant::now);
                if !progress && since.elapsed() > Duration::from_millis(2) {
                    return PumpEnd::PeerGone;
                }
            }
            let drained = side.outgoing().is_closed() && side.outgoing().is_empty();
            if drained && self.waiting.is_none() {
                if self.all_sends_complete() {
                    return PumpEnd::Closed;
                }
                // A peer that never completes our last sends must not keep this task alive.
                let since = *closing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > side.config().io_timeout {
                    return PumpEnd::Closed;
                }
            }
            if progress {
                idle_turns = 0;
                glommio::yield_if_needed().await;
                continue;
            }
            idle_turns += 1;
            if self
                .wait_for_work(side, peer_gone, idle_turns, tick.as_mut())
                .await
            {
                tick = Box::pin(tick_after(TICK));
            }
        }
    }

    fn all_sends_complete(&self) -> bool {
        self.free_send_buffers.len() == usize::from(self.peer_depth_local())
            && !self.staging_busy.iter().any(|&busy| busy)
    }

    fn peer_depth_local(&self) -> u16 {
        // Send buffers are sized by our own ring depth.
        (self.send_region.len() / self.recv_buffer_size) as u16
    }

    /// Waits for a completion, a frame to send, room in the server queue, the peer's end or
    /// the tick. Returns whether the tick fired (and must be re-armed).
    async fn wait_for_work(
        &self,
        side: &LinkSide,
        peer_gone: &Latch,
        idle_turns: u32,
        tick: Pin<&mut dyn Future<Output = ()>>,
    ) -> bool {
        // A closed send queue is "non-empty" for ever; only an open one is worth waiting on.
        let can_send = self.waiting.is_none() && !side.outgoing().is_closed();
        let completion = async {
            match self.cq.completion_signal() {
                Some(signal) => signal.notified().await,
                None if idle_turns < IDLE_SPINS => glommio::executor().yield_now().await,
                None => {
                    let doublings = ((idle_turns - IDLE_SPINS) / 16).min(5);
                    glommio::timer::sleep(IDLE_SLEEP * (1 << doublings)).await
                }
            }
        };
        let outgoing = async {
            if can_send {
                side.outgoing().wait_nonempty().await
            } else {
                std::future::pending::<()>().await
            }
        };
        let room = async {
            if self.held.is_empty() {
                std::future::pending::<()>().await
            } else {
                side.wait_room().await
            }
        };
        // Once the peer is gone the pump only drains what arrived, paced by the tick.
        let gone = async {
            if peer_gone.is_set() {
                std::future::pending::<()>().await
            } else {
                peer_gone.wait().await
            }
        };
        let woken = async {
            future::or(future::or(completion, outgoing), future::or(room, gone)).await;
            false
        };
        // The tick bounds every wait: a missed wake-up costs one tick, never a hang, and it
        // paces the grace periods of a closing connection.
        future::or(woken, async {
            tick.await;
            true
        })
        .await
    }

    fn error(&self, what: &str) -> NetError {
        NetError::Protocol {
            reason: format!("{}: {what}", self.label),
        }
    }

    fn poll_completions(&mut self, side: &LinkSide) -> Result<bool, NetError> {
        self.completions.clear();
        let count = self
            .cq
            .poll(&mut self.completions, 64)
            .map_err(|e| NetError::Io {
                context: format!("{}: poll the completion queue", self.label),
                reason: e.to_string(),
            })?;
        let completions = std::mem::take(&mut self.completions);
        for completion in &completions {
            self.on_completion(completion, side)?;
        }
        self.completions = completions;
        Ok(count > 0)
    }

    fn on_completion(
        &mut self,
        completion: &WorkCompletion,
        side: &LinkSide,
    ) -> Result<(), NetError> {
        if completion.status != WcStatus::Success {
            return Err(NetError::Io {
                context: format!("{}: work request {:#x}", self.label, completion.wr_id),
                reason: format!("completed with {:?}", completion.status),
            });
        }
        let index = (completion.wr_id & WR_INDEX_MASK) as usize;
        match completion.wr_id & !WR_INDEX_MASK {
            WR_SEND => self.free_send_buffers.push(index),
            WR_WRITE => {
                if let Some(busy) = self.staging_busy.get_mut(index) {
                    *busy = false;
                }
            }
            WR_RECV if completion.opcode == WcOpcode::Recv => {
                self.on_receive(index, completion.byte_len as usize, side)?;
            }
            _ => return Err(self.error(&format!("unexpected completion {completion:?}"))),
        }
        Ok(())
    }

    fn on_receive(&mut self, index: usize, len: usize, side: &LinkSide) -> Result<(), NetError> {
        let base = index * self.recv_buffer_size;
        if len < PREFIX_LEN || len > self.recv_buffer_size {
            return Err(self.error(&format!("message of {len} bytes")));
        }
        let head_len = len.min(self.scratch.len());
        let mut head = std::mem::take(&mut self.scratch);
        let read = self.recv_region.read_at(base, &mut head[..head_len]);
        let result = read
            .map_err(|e| self.error(&e.to_string()))
            .and_then(|()| self.on_message(base, len, &head[..head_len]));
        self.scratch = head;
        let frame = result?;
        // The buffer is free again as soon as its contents were copied out.
        self.qp
            .post_recv(
                WR_RECV | index as u64,
                &self.recv_region,
                base,
                self.recv_buffer_size,
            )
            .map_err(|e| self.error(&format!("re-post a receive: {e}")))?;
        match frame {
            None => self.owed += 1,
            // Frames reach the server in arrival order: behind any already held.
            Some(frame) if !self.held.is_empty() => self.held.push_back(frame),
            Some(frame) => match side.try_deliver(frame) {
                Ok(()) => self.owed += 1,
                // Its credit goes back once the server queue takes it.
                Err(frame) => self.held.push_back(frame),
            },
        }
        Ok(())
    }

    /// Parses one message; returns the frame it carries, if any.
    fn on_message(
        &mut self,
        base: usize,
        len: usize,
        head: &[u8],
    ) -> Result<Option<Frame>, NetError> {
        let kind = head[0];
        let released_count = usize::from(head[1]);
        let credits = u32::from(u16::from_le_bytes([head[2], head[3]]));
        let slot = u16::from_le_bytes([head[4], head[5]]);
        if head[6] != 0 || head[7] != 0 {
            return Err(self.error("reserved prefix bytes are not zero"));
        }
        let header_at = PREFIX_LEN + 2 * released_count;
        if released_count > RELEASED_MAX || header_at > len {
            return Err(self.error(&format!("{released_count} released slots")));
        }
        for i in 0..released_count {
            let at = PREFIX_LEN + 2 * i;
            let released = u16::from_le_bytes([head[at], head[at + 1]]);
            match self.peer_slot_in_use.get_mut(usize::from(released)) {
                Some(in_use) if *in_use => {
                    *in_use = false;
                    self.free_peer_slots.push_back(released);
                }
                _ => return Err(self.error(&format!("release of slot {released} not in use"))),
            }
        }
        self.credits += credits;
        if self.credits > u32::from(self.peer.recv_ring_depth) {
            return Err(self.error("more credits returned than the peer's ring holds"));
        }
        match kind {
            KIND_CREDIT if len == header_at => Ok(None),
            KIND_INLINE | KIND_SLOT => {
                let header_bytes = head
                    .get(header_at..header_at + FRAME_HEADER_LEN)
                    .ok_or_else(|| self.error("message shorter than a frame header"))?;
                let header = self.codec.decode_header(header_bytes)?;
                let payload_len = header.payload_len as usize;
                let mut buffer = self.allocator.allocate(payload_len)?;
                if kind == KIND_INLINE {
                    if len != header_at + FRAME_HEADER_LEN + payload_len {
                        return Err(self.error("inline payload length mismatch"));
                    }
                    self.recv_region
                        .read_at(base + header_at + FRAME_HEADER_LEN, (*buffer).as_mut())
                        .map_err(|e| self.error(&e.to_string()))?;
                } else {
                    let slot_index = usize::from(slot);
                    if len != header_at + FRAME_HEADER_LEN
                        || slot_index * self.landing_slot_size >= self.landing.len()
                        || payload_len > self.landing_slot_size
                    {
                        return Err(self.error(&format!("bad landing slot message (slot {slot})")));
                    }
                    self.landing
                        .read_at(slot_index * self.landing_slot_size, (*buffer).as_mut())
                        .map_err(|e| self.error(&e.to_string()))?;
                    self.released.push(slot);
                }
                self.codec.check_payload(&header, (*buffer).as_ref())?;
                Ok(Some(Frame {
                    header,
                    payload: freeze(buffer),
                }))
            }
            other => Err(self.error(&format!("unknown message kind {other}"))),
        }
    }

    fn hand_over_held(&mut self, side: &LinkSide) -> bool {
        let mut progress = false;
        while let Some(frame) = self.held.pop_front() {
            match side.try_deliver(frame) {
                Ok(()) => {
                    self.owed += 1;
                    progress = true;
                }
                Err(frame) => {
                    self.held.push_front(frame);
                    break;
                }
            }
        }
        progress
    }

    fn inline_max(&self) -> usize {
        (self.peer.recv_buffer_size as usize)
            .min(self.recv_buffer_size)
            .saturating_sub(PREFIX_LEN + 2 * RELEASED_MAX + FRAME_HEADER_LEN)
    }

    /// Sends queued frames while credits, buffers and slots allow.
    fn send_queued(&mut self, side: &LinkSide) -> Result<bool, NetError> {
        let mut progress = false;
        loop {
            let frame = match self.waiting.take() {
                Some(frame) => frame,
                None => match side.outgoing().try_pop() {
                    Some(frame) => frame,
                    None => return Ok(progress),
                },
            };
            // One credit stays in reserve for credit returns.
            if self.credits < 2 || self.free_send_buffers.is_empty() {
                self.waiting = Some(frame);
                return Ok(progress);
            }
            if frame.payload.len() <= self.inline_max() {
                self.post_message(KIND_INLINE, 0, Some(&frame))?;
            } else {
                if frame.payload.len() > self.peer.landing_slot_size as usize {
                    return Err(NetError::PayloadTooLarge {
                        len: frame.payload.len(),
                        max: self.peer.landing_slot_size,
                    });
                }
                let free = self.free_peer_slots.iter().position(|&slot| {
                    !self
                        .staging_busy
                        .get(usize::from(slot))
                        .copied()
                        .unwrap_or(true)
                });
                let Some(position) = free else {
                    self.waiting = Some(frame);
                    return Ok(progress);
                };
                let Some(slot) = self.free_peer_slots.remove(position) else {
                    self.waiting = Some(frame);
                    return Ok(progress);
                };
                self.write_to_slot(slot, &frame)?;
                self.post_message(KIND_SLOT, slot, Some(&frame))?;
            }
            progress = true;
        }
    }

    fn write_to_slot(&mut self, slot: u16, frame: &Frame) -> Result<(), NetError> {
        let index = usize::from(slot);
        let offset = index * self.landing_slot_size;
        self.staging
            .write_at(offset, &frame.payload)
            .map_err(|e| self.error(&format!("staging slot {slot}: {e}")))?;
        let addr = (index as u64)
            .checked_mul(u64::from(self.peer.landing_slot_size))
            .and_then(|offset| self.peer.landing.addr.checked_add(offset))
            .ok_or_else(|| self.error(&format!("peer landing slot {slot} address overflows")))?;
        let remote = RemoteAddress {
            addr,
            rkey: self.peer.landing.rkey,
        };
        self.qp
            .post_send(SendRequest {
                wr_id: WR_WRITE | index as u64,
                op: SendOp::Write(remote),
                region: &self.staging,
                offset,
                len: frame.payload.len(),
                signaled: true,
            })
            .map_err(|e| self.error(&format!("post an RDMA write: {e}")))?;
        if let Some(busy) = self.staging_busy.get_mut(index) {
            *busy = true;
        }
        if let Some(in_use) = self.peer_slot_in_use.get_mut(index) {
            *in_use = true;
        }
        Ok(())
    }

    /// Sends a credit-only message when half the ring is owed or a slot waits for release,
    /// using the reserved credit if need be.
    fn maybe_return_credits(&mut self) -> Result<(), NetError> {
        let ring_half = u32::from(self.peer_depth_local()) / 2;
        let due = self.owed >= ring_half.max(1) || !self.released.is_empty();
        if due && self.credits >= 1 && !self.free_send_buffers.is_empty() {
            self.post_message(KIND_CREDIT, 0, None)?;
        }
        Ok(())
    }

    fn post_message(&mut self, kind: u8, slot: u16, frame: Option<&Frame>) -> Result<(), NetError> {
        let Some(buffer) = self.free_send_buffers.pop() else {
            return Err(self.error("no send buffer (checked by the caller)"));
        };
        let released: Vec<u16> = self
            .released
            .drain(..self.released.len().min(RELEASED_MAX))
            .collect();
        let credits = self.owed.min(u32::from(u16::MAX));
        let mut message = Vec::with_capacity(PREFIX_LEN + 2 * released.len() + FRAME_HEADER_LEN);
        message.push(kind);
        message.push(released.len() as u8);
        message.extend_from_slice(&(credits as u16).to_le_bytes());
        message.extend_from_slice(&slot.to_le_bytes());
        message.extend_from_slice(&[0, 0]);
        for released in &released {
            message.extend_from_slice(&released.to_le_bytes());
        }
        if let Some(frame) = frame {
            message.extend_from_slice(&frame.header.encode());
            if kind == KIND_INLINE {
                message.extend_from_slice(&frame.payload);
            }
        }
        let offset = buffer * self.recv_buffer_size;
        self.send_region
            .write_at(offset, &message)
            .map_err(|e| self.error(&format!("send buffer: {e}")))?;
        self.qp
            .post_send(SendRequest {
                wr_id: WR_SEND | buffer as u64,
                op: SendOp::Send,
                region: &self.send_region,
                offset,
                len: message.len(),
                signaled: true,
            })
            .map_err(|e| self.error(&format!("post a send: {e}")))?;
        self.owed -= credits;
        self.credits -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::message_suite::{context, listen_addr, run_case};
    use crate::net::transport::{connect as connect_endpoint, Listener};
    use crate::net::{Message, Opcode};
    use bytes::Bytes;

    fn small_rings() -> NetContext {
        let mut context = context();
        context.rdma.recv_ring_depth = 4;
        context.rdma.landing_slots = 1;
        context
    }

    /// With a ring of 4 and one landing slot, hundreds of messages of every size go through:
    /// credits and slots run out again and again and come back.
    #[test]
    fn credits_and_slots_run_out_and_come_back() {
        run_case(Duration::from_secs(60), || async {
            let context = small_rings();
            let (endpoint, sequence) =
                crate::net::message_suite::start_echo_server(Transport::SoftRdma, &context).await;
            let connection = connect_endpoint(&endpoint, &context)
                .await
                .expect("connect");
            let calls: Vec<_> = (0..300u64)
                .map(|i| {
                    let connection = connection.clone();
                    glommio::spawn_local(async move {
                        let len = [10usize, 5000, 100_000][i as usize % 3];
                        let payload = Bytes::from(vec![(i % 251) as u8; len]);
                        let response = connection
                            .call(Message::new(Opcode::PING, i, payload.clone()))
                            .await
                            .expect("echo");
                        assert_eq!(response.payload, payload);
                    })
                })
                .collect();
            for call in calls {
                call.await;
            }
            assert!(sequence.borrow().is_empty());
        });
    }

    #[test]
    fn a_hello_with_a_bad_magic_is_refused_and_the_listener_keeps_serving() {
        run_case(Duration::from_secs(30), || async {
            let context = context();
            let (endpoint, _) =
                crate::net::message_suite::start_echo_server(Transport::SoftRdma, &context).await;
            let mut raw = TcpStream::connect(endpoint.addr)
                .await
                .expect("raw connect");
            raw.write_all(&[0x55; HELLO_LEN]).await.expect("write");
            let mut rest = Vec::new();
            let _ = raw.read_to_end(&mut rest).await;
            let connection = connect_endpoint(&endpoint, &context)
                .await
                .expect("connect");
            let response = connection
                .call(Message::new(Opcode::PING, 0, Bytes::from_static(b"after")))
                .await
                .expect("echo");
            assert_eq!(&response.payload[..], b"after");
        });
    }

    /// A hand-made peer for the listener's first connection: a real softverbs queue pair that
    /// completes set-up advertising `landing`, whatever that is.
    struct HandMadePeer {
        device: SoftVerbs,
        qp: super::super::verbs::soft::SoftQp,
        _cq: super::super::verbs::soft::SoftCq,
        _ring: super::super::verbs::soft::SoftRegion,
        _stream: TcpStream,
    }

    async fn hand_made_peer(listener: Listener, landing: RemoteAddress) -> HandMadePeer {
        let Listener::Rdma(listener) = listener else {
            panic!("softrdma gives an RDMA listener")
        };
        let mut stream = listener.listener.accept().await.expect("accept");
        let device = SoftVerbs::open(listen_addr().ip()).expect("device");
        let cq = device.create_cq(64).expect("cq");
        let qp = device.create_qp(&cq, QpCaps::default()).expect("qp");
        qp.to_init().expect("init");
        let ring = device.register(8 * 8192).expect("ring");
        for i in 0..8 {
            qp.post_recv(i as u64, &ring, i * 8192, 8192).expect("recv");
        }
        let hello = Hello {
            endpoint: qp.endpoint(),
            recv_ring_depth: 8,
            recv_buffer_size: 8192,
            landing_slots: 1,
            landing_slot_size: 4 << 20,
            landing,
        };
        stream.write_all(&hello.encode()).await.expect("hello");
        let mut theirs = [0u8; HELLO_LEN];
        stream.read_exact(&mut theirs).await.expect("their hello");
        let theirs = Hello::decode(&theirs).expect("decode");
        qp.to_ready_to_receive(&theirs.endpoint).expect("rtr");
        qp.to_ready_to_send().expect("rts");
        stream.write_all(b"R").await.expect("ready");
        let mut ready = [0u8; 1];
        stream.read_exact(&mut ready).await.expect("ready");
        HandMadePeer {
            device,
            qp,
            _cq: cq,
            _ring: ring,
            _stream: stream,
        }
    }

    async fn bound_listener(context: &NetContext) -> (Listener, Endpoint) {
        let listener = Listener::bind(
            &Endpoint {
                transport: Transport::SoftRdma,
                addr: listen_addr(),
            },
            context,
        )
        .await
        .expect("bind");
        let endpoint = listener.local_endpoint().expect("endpoint");
        (listener, endpoint)
    }

    /// A peer whose landing-slot rkey is wrong: the first large payload fails with a remote
    /// access error, the connection closes, and the calls on it fail rather than hang.
    #[test]
    fn a_bad_rkey_from_the_peer_closes_the_connection() {
        run_case(Duration::from_secs(30), || async {
            let context = context();
            let (listener, endpoint) = bound_listener(&context).await;
            let bad_landing = RemoteAddress {
                addr: 0x1234_0000,
                rkey: 0xBAD,
            };
            let (peer, connection) = future::zip(
                hand_made_peer(listener, bad_landing),
                connect_endpoint(&endpoint, &context),
            )
            .await;
            let connection = connection.expect("connect");
            let large = Bytes::from(vec![1u8; 100_000]);
            let result = connection.call(Message::new(Opcode::PING, 0, large)).await;
            match result {
                Err(NetError::Io { reason, .. }) => {
                    assert!(reason.contains("RemoteAccessError"), "{reason}")
                }
                other => panic!("expected a remote access error, got {other:?}"),
            }
            assert!(connection.is_closed());
            drop(peer);
        });
    }

    /// A peer that sends a corrupt frame (and one that breaks the credit rules) gets its
    /// connection closed with the reason, and the calls waiting on it fail.
    #[test]
    fn a_malformed_message_closes_the_connection() {
        type Corrupt = fn(&mut Vec<u8>);
        let cases: [(&str, Corrupt); 4] = [
            ("header checksum", |m| m[PREFIX_LEN + 10] ^= 1),
            ("payload checksum", |m| {
                let last = m.len() - 1;
                m[last] ^= 1
            }),
            ("credits beyond the ring", |m| {
                m[2..4].copy_from_slice(&1000u16.to_le_bytes())
            }),
            ("unknown kind", |m| m[0] = 9),
        ];
        for (name, corrupt) in cases {
            run_case(Duration::from_secs(30), move || async move {
                let context = context();
                let (listener, endpoint) = bound_listener(&context).await;
                let landing = RemoteAddress { addr: 0, rkey: 0 };
                let (peer, connection) = future::zip(
                    hand_made_peer(listener, landing),
                    connect_endpoint(&endpoint, &context),
                )
                .await;
                let connection = connection.expect("connect");
                let waiting = {
                    let connection = connection.clone();
                    glommio::spawn_local(async move {
                        connection
                            .call(Message::new(Opcode::PING, 0, Bytes::from_static(b"q")))
                            .await
                    })
                };
                let frame = Frame::new(
                    Opcode::PING,
                    crate::protocol::frame::FrameFlags::ONE_WAY,
                    0,
                    0,
                    Bytes::from_static(b"payload"),
                );
                let mut message = vec![KIND_INLINE, 0, 0, 0, 0, 0, 0, 0];
                frame.encode_into(&mut message);
                corrupt(&mut message);
                let region = peer.device.register(message.len()).expect("register");
                region.write_at(0, &message).expect("fill");
                peer.qp
                    .post_send(SendRequest {
                        wr_id: 1,
                        op: SendOp::Send,
                        region: &region,
                        offset: 0,
                        len: message.len(),
                        signaled: true,
                    })
                    .expect("post");
                let result = waiting.await;
                assert!(result.is_err(), "{name}: the call survived: {result:?}");
                assert!(connection.is_closed(), "{name}: connection still open");
                let reason = connection.closed_reason().map(|r| r.to_string());
                assert!(
                    matches!(
                        connection.closed_reason(),
                        Some(NetError::Frame(_)) | Some(NetError::Protocol { .. })
                    ),
                    "{name}: closed for {reason:?}"
                );
                drop(peer);
            });
        }
    }
}
