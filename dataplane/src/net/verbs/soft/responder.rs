//! The responder side of a queue pair: executing the peer's requests in PSN order (sends into
//! posted receives, writes and reads against registered regions) and answering each with an
//! acknowledgement, a read response or a NAK.

use std::rc::{Rc, Weak};

use super::packet::{
    parse_imm, parse_remote, NAK_INVALID_REQUEST, NAK_REMOTE_ACCESS, NAK_RNR, PACKET_ACK,
    PACKET_NAK, PACKET_READ_REQUEST, PACKET_READ_RESPONSE, PACKET_SEND, PACKET_WRITE,
};
use super::region::RegionInner;
use super::state::QpInner;
use crate::net::verbs::{QpState, RemoteAccess, WcOpcode, WcStatus, WorkCompletion};

impl QpInner {
    /// Queues a packet for the wire and wakes the writer.
    fn queue_packet(&self, packet: Rc<Vec<u8>>) {
        self.outbound.borrow_mut().push_back(packet);
        self.wake_writer.notify();
    }

    /// Queues a response of `kind` to the request `psn`.
    fn respond(&self, kind: u8, psn: u32, body: &[u8]) {
        let mut packet = Vec::with_capacity(9 + body.len());
        packet.extend_from_slice(&((5 + body.len()) as u32).to_le_bytes());
        packet.push(kind);
        packet.extend_from_slice(&psn.to_le_bytes());
        packet.extend_from_slice(body);
        self.queue_packet(Rc::new(packet));
    }

    /// The device's live region with this rkey, if it is in this queue pair's protection
    /// domain and allows `allowed` to peers.
    fn device_region(
        &self,
        rkey: u32,
        allowed: fn(RemoteAccess) -> bool,
    ) -> Option<Rc<RegionInner>> {
        self.device
            .upgrade()?
            .regions
            .borrow()
            .get(&rkey)
            .and_then(Weak::upgrade)
            .filter(|region| region.domain == self.domain && allowed(region.remote))
    }

    /// Handles a request packet as the responder. Returns false on a malformed packet.
    pub(super) fn on_request(&self, kind: u8, psn: u32, body: &[u8]) -> bool {
        if !matches!(
            self.state.get(),
            QpState::ReadyToReceive | QpState::ReadyToSend
        ) {
            return true;
        }
        if psn != self.expected_psn.get() {
            // Go-back-N: a packet after one refused with RNR; it comes again.
            return true;
        }
        match kind {
            PACKET_SEND => self.on_send(psn, body),
            PACKET_WRITE => self.on_write(psn, body),
            PACKET_READ_REQUEST => self.on_read_request(psn, body),
            _ => false,
        }
    }

    /// A send: its data goes into the oldest posted receive (RNR NAK when there is none; a
    /// length error, and the queue pair fails, when it does not fit). Returns false when
    /// malformed.
    fn on_send(&self, psn: u32, body: &[u8]) -> bool {
        let Some((imm, data)) = parse_imm(body) else {
            return false;
        };
        let Some(receive) = self.recv_queue.borrow_mut().pop_front() else {
            self.respond(PACKET_NAK, psn, &[NAK_RNR]);
            return true;
        };
        if data.len() > receive.len {
            self.cq.push(WorkCompletion {
                wr_id: receive.wr_id,
                status: WcStatus::LocalLengthError,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                imm_data: None,
            });
            self.respond(PACKET_NAK, psn, &[NAK_INVALID_REQUEST]);
            self.fail(None);
            return true;
        }
        receive.region.write(receive.offset, data);
        self.cq.push(WorkCompletion {
            wr_id: receive.wr_id,
            status: WcStatus::Success,
            opcode: WcOpcode::Recv,
            byte_len: data.len() as u32,
            imm_data: imm,
        });
        self.acknowledge(psn);
        true
    }

    /// An RDMA write: its data goes into the region it targets (remote-access NAK when the
    /// rkey or range is bad, or the region takes no remote write); with an immediate value it also consumes a posted receive (RNR
    /// NAK when there is none). Returns false when malformed.
    fn on_write(&self, psn: u32, body: &[u8]) -> bool {
        let Some((remote, rest)) = parse_remote(body) else {
            return false;
        };
        let Some((imm, data)) = parse_imm(rest) else {
            return false;
        };
        let target = self
            .device_region(remote.rkey, RemoteAccess::allows_write)
            .and_then(|r| r.offset_of(remote.addr, data.len()).map(|o| (r, o)));
        let Some((region, offset)) = target else {
            self.respond(PACKET_NAK, psn, &[NAK_REMOTE_ACCESS]);
            return true;
        };
        if let Some(imm) = imm {
            let Some(receive) = self.recv_queue.borrow_mut().pop_front() else {
                self.respond(PACKET_NAK, psn, &[NAK_RNR]);
                return true;
            };
            region.write(offset, data);
            self.cq.push(WorkCompletion {
                wr_id: receive.wr_id,
                status: WcStatus::Success,
                opcode: WcOpcode::RecvRdmaWithImm,
                byte_len: data.len() as u32,
                imm_data: Some(imm),
            });
        } else {
            region.write(offset, data);
        }
        self.acknowledge(psn);
        true
    }

    /// An RDMA read: answered with the bytes of the region it targets (remote-access NAK when
    /// the rkey or range is bad, or the region takes no remote read). Returns false when malformed.
    fn on_read_request(&self, psn: u32, body: &[u8]) -> bool {
        let Some((remote, rest)) = parse_remote(body) else {
            return false;
        };
        let Some(len) = rest
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return false;
        };
        let target = self
            .device_region(remote.rkey, RemoteAccess::allows_read)
            .and_then(|r| r.offset_of(remote.addr, len as usize).map(|o| (r, o)));
        let Some((region, offset)) = target else {
            self.respond(PACKET_NAK, psn, &[NAK_REMOTE_ACCESS]);
            return true;
        };
        let data = region.read(offset, len as usize);
        self.expected_psn.set(psn.wrapping_add(1));
        self.respond(PACKET_READ_RESPONSE, psn, &data);
        true
    }

    /// A request executed: the next PSN is expected, and this one is acknowledged.
    fn acknowledge(&self, psn: u32) {
        self.expected_psn.set(psn.wrapping_add(1));
        self.respond(PACKET_ACK, psn, &[]);
    }
}
