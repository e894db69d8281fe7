//! The one place an [`Endpoint`] picks its transport: `tcp://` is the TCP transport,
//! `softrdma://` the RDMA message transport over `softverbs`, `rdma://` the same transport over
//! real ibverbs (feature `rdma`). Everything above this module sees only [`Listener`] and
//! [`Connection`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use tracing::debug;

use super::connection::{Connection, Message};
use super::context::NetContext;
use super::rdma::RdmaListener;
use super::tcp::TcpTransportListener;
use super::NetError;
use crate::config::{Endpoint, Transport};

/// A listening endpoint of one shard, whatever its transport.
pub enum Listener {
    /// `tcp://`.
    Tcp(TcpTransportListener),
    /// `softrdma://` or `rdma://`.
    Rdma(RdmaListener),
}

impl Listener {
    /// Listens on exactly `endpoint.addr` (port 0 picks a free one).
    pub async fn bind(endpoint: &Endpoint, context: &NetContext) -> Result<Listener, NetError> {
        match endpoint.transport {
            Transport::Tcp => Ok(Listener::Tcp(TcpTransportListener::bind(
                endpoint.addr,
                context.connection.clone(),
                Rc::clone(&context.allocator),
                context.auth.clone(),
            )?)),
            Transport::SoftRdma | Transport::Rdma => Ok(Listener::Rdma(
                RdmaListener::bind(endpoint.transport, endpoint.addr, context).await?,
            )),
        }
    }

    /// Listens on shard `shard`'s port of `endpoint` (the base port plus the shard index).
    pub async fn bind_shard(
        endpoint: &Endpoint,
        shard: u32,
        context: &NetContext,
    ) -> Result<Listener, NetError> {
        let addr = shard_addr(endpoint, shard)?;
        Listener::bind(
            &Endpoint {
                transport: endpoint.transport,
                addr,
            },
            context,
        )
        .await
    }

    /// The endpoint it listens on (with the port actually bound).
    pub fn local_endpoint(&self) -> Result<Endpoint, NetError> {
        match self {
            Listener::Tcp(listener) => Ok(Endpoint {
                transport: Transport::Tcp,
                addr: listener.local_addr()?,
            }),
            Listener::Rdma(listener) => listener.local_endpoint(),
        }
    }

    /// The next connection from a peer or client.
    pub async fn accept(&self) -> Result<Connection, NetError> {
        match self {
            Listener::Tcp(listener) => listener.accept().await,
            Listener::Rdma(listener) => listener.accept().await,
        }
    }

    /// Stops listening: the socket closes (what waits in its backlog is reset), set-ups under
    /// way are cancelled, and connections set up but never accepted are closed. A server
    /// that stops calls this rather than dropping the listener, so that nothing stays open
    /// behind it.
    pub async fn close(self) {
        match self {
            Listener::Tcp(listener) => listener.close().await,
            Listener::Rdma(listener) => listener.close().await,
        }
    }
}

fn shard_addr(endpoint: &Endpoint, shard: u32) -> Result<SocketAddr, NetError> {
    endpoint.for_shard(shard).ok_or_else(|| NetError::Connect {
        addr: endpoint.to_string(),
        reason: format!("shard {shard} is beyond the port range of {endpoint}"),
    })
}

/// Connects to `endpoint` (an exact address, as a listener's `local_endpoint` gives it).
pub async fn connect(endpoint: &Endpoint, context: &NetContext) -> Result<Connection, NetError> {
    match endpoint.transport {
        Transport::Tcp => {
            super::tcp::connect(
                endpoint.addr,
                context.connection.clone(),
                Rc::clone(&context.allocator),
                context.auth.as_deref(),
            )
            .await
        }
        Transport::SoftRdma | Transport::Rdma => {
            super::rdma::connect(endpoint.transport, endpoint.addr, context).await
        }
    }
}

/// Connects to shard `shard` of the node whose base endpoint is `endpoint`.
pub async fn connect_shard(
    endpoint: &Endpoint,
    shard: u32,
    context: &NetContext,
) -> Result<Connection, NetError> {
    let addr = shard_addr(endpoint, shard)?;
    connect(
        &Endpoint {
            transport: endpoint.transport,
            addr,
        },
        context,
    )
    .await
}

/// How a [`PeerConnection`] retries: exponential backoff from `initial` to `max`, at most
/// `attempts_max` attempts per call.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Wait after the first failure.
    pub initial: Duration,
    /// Longest wait between attempts.
    pub max: Duration,
    /// Attempts before a call gives up.
    pub attempts_max: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
            attempts_max: 8,
        }
    }
}

type DialFuture = Pin<Box<dyn Future<Output = Result<Connection, NetError>>>>;

/// The connection from this shard to one remote shard: dialled on first use, and re-dialled
/// with backoff when it has closed. Requests in flight when it breaks fail (the caller decides
/// whether to retry); the next request reconnects.
pub struct PeerConnection {
    endpoint: Endpoint,
    dial: Box<dyn Fn() -> DialFuture>,
    backoff: Backoff,
    current: std::cell::RefCell<Option<Connection>>,
    /// Connections made, and dials that failed.
    dials: std::cell::Cell<(u64, u64)>,
}

impl PeerConnection {
    /// A connection to `endpoint` (exact address) made with `context`.
    pub fn new(endpoint: Endpoint, context: NetContext, backoff: Backoff) -> PeerConnection {
        let dial_context = Rc::new(context);
        PeerConnection {
            endpoint,
            dial: Box::new(move || {
                let context = Rc::clone(&dial_context);
                Box::pin(async move { connect(&endpoint, &context).await })
            }),
            backoff,
            current: std::cell::RefCell::new(None),
            dials: std::cell::Cell::new((0, 0)),
        }
    }

    /// The live connection's description (transport and addresses), if there is one.
    pub fn live_label(&self) -> Option<String> {
        self.current
            .borrow()
            .as_ref()
            .filter(|c| !c.is_closed())
            .map(|c| c.label().to_string())
    }

    /// Connections made so far (every one after the first is a reconnect), and dials that
    /// failed.
    pub fn dials(&self) -> (u64, u64) {
        self.dials.get()
    }

    /// The live connection, dialling (with backoff) if there is none.
    pub async fn connection(&self) -> Result<Connection, NetError> {
        let live = self.current.borrow().clone().filter(|c| !c.is_closed());
        if let Some(connection) = live {
            return Ok(connection);
        }
        self.current.borrow_mut().take();
        let mut wait = self.backoff.initial;
        let mut last_error = None;
        for attempt in 1..=self.backoff.attempts_max.max(1) {
            match (self.dial)().await {
                Ok(connection) => {
                    *self.current.borrow_mut() = Some(connection.clone());
                    let (made, failed) = self.dials.get();
                    self.dials.set((made + 1, failed));
                    return Ok(connection);
                }
                Err(error) => {
                    let (made, failed) = self.dials.get();
                    self.dials.set((made, failed + 1));
                    debug!(endpoint = %self.endpoint, attempt, %error, "connect failed");
                    last_error = Some(error);
                }
            }
            if attempt < self.backoff.attempts_max {
                glommio::timer::sleep(wait).await;
                wait = (wait * 2).min(self.backoff.max);
            }
        }
        Err(NetError::Connect {
            addr: self.endpoint.to_string(),
            reason: format!(
                "{} attempts failed, last: {}",
                self.backoff.attempts_max,
                last_error.map(|e| e.to_string()).unwrap_or_default()
            ),
        })
    }

    /// Closes the live connection, if any (the next request dials again), and returns it:
    /// [`Connection::link_ended`] tells when its socket is gone.
    pub fn close(&self) -> Option<Connection> {
        let connection = self.current.borrow_mut().take()?;
        connection.close();
        Some(connection)
    }

    /// Sends a request over the live connection (reconnecting first if needed).
    pub async fn call(&self, request: Message) -> Result<Message, NetError> {
        self.connection().await?.call(request).await
    }

    /// Sends a one-way message over the live connection (reconnecting first if needed).
    pub async fn send(&self, message: Message) -> Result<(), NetError> {
        self.connection().await?.send(message).await
    }
}
