//! The verbs operations the RDMA transport needs, as traits with two implementations:
//! [`soft`] (always built: the same semantics in user space over a socket) and, with feature
//! `rdma`, [`ibverbs`] (real verbs through `ffi`).
//!
//! The model is ibverbs' own: a device with one protection domain ([`Verbs`]) registers memory
//! ([`MemoryRegion`]), creates completion queues ([`CompletionQueue`]) and reliable-connected
//! queue pairs ([`QueuePair`]) that move through Reset → Init → ReadyToReceive → ReadyToSend
//! (and Error). Work requests are posted without blocking; their outcome arrives as a
//! [`WorkCompletion`] with ibverbs' status codes, polled from the owning shard.

pub mod soft;

#[cfg(feature = "rdma")]
pub mod ibverbs;

#[cfg(test)]
mod conformance;

use std::fmt;

use thiserror::Error;

/// Completion status, with the values of `enum ibv_wc_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcStatus {
    /// `IBV_WC_SUCCESS`.
    Success,
    /// `IBV_WC_LOC_LEN_ERR`: a received message was longer than the receive buffer.
    LocalLengthError,
    /// `IBV_WC_LOC_QP_OP_ERR`.
    LocalQpOperationError,
    /// `IBV_WC_LOC_PROT_ERR`: a local buffer outside its registered region.
    LocalProtectionError,
    /// `IBV_WC_WR_FLUSH_ERR`: the queue pair went to the error state before this request ran.
    WrFlushError,
    /// `IBV_WC_BAD_RESP_ERR`.
    BadResponseError,
    /// `IBV_WC_LOC_ACCESS_ERR`.
    LocalAccessError,
    /// `IBV_WC_REM_INV_REQ_ERR`: the responder rejected the request (e.g. too long).
    RemoteInvalidRequestError,
    /// `IBV_WC_REM_ACCESS_ERR`: bad rkey, or an address range outside the remote region.
    RemoteAccessError,
    /// `IBV_WC_REM_OP_ERR`.
    RemoteOperationError,
    /// `IBV_WC_RETRY_EXC_ERR`: the peer stopped answering.
    RetryExceededError,
    /// `IBV_WC_RNR_RETRY_EXC_ERR`: the peer had no receive buffer posted, too many times.
    RnrRetryExceededError,
    /// Any other ibverbs status, by its value.
    Other(u32),
}

impl WcStatus {
    /// The `ibv_wc_status` value.
    pub fn code(self) -> u32 {
        match self {
            WcStatus::Success => 0,
            WcStatus::LocalLengthError => 1,
            WcStatus::LocalQpOperationError => 2,
            WcStatus::LocalProtectionError => 4,
            WcStatus::WrFlushError => 5,
            WcStatus::BadResponseError => 7,
            WcStatus::LocalAccessError => 8,
            WcStatus::RemoteInvalidRequestError => 9,
            WcStatus::RemoteAccessError => 10,
            WcStatus::RemoteOperationError => 11,
            WcStatus::RetryExceededError => 12,
            WcStatus::RnrRetryExceededError => 13,
            WcStatus::Other(code) => code,
        }
    }

    /// The status with `ibv_wc_status` value `code`.
    pub fn from_code(code: u32) -> WcStatus {
        match code {
            0 => WcStatus::Success,
            1 => WcStatus::LocalLengthError,
            2 => WcStatus::LocalQpOperationError,
            4 => WcStatus::LocalProtectionError,
            5 => WcStatus::WrFlushError,
            7 => WcStatus::BadResponseError,
            8 => WcStatus::LocalAccessError,
            9 => WcStatus::RemoteInvalidRequestError,
            10 => WcStatus::RemoteAccessError,
            11 => WcStatus::RemoteOperationError,
            12 => WcStatus::RetryExceededError,
            13 => WcStatus::RnrRetryExceededError,
            other => WcStatus::Other(other),
        }
    }
}

/// What a completion completes, as `enum ibv_wc_opcode` distinguishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcOpcode {
    /// A send (with or without immediate data).
    Send,
    /// An RDMA write (with or without immediate data).
    RdmaWrite,
    /// An RDMA read.
    RdmaRead,
    /// A receive of a send.
    Recv,
    /// A receive consumed by an RDMA write with immediate data.
    RecvRdmaWithImm,
}

/// One completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The id given when the request was posted.
    pub wr_id: u64,
    /// How it ended.
    pub status: WcStatus,
    /// What it was. Only meaningful for successful completions (as in ibverbs).
    pub opcode: WcOpcode,
    /// Bytes received (receives) or read.
    pub byte_len: u32,
    /// Immediate data, for receives of a send or write with immediate.
    pub imm_data: Option<u32>,
}

/// Queue-pair states (`enum ibv_qp_state`, the ones an RC queue pair passes through).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    /// Just created.
    Reset,
    /// Receives may be posted.
    Init,
    /// Ready to receive: bound to its remote queue pair.
    ReadyToReceive,
    /// Ready to send.
    ReadyToSend,
    /// Failed: every outstanding and later request completes with `WrFlushError`.
    Error,
}

/// What one side tells the other out of band to connect two RC queue pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// Queue pair number.
    pub qp_num: u32,
    /// Port LID (InfiniBand); for softverbs, the port of the device's socket.
    pub lid: u16,
    /// Port GID (RoCE: the IP address, IPv4-mapped); for softverbs, the device's IP address.
    pub gid: [u8; 16],
    /// First packet sequence number.
    pub psn: u32,
}

impl QpEndpoint {
    /// Encoded length.
    pub const WIRE_LEN: usize = 26;

    /// Encodes as `qp_num:u32 lid:u16 gid:[u8;16] psn:u32`, little-endian.
    pub fn encode(&self) -> [u8; Self::WIRE_LEN] {
        let mut out = [0u8; Self::WIRE_LEN];
        out[0..4].copy_from_slice(&self.qp_num.to_le_bytes());
        out[4..6].copy_from_slice(&self.lid.to_le_bytes());
        out[6..22].copy_from_slice(&self.gid);
        out[22..26].copy_from_slice(&self.psn.to_le_bytes());
        out
    }

    /// Decodes [`QpEndpoint::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Option<QpEndpoint> {
        let bytes: &[u8; Self::WIRE_LEN] = bytes.get(..Self::WIRE_LEN)?.try_into().ok()?;
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&bytes[6..22]);
        Some(QpEndpoint {
            qp_num: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            lid: u16::from_le_bytes([bytes[4], bytes[5]]),
            gid,
            psn: u32::from_le_bytes([bytes[22], bytes[23], bytes[24], bytes[25]]),
        })
    }
}

/// The address of a byte range of a peer's registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddress {
    /// Virtual address (as the peer's device sees it).
    pub addr: u64,
    /// The region's remote key.
    pub rkey: u32,
}

/// Sizes of a queue pair's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Send requests outstanding at once.
    pub max_send_wr: u32,
    /// Receive requests posted at once.
    pub max_recv_wr: u32,
    /// How many times a send that finds no receive posted is retried (7: forever).
    pub rnr_retry: u8,
}

impl Default for QpCaps {
    fn default() -> Self {
        QpCaps {
            max_send_wr: 256,
            max_recv_wr: 256,
            rnr_retry: 7,
        }
    }
}

/// The operation of a send-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// Send, consuming one receive on the peer.
    Send,
    /// Send with immediate data.
    SendWithImm(u32),
    /// Write the local bytes to the remote address.
    Write(RemoteAddress),
    /// Write, then consume one receive on the peer that carries the immediate data.
    WriteWithImm(RemoteAddress, u32),
    /// Read remote bytes into the local range.
    Read(RemoteAddress),
}

/// A send-queue work request over `[offset, offset + len)` of a local region.
pub struct SendRequest<'a, R> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// What to do.
    pub op: SendOp,
    /// The local region.
    pub region: &'a R,
    /// Start of the local range.
    pub offset: usize,
    /// Length of the local range.
    pub len: usize,
    /// Whether a successful completion is reported (failures always are).
    pub signaled: bool,
}

impl<R> fmt::Debug for SendRequest<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendRequest")
            .field("wr_id", &self.wr_id)
            .field("op", &self.op)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

/// A failed verbs call (as opposed to a failed completion, which is a [`WcStatus`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerbsError {
    /// No RDMA device on this host (a normal case: use `softrdma://` or `tcp://`).
    #[error("no RDMA device: {reason}")]
    NoDevice {
        /// What was looked for and found.
        reason: String,
    },
    /// A verbs call failed.
    #[error("{call} failed: {reason}")]
    Call {
        /// The call (`ibv_reg_mr`, `ibv_post_send`, ...).
        call: &'static str,
        /// errno text, or what was wrong.
        reason: String,
    },
    /// A state transition that RC queue pairs do not make.
    #[error("queue pair {qp_num}: cannot go from {from:?} to {to:?}")]
    BadTransition {
        /// The queue pair.
        qp_num: u32,
        /// Its state.
        from: QpState,
        /// The state asked for.
        to: QpState,
    },
    /// A queue is full.
    #[error("{queue} queue full ({depth} entries)")]
    QueueFull {
        /// Which queue.
        queue: &'static str,
        /// Its depth.
        depth: u32,
    },
    /// A local access outside a region.
    #[error("range {offset}+{len} is outside a region of {region_len} bytes")]
    OutOfRange {
        /// Start.
        offset: usize,
        /// Length.
        len: usize,
        /// The region's length.
        region_len: usize,
    },
    /// The completion queue overflowed: completions were lost, the queue pairs on it failed.
    #[error("completion queue overrun")]
    CqOverrun,
}

/// Registered memory. Reads and writes copy through `&self`: the device may write the region
/// at any time, so no reference into it is ever handed out.
pub trait MemoryRegion {
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The address a peer uses for byte `offset` of this region.
    fn remote_address(&self, offset: usize) -> RemoteAddress;
    /// Copies `data` into the region at `offset`.
    fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), VerbsError>;
    /// Copies region bytes at `offset` into `out`.
    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), VerbsError>;
}

/// A completion queue.
pub trait CompletionQueue {
    /// Moves up to `max` completions into `out`; returns how many.
    fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> Result<usize, VerbsError>;
    /// A signal notified whenever a completion arrives, where the backend has one (soft);
    /// `None` means the queue must be polled (hardware without a completion channel).
    fn completion_signal(&self) -> Option<super::queue::Notify>;
}

/// A reliable-connected queue pair.
pub trait QueuePair {
    /// The memory regions this queue pair's requests use.
    type Region: MemoryRegion;
    /// What the peer needs to connect to this queue pair.
    fn endpoint(&self) -> QpEndpoint;
    /// The current state.
    fn state(&self) -> QpState;
    /// Reset → Init.
    fn to_init(&self) -> Result<(), VerbsError>;
    /// Init → ReadyToReceive, bound to the remote queue pair.
    fn to_ready_to_receive(&self, remote: &QpEndpoint) -> Result<(), VerbsError>;
    /// ReadyToReceive → ReadyToSend.
    fn to_ready_to_send(&self) -> Result<(), VerbsError>;
    /// Any state → Error: outstanding requests complete with `WrFlushError`.
    fn to_error(&self);
    /// Posts a receive of at most `len` bytes into `region[offset..]`.
    fn post_recv(
        &self,
        wr_id: u64,
        region: &Self::Region,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError>;
    /// Posts a send-queue request.
    fn post_send(&self, request: SendRequest<'_, Self::Region>) -> Result<(), VerbsError>;
}

/// What a peer may do to a registered region through its rkey. A connection registers for
/// remote access only the regions its peer must reach (issue 25, item 9): the RDMA transport's
/// landing slots take remote writes; its rings and staging slots take none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteAccess {
    /// Local use only: a peer's read or write through the rkey fails.
    None,
    /// Peers may RDMA-write into it.
    Write,
    /// Peers may RDMA-read and RDMA-write it.
    ReadWrite,
}

impl RemoteAccess {
    /// Whether a peer may write the region.
    pub fn allows_write(self) -> bool {
        matches!(self, RemoteAccess::Write | RemoteAccess::ReadWrite)
    }

    /// Whether a peer may read the region.
    pub fn allows_read(self) -> bool {
        self == RemoteAccess::ReadWrite
    }
}

/// A verbs device, through one of its protection domains.
pub trait Verbs {
    /// Registered memory of this device.
    type Region: MemoryRegion;
    /// Completion queues of this device.
    type Cq: CompletionQueue;
    /// Queue pairs of this device.
    type Qp: QueuePair<Region = Self::Region>;
    /// The device's name (`rxe0`, `mlx5_0`, `softverbs`).
    fn device_name(&self) -> String;
    /// A handle to the same device in a new protection domain: the regions registered and
    /// the queue pairs created through it are out of reach of other domains' queue pairs (a
    /// remote access through another domain's region fails). The RDMA transport takes one
    /// per connection (issue 25, item 9).
    fn new_domain(&self) -> Result<Self, VerbsError>
    where
        Self: Sized;
    /// Allocates and registers `len` bytes for local write, and for what `remote` allows a
    /// peer to do through the region's rkey (nothing, unless the region is an RDMA target).
    fn register(&self, len: usize, remote: RemoteAccess) -> Result<Self::Region, VerbsError>;
    /// A completion queue with room for `depth` completions.
    fn create_cq(&self, depth: u32) -> Result<Self::Cq, VerbsError>;
    /// An RC queue pair whose sends and receives complete on `cq`.
    fn create_qp(&self, cq: &Self::Cq, caps: QpCaps) -> Result<Self::Qp, VerbsError>;
}

/// Whether real-verbs tests can run: an RDMA device is present. Without one they skip and
/// say why, unless `RDMA_TESTS_REQUIRE_DEVICE` is set (scripts/rdma-tests sets it where it
/// expects a device), which makes a missing device a failure.
#[cfg(all(test, feature = "rdma"))]
pub(crate) fn rdma_device_present() -> bool {
    let devices = ibverbs::IbVerbs::device_names();
    if !devices.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("RDMA_TESTS_REQUIRE_DEVICE").is_none(),
        "RDMA_TESTS_REQUIRE_DEVICE is set but ibv_get_device_list finds no RDMA device"
    );
    eprintln!(
        "skipped: no RDMA device on this host (scripts/rdma-tests runs these on rxe0 in a \
         Soft-RoCE guest)"
    );
    false
}
