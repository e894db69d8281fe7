//! A queue pair's state, and the one operation every part uses on it: moving it to Error.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};

use super::cq::{flushed, send_opcode, CqInner};
use super::region::RegionInner;
use super::SoftDevice;
use crate::net::queue::{Latch, Notify};
use crate::net::verbs::{
    QpCaps, QpEndpoint, QpState, SendOp, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};

/// A posted receive: where the next incoming send goes.
pub(super) struct RecvRequest {
    pub(super) wr_id: u64,
    pub(super) region: Rc<RegionInner>,
    pub(super) offset: usize,
    pub(super) len: usize,
}

/// A posted send-queue request.
pub(super) struct PostedSend {
    pub(super) wr_id: u64,
    pub(super) op: SendOp,
    /// The bytes to send or write, copied at posting (the buffer may be reused afterwards,
    /// which is stricter than a NIC requires).
    pub(super) data: Vec<u8>,
    /// For reads: where the bytes go.
    pub(super) read_target: Option<(Rc<RegionInner>, usize, usize)>,
    pub(super) signaled: bool,
}

/// A transmitted request awaiting its acknowledgement.
pub(super) struct InFlight {
    pub(super) psn: u32,
    pub(super) send: PostedSend,
    /// The encoded packet, kept for retransmission after an RNR NAK.
    pub(super) packet: Rc<Vec<u8>>,
}

/// The state of a queue pair, shared by its handle, its wire tasks and its device.
pub(super) struct QpInner {
    pub(super) qp_num: u32,
    pub(super) psn_start: u32,
    pub(super) caps: QpCaps,
    pub(super) device: Weak<SoftDevice>,
    /// Its protection domain: only regions of the same domain take its peer's RDMA.
    pub(super) domain: u64,
    pub(super) device_addr: SocketAddr,
    pub(super) cq: Rc<CqInner>,
    pub(super) state: Cell<QpState>,
    pub(super) remote: Cell<Option<QpEndpoint>>,
    /// Invariant: at most `caps.max_recv_wr` entries.
    pub(super) recv_queue: RefCell<VecDeque<RecvRequest>>,
    /// Posted, not yet transmitted. Invariant: with `in_flight`, at most `caps.max_send_wr`.
    pub(super) send_queue: RefCell<VecDeque<PostedSend>>,
    /// Transmitted, not yet acknowledged, in PSN order.
    pub(super) in_flight: RefCell<VecDeque<InFlight>>,
    pub(super) next_psn: Cell<u32>,
    /// The responder's next expected PSN.
    pub(super) expected_psn: Cell<u32>,
    pub(super) rnr_attempts: Cell<u32>,
    /// While set, no new request is transmitted (an RNR retransmission is pending).
    pub(super) rnr_waiting: Cell<bool>,
    /// Packets to write to the wire, in order.
    pub(super) outbound: RefCell<VecDeque<Rc<Vec<u8>>>>,
    pub(super) wake_writer: Notify,
    pub(super) wire_attached: Cell<bool>,
    pub(super) wire_stop: Latch,
}

impl QpInner {
    /// Moves the queue pair from state `from` to `to`; refused in any other state.
    pub(super) fn transition(&self, from: QpState, to: QpState) -> Result<(), VerbsError> {
        let state = self.state.get();
        if state != from {
            return Err(VerbsError::BadTransition {
                qp_num: self.qp_num,
                from: state,
                to,
            });
        }
        self.state.set(to);
        Ok(())
    }

    /// Moves the queue pair to Error. `first` is the status of the oldest outstanding send
    /// (the one that failed); everything else is flushed.
    pub(super) fn fail(&self, first: Option<WcStatus>) {
        if self.state.get() == QpState::Error {
            return;
        }
        self.state.set(QpState::Error);
        let mut first = first;
        let in_flight: Vec<PostedSend> = self
            .in_flight
            .borrow_mut()
            .drain(..)
            .map(|f| f.send)
            .collect();
        let queued: Vec<PostedSend> = self.send_queue.borrow_mut().drain(..).collect();
        for send in in_flight.into_iter().chain(queued) {
            let status = first.take().unwrap_or(WcStatus::WrFlushError);
            self.cq.push(WorkCompletion {
                wr_id: send.wr_id,
                status,
                opcode: send_opcode(send.op),
                byte_len: 0,
                imm_data: None,
            });
        }
        let receives: Vec<RecvRequest> = self.recv_queue.borrow_mut().drain(..).collect();
        for receive in receives {
            self.cq.push(flushed(receive.wr_id, WcOpcode::Recv));
        }
        // The wire ends with the queue pair: the peer sees its requests fail too.
        self.wire_stop.set();
        self.wake_writer.notify();
    }
}
