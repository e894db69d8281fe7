//! The queue-pair verbs of softverbs: state transitions (the wire is set up on the way to
//! ReadyToReceive) and posting receives and sends.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::rc::Rc;

use super::cq::{flushed, send_opcode};
use super::region::SoftRegion;
use super::state::{PostedSend, QpInner, RecvRequest};
use super::wire::dial_wire;
use crate::net::verbs::{
    QpEndpoint, QpState, QueuePair, SendOp, SendRequest, VerbsError, WcOpcode, WcStatus,
    WorkCompletion,
};

/// An RC queue pair of a [`SoftVerbs`](super::SoftVerbs) device. Dropping it closes its wire.
pub struct SoftQp {
    pub(super) inner: Rc<QpInner>,
}

impl Drop for SoftQp {
    fn drop(&mut self) {
        self.inner.wire_stop.set();
    }
}

/// The GID of a device address: an IPv4 address mapped into IPv6.
fn gid_of(addr: SocketAddr) -> [u8; 16] {
    match addr.ip() {
        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        IpAddr::V6(ip) => ip.octets(),
    }
}

/// The device address a remote endpoint names (the inverse of `gid_of`, port = `lid`).
fn addr_of(endpoint: &QpEndpoint) -> SocketAddr {
    let ip = Ipv6Addr::from(endpoint.gid);
    let ip = ip
        .to_ipv4_mapped()
        .map(IpAddr::V4)
        .unwrap_or(IpAddr::V6(ip));
    SocketAddr::new(ip, endpoint.lid)
}

impl QueuePair for SoftQp {
    type Region = SoftRegion;

    fn endpoint(&self) -> QpEndpoint {
        QpEndpoint {
            qp_num: self.inner.qp_num,
            lid: self.inner.device_addr.port(),
            gid: gid_of(self.inner.device_addr),
            psn: self.inner.psn_start,
        }
    }

    fn state(&self) -> QpState {
        self.inner.state.get()
    }

    fn to_init(&self) -> Result<(), VerbsError> {
        self.inner.transition(QpState::Reset, QpState::Init)
    }

    fn to_ready_to_receive(&self, remote: &QpEndpoint) -> Result<(), VerbsError> {
        self.inner
            .transition(QpState::Init, QpState::ReadyToReceive)?;
        self.inner.remote.set(Some(*remote));
        self.inner.expected_psn.set(remote.psn);
        let local_key = (
            gid_of(self.inner.device_addr),
            self.inner.device_addr.port(),
            self.inner.qp_num,
        );
        let remote_key = (remote.gid, remote.lid, remote.qp_num);
        if local_key < remote_key {
            glommio::spawn_local(dial_wire(
                Rc::clone(&self.inner),
                addr_of(remote),
                remote.qp_num,
            ))
            .detach();
        } else if let Some(device) = self.inner.device.upgrade() {
            let parked = device.parked_wires.borrow_mut().remove(&self.inner.qp_num);
            match parked {
                Some((source, stream)) if source == remote.qp_num => self.inner.attach_wire(stream),
                Some(other) => {
                    device
                        .parked_wires
                        .borrow_mut()
                        .insert(self.inner.qp_num, other);
                }
                None => {}
            }
        }
        Ok(())
    }

    fn to_ready_to_send(&self) -> Result<(), VerbsError> {
        self.inner
            .transition(QpState::ReadyToReceive, QpState::ReadyToSend)?;
        self.inner.wake_writer.notify();
        Ok(())
    }

    fn to_error(&self) {
        self.inner.fail(None);
    }

    fn post_recv(
        &self,
        wr_id: u64,
        region: &SoftRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        let inner = &self.inner;
        match inner.state.get() {
            QpState::Reset => {
                return Err(VerbsError::Call {
                    call: "post_recv",
                    reason: "queue pair in Reset".into(),
                })
            }
            QpState::Error => {
                inner.cq.push(flushed(wr_id, WcOpcode::Recv));
                return Ok(());
            }
            _ => {}
        }
        region.inner.check(offset, len)?;
        let mut recv_queue = inner.recv_queue.borrow_mut();
        if recv_queue.len() >= inner.caps.max_recv_wr as usize {
            return Err(VerbsError::QueueFull {
                queue: "receive",
                depth: inner.caps.max_recv_wr,
            });
        }
        recv_queue.push_back(RecvRequest {
            wr_id,
            region: Rc::clone(&region.inner),
            offset,
            len,
        });
        Ok(())
    }

    fn post_send(&self, request: SendRequest<'_, SoftRegion>) -> Result<(), VerbsError> {
        let inner = &self.inner;
        match inner.state.get() {
            QpState::ReadyToSend => {}
            QpState::Error => {
                inner
                    .cq
                    .push(flushed(request.wr_id, send_opcode(request.op)));
                return Ok(());
            }
            other => {
                return Err(VerbsError::Call {
                    call: "post_send",
                    reason: format!("queue pair in {other:?}, not ReadyToSend"),
                })
            }
        }
        let outstanding = inner.send_queue.borrow().len() + inner.in_flight.borrow().len();
        if outstanding >= inner.caps.max_send_wr as usize {
            return Err(VerbsError::QueueFull {
                queue: "send",
                depth: inner.caps.max_send_wr,
            });
        }
        if request
            .region
            .inner
            .check(request.offset, request.len)
            .is_err()
        {
            inner.cq.push(WorkCompletion {
                wr_id: request.wr_id,
                status: WcStatus::LocalProtectionError,
                opcode: send_opcode(request.op),
                byte_len: 0,
                imm_data: None,
            });
            inner.fail(None);
            return Ok(());
        }
        let (data, read_target) = match request.op {
            SendOp::Read(_) => (
                Vec::new(),
                Some((
                    Rc::clone(&request.region.inner),
                    request.offset,
                    request.len,
                )),
            ),
            _ => (request.region.inner.read(request.offset, request.len), None),
        };
        inner.send_queue.borrow_mut().push_back(PostedSend {
            wr_id: request.wr_id,
            op: request.op,
            data,
            read_target,
            signaled: request.signaled,
        });
        inner.wake_writer.notify();
        Ok(())
    }
}
