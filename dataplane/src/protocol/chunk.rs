//! Chunk service bodies that are not a raft entry: reads of a chunk and of a chunk's version.
//! (A mutating chunk request's body is its [`crate::copyset::ChunkOp`] encoding.)

use bytes::{BufMut, Bytes, BytesMut};

use super::reader::{Reader, WireError};
use crate::ids::ChunkId;

/// A read of `len` bytes at `offset` of `chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadChunk {
    /// The chunk.
    pub chunk: ChunkId,
    /// Byte offset in the chunk.
    pub offset: u64,
    /// Bytes to read.
    pub len: u32,
}

impl ReadChunk {
    /// Encodes: chunk u64, offset u64, len u32.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(20);
        out.put_u64_le(self.chunk.0);
        out.put_u64_le(self.offset);
        out.put_u32_le(self.len);
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<ReadChunk, WireError> {
        let mut reader = Reader::new(bytes, "read request");
        let request = ReadChunk {
            chunk: ChunkId(reader.u64()?),
            offset: reader.u64()?,
            len: reader.u32()?,
        };
        reader.finish()?;
        Ok(request)
    }
}

/// A read of `len` bytes at `offset` of the version of `chunk` with sequence number `sn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSnapshot {
    /// The chunk.
    pub chunk: ChunkId,
    /// The version's sequence number.
    pub sn: u64,
    /// Byte offset in the chunk.
    pub offset: u64,
    /// Bytes to read.
    pub len: u32,
}

impl ReadSnapshot {
    /// Encodes: chunk u64, sn u64, offset u64, len u32.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(28);
        out.put_u64_le(self.chunk.0);
        out.put_u64_le(self.sn);
        out.put_u64_le(self.offset);
        out.put_u32_le(self.len);
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<ReadSnapshot, WireError> {
        let mut reader = Reader::new(bytes, "read snapshot request");
        let request = ReadSnapshot {
            chunk: ChunkId(reader.u64()?),
            sn: reader.u64()?,
            offset: reader.u64()?,
            len: reader.u32()?,
        };
        reader.finish()?;
        Ok(request)
    }
}
