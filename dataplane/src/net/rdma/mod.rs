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

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};

use super::accepting::{Accepting, SetUp};
use super::connection::Connection;
use super::context::NetContext;
use super::within;
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

/// A shard's listener for `softrdma://` or `rdma://`: the out-of-band TCP listener, and the
/// verbs device its connections use. Set-ups run side by side (`net::accepting`).
pub struct RdmaListener {
    transport: Transport,
    listener: Rc<TcpListener>,
    accepting: Accepting,
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
        let listener = crate::listen::listen(addr).map_err(|e| NetError::Io {
            context: format!("listen on {}://{addr}", transport.scheme()),
            reason: e.to_string(),
        })?;
        let listener = Rc::new(listener);
        let set_up_context = context.clone();
        let set_up: SetUp = Rc::new(move |stream| {
            let context = set_up_context.clone();
            Box::pin(async move { establish(transport, stream, &context, Side::Accepting).await })
        });
        Ok(RdmaListener {
            transport,
            accepting: Accepting::new(Rc::clone(&listener), set_up),
            listener,
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
        self.accepting.accept().await
    }

    /// Closes the listening socket, the set-ups under way and the connections not taken.
    pub async fn close(self) {
        let RdmaListener {
            listener,
            accepting,
            ..
        } = self;
        drop(listener);
        accepting.close().await;
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
    establish(transport, stream, context, Side::Connecting).await
}

/// Which end of the out-of-band stream this is (who challenges whom).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Connecting,
    Accepting,
}

async fn establish(
    transport: Transport,
    mut stream: TcpStream,
    context: &NetContext,
    side: Side,
) -> Result<Connection, NetError> {
    let local = stream
        .local_addr()
        .map_err(|e| NetError::io("local address", &e))?;
    let peer = stream
        .peer_addr()
        .map_err(|e| NetError::io("peer address", &e))?;
    let label = format!("{} {local} -> {peer}", transport.scheme());
    let limit = context.connection.connect_timeout;
    // Who is on the other end, before any region is registered for it.
    let role = match (&context.auth, side) {
        (None, _) => None,
        (Some(auth), Side::Connecting) => {
            super::handshake::outgoing(&mut stream, auth, &label, limit).await?;
            None
        }
        (Some(auth), Side::Accepting) => {
            Some(super::handshake::incoming(&mut stream, &auth.keys, &label, limit).await?)
        }
    };
    let connection = match transport {
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
    }?;
    connection.set_peer_role(role);
    Ok(connection)
}
