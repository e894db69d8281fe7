//! The requester side of a queue pair: transmitting posted sends in PSN order, and handling
//! the responder's acknowledgements (completions, RNR retries, remote errors).

use std::rc::Rc;

use super::cq::send_opcode;
use super::packet::{
    encode_request, NAK_INVALID_REQUEST, NAK_REMOTE_ACCESS, NAK_RNR, PACKET_ACK, PACKET_NAK,
    PACKET_READ_RESPONSE,
};
use super::state::{InFlight, QpInner};
use super::RNR_DELAY;
use crate::net::verbs::{QpState, WcStatus, WorkCompletion};

impl QpInner {
    /// Transmits posted sends, unless an RNR retransmission is pending.
    pub(super) fn admit_sends(&self) {
        if self.state.get() != QpState::ReadyToSend || self.rnr_waiting.get() {
            return;
        }
        loop {
            let Some(send) = self.send_queue.borrow_mut().pop_front() else {
                return;
            };
            let psn = self.next_psn.get();
            self.next_psn.set(psn.wrapping_add(1));
            let packet = Rc::new(encode_request(psn, &send));
            self.outbound.borrow_mut().push_back(Rc::clone(&packet));
            self.in_flight
                .borrow_mut()
                .push_back(InFlight { psn, send, packet });
        }
    }

    /// Handles an acknowledgement as the requester. Returns false on a protocol violation.
    pub(super) fn on_response(self: &Rc<Self>, kind: u8, psn: u32, body: &[u8]) -> bool {
        if self.state.get() == QpState::Error {
            return true;
        }
        let front_psn = self.in_flight.borrow().front().map(|f| f.psn);
        if front_psn != Some(psn) {
            return false;
        }
        match kind {
            PACKET_ACK | PACKET_READ_RESPONSE => {
                let Some(done) = self.in_flight.borrow_mut().pop_front() else {
                    return false;
                };
                self.rnr_attempts.set(0);
                let mut byte_len = done.send.data.len() as u32;
                if let Some((region, offset, len)) = &done.send.read_target {
                    if kind != PACKET_READ_RESPONSE || body.len() != *len {
                        return false;
                    }
                    region.write(*offset, body);
                    byte_len = body.len() as u32;
                }
                if done.send.signaled {
                    self.cq.push(WorkCompletion {
                        wr_id: done.send.wr_id,
                        status: WcStatus::Success,
                        opcode: send_opcode(done.send.op),
                        byte_len,
                        imm_data: None,
                    });
                }
                self.wake_writer.notify();
            }
            PACKET_NAK => match body.first().copied() {
                Some(NAK_RNR) => {
                    let attempts = self.rnr_attempts.get() + 1;
                    self.rnr_attempts.set(attempts);
                    if self.caps.rnr_retry != 7 && attempts > u32::from(self.caps.rnr_retry) {
                        self.fail(Some(WcStatus::RnrRetryExceededError));
                        return true;
                    }
                    self.rnr_waiting.set(true);
                    let qp = Rc::clone(self);
                    glommio::spawn_local(async move {
                        glommio::timer::sleep(RNR_DELAY).await;
                        qp.rnr_waiting.set(false);
                        if qp.state.get() == QpState::Error {
                            return;
                        }
                        let packets: Vec<_> = qp
                            .in_flight
                            .borrow()
                            .iter()
                            .map(|f| Rc::clone(&f.packet))
                            .collect();
                        for packet in packets {
                            qp.outbound.borrow_mut().push_back(packet);
                        }
                        qp.wake_writer.notify();
                    })
                    .detach();
                }
                Some(NAK_REMOTE_ACCESS) => self.fail(Some(WcStatus::RemoteAccessError)),
                Some(NAK_INVALID_REQUEST) => self.fail(Some(WcStatus::RemoteInvalidRequestError)),
                _ => return false,
            },
            _ => return false,
        }
        true
    }
}
