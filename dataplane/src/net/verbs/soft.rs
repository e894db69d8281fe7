//! `softverbs`: verbs semantics in user space, over one TCP socket per connected queue pair.
//!
//! It behaves as an RC queue pair does, so the RDMA transport tested over it is the code that
//! runs on a NIC:
//! - delivery is reliable and ordered, every request carries a packet sequence number (PSN)
//!   and is acknowledged; completions are reported in posting order;
//! - a send (or write with immediate) that finds no receive posted is refused with an RNR NAK
//!   and retried after the RNR timer, `rnr_retry` times (7: forever), go-back-N: the responder
//!   drops every later packet until the refused one comes again;
//! - RDMA write and read go to registered regions only, checked by rkey and range; a bad rkey
//!   or range completes the request with `RemoteAccessError`, a send longer than the receive
//!   buffer with `LocalLengthError` at the responder and `RemoteInvalidRequestError` at the
//!   requester; an error moves the queue pair to Error, which flushes everything outstanding
//!   with `WrFlushError`;
//! - a peer that disappears (its socket closes) fails what was in flight with
//!   `RetryExceededError`, as the transport retry timer would on a NIC.
//!
//! A device is a socket listener on one IP address. A queue pair's [`QpEndpoint`] carries that
//! address (`gid` = the IPv4-mapped address, `lid` = the port) and its QP number; the queue
//! pair with the lower (address, QP number) dials the other when it moves to ReadyToReceive.
//!
//! Everything runs on the shard's glommio executor: posting never blocks, the socket is
//! driven by two tasks per queue pair, and completions wake the poller through a [`Notify`].

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::rc::{Rc, Weak};
use std::time::Duration;

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::{
    CompletionQueue, MemoryRegion, QpCaps, QpEndpoint, QpState, QueuePair, RemoteAddress, SendOp,
    SendRequest, Verbs, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};
use crate::net::queue::{Latch, Notify};
use crate::net::tcp::SharedStream;

/// How long an RNR-refused request waits before it is sent again.
const RNR_DELAY: Duration = Duration::from_micros(500);
/// A wire write that makes no progress for this long means the peer is gone.
const WIRE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest packet body accepted from the wire: a request's data plus its header.
const PACKET_BODY_MAX: usize = (64 << 20) + 64;
/// Wires accepted before their queue pair reached ReadyToReceive, kept at most.
const PARKED_WIRES_MAX: usize = 256;
/// Regions are given disjoint virtual address ranges of this size (so at most 4 GiB each).
const REGION_ADDRESS_SPAN: u64 = 1 << 32;

const PACKET_SEND: u8 = 1;
const PACKET_WRITE: u8 = 2;
const PACKET_READ_REQUEST: u8 = 3;
const PACKET_ACK: u8 = 4;
const PACKET_NAK: u8 = 5;
const PACKET_READ_RESPONSE: u8 = 6;

const NAK_RNR: u8 = 1;
const NAK_REMOTE_ACCESS: u8 = 2;
const NAK_INVALID_REQUEST: u8 = 3;

/// A softverbs device and its protection domain.
pub struct SoftVerbs {
    device: Rc<SoftDevice>,
}

struct SoftDevice {
    /// Where peers dial this device's queue pairs.
    addr: SocketAddr,
    regions: RefCell<HashMap<u32, Weak<RegionInner>>>,
    queue_pairs: RefCell<HashMap<u32, Weak<QpInner>>>,
    /// Wires that arrived before their queue pair was ready: destination QPN → (source QPN,
    /// stream). Invariant: at most `PARKED_WIRES_MAX` entries.
    parked_wires: RefCell<HashMap<u32, (u32, TcpStream)>>,
    next_key: Cell<u32>,
    next_qp_num: Cell<u32>,
    closed: Latch,
}

impl Drop for SoftVerbs {
    fn drop(&mut self) {
        self.device.closed.set();
    }
}

impl SoftVerbs {
    /// Opens a device listening on `ip` (port chosen by the system). Must run on a glommio
    /// executor: the device's tasks run there.
    pub fn open(ip: IpAddr) -> Result<SoftVerbs, VerbsError> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| VerbsError::Call {
            call: "softverbs listen",
            reason: e.to_string(),
        })?;
        let addr = listener.local_addr().map_err(|e| VerbsError::Call {
            call: "softverbs listen",
            reason: e.to_string(),
        })?;
        let device = Rc::new(SoftDevice {
            addr,
            regions: RefCell::new(HashMap::new()),
            queue_pairs: RefCell::new(HashMap::new()),
            parked_wires: RefCell::new(HashMap::new()),
            next_key: Cell::new(1),
            next_qp_num: Cell::new(1),
            closed: Latch::new(),
        });
        glommio::spawn_local(accept_wires(
            Rc::downgrade(&device),
            listener,
            device.closed.clone(),
        ))
        .detach();
        Ok(SoftVerbs { device })
    }

    /// The socket address peers dial.
    pub fn addr(&self) -> SocketAddr {
        self.device.addr
    }
}

async fn accept_wires(device: Weak<SoftDevice>, listener: TcpListener, closed: Latch) {
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            closed.wait().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { return };
        let Ok(mut stream) = accepted else { continue };
        let mut hello = [0u8; 8];
        let read = future::or(
            async { stream.read_exact(&mut hello).await.is_ok() },
            async {
                glommio::timer::sleep(Duration::from_secs(5)).await;
                false
            },
        )
        .await;
        if !read {
            continue;
        }
        let destination = u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]]);
        let source = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]);
        let Some(device) = device.upgrade() else {
            return;
        };
        let qp = device
            .queue_pairs
            .borrow()
            .get(&destination)
            .and_then(Weak::upgrade);
        match qp {
            Some(qp) if qp.expects_wire_from(source) => qp.attach_wire(stream),
            _ => {
                let mut parked = device.parked_wires.borrow_mut();
                if parked.len() >= PARKED_WIRES_MAX {
                    debug!("softverbs: too many unclaimed wires, dropping one");
                    if let Some(key) = parked.keys().next().copied() {
                        parked.remove(&key);
                    }
                }
                parked.insert(destination, (source, stream));
            }
        }
    }
}

/// Registered memory of a [`SoftVerbs`] device. Dropping it deregisters it.
pub struct SoftRegion {
    inner: Rc<RegionInner>,
}

struct RegionInner {
    bytes: RefCell<Box<[u8]>>,
    rkey: u32,
    /// Invariant: `base = rkey * REGION_ADDRESS_SPAN`, so addresses of regions never overlap.
    base: u64,
}

impl RegionInner {
    fn check(&self, offset: usize, len: usize) -> Result<(), VerbsError> {
        let region_len = self.bytes.borrow().len();
        match offset.checked_add(len) {
            Some(end) if end <= region_len => Ok(()),
            _ => Err(VerbsError::OutOfRange {
                offset,
                len,
                region_len,
            }),
        }
    }

    /// The offset of `[addr, addr + len)` in this region, if it lies inside.
    fn offset_of(&self, addr: u64, len: usize) -> Option<usize> {
        let offset = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        self.check(offset, len).ok()?;
        Some(offset)
    }

    fn write(&self, offset: usize, data: &[u8]) {
        if let Some(target) = self.bytes.borrow_mut().get_mut(offset..offset + data.len()) {
            target.copy_from_slice(data);
        }
    }

    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        self.bytes
            .borrow()
            .get(offset..offset + len)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
}

impl MemoryRegion for SoftRegion {
    fn len(&self) -> usize {
        self.inner.bytes.borrow().len()
    }

    fn remote_address(&self, offset: usize) -> RemoteAddress {
        RemoteAddress {
            addr: self.inner.base + offset as u64,
            rkey: self.inner.rkey,
        }
    }

    fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), VerbsError> {
        self.inner.check(offset, data.len())?;
        self.inner.write(offset, data);
        Ok(())
    }

    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), VerbsError> {
        self.inner.check(offset, out.len())?;
        let bytes = self.inner.bytes.borrow();
        out.copy_from_slice(&bytes[offset..offset + out.len()]);
        Ok(())
    }
}

/// A completion queue of a [`SoftVerbs`] device.
pub struct SoftCq {
    inner: Rc<CqInner>,
}

struct CqInner {
    entries: RefCell<VecDeque<WorkCompletion>>,
    /// Invariant: `entries.len() <= depth`.
    depth: u32,
    overrun: Cell<bool>,
    signal: Notify,
}

impl CqInner {
    fn push(&self, completion: WorkCompletion) {
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= self.depth as usize {
            self.overrun.set(true);
        } else {
            entries.push_back(completion);
        }
        self.signal.notify();
    }
}

impl CompletionQueue for SoftCq {
    fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> Result<usize, VerbsError> {
        if self.inner.overrun.get() {
            return Err(VerbsError::CqOverrun);
        }
        let mut entries = self.inner.entries.borrow_mut();
        let count = max.min(entries.len());
        out.extend(entries.drain(..count));
        Ok(count)
    }

    fn completion_signal(&self) -> Option<Notify> {
        Some(self.inner.signal.clone())
    }
}

/// An RC queue pair of a [`SoftVerbs`] device. Dropping it closes its wire.
pub struct SoftQp {
    inner: Rc<QpInner>,
}

impl Drop for SoftQp {
    fn drop(&mut self) {
        self.inner.wire_stop.set();
    }
}

struct RecvRequest {
    wr_id: u64,
    region: Rc<RegionInner>,
    offset: usize,
    len: usize,
}

struct PostedSend {
    wr_id: u64,
    op: SendOp,
    /// The bytes to send or write, copied at posting (the buffer may be reused afterwards,
    /// which is stricter than a NIC requires).
    data: Vec<u8>,
    /// For reads: where the bytes go.
    read_target: Option<(Rc<RegionInner>, usize, usize)>,
    signaled: bool,
}

struct InFlight {
    psn: u32,
    send: PostedSend,
    /// The encoded packet, kept for retransmission after an RNR NAK.
    packet: Rc<Vec<u8>>,
}

struct QpInner {
    qp_num: u32,
    psn_start: u32,
    caps: QpCaps,
    device: Weak<SoftDevice>,
    device_addr: SocketAddr,
    cq: Rc<CqInner>,
    state: Cell<QpState>,
    remote: Cell<Option<QpEndpoint>>,
    /// Invariant: at most `caps.max_recv_wr` entries.
    recv_queue: RefCell<VecDeque<RecvRequest>>,
    /// Posted, not yet transmitted. Invariant: with `in_flight`, at most `caps.max_send_wr`.
    send_queue: RefCell<VecDeque<PostedSend>>,
    /// Transmitted, not yet acknowledged, in PSN order.
    in_flight: RefCell<VecDeque<InFlight>>,
    next_psn: Cell<u32>,
    /// The responder's next expected PSN.
    expected_psn: Cell<u32>,
    rnr_attempts: Cell<u32>,
    /// While set, no new request is transmitted (an RNR retransmission is pending).
    rnr_waiting: Cell<bool>,
    /// Packets to write to the wire, in order.
    outbound: RefCell<VecDeque<Rc<Vec<u8>>>>,
    wake_writer: Notify,
    wire_attached: Cell<bool>,
    wire_stop: Latch,
}

impl Verbs for SoftVerbs {
    type Region = SoftRegion;
    type Cq = SoftCq;
    type Qp = SoftQp;

    fn device_name(&self) -> String {
        format!("softverbs@{}", self.device.addr)
    }

    fn register(&self, len: usize) -> Result<SoftRegion, VerbsError> {
        if len as u64 >= REGION_ADDRESS_SPAN {
            return Err(VerbsError::Call {
                call: "softverbs register",
                reason: format!("{len} bytes is beyond the 4 GiB region limit"),
            });
        }
        let rkey = self.device.next_key.get();
        self.device.next_key.set(rkey.wrapping_add(1).max(1));
        let inner = Rc::new(RegionInner {
            bytes: RefCell::new(vec![0u8; len].into_boxed_slice()),
            rkey,
            base: u64::from(rkey) * REGION_ADDRESS_SPAN,
        });
        let mut regions = self.device.regions.borrow_mut();
        regions.retain(|_, region| region.strong_count() > 0);
        regions.insert(rkey, Rc::downgrade(&inner));
        Ok(SoftRegion { inner })
    }

    fn create_cq(&self, depth: u32) -> Result<SoftCq, VerbsError> {
        Ok(SoftCq {
            inner: Rc::new(CqInner {
                entries: RefCell::new(VecDeque::with_capacity(depth.min(4096) as usize)),
                depth: depth.max(1),
                overrun: Cell::new(false),
                signal: Notify::new(),
            }),
        })
    }

    fn create_qp(&self, cq: &SoftCq, caps: QpCaps) -> Result<SoftQp, VerbsError> {
        let qp_num = self.device.next_qp_num.get();
        self.device.next_qp_num.set(qp_num.wrapping_add(1).max(1));
        // A deterministic start PSN per QP number: distinct enough to catch mix-ups.
        let psn_start = qp_num.wrapping_mul(0x9E37_79B9) & 0x00FF_FFFF;
        let inner = Rc::new(QpInner {
            qp_num,
            psn_start,
            caps,
            device: Rc::downgrade(&self.device),
            device_addr: self.device.addr,
            cq: Rc::clone(&cq.inner),
            state: Cell::new(QpState::Reset),
            remote: Cell::new(None),
            recv_queue: RefCell::new(VecDeque::new()),
            send_queue: RefCell::new(VecDeque::new()),
            in_flight: RefCell::new(VecDeque::new()),
            next_psn: Cell::new(psn_start),
            expected_psn: Cell::new(0),
            rnr_attempts: Cell::new(0),
            rnr_waiting: Cell::new(false),
            outbound: RefCell::new(VecDeque::new()),
            wake_writer: Notify::new(),
            wire_attached: Cell::new(false),
            wire_stop: Latch::new(),
        });
        let mut queue_pairs = self.device.queue_pairs.borrow_mut();
        queue_pairs.retain(|_, qp| qp.strong_count() > 0);
        queue_pairs.insert(qp_num, Rc::downgrade(&inner));
        Ok(SoftQp { inner })
    }
}

fn gid_of(addr: SocketAddr) -> [u8; 16] {
    match addr.ip() {
        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        IpAddr::V6(ip) => ip.octets(),
    }
}

fn addr_of(endpoint: &QpEndpoint) -> SocketAddr {
    let ip = Ipv6Addr::from(endpoint.gid);
    let ip = ip
        .to_ipv4_mapped()
        .map(IpAddr::V4)
        .unwrap_or(IpAddr::V6(ip));
    SocketAddr::new(ip, endpoint.lid)
}

impl QueuePair for SoftQp {
    type Region = SoftRegion;

    fn endpoint(&self) -> QpEndpoint {
        QpEndpoint {
            qp_num: self.inner.qp_num,
            lid: self.inner.device_addr.port(),
            gid: gid_of(self.inner.device_addr),
            psn: self.inner.psn_start,
        }
    }

    fn state(&self) -> QpState {
        self.inner.state.get()
    }

    fn to_init(&self) -> Result<(), VerbsError> {
        self.inner.transition(QpState::Reset, QpState::Init)
    }

    fn to_ready_to_receive(&self, remote: &QpEndpoint) -> Result<(), VerbsError> {
        self.inner
            .transition(QpState::Init, QpState::ReadyToReceive)?;
        self.inner.remote.set(Some(*remote));
        self.inner.expected_psn.set(remote.psn);
        let local_key = (
            gid_of(self.inner.device_addr),
            self.inner.device_addr.port(),
            self.inner.qp_num,
        );
        let remote_key = (remote.gid, remote.lid, remote.qp_num);
        if local_key < remote_key {
            glommio::spawn_local(dial_wire(
                Rc::clone(&self.inner),
                addr_of(remote),
                remote.qp_num,
            ))
            .detach();
        } else if let Some(device) = self.inner.device.upgrade() {
            let parked = device.parked_wires.borrow_mut().remove(&self.inner.qp_num);
            match parked {
                Some((source, stream)) if source == remote.qp_num => self.inner.attach_wire(stream),
                Some(other) => {
                    device
                        .parked_wires
                        .borrow_mut()
                        .insert(self.inner.qp_num, other);
                }
                None => {}
            }
        }
        Ok(())
    }

    fn to_ready_to_send(&self) -> Result<(), VerbsError> {
        self.inner
            .transition(QpState::ReadyToReceive, QpState::ReadyToSend)?;
        self.inner.wake_writer.notify();
        Ok(())
    }

    fn to_error(&self) {
        self.inner.fail(None);
    }

    fn post_recv(
        &self,
        wr_id: u64,
        region: &SoftRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        let inner = &self.inner;
        match inner.state.get() {
            QpState::Reset => {
                return Err(VerbsError::Call {
                    call: "post_recv",
                    reason: "queue pair in Reset".into(),
                })
            }
            QpState::Error => {
                inner.cq.push(flushed(wr_id, WcOpcode::Recv));
                return Ok(());
            }
            _ => {}
        }
        region.inner.check(offset, len)?;
        let mut recv_queue = inner.recv_queue.borrow_mut();
        if recv_queue.len() >= inner.caps.max_recv_wr as usize {
            return Err(VerbsError::QueueFull {
                queue: "receive",
                depth: inner.caps.max_recv_wr,
            });
        }
        recv_queue.push_back(RecvRequest {
            wr_id,
            region: Rc::clone(&region.inner),
            offset,
            len,
        });
        Ok(())
    }

    fn post_send(&self, request: SendRequest<'_, SoftRegion>) -> Result<(), VerbsError> {
        let inner = &self.inner;
        match inner.state.get() {
            QpState::ReadyToSend => {}
            QpState::Error => {
                inner
                    .cq
                    .push(flushed(request.wr_id, send_opcode(request.op)));
                return Ok(());
            }
            other => {
                return Err(VerbsError::Call {
                    call: "post_send",
                    reason: format!("queue pair in {other:?}, not ReadyToSend"),
                })
            }
        }
        let outstanding = inner.send_queue.borrow().len() + inner.in_flight.borrow().len();
        if outstanding >= inner.caps.max_send_wr as usize {
            return Err(VerbsError::QueueFull {
                queue: "send",
                depth: inner.caps.max_send_wr,
            });
        }
        if request
            .region
            .inner
            .check(request.offset, request.len)
            .is_err()
        {
            inner.cq.push(WorkCompletion {
                wr_id: request.wr_id,
                status: WcStatus::LocalProtectionError,
                opcode: send_opcode(request.op),
                byte_len: 0,
                imm_data: None,
            });
            inner.fail(None);
            return Ok(());
        }
        let (data, read_target) = match request.op {
            SendOp::Read(_) => (
                Vec::new(),
                Some((
                    Rc::clone(&request.region.inner),
                    request.offset,
                    request.len,
                )),
            ),
            _ => (request.region.inner.read(request.offset, request.len), None),
        };
        inner.send_queue.borrow_mut().push_back(PostedSend {
            wr_id: request.wr_id,
            op: request.op,
            data,
            read_target,
            signaled: request.signaled,
        });
        inner.wake_writer.notify();
        Ok(())
    }
}

fn send_opcode(op: SendOp) -> WcOpcode {
    match op {
        SendOp::Send | SendOp::SendWithImm(_) => WcOpcode::Send,
        SendOp::Write(_) | SendOp::WriteWithImm(..) => WcOpcode::RdmaWrite,
        SendOp::Read(_) => WcOpcode::RdmaRead,
    }
}

fn flushed(wr_id: u64, opcode: WcOpcode) -> WorkCompletion {
    WorkCompletion {
        wr_id,
        status: WcStatus::WrFlushError,
        opcode,
        byte_len: 0,
        imm_data: None,
    }
}

async fn dial_wire(qp: Rc<QpInner>, addr: SocketAddr, remote_qp_num: u32) {
    let connected = TcpStream::connect_timeout(addr, Duration::from_secs(5)).await;
    let mut stream = match connected {
        Ok(stream) => stream,
        Err(error) => {
            debug!(qp = qp.qp_num, %addr, %error, "softverbs: cannot reach the remote queue pair");
            qp.fail(Some(WcStatus::RetryExceededError));
            return;
        }
    };
    let mut hello = [0u8; 8];
    hello[0..4].copy_from_slice(&remote_qp_num.to_le_bytes());
    hello[4..8].copy_from_slice(&qp.qp_num.to_le_bytes());
    if stream.write_all(&hello).await.is_err() {
        qp.fail(Some(WcStatus::RetryExceededError));
        return;
    }
    qp.attach_wire(stream);
}

impl QpInner {
    fn transition(&self, from: QpState, to: QpState) -> Result<(), VerbsError> {
        let state = self.state.get();
        if state != from {
            return Err(VerbsError::BadTransition {
                qp_num: self.qp_num,
                from: state,
                to,
            });
        }
        self.state.set(to);
        Ok(())
    }

    fn expects_wire_from(&self, source: u32) -> bool {
        !self.wire_attached.get()
            && matches!(
                self.state.get(),
                QpState::ReadyToReceive | QpState::ReadyToSend
            )
            && self.remote.get().map(|r| r.qp_num) == Some(source)
    }

    fn attach_wire(self: &Rc<Self>, stream: TcpStream) {
        if self.wire_attached.replace(true) || self.wire_stop.is_set() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let stream = SharedStream::new(stream.buffered());
        glommio::spawn_local(read_wire(Rc::clone(self), stream.clone())).detach();
        glommio::spawn_local(write_wire(Rc::clone(self), stream)).detach();
    }

    /// Moves the queue pair to Error. `first` is the status of the oldest outstanding send
    /// (the one that failed); everything else is flushed.
    fn fail(&self, first: Option<WcStatus>) {
        if self.state.get() == QpState::Error {
            return;
        }
        self.state.set(QpState::Error);
        let mut first = first;
        let in_flight: Vec<PostedSend> = self
            .in_flight
            .borrow_mut()
            .drain(..)
            .map(|f| f.send)
            .collect();
        let queued: Vec<PostedSend> = self.send_queue.borrow_mut().drain(..).collect();
        for send in in_flight.into_iter().chain(queued) {
            let status = first.take().unwrap_or(WcStatus::WrFlushError);
            self.cq.push(WorkCompletion {
                wr_id: send.wr_id,
                status,
                opcode: send_opcode(send.op),
                byte_len: 0,
                imm_data: None,
            });
        }
        let receives: Vec<RecvRequest> = self.recv_queue.borrow_mut().drain(..).collect();
        for receive in receives {
            self.cq.push(flushed(receive.wr_id, WcOpcode::Recv));
        }
        // The wire ends with the queue pair: the peer sees its requests fail too.
        self.wire_stop.set();
        self.wake_writer.notify();
    }

    fn queue_packet(&self, packet: Rc<Vec<u8>>) {
        self.outbound.borrow_mut().push_back(packet);
        self.wake_writer.notify();
    }

    /// Transmits posted sends, unless an RNR retransmission is pending.
    fn admit_sends(&self) {
        if self.state.get() != QpState::ReadyToSend || self.rnr_waiting.get() {
            return;
        }
        loop {
            let Some(send) = self.send_queue.borrow_mut().pop_front() else {
                return;
            };
            let psn = self.next_psn.get();
            self.next_psn.set(psn.wrapping_add(1));
            let packet = Rc::new(encode_request(psn, &send));
            self.outbound.borrow_mut().push_back(Rc::clone(&packet));
            self.in_flight
                .borrow_mut()
                .push_back(InFlight { psn, send, packet });
        }
    }

    fn respond(&self, kind: u8, psn: u32, body: &[u8]) {
        let mut packet = Vec::with_capacity(9 + body.len());
        packet.extend_from_slice(&((5 + body.len()) as u32).to_le_bytes());
        packet.push(kind);
        packet.extend_from_slice(&psn.to_le_bytes());
        packet.extend_from_slice(body);
        self.queue_packet(Rc::new(packet));
    }

    fn device_region(&self, rkey: u32) -> Option<Rc<RegionInner>> {
        self.device
            .upgrade()?
            .regions
            .borrow()
            .get(&rkey)
            .and_then(Weak::upgrade)
    }

    /// Handles a request packet as the responder. Returns false on a malformed packet.
    fn on_request(&self, kind: u8, psn: u32, body: &[u8]) -> bool {
        if !matches!(
            self.state.get(),
            QpState::ReadyToReceive | QpState::ReadyToSend
        ) {
            return true;
        }
        if psn != self.expected_psn.get() {
            // Go-back-N: a packet after one refused with RNR; it comes again.
            return true;
        }
        match kind {
            PACKET_SEND => {
                let Some((imm, data)) = parse_imm(body) else {
                    return false;
                };
                let Some(receive) = self.recv_queue.borrow_mut().pop_front() else {
                    self.respond(PACKET_NAK, psn, &[NAK_RNR]);
                    return true;
                };
                if data.len() > receive.len {
                    self.cq.push(WorkCompletion {
                        wr_id: receive.wr_id,
                        status: WcStatus::LocalLengthError,
                        opcode: WcOpcode::Recv,
                        byte_len: 0,
                        imm_data: None,
                    });
                    self.respond(PACKET_NAK, psn, &[NAK_INVALID_REQUEST]);
                    self.fail(None);
                    return true;
                }
                receive.region.write(receive.offset, data);
                self.cq.push(WorkCompletion {
                    wr_id: receive.wr_id,
                    status: WcStatus::Success,
                    opcode: WcOpcode::Recv,
                    byte_len: data.len() as u32,
                    imm_data: imm,
                });
            }
            PACKET_WRITE => {
                let Some((remote, rest)) = parse_remote(body) else {
                    return false;
                };
                let Some((imm, data)) = parse_imm(rest) else {
                    return false;
                };
                let target = self
                    .device_region(remote.rkey)
                    .and_then(|r| r.offset_of(remote.addr, data.len()).map(|o| (r, o)));
                let Some((region, offset)) = target else {
                    self.respond(PACKET_NAK, psn, &[NAK_REMOTE_ACCESS]);
                    return true;
                };
                if let Some(imm) = imm {
                    let Some(receive) = self.recv_queue.borrow_mut().pop_front() else {
                        self.respond(PACKET_NAK, psn, &[NAK_RNR]);
                        return true;
                    };
                    region.write(offset, data);
                    self.cq.push(WorkCompletion {
                        wr_id: receive.wr_id,
                        status: WcStatus::Success,
                        opcode: WcOpcode::RecvRdmaWithImm,
                        byte_len: data.len() as u32,
                        imm_data: Some(imm),
                    });
                } else {
                    region.write(offset, data);
                }
            }
            PACKET_READ_REQUEST => {
                let Some((remote, rest)) = parse_remote(body) else {
                    return false;
                };
                let Some(len) = rest
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                else {
                    return false;
                };
                let target = self
                    .device_region(remote.rkey)
                    .and_then(|r| r.offset_of(remote.addr, len as usize).map(|o| (r, o)));
                let Some((region, offset)) = target else {
                    self.respond(PACKET_NAK, psn, &[NAK_REMOTE_ACCESS]);
                    return true;
                };
                let data = region.read(offset, len as usize);
                self.expected_psn.set(psn.wrapping_add(1));
                self.respond(PACKET_READ_RESPONSE, psn, &data);
                return true;
            }
            _ => return false,
        }
        self.expected_psn.set(psn.wrapping_add(1));
        self.respond(PACKET_ACK, psn, &[]);
        true
    }

    /// Handles an acknowledgement as the requester. Returns false on a protocol violation.
    fn on_response(self: &Rc<Self>, kind: u8, psn: u32, body: &[u8]) -> bool {
        if self.state.get() == QpState::Error {
            return true;
        }
        let front_psn = self.in_flight.borrow().front().map(|f| f.psn);
        if front_psn != Some(psn) {
            return false;
        }
        match kind {
            PACKET_ACK | PACKET_READ_RESPONSE => {
                let Some(done) = self.in_flight.borrow_mut().pop_front() else {
                    return false;
                };
                self.rnr_attempts.set(0);
                let mut byte_len = done.send.data.len() as u32;
                if let Some((region, offset, len)) = &done.send.read_target {
                    if kind != PACKET_READ_RESPONSE || body.len() != *len {
                        return false;
                    }
                    region.write(*offset, body);
                    byte_len = body.len() as u32;
                }
                if done.send.signaled {
                    self.cq.push(WorkCompletion {
                        wr_id: done.send.wr_id,
                        status: WcStatus::Success,
                        opcode: send_opcode(done.send.op),
                        byte_len,
                        imm_data: None,
                    });
                }
                self.wake_writer.notify();
            }
            PACKET_NAK => match body.first().copied() {
                Some(NAK_RNR) => {
                    let attempts = self.rnr_attempts.get() + 1;
                    self.rnr_attempts.set(attempts);
                    if self.caps.rnr_retry != 7 && attempts > u32::from(self.caps.rnr_retry) {
                        self.fail(Some(WcStatus::RnrRetryExceededError));
                        return true;
                    }
                    self.rnr_waiting.set(true);
                    let qp = Rc::clone(self);
                    glommio::spawn_local(async move {
                        glommio::timer::sleep(RNR_DELAY).await;
                        qp.rnr_waiting.set(false);
                        if qp.state.get() == QpState::Error {
                            return;
                        }
                        let packets: Vec<_> = qp
                            .in_flight
                            .borrow()
                            .iter()
                            .map(|f| Rc::clone(&f.packet))
                            .collect();
                        for packet in packets {
                            qp.outbound.borrow_mut().push_back(packet);
                        }
                        qp.wake_writer.notify();
                    })
                    .detach();
                }
                Some(NAK_REMOTE_ACCESS) => self.fail(Some(WcStatus::RemoteAccessError)),
                Some(NAK_INVALID_REQUEST) => self.fail(Some(WcStatus::RemoteInvalidRequestError)),
                _ => return false,
            },
            _ => return false,
        }
        true
    }

    /// The wire broke: what was outstanding can never be acknowledged.
    fn wire_lost(&self) {
        if self.state.get() != QpState::Error {
            debug!(
                qp = self.qp_num,
                "softverbs: wire to the remote queue pair lost"
            );
            self.fail(Some(WcStatus::RetryExceededError));
        }
    }
}

fn parse_imm(body: &[u8]) -> Option<(Option<u32>, &[u8])> {
    let has_imm = *body.first()?;
    let imm = u32::from_le_bytes(body.get(1..5)?.try_into().ok()?);
    let data = body.get(5..)?;
    Some(((has_imm == 1).then_some(imm), data))
}

fn parse_remote(body: &[u8]) -> Option<(RemoteAddress, &[u8])> {
    let addr = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let rkey = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    Some((RemoteAddress { addr, rkey }, body.get(12..)?))
}

fn encode_request(psn: u32, send: &PostedSend) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + send.data.len());
    let kind;
    let put_imm = |body: &mut Vec<u8>, imm: Option<u32>| {
        body.push(u8::from(imm.is_some()));
        body.extend_from_slice(&imm.unwrap_or(0).to_le_bytes());
    };
    let put_remote = |body: &mut Vec<u8>, remote: RemoteAddress| {
        body.extend_from_slice(&remote.addr.to_le_bytes());
        body.extend_from_slice(&remote.rkey.to_le_bytes());
    };
    match send.op {
        SendOp::Send => {
            kind = PACKET_SEND;
            put_imm(&mut body, None);
            body.extend_from_slice(&send.data);
        }
        SendOp::SendWithImm(imm) => {
            kind = PACKET_SEND;
            put_imm(&mut body, Some(imm));
            body.extend_from_slice(&send.data);
        }
        SendOp::Write(remote) => {
            kind = PACKET_WRITE;
            put_remote(&mut body, remote);
            put_imm(&mut body, None);
            body.extend_from_slice(&send.data);
        }
        SendOp::WriteWithImm(remote, imm) => {
            kind = PACKET_WRITE;
            put_remote(&mut body, remote);
            put_imm(&mut body, Some(imm));
            body.extend_from_slice(&send.data);
        }
        SendOp::Read(remote) => {
            kind = PACKET_READ_REQUEST;
            put_remote(&mut body, remote);
            let len = send.read_target.as_ref().map(|t| t.2).unwrap_or(0) as u32;
            body.extend_from_slice(&len.to_le_bytes());
        }
    }
    let mut packet = Vec::with_capacity(9 + body.len());
    packet.extend_from_slice(&((5 + body.len()) as u32).to_le_bytes());
    packet.push(kind);
    packet.extend_from_slice(&psn.to_le_bytes());
    packet.extend_from_slice(&body);
    packet
}

async fn read_wire(qp: Rc<QpInner>, mut stream: SharedStream) {
    let stop = qp.wire_stop.clone();
    let read = async {
        let mut length = [0u8; 4];
        loop {
            if stream.read_exact(&mut length).await.is_err() {
                return;
            }
            let body_len = u32::from_le_bytes(length) as usize;
            if !(5..=PACKET_BODY_MAX).contains(&body_len) {
                debug!(
                    qp = qp.qp_num,
                    body_len, "softverbs: malformed packet length"
                );
                return;
            }
            let mut body = vec![0u8; body_len];
            if stream.read_exact(&mut body).await.is_err() {
                return;
            }
            let kind = body[0];
            let psn = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
            let rest = &body[5..];
            let understood = match kind {
                PACKET_SEND | PACKET_WRITE | PACKET_READ_REQUEST => qp.on_request(kind, psn, rest),
                _ => qp.on_response(kind, psn, rest),
            };
            if !understood {
                debug!(
                    qp = qp.qp_num,
                    kind, psn, "softverbs: protocol violation from the peer"
                );
                return;
            }
            glommio::yield_if_needed().await;
        }
    };
    future::or(read, stop.wait()).await;
    qp.wire_lost();
    qp.wire_stop.set();
    qp.wake_writer.notify();
}

async fn write_wire(qp: Rc<QpInner>, mut stream: SharedStream) {
    let stop = qp.wire_stop.clone();
    let mut batch = Vec::new();
    loop {
        qp.admit_sends();
        batch.clear();
        {
            let mut outbound = qp.outbound.borrow_mut();
            while let Some(packet) = outbound.pop_front() {
                batch.extend_from_slice(&packet);
                if batch.len() >= 1 << 20 {
                    break;
                }
            }
        }
        if batch.is_empty() {
            if stop.is_set() {
                break;
            }
            future::or(qp.wake_writer.notified(), stop.wait()).await;
            continue;
        }
        // Not raced with `stop`: a NAK queued just before the queue pair failed must still
        // reach the peer. The peer's reader never blocks, so only a dead peer stalls this.
        let written = future::or(async { stream.write_all(&batch).await.is_ok() }, async {
            glommio::timer::sleep(WIRE_WRITE_TIMEOUT).await;
            false
        })
        .await;
        if !written {
            break;
        }
    }
    let _ = stream.close().await;
    qp.wire_lost();
    stop.set();
}
