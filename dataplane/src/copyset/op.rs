//! What a copyset's raft log carries: the chunk operations that change state, encoded once.
//! The client's request body for a mutating operation is exactly this encoding, so the buffer
//! that arrived from the network is the entry raft replicates and the WAL writes — no copy.
//!
//! Layout (little-endian): for writes, `len` bytes of data first, then a 26-byte trailer
//! `version u8 | op u8 | chunk u64 | sn u64 | offset u32 | len u32`. The data leads so that it
//! starts where the receive buffer starts — page-aligned, since the transports receive
//! payloads into aligned buffers — and the chunk write can hand it to the device as it is.

use bytes::{BufMut, Bytes, BytesMut};

use crate::ids::ChunkId;

/// Encoding version of operations.
pub const OP_VERSION: u8 = 1;
/// Bytes of the trailer after the data.
pub const OP_HEADER_LEN: usize = 26;

/// A state-changing chunk operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOp {
    /// Write `data` at `offset`; `sn` is the writer's sequence number (a newer one than the
    /// chunk's triggers copy-on-write of the old pages into the chunk's snapshot).
    Write {
        /// The chunk.
        chunk: ChunkId,
        /// Sequence number of the write.
        sn: u64,
        /// Byte offset within the chunk.
        offset: u32,
        /// The bytes (a slice of the entry: shared, not copied).
        data: Bytes,
    },
    /// Delete the chunk (its current data), as of sequence number `sn`.
    Delete {
        /// The chunk.
        chunk: ChunkId,
        /// Sequence number of the delete.
        sn: u64,
    },
    /// Delete the chunk's snapshot, or record `sn` as its corrected sequence number.
    DeleteSnapshotOrCorrectSn {
        /// The chunk.
        chunk: ChunkId,
        /// The corrected sequence number.
        sn: u64,
    },
    /// Raise the chunk's sequence number to `sn` — its current version becomes its snapshot,
    /// as a write with `sn` would make it, but nothing is written — so that a write of an older
    /// sequence number is refused from now on (a volume snapshot's fence). A chunk that does
    /// not exist is left so; one at `sn` or newer is unchanged.
    Fence {
        /// The chunk.
        chunk: ChunkId,
        /// The sequence number it takes.
        sn: u64,
    },
    /// Create `chunk` as a lazy clone of `source` (a chunk of the same copyset): it reads
    /// through to the source until its pages are written, pasted or recovered.
    CreateClone {
        /// The new chunk.
        chunk: ChunkId,
        /// The chunk it reads through to.
        source: ChunkId,
        /// The clone's sequence number.
        sn: u64,
    },
    /// Fill pages of a clone with `data` (from wherever the clone's data really lives), unless
    /// they were written since the clone was made.
    Paste {
        /// The clone.
        chunk: ChunkId,
        /// Byte offset within the chunk.
        offset: u32,
        /// The bytes.
        data: Bytes,
    },
    /// Copy a clone's unwritten pages in `offset..offset + len` from its source.
    Recover {
        /// The clone.
        chunk: ChunkId,
        /// Byte offset within the chunk.
        offset: u32,
        /// Bytes.
        len: u32,
    },
    /// Copy every unwritten page of a clone from its source; it is a plain chunk afterwards.
    Flatten {
        /// The clone.
        chunk: ChunkId,
    },
    /// Add a volume to the volume table held in `table` (`crate::volume_table`); refused when
    /// the name exists or the table is full.
    VolumeCreate {
        /// The table chunk.
        table: ChunkId,
        /// The copyset that will hold the volume's chunks.
        copyset: u64,
        /// Size in bytes.
        size: u64,
        /// Its name.
        name: String,
    },
    /// Remove a volume from the volume table held in `table`.
    VolumeDelete {
        /// The table chunk.
        table: ChunkId,
        /// Its name.
        name: String,
    },
    /// A change to the placement tables of the metadata copyset (pool, striped volumes,
    /// segments); it reads and writes several of its chunks, so it applies alone.
    Meta(crate::placement::meta::MetaOp),
    /// Take the crc32c of each page of `offset..offset + len` of the chunk as this replica
    /// holds it now (`crate::scrub`); changes nothing.
    Scrub {
        /// The chunk.
        chunk: ChunkId,
        /// Byte offset within the chunk.
        offset: u32,
        /// Bytes (at most `crate::scrub::MAX_PAGES` pages).
        len: u32,
    },
    /// Write `data` at `offset` only on a replica whose page there has the crc32c `bad` (a
    /// scrub's repair from the majority; a page written since the scrub is left alone).
    Repair {
        /// The chunk.
        chunk: ChunkId,
        /// Byte offset within the chunk.
        offset: u32,
        /// The majority's bytes.
        data: Bytes,
        /// The checksum of the page the bad replica holds.
        bad: u32,
    },
}

/// Why bytes are not an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpDecodeError {
    /// Shorter than the header, or the data length does not match.
    #[error("operation of {len} bytes is malformed: {why}")]
    Malformed {
        /// Length of what arrived.
        len: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// An encoding version this build does not know.
    #[error("operation version {0} is not supported (this build knows {OP_VERSION})")]
    Version(u8),
    /// An operation code this build does not know.
    #[error("unknown operation code {0}")]
    Unknown(u8),
}

const OP_WRITE: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_DELETE_SNAPSHOT: u8 = 3;
const OP_CREATE_CLONE: u8 = 4;
const OP_PASTE: u8 = 5;
const OP_RECOVER: u8 = 6;
const OP_FLATTEN: u8 = 7;
const OP_VOLUME_CREATE: u8 = 8;
const OP_VOLUME_DELETE: u8 = 9;
const OP_META: u8 = 10;
const OP_FENCE: u8 = 11;
const OP_SCRUB: u8 = 12;
const OP_REPAIR: u8 = 13;

impl ChunkOp {
    /// The chunk the operation touches: applies of one chunk run in log order.
    pub fn chunk(&self) -> ChunkId {
        match self {
            ChunkOp::Write { chunk, .. }
            | ChunkOp::Delete { chunk, .. }
            | ChunkOp::DeleteSnapshotOrCorrectSn { chunk, .. }
            | ChunkOp::Fence { chunk, .. }
            | ChunkOp::CreateClone { chunk, .. }
            | ChunkOp::Paste { chunk, .. }
            | ChunkOp::Recover { chunk, .. }
            | ChunkOp::Scrub { chunk, .. }
            | ChunkOp::Repair { chunk, .. }
            | ChunkOp::Flatten { chunk } => *chunk,
            ChunkOp::VolumeCreate { table, .. } | ChunkOp::VolumeDelete { table, .. } => *table,
            ChunkOp::Meta(_) => crate::volume_table::TABLE_CHUNK,
        }
    }

    /// Whether the operation's outcome depends on, or changes what another chunk may do — a
    /// clone reads its source, and a source refuses writes while clones of it exist — so that
    /// it must apply alone: after every earlier entry, before any later one.
    pub fn is_barrier(&self) -> bool {
        matches!(
            self,
            ChunkOp::Delete { .. }
                | ChunkOp::CreateClone { .. }
                | ChunkOp::Recover { .. }
                | ChunkOp::Flatten { .. }
                | ChunkOp::Meta(_)
        )
    }

    /// Encodes the operation (copies the data once; the client library builds requests this
    /// way, servers never re-encode).
    pub fn encode(&self) -> Bytes {
        let source_bytes;
        let volume_bytes;
        let (code, chunk, sn, offset, data, len) = match self {
            ChunkOp::Write {
                chunk,
                sn,
                offset,
                data,
            } => (OP_WRITE, chunk, *sn, *offset, &data[..], data.len() as u32),
            ChunkOp::Delete { chunk, sn } => (OP_DELETE, chunk, *sn, 0, &[][..], 0),
            ChunkOp::DeleteSnapshotOrCorrectSn { chunk, sn } => {
                (OP_DELETE_SNAPSHOT, chunk, *sn, 0, &[][..], 0)
            }
            ChunkOp::Fence { chunk, sn } => (OP_FENCE, chunk, *sn, 0, &[][..], 0),
            ChunkOp::CreateClone { chunk, source, sn } => {
                source_bytes = source.0.to_le_bytes();
                (OP_CREATE_CLONE, chunk, *sn, 0, &source_bytes[..], 8)
            }
            ChunkOp::Paste {
                chunk,
                offset,
                data,
            } => (OP_PASTE, chunk, 0, *offset, &data[..], data.len() as u32),
            // A recover carries no data: `len` is the range's length.
            ChunkOp::Recover { chunk, offset, len } => {
                (OP_RECOVER, chunk, 0, *offset, &[][..], *len)
            }
            ChunkOp::Flatten { chunk } => (OP_FLATTEN, chunk, 0, 0, &[][..], 0),
            // A scrub carries no data: `len` is the range's length, as for a recover.
            ChunkOp::Scrub { chunk, offset, len } => (OP_SCRUB, chunk, 0, *offset, &[][..], *len),
            // A repair's `sn` field carries the bad checksum.
            ChunkOp::Repair {
                chunk,
                offset,
                data,
                bad,
            } => (
                OP_REPAIR,
                chunk,
                u64::from(*bad),
                *offset,
                &data[..],
                data.len() as u32,
            ),
            // The data: the copyset u64, then the name.
            ChunkOp::VolumeCreate {
                table,
                copyset,
                size,
                name,
            } => {
                let mut bytes = copyset.to_le_bytes().to_vec();
                bytes.extend_from_slice(name.as_bytes());
                volume_bytes = bytes;
                let len = volume_bytes.len() as u32;
                (OP_VOLUME_CREATE, table, *size, 0, &volume_bytes[..], len)
            }
            ChunkOp::VolumeDelete { table, name } => {
                let len = name.len() as u32;
                (OP_VOLUME_DELETE, table, 0, 0, name.as_bytes(), len)
            }
            ChunkOp::Meta(op) => {
                volume_bytes = op.encode();
                let len = volume_bytes.len() as u32;
                let table = &crate::volume_table::TABLE_CHUNK;
                (OP_META, table, 0, 0, &volume_bytes[..], len)
            }
        };
        let mut out = BytesMut::with_capacity(OP_HEADER_LEN + data.len());
        out.put_slice(data);
        out.put_u8(OP_VERSION);
        out.put_u8(code);
        out.put_u64_le(chunk.0);
        out.put_u64_le(sn);
        out.put_u32_le(offset);
        out.put_u32_le(len);
        out.freeze()
    }

    /// Decodes an operation; the data of a write is a slice of `bytes`, not a copy.
    pub fn decode(bytes: &Bytes) -> Result<ChunkOp, OpDecodeError> {
        let raw = Raw::read(bytes)?;
        if raw.code == OP_RECOVER {
            return raw.recover();
        }
        if raw.code == OP_SCRUB {
            return raw.scrub();
        }
        if raw.data_len != raw.len {
            return Err(raw.malformed("the data length does not match the trailer"));
        }
        match raw.code {
            OP_WRITE => Ok(raw.write()),
            OP_PASTE => Ok(raw.paste()),
            OP_REPAIR => raw.repair(),
            OP_CREATE_CLONE => raw.create_clone(),
            OP_VOLUME_CREATE => raw.volume_create(),
            OP_VOLUME_DELETE => raw.volume_delete(),
            OP_META => crate::placement::meta::MetaOp::decode(&raw.bytes[..raw.data_len])
                .map(ChunkOp::Meta)
                .map_err(|e| raw.malformed(e.0)),
            OP_DELETE | OP_DELETE_SNAPSHOT | OP_FENCE | OP_FLATTEN if raw.len != 0 => {
                Err(raw.malformed("data on an operation that takes none"))
            }
            OP_DELETE => Ok(ChunkOp::Delete {
                chunk: raw.chunk,
                sn: raw.sn,
            }),
            OP_DELETE_SNAPSHOT => Ok(ChunkOp::DeleteSnapshotOrCorrectSn {
                chunk: raw.chunk,
                sn: raw.sn,
            }),
            OP_FENCE => Ok(ChunkOp::Fence {
                chunk: raw.chunk,
                sn: raw.sn,
            }),
            OP_FLATTEN => Ok(ChunkOp::Flatten { chunk: raw.chunk }),
            code => Err(OpDecodeError::Unknown(code)),
        }
    }
}

/// An encoded operation with its trailer read: what each kind's decoder starts from.
struct Raw<'a> {
    /// The whole encoding.
    bytes: &'a Bytes,
    /// Bytes before the trailer.
    data_len: usize,
    code: u8,
    chunk: ChunkId,
    sn: u64,
    offset: u32,
    /// The trailer's `len` field.
    len: usize,
}

impl<'a> Raw<'a> {
    /// Reads the trailer at the end of `bytes`, after checking there is one of a known
    /// version.
    fn read(bytes: &'a Bytes) -> Result<Raw<'a>, OpDecodeError> {
        let data_len = bytes
            .len()
            .checked_sub(OP_HEADER_LEN)
            .ok_or_else(|| malformed(bytes, "shorter than the trailer"))?;
        let header = &bytes[data_len..];
        if header[0] != OP_VERSION {
            return Err(OpDecodeError::Version(header[0]));
        }
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let u32_at = |at: usize| {
            let mut word = [0u8; 4];
            word.copy_from_slice(&header[at..at + 4]);
            u32::from_le_bytes(word)
        };
        Ok(Raw {
            bytes,
            data_len,
            chunk: ChunkId(u64_at(2)),
            sn: u64_at(10),
            offset: u32_at(18),
            len: u32_at(22) as usize,
            code: header[1],
        })
    }

    /// The error for this encoding, malformed because of `why`.
    fn malformed(&self, why: &'static str) -> OpDecodeError {
        malformed(self.bytes, why)
    }

    /// The data before the trailer, as a slice of the encoding (not a copy).
    fn data(&self) -> Bytes {
        self.bytes.slice(..self.data_len)
    }

    /// A recover: no data, `len` is the range's length.
    fn recover(&self) -> Result<ChunkOp, OpDecodeError> {
        if self.data_len != 0 {
            return Err(self.malformed("data on a recover"));
        }
        Ok(ChunkOp::Recover {
            chunk: self.chunk,
            offset: self.offset,
            len: self.len as u32,
        })
    }

    /// A scrub: no data, `len` is the range's, of at most `crate::scrub::MAX_PAGES` pages.
    fn scrub(&self) -> Result<ChunkOp, OpDecodeError> {
        if self.data_len != 0 {
            return Err(self.malformed("data on a scrub"));
        }
        if self.len > crate::scrub::MAX_PAGES * 512 {
            return Err(self.malformed("a scrub range over its bound"));
        }
        Ok(ChunkOp::Scrub {
            chunk: self.chunk,
            offset: self.offset,
            len: self.len as u32,
        })
    }

    /// A repair: the data is the page, the `sn` field its bad checksum.
    fn repair(&self) -> Result<ChunkOp, OpDecodeError> {
        let bad =
            u32::try_from(self.sn).map_err(|_| self.malformed("a repair's checksum is 32 bits"))?;
        Ok(ChunkOp::Repair {
            chunk: self.chunk,
            offset: self.offset,
            data: self.data(),
            bad,
        })
    }

    /// A write: the data is what to write.
    fn write(&self) -> ChunkOp {
        ChunkOp::Write {
            chunk: self.chunk,
            sn: self.sn,
            offset: self.offset,
            data: self.data(),
        }
    }

    /// A paste: the data is what to paste.
    fn paste(&self) -> ChunkOp {
        ChunkOp::Paste {
            chunk: self.chunk,
            offset: self.offset,
            data: self.data(),
        }
    }

    /// A clone's creation: the data is the source chunk id.
    fn create_clone(&self) -> Result<ChunkOp, OpDecodeError> {
        let source = self
            .bytes
            .get(..8)
            .filter(|_| self.data_len == 8)
            .ok_or_else(|| self.malformed("a clone's body is its source chunk id"))?;
        let mut word = [0u8; 8];
        word.copy_from_slice(source);
        Ok(ChunkOp::CreateClone {
            chunk: self.chunk,
            source: ChunkId(u64::from_le_bytes(word)),
            sn: self.sn,
        })
    }

    /// A volume's creation: the data is the copyset u64, then the name; `sn` is the size.
    fn volume_create(&self) -> Result<ChunkOp, OpDecodeError> {
        let body = &self.bytes[..self.data_len];
        let (copyset, name) = body
            .split_first_chunk::<8>()
            .ok_or_else(|| self.malformed("a volume creation's body is a copyset and a name"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| self.malformed("a volume name that is not UTF-8"))?;
        Ok(ChunkOp::VolumeCreate {
            table: self.chunk,
            copyset: u64::from_le_bytes(*copyset),
            size: self.sn,
            name: name.to_string(),
        })
    }

    /// A volume's deletion: the data is the name.
    fn volume_delete(&self) -> Result<ChunkOp, OpDecodeError> {
        let name = std::str::from_utf8(&self.bytes[..self.data_len])
            .map_err(|_| self.malformed("a volume name that is not UTF-8"))?;
        Ok(ChunkOp::VolumeDelete {
            table: self.chunk,
            name: name.to_string(),
        })
    }
}

/// The error for `bytes`, malformed because of `why`.
fn malformed(bytes: &Bytes, why: &'static str) -> OpDecodeError {
    OpDecodeError::Malformed {
        len: bytes.len(),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn operations_round_trip_and_write_data_is_not_copied() {
        let op = ChunkOp::Write {
            chunk: ChunkId(9),
            sn: 3,
            offset: 8192,
            data: Bytes::from_static(&[7; 4096]),
        };
        let bytes = op.encode();
        let decoded = ChunkOp::decode(&bytes).unwrap();
        assert_eq!(decoded, op);
        let ChunkOp::Write { data, .. } = decoded else {
            unreachable!()
        };
        assert_eq!(
            data.as_ptr(),
            bytes.as_ptr(),
            "a slice at the start of the body, not a copy"
        );
        for op in [
            ChunkOp::Delete {
                chunk: ChunkId(1),
                sn: 2,
            },
            ChunkOp::DeleteSnapshotOrCorrectSn {
                chunk: ChunkId(3),
                sn: 4,
            },
            ChunkOp::Fence {
                chunk: ChunkId(3),
                sn: 5,
            },
            ChunkOp::Scrub {
                chunk: ChunkId(3),
                offset: 1 << 20,
                len: 1 << 20,
            },
            ChunkOp::Repair {
                chunk: ChunkId(3),
                offset: 4096,
                data: Bytes::from_static(&[7; 4096]),
                bad: 0xfeed_beef,
            },
            ChunkOp::CreateClone {
                chunk: ChunkId(5),
                source: ChunkId(6),
                sn: 2,
            },
            ChunkOp::Paste {
                chunk: ChunkId(5),
                offset: 4096,
                data: Bytes::from_static(&[9; 8192]),
            },
            ChunkOp::Recover {
                chunk: ChunkId(5),
                offset: 8192,
                len: 1 << 20,
            },
            ChunkOp::Flatten { chunk: ChunkId(5) },
            ChunkOp::VolumeCreate {
                table: ChunkId(7),
                copyset: 3,
                size: 1 << 30,
                name: "vol0".into(),
            },
            ChunkOp::VolumeDelete {
                table: ChunkId(7),
                name: "vol0".into(),
            },
            ChunkOp::Meta(crate::placement::meta::MetaOp::SegmentAllocate {
                volume: 512,
                segment: 3,
            }),
        ] {
            assert_eq!(ChunkOp::decode(&op.encode()).unwrap(), op);
        }
    }

    #[test]
    fn malformed_operations_are_errors() {
        let good = ChunkOp::Delete {
            chunk: ChunkId(1),
            sn: 2,
        }
        .encode();
        assert!(ChunkOp::decode(&good.slice(..10)).is_err());
        let mut bad_version = BytesMut::from(&good[..]);
        bad_version[0] = 9; // a delete has no data: the trailer is the whole body
        assert_eq!(
            ChunkOp::decode(&bad_version.freeze()),
            Err(OpDecodeError::Version(9))
        );
        let mut bad_code = BytesMut::from(&good[..]);
        bad_code[1] = 77;
        assert_eq!(
            ChunkOp::decode(&bad_code.freeze()),
            Err(OpDecodeError::Unknown(77))
        );
        let mut long = BytesMut::new();
        long.put_u8(0);
        long.put_slice(&good);
        assert!(ChunkOp::decode(&long.freeze()).is_err(), "data on a delete");
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = ChunkOp::decode(&Bytes::from(bytes));
        }
    }
}
