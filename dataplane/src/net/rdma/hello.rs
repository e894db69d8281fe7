//! The 64-byte hello each side sends over the out-of-band TCP connection at set-up.

use super::{HELLO_LEN, HELLO_MAGIC, PREFIX_LEN, RELEASED_MAX};
use crate::net::verbs::{QpEndpoint, RemoteAddress};
use crate::net::NetError;
use crate::protocol::frame::FRAME_HEADER_LEN;

/// What a side tells its peer at set-up.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hello {
    pub(super) endpoint: QpEndpoint,
    pub(super) recv_ring_depth: u16,
    pub(super) recv_buffer_size: u32,
    pub(super) landing_slots: u16,
    pub(super) landing_slot_size: u32,
    pub(super) landing: RemoteAddress,
}

impl Hello {
    pub(super) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        out[4] = 1;
        out[6..32].copy_from_slice(&self.endpoint.encode());
        out[32..34].copy_from_slice(&self.recv_ring_depth.to_le_bytes());
        out[34..38].copy_from_slice(&self.recv_buffer_size.to_le_bytes());
        out[38..40].copy_from_slice(&self.landing_slots.to_le_bytes());
        out[40..44].copy_from_slice(&self.landing_slot_size.to_le_bytes());
        out[44..52].copy_from_slice(&self.landing.addr.to_le_bytes());
        out[52..56].copy_from_slice(&self.landing.rkey.to_le_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Hello, NetError> {
        let bad = |reason: &str| NetError::Protocol {
            reason: format!("rdma hello: {reason}"),
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        if u32_at(0) != HELLO_MAGIC {
            return Err(bad("bad magic"));
        }
        if bytes[4] != 1 {
            return Err(bad(&format!("unsupported version {}", bytes[4])));
        }
        let endpoint = QpEndpoint::decode(&bytes[6..32]).ok_or_else(|| bad("queue pair"))?;
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[44..52]);
        let hello = Hello {
            endpoint,
            recv_ring_depth: u16_at(32),
            recv_buffer_size: u32_at(34),
            landing_slots: u16_at(38),
            landing_slot_size: u32_at(40),
            landing: RemoteAddress {
                addr: u64::from_le_bytes(addr),
                rkey: u32_at(52),
            },
        };
        if !(4..=4096).contains(&hello.recv_ring_depth)
            || (hello.recv_buffer_size as usize) < PREFIX_LEN + 2 * RELEASED_MAX + FRAME_HEADER_LEN
            || !(1..=1024).contains(&hello.landing_slots)
        {
            return Err(bad("ring or slot sizes out of range"));
        }
        Ok(hello)
    }
}
