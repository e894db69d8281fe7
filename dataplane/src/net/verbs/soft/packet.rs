//! The softverbs wire format: every packet is a 4-byte length, a kind byte, a 4-byte PSN and
//! a body; requests (send, write, read request) carry the operation's data, responses (ack,
//! NAK, read response) answer one PSN.

use super::state::PostedSend;
use crate::net::verbs::{RemoteAddress, SendOp};

pub(super) const PACKET_SEND: u8 = 1;
pub(super) const PACKET_WRITE: u8 = 2;
pub(super) const PACKET_READ_REQUEST: u8 = 3;
pub(super) const PACKET_ACK: u8 = 4;
pub(super) const PACKET_NAK: u8 = 5;
pub(super) const PACKET_READ_RESPONSE: u8 = 6;

pub(super) const NAK_RNR: u8 = 1;
pub(super) const NAK_REMOTE_ACCESS: u8 = 2;
pub(super) const NAK_INVALID_REQUEST: u8 = 3;

/// Splits a body into its immediate value (if it carries one) and its data.
pub(super) fn parse_imm(body: &[u8]) -> Option<(Option<u32>, &[u8])> {
    let has_imm = *body.first()?;
    let imm = u32::from_le_bytes(body.get(1..5)?.try_into().ok()?);
    let data = body.get(5..)?;
    Some(((has_imm == 1).then_some(imm), data))
}

/// Splits a body into the remote address it targets and the rest.
pub(super) fn parse_remote(body: &[u8]) -> Option<(RemoteAddress, &[u8])> {
    let addr = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let rkey = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    Some((RemoteAddress { addr, rkey }, body.get(12..)?))
}

/// The packet that transmits `send` with sequence number `psn`.
pub(super) fn encode_request(psn: u32, send: &PostedSend) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + send.data.len());
    let kind;
    let put_imm = |body: &mut Vec<u8>, imm: Option<u32>| {
        body.push(u8::from(imm.is_some()));
        body.extend_from_slice(&imm.unwrap_or(0).to_le_bytes());
    };
    let put_remote = |body: &mut Vec<u8>, remote: RemoteAddress| {
        body.extend_from_slice(&remote.addr.to_le_bytes());
        body.extend_from_slice(&remote.rkey.to_le_bytes());
    };
    match send.op {
        SendOp::Send => {
            kind = PACKET_SEND;
            put_imm(&mut body, None);
            body.extend_from_slice(&send.data);
        }
        SendOp::SendWithImm(imm) => {
            kind = PACKET_SEND;
            put_imm(&mut body, Some(imm));
            body.extend_from_slice(&send.data);
        }
        SendOp::Write(remote) => {
            kind = PACKET_WRITE;
            put_remote(&mut body, remote);
            put_imm(&mut body, None);
            body.extend_from_slice(&send.data);
        }
        SendOp::WriteWithImm(remote, imm) => {
            kind = PACKET_WRITE;
            put_remote(&mut body, remote);
            put_imm(&mut body, Some(imm));
            body.extend_from_slice(&send.data);
        }
        SendOp::Read(remote) => {
            kind = PACKET_READ_REQUEST;
            put_remote(&mut body, remote);
            let len = send.read_target.as_ref().map(|t| t.2).unwrap_or(0) as u32;
            body.extend_from_slice(&len.to_le_bytes());
        }
    }
    let mut packet = Vec::with_capacity(9 + body.len());
    packet.extend_from_slice(&((5 + body.len()) as u32).to_le_bytes());
    packet.push(kind);
    packet.extend_from_slice(&psn.to_le_bytes());
    packet.extend_from_slice(&body);
    packet
}
