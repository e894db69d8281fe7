//! The ibverbs backend (feature `rdma`): the [`Verbs`] traits over `ffi::verbs`, where every
//! `unsafe` call lives. Completions are polled (no completion channel), so the transport's
//! pump spins briefly and then sleeps in short steps while idle.

use std::rc::Rc;

use ffi::verbs::{
    CompletionQueue as IbCq, Context, IbError, MemoryRegion as IbRegion, ProtectionDomain,
    QpAddress, QueuePair as IbQp, SendKind,
};

use super::{
    CompletionQueue, MemoryRegion, QpCaps, QpEndpoint, QpState, QueuePair, RemoteAccess,
    RemoteAddress, SendOp, SendRequest, Verbs, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};
use crate::net::queue::Notify;

fn convert(call: &'static str) -> impl Fn(IbError) -> VerbsError {
    move |error| match error {
        IbError::NoDevice(reason) => VerbsError::NoDevice { reason },
        IbError::OutOfRange {
            offset,
            len,
            region_len,
        } => VerbsError::OutOfRange {
            offset,
            len,
            region_len,
        },
        IbError::Call {
            call: inner,
            reason,
        } => VerbsError::Call {
            call,
            reason: format!("{inner}: {reason}"),
        },
    }
}

/// An opened RDMA device and its protection domain.
pub struct IbVerbs {
    context: Rc<Context>,
    /// The protection domain this handle's regions and queue pairs live in.
    domain: Rc<ProtectionDomain>,
}

impl IbVerbs {
    /// Opens `device` (the first one when `None`) with GID index `gid_index`. A host without
    /// RDMA devices gets [`VerbsError::NoDevice`].
    pub fn open(device: Option<&str>, gid_index: u8) -> Result<IbVerbs, VerbsError> {
        let context = Context::open(device, gid_index).map_err(convert("open the device"))?;
        let domain = ProtectionDomain::alloc(&context).map_err(convert("ibv_alloc_pd"))?;
        Ok(IbVerbs { context, domain })
    }

    /// The RDMA devices on this host.
    pub fn device_names() -> Vec<String> {
        ffi::verbs::device_names()
    }
}

/// Registered memory of an ibverbs device.
pub struct IbMemoryRegion {
    region: IbRegion,
}

impl MemoryRegion for IbMemoryRegion {
    fn len(&self) -> usize {
        self.region.len()
    }

    fn remote_address(&self, offset: usize) -> RemoteAddress {
        RemoteAddress {
            addr: self.region.addr(offset),
            rkey: self.region.rkey(),
        }
    }

    fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), VerbsError> {
        self.region
            .write_at(offset, data)
            .map_err(convert("write a region"))
    }

    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), VerbsError> {
        self.region
            .read_at(offset, out)
            .map_err(convert("read a region"))
    }
}

/// A completion queue of an ibverbs device.
pub struct IbCompletionQueue {
    cq: Rc<IbCq>,
}

impl CompletionQueue for IbCompletionQueue {
    fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> Result<usize, VerbsError> {
        let mut raw = Vec::with_capacity(max.min(32));
        let count = self.cq.poll(&mut raw, max).map_err(convert("poll"))?;
        out.extend(raw.into_iter().map(|c| WorkCompletion {
            wr_id: c.wr_id,
            status: WcStatus::from_code(c.status),
            opcode: match c.opcode {
                0 => WcOpcode::Send,
                1 => WcOpcode::RdmaWrite,
                2 => WcOpcode::RdmaRead,
                129 => WcOpcode::RecvRdmaWithImm,
                _ => WcOpcode::Recv,
            },
            byte_len: c.byte_len,
            imm_data: c.imm_data,
        }));
        Ok(count)
    }

    fn completion_signal(&self) -> Option<Notify> {
        None
    }
}

/// An RC queue pair of an ibverbs device.
pub struct IbQueuePair {
    qp: IbQp,
}

impl QueuePair for IbQueuePair {
    type Region = IbMemoryRegion;

    fn endpoint(&self) -> QpEndpoint {
        let address = self.qp.address();
        QpEndpoint {
            qp_num: address.qp_num,
            lid: address.lid,
            gid: address.gid,
            psn: address.psn,
        }
    }

    fn state(&self) -> QpState {
        match self.qp.state() {
            Ok(0) => QpState::Reset,
            Ok(1) => QpState::Init,
            Ok(2) => QpState::ReadyToReceive,
            Ok(3) => QpState::ReadyToSend,
            _ => QpState::Error,
        }
    }

    fn to_init(&self) -> Result<(), VerbsError> {
        self.transition(QpState::Reset, QpState::Init)?;
        self.qp.to_init().map_err(convert("modify to Init"))
    }

    fn to_ready_to_receive(&self, remote: &QpEndpoint) -> Result<(), VerbsError> {
        self.transition(QpState::Init, QpState::ReadyToReceive)?;
        self.qp
            .to_ready_to_receive(&QpAddress {
                qp_num: remote.qp_num,
                lid: remote.lid,
                gid: remote.gid,
                psn: remote.psn,
            })
            .map_err(convert("modify to ReadyToReceive"))
    }

    fn to_ready_to_send(&self) -> Result<(), VerbsError> {
        self.transition(QpState::ReadyToReceive, QpState::ReadyToSend)?;
        self.qp
            .to_ready_to_send()
            .map_err(convert("modify to ReadyToSend"))
    }

    fn to_error(&self) {
        // Moving to Error only fails on a queue pair the device already tore down.
        let _ = self.qp.to_error();
    }

    fn post_recv(
        &self,
        wr_id: u64,
        region: &IbMemoryRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        self.qp
            .post_recv(wr_id, &region.region, offset, len)
            .map_err(convert("post_recv"))
    }

    fn post_send(&self, request: SendRequest<'_, IbMemoryRegion>) -> Result<(), VerbsError> {
        let kind = match request.op {
            SendOp::Send => SendKind::Send,
            SendOp::SendWithImm(imm) => SendKind::SendWithImm(imm),
            SendOp::Write(remote) => SendKind::Write(remote.addr, remote.rkey),
            SendOp::WriteWithImm(remote, imm) => {
                SendKind::WriteWithImm(remote.addr, remote.rkey, imm)
            }
            SendOp::Read(remote) => SendKind::Read(remote.addr, remote.rkey),
        };
        self.qp
            .post_send(
                request.wr_id,
                kind,
                &request.region.region,
                request.offset,
                request.len,
                request.signaled,
            )
            .map_err(convert("post_send"))
    }
}

impl IbQueuePair {
    /// The RC state machine's order, checked before the device is asked (as softverbs does).
    fn transition(&self, from: QpState, to: QpState) -> Result<(), VerbsError> {
        let state = self.state();
        if state != from {
            return Err(VerbsError::BadTransition {
                qp_num: self.qp.address().qp_num,
                from: state,
                to,
            });
        }
        Ok(())
    }
}

impl Verbs for IbVerbs {
    type Region = IbMemoryRegion;
    type Cq = IbCompletionQueue;
    type Qp = IbQueuePair;

    fn device_name(&self) -> String {
        self.context.name().to_owned()
    }

    fn new_domain(&self) -> Result<IbVerbs, VerbsError> {
        Ok(IbVerbs {
            context: Rc::clone(&self.context),
            domain: ProtectionDomain::alloc(&self.context).map_err(convert("ibv_alloc_pd"))?,
        })
    }

    fn register(&self, len: usize, remote: RemoteAccess) -> Result<IbMemoryRegion, VerbsError> {
        let region = IbRegion::register(
            &self.domain,
            len,
            remote.allows_write(),
            remote.allows_read(),
        )
        .map_err(convert("ibv_reg_mr"))?;
        Ok(IbMemoryRegion { region })
    }

    fn create_cq(&self, depth: u32) -> Result<IbCompletionQueue, VerbsError> {
        let cq = IbCq::create(&self.context, depth).map_err(convert("ibv_create_cq"))?;
        Ok(IbCompletionQueue { cq })
    }

    fn create_qp(&self, cq: &IbCompletionQueue, caps: QpCaps) -> Result<IbQueuePair, VerbsError> {
        let qp = IbQp::create(
            &self.context,
            &self.domain,
            &cq.cq,
            caps.max_send_wr,
            caps.max_recv_wr,
            caps.rnr_retry,
        )
        .map_err(convert("ibv_create_qp"))?;
        Ok(IbQueuePair { qp })
    }
}
