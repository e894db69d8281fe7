//! Placement's raft entries: the changes to the placement tables ([`super::tables`]) and the
//! volume table that the metadata copyset orders. Each travels as the body of one
//! `ChunkOp::Meta`, and every replica applies it with the pure `plan_*` functions, so racing
//! requests (two first writes of one segment, two pool creations) are decided once, in log
//! order.

use crate::ids::CopysetId;

use super::snapshots::MAX_SNAPSHOT_CHUNKS;
use super::tables::{PoolMember, PoolRequest};

/// One change to the placement tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOp {
    /// Plan the pool's copysets if the pool is empty (nothing happens when it exists).
    PoolCreate(PoolRequest),
    /// A pool copyset was created on all its nodes: chunks may go to it.
    CopysetReady {
        /// The copyset.
        copyset: CopysetId,
    },
    /// Add a volume striped over the pool.
    VolumeCreate {
        /// Its name.
        name: String,
        /// Its size in bytes.
        size: u64,
        /// Bytes per segment.
        segment_size: u64,
    },
    /// A pool copyset's voters changed (a move, a replacement): record them.
    CopysetPeers {
        /// The copyset.
        copyset: CopysetId,
        /// Its voters now.
        peers: Vec<u64>,
    },
    /// Pause or resume the scheduler (persisted: every service instance honours it).
    SchedulerPaused(bool),
    /// Record a chunkserver and its labels in the node table (nothing when it is there as it
    /// is).
    NodeRegister(PoolMember),
    /// Give a segment's chunks their copysets if it has none yet.
    SegmentAllocate {
        /// The volume's id.
        volume: u64,
        /// The segment's index.
        segment: u64,
    },
    /// Record snapshot `name` of a striped volume at its epoch, and raise the epoch
    /// (`super::snapshots::plan_create`).
    SnapshotCreate {
        /// The volume's id.
        volume: u64,
        /// The snapshot's name.
        name: String,
        /// Its creation time, milliseconds since the Unix epoch.
        created_ms: u64,
    },
    /// Record which chunks existed when the snapshot at `seq` fenced them: it is ready.
    SnapshotChunks {
        /// The volume's id.
        volume: u64,
        /// The snapshot's sequence number.
        seq: u64,
        /// Bit `i`: chunk `i` existed.
        existed: Vec<bool>,
    },
    /// Mark snapshot `name` as being deleted.
    SnapshotDeleting {
        /// The volume's id.
        volume: u64,
        /// The snapshot's name.
        name: String,
    },
    /// Remove snapshot `name` (marked as being deleted) from the table.
    SnapshotDrop {
        /// The volume's id.
        volume: u64,
        /// The snapshot's name.
        name: String,
    },
}

/// Why bytes are not a [`MetaOp`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("placement entry is malformed: {0}")]
pub struct MetaDecodeError(pub &'static str);

const POOL_CREATE: u8 = 1;
const COPYSET_READY: u8 = 2;
const VOLUME_CREATE: u8 = 3;
const SEGMENT_ALLOCATE: u8 = 4;
const NODE_REGISTER: u8 = 5;
const COPYSET_PEERS: u8 = 6;
const SCHEDULER_PAUSED: u8 = 7;
const SNAPSHOT_CREATE: u8 = 8;
const SNAPSHOT_CHUNKS: u8 = 9;
const SNAPSHOT_DELETING: u8 = 10;
const SNAPSHOT_DROP: u8 = 11;
/// The most voters a `CopysetPeers` carries.
const MAX_PEERS: usize = 16;
/// The most members a pool creation carries.
const MAX_MEMBERS: usize = 4096;

impl MetaOp {
    /// Encodes: a code byte, then the fields little-endian; strings as a length byte and
    /// UTF-8 (names and labels are at most 255 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            MetaOp::PoolCreate(request) => {
                out.push(POOL_CREATE);
                out.push(request.replicas);
                out.extend_from_slice(&request.copysets_per_node.to_le_bytes());
                out.extend_from_slice(&request.seed.to_le_bytes());
                let members = &request.members[..request.members.len().min(MAX_MEMBERS)];
                out.extend_from_slice(&(members.len() as u16).to_le_bytes());
                for member in members {
                    out.extend_from_slice(&member.node.to_le_bytes());
                    put_str(&mut out, &member.zone);
                    put_str(&mut out, &member.host);
                }
            }
            MetaOp::CopysetReady { copyset } => {
                out.push(COPYSET_READY);
                out.extend_from_slice(&copyset.0.to_le_bytes());
            }
            MetaOp::VolumeCreate {
                name,
                size,
                segment_size,
            } => {
                out.push(VOLUME_CREATE);
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&segment_size.to_le_bytes());
                put_str(&mut out, name);
            }
            MetaOp::CopysetPeers { copyset, peers } => {
                out.push(COPYSET_PEERS);
                out.extend_from_slice(&copyset.0.to_le_bytes());
                let peers = &peers[..peers.len().min(MAX_PEERS)];
                out.push(peers.len() as u8);
                for peer in peers {
                    out.extend_from_slice(&peer.to_le_bytes());
                }
            }
            MetaOp::SchedulerPaused(paused) => {
                out.push(SCHEDULER_PAUSED);
                out.push(u8::from(*paused));
            }
            MetaOp::NodeRegister(member) => {
                out.push(NODE_REGISTER);
                out.extend_from_slice(&member.node.to_le_bytes());
                put_str(&mut out, &member.zone);
                put_str(&mut out, &member.host);
            }
            MetaOp::SegmentAllocate { volume, segment } => {
                out.push(SEGMENT_ALLOCATE);
                out.extend_from_slice(&volume.to_le_bytes());
                out.extend_from_slice(&segment.to_le_bytes());
            }
            MetaOp::SnapshotCreate { .. }
            | MetaOp::SnapshotChunks { .. }
            | MetaOp::SnapshotDeleting { .. }
            | MetaOp::SnapshotDrop { .. } => self.encode_snapshot_op(&mut out),
        }
        out
    }

    /// Encodes a snapshot entry (`encode`'s part for them).
    fn encode_snapshot_op(&self, out: &mut Vec<u8>) {
        match self {
            MetaOp::SnapshotCreate {
                volume,
                name,
                created_ms,
            } => {
                out.push(SNAPSHOT_CREATE);
                out.extend_from_slice(&volume.to_le_bytes());
                out.extend_from_slice(&created_ms.to_le_bytes());
                put_str(out, name);
            }
            MetaOp::SnapshotChunks {
                volume,
                seq,
                existed,
            } => {
                out.push(SNAPSHOT_CHUNKS);
                out.extend_from_slice(&volume.to_le_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
                let existed = &existed[..existed.len().min(MAX_SNAPSHOT_CHUNKS as usize)];
                out.extend_from_slice(&(existed.len() as u64).to_le_bytes());
                let mut bits = vec![0u8; existed.len().div_ceil(8)];
                for (i, _) in existed.iter().enumerate().filter(|(_, e)| **e) {
                    bits[i / 8] |= 1 << (i % 8);
                }
                out.extend_from_slice(&bits);
            }
            MetaOp::SnapshotDeleting { volume, name } | MetaOp::SnapshotDrop { volume, name } => {
                out.push(if matches!(self, MetaOp::SnapshotDrop { .. }) {
                    SNAPSHOT_DROP
                } else {
                    SNAPSHOT_DELETING
                });
                out.extend_from_slice(&volume.to_le_bytes());
                put_str(out, name);
            }
            _ => {}
        }
    }

    /// Decodes, checking every length against the bytes there are.
    pub fn decode(bytes: &[u8]) -> Result<MetaOp, MetaDecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let op = match r.u8()? {
            POOL_CREATE => {
                let replicas = r.u8()?;
                let copysets_per_node = r.u32()?;
                let seed = r.u64()?;
                let count = usize::from(r.u16()?);
                if count > MAX_MEMBERS {
                    return Err(MetaDecodeError("too many pool members"));
                }
                let mut members = Vec::with_capacity(count);
                for _ in 0..count {
                    members.push(PoolMember {
                        node: r.u64()?,
                        zone: r.string()?,
                        host: r.string()?,
                    });
                }
                MetaOp::PoolCreate(PoolRequest {
                    replicas,
                    copysets_per_node,
                    members,
                    seed,
                })
            }
            COPYSET_READY => MetaOp::CopysetReady {
                copyset: CopysetId(r.u64()?),
            },
            VOLUME_CREATE => MetaOp::VolumeCreate {
                size: r.u64()?,
                segment_size: r.u64()?,
                name: r.string()?,
            },
            COPYSET_PEERS => {
                let copyset = CopysetId(r.u64()?);
                let count = usize::from(r.u8()?);
                if count > MAX_PEERS {
                    return Err(MetaDecodeError("too many voters"));
                }
                let mut peers = Vec::with_capacity(count);
                for _ in 0..count {
                    peers.push(r.u64()?);
                }
                MetaOp::CopysetPeers { copyset, peers }
            }
            SCHEDULER_PAUSED => match r.u8()? {
                0 => MetaOp::SchedulerPaused(false),
                1 => MetaOp::SchedulerPaused(true),
                _ => return Err(MetaDecodeError("a pause flag that is not 0 or 1")),
            },
            NODE_REGISTER => MetaOp::NodeRegister(PoolMember {
                node: r.u64()?,
                zone: r.string()?,
                host: r.string()?,
            }),
            SEGMENT_ALLOCATE => MetaOp::SegmentAllocate {
                volume: r.u64()?,
                segment: r.u64()?,
            },
            code @ (SNAPSHOT_CREATE | SNAPSHOT_CHUNKS | SNAPSHOT_DELETING | SNAPSHOT_DROP) => {
                decode_snapshot_op(code, &mut r)?
            }
            _ => return Err(MetaDecodeError("unknown placement entry code")),
        };
        if r.at != bytes.len() {
            return Err(MetaDecodeError("bytes after the entry"));
        }
        Ok(op)
    }
}

/// Decodes a snapshot entry whose code is `code` (`MetaOp::decode`'s part for them).
fn decode_snapshot_op(code: u8, r: &mut Reader<'_>) -> Result<MetaOp, MetaDecodeError> {
    Ok(match code {
        SNAPSHOT_CREATE => MetaOp::SnapshotCreate {
            volume: r.u64()?,
            created_ms: r.u64()?,
            name: r.string()?,
        },
        SNAPSHOT_CHUNKS => {
            let volume = r.u64()?;
            let seq = r.u64()?;
            let count = r.u64()?;
            if count > MAX_SNAPSHOT_CHUNKS {
                return Err(MetaDecodeError("a snapshot bitmap over the chunk limit"));
            }
            let mut existed = Vec::with_capacity(count as usize);
            let mut byte = 0u8;
            for i in 0..count as usize {
                if i % 8 == 0 {
                    byte = r.u8()?;
                }
                existed.push(byte & (1 << (i % 8)) != 0);
            }
            MetaOp::SnapshotChunks {
                volume,
                seq,
                existed,
            }
        }
        SNAPSHOT_DELETING => MetaOp::SnapshotDeleting {
            volume: r.u64()?,
            name: r.string()?,
        },
        SNAPSHOT_DROP => MetaOp::SnapshotDrop {
            volume: r.u64()?,
            name: r.string()?,
        },
        _ => return Err(MetaDecodeError("unknown placement entry code")),
    })
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&text.as_bytes()[..end]);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], MetaDecodeError> {
        let slice = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or(MetaDecodeError("shorter than its fields"))?;
        self.at += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, MetaDecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, MetaDecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, MetaDecodeError> {
        let mut word = [0u8; 4];
        word.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(word))
    }

    fn u64(&mut self) -> Result<u64, MetaDecodeError> {
        let mut word = [0u8; 8];
        word.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(word))
    }

    fn string(&mut self) -> Result<String, MetaDecodeError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| MetaDecodeError("a string that is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn entries_round_trip() {
        for op in [
            MetaOp::PoolCreate(PoolRequest {
                replicas: 3,
                copysets_per_node: 8,
                seed: 5,
                members: vec![
                    PoolMember {
                        node: 1,
                        zone: "z1".into(),
                        host: "h1".into(),
                    },
                    PoolMember {
                        node: 2,
                        zone: "z2".into(),
                        host: "ħ2".into(),
                    },
                ],
            }),
            MetaOp::CopysetReady {
                copyset: CopysetId(1 << 32),
            },
            MetaOp::VolumeCreate {
                name: "vol".into(),
                size: 8 << 30,
                segment_size: 1 << 30,
            },
            MetaOp::SegmentAllocate {
                volume: 512,
                segment: 7,
            },
            MetaOp::NodeRegister(PoolMember {
                node: 3,
                zone: "z3".into(),
                host: "h3".into(),
            }),
            MetaOp::CopysetPeers {
                copyset: CopysetId(1 << 32),
                peers: vec![4, 2, 3],
            },
            MetaOp::SchedulerPaused(true),
            MetaOp::SnapshotCreate {
                volume: 600,
                name: "snap".into(),
                created_ms: 1_800_000_000_000,
            },
            MetaOp::SnapshotChunks {
                volume: 600,
                seq: 3,
                existed: (0..21).map(|i| i % 4 == 1).collect(),
            },
            MetaOp::SnapshotDeleting {
                volume: 600,
                name: "snap".into(),
            },
            MetaOp::SnapshotDrop {
                volume: 600,
                name: "snap".into(),
            },
        ] {
            let bytes = op.encode();
            assert_eq!(MetaOp::decode(&bytes), Ok(op));
            for cut in 0..bytes.len() {
                assert!(MetaOp::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(MetaOp::decode(&longer).is_err());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_decode_or_fail_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let _ = MetaOp::decode(&bytes);
        }
    }
}
