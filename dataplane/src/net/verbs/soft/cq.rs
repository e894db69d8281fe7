//! Completion queues of a softverbs device, and the completions every part reports.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use crate::net::queue::Notify;
use crate::net::verbs::{CompletionQueue, SendOp, VerbsError, WcOpcode, WcStatus, WorkCompletion};

/// A completion queue of a [`SoftVerbs`](super::SoftVerbs) device.
pub struct SoftCq {
    pub(super) inner: Rc<CqInner>,
}

/// The entries of a completion queue, shared with the queue pairs that complete on it.
pub(super) struct CqInner {
    pub(super) entries: RefCell<VecDeque<WorkCompletion>>,
    /// Invariant: `entries.len() <= depth`.
    pub(super) depth: u32,
    pub(super) overrun: Cell<bool>,
    pub(super) signal: Notify,
}

impl CqInner {
    /// Adds a completion (past the depth, marks the queue overrun instead) and signals it.
    pub(super) fn push(&self, completion: WorkCompletion) {
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= self.depth as usize {
            self.overrun.set(true);
        } else {
            entries.push_back(completion);
        }
        self.signal.notify();
    }
}

impl CompletionQueue for SoftCq {
    fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> Result<usize, VerbsError> {
        if self.inner.overrun.get() {
            return Err(VerbsError::CqOverrun);
        }
        let mut entries = self.inner.entries.borrow_mut();
        let count = max.min(entries.len());
        out.extend(entries.drain(..count));
        Ok(count)
    }

    fn completion_signal(&self) -> Option<Notify> {
        Some(self.inner.signal.clone())
    }
}

/// The completion opcode of a send-queue request.
pub(super) fn send_opcode(op: SendOp) -> WcOpcode {
    match op {
        SendOp::Send | SendOp::SendWithImm(_) => WcOpcode::Send,
        SendOp::Write(_) | SendOp::WriteWithImm(..) => WcOpcode::RdmaWrite,
        SendOp::Read(_) => WcOpcode::RdmaRead,
    }
}

/// A request's completion as flushed by a queue pair in Error.
pub(super) fn flushed(wr_id: u64, opcode: WcOpcode) -> WorkCompletion {
    WorkCompletion {
        wr_id,
        status: WcStatus::WrFlushError,
        opcode,
        byte_len: 0,
        imm_data: None,
    }
}
