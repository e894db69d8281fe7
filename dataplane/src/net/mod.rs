//! Transports: how bytes move between replicas and between clients and servers.
//!
//! Frames, opcodes and bodies are the wire protocol's, in [`crate::protocol`]; this module
//! moves them.
//!
//! - [`connection`]: the message API every transport offers — requests with responses matched
//!   by request id, one-way messages, incoming requests to serve.
//! - [`auth`], [`handshake`]: who is on the other end — a challenge–response over the
//!   connection's first bytes, and the role it gives.
//! - [`tcp`]: the TCP transport on glommio.
//! - [`verbs`]: the verbs operations the RDMA transport needs, with the user-space `softverbs`
//!   backend (always built) and, with feature `rdma`, real ibverbs through `ffi`.
//! - [`rdma`]: the RDMA message transport, written once against [`verbs::Verbs`].
//! - [`transport`]: the one place an [`crate::config::Endpoint`] picks its transport.

mod accepting;
pub mod auth;
pub mod connection;
pub mod context;
pub mod handshake;
pub mod payload;
pub mod queue;
pub mod rdma;
pub mod shared_stream;
pub mod tcp;
pub mod transport;
pub mod verbs;

#[cfg(test)]
mod message_suite;
#[cfg(test)]
mod test_kit;

use std::future::Future;
use std::time::Duration;

use thiserror::Error;

pub use crate::protocol::frame::{Frame, FrameCodec, FrameError, FrameFlags, FrameHeader, Opcode};
pub use connection::{close_all, Connection, ConnectionConfig, Incoming, Message};
pub use context::NetContext;
pub use payload::{AlignedHeapAllocator, AllocError, PayloadAllocator, PayloadBuffer};
pub use transport::{connect, connect_shard, Backoff, Listener, PeerConnection};

/// Why a transport operation failed. Cloneable, so one failure can fail every request that
/// was waiting on the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NetError {
    /// A socket operation failed.
    #[error("{context}: {reason}")]
    Io {
        /// What was being done, and on which connection.
        context: String,
        /// The operating system's error.
        reason: String,
    },
    /// The peer sent a malformed frame.
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer broke the transport's protocol in some other way.
    #[error("protocol violation: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// The connection is closed.
    #[error("connection closed: {reason}")]
    Closed {
        /// Why.
        reason: String,
    },
    /// Something took longer than its bound.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        what: String,
        /// The bound.
        after: Duration,
    },
    /// The peer answered with an error.
    #[error("the peer answered with an error: {reason}")]
    Remote {
        /// The peer's reason.
        reason: String,
    },
    /// A payload is larger than the configured bound.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// No buffer for a received payload.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// A connection could not be made.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// Why not.
        reason: String,
    },
    /// The transport is not available in this build or on this host.
    #[error("transport unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
}

impl NetError {
    pub(crate) fn io(context: impl Into<String>, error: &dyn std::fmt::Display) -> NetError {
        NetError::Io {
            context: context.into(),
            reason: error.to_string(),
        }
    }
}

/// Runs `operation`, failing with a timeout error if it takes longer than `limit`.
pub(crate) async fn within<T>(
    limit: Duration,
    what: impl Fn() -> String,
    operation: impl Future<Output = Result<T, NetError>>,
) -> Result<T, NetError> {
    futures_lite::future::or(operation, async {
        glommio::timer::sleep(limit).await;
        Err(NetError::Timeout {
            what: what(),
            after: limit,
        })
    })
    .await
}
