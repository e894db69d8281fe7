//! The chunk and copyset services on the frame protocol: opcodes, request bodies and the
//! response envelope. The frame header carries the copyset id; bodies are little-endian with
//! explicit sizes, and every decoder rejects malformed input with an error.
//!
//! A mutating chunk request's body is a [`ChunkOp`] encoding, so the received buffer is the
//! raft entry as it is.
//!
//! [`ChunkOp`]: crate::copyset::ChunkOp

use bytes::{BufMut, Bytes, BytesMut};
use raftcore::NodeId;

use crate::ids::ChunkId;
use crate::net::Opcode;

/// Raft messages between shards: one-way, many per frame (see [`RaftBatch`]).
pub const RAFT: Opcode = Opcode(16);
/// Write part of a chunk (body: `ChunkOp::Write`).
pub const WRITE_CHUNK: Opcode = Opcode(17);
/// Read part of a chunk (body: [`ReadChunk`]).
pub const READ_CHUNK: Opcode = Opcode(18);
/// Delete a chunk (body: `ChunkOp::Delete`).
pub const DELETE_CHUNK: Opcode = Opcode(19);
/// A chunk's sizes and sequence numbers (body: chunk id u64).
pub const GET_CHUNK_INFO: Opcode = Opcode(20);
/// Read part of a chunk's version with a given sn: its snapshot, or the chunk itself (body:
/// [`ReadSnapshot`]).
pub const READ_SNAPSHOT: Opcode = Opcode(21);
/// Delete a chunk's snapshot or correct its sn (body: `ChunkOp::DeleteSnapshotOrCorrectSn`).
pub const DELETE_SNAPSHOT_OR_CORRECT_SN: Opcode = Opcode(22);
/// Create a lazy clone of a chunk of the same copyset (body: `ChunkOp::CreateClone`).
pub const CREATE_CLONE_CHUNK: Opcode = Opcode(23);
/// Fill unwritten pages of a clone (body: `ChunkOp::Paste`).
pub const PASTE_CHUNK: Opcode = Opcode(24);
/// Copy unwritten pages of a clone from its source (body: `ChunkOp::Recover`).
pub const RECOVER_CHUNK: Opcode = Opcode(25);
/// Make a clone a plain chunk (body: `ChunkOp::Flatten`).
pub const FLATTEN_CHUNK: Opcode = Opcode(26);
/// Add a volume to the volume table (to the metadata copyset; body: `ChunkOp::VolumeCreate`).
pub const CREATE_VOLUME: Opcode = Opcode(40);
/// Remove a volume from the volume table (body: `ChunkOp::VolumeDelete`).
pub const DELETE_VOLUME: Opcode = Opcode(41);

/// The opcode whose body a chunk operation is.
pub fn opcode_of(op: &crate::copyset::ChunkOp) -> Opcode {
    use crate::copyset::ChunkOp;
    match op {
        ChunkOp::Write { .. } => WRITE_CHUNK,
        ChunkOp::Delete { .. } => DELETE_CHUNK,
        ChunkOp::DeleteSnapshotOrCorrectSn { .. } => DELETE_SNAPSHOT_OR_CORRECT_SN,
        ChunkOp::CreateClone { .. } => CREATE_CLONE_CHUNK,
        ChunkOp::Paste { .. } => PASTE_CHUNK,
        ChunkOp::Recover { .. } => RECOVER_CHUNK,
        ChunkOp::Flatten { .. } => FLATTEN_CHUNK,
        ChunkOp::VolumeCreate { .. } => CREATE_VOLUME,
        ChunkOp::VolumeDelete { .. } => DELETE_VOLUME,
    }
}
/// Create a copyset with its initial peers (body: [`CreateCopyset`]).
pub const CREATE_COPYSET: Opcode = Opcode(32);
/// A copyset's raft status (empty body).
pub const COPYSET_STATUS: Opcode = Opcode(33);
/// The copysets of the shard that receives it (empty body; answer: count u32, ids u64).
pub const LIST_COPYSETS: Opcode = Opcode(34);
/// Ask the leader to hand leadership to a voter (body: node id u64).
pub const TRANSFER_LEADER: Opcode = Opcode(35);
/// Changes a copyset's membership (CliService): the body is a raftcore `ConfChange`
/// encoding; answered with the resulting [`Membership`] once the change is applied on the
/// leader (for a change of several voters, once its joint configuration is left).
pub const CHANGE_PEERS: Opcode = Opcode(36);
/// Deletes the receiving node's replica of a copyset, its chunks with it (empty body). Meant
/// for a replica already removed from the membership.
pub const DELETE_COPYSET: Opcode = Opcode(37);
/// Disaster recovery (CliService reset peers): forces the receiving replica's membership to
/// the given voters without consensus, for a copyset that lost its quorum for good (body:
/// [`ResetPeers`]).
pub const RESET_PEERS: Opcode = Opcode(38);
/// A copyset's image, first step (peers only, empty body): the answer is the replica's
/// applied index and the chunks its log wrote ([`ImageList`]).
pub const LIST_CHUNK_IMAGE: Opcode = Opcode(48);
/// A copyset's image, one piece of one chunk (peers only; body: [`ReadImagePiece`];
/// answer: [`ImagePieceHeader`], then the bytes unless the piece is all zeroes).
pub const READ_CHUNK_IMAGE: Opcode = Opcode(49);

/// Encodes a list of copyset ids: count u32, then each id u64.
pub fn encode_copyset_list(ids: &[u64]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + 8 * ids.len());
    out.put_u32_le(ids.len() as u32);
    for id in ids {
        out.put_u64_le(*id);
    }
    out.freeze()
}

/// Decodes a list of copyset ids.
pub fn decode_copyset_list(bytes: &[u8]) -> Result<Vec<u64>, WireError> {
    let mut reader = Reader::new(bytes, "copyset list");
    let count = reader.u32()? as usize;
    if count > bytes.len() / 8 {
        return Err(WireError {
            what: "copyset list",
            why: "count exceeds the body",
        });
    }
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.push(reader.u64()?);
    }
    reader.finish()?;
    Ok(ids)
}

/// A short name of a service opcode, for metrics and logs.
pub fn opcode_name(opcode: Opcode) -> &'static str {
    match opcode {
        RAFT => "raft",
        WRITE_CHUNK => "write",
        READ_CHUNK => "read",
        DELETE_CHUNK => "delete",
        GET_CHUNK_INFO => "chunk_info",
        READ_SNAPSHOT => "read_snapshot",
        DELETE_SNAPSHOT_OR_CORRECT_SN => "delete_snapshot_or_correct_sn",
        CREATE_CLONE_CHUNK => "create_clone_chunk",
        PASTE_CHUNK => "paste_chunk",
        RECOVER_CHUNK => "recover_chunk",
        FLATTEN_CHUNK => "flatten_chunk",
        CREATE_VOLUME => "create_volume",
        DELETE_VOLUME => "delete_volume",
        CREATE_COPYSET => "create_copyset",
        COPYSET_STATUS => "copyset_status",
        LIST_COPYSETS => "list_copysets",
        TRANSFER_LEADER => "transfer_leader",
        CHANGE_PEERS => "change_peers",
        DELETE_COPYSET => "delete_copyset",
        RESET_PEERS => "reset_peers",
        LIST_CHUNK_IMAGE => "list_chunk_image",
        READ_CHUNK_IMAGE => "read_chunk_image",
        _ => "unknown",
    }
}

/// Why a body is not what its opcode needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct WireError {
    /// Which message.
    pub what: &'static str,
    /// What is wrong.
    pub why: &'static str,
}

/// A little-endian reader that fails instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < n {
            return Err(WireError {
                what: self.what,
                why: "too short",
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(b);
        Ok(u64::from_le_bytes(word))
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn ids(&mut self) -> Result<Vec<u64>, WireError> {
        let count = self.u16()? as usize;
        if count > MAX_PEERS {
            return Err(WireError {
                what: self.what,
                why: "too many node ids",
            });
        }
        (0..count).map(|_| self.u64()).collect()
    }

    fn finish(self) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(WireError {
                what: self.what,
                why: "trailing bytes",
            })
        }
    }
}

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

/// The voters a `RESET_PEERS` forces on a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetPeers {
    /// The new voters (1 to [`MAX_PEERS`], none 0).
    pub peers: Vec<NodeId>,
}

impl ResetPeers {
    /// Encodes: count u16, then node ids u64.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(2 + 8 * self.peers.len());
        out.put_u16_le(self.peers.len() as u16);
        for peer in &self.peers {
            out.put_u64_le(peer.0);
        }
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<ResetPeers, WireError> {
        let mut reader = Reader::new(bytes, "reset peers");
        let ids = reader.ids()?;
        reader.finish()?;
        if ids.is_empty() || ids.contains(&0) {
            return Err(WireError {
                what: "reset peers",
                why: "no voters, or node id 0",
            });
        }
        Ok(ResetPeers {
            peers: ids.into_iter().map(NodeId).collect(),
        })
    }
}

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

/// Creates a copyset on this node with its initial voters (this node among them, unless
/// `join`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateCopyset {
    /// The initial voters.
    pub peers: Vec<NodeId>,
    /// The replica joins an existing copyset: `peers` is the copyset's *original* voter list
    /// (not including this node), so this replica starts from the same bootstrap snapshot
    /// (index 1) and takes the leader's log from index 2; a peer change then adds it.
    pub join: bool,
}

/// The most peers a copyset may start with.
pub const MAX_PEERS: usize = 16;

impl CreateCopyset {
    /// Encodes: count u16, then node ids u64, then (only when joining) a u8 1.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(3 + 8 * self.peers.len());
        out.put_u16_le(self.peers.len() as u16);
        for peer in &self.peers {
            out.put_u64_le(peer.0);
        }
        if self.join {
            out.put_u8(1);
        }
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<CreateCopyset, WireError> {
        let mut reader = Reader::new(bytes, "create copyset");
        let count = reader.u16()? as usize;
        if count > MAX_PEERS {
            return Err(WireError {
                what: "create copyset",
                why: "peer count out of range",
            });
        }
        let mut peers = Vec::with_capacity(count);
        for _ in 0..count {
            let id = reader.u64()?;
            if id == 0 {
                return Err(WireError {
                    what: "create copyset",
                    why: "peer id 0",
                });
            }
            peers.push(NodeId(id));
        }
        let join = if reader.is_empty() {
            false
        } else {
            match reader.u8()? {
                0 => false,
                1 => true,
                _ => {
                    return Err(WireError {
                        what: "create copyset",
                        why: "join flag is neither 0 nor 1",
                    })
                }
            }
        };
        reader.finish()?;
        if peers.is_empty() && !join {
            // Only a joining replica may start without voters: it learns the membership
            // from the leader's snapshot.
            return Err(WireError {
                what: "create copyset",
                why: "no peers",
            });
        }
        Ok(CreateCopyset { peers, join })
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Done; the body follows.
    Ok,
    /// This replica does not lead the copyset; `leader` does (0: unknown yet).
    Redirect {
        /// The leader's node id, or 0.
        leader: u64,
    },
    /// No such copyset on this node.
    CopysetNotFound,
    /// No such chunk.
    ChunkNotFound,
    /// The request is malformed or out of range; nothing changed.
    Invalid(String),
    /// The write's sequence number is older than the chunk's.
    BackwardSn,
    /// Not carried out (a leader change replaced it, or the node is overloaded); retry.
    Retry(String),
    /// The device failed.
    Io(String),
}

impl Status {
    /// A short name, for metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Redirect { .. } => "redirect",
            Status::CopysetNotFound => "copyset_not_found",
            Status::ChunkNotFound => "chunk_not_found",
            Status::Invalid(_) => "invalid",
            Status::BackwardSn => "backward_sn",
            Status::Retry(_) => "retry",
            Status::Io(_) => "io_error",
        }
    }

    fn code(&self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Redirect { .. } => 1,
            Status::CopysetNotFound => 2,
            Status::ChunkNotFound => 3,
            Status::Invalid(_) => 4,
            Status::BackwardSn => 5,
            Status::Retry(_) => 6,
            Status::Io(_) => 7,
        }
    }
}

/// A response body: status u8, then for `Redirect` the leader u64, for statuses with a
/// message its length u16 and UTF-8 bytes, for `Ok` the operation's result.
pub fn encode_response(status: &Status, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(1 + 8 + body.len());
    out.put_u8(status.code());
    match status {
        Status::Ok => out.put_slice(body),
        Status::Redirect { leader } => out.put_u64_le(*leader),
        Status::Invalid(message) | Status::Retry(message) | Status::Io(message) => {
            let message = &message.as_bytes()[..message.len().min(1024)];
            out.put_u16_le(message.len() as u16);
            out.put_slice(message);
        }
        Status::CopysetNotFound | Status::ChunkNotFound | Status::BackwardSn => {}
    }
    out.freeze()
}

/// Decodes a response into its status and, for `Ok`, its body (a slice, not a copy).
pub fn decode_response(bytes: &Bytes) -> Result<(Status, Bytes), WireError> {
    let mut reader = Reader::new(bytes, "response");
    let code = reader.u8()?;
    let message = |reader: &mut Reader<'_>| -> Result<String, WireError> {
        let len = reader.u16()? as usize;
        let text = reader.take(len)?;
        Ok(String::from_utf8_lossy(text).into_owned())
    };
    let status = match code {
        0 => return Ok((Status::Ok, bytes.slice(1..))),
        1 => Status::Redirect {
            leader: reader.u64()?,
        },
        2 => Status::CopysetNotFound,
        3 => Status::ChunkNotFound,
        4 => Status::Invalid(message(&mut reader)?),
        5 => Status::BackwardSn,
        6 => Status::Retry(message(&mut reader)?),
        7 => Status::Io(message(&mut reader)?),
        _ => {
            return Err(WireError {
                what: "response",
                why: "unknown status",
            })
        }
    };
    reader.finish()?;
    Ok((status, Bytes::new()))
}

/// A copyset's raft status, as `COPYSET_STATUS` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopysetStatus {
    /// 0 follower, 1 pre-candidate, 2 candidate, 3 leader.
    pub role: u8,
    /// Known leader (0: none).
    pub leader: u64,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// The membership this replica uses.
    pub membership: Membership,
}

/// A copyset's membership as a replica sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Voters (of the incoming configuration while joint).
    pub voters: Vec<u64>,
    /// Voters of the outgoing configuration while joint; empty otherwise.
    pub voters_outgoing: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Learners that become voters when the joint configuration is left.
    pub learners_next: Vec<u64>,
}

impl Membership {
    /// The membership of a raft `ConfState`.
    pub fn of(conf: &raftcore::ConfState) -> Membership {
        let ids = |set: &std::collections::BTreeSet<NodeId>| set.iter().map(|n| n.0).collect();
        Membership {
            voters: ids(&conf.voters),
            voters_outgoing: ids(&conf.voters_outgoing),
            learners: ids(&conf.learners),
            learners_next: ids(&conf.learners_next),
        }
    }

    /// Encodes: four lists (voters, outgoing voters, learners, next learners), each a u16
    /// count and u64 node ids.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.put(&mut out);
        out.freeze()
    }

    fn put(&self, out: &mut BytesMut) {
        for list in [
            &self.voters,
            &self.voters_outgoing,
            &self.learners,
            &self.learners_next,
        ] {
            out.put_u16_le(list.len() as u16);
            for id in list {
                out.put_u64_le(*id);
            }
        }
    }

    fn read(reader: &mut Reader<'_>) -> Result<Membership, WireError> {
        Ok(Membership {
            voters: reader.ids()?,
            voters_outgoing: reader.ids()?,
            learners: reader.ids()?,
            learners_next: reader.ids()?,
        })
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<Membership, WireError> {
        let mut reader = Reader::new(bytes, "membership");
        let membership = Membership::read(&mut reader)?;
        reader.finish()?;
        Ok(membership)
    }

    /// Whether a change of several voters is under way.
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }
}

impl CopysetStatus {
    /// Encodes: role u8, leader, term, commit, applied as u64, then the [`Membership`].
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(33);
        out.put_u8(self.role);
        out.put_u64_le(self.leader);
        out.put_u64_le(self.term);
        out.put_u64_le(self.commit);
        out.put_u64_le(self.applied);
        self.membership.put(&mut out);
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<CopysetStatus, WireError> {
        let mut reader = Reader::new(bytes, "copyset status");
        let status = CopysetStatus {
            role: reader.u8()?,
            leader: reader.u64()?,
            term: reader.u64()?,
            commit: reader.u64()?,
            applied: reader.u64()?,
            membership: Membership::read(&mut reader)?,
        };
        reader.finish()?;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bodies_round_trip() {
        let batch = RaftBatch {
            messages: vec![
                (1, Bytes::from_static(b"abc")),
                (2, Bytes::from_static(b"")),
            ],
        };
        assert_eq!(RaftBatch::decode(&batch.encode()).unwrap(), batch);
        let read = ReadChunk {
            chunk: ChunkId(5),
            offset: 4096,
            len: 8192,
        };
        assert_eq!(ReadChunk::decode(&read.encode()).unwrap(), read);
        let create = CreateCopyset {
            peers: vec![NodeId(1), NodeId(2), NodeId(3)],
            join: false,
        };
        assert_eq!(CreateCopyset::decode(&create.encode()).unwrap(), create);
        let join = CreateCopyset {
            peers: vec![NodeId(1), NodeId(2), NodeId(3)],
            join: true,
        };
        assert_eq!(CreateCopyset::decode(&join.encode()).unwrap(), join);
        let status = CopysetStatus {
            role: 3,
            leader: 1,
            term: 4,
            commit: 9,
            applied: 8,
            membership: Membership {
                voters: vec![1, 2, 4],
                voters_outgoing: vec![1, 2, 3],
                learners: vec![5],
                learners_next: vec![],
            },
        };
        assert_eq!(CopysetStatus::decode(&status.encode()).unwrap(), status);
        assert_eq!(
            decode_copyset_list(&encode_copyset_list(&[3, 9])).unwrap(),
            vec![3, 9]
        );
        for status in [
            Status::Redirect { leader: 3 },
            Status::CopysetNotFound,
            Status::Invalid("offset".into()),
            Status::Retry("leader changed".into()),
        ] {
            assert_eq!(
                decode_response(&encode_response(&status, &[])).unwrap().0,
                status
            );
        }
        let (status, body) = decode_response(&encode_response(&Status::Ok, b"data")).unwrap();
        assert_eq!((status, &body[..]), (Status::Ok, &b"data"[..]));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(ReadChunk::decode(&[0; 19]).is_err());
        assert!(ReadChunk::decode(&[0; 21]).is_err());
        assert!(CreateCopyset::decode(&[0, 0]).is_err(), "no peers");
        assert!(
            CreateCopyset::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "peer 0"
        );
        let mut batch = BytesMut::new();
        batch.put_u32_le(1);
        batch.put_u64_le(1);
        batch.put_u32_le(100);
        assert!(
            RaftBatch::decode(&batch.freeze()).is_err(),
            "length past the end"
        );
        assert!(decode_response(&Bytes::from_static(&[99])).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let bytes = Bytes::from(bytes);
            let _ = RaftBatch::decode(&bytes);
            let _ = ReadChunk::decode(&bytes);
            let _ = CreateCopyset::decode(&bytes);
            let _ = CopysetStatus::decode(&bytes);
            let _ = decode_response(&bytes);
            let _ = decode_copyset_list(&bytes);
            let _ = ImageList::decode(&bytes);
            let _ = ResetPeers::decode(&bytes);
            let _ = ReadSnapshot::decode(&bytes);
            let _ = ReadImagePiece::decode(&bytes);
            let _ = ImagePieceHeader::decode(&bytes);
        }
    }

    #[test]
    fn reset_peers_round_trips_and_refuses_an_empty_list() {
        let reset = ResetPeers {
            peers: vec![NodeId(1), NodeId(4)],
        };
        assert_eq!(ResetPeers::decode(&reset.encode()), Ok(reset));
        assert!(ResetPeers::decode(&[0, 0]).is_err());
        assert!(ResetPeers::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn image_messages_round_trip_and_refuse_bad_flags() {
        let list = ImageList {
            applied: 77,
            chunk_size: 1 << 20,
            clone_epoch: 3,
            chunks: vec![ChunkId(3), ChunkId(9)],
        };
        assert_eq!(ImageList::decode(&list.encode()), Ok(list));
        let request = ReadImagePiece {
            chunk: ChunkId(5),
            part: 1,
            offset: 1 << 20,
            len: 4096,
        };
        assert_eq!(ReadImagePiece::decode(&request.encode()), Ok(request));
        let mut bad = request.encode().to_vec();
        bad[8] = 2;
        assert!(ReadImagePiece::decode(&bad).is_err(), "part 2");
        let header = ImagePieceHeader {
            source_applied: 10,
            sn: 2,
            corrected_sn: 0,
            snapshot_sn: Some(1),
            applied: 9,
            clone_source: Some(ChunkId(4)),
            clone_epoch: 2,
            zero: false,
        };
        let mut body = BytesMut::new();
        header.encode(&mut body);
        assert_eq!(body.len(), IMAGE_PIECE_HEADER_LEN);
        body.extend_from_slice(b"page");
        let (decoded, data) = ImagePieceHeader::decode(&body.clone().freeze()).unwrap();
        assert_eq!((decoded, &data[..]), (header, &b"page"[..]));
        let mut zero = BytesMut::new();
        ImagePieceHeader {
            zero: true,
            ..header
        }
        .encode(&mut zero);
        zero.extend_from_slice(b"x");
        assert!(
            ImagePieceHeader::decode(&zero.freeze()).is_err(),
            "a zero piece with bytes"
        );
    }
}
