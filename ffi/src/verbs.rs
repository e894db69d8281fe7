//! ibverbs through rdma-sys: a device context with one protection domain, registered memory,
//! completion queues and RC queue pairs, as owned handles that release their C object on drop.
//!
//! Drop order is carried by reference counts: a queue pair holds its completion queue, and
//! every object holds the context, so the context (protection domain, device) is released
//! last and a completion queue only after the queue pairs that use it.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::CStr;
use std::fmt;
use std::ptr::{self, NonNull};
use std::rc::Rc;

use rdma_sys::{
    ___ibv_query_port, ibv_access_flags, ibv_alloc_pd, ibv_close_device, ibv_context, ibv_cq,
    ibv_create_cq, ibv_create_qp, ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_cq, ibv_destroy_qp,
    ibv_free_device_list, ibv_get_device_list, ibv_get_device_name, ibv_gid, ibv_modify_qp, ibv_mr,
    ibv_open_device, ibv_pd, ibv_poll_cq, ibv_port_attr, ibv_post_recv, ibv_post_send, ibv_qp,
    ibv_qp_attr, ibv_qp_attr_mask, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_query_gid,
    ibv_query_qp, ibv_recv_wr, ibv_reg_mr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc,
    ibv_wc_flags, ibv_wr_opcode,
};

/// A failed ibverbs call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IbError {
    /// No RDMA device, or not the one asked for.
    NoDevice(String),
    /// A call failed with this errno text.
    Call {
        /// The call.
        call: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A range outside a registered region.
    OutOfRange {
        /// Start.
        offset: usize,
        /// Length.
        len: usize,
        /// The region's length.
        region_len: usize,
    },
}

impl fmt::Display for IbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IbError::NoDevice(reason) => write!(f, "no RDMA device: {reason}"),
            IbError::Call { call, reason } => write!(f, "{call} failed: {reason}"),
            IbError::OutOfRange {
                offset,
                len,
                region_len,
            } => write!(
                f,
                "range {offset}+{len} is outside a region of {region_len} bytes"
            ),
        }
    }
}

impl std::error::Error for IbError {}

fn errno(call: &'static str) -> IbError {
    IbError::Call {
        call,
        reason: std::io::Error::last_os_error().to_string(),
    }
}

fn status(call: &'static str, rc: i32) -> Result<(), IbError> {
    if rc == 0 {
        Ok(())
    } else {
        // Verbs calls return an errno value (positive) or -1 with errno set.
        let code = if rc > 0 {
            rc
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(rc)
        };
        Err(IbError::Call {
            call,
            reason: std::io::Error::from_raw_os_error(code).to_string(),
        })
    }
}

/// The names of the RDMA devices on this host (empty when there is none).
pub fn device_names() -> Vec<String> {
    let mut count = 0i32;
    // SAFETY: ibv_get_device_list writes the count and returns a NULL-terminated array (or
    // NULL), which we free below and do not use afterwards.
    let list = unsafe { ibv_get_device_list(&mut count) };
    if list.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    for i in 0..usize::try_from(count).unwrap_or(0) {
        // SAFETY: `list` holds `count` valid device pointers.
        let device = unsafe { *list.add(i) };
        // SAFETY: the device is valid until the list is freed; the name is a C string it owns.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(device)) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    names
}

/// An opened device and its port 1. Regions and queue pairs live in a
/// [`ProtectionDomain`] of it.
pub struct Context {
    context: NonNull<ibv_context>,
    name: String,
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    lid: u16,
    active_mtu: u32,
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every object made from this context (protection domains, and through them
        // regions and queue pairs; completion queues) holds an `Rc` to it, so none is alive
        // now; the handle is released exactly once.
        unsafe {
            ibv_close_device(self.context.as_ptr());
        }
    }
}

impl Context {
    /// Opens `device` (the first device when `None`) on port 1 with GID `gid_index`.
    pub fn open(device: Option<&str>, gid_index: u8) -> Result<Rc<Context>, IbError> {
        let mut count = 0i32;
        // SAFETY: as in `device_names`.
        let list = unsafe { ibv_get_device_list(&mut count) };
        if list.is_null() || count <= 0 {
            if !list.is_null() {
                // SAFETY: freed once, not used afterwards.
                unsafe { ibv_free_device_list(list) };
            }
            return Err(IbError::NoDevice(
                "ibv_get_device_list found none (no RDMA NIC, no rdma_rxe or siw link)".into(),
            ));
        }
        let mut chosen = None;
        let mut seen = Vec::new();
        for i in 0..usize::try_from(count).unwrap_or(0) {
            // SAFETY: `list` holds `count` valid device pointers.
            let candidate = unsafe { *list.add(i) };
            // SAFETY: valid until the list is freed.
            let name = unsafe { CStr::from_ptr(ibv_get_device_name(candidate)) }
                .to_string_lossy()
                .into_owned();
            if chosen.is_none() && device.map_or(true, |wanted| wanted == name) {
                chosen = Some((candidate, name.clone()));
            }
            seen.push(name);
        }
        let Some((candidate, name)) = chosen else {
            // SAFETY: freed once.
            unsafe { ibv_free_device_list(list) };
            return Err(IbError::NoDevice(format!(
                "no device named {:?} (found {})",
                device.unwrap_or(""),
                seen.join(", ")
            )));
        };
        // SAFETY: the device pointer is valid while the list is; the context it returns lives
        // on after the list is freed (libibverbs keeps the device referenced).
        let context = unsafe { ibv_open_device(candidate) };
        // SAFETY: freed once; `candidate` is not used after this.
        unsafe { ibv_free_device_list(list) };
        let context = NonNull::new(context).ok_or_else(|| errno("ibv_open_device"))?;
        let close = |context: NonNull<ibv_context>| {
            // SAFETY: the context was opened above and nothing else refers to it yet.
            unsafe { ibv_close_device(context.as_ptr()) };
        };
        let port = 1u8;
        // SAFETY: ibv_port_attr is plain data; zeroed is a valid initial value.
        let mut port_attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `port_attr` is a valid out-pointer.
        let rc = unsafe { ___ibv_query_port(context.as_ptr(), port, &mut port_attr) };
        if let Err(error) = status("ibv_query_port", rc) {
            close(context);
            return Err(error);
        }
        // SAFETY: ibv_gid is a union of plain bytes; zeroed is valid.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `gid` is a valid out-pointer.
        let rc = unsafe { ibv_query_gid(context.as_ptr(), port, i32::from(gid_index), &mut gid) };
        if let Err(error) = status("ibv_query_gid", rc) {
            close(context);
            return Err(error);
        }
        // SAFETY: every bit pattern of the union is a valid byte array.
        let gid = unsafe { gid.raw };
        Ok(Rc::new(Context {
            context,
            name,
            port,
            gid_index,
            gid,
            lid: port_attr.lid,
            active_mtu: port_attr.active_mtu,
        }))
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port's GID at the chosen index.
    pub fn gid(&self) -> [u8; 16] {
        self.gid
    }

    /// The port's LID (0 on RoCE).
    pub fn lid(&self) -> u16 {
        self.lid
    }
}

/// Memory this module allocated (page-aligned) and registered for local write and remote
/// read and write.
pub struct MemoryRegion {
    mr: NonNull<ibv_mr>,
    buffer: NonNull<u8>,
    layout: Layout,
    len: usize,
    _domain: Rc<ProtectionDomain>,
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: deregistered once, before the memory is freed, so the device can no longer
        // write it; the buffer was allocated with `layout`.
        unsafe {
            ibv_dereg_mr(self.mr.as_ptr());
            dealloc(self.buffer.as_ptr(), self.layout);
        }
    }
}

/// A protection domain of a device: regions and queue pairs of one domain are out of reach of
/// the queue pairs of another (a remote access through another domain's rkey fails).
pub struct ProtectionDomain {
    pd: NonNull<ibv_pd>,
    _context: Rc<Context>,
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every region and queue pair of this domain holds an `Rc` to it, so none is
        // alive now; deallocated exactly once, before its context (held above) closes.
        unsafe {
            ibv_dealloc_pd(self.pd.as_ptr());
        }
    }
}

impl ProtectionDomain {
    /// Allocates a protection domain of `context`.
    pub fn alloc(context: &Rc<Context>) -> Result<Rc<ProtectionDomain>, IbError> {
        // SAFETY: the context is open (held by the `Rc`).
        let pd = unsafe { ibv_alloc_pd(context.context.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| errno("ibv_alloc_pd"))?;
        Ok(Rc::new(ProtectionDomain {
            pd,
            _context: Rc::clone(context),
        }))
    }
}

impl MemoryRegion {
    /// Allocates and registers `len` bytes for local write, and for remote write and remote
    /// read only as asked: a peer's access to a region without them fails.
    pub fn register(
        domain: &Rc<ProtectionDomain>,
        len: usize,
        remote_write: bool,
        remote_read: bool,
    ) -> Result<MemoryRegion, IbError> {
        let layout = Layout::from_size_align(len.max(1), 4096).map_err(|e| IbError::Call {
            call: "allocate a region",
            reason: e.to_string(),
        })?;
        // SAFETY: the layout has a non-zero size.
        let buffer = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or(IbError::Call {
            call: "allocate a region",
            reason: format!("out of memory for {len} bytes"),
        })?;
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        if remote_write {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        if remote_read {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        // SAFETY: the protection domain is alive (held by `domain`), and the buffer stays
        // allocated until this region is dropped, after deregistration.
        let mr = unsafe {
            ibv_reg_mr(
                domain.pd.as_ptr(),
                buffer.as_ptr().cast(),
                len.max(1),
                access as i32,
            )
        };
        let Some(mr) = NonNull::new(mr) else {
            let error = errno("ibv_reg_mr");
            // SAFETY: registration failed, so nothing refers to the buffer.
            unsafe { dealloc(buffer.as_ptr(), layout) };
            return Err(error);
        };
        Ok(MemoryRegion {
            mr,
            buffer,
            layout,
            len,
            _domain: Rc::clone(domain),
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The local key.
    pub fn lkey(&self) -> u32 {
        // SAFETY: the registration is alive while `self` is.
        unsafe { self.mr.as_ref().lkey }
    }

    /// The remote key.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.mr.as_ref().rkey }
    }

    /// The virtual address of byte `offset`.
    pub fn addr(&self, offset: usize) -> u64 {
        self.buffer.as_ptr() as u64 + offset as u64
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), IbError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(IbError::OutOfRange {
                offset,
                len,
                region_len: self.len,
            }),
        }
    }

    /// Copies `data` into the region at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), IbError> {
        self.check(offset, data.len())?;
        // SAFETY: the range is inside the allocation (checked); the caller only writes ranges
        // no posted work request is using, as verbs require, so the device does not access
        // them concurrently; `data` cannot overlap memory this module allocated.
        unsafe {
            ptr::copy_nonoverlapping(data.as_ptr(), self.buffer.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Copies region bytes at `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), IbError> {
        self.check(offset, out.len())?;
        // SAFETY: the range is inside the allocation (checked); the caller reads a range only
        // after the completion that filled it, so the device no longer writes it.
        unsafe {
            ptr::copy_nonoverlapping(
                self.buffer.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }
}

/// A completion queue.
pub struct CompletionQueue {
    cq: NonNull<ibv_cq>,
    _context: Rc<Context>,
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: queue pairs using this queue hold an `Rc` to it, so none is alive now.
        unsafe { ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// One completion, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The work request id.
    pub wr_id: u64,
    /// `enum ibv_wc_status`.
    pub status: u32,
    /// `enum ibv_wc_opcode`.
    pub opcode: u32,
    /// Bytes transferred.
    pub byte_len: u32,
    /// Immediate data (host order), when the completion carries one.
    pub imm_data: Option<u32>,
}

impl CompletionQueue {
    /// A completion queue with room for `depth` entries.
    pub fn create(context: &Rc<Context>, depth: u32) -> Result<Rc<CompletionQueue>, IbError> {
        let depth = i32::try_from(depth.max(1)).unwrap_or(i32::MAX);
        // SAFETY: the context is open; no completion channel, no user context.
        let cq = unsafe {
            ibv_create_cq(
                context.context.as_ptr(),
                depth,
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            )
        };
        let cq = NonNull::new(cq).ok_or_else(|| errno("ibv_create_cq"))?;
        Ok(Rc::new(CompletionQueue {
            cq,
            _context: Rc::clone(context),
        }))
    }

    /// Polls up to `max` completions into `out`.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, IbError> {
        const BATCH: usize = 32;
        // SAFETY: ibv_wc is plain data; zeroed is a valid value to be overwritten.
        let mut entries: [ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        let want = max.min(BATCH) as i32;
        // SAFETY: the queue is alive and `entries` has room for `want` completions.
        let polled = unsafe { ibv_poll_cq(self.cq.as_ptr(), want, entries.as_mut_ptr()) };
        if polled < 0 {
            return Err(IbError::Call {
                call: "ibv_poll_cq",
                reason: format!("returned {polled}"),
            });
        }
        let polled = polled as usize;
        for entry in entries.iter().take(polled) {
            let with_imm = entry.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            // SAFETY: both union members are plain u32s, so reading either is defined; with
            // IBV_WC_WITH_IMM the value is the immediate data.
            let raw_imm = unsafe { entry.imm_data_invalidated_rkey_union.imm_data };
            out.push(Completion {
                wr_id: entry.wr_id,
                status: entry.status,
                opcode: entry.opcode,
                byte_len: entry.byte_len,
                imm_data: with_imm.then(|| u32::from_be(raw_imm)),
            });
        }
        Ok(polled)
    }
}

/// The operation of a send request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendKind {
    /// Send.
    Send,
    /// Send with immediate data.
    SendWithImm(u32),
    /// RDMA write to (address, rkey).
    Write(u64, u32),
    /// RDMA write with immediate data.
    WriteWithImm(u64, u32, u32),
    /// RDMA read from (address, rkey).
    Read(u64, u32),
}

/// An RC queue pair.
pub struct QueuePair {
    qp: NonNull<ibv_qp>,
    psn: u32,
    rnr_retry: u8,
    context: Rc<Context>,
    _domain: Rc<ProtectionDomain>,
    _cq: Rc<CompletionQueue>,
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: destroyed once; its completion queue, protection domain and context outlive
        // it (held below).
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

/// What the peer needs to connect to a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpAddress {
    /// Queue pair number.
    pub qp_num: u32,
    /// LID.
    pub lid: u16,
    /// GID.
    pub gid: [u8; 16],
    /// First PSN.
    pub psn: u32,
}

impl QueuePair {
    /// An RC queue pair whose sends and receives complete on `cq`.
    pub fn create(
        context: &Rc<Context>,
        domain: &Rc<ProtectionDomain>,
        cq: &Rc<CompletionQueue>,
        max_send_wr: u32,
        max_recv_wr: u32,
        rnr_retry: u8,
    ) -> Result<QueuePair, IbError> {
        // SAFETY: plain data; the fields that matter are set below.
        let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.cq.as_ptr();
        attr.recv_cq = cq.cq.as_ptr();
        attr.qp_type = ibv_qp_type::IBV_QPT_RC;
        attr.cap.max_send_wr = max_send_wr;
        attr.cap.max_recv_wr = max_recv_wr;
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        // SAFETY: the protection domain and completion queue are alive; `attr` is valid.
        let qp = unsafe { ibv_create_qp(domain.pd.as_ptr(), &mut attr) };
        let qp = NonNull::new(qp).ok_or_else(|| errno("ibv_create_qp"))?;
        // SAFETY: the queue pair was just created.
        let qp_num = unsafe { qp.as_ref().qp_num };
        Ok(QueuePair {
            qp,
            psn: qp_num.wrapping_mul(0x9E37_79B9) & 0x00FF_FFFF,
            rnr_retry: rnr_retry.min(7),
            context: Rc::clone(context),
            _domain: Rc::clone(domain),
            _cq: Rc::clone(cq),
        })
    }

    /// This queue pair's address.
    pub fn address(&self) -> QpAddress {
        QpAddress {
            // SAFETY: the queue pair is alive.
            qp_num: unsafe { self.qp.as_ref().qp_num },
            lid: self.context.lid,
            gid: self.context.gid,
            psn: self.psn,
        }
    }

    /// The current state (`enum ibv_qp_state`) as the device reports it, including an Error
    /// state the device moved it to.
    pub fn state(&self) -> Result<u32, IbError> {
        // SAFETY: plain data, written by the call.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: plain data, written by the call.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the queue pair is alive and both out-pointers are valid.
        let rc = unsafe {
            ibv_query_qp(
                self.qp.as_ptr(),
                &mut attr,
                ibv_qp_attr_mask::IBV_QP_STATE.0 as i32,
                &mut init,
            )
        };
        status("ibv_query_qp", rc)?;
        Ok(attr.qp_state)
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: u32) -> Result<(), IbError> {
        // SAFETY: the queue pair is alive and `attr` is a valid attribute block.
        let rc = unsafe { ibv_modify_qp(self.qp.as_ptr(), attr, mask as i32) };
        status("ibv_modify_qp", rc)
    }

    /// Reset → Init.
    pub fn to_init(&self) -> Result<(), IbError> {
        // SAFETY: plain data.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = self.context.port;
        attr.qp_access_flags = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        self.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE.0
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX.0
                | ibv_qp_attr_mask::IBV_QP_PORT.0
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0,
        )
    }

    /// Init → ReadyToReceive, bound to `remote`.
    pub fn to_ready_to_receive(&self, remote: &QpAddress) -> Result<(), IbError> {
        // SAFETY: plain data.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = self.context.active_mtu;
        attr.dest_qp_num = remote.qp_num;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = 16;
        attr.min_rnr_timer = 12;
        attr.ah_attr.is_global = 1;
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.port_num = self.context.port;
        attr.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
        attr.ah_attr.grh.sgid_index = self.context.gid_index;
        attr.ah_attr.grh.hop_limit = 1;
        self.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE.0
                | ibv_qp_attr_mask::IBV_QP_AV.0
                | ibv_qp_attr_mask::IBV_QP_PATH_MTU.0
                | ibv_qp_attr_mask::IBV_QP_DEST_QPN.0
                | ibv_qp_attr_mask::IBV_QP_RQ_PSN.0
                | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC.0
                | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER.0,
        )
    }

    /// ReadyToReceive → ReadyToSend.
    pub fn to_ready_to_send(&self) -> Result<(), IbError> {
        // SAFETY: plain data.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        // 4.096 µs × 2^14 ≈ 67 ms per try, 7 tries: a vanished peer is noticed in about 0.5 s.
        attr.timeout = 14;
        attr.retry_cnt = 7;
        attr.rnr_retry = self.rnr_retry;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = 16;
        self.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE.0
                | ibv_qp_attr_mask::IBV_QP_TIMEOUT.0
                | ibv_qp_attr_mask::IBV_QP_RETRY_CNT.0
                | ibv_qp_attr_mask::IBV_QP_RNR_RETRY.0
                | ibv_qp_attr_mask::IBV_QP_SQ_PSN.0
                | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC.0,
        )
    }

    /// Any state → Error.
    pub fn to_error(&self) -> Result<(), IbError> {
        // SAFETY: plain data.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut attr, ibv_qp_attr_mask::IBV_QP_STATE.0)
    }

    /// Posts a receive into `region[offset..offset + len]`.
    pub fn post_recv(
        &self,
        wr_id: u64,
        region: &MemoryRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), IbError> {
        region.check(offset, len)?;
        let mut sge = ibv_sge {
            addr: region.addr(offset),
            length: u32::try_from(len).map_err(|_| IbError::OutOfRange {
                offset,
                len,
                region_len: region.len,
            })?,
            lkey: region.lkey(),
        };
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the queue pair is alive; `wr` and `sge` live across the call (the provider
        // copies them); the buffer range is registered and stays so while `region` lives.
        let rc = unsafe { ibv_post_recv(self.qp.as_ptr(), &mut wr, &mut bad) };
        status("ibv_post_recv", rc)
    }

    /// Posts a send-queue request over `region[offset..offset + len]`.
    pub fn post_send(
        &self,
        wr_id: u64,
        kind: SendKind,
        region: &MemoryRegion,
        offset: usize,
        len: usize,
        signaled: bool,
    ) -> Result<(), IbError> {
        region.check(offset, len)?;
        let mut sge = ibv_sge {
            addr: region.addr(offset),
            length: u32::try_from(len).map_err(|_| IbError::OutOfRange {
                offset,
                len,
                region_len: region.len,
            })?,
            lkey: region.lkey(),
        };
        // SAFETY: plain data (pointers null, unions zero); the used fields are set below.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = if signaled {
            ibv_send_flags::IBV_SEND_SIGNALED.0
        } else {
            0
        };
        let (opcode, remote, imm) = match kind {
            SendKind::Send => (ibv_wr_opcode::IBV_WR_SEND, None, None),
            SendKind::SendWithImm(imm) => (ibv_wr_opcode::IBV_WR_SEND_WITH_IMM, None, Some(imm)),
            SendKind::Write(addr, rkey) => {
                (ibv_wr_opcode::IBV_WR_RDMA_WRITE, Some((addr, rkey)), None)
            }
            SendKind::WriteWithImm(addr, rkey, imm) => (
                ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
                Some((addr, rkey)),
                Some(imm),
            ),
            SendKind::Read(addr, rkey) => {
                (ibv_wr_opcode::IBV_WR_RDMA_READ, Some((addr, rkey)), None)
            }
        };
        wr.opcode = opcode;
        if let Some(imm) = imm {
            wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        if let Some((remote_addr, rkey)) = remote {
            wr.wr.rdma = rdma_sys::rdma_t { remote_addr, rkey };
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the queue pair is alive; `wr` and `sge` live across the call (the provider
        // copies them); the local range is registered and stays so while `region` lives, and
        // the caller keeps it untouched until the completion.
        let rc = unsafe { ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad) };
        status("ibv_post_send", rc)
    }
}
