//! The client's limits and connection settings.

use std::time::Duration;

/// Limits of the client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long one operation may take, retries included.
    pub deadline: Duration,
    /// First wait between attempts that found no leader.
    pub backoff_initial: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
    /// How long one attempt against one replica may take before the client tries another: a
    /// paused or cut-off leader must not hold a request for the transport's whole timeout.
    pub attempt_timeout: Duration,
    /// Connection timeouts and the RDMA device and rings (`[net]` of the node's file).
    pub net: crate::config::NetSection,
    /// The keys and the role its connections prove (`[auth]`; none: it proves nothing).
    pub auth: Option<crate::net::handshake::Auth>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            deadline: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(200),
            attempt_timeout: Duration::from_secs(3),
            net: crate::config::NetSection::default(),
            auth: None,
        }
    }
}
