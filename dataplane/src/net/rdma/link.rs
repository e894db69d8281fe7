//! One connection's registered memory, queues and flow control, and the pump task that
//! drives them (credits, inline sends, RDMA writes into landing slots).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::{
    Hello, HELLO_LEN, IDLE_SLEEP, IDLE_SPINS, KIND_CREDIT, KIND_INLINE, KIND_SLOT, PREFIX_LEN,
    RELEASED_MAX, TICK, WR_INDEX_MASK, WR_RECV, WR_SEND, WR_WRITE,
};
use crate::net::connection::{new_connection, Connection, LinkSide};
use crate::net::context::{NetContext, RdmaConfig};
use crate::net::payload::{freeze, PayloadAllocator};
use crate::net::queue::Latch;
use crate::net::verbs::{
    CompletionQueue, MemoryRegion, QpCaps, QueuePair, RemoteAccess, RemoteAddress, SendOp,
    SendRequest, Verbs, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};
use crate::net::NetError;
use crate::protocol::frame::{Frame, FrameCodec, FRAME_HEADER_LEN};

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

/// The registered memory of one connection.
struct Regions<V: Verbs> {
    recv: V::Region,
    send: V::Region,
    staging: V::Region,
    landing: V::Region,
}

/// Sets up an RDMA connection over the out-of-band `stream`: registers its memory, creates
/// its queue pair and posts the receive ring, exchanges hellos with the peer, moves the queue
/// pair to ReadyToSend, exchanges the ready byte, then spawns the pump (and the watcher of the
/// out-of-band connection) on the current shard.
pub(super) async fn set_up<V: Verbs + 'static>(
    device: Rc<V>,
    mut stream: TcpStream,
    label: String,
    context: &NetContext,
) -> Result<Connection, NetError> {
    let config = &context.rdma;
    // A protection domain of its own: no other connection's peer can reach this one's
    // regions, whatever keys it learns (issue 25, item 9).
    let device = Rc::new(
        device
            .new_domain()
            .map_err(verbs_error(&label, "allocate a protection domain"))?,
    );
    let started = Instant::now();
    let regions = register_regions(&*device, config, &label)?;
    let registered = started.elapsed();
    let (cq, qp) = create_queues(&*device, config, &label)?;
    post_receive_ring(&qp, &regions.recv, config, &label)?;
    tracing::debug!(%label, ?registered, queues = ?(started.elapsed() - registered), "rdma set-up: regions and queues");
    let hello = own_hello(&qp, &regions.landing, config);
    let peer = exchange_hellos(&mut stream, &hello, &label).await?;
    connect_queue_pair(&qp, &peer, &label)?;
    exchange_ready(&mut stream, &label).await?;

    let (connection, link_side) = new_connection(label.clone(), context.connection.clone());
    let link = RdmaLink::<V>::new(label, context, qp, cq, regions, peer);
    spawn_pump(device, stream, link, link_side);
    Ok(connection)
}

/// Maps a verbs failure of set-up step `what` to an I/O error naming the connection.
fn verbs_error(label: &str, what: &'static str) -> impl FnOnce(VerbsError) -> NetError {
    let label = label.to_string();
    move |e: VerbsError| NetError::Io {
        context: format!("{label}: {what}"),
        reason: e.to_string(),
    }
}

/// Maps an out-of-band I/O failure of set-up step `what` to an error naming the connection.
fn io_error(label: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> NetError {
    let label = label.to_string();
    move |e: std::io::Error| NetError::io(format!("{label}: {what}"), &e)
}

/// Registers the receive ring, the send buffers, the staging slots and the landing slots.
fn register_regions<V: Verbs>(
    device: &V,
    config: &RdmaConfig,
    label: &str,
) -> Result<Regions<V>, NetError> {
    let depth = usize::from(config.recv_ring_depth);
    let slots = usize::from(config.landing_slots);
    // Only the landing slots are the peer's to reach (its RDMA writes land there); the rings
    // and the staging slots are for this side's own sends and writes.
    let recv = device
        .register(depth * config.recv_buffer_size, RemoteAccess::None)
        .map_err(verbs_error(label, "register the receive ring"))?;
    let send = device
        .register(depth * config.recv_buffer_size, RemoteAccess::None)
        .map_err(verbs_error(label, "register the send buffers"))?;
    let staging = device
        .register(slots * config.landing_slot_size, RemoteAccess::None)
        .map_err(verbs_error(label, "register the staging slots"))?;
    let landing = device
        .register(slots * config.landing_slot_size, RemoteAccess::Write)
        .map_err(verbs_error(label, "register the landing slots"))?;
    Ok(Regions {
        recv,
        send,
        staging,
        landing,
    })
}

/// Creates the completion queue and the queue pair, and moves the queue pair to Init.
fn create_queues<V: Verbs>(
    device: &V,
    config: &RdmaConfig,
    label: &str,
) -> Result<(V::Cq, V::Qp), NetError> {
    let depth = usize::from(config.recv_ring_depth);
    let slots = usize::from(config.landing_slots);
    let cq = device
        .create_cq(u32::try_from(3 * depth + slots + 16).unwrap_or(u32::MAX))
        .map_err(verbs_error(label, "create the completion queue"))?;
    let caps = QpCaps {
        max_send_wr: u32::try_from(depth + slots + 4).unwrap_or(u32::MAX),
        max_recv_wr: u32::from(config.recv_ring_depth),
        rnr_retry: 7,
    };
    let qp = device
        .create_qp(&cq, caps)
        .map_err(verbs_error(label, "create the queue pair"))?;
    qp.to_init()
        .map_err(verbs_error(label, "queue pair to Init"))?;
    Ok((cq, qp))
}

/// Posts every buffer of the receive ring.
fn post_receive_ring<Q: QueuePair>(
    qp: &Q,
    recv_region: &Q::Region,
    config: &RdmaConfig,
    label: &str,
) -> Result<(), NetError> {
    for index in 0..usize::from(config.recv_ring_depth) {
        qp.post_recv(
            WR_RECV | index as u64,
            recv_region,
            index * config.recv_buffer_size,
            config.recv_buffer_size,
        )
        .map_err(verbs_error(label, "post the receive ring"))?;
    }
    Ok(())
}

/// The hello this side sends: its queue-pair address, receive ring and landing slots.
fn own_hello<Q: QueuePair>(qp: &Q, landing: &Q::Region, config: &RdmaConfig) -> Hello {
    Hello {
        endpoint: qp.endpoint(),
        recv_ring_depth: config.recv_ring_depth,
        recv_buffer_size: u32::try_from(config.recv_buffer_size).unwrap_or(u32::MAX),
        landing_slots: config.landing_slots,
        landing_slot_size: u32::try_from(config.landing_slot_size).unwrap_or(u32::MAX),
        landing: landing.remote_address(0),
    }
}

/// Sends our hello over the out-of-band connection, then reads and decodes the peer's.
async fn exchange_hellos(
    stream: &mut TcpStream,
    hello: &Hello,
    label: &str,
) -> Result<Hello, NetError> {
    stream
        .write_all(&hello.encode())
        .await
        .map_err(io_error(label, "send the hello"))?;
    let mut peer_hello = [0u8; HELLO_LEN];
    stream
        .read_exact(&mut peer_hello)
        .await
        .map_err(io_error(label, "read the peer's hello"))?;
    Hello::decode(&peer_hello)
}

/// Moves the queue pair to ReadyToReceive (towards the peer's) and on to ReadyToSend.
fn connect_queue_pair<Q: QueuePair>(qp: &Q, peer: &Hello, label: &str) -> Result<(), NetError> {
    qp.to_ready_to_receive(&peer.endpoint)
        .map_err(verbs_error(label, "queue pair to ReadyToReceive"))?;
    qp.to_ready_to_send()
        .map_err(verbs_error(label, "queue pair to ReadyToSend"))
}

/// Sends the ready byte and waits for the peer's.
async fn exchange_ready(stream: &mut TcpStream, label: &str) -> Result<(), NetError> {
    // Neither side sends before both queue pairs can receive.
    stream
        .write_all(b"R")
        .await
        .map_err(io_error(label, "send ready"))?;
    let mut ready = [0u8; 1];
    stream
        .read_exact(&mut ready)
        .await
        .map_err(io_error(label, "read ready"))?;
    if &ready != b"R" {
        return Err(NetError::Protocol {
            reason: format!("{label}: bad ready byte {ready:?}"),
        });
    }
    Ok(())
}

/// Spawns the watcher of the out-of-band connection and the pump, detached; when the pump
/// ends, the out-of-band connection closes, and the device is kept a little longer.
fn spawn_pump<V: Verbs + 'static>(
    device: Rc<V>,
    stream: TcpStream,
    link: RdmaLink<V>,
    link_side: LinkSide,
) {
    let peer_gone = Latch::new();
    let stop_watch = Latch::new();
    let stream = Rc::new(RefCell::new(Some(stream)));
    let (stream_of_watch, peer_gone_of_watch, stop_of_watch) =
        (Rc::clone(&stream), peer_gone.clone(), stop_watch.clone());
    // Both tasks hold a link side until their sockets are gone, so that
    // `Connection::link_ended` means the peer can see the end.
    let watch_side = link_side.clone();
    glommio::spawn_local(async move {
        watch_peer(
            Rc::clone(&stream_of_watch),
            peer_gone_of_watch,
            stop_of_watch,
        )
        .await;
        drop(watch_side);
    })
    .detach();
    glommio::spawn_local(async move {
        let device = device;
        let pump_side = link_side.clone();
        pump(link, link_side, peer_gone).await;
        // Close the out-of-band connection first: the peer learns of the close from it
        // before its queue pair sees ours disappear.
        stop_watch.set();
        stream.borrow_mut().take();
        glommio::timer::sleep(Duration::from_millis(20)).await;
        drop(device);
        drop(pump_side);
    })
    .detach();
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
    /// A connected link, before its first turn: all the peer's receive buffers are credits,
    /// all send buffers and peer landing slots are free.
    fn new(
        label: String,
        context: &NetContext,
        qp: V::Qp,
        cq: V::Cq,
        regions: Regions<V>,
        peer: Hello,
    ) -> RdmaLink<V> {
        let config = &context.rdma;
        let depth = usize::from(config.recv_ring_depth);
        let slots = usize::from(config.landing_slots);
        RdmaLink::<V> {
            label,
            codec: context.connection.codec(),
            allocator: Rc::clone(&context.allocator),
            qp,
            cq,
            recv_region: regions.recv,
            send_region: regions.send,
            staging: regions.staging,
            landing: regions.landing,
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
        }
    }

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
            if side.is_aborted() {
                return PumpEnd::Closed;
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
