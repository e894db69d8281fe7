//! Volume snapshots' metadata (issue 21): one *snapshot table* chunk per striped volume in the
//! metadata copyset, changed only by raft entries (`MetaOp::Snapshot*`) applied with the pure
//! plans here, so a snapshot's creation, its readiness and its deletion are each decided
//! once, in log order.
//!
//! The table's first page holds the volume's *epoch* — the sequence number its writes carry
//! (an all-zero page: epoch 1, no snapshot ever) — and up to [`MAX_SNAPSHOTS`] records, each
//! a snapshot's name, the sequence number it keeps (the epoch before it), its creation time
//! and its state. Creating a snapshot is one entry: a record at the current epoch, and the
//! epoch one higher — atomically, so every write after it carries the new number and the
//! chunk layer copies the old pages on first write (copy-on-write by sequence number).
//!
//! Each record has a region of its own further on ([`bitmap_offset`]): once the creating
//! client has fenced every chunk of the volume (raised its sequence number, so a write of the
//! old epoch is refused), it records there which chunks existed at that moment; a chunk
//! outside the bitmap reads as zeros in the snapshot, whatever a late writer of the old epoch
//! put there. A snapshot is `creating` until its bitmap is there, then `ready`; `deleting`
//! while its chunks' copies are dropped, and gone after.
//!
//! The chunk layer keeps one snapshot version per chunk, so a volume has one snapshot at a
//! time in this version: a second is refused until the first is deleted.

use crate::ids::ChunkId;

/// Bit 62 marks a snapshot table chunk (with bit 63, the metadata chunks' bit).
const SNAPSHOT_TABLE_BIT: u64 = 1 << 62;
/// The header page.
pub const HEADER_LEN: usize = 4096;
/// Snapshot records a table holds.
pub const MAX_SNAPSHOTS: usize = 16;
/// Bytes of a record in the header page.
const RECORD_LEN: usize = 160;
/// Where the records start in the header page.
const RECORDS_AT: usize = 32;
/// The most bytes a snapshot name has.
pub const MAX_SNAPSHOT_NAME: usize = 100;
/// Bytes of each record's bitmap region.
pub const BITMAP_REGION: u64 = 64 << 10;
/// Bytes before the bitmap's bits in its region (magic, sequence number, bit count, CRC).
const BITMAP_HEADER: usize = 32;
/// The most chunks a volume may have for a snapshot of it.
pub const MAX_SNAPSHOT_CHUNKS: u64 = ((BITMAP_REGION as usize - BITMAP_HEADER) * 8) as u64;
const MAGIC: u32 = 0x5041_4e53; // "SNAP"
const BITMAP_MAGIC: u32 = 0x5041_4d42; // "BMAP"
const VERSION: u8 = 1;

/// The metadata-copyset chunk holding volume `volume`'s snapshot table.
pub fn snapshot_table_chunk(volume: u64) -> ChunkId {
    ChunkId(super::tables::segment_table_chunk(volume).0 | SNAPSHOT_TABLE_BIT)
}

/// Where record `slot`'s bitmap region starts in the table chunk.
pub fn bitmap_offset(slot: usize) -> u64 {
    BITMAP_REGION * (slot as u64 + 1)
}

/// Why a snapshot change was refused, or a table cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// A name that cannot be a snapshot's.
    #[error("{0}")]
    Invalid(String),
    /// The name is taken.
    #[error("volume {volume} has a snapshot named {name:?} already")]
    Exists {
        /// The volume.
        volume: String,
        /// The name.
        name: String,
    },
    /// No snapshot of that name.
    #[error("volume {volume} has no snapshot named {name:?}")]
    Unknown {
        /// The volume.
        volume: String,
        /// The name.
        name: String,
    },
    /// The one snapshot a volume may have exists.
    #[error(
        "volume {volume} has snapshot {existing:?} ({state}); this version keeps one snapshot \
         per volume (the chunk layer keeps one older version per chunk): delete it first"
    )]
    OnlyOne {
        /// The volume.
        volume: String,
        /// The snapshot there.
        existing: String,
        /// Its state.
        state: &'static str,
    },
    /// A change that does not fit the snapshot's state.
    #[error("snapshot {name:?} is {state}: {why}")]
    State {
        /// The snapshot.
        name: String,
        /// Its state.
        state: &'static str,
        /// What was asked.
        why: &'static str,
    },
    /// Bytes that are not a snapshot table.
    #[error("the snapshot table is damaged: {0}")]
    Corrupt(&'static str),
}

/// A snapshot's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// Recorded; its chunks are being fenced (no bitmap yet).
    Creating,
    /// Its bitmap is recorded: it can be read.
    Ready,
    /// Its chunks' copies are being dropped.
    Deleting,
}

impl SnapshotState {
    /// The state as a person reads it.
    pub fn name(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
            SnapshotState::Deleting => "deleting",
        }
    }
}

/// One snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its slot in the table (which bitmap region is its).
    pub slot: usize,
    /// Its name.
    pub name: String,
    /// The sequence number whose chunk versions it is.
    pub seq: u64,
    /// When it was created (milliseconds since the Unix epoch, the creating client's clock).
    pub created_ms: u64,
    /// Whether it is being deleted (else: creating or ready, by its bitmap).
    pub deleting: bool,
}

/// A volume's snapshot table (its header page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTable {
    /// The sequence number the volume's writes carry now.
    pub epoch: u64,
    /// The snapshots, by slot.
    pub snapshots: Vec<Snapshot>,
}

impl Default for SnapshotTable {
    fn default() -> SnapshotTable {
        SnapshotTable {
            epoch: 1,
            snapshots: Vec::new(),
        }
    }
}

impl SnapshotTable {
    /// Reads the header page (all zeroes: a volume never snapshotted).
    pub fn decode(page: &[u8]) -> Result<SnapshotTable, SnapshotError> {
        let page = page
            .get(..HEADER_LEN)
            .ok_or(SnapshotError::Corrupt("short header page"))?;
        if page.iter().all(|b| *b == 0) {
            return Ok(SnapshotTable::default());
        }
        let crc = u32::from_le_bytes(word(page, HEADER_LEN - 4));
        if crc32c::crc32c(&page[..HEADER_LEN - 4]) != crc {
            return Err(SnapshotError::Corrupt("header checksum"));
        }
        if u32::from_le_bytes(word(page, 0)) != MAGIC || page[4] != VERSION {
            return Err(SnapshotError::Corrupt("header magic or version"));
        }
        let epoch = u64::from_le_bytes(word(page, 8));
        let mut snapshots = Vec::new();
        for slot in 0..MAX_SNAPSHOTS {
            let at = RECORDS_AT + slot * RECORD_LEN;
            let record = &page[at..at + RECORD_LEN];
            let state = record[0];
            if state == 0 {
                continue;
            }
            let len = usize::from(record[17]);
            let name = record
                .get(18..18 + len)
                .filter(|_| len <= MAX_SNAPSHOT_NAME)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or(SnapshotError::Corrupt("snapshot name"))?;
            snapshots.push(Snapshot {
                slot,
                name: name.to_string(),
                seq: u64::from_le_bytes(word(record, 1)),
                created_ms: u64::from_le_bytes(word(record, 9)),
                deleting: state == 2,
            });
        }
        Ok(SnapshotTable { epoch, snapshots })
    }

    /// The header page.
    pub fn encode(&self) -> Vec<u8> {
        let mut page = vec![0u8; HEADER_LEN];
        page[..4].copy_from_slice(&MAGIC.to_le_bytes());
        page[4] = VERSION;
        page[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        for snapshot in &self.snapshots {
            let at = RECORDS_AT + snapshot.slot * RECORD_LEN;
            let record = &mut page[at..at + RECORD_LEN];
            record[0] = if snapshot.deleting { 2 } else { 1 };
            record[1..9].copy_from_slice(&snapshot.seq.to_le_bytes());
            record[9..17].copy_from_slice(&snapshot.created_ms.to_le_bytes());
            let name = &snapshot.name.as_bytes()[..snapshot.name.len().min(MAX_SNAPSHOT_NAME)];
            record[17] = name.len() as u8;
            record[18..18 + name.len()].copy_from_slice(name);
        }
        let crc = crc32c::crc32c(&page[..HEADER_LEN - 4]);
        page[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        page
    }

    /// The snapshot named `name`.
    pub fn find(&self, name: &str) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.name == name)
    }
}

fn word<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// Checks a snapshot name: 1 to [`MAX_SNAPSHOT_NAME`] bytes, no `/`, `@` or control character
/// (`VOLUME@SNAPSHOT` names a snapshot on the command line).
pub fn check_snapshot_name(name: &str) -> Result<(), SnapshotError> {
    if name.is_empty() || name.len() > MAX_SNAPSHOT_NAME {
        return Err(SnapshotError::Invalid(format!(
            "a snapshot name has 1 to {MAX_SNAPSHOT_NAME} bytes, not {}",
            name.len()
        )));
    }
    if name.chars().any(|c| c == '/' || c == '@' || c.is_control()) {
        return Err(SnapshotError::Invalid(format!(
            "snapshot name {name:?} has a '/', an '@' or a control character"
        )));
    }
    Ok(())
}

/// A new snapshot `name` of `volume` (whose table is `table`, with `chunks` chunks): a record
/// at the current epoch, and the epoch one higher.
pub fn plan_create(
    table: &SnapshotTable,
    volume: &str,
    chunks: u64,
    name: &str,
    created_ms: u64,
) -> Result<SnapshotTable, SnapshotError> {
    check_snapshot_name(name)?;
    if chunks > MAX_SNAPSHOT_CHUNKS {
        return Err(SnapshotError::Invalid(format!(
            "volume {volume} has {chunks} chunks; a snapshot covers at most {MAX_SNAPSHOT_CHUNKS}"
        )));
    }
    if table.find(name).is_some() {
        return Err(SnapshotError::Exists {
            volume: volume.into(),
            name: name.into(),
        });
    }
    if let Some(existing) = table.snapshots.first() {
        return Err(SnapshotError::OnlyOne {
            volume: volume.into(),
            existing: existing.name.clone(),
            state: if existing.deleting {
                "deleting"
            } else {
                "creating or ready"
            },
        });
    }
    let slot = (0..MAX_SNAPSHOTS)
        .find(|s| table.snapshots.iter().all(|x| x.slot != *s))
        .ok_or(SnapshotError::Invalid("the snapshot table is full".into()))?;
    let mut next = table.clone();
    next.snapshots.push(Snapshot {
        slot,
        name: name.into(),
        seq: table.epoch,
        created_ms,
        deleting: false,
    });
    next.epoch = table.epoch + 1;
    Ok(next)
}

/// Snapshot `name` marked as being deleted (again: a deletion that stopped half-way).
pub fn plan_deleting(
    table: &SnapshotTable,
    volume: &str,
    name: &str,
) -> Result<SnapshotTable, SnapshotError> {
    let mut next = table.clone();
    let snapshot = next
        .snapshots
        .iter_mut()
        .find(|s| s.name == name)
        .ok_or_else(|| SnapshotError::Unknown {
            volume: volume.into(),
            name: name.into(),
        })?;
    snapshot.deleting = true;
    Ok(next)
}

/// Snapshot `name` gone, once its chunks' copies are dropped; only a snapshot being deleted.
pub fn plan_drop(
    table: &SnapshotTable,
    volume: &str,
    name: &str,
) -> Result<SnapshotTable, SnapshotError> {
    let snapshot = table.find(name).ok_or_else(|| SnapshotError::Unknown {
        volume: volume.into(),
        name: name.into(),
    })?;
    if !snapshot.deleting {
        return Err(SnapshotError::State {
            name: name.into(),
            state: "not being deleted",
            why: "only a snapshot marked for deletion is dropped",
        });
    }
    let mut next = table.clone();
    next.snapshots.retain(|s| s.name != name);
    Ok(next)
}

/// The bitmap region of a snapshot at `seq`: which of the volume's chunks existed when it
/// was fenced, bit `i` for chunk `i`.
pub fn encode_bitmap(seq: u64, existed: &[bool]) -> Vec<u8> {
    let bytes = existed.len().div_ceil(8);
    let len = (BITMAP_HEADER + bytes).div_ceil(4096) * 4096;
    let mut region = vec![0u8; len];
    for (i, _) in existed.iter().enumerate().filter(|(_, e)| **e) {
        region[BITMAP_HEADER + i / 8] |= 1 << (i % 8);
    }
    region[..4].copy_from_slice(&BITMAP_MAGIC.to_le_bytes());
    region[8..16].copy_from_slice(&seq.to_le_bytes());
    region[16..24].copy_from_slice(&(existed.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c(&region[BITMAP_HEADER..BITMAP_HEADER + bytes]);
    region[24..28].copy_from_slice(&crc.to_le_bytes());
    region
}

/// The bitmap of the snapshot at `seq` from its region; `None` when the region holds none for
/// it (the snapshot is still being created).
pub fn decode_bitmap(region: &[u8], seq: u64) -> Result<Option<Vec<bool>>, SnapshotError> {
    if region.len() < BITMAP_HEADER || u32::from_le_bytes(word(region, 0)) != BITMAP_MAGIC {
        return Ok(None);
    }
    if u64::from_le_bytes(word(region, 8)) != seq {
        return Ok(None); // a dropped snapshot's bitmap, of another sequence number
    }
    let count = u64::from_le_bytes(word(region, 16));
    if count > MAX_SNAPSHOT_CHUNKS {
        return Err(SnapshotError::Corrupt("bitmap length"));
    }
    let bytes = (count as usize).div_ceil(8);
    let bits = region
        .get(BITMAP_HEADER..BITMAP_HEADER + bytes)
        .ok_or(SnapshotError::Corrupt("short bitmap"))?;
    if crc32c::crc32c(bits) != u32::from_le_bytes(word(region, 24)) {
        return Err(SnapshotError::Corrupt("bitmap checksum"));
    }
    Ok(Some(
        (0..count as usize)
            .map(|i| bits[i / 8] & (1 << (i % 8)) != 0)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_table_is_epoch_one_and_tables_round_trip() {
        let zero = vec![0u8; HEADER_LEN];
        assert_eq!(SnapshotTable::decode(&zero), Ok(SnapshotTable::default()));
        let table = plan_create(&SnapshotTable::default(), "v", 64, "s1", 1234).unwrap();
        assert_eq!(table.epoch, 2);
        assert_eq!(table.snapshots[0].seq, 1);
        assert_eq!(SnapshotTable::decode(&table.encode()), Ok(table.clone()));
        let mut damaged = table.encode();
        damaged[40] ^= 1;
        assert!(matches!(
            SnapshotTable::decode(&damaged),
            Err(SnapshotError::Corrupt(_))
        ));
    }

    #[test]
    fn bad_names_taken_names_and_a_second_snapshot_are_refused() {
        let empty = SnapshotTable::default();
        for bad in ["", "a/b", "v@s", "x\n"] {
            assert!(matches!(
                plan_create(&empty, "v", 1, bad, 0),
                Err(SnapshotError::Invalid(_))
            ));
        }
        assert!(matches!(
            plan_create(&empty, "v", MAX_SNAPSHOT_CHUNKS + 1, "s", 0),
            Err(SnapshotError::Invalid(_))
        ));
        let one = plan_create(&empty, "v", 1, "s1", 0).unwrap();
        assert!(matches!(
            plan_create(&one, "v", 1, "s1", 0),
            Err(SnapshotError::Exists { .. })
        ));
        assert!(matches!(
            plan_create(&one, "v", 1, "s2", 0),
            Err(SnapshotError::OnlyOne { .. })
        ));
    }

    #[test]
    fn deletion_marks_then_drops_and_the_epoch_only_grows() {
        let one = plan_create(&SnapshotTable::default(), "v", 1, "s1", 0).unwrap();
        assert!(matches!(
            plan_drop(&one, "v", "s1"),
            Err(SnapshotError::State { .. })
        ));
        assert!(matches!(
            plan_deleting(&one, "v", "nope"),
            Err(SnapshotError::Unknown { .. })
        ));
        let marked = plan_deleting(&one, "v", "s1").unwrap();
        assert!(marked.snapshots[0].deleting);
        assert_eq!(plan_deleting(&marked, "v", "s1"), Ok(marked.clone()));
        let gone = plan_drop(&marked, "v", "s1").unwrap();
        assert!(gone.snapshots.is_empty());
        assert_eq!(gone.epoch, 2);
        let again = plan_create(&gone, "v", 1, "s2", 0).unwrap();
        assert_eq!((again.snapshots[0].seq, again.epoch), (2, 3));
    }

    #[test]
    fn bitmaps_round_trip_and_belong_to_their_sequence_number() {
        let existed: Vec<bool> = (0..1000).map(|i| i % 3 == 0).collect();
        let region = encode_bitmap(7, &existed);
        assert_eq!(region.len() % 4096, 0);
        assert_eq!(decode_bitmap(&region, 7), Ok(Some(existed)));
        assert_eq!(decode_bitmap(&region, 8), Ok(None));
        assert_eq!(decode_bitmap(&vec![0u8; 4096], 7), Ok(None));
        let mut damaged = region.clone();
        damaged[BITMAP_HEADER + 3] ^= 1;
        assert!(decode_bitmap(&damaged, 7).is_err());
        assert!(bitmap_offset(MAX_SNAPSHOTS - 1) + BITMAP_REGION <= 16 << 20);
    }
}
