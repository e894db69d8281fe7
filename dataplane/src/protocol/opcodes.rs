//! The service opcodes of the frame protocol (docs/protocol.md), their names for metrics and
//! logs, and which opcode a chunk operation travels under.

use crate::copyset::ChunkOp;
use crate::protocol::Opcode;

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
/// Raise a chunk's sequence number without writing (body: `ChunkOp::Fence`).
pub const FENCE_CHUNK: Opcode = Opcode(27);
/// Take every replica's page checksums of a chunk range at one log position (body:
/// `ChunkOp::Scrub`; answer: the leader's `crate::scrub::RangeSums`).
pub const SCRUB_CHUNK: Opcode = Opcode(28);
/// Rewrite a page where it has a replica's bad checksum (body: `ChunkOp::Repair`).
pub const REPAIR_CHUNK: Opcode = Opcode(29);
/// One replica's sums of a scrub entry (body: the entry's index, u64; answer:
/// `crate::scrub::RangeSums`).
pub const SCRUB_RESULT: Opcode = Opcode(30);
/// Add a volume to the volume table (to the metadata copyset; body: `ChunkOp::VolumeCreate`).
pub const CREATE_VOLUME: Opcode = Opcode(40);
/// Remove a volume from the volume table (body: `ChunkOp::VolumeDelete`).
pub const DELETE_VOLUME: Opcode = Opcode(41);
/// A change to the placement tables of the metadata copyset (body: `ChunkOp::Meta`).
pub const PLACEMENT: Opcode = Opcode(42);
/// A chunkserver's heartbeat to the placement service, addressed to the metadata copyset and
/// served by its leader (body: `placement::Heartbeat`, JSON; answer:
/// `placement::HeartbeatReply`, JSON).
pub const HEARTBEAT: Opcode = Opcode(43);
/// The placement service's view of the chunkservers (empty body, to the metadata copyset;
/// answer: `placement::Topology`, JSON).
pub const TOPOLOGY: Opcode = Opcode(44);
/// The scheduler's operators, after an optional cancel (body: `placement::OperatorsRequest`,
/// JSON, to the metadata copyset; answer: `placement::Operators`, JSON).
pub const OPERATORS: Opcode = Opcode(45);

/// The opcode whose body a chunk operation is.
pub fn opcode_of(op: &ChunkOp) -> Opcode {
    match op {
        ChunkOp::Write { .. } => WRITE_CHUNK,
        ChunkOp::Delete { .. } => DELETE_CHUNK,
        ChunkOp::DeleteSnapshotOrCorrectSn { .. } => DELETE_SNAPSHOT_OR_CORRECT_SN,
        ChunkOp::Fence { .. } => FENCE_CHUNK,
        ChunkOp::Scrub { .. } => SCRUB_CHUNK,
        ChunkOp::Repair { .. } => REPAIR_CHUNK,
        ChunkOp::CreateClone { .. } => CREATE_CLONE_CHUNK,
        ChunkOp::Paste { .. } => PASTE_CHUNK,
        ChunkOp::Recover { .. } => RECOVER_CHUNK,
        ChunkOp::Flatten { .. } => FLATTEN_CHUNK,
        ChunkOp::VolumeCreate { .. } => CREATE_VOLUME,
        ChunkOp::VolumeDelete { .. } => DELETE_VOLUME,
        ChunkOp::Meta(_) => PLACEMENT,
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
/// for a replica already removed from the membership. With the body [`DELETE_IF_STALE`], only
/// a replica the placement service found stale, and the node refuses one it joined lately.
pub const DELETE_COPYSET: Opcode = Opcode(37);
/// The body of a `DELETE_COPYSET` that removes a stale replica only.
pub const DELETE_IF_STALE: &[u8] = b"stale";
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
        FENCE_CHUNK => "fence_chunk",
        SCRUB_CHUNK => "scrub_chunk",
        REPAIR_CHUNK => "repair_chunk",
        SCRUB_RESULT => "scrub_result",
        CREATE_VOLUME => "create_volume",
        DELETE_VOLUME => "delete_volume",
        PLACEMENT => "placement",
        HEARTBEAT => "heartbeat",
        TOPOLOGY => "topology",
        OPERATORS => "operators",
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
