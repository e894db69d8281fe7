//! Raft messages between shards, many per frame.

use bytes::{BufMut, Bytes, BytesMut};

use super::reader::{Reader, WireError};

/// Raft messages for copysets on one destination shard, coalesced into one frame per flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftBatch {
    /// (copyset, encoded raftcore message).
    pub messages: Vec<(u64, Bytes)>,
}

/// The most messages one batch may carry.
pub const MAX_RAFT_BATCH: usize = 4096;

impl RaftBatch {
    /// Encodes: count u32, then per message copyset u64, length u32, bytes.
    pub fn encode(&self) -> Bytes {
        let len: usize = self.messages.iter().map(|(_, m)| 12 + m.len()).sum();
        let mut out = BytesMut::with_capacity(4 + len);
        out.put_u32_le(self.messages.len() as u32);
        for (copyset, message) in &self.messages {
            out.put_u64_le(*copyset);
            out.put_u32_le(message.len() as u32);
            out.put_slice(message);
        }
        out.freeze()
    }

    /// Decodes; each message is a slice of `bytes`.
    pub fn decode(bytes: &Bytes) -> Result<RaftBatch, WireError> {
        let mut reader = Reader::new(bytes, "raft batch");
        let count = reader.u32()? as usize;
        if count > MAX_RAFT_BATCH {
            return Err(WireError {
                what: "raft batch",
                why: "too many messages",
            });
        }
        let mut messages = Vec::with_capacity(count);
        for _ in 0..count {
            let copyset = reader.u64()?;
            let len = reader.u32()? as usize;
            let start = bytes.len() - reader.bytes.len();
            reader.take(len)?;
            messages.push((copyset, bytes.slice(start..start + len)));
        }
        reader.finish()?;
        Ok(RaftBatch { messages })
    }
}
