//! Snapshot-install bodies: a copyset image's chunk list and its pieces.

use bytes::{BufMut, Bytes, BytesMut};

use super::reader::{Reader, WireError};
use crate::ids::ChunkId;

/// The answer to `LIST_CHUNK_IMAGE`: the source replica's applied index and the chunks of
/// the copyset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageList {
    /// The source's applied index: an image from it holds at least this state.
    pub applied: u64,
    /// The source's chunk size (a copy between shards of different geometry is refused).
    pub chunk_size: u64,
    /// The source shard's clone epoch: every piece carries it, and a copy during which it
    /// changed starts over.
    pub clone_epoch: u64,
    /// The chunks: plain ones in id order, then lazy clones in id order.
    pub chunks: Vec<ChunkId>,
}

impl ImageList {
    /// Encodes: applied u64, chunk size u64, clone epoch u64, count u32, chunk ids u64.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(28 + 8 * self.chunks.len());
        out.put_u64_le(self.applied);
        out.put_u64_le(self.chunk_size);
        out.put_u64_le(self.clone_epoch);
        out.put_u32_le(self.chunks.len() as u32);
        for chunk in &self.chunks {
            out.put_u64_le(chunk.0);
        }
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<ImageList, WireError> {
        let mut reader = Reader::new(bytes, "image list");
        let applied = reader.u64()?;
        let chunk_size = reader.u64()?;
        let clone_epoch = reader.u64()?;
        let count = reader.u32()? as usize;
        if count > bytes.len() / 8 {
            return Err(WireError {
                what: "image list",
                why: "count exceeds the body",
            });
        }
        let chunks = (0..count)
            .map(|_| reader.u64().map(ChunkId))
            .collect::<Result<Vec<_>, _>>()?;
        reader.finish()?;
        Ok(ImageList {
            applied,
            chunk_size,
            clone_epoch,
            chunks,
        })
    }
}

/// Asks for `len` bytes at `offset` of one part of a chunk's image (`len` 0: metadata only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadImagePiece {
    /// The chunk.
    pub chunk: ChunkId,
    /// 0: the current data, 1: the snapshot's.
    pub part: u8,
    /// Byte offset in the chunk.
    pub offset: u64,
    /// Bytes to read.
    pub len: u32,
}

impl ReadImagePiece {
    /// Encodes: chunk u64, part u8, offset u64, len u32.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(21);
        out.put_u64_le(self.chunk.0);
        out.put_u8(self.part);
        out.put_u64_le(self.offset);
        out.put_u32_le(self.len);
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<ReadImagePiece, WireError> {
        let mut reader = Reader::new(bytes, "image piece request");
        let request = ReadImagePiece {
            chunk: ChunkId(reader.u64()?),
            part: reader.u8()?,
            offset: reader.u64()?,
            len: reader.u32()?,
        };
        reader.finish()?;
        if request.part > 1 {
            return Err(WireError {
                what: "image piece request",
                why: "part is neither 0 nor 1",
            });
        }
        Ok(request)
    }
}

/// The head of a `READ_CHUNK_IMAGE` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagePieceHeader {
    /// The source's applied index when it read the piece.
    pub source_applied: u64,
    /// The chunk's sn.
    pub sn: u64,
    /// The chunk's corrected sn.
    pub corrected_sn: u64,
    /// The chunk's snapshot sn, if it has a snapshot.
    pub snapshot_sn: Option<u64>,
    /// The log index of the last entry applied to the chunk.
    pub applied: u64,
    /// For a lazy clone, its source chunk.
    pub clone_source: Option<ChunkId>,
    /// The source shard's clone epoch when it read the piece.
    pub clone_epoch: u64,
    /// The piece is all zeroes: no bytes follow.
    pub zero: bool,
}

/// Bytes of an encoded [`ImagePieceHeader`].
pub const IMAGE_PIECE_HEADER_LEN: usize = 8 * 7 + 3;

impl ImagePieceHeader {
    /// Encodes: source applied u64, sn u64, corrected sn u64, has snapshot u8, snapshot sn
    /// u64, applied u64, is clone u8, clone source u64, clone epoch u64, zero u8.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u64_le(self.source_applied);
        out.put_u64_le(self.sn);
        out.put_u64_le(self.corrected_sn);
        out.put_u8(u8::from(self.snapshot_sn.is_some()));
        out.put_u64_le(self.snapshot_sn.unwrap_or(0));
        out.put_u64_le(self.applied);
        out.put_u8(u8::from(self.clone_source.is_some()));
        out.put_u64_le(self.clone_source.map_or(0, |c| c.0));
        out.put_u64_le(self.clone_epoch);
        out.put_u8(u8::from(self.zero));
    }

    /// Decodes the header and returns the bytes after it.
    pub fn decode(bytes: &Bytes) -> Result<(ImagePieceHeader, Bytes), WireError> {
        let mut reader = Reader::new(bytes, "image piece");
        let source_applied = reader.u64()?;
        let sn = reader.u64()?;
        let corrected_sn = reader.u64()?;
        let has_snapshot = reader.u8()?;
        let snapshot_sn = reader.u64()?;
        let applied = reader.u64()?;
        let is_clone = reader.u8()?;
        let clone_source = reader.u64()?;
        let clone_epoch = reader.u64()?;
        let zero = reader.u8()?;
        if has_snapshot > 1 || zero > 1 || is_clone > 1 {
            return Err(WireError {
                what: "image piece",
                why: "a flag is neither 0 nor 1",
            });
        }
        let header = ImagePieceHeader {
            source_applied,
            sn,
            corrected_sn,
            snapshot_sn: (has_snapshot == 1).then_some(snapshot_sn),
            applied,
            clone_source: (is_clone == 1).then_some(ChunkId(clone_source)),
            clone_epoch,
            zero: zero == 1,
        };
        let data = bytes.slice(IMAGE_PIECE_HEADER_LEN..);
        if header.zero && !data.is_empty() {
            return Err(WireError {
                what: "image piece",
                why: "a zero piece carries bytes",
            });
        }
        Ok((header, data))
    }
}
