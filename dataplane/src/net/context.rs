//! What every connection of a shard shares: bounds and timeouts, the RDMA rings' sizes, the
//! payload allocator, and the verbs devices the shard opened. The transports read it; it
//! depends on none of them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use super::connection::ConnectionConfig;
use super::payload::{AlignedHeapAllocator, PayloadAllocator};
use super::verbs::soft::SoftVerbs;
use super::NetError;
use crate::config::{defaults, NetSection};

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
            recv_ring_depth: defaults::RDMA_RECV_RING_DEPTH,
            recv_buffer_size: 8192,
            landing_slots: defaults::RDMA_LANDING_SLOTS,
            landing_slot_size: crate::protocol::frame::DEFAULT_MAX_PAYLOAD as usize,
            device: None,
            gid_index: defaults::RDMA_GID_INDEX,
        }
    }
}

/// The verbs devices a shard has opened, shared by its listeners and connections.
#[derive(Default)]
pub struct RdmaDevices {
    soft: RefCell<HashMap<IpAddr, Rc<SoftVerbs>>>,
    #[cfg(feature = "rdma")]
    hardware: RefCell<Option<Rc<crate::net::verbs::ibverbs::IbVerbs>>>,
}

impl RdmaDevices {
    pub(crate) fn soft(&self, ip: IpAddr) -> Result<Rc<SoftVerbs>, NetError> {
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
    pub(crate) fn hardware(
        &self,
        config: &RdmaConfig,
    ) -> Result<Rc<crate::net::verbs::ibverbs::IbVerbs>, NetError> {
        if let Some(device) = self.hardware.borrow().as_ref() {
            return Ok(Rc::clone(device));
        }
        let device = Rc::new(
            crate::net::verbs::ibverbs::IbVerbs::open(config.device.as_deref(), config.gid_index)
                .map_err(|e| NetError::Unavailable {
                reason: e.to_string(),
            })?,
        );
        *self.hardware.borrow_mut() = Some(Rc::clone(&device));
        Ok(device)
    }
}

/// What every connection of a shard shares: bounds, timeouts and the payload allocator.
#[derive(Clone)]
pub struct NetContext {
    /// Bounds and timeouts of each connection.
    pub connection: ConnectionConfig,
    /// RDMA rings and slots (for `softrdma://` and `rdma://`).
    pub rdma: RdmaConfig,
    /// Where received payloads land.
    pub allocator: Rc<dyn PayloadAllocator>,
    /// The verbs devices this shard opened (one per IP for softverbs, one ibverbs device).
    pub rdma_devices: Rc<RdmaDevices>,
    /// Authentication: outgoing connections prove `auth.role`, listeners check incoming ones
    /// with `auth.keys` (`net::auth`); none, nothing is authenticated.
    pub auth: Option<Rc<super::handshake::Auth>>,
}

impl NetContext {
    /// A context with the timeouts and RDMA settings of a `[net]` section.
    pub fn from_section(net: &NetSection) -> NetContext {
        let mut context = NetContext::default();
        context.connection.connect_timeout = Duration::from_millis(net.connect_timeout_ms);
        context.connection.request_timeout = Duration::from_millis(net.request_timeout_ms);
        context.connection.io_timeout = Duration::from_millis(net.io_timeout_ms);
        context.rdma.device.clone_from(&net.rdma_device);
        context.rdma.gid_index = net.rdma_gid_index;
        context.rdma.recv_ring_depth = net.rdma_recv_ring_depth;
        context.rdma.landing_slots = net.rdma_landing_slots;
        context
    }
}

impl Default for NetContext {
    fn default() -> Self {
        NetContext {
            connection: ConnectionConfig::default(),
            rdma: RdmaConfig::default(),
            allocator: AlignedHeapAllocator::shared_default(),
            rdma_devices: Rc::new(RdmaDevices::default()),
            auth: None,
        }
    }
}
