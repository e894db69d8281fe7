//! `[net]`: connection timeouts and the RDMA transport's device and ring sizes, shared by a
//! node's listeners, its own clients (heartbeats, the scheduler's operators) and the clients
//! built from the same file (`chunkserver nbd`, `chunkctl`).

use serde::{Deserialize, Serialize};

use super::defaults;

/// `[net]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetSection {
    /// How long opening a connection may take, RDMA set-up (region registration, the hello
    /// exchange) included.
    pub connect_timeout_ms: u64,
    /// How long a request waits for its response, queueing included.
    pub request_timeout_ms: u64,
    /// How long one write, or the rest of a frame once its header arrived, may take before the
    /// connection is declared dead.
    pub io_timeout_ms: u64,
    /// RDMA device for `rdma://` listeners and connections (the first device when unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma_device: Option<String>,
    /// GID index for `rdma://` (RoCE v2 over the interface's IPv4 address is usually 1).
    pub rdma_gid_index: u8,
    /// Receive buffers posted per RDMA connection.
    pub rdma_recv_ring_depth: u16,
    /// Landing slots per RDMA connection for payloads too large to travel inline (and as many
    /// staging slots); each is as large as the largest payload.
    pub rdma_landing_slots: u16,
}

impl Default for NetSection {
    fn default() -> Self {
        NetSection {
            connect_timeout_ms: defaults::CONNECT_TIMEOUT_MS,
            request_timeout_ms: defaults::REQUEST_TIMEOUT_MS,
            io_timeout_ms: defaults::IO_TIMEOUT_MS,
            rdma_device: None,
            rdma_gid_index: defaults::RDMA_GID_INDEX,
            rdma_recv_ring_depth: defaults::RDMA_RECV_RING_DEPTH,
            rdma_landing_slots: defaults::RDMA_LANDING_SLOTS,
        }
    }
}

impl NetSection {
    /// Whether every key has its default (the section is then left out when written).
    pub fn is_default(&self) -> bool {
        *self == NetSection::default()
    }

    /// What the types cannot say: timeouts that are not zero, ring sizes the transport takes.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        for (key, value) in [
            ("net.connect_timeout_ms", self.connect_timeout_ms),
            ("net.request_timeout_ms", self.request_timeout_ms),
            ("net.io_timeout_ms", self.io_timeout_ms),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        if !(4..=4096).contains(&self.rdma_recv_ring_depth) {
            return Err((
                "net.rdma_recv_ring_depth",
                format!("{} is not in 4..=4096", self.rdma_recv_ring_depth),
            ));
        }
        if !(1..=1024).contains(&self.rdma_landing_slots) {
            return Err((
                "net.rdma_landing_slots",
                format!("{} is not in 1..=1024", self.rdma_landing_slots),
            ));
        }
        Ok(())
    }
}
