//! The messages raft peers exchange. One flat struct, as in etcd/raft: each type uses the
//! fields it needs and leaves the others at their defaults; the codec only writes the fields
//! that are set.

use bytes::Bytes;

use crate::types::{Entry, LogIndex, NodeId, SnapshotMeta, Term};

/// What a message asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Leader to follower: entries after `(index, log_term)`, and the leader's `commit`.
    Append = 1,
    /// Follower to leader: `index` accepted (or rejected, with a hint in `reject_hint` and
    /// `log_term`).
    AppendResponse = 2,
    /// Candidate: vote for me in `term`; my last entry is `(index, log_term)`.
    RequestVote = 3,
    /// Answer to `RequestVote`.
    RequestVoteResponse = 4,
    /// Pre-candidate: would you vote for me in `term`? Changes nobody's term.
    RequestPreVote = 5,
    /// Answer to `RequestPreVote`.
    RequestPreVoteResponse = 6,
    /// Leader: I am alive; `commit`, the read round `read_seq` and the send tick `sent_tick`.
    Heartbeat = 7,
    /// Follower: heartbeat seen; echoes `read_seq` and `sent_tick`, tells its `commit`.
    HeartbeatResponse = 8,
    /// Leader: one piece of a snapshot.
    Snapshot = 9,
    /// Follower: snapshot bytes received so far (`snapshot_offset`); `reject` asks the leader
    /// to resend from there.
    SnapshotResponse = 10,
    /// Leader to the transfer target: campaign now, ignoring leases.
    TimeoutNow = 11,
}

impl MessageType {
    /// The type for a wire code, if it is one.
    pub fn from_code(code: u8) -> Option<MessageType> {
        use MessageType::*;
        Some(match code {
            1 => Append,
            2 => AppendResponse,
            3 => RequestVote,
            4 => RequestVoteResponse,
            5 => RequestPreVote,
            6 => RequestPreVoteResponse,
            7 => Heartbeat,
            8 => HeartbeatResponse,
            9 => Snapshot,
            10 => SnapshotResponse,
            11 => TimeoutNow,
            _ => return None,
        })
    }
}

/// A piece of a snapshot, carried by `MessageType::Snapshot`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// What the whole snapshot covers.
    pub meta: SnapshotMeta,
    /// Where this piece starts in the snapshot's data.
    pub offset: u64,
    /// Length of the whole snapshot's data.
    pub total_len: u64,
    /// The piece.
    pub data: Bytes,
}

/// One raft message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its type.
    pub msg_type: MessageType,
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// Sender's term (for vote requests: the term campaigned for).
    pub term: Term,
    /// Append: term of the entry at `index`; vote: term of the last entry; rejected append
    /// response: term of the hint entry.
    pub log_term: Term,
    /// Append: the index before the entries; vote: the last index; append response: the last
    /// index accepted, or the rejected `index`; snapshot response: the snapshot's index.
    pub index: LogIndex,
    /// Append: entries to append.
    pub entries: Vec<Entry>,
    /// Append, heartbeat: the leader's commit index; responses: the follower's.
    pub commit: LogIndex,
    /// Response refuses (vote not granted, append does not match, snapshot piece out of order).
    pub reject: bool,
    /// Rejected append: the follower's guess of the last matching index.
    pub reject_hint: LogIndex,
    /// Heartbeat: the leader's latest read-index round; echoed in the response.
    pub read_seq: u64,
    /// Heartbeat: the leader's tick when it sent it; echoed in the response (leader lease).
    pub sent_tick: u64,
    /// Snapshot response: bytes of the snapshot received so far.
    pub snapshot_offset: u64,
    /// Vote request: caused by a leader transfer, so leases do not stop it.
    pub transfer: bool,
    /// Heartbeat: the leader goes quiet; followers stop their election timers.
    pub quiesce: bool,
    /// Snapshot: the piece. Boxed: it is rare, and a message is moved often.
    pub snapshot: Option<Box<SnapshotChunk>>,
}

impl Message {
    /// A message of `msg_type` with every other field empty.
    pub fn new(msg_type: MessageType, from: NodeId, to: NodeId, term: Term) -> Message {
        Message {
            msg_type,
            from,
            to,
            term,
            log_term: Term(0),
            index: LogIndex(0),
            entries: Vec::new(),
            commit: LogIndex(0),
            reject: false,
            reject_hint: LogIndex(0),
            read_seq: 0,
            sent_tick: 0,
            snapshot_offset: 0,
            transfer: false,
            quiesce: false,
            snapshot: None,
        }
    }
}
