//! The binary encoding of raft messages: versioned, little-endian, explicit sizes.
//!
//! ```text
//! u8  version (1)
//! u8  message type
//! u8  flags: 1 reject, 2 transfer, 4 quiesce, 8 snapshot follows, 16 entries follow
//! u8  field mask: which u64 fields follow, in this order:
//!     1 log_term, 2 index, 4 commit, 8 reject_hint, 16 read_seq, 32 sent_tick, 64 snapshot_offset
//! u64 from, u64 to, u64 term
//! u64 × (fields in the mask)
//! entries:  u32 count, then per entry: u64 term, u64 index, u8 kind, u32 len, data
//! snapshot: meta (u64 index, u64 term, conf state), u64 offset, u64 total_len, u32 len, data
//! conf state: voters, voters_outgoing, learners, learners_next (each u32 count, u64 ids),
//!             u8 auto_leave
//! ```
//!
//! The decoder checks every length against what is left and rejects unknown codes, unknown
//! flag or mask bits and trailing bytes with a `DecodeError`; it never panics.

use std::collections::BTreeSet;

use bytes::{BufMut, Bytes};

use crate::message::{Message, MessageType, SnapshotChunk};
use crate::types::{ConfState, Entry, EntryKind, LogIndex, NodeId, SnapshotMeta, Term};

/// The encoding version this code writes and reads.
pub const WIRE_VERSION: u8 = 1;

const FLAG_REJECT: u8 = 1;
const FLAG_TRANSFER: u8 = 2;
const FLAG_QUIESCE: u8 = 4;
const FLAG_SNAPSHOT: u8 = 8;
const FLAG_ENTRIES: u8 = 16;
const FLAGS_KNOWN: u8 = 31;
const FIELDS_KNOWN: u8 = 127;
const ENTRY_HEADER_LEN: usize = 8 + 8 + 1 + 4;

/// Why bytes do not decode to a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before a field.
    #[error("truncated: {what} needs {needed} bytes at offset {offset}, {left} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Its size.
        needed: usize,
        /// Where it starts.
        offset: usize,
        /// Bytes left.
        left: usize,
    },
    /// An encoding version this code does not read.
    #[error("unsupported wire version {0}")]
    Version(u8),
    /// A message type code that is not one.
    #[error("unknown message type {0}")]
    MessageType(u8),
    /// An entry kind code that is not one.
    #[error("unknown entry kind {0}")]
    EntryKind(u8),
    /// Flag or field-mask bits this version does not define.
    #[error("unknown {what} bits {bits:#x}")]
    UnknownBits {
        /// "flags" or "field mask".
        what: &'static str,
        /// The offending bits.
        bits: u8,
    },
    /// A count or length larger than the rest of the input could hold.
    #[error("{what} of {count} cannot fit in the {left} bytes left")]
    Length {
        /// The counted thing.
        what: &'static str,
        /// The count read.
        count: u64,
        /// Bytes left.
        left: usize,
    },
    /// A boolean byte other than 0 or 1.
    #[error("invalid boolean {0}")]
    Bool(u8),
    /// Bytes after the end of the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// Reads little-endian fields from a shared buffer; payloads are slices of it, not copies.
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf, pos: 0 }
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, what: &'static str, needed: usize) -> Result<&[u8], DecodeError> {
        if self.left() < needed {
            return Err(DecodeError::Truncated {
                what,
                needed,
                offset: self.pos,
                left: self.left(),
            });
        }
        let start = self.pos;
        self.pos += needed;
        Ok(&self.buf[start..start + needed])
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(what, 1)?[0])
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let bytes = self.take(what, 4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let bytes = self.take(what, 8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(array))
    }

    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::Bool(other)),
        }
    }

    /// A count of items of at least `min_item_len` bytes each, checked against what is left.
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        min_item_len: usize,
    ) -> Result<usize, DecodeError> {
        let count = self.u32(what)? as u64;
        if count.saturating_mul(min_item_len as u64) > self.left() as u64 {
            return Err(DecodeError::Length {
                what,
                count,
                left: self.left(),
            });
        }
        Ok(count as usize)
    }

    pub(crate) fn bytes(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.count(what, 1)?;
        let start = self.pos;
        self.pos += len;
        Ok(self.buf.slice(start..start + len))
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.left() {
            0 => Ok(()),
            left => Err(DecodeError::Trailing(left)),
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, data: &[u8]) {
    assert!(
        data.len() <= u32::MAX as usize,
        "payload longer than the u32 length field"
    );
    out.put_u32_le(data.len() as u32);
    out.put_slice(data);
}

fn put_set(out: &mut Vec<u8>, set: &BTreeSet<NodeId>) {
    out.put_u32_le(set.len() as u32);
    for id in set {
        out.put_u64_le(id.0);
    }
}

fn read_set(reader: &mut Reader, what: &'static str) -> Result<BTreeSet<NodeId>, DecodeError> {
    let count = reader.count(what, 8)?;
    let mut set = BTreeSet::new();
    for _ in 0..count {
        set.insert(NodeId(reader.u64(what)?));
    }
    Ok(set)
}

/// Appends the encoding of a configuration.
pub(crate) fn put_conf_state(out: &mut Vec<u8>, conf: &ConfState) {
    put_set(out, &conf.voters);
    put_set(out, &conf.voters_outgoing);
    put_set(out, &conf.learners);
    put_set(out, &conf.learners_next);
    out.put_u8(conf.auto_leave as u8);
}

/// Reads a configuration.
pub(crate) fn read_conf_state(reader: &mut Reader) -> Result<ConfState, DecodeError> {
    Ok(ConfState {
        voters: read_set(reader, "voters")?,
        voters_outgoing: read_set(reader, "outgoing voters")?,
        learners: read_set(reader, "learners")?,
        learners_next: read_set(reader, "next learners")?,
        auto_leave: reader.bool("auto_leave")?,
    })
}

fn kind_code(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::Normal => 0,
        EntryKind::ConfChange => 1,
    }
}

/// Bytes `encode` will write for `msg`; lets a sender size its frame first.
pub fn encoded_len(msg: &Message) -> usize {
    let mut len = 4 + 24 + 8 * 7;
    if !msg.entries.is_empty() {
        len += 4 + msg
            .entries
            .iter()
            .map(|e| ENTRY_HEADER_LEN + e.data.len())
            .sum::<usize>();
    }
    if let Some(chunk) = &msg.snapshot {
        let conf = &chunk.meta.conf_state;
        let ids = conf.voters.len()
            + conf.voters_outgoing.len()
            + conf.learners.len()
            + conf.learners_next.len();
        len += 16 + 16 + 1 + ids * 8 + 16 + 4 + chunk.data.len();
    }
    len
}

/// Appends the encoding of `msg` to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let mut flags = 0u8;
    if msg.reject {
        flags |= FLAG_REJECT;
    }
    if msg.transfer {
        flags |= FLAG_TRANSFER;
    }
    if msg.quiesce {
        flags |= FLAG_QUIESCE;
    }
    if msg.snapshot.is_some() {
        flags |= FLAG_SNAPSHOT;
    }
    if !msg.entries.is_empty() {
        flags |= FLAG_ENTRIES;
    }
    let fields = [
        msg.log_term.0,
        msg.index.0,
        msg.commit.0,
        msg.reject_hint.0,
        msg.read_seq,
        msg.sent_tick,
        msg.snapshot_offset,
    ];
    let mut mask = 0u8;
    for (bit, value) in fields.iter().enumerate() {
        if *value != 0 {
            mask |= 1 << bit;
        }
    }
    out.reserve(encoded_len(msg));
    out.put_u8(WIRE_VERSION);
    out.put_u8(msg.msg_type as u8);
    out.put_u8(flags);
    out.put_u8(mask);
    out.put_u64_le(msg.from.0);
    out.put_u64_le(msg.to.0);
    out.put_u64_le(msg.term.0);
    for value in fields.iter().filter(|v| **v != 0) {
        out.put_u64_le(*value);
    }
    if !msg.entries.is_empty() {
        out.put_u32_le(msg.entries.len() as u32);
        for entry in &msg.entries {
            out.put_u64_le(entry.term.0);
            out.put_u64_le(entry.index.0);
            out.put_u8(kind_code(entry.kind));
            put_bytes(out, &entry.data);
        }
    }
    if let Some(chunk) = &msg.snapshot {
        out.put_u64_le(chunk.meta.index.0);
        out.put_u64_le(chunk.meta.term.0);
        put_conf_state(out, &chunk.meta.conf_state);
        out.put_u64_le(chunk.offset);
        out.put_u64_le(chunk.total_len);
        put_bytes(out, &chunk.data);
    }
}

/// Encodes `msg` into a fresh buffer.
pub fn encode_to_bytes(msg: &Message) -> Bytes {
    let mut out = Vec::with_capacity(encoded_len(msg));
    encode(msg, &mut out);
    Bytes::from(out)
}

/// Decodes one message that fills `buf` exactly. Entry and snapshot payloads are slices of
/// `buf`, not copies.
pub fn decode(buf: Bytes) -> Result<Message, DecodeError> {
    let mut reader = Reader::new(buf);
    let version = reader.u8("version")?;
    if version != WIRE_VERSION {
        return Err(DecodeError::Version(version));
    }
    let code = reader.u8("message type")?;
    let msg_type = MessageType::from_code(code).ok_or(DecodeError::MessageType(code))?;
    let flags = reader.u8("flags")?;
    if flags & !FLAGS_KNOWN != 0 {
        return Err(DecodeError::UnknownBits {
            what: "flags",
            bits: flags & !FLAGS_KNOWN,
        });
    }
    let mask = reader.u8("field mask")?;
    if mask & !FIELDS_KNOWN != 0 {
        return Err(DecodeError::UnknownBits {
            what: "field mask",
            bits: mask & !FIELDS_KNOWN,
        });
    }
    let from = NodeId(reader.u64("from")?);
    let to = NodeId(reader.u64("to")?);
    let term = Term(reader.u64("term")?);
    let mut fields = [0u64; 7];
    for (bit, field) in fields.iter_mut().enumerate() {
        if mask & (1 << bit) != 0 {
            *field = reader.u64("field")?;
        }
    }
    let mut msg = Message::new(msg_type, from, to, term);
    msg.log_term = Term(fields[0]);
    msg.index = LogIndex(fields[1]);
    msg.commit = LogIndex(fields[2]);
    msg.reject_hint = LogIndex(fields[3]);
    msg.read_seq = fields[4];
    msg.sent_tick = fields[5];
    msg.snapshot_offset = fields[6];
    msg.reject = flags & FLAG_REJECT != 0;
    msg.transfer = flags & FLAG_TRANSFER != 0;
    msg.quiesce = flags & FLAG_QUIESCE != 0;
    if flags & FLAG_ENTRIES != 0 {
        let count = reader.count("entries", ENTRY_HEADER_LEN)?;
        msg.entries.reserve(count);
        for _ in 0..count {
            let term = Term(reader.u64("entry term")?);
            let index = LogIndex(reader.u64("entry index")?);
            let kind = match reader.u8("entry kind")? {
                0 => EntryKind::Normal,
                1 => EntryKind::ConfChange,
                other => return Err(DecodeError::EntryKind(other)),
            };
            let data = reader.bytes("entry data")?;
            msg.entries.push(Entry {
                term,
                index,
                kind,
                data,
            });
        }
    }
    if flags & FLAG_SNAPSHOT != 0 {
        let index = LogIndex(reader.u64("snapshot index")?);
        let term = Term(reader.u64("snapshot term")?);
        let conf_state = read_conf_state(&mut reader)?;
        let offset = reader.u64("snapshot offset")?;
        let total_len = reader.u64("snapshot length")?;
        let data = reader.bytes("snapshot data")?;
        msg.snapshot = Some(Box::new(SnapshotChunk {
            meta: SnapshotMeta {
                index,
                term,
                conf_state,
            },
            offset,
            total_len,
            data,
        }));
    }
    reader.finish()?;
    Ok(msg)
}
