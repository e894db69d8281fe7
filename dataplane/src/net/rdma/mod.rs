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
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use glommio::channels::local_channel::{new_bounded, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use tracing::debug;

use super::connection::Connection;
use super::context::NetContext;
use super::tcp::within;
use super::NetError;
use crate::config::{Endpoint, Transport};
use crate::protocol::frame::FRAME_HEADER_LEN;

mod hello;
mod link;
#[cfg(test)]
mod tests;

use hello::Hello;
use link::set_up;

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

/// Connection set-ups a listener runs at once; further peers wait in the kernel's backlog.
const SETUPS_AT_ONCE: u64 = 32;

/// A shard's listener for `softrdma://` or `rdma://`: the out-of-band TCP listener, and the
/// verbs device its connections use.
///
/// Set-ups run side by side, each in a task of its own bounded by the connect timeout: one
/// slow or silent peer (a slow machine registering its regions, a port scanner that never
/// says hello) must not hold back every other peer's connection behind it.
pub struct RdmaListener {
    transport: Transport,
    listener: Rc<TcpListener>,
    context: NetContext,
    /// Started by the first `accept`: the task accepting streams and setting them up, and the
    /// connections it has finished.
    accepting: RefCell<Option<Accepting>>,
}

struct Accepting {
    ready: Rc<LocalReceiver<Result<Connection, NetError>>>,
    /// Cancelled when the listener is dropped.
    _task: glommio::Task<()>,
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
            listener: Rc::new(listener),
            context: context.clone(),
            accepting: RefCell::new(None),
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

    /// The next connection whose set-up finished, or an error of the listener itself.
    pub async fn accept(&self) -> Result<Connection, NetError> {
        let ready = {
            let mut accepting = self.accepting.borrow_mut();
            let accepting = accepting.get_or_insert_with(|| self.start_accepting());
            Rc::clone(&accepting.ready)
        };
        ready.recv().await.unwrap_or_else(|| {
            Err(NetError::Io {
                context: "accept".into(),
                reason: "the listener's accepting task ended".into(),
            })
        })
    }

    fn start_accepting(&self) -> Accepting {
        let (sender, receiver) = new_bounded(16);
        let task = glommio::spawn_local(accept_and_set_up(
            self.transport,
            Rc::clone(&self.listener),
            self.context.clone(),
            Rc::new(sender),
        ));
        Accepting {
            ready: Rc::new(receiver),
            _task: task,
        }
    }
}

/// Accepts streams and sets each up in a task of its own, at most [`SETUPS_AT_ONCE`] at a
/// time; finished connections and the listener's own errors go to `ready`. A failed set-up
/// concerns that one peer only: it is logged and dropped.
async fn accept_and_set_up(
    transport: Transport,
    listener: Rc<TcpListener>,
    context: NetContext,
    ready: Rc<LocalSender<Result<Connection, NetError>>>,
) {
    let setups = Rc::new(Semaphore::new(SETUPS_AT_ONCE));
    loop {
        let Ok(permit) = setups.acquire_static_permit(1).await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                let error = NetError::Io {
                    context: "accept".into(),
                    reason: e.to_string(),
                };
                if ready.send(Err(error)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let context = context.clone();
        let ready = Rc::clone(&ready);
        glommio::spawn_local(async move {
            let started = std::time::Instant::now();
            let result = establish(transport, stream, &context).await;
            drop(permit);
            match result {
                Ok(connection) => {
                    debug!(connection = %connection.label(), took = ?started.elapsed(),
                        "rdma connection set up");
                    // The listener is gone when this fails: the connection closes with it.
                    let _ = ready.send(Ok(connection)).await;
                }
                Err(error) => debug!(%error, "rdma connection set-up failed"),
            }
        })
        .detach();
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
