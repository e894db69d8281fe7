//! The message API every transport offers: a [`Connection`] sends requests and awaits their
//! responses (many in flight, matched by request id), sends one-way messages, and yields what
//! the peer sends as [`Incoming`] requests to serve. TCP and the RDMA transport each drive a
//! connection's two queues from their own tasks (the *link*); callers never see which.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::future;
use tracing::{debug, warn};

use super::queue::{oneshot, BoundedQueue, OneshotSender, TryPushError};
use super::NetError;
use crate::config::defaults;
use crate::protocol::frame::{Frame, FrameCodec, FrameFlags, Opcode, DEFAULT_MAX_PAYLOAD};

/// Bounds and timeouts of one connection, taken from the configuration at start-up.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Frames queued for sending before `call`/`send` wait (back-pressure on a slow peer).
    pub send_queue_frames: usize,
    /// Received requests queued for the server before the link stops reading.
    pub incoming_queue_frames: usize,
    /// Payload bytes queued for sending, and received payload bytes queued for the server,
    /// before the same happens (a frame larger than this still passes alone): what bounds a
    /// connection's memory when its peer sends faster than it reads.
    pub queue_bytes: usize,
    /// Requests awaiting a response at once on this connection.
    pub max_in_flight_requests: usize,
    /// How long `call` waits for its response (queueing included).
    pub request_timeout: Duration,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// How long one write (or the rest of a frame, once its header arrived) may take before
    /// the connection is declared dead.
    pub io_timeout: Duration,
    /// The largest payload accepted.
    pub max_payload: u32,
    /// TCP: the most bytes gathered into one send.
    pub coalesce_bytes_max: usize,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            send_queue_frames: 256,
            incoming_queue_frames: 256,
            queue_bytes: 32 << 20,
            max_in_flight_requests: 1024,
            request_timeout: Duration::from_millis(defaults::REQUEST_TIMEOUT_MS),
            connect_timeout: Duration::from_millis(defaults::CONNECT_TIMEOUT_MS),
            io_timeout: Duration::from_millis(defaults::IO_TIMEOUT_MS),
            max_payload: DEFAULT_MAX_PAYLOAD,
            coalesce_bytes_max: 256 * 1024,
        }
    }
}

impl ConnectionConfig {
    /// The frame codec for this configuration.
    pub fn codec(&self) -> FrameCodec {
        FrameCodec::new(self.max_payload)
    }
}

/// A message as the services see it: the frame without its wire bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// What is asked or answered.
    pub opcode: Opcode,
    /// The copyset concerned (0 for none).
    pub copyset: u64,
    /// The body.
    pub payload: Bytes,
}

impl Message {
    /// A message.
    pub fn new(opcode: Opcode, copyset: u64, payload: Bytes) -> Message {
        Message {
            opcode,
            copyset,
            payload,
        }
    }

    fn from_frame(frame: Frame) -> Message {
        Message {
            opcode: frame.header.opcode,
            copyset: frame.header.copyset,
            payload: frame.payload,
        }
    }
}

struct ConnectionState {
    label: String,
    config: ConnectionConfig,
    /// Frames for the link to send. Closed when the connection closes.
    outgoing: BoundedQueue<Frame>,
    /// Requests and one-way frames from the peer, for the server.
    incoming: BoundedQueue<Frame>,
    /// Requests awaiting their response. Invariant: at most `max_in_flight_requests` entries.
    pending: RefCell<HashMap<u64, OneshotSender<Result<Frame, NetError>>>>,
    /// Invariant: never 0 (0 marks one-way frames); ids are not reused on a connection.
    next_request_id: Cell<u64>,
    /// Slots for requests in flight: a request takes one before it is queued.
    in_flight_slots: BoundedQueue<()>,
    /// Why the connection can no longer carry requests; `None` while it can.
    closed: RefCell<Option<NetError>>,
    /// The role the other end proved, on an accepted connection of an authenticating listener.
    peer_role: Cell<Option<super::auth::Role>>,
    /// Live [`LinkSide`]s: the transport's tasks hold them with the socket.
    link_sides: Cell<usize>,
    /// Set once the last [`LinkSide`] is gone: the transport's tasks ended and dropped the
    /// socket (or queue pair) with them.
    link_ended: super::queue::Latch,
    /// Set by [`Connection::abort`]: the transport stops at once, queued frames unsent.
    aborted: super::queue::Latch,
}

/// One connection to a peer, over whatever transport. Clones share it; the connection closes
/// when the last clone (and the last [`Incoming`] from it) is dropped, or on [`close`].
///
/// [`close`]: Connection::close
#[derive(Clone)]
pub struct Connection {
    handle: Rc<ConnectionHandle>,
}

/// Closes the connection when the last user-side reference goes.
struct ConnectionHandle {
    state: Rc<ConnectionState>,
}

impl Drop for ConnectionHandle {
    fn drop(&mut self) {
        self.state.close_gracefully("dropped by its owner");
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("label", &self.handle.state.label)
            .finish()
    }
}

/// Closes `connections` and waits, at most `bound`, until every one's socket is gone
/// ([`Connection::link_ended`]); those still open then (their peers do not read what was
/// queued) are aborted. Returns whether they all ended gracefully.
pub async fn close_all(connections: &[Connection], bound: Duration) -> bool {
    for connection in connections {
        connection.close();
    }
    let all_ended = || async {
        for connection in connections {
            connection.link_ended().await;
        }
        true
    };
    let within = |bound: Duration| async move {
        glommio::timer::sleep(bound).await;
        false
    };
    if future::or(all_ended(), within(bound)).await {
        return true;
    }
    for connection in connections {
        connection.abort();
    }
    if !future::or(all_ended(), within(bound)).await {
        warn!(
            open = connections
                .iter()
                .filter(|c| !c.handle.state.link_ended.is_set())
                .count(),
            "connections still open after being aborted"
        );
    }
    false
}

/// The transport's side of a connection: it sends what [`LinkSide::outgoing`] yields and
/// hands every received frame to [`LinkSide::deliver`]. The transport's tasks hold it with
/// the socket; when the last one goes, [`Connection::link_ended`] resolves.
pub(crate) struct LinkSide {
    state: Rc<ConnectionState>,
}

impl Clone for LinkSide {
    fn clone(&self) -> Self {
        self.state.link_sides.set(self.state.link_sides.get() + 1);
        LinkSide {
            state: Rc::clone(&self.state),
        }
    }
}

impl Drop for LinkSide {
    fn drop(&mut self) {
        let left = self.state.link_sides.get().saturating_sub(1);
        self.state.link_sides.set(left);
        if left == 0 {
            self.state.link_ended.set();
        }
    }
}

/// A new connection and the link side its transport drives.
pub(crate) fn new_connection(label: String, config: ConnectionConfig) -> (Connection, LinkSide) {
    let slots = BoundedQueue::new(config.max_in_flight_requests.max(1));
    for _ in 0..config.max_in_flight_requests.max(1) {
        // The queue was sized for exactly this many tokens.
        let _ = slots.try_push(());
    }
    let state = Rc::new(ConnectionState {
        label,
        outgoing: BoundedQueue::weighted(
            config.send_queue_frames.max(1),
            config.queue_bytes,
            frame_bytes,
        ),
        incoming: BoundedQueue::weighted(
            config.incoming_queue_frames.max(1),
            config.queue_bytes,
            frame_bytes,
        ),
        pending: RefCell::new(HashMap::new()),
        next_request_id: Cell::new(1),
        in_flight_slots: slots,
        closed: RefCell::new(None),
        peer_role: Cell::new(None),
        link_sides: Cell::new(1),
        link_ended: super::queue::Latch::new(),
        aborted: super::queue::Latch::new(),
        config,
    });
    (
        Connection {
            handle: Rc::new(ConnectionHandle {
                state: Rc::clone(&state),
            }),
        },
        LinkSide { state },
    )
}

/// Returns an in-flight slot when the request it was taken for ends, however it ends.
struct InFlightSlot<'a>(&'a BoundedQueue<()>);

impl Drop for InFlightSlot<'_> {
    fn drop(&mut self) {
        let _ = self.0.try_push(());
    }
}

/// Removes a pending entry when its request ends early (timeout, or the caller gave up).
struct PendingEntry<'a> {
    state: &'a ConnectionState,
    request_id: u64,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        self.state.pending.borrow_mut().remove(&self.request_id);
    }
}

impl Connection {
    /// The role the other end proved when this side accepted it (`net::auth`); `None` when
    /// the listener does not authenticate (every request is then allowed) or on connections
    /// this side opened.
    pub fn peer_role(&self) -> Option<super::auth::Role> {
        self.handle.state.peer_role.get()
    }

    pub(crate) fn set_peer_role(&self, role: Option<super::auth::Role>) {
        self.handle.state.peer_role.set(role);
    }

    /// A short description: transport and addresses.
    pub fn label(&self) -> &str {
        &self.handle.state.label
    }

    /// Why the connection is closed, or `None` while it is open.
    pub fn closed_reason(&self) -> Option<NetError> {
        self.handle.state.closed.borrow().clone()
    }

    /// Whether the connection can no longer carry requests.
    pub fn is_closed(&self) -> bool {
        self.handle.state.closed.borrow().is_some()
    }

    /// Closes the connection: frames already queued are still sent, requests in flight fail.
    pub fn close(&self) {
        self.handle.state.close_gracefully("closed by its owner");
    }

    /// Closes the connection at once: frames still queued are dropped and the transport lets
    /// go of the socket without waiting for the peer to read (a graceful close can wait on a
    /// peer that does not read for as long as the I/O timeout).
    pub fn abort(&self) {
        self.handle.state.close_gracefully("aborted by its owner");
        self.handle.state.aborted.set();
    }

    /// Resolves once the transport's tasks ended and let go of the socket (or queue pair):
    /// after [`close`](Connection::close), the peer then sees the connection end. A server
    /// that stops waits for this, so that nothing it accepted outlives it.
    pub async fn link_ended(&self) {
        self.handle.state.link_ended.wait().await;
    }

    /// Sends a request and waits for its response, at most the configured request timeout.
    /// An error response from the peer is [`NetError::Remote`].
    pub async fn call(&self, request: Message) -> Result<Message, NetError> {
        let state = &self.handle.state;
        let timeout = state.config.request_timeout;
        let opcode = request.opcode;
        let deadline = async {
            glommio::timer::sleep(timeout).await;
            Err(NetError::Timeout {
                what: format!("request {opcode:?} on {}", state.label),
                after: timeout,
            })
        };
        future::or(state.call(request), deadline).await
    }

    /// Sends a message that expects no response. Returns once it is queued for sending.
    pub async fn send(&self, message: Message) -> Result<(), NetError> {
        let state = &self.handle.state;
        state.check_open()?;
        let frame = state.frame(
            message.opcode,
            FrameFlags::ONE_WAY,
            0,
            message.copyset,
            message.payload,
        )?;
        self.handle.state.enqueue(frame).await
    }

    /// The next request or one-way message from the peer; `None` once the peer can send no
    /// more (it closed, or the connection failed).
    pub async fn next_incoming(&self) -> Option<Incoming> {
        let frame = self.handle.state.incoming.pop().await?;
        let request_id =
            (!frame.header.flags.contains(FrameFlags::ONE_WAY)).then_some(frame.header.request_id);
        Some(Incoming {
            message: Message::from_frame(frame),
            request_id,
            connection: self.clone(),
        })
    }

    /// Requests sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.handle.state.pending.borrow().len()
    }
}

/// A request or one-way message received from the peer.
pub struct Incoming {
    /// What the peer sent.
    pub message: Message,
    /// `Some` when the peer awaits a response.
    request_id: Option<u64>,
    connection: Connection,
}

impl Incoming {
    /// Whether the peer awaits a response.
    pub fn expects_response(&self) -> bool {
        self.request_id.is_some()
    }

    /// The connection it came on.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Answers the request. Answering a one-way message is an error.
    pub async fn respond(self, response: Message) -> Result<(), NetError> {
        self.respond_with(FrameFlags::RESPONSE, response).await
    }

    /// Answers the request with an error the caller sees as [`NetError::Remote`].
    pub async fn respond_error(self, opcode: Opcode, reason: &str) -> Result<(), NetError> {
        let message = Message::new(opcode, 0, Bytes::copy_from_slice(reason.as_bytes()));
        self.respond_with(FrameFlags::RESPONSE.with(FrameFlags::ERROR), message)
            .await
    }

    async fn respond_with(self, flags: FrameFlags, response: Message) -> Result<(), NetError> {
        let Some(request_id) = self.request_id else {
            return Err(NetError::Protocol {
                reason: "a one-way message cannot be answered".into(),
            });
        };
        let frame = self.connection.handle.state.frame(
            response.opcode,
            flags,
            request_id,
            response.copyset,
            response.payload,
        )?;
        self.connection.handle.state.enqueue(frame).await
    }
}

impl ConnectionState {
    async fn call(&self, request: Message) -> Result<Message, NetError> {
        self.check_open()?;
        if request.payload.len() > self.config.max_payload as usize {
            return Err(NetError::PayloadTooLarge {
                len: request.payload.len(),
                max: self.config.max_payload,
            });
        }
        self.in_flight_slots
            .pop()
            .await
            .ok_or_else(|| self.closed_error())?;
        let _slot = InFlightSlot(&self.in_flight_slots);
        self.check_open()?;
        let request_id = self.next_request_id.get();
        self.next_request_id.set(request_id.wrapping_add(1).max(1));
        let (sender, receiver) = oneshot();
        self.pending.borrow_mut().insert(request_id, sender);
        let _entry = PendingEntry {
            state: self,
            request_id,
        };
        let frame = self.frame(
            request.opcode,
            FrameFlags::default(),
            request_id,
            request.copyset,
            request.payload,
        )?;
        self.enqueue(frame).await?;
        let response = receiver.await.ok_or_else(|| self.closed_error())??;
        if response.header.flags.contains(FrameFlags::ERROR) {
            return Err(NetError::Remote {
                reason: String::from_utf8_lossy(&response.payload).into_owned(),
            });
        }
        Ok(Message::from_frame(response))
    }

    /// A frame, once its payload is known to be within the bound (so `Frame::new` cannot
    /// fail on its length).
    fn frame(
        &self,
        opcode: Opcode,
        flags: FrameFlags,
        request_id: u64,
        copyset: u64,
        payload: Bytes,
    ) -> Result<Frame, NetError> {
        if payload.len() > self.config.max_payload as usize {
            return Err(NetError::PayloadTooLarge {
                len: payload.len(),
                max: self.config.max_payload,
            });
        }
        Ok(Frame::new(opcode, flags, request_id, copyset, payload))
    }

    /// Queues a frame for the link. Only a closed send queue refuses it: after the peer
    /// finished sending, responses still go out.
    async fn enqueue(&self, frame: Frame) -> Result<(), NetError> {
        if frame.payload.len() > self.config.max_payload as usize {
            return Err(NetError::PayloadTooLarge {
                len: frame.payload.len(),
                max: self.config.max_payload,
            });
        }
        self.outgoing
            .push(frame)
            .await
            .map_err(|_| self.closed_error())
    }

    fn check_open(&self) -> Result<(), NetError> {
        match &*self.closed.borrow() {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    fn closed_error(&self) -> NetError {
        self.closed
            .borrow()
            .clone()
            .unwrap_or_else(|| NetError::Closed {
                reason: format!("{} closed", self.label),
            })
    }

    /// Marks the connection closed for new requests, fails those in flight, and lets the link
    /// send what is already queued.
    fn close_gracefully(&self, why: &str) {
        self.mark_closed(NetError::Closed {
            reason: format!("{}: {why}", self.label),
        });
        self.outgoing.close();
        self.incoming.close();
    }

    fn mark_closed(&self, reason: NetError) {
        {
            let mut closed = self.closed.borrow_mut();
            if closed.is_some() {
                return;
            }
            *closed = Some(reason.clone());
        }
        self.in_flight_slots.close();
        let pending: Vec<_> = self.pending.borrow_mut().drain().collect();
        for (_, sender) in pending {
            sender.send(Err(reason.clone()));
        }
    }
}

impl LinkSide {
    /// Whether the owner aborted the connection ([`Connection::abort`]).
    pub(crate) fn is_aborted(&self) -> bool {
        self.state.aborted.is_set()
    }

    /// Resolves once the owner aborts the connection.
    pub(crate) async fn aborted(&self) {
        self.state.aborted.wait().await;
    }

    pub(crate) fn label(&self) -> &str {
        &self.state.label
    }

    pub(crate) fn config(&self) -> &ConnectionConfig {
        &self.state.config
    }

    /// The frames to send, in order. `pop` yields `None` once the connection closed and every
    /// queued frame was taken.
    pub(crate) fn outgoing(&self) -> &BoundedQueue<Frame> {
        &self.state.outgoing
    }

    /// Routes a received frame: a response completes its request; anything else waits for
    /// the server, and this waits while the server's queue is full (back-pressure).
    pub(crate) async fn deliver(&self, frame: Frame) -> Result<(), NetError> {
        if frame.header.flags.contains(FrameFlags::RESPONSE) {
            let sender = self
                .state
                .pending
                .borrow_mut()
                .remove(&frame.header.request_id);
            match sender {
                Some(sender) => sender.send(Ok(frame)),
                None => debug!(
                    connection = %self.state.label,
                    request_id = frame.header.request_id,
                    "response to a request no longer awaited (timed out or cancelled)"
                ),
            }
            return Ok(());
        }
        self.state
            .incoming
            .push(frame)
            .await
            .map_err(|_| self.state.closed_error())
    }

    /// [`LinkSide::deliver`] without waiting: a frame for the server that finds its queue full
    /// comes back (`Err`), for the link to hold and retry once [`LinkSide::wait_room`] returns.
    /// A frame for a closed connection is dropped (`Ok`).
    pub(crate) fn try_deliver(&self, frame: Frame) -> Result<(), Frame> {
        if frame.header.flags.contains(FrameFlags::RESPONSE) {
            let sender = self
                .state
                .pending
                .borrow_mut()
                .remove(&frame.header.request_id);
            if let Some(sender) = sender {
                sender.send(Ok(frame));
            }
            return Ok(());
        }
        match self.state.incoming.try_push(frame) {
            Ok(()) | Err(TryPushError::Closed(_)) => Ok(()),
            Err(TryPushError::Full(frame)) => Err(frame),
        }
    }

    /// Waits until the server's queue has room (or is closed).
    pub(crate) async fn wait_room(&self) {
        self.state.incoming.wait_room().await
    }

    /// The peer closed its sending side cleanly: nothing more will be received, so requests
    /// in flight fail and the server sees the end of its requests; responses to requests
    /// already received can still be sent.
    pub(crate) fn peer_finished(&self) {
        debug!(connection = %self.state.label, "peer closed its sending side");
        self.state.mark_closed(NetError::Closed {
            reason: format!("{}: the peer closed the connection", self.state.label),
        });
        self.state.incoming.close();
    }

    /// The link failed: everything ends now, and the reason is logged once.
    pub(crate) fn fail(&self, reason: NetError) {
        if self.state.closed.borrow().is_none() {
            warn!(connection = %self.state.label, %reason, "closing connection");
        }
        self.state.mark_closed(reason);
        self.state.outgoing.close();
        self.state.outgoing.clear();
        self.state.incoming.close();
    }
}

/// A frame's weight in a connection's queues: its payload's bytes.
fn frame_bytes(frame: &Frame) -> usize {
    frame.payload.len()
}
