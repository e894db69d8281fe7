//! The WAL record codec, and the scan that finds where a ring's valid records end. Pure.
//!
//! A record is a 48-byte little-endian header and a payload:
//!
//! ```text
//! magic u32 | crc32c u32 | lsn u64 | copyset u64 | term u64 | index u64 | len u32 | kind u8 |
//! flags u8 | reserved u16 | payload (len bytes)
//! ```
//!
//! The crc covers the header from `lsn` on and the payload. `lsn` is the record's own logical
//! position in the ring (bytes since format, never wrapped), so a stale record left from an
//! earlier lap never passes for the record expected at a position.

use bytes::Bytes;
use raftcore::{
    ConfState, Entry, EntryKind, HardState, LogIndex, NodeId, Snapshot, SnapshotMeta, Term,
};

use crate::storage::layout::{Reader, Writer};

/// "WAL1" as a little-endian u32.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"WAL1");
/// Size of a record header.
pub const HEADER_LEN: usize = 48;

pub use crate::ids::CopysetId;

/// What a record carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordBody {
    /// A raft log entry.
    Entry(Entry),
    /// The copyset's hard state.
    HardState(HardState),
    /// The copyset's membership, as applied.
    ConfState(ConfState),
    /// A snapshot was installed or made: the log before it is gone. Carries the state
    /// machine's image as it wrote it.
    Snapshot(Snapshot),
    /// Filler to the end of a batch; `len` bytes in all, header included.
    Pad(u32),
    /// The copyset was deleted from this shard: its log is gone (a later record of the same
    /// id starts a new one).
    Removed,
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its position in the ring's logical byte stream.
    pub lsn: u64,
    /// Whose record.
    pub copyset: CopysetId,
    /// What it says.
    pub body: RecordBody,
}

const KIND_NORMAL: u8 = 1;
const KIND_CONF_CHANGE: u8 = 2;
const KIND_HARD_STATE: u8 = 3;
const KIND_CONF_STATE: u8 = 4;
const KIND_SNAPSHOT: u8 = 5;
const KIND_PAD: u8 = 6;
const KIND_REMOVED: u8 = 7;

fn conf_state_len(cs: &ConfState) -> usize {
    4 * 4
        + 8 * (cs.voters.len()
            + cs.voters_outgoing.len()
            + cs.learners.len()
            + cs.learners_next.len())
        + 1
}

fn encode_conf_state(cs: &ConfState, w: &mut Writer<'_>) {
    for set in [
        &cs.voters,
        &cs.voters_outgoing,
        &cs.learners,
        &cs.learners_next,
    ] {
        w.u32(set.len() as u32);
        for node in set {
            w.u64(node.0);
        }
    }
    w.u8(u8::from(cs.auto_leave));
}

/// Decodes a membership written by [`encode_conf_state`].
pub(crate) fn decode_conf_state(r: &mut Reader<'_>) -> Option<ConfState> {
    let mut sets = Vec::with_capacity(4);
    for _ in 0..4 {
        let count = r.u32();
        // A corrupt count must not make us allocate: every id takes 8 bytes of input.
        let mut set = std::collections::BTreeSet::new();
        for _ in 0..count {
            let id = r.u64();
            if r.overrun() {
                return None;
            }
            set.insert(NodeId(id));
        }
        sets.push(set);
    }
    let auto_leave = r.u8() != 0;
    if r.overrun() {
        return None;
    }
    let mut sets = sets.into_iter();
    Some(ConfState {
        voters: sets.next().unwrap_or_default(),
        voters_outgoing: sets.next().unwrap_or_default(),
        learners: sets.next().unwrap_or_default(),
        learners_next: sets.next().unwrap_or_default(),
        auto_leave,
    })
}

/// Encodes a membership into a self-contained byte vector (for copyset pages).
pub(crate) fn conf_state_bytes(cs: &ConfState) -> Vec<u8> {
    let mut out = vec![0; conf_state_len(cs)];
    encode_conf_state(cs, &mut Writer::new(&mut out));
    out
}

impl Record {
    /// Bytes the record takes in the ring.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    fn payload_len(&self) -> usize {
        match &self.body {
            RecordBody::Entry(entry) => entry.data.len(),
            RecordBody::HardState(_) => 24,
            RecordBody::ConfState(cs) => conf_state_len(cs),
            RecordBody::Snapshot(snapshot) => {
                16 + conf_state_len(&snapshot.meta.conf_state) + 4 + snapshot.data.len()
            }
            RecordBody::Pad(_) | RecordBody::Removed => 0,
        }
    }

    /// Appends the encoded record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let payload = self.payload_len();
        out.resize(start + HEADER_LEN + payload, 0);
        let (term, index, kind, len) = match &self.body {
            RecordBody::Entry(e) => (
                e.term.0,
                e.index.0,
                match e.kind {
                    EntryKind::Normal => KIND_NORMAL,
                    EntryKind::ConfChange => KIND_CONF_CHANGE,
                },
                payload as u32,
            ),
            RecordBody::HardState(_) => (0, 0, KIND_HARD_STATE, payload as u32),
            RecordBody::ConfState(_) => (0, 0, KIND_CONF_STATE, payload as u32),
            RecordBody::Snapshot(s) => {
                (s.meta.term.0, s.meta.index.0, KIND_SNAPSHOT, payload as u32)
            }
            RecordBody::Pad(len) => (0, 0, KIND_PAD, *len),
            RecordBody::Removed => (0, 0, KIND_REMOVED, 0),
        };
        let record = &mut out[start..];
        {
            let mut w = Writer::new(&mut record[..HEADER_LEN]);
            w.u32(RECORD_MAGIC);
            w.u32(0);
            w.u64(self.lsn);
            w.u64(self.copyset.0);
            w.u64(term);
            w.u64(index);
            w.u32(len);
            w.u8(kind);
            w.u8(0);
            w.u16(0);
        }
        {
            let mut w = Writer::new(&mut record[HEADER_LEN..]);
            match &self.body {
                RecordBody::Entry(e) => w.bytes(&e.data),
                RecordBody::HardState(hs) => {
                    w.u64(hs.term.0);
                    w.u64(hs.vote.map_or(0, |v| v.0));
                    w.u64(hs.commit.0);
                }
                RecordBody::ConfState(cs) => encode_conf_state(cs, &mut w),
                RecordBody::Snapshot(s) => {
                    w.u64(s.meta.index.0);
                    w.u64(s.meta.term.0);
                    encode_conf_state(&s.meta.conf_state, &mut w);
                    w.u32(s.data.len() as u32);
                    w.bytes(&s.data);
                }
                RecordBody::Pad(_) | RecordBody::Removed => {}
            }
        }
        let crc = crc32c::crc32c(&record[8..]);
        record[4..8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// What a position in the ring holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record of `len` bytes.
    Record(Record, usize),
    /// No valid record: the log ends here, for the reason given.
    End(String),
}

/// Decodes the record expected at logical position `lsn` from `bytes` (which start there).
/// Entry payloads are copied out, so the caller's buffer is not kept alive.
pub fn decode(bytes: &[u8], lsn: u64) -> Decoded {
    let decoded = check_framing(bytes, lsn).and_then(|(header, payload, total)| {
        let body = decode_body(&header, payload)?;
        Ok((header.copyset, body, total))
    });
    match decoded {
        Ok((copyset, body, total)) => Decoded::Record(Record { lsn, copyset, body }, total),
        Err(reason) => Decoded::End(reason),
    }
}

/// The fields of a record header that say what the payload holds.
struct Header {
    /// Whose record.
    copyset: CopysetId,
    /// An entry's or a snapshot's term.
    term: u64,
    /// An entry's or a snapshot's index.
    index: u64,
    /// The payload's length (a pad's: the whole record's).
    len: usize,
    /// What the record carries.
    kind: u8,
}

/// Reads the header of the record expected at `lsn` from `bytes` and checks it and the
/// checksum: returns the header, the payload and the record's length in the ring, or why the
/// log ends here.
fn check_framing(bytes: &[u8], lsn: u64) -> Result<(Header, &[u8], usize), String> {
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err("too few bytes for a header".into());
    };
    let mut r = Reader::new(header);
    let magic = r.u32();
    let stored_crc = r.u32();
    let stored_lsn = r.u64();
    let copyset = CopysetId(r.u64());
    let term = r.u64();
    let index = r.u64();
    let len = r.u32() as usize;
    let kind = r.u8();
    if magic != RECORD_MAGIC {
        return Err(if magic == 0 {
            "zeroes (the end of the log)".into()
        } else {
            format!("bad magic {magic:#010x}")
        });
    }
    if stored_lsn != lsn {
        return Err(format!(
            "record for position {stored_lsn} found at {lsn} (stale)"
        ));
    }
    let (payload_len, total) = if kind == KIND_PAD {
        (0, len)
    } else {
        (len, HEADER_LEN + len)
    };
    if total < HEADER_LEN {
        return Err(format!("pad of {len} bytes is shorter than a header"));
    }
    let Some(record_bytes) = bytes.get(..HEADER_LEN + payload_len) else {
        return Err(format!("payload of {len} bytes runs past the ring"));
    };
    let crc = crc32c::crc32c(&record_bytes[8..]);
    if crc != stored_crc {
        return Err(format!(
            "checksum {stored_crc:#010x} does not match ({crc:#010x}): torn or corrupt"
        ));
    }
    let payload = &record_bytes[HEADER_LEN..];
    let header = Header {
        copyset,
        term,
        index,
        len,
        kind,
    };
    Ok((header, payload, total))
}

/// Decodes the payload of a record whose framing checked out, or says why the log ends here.
fn decode_body(header: &Header, payload: &[u8]) -> Result<RecordBody, String> {
    let Header {
        term,
        index,
        len,
        kind,
        ..
    } = *header;
    let mut p = Reader::new(payload);
    let body = match kind {
        KIND_NORMAL | KIND_CONF_CHANGE => RecordBody::Entry(Entry {
            term: Term(term),
            index: LogIndex(index),
            kind: if kind == KIND_NORMAL {
                EntryKind::Normal
            } else {
                EntryKind::ConfChange
            },
            data: Bytes::copy_from_slice(payload),
        }),
        KIND_HARD_STATE => {
            let hs = HardState {
                term: Term(p.u64()),
                vote: Some(p.u64()).filter(|v| *v != 0).map(NodeId),
                commit: LogIndex(p.u64()),
            };
            RecordBody::HardState(hs)
        }
        KIND_CONF_STATE => match decode_conf_state(&mut p) {
            Some(cs) => RecordBody::ConfState(cs),
            None => return Err("membership record shorter than its sets".into()),
        },
        KIND_SNAPSHOT => {
            let index = LogIndex(p.u64());
            let term = Term(p.u64());
            let Some(conf_state) = decode_conf_state(&mut p) else {
                return Err("snapshot record shorter than its fields".into());
            };
            let data_len = p.u32() as usize;
            let Some(data) = p.take(data_len) else {
                return Err("snapshot record shorter than its data".into());
            };
            RecordBody::Snapshot(Snapshot {
                meta: SnapshotMeta {
                    index,
                    term,
                    conf_state,
                },
                data: Bytes::copy_from_slice(data),
            })
        }
        KIND_PAD => RecordBody::Pad(len as u32),
        KIND_REMOVED => RecordBody::Removed,
        other => return Err(format!("unknown record kind {other}")),
    };
    if p.overrun() {
        return Err("payload shorter than its fields".into());
    }
    Ok(body)
}

/// The valid records of a ring image, from `head` on, and where they end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Records in log order, pads left out.
    pub records: Vec<Record>,
    /// The logical position just past the last valid record.
    pub end: u64,
    /// Why the scan stopped.
    pub stop: String,
}

/// Scans `image`, the ring's bytes rotated so that `image[0]` is the byte at logical position
/// `head` (so `image[i]` is at `head + i`).
pub fn scan(image: &[u8], head: u64) -> Scan {
    let mut records = Vec::new();
    let mut at = 0usize;
    let stop = loop {
        let Some(rest) = image.get(at..) else {
            break "end of the ring".to_string();
        };
        if rest.is_empty() {
            break "end of the ring".to_string();
        }
        match decode(rest, head + at as u64) {
            Decoded::Record(record, len) => {
                at += len;
                if !matches!(record.body, RecordBody::Pad(_)) {
                    records.push(record);
                }
            }
            Decoded::End(reason) => break reason,
        }
    };
    Scan {
        records,
        end: head + at as u64,
        stop,
    }
}

/// Checks that where `scan` stopped is the ring's tail. The WAL writes one batch at a time and
/// flushes it before the next, so a crash tears at most the batch in flight, and no record of
/// this lap lies more than a batch past the last valid one. A valid record further on means
/// the ring is damaged before its tail, and stopping there would drop acknowledged records and
/// votes after the damage: the reason is returned to refuse recovery.
pub fn check_tail(
    image: &[u8],
    head: u64,
    scan: &Scan,
    max_batch: u64,
    block: u64,
) -> Result<(), String> {
    let beyond_tear = scan.end + max_batch + block;
    match first_valid_record_from(image, head, beyond_tear, block) {
        None => Ok(()),
        Some(at) => Err(format!(
            "replay stopped at position {} ({}), but a valid record follows at {at}, past the \
             one batch a crash can tear: the ring is damaged before its tail, and starting \
             would lose what follows the damage",
            scan.end, scan.stop
        )),
    }
}

/// How recovery closes a ring whose valid records end at `end` (`image` is the ring rotated
/// to start at logical position `head`, `ring` bytes long): where new batches start, and the
/// bytes to write first, from a block boundary, to make that start reachable.
///
/// A torn tail leaves `end` inside a block, in front of the torn record's bytes, whose header
/// may still read as a record. Batches start on block boundaries, so if new batches simply
/// began at the next one, the next scan would stop at that torn header again and never reach
/// them. Instead the block is rewritten with its valid bytes, then a pad record from `end` to
/// the new start (at least a header long: one block more when the rest of the block is
/// shorter), as a sealed batch ends; the next scan steps over it.
pub fn close_tail(image: &[u8], head: u64, end: u64, block: u64) -> (u64, Option<(u64, Vec<u8>)>) {
    if end % block == 0 {
        return (end, None);
    }
    let start = end / block * block;
    let mut pad = end.div_ceil(block) * block - end;
    if pad < HEADER_LEN as u64 {
        pad += block;
    }
    let tail = end + pad;
    let ring = image.len() as u64;
    // Bytes of logical position p sit at image[(p - head) mod ring]; the block's valid bytes
    // may lie before `head` (the same physical bytes either way).
    let mut bytes: Vec<u8> = (start..end)
        .map(|p| image[((p + ring - head % ring) % ring) as usize])
        .collect();
    Record {
        lsn: end,
        copyset: CopysetId(0),
        body: RecordBody::Pad(pad as u32),
    }
    .encode(&mut bytes);
    bytes.resize((tail - start) as usize, 0);
    (tail, Some((start, bytes)))
}

/// The first position at or after `from`, on a `block` boundary, that holds a valid record of
/// this lap (`image` is the ring rotated to start at logical position `head`). Batches start
/// on block boundaries, so a record written after `from` is found.
pub fn first_valid_record_from(image: &[u8], head: u64, from: u64, block: u64) -> Option<u64> {
    let end = head + image.len() as u64;
    let mut at = from.div_ceil(block) * block;
    while at < end {
        let offset = (at - head) as usize;
        if let Some(bytes) = image.get(offset..) {
            if matches!(decode(bytes, at), Decoded::Record(..)) {
                return Some(at);
            }
        }
        at += block;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn sample(lsn: u64, rng: &mut SmallRng) -> Record {
        let copyset = CopysetId(rng.gen_range(1..5));
        let body = match rng.gen_range(0..4) {
            0 => RecordBody::HardState(HardState {
                term: Term(rng.gen()),
                vote: if rng.gen() { Some(NodeId(3)) } else { None },
                commit: LogIndex(rng.gen()),
            }),
            1 => RecordBody::ConfState(ConfState {
                voters: [NodeId(1), NodeId(2)].into(),
                learners: [NodeId(9)].into(),
                auto_leave: true,
                ..ConfState::default()
            }),
            2 => RecordBody::Snapshot(Snapshot {
                meta: SnapshotMeta {
                    index: LogIndex(rng.gen()),
                    term: Term(rng.gen()),
                    conf_state: ConfState::default(),
                },
                data: Bytes::from_static(b"image"),
            }),
            _ => {
                let len = rng.gen_range(0..3000);
                RecordBody::Entry(Entry {
                    term: Term(rng.gen()),
                    index: LogIndex(rng.gen()),
                    kind: EntryKind::Normal,
                    data: (0..len).map(|_| rng.gen()).collect::<Vec<u8>>().into(),
                })
            }
        };
        Record { lsn, copyset, body }
    }

    fn stream(seed: u64, count: usize, head: u64) -> (Vec<u8>, Vec<Record>) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut out = Vec::new();
        let mut records = Vec::new();
        for _ in 0..count {
            let record = sample(head + out.len() as u64, &mut rng);
            record.encode(&mut out);
            records.push(record);
        }
        (out, records)
    }

    #[test]
    fn records_round_trip() {
        for seed in 0..10 {
            let (bytes, records) = stream(seed, 50, 1 << 20);
            let scan = scan(&bytes, 1 << 20);
            assert_eq!(scan.records, records, "seed {seed}");
            assert_eq!(scan.end, (1 << 20) + bytes.len() as u64);
        }
    }

    #[test]
    fn a_torn_or_corrupt_record_ends_the_scan_at_the_last_good_one() {
        for seed in 0..50u64 {
            let (mut bytes, records) = stream(seed, 20, 0);
            let mut rng = SmallRng::seed_from_u64(seed ^ 0xdead);
            let victim = rng.gen_range(0..records.len());
            let start = records[victim].lsn as usize;
            let len = records[victim].encoded_len();
            if rng.gen() {
                let byte = start + rng.gen_range(0..len);
                bytes[byte] ^= 1 << rng.gen_range(0..8);
            } else {
                // Torn: the write stopped at some byte of this record; what follows is
                // whatever was there before (here: anything but the new bytes).
                let cut = start + rng.gen_range(0..len);
                for byte in &mut bytes[cut..] {
                    *byte = !*byte;
                }
            }
            let scan = scan(&bytes, 0);
            assert!(
                scan.records == records[..victim],
                "seed {seed}: {}",
                scan.stop
            );
            assert_eq!(scan.end, start as u64);
        }
    }

    #[test]
    fn a_stale_record_from_an_earlier_lap_is_not_taken() {
        let (bytes, _) = stream(1, 5, 4096);
        // The same bytes read as if they sat one ring-lap later.
        let scan = scan(&bytes, 4096 + (1 << 20));
        assert!(scan.records.is_empty());
        assert!(scan.stop.contains("stale"), "{}", scan.stop);
    }

    #[test]
    fn garbage_never_panics_the_decoder() {
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..2000 {
            let len = rng.gen_range(0..200);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if bytes.len() >= 8 && rng.gen() {
                bytes[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
                bytes[8..].fill(0);
            }
            let _ = decode(&bytes, 0);
        }
    }

    /// After `close_tail`, a scan of the ring walks past the torn record to what is appended
    /// at the new tail, whether the rest of the block holds a pad header or not (then the
    /// pad takes one more block).
    #[test]
    fn a_closed_tail_leads_the_next_scan_to_what_is_appended_after_it() {
        let block = 512u64;
        let ring = 32 * block;
        for lap in [0u64, 3] {
            let head = lap * ring + 2 * block;
            for gap in [1u64, 10, 47, 48, 49, 200, 511] {
                let end = head + 9 * block - gap;
                let mut image = vec![0u8; ring as usize];
                let put = |image: &mut Vec<u8>, at: u64, record: &Record| {
                    let mut bytes = Vec::new();
                    record.encode(&mut bytes);
                    let i = (at - head) as usize;
                    image[i..i + bytes.len()].copy_from_slice(&bytes);
                    bytes.len() as u64
                };
                // Valid records up to `end`, then a torn record whose header still reads.
                put(
                    &mut image,
                    head,
                    &Record {
                        lsn: head,
                        copyset: CopysetId(0),
                        body: RecordBody::Pad((end - head) as u32),
                    },
                );
                let torn = Record {
                    lsn: end,
                    copyset: CopysetId(1),
                    body: RecordBody::Entry(Entry {
                        term: Term(1),
                        index: LogIndex(7),
                        kind: EntryKind::Normal,
                        data: Bytes::from(vec![5u8; 900]),
                    }),
                };
                let len = put(&mut image, end, &torn);
                image[(end - head + len - 1) as usize] ^= 1;
                let before = scan(&image, head);
                assert_eq!(before.end, end, "gap {gap}");
                let (tail, closing) = close_tail(&image, head, end, block);
                assert_eq!(tail % block, 0, "gap {gap}");
                assert!(tail - end >= HEADER_LEN as u64, "gap {gap}");
                let (start, bytes) = closing.expect("a mid-block end is closed");
                assert_eq!(start, end / block * block);
                let i = (start - head) as usize;
                image[i..i + bytes.len()].copy_from_slice(&bytes);
                // What the next run appends at the tail is found.
                let appended = Record {
                    lsn: tail,
                    copyset: CopysetId(1),
                    body: RecordBody::Entry(Entry {
                        term: Term(2),
                        index: LogIndex(7),
                        kind: EntryKind::Normal,
                        data: Bytes::from(vec![6u8; 100]),
                    }),
                };
                put(&mut image, tail, &appended);
                let after = scan(&image, head);
                assert_eq!(after.records, vec![appended], "gap {gap}, lap {lap}");
            }
        }
        // A block-aligned end needs nothing.
        assert_eq!(close_tail(&[0u8; 4096], 0, 1024, 512), (1024, None));
    }
}
