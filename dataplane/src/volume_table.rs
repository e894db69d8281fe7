//! The volume table: which volumes exist and where their chunks are, kept replicated in one
//! chunk of the metadata copyset, so any client opens a volume by name.
//!
//! The table chunk is an array of 4 KiB records, one volume each; an all-zero record is free.
//! Creating and deleting volumes are raft entries of the metadata copyset
//! (`ChunkOp::VolumeCreate`, `ChunkOp::VolumeDelete`) that every replica applies to its copy
//! of the chunk with [`plan_create`] and [`plan_delete`]: the same log on the same table gives
//! the same result, so "the name exists" or "the table is full" are decided once, in log
//! order, and two clients creating one name cannot both succeed. Reads are linearizable reads
//! of the chunk. Pure: no I/O.

use crate::ids::{ChunkId, CopysetId};

/// The copyset that holds the volume table.
pub const METADATA_COPYSET: CopysetId = crate::ids::METADATA_COPYSET;
/// The chunk of the metadata copyset that holds the table.
pub const TABLE_CHUNK: ChunkId = ChunkId(u64::MAX - 1);
/// Bytes per record (one page).
pub const RECORD_LEN: usize = 4096;
/// The longest volume name, in bytes of UTF-8.
pub const MAX_NAME: usize = 255;
/// Chunk ids of single-copyset volumes start here, far above ids that other writers use.
pub const FIRST_VOLUME_CHUNK: u64 = 1 << 40;
/// Striped volumes' ids start here: their chunk ids `(id << 32) | index` stay above the
/// single-copyset volumes' (`FIRST_VOLUME_CHUNK` is id 256's first chunk).
pub const FIRST_STRIPED_ID: u64 = 512;
/// Striped volumes' ids stay below this (chunk ids keep bit 63 clear).
pub const LAST_STRIPED_ID: u64 = 1 << 31;

const MAGIC: u32 = 0x564f_4c31; // "VOL1"
const FIXED: usize = 4 + 1 + 8 + 8 + 8 + 8 + 1;

/// Where a volume's chunks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeLayout {
    /// Every chunk in one copyset (record version 1): chunk `first_chunk + i` holds bytes
    /// `[i * chunk_size, …)`.
    Single {
        /// The copyset that holds its chunks.
        copyset: CopysetId,
        /// Its first chunk.
        first_chunk: ChunkId,
    },
    /// Segments over the pool's copysets (record version 2): chunk `i` is
    /// `placement::chunk_id(id, i)`, in the copyset its segment's record names
    /// (`placement::tables`), allocated on the segment's first write.
    Striped {
        /// The volume's id (for chunk ids and its segment table).
        id: u64,
        /// Bytes per segment, a multiple of the chunk size.
        segment_size: u64,
    },
}

impl std::fmt::Display for VolumeLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeLayout::Single {
                copyset,
                first_chunk,
            } => write!(f, "copyset {copyset} from chunk {first_chunk}"),
            VolumeLayout::Striped { id, segment_size } => write!(
                f,
                "striped over the pool (id {id}, segments of {segment_size} bytes)"
            ),
        }
    }
}

/// One volume as the table records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Its name.
    pub name: String,
    /// Size in bytes (a multiple of the page size).
    pub size: u64,
    /// The chunk size it was laid out with.
    pub chunk_size: u64,
    /// Where its chunks are.
    pub layout: VolumeLayout,
}

impl VolumeRecord {
    /// How many chunks it spans.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size.max(1))
    }

    /// How many segments it spans (1 for a single-copyset volume).
    pub fn segments(&self) -> u64 {
        match self.layout {
            VolumeLayout::Single { .. } => 1,
            VolumeLayout::Striped { segment_size, .. } => self.size.div_ceil(segment_size.max(1)),
        }
    }

    /// Encodes into one record: magic u32, version u8, size u64, then for version 1 the
    /// copyset u64 and first chunk u64, for version 2 the volume id u64 and segment size u64;
    /// chunk size u64, name length u8, name, zeroes, and a CRC32C of the record's other bytes
    /// in its last 4 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; RECORD_LEN];
        let name = self.name.as_bytes();
        let (version, a, b) = match self.layout {
            VolumeLayout::Single {
                copyset,
                first_chunk,
            } => (1u8, copyset.0, first_chunk.0),
            VolumeLayout::Striped { id, segment_size } => (2u8, id, segment_size),
        };
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&MAGIC.to_le_bytes());
        put(&[version]);
        put(&self.size.to_le_bytes());
        put(&a.to_le_bytes());
        put(&b.to_le_bytes());
        put(&self.chunk_size.to_le_bytes());
        put(&[name.len().min(MAX_NAME) as u8]);
        put(&name[..name.len().min(MAX_NAME)]);
        let crc = crc32c::crc32c(&out[..RECORD_LEN - 4]);
        out[RECORD_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a record: `Ok(None)` for a free (all-zero) one.
    pub fn decode(record: &[u8]) -> Result<Option<VolumeRecord>, TableError> {
        if record.len() != RECORD_LEN {
            return Err(TableError::Corrupt("a record is not one page".into()));
        }
        if record.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&record[RECORD_LEN - 4..]);
        if u32::from_le_bytes(crc) != crc32c::crc32c(&record[..RECORD_LEN - 4]) {
            return Err(TableError::Corrupt(
                "a record's checksum does not match".into(),
            ));
        }
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&record[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&record[..4]);
        let layout = match (u32::from_le_bytes(magic), record[4]) {
            (MAGIC, 1) => VolumeLayout::Single {
                copyset: CopysetId(u64_at(13)),
                first_chunk: ChunkId(u64_at(21)),
            },
            (MAGIC, 2) => VolumeLayout::Striped {
                id: u64_at(13),
                segment_size: u64_at(21),
            },
            _ => return Err(TableError::Corrupt("a record of another format".into())),
        };
        let name_len = usize::from(record[FIXED - 1]);
        let name = std::str::from_utf8(&record[FIXED..FIXED + name_len])
            .map_err(|_| TableError::Corrupt("a name that is not UTF-8".into()))?;
        Ok(Some(VolumeRecord {
            name: name.to_string(),
            size: u64_at(5),
            chunk_size: u64_at(29),
            layout,
        }))
    }
}

/// Why a table operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// A volume of that name exists.
    #[error("volume {0:?} exists already")]
    Exists(String),
    /// No volume of that name.
    #[error("no volume named {0:?}")]
    NotFound(String),
    /// Every record is taken.
    #[error("the volume table is full ({0} volumes)")]
    Full(usize),
    /// A name or size the table cannot take.
    #[error("{0}")]
    Invalid(String),
    /// The table chunk holds something that is not a table.
    #[error("the volume table is corrupt: {0}")]
    Corrupt(String),
}

/// Every volume of a table chunk, with its record index.
pub fn list(table: &[u8]) -> Result<Vec<(usize, VolumeRecord)>, TableError> {
    let mut volumes = Vec::new();
    for (index, record) in table.chunks_exact(RECORD_LEN).enumerate() {
        if let Some(volume) = VolumeRecord::decode(record)? {
            volumes.push((index, volume));
        }
    }
    Ok(volumes)
}

/// The volume named `name`.
pub fn find(table: &[u8], name: &str) -> Result<VolumeRecord, TableError> {
    list(table)?
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v.name == name)
        .ok_or_else(|| TableError::NotFound(name.to_string()))
}

/// Checks a volume name: 1 to [`MAX_NAME`] bytes, no `/`, no control characters.
pub fn check_name(name: &str) -> Result<(), TableError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(TableError::Invalid(format!(
            "a volume name has 1 to {MAX_NAME} bytes, not {}",
            name.len()
        )));
    }
    if name.chars().any(|c| c == '/' || c.is_control()) {
        return Err(TableError::Invalid(format!(
            "volume name {name:?} has a '/' or a control character"
        )));
    }
    Ok(())
}

/// Where a new volume goes: the free record to write and the record itself, its chunks the
/// next unused run after every existing volume's.
pub fn plan_create(
    table: &[u8],
    name: &str,
    size: u64,
    copyset: CopysetId,
    chunk_size: u64,
) -> Result<(usize, VolumeRecord), TableError> {
    check_name(name)?;
    check_size(size)?;
    if copyset == METADATA_COPYSET || copyset.0 == 0 {
        return Err(TableError::Invalid(format!(
            "copyset {copyset} cannot hold a volume"
        )));
    }
    let volumes = list(table)?;
    if volumes.iter().any(|(_, v)| v.name == name) {
        return Err(TableError::Exists(name.to_string()));
    }
    let index = free_record(table, &volumes)?;
    let first_chunk = volumes
        .iter()
        .filter_map(|(_, v)| match v.layout {
            VolumeLayout::Single { first_chunk, .. } => {
                Some(first_chunk.0.saturating_add(v.chunks()))
            }
            VolumeLayout::Striped { .. } => None,
        })
        .max()
        .unwrap_or(FIRST_VOLUME_CHUNK)
        .max(FIRST_VOLUME_CHUNK);
    let record = VolumeRecord {
        name: name.to_string(),
        size,
        chunk_size,
        layout: VolumeLayout::Single {
            copyset,
            first_chunk: ChunkId(first_chunk),
        },
    };
    Ok((index, record))
}

/// Where a new striped volume goes: the free record and the record, with volume id `id`.
/// Refused when the name exists, the size is not whole pages, the segment is not whole chunks
/// or places more than a segment record holds, the volume has more segments than its segment
/// table (one chunk) holds, or the id is out of range or taken.
///
/// The metadata copyset passes `FIRST_STRIPED_ID + ` the entry's log index, so an id is never
/// used twice, not even after its volume is deleted: a writer that still holds a deleted
/// volume's map cannot write into a new volume's chunks.
pub fn plan_create_striped(
    table: &[u8],
    name: &str,
    size: u64,
    chunk_size: u64,
    segment_size: u64,
    id: u64,
) -> Result<(usize, VolumeRecord), TableError> {
    use crate::placement::tables::{MAX_CHUNKS_PER_SEGMENT, SEGMENT_RECORD_LEN};
    check_name(name)?;
    check_size(size)?;
    if chunk_size == 0 || segment_size == 0 || segment_size % chunk_size != 0 {
        return Err(TableError::Invalid(format!(
            "a segment of {segment_size} bytes is not a whole number of {chunk_size}-byte chunks"
        )));
    }
    if segment_size / chunk_size > MAX_CHUNKS_PER_SEGMENT {
        return Err(TableError::Invalid(format!(
            "a segment of {segment_size} bytes has {} chunks of {chunk_size}; at most \
             {MAX_CHUNKS_PER_SEGMENT}",
            segment_size / chunk_size
        )));
    }
    let max_segments = chunk_size / SEGMENT_RECORD_LEN as u64;
    if size.div_ceil(segment_size) > max_segments {
        return Err(TableError::Invalid(format!(
            "a volume of {size} bytes has more than the {max_segments} segments of \
             {segment_size} bytes a segment table holds: at most {} bytes",
            max_segments.saturating_mul(segment_size)
        )));
    }
    let volumes = list(table)?;
    if volumes.iter().any(|(_, v)| v.name == name) {
        return Err(TableError::Exists(name.to_string()));
    }
    let index = free_record(table, &volumes)?;
    if !(FIRST_STRIPED_ID..LAST_STRIPED_ID).contains(&id) {
        return Err(TableError::Invalid(format!(
            "volume id {id} is outside {FIRST_STRIPED_ID}..{LAST_STRIPED_ID}"
        )));
    }
    if volumes
        .iter()
        .any(|(_, v)| matches!(v.layout, VolumeLayout::Striped { id: taken, .. } if taken == id))
    {
        return Err(TableError::Invalid(format!("volume id {id} is taken")));
    }
    let record = VolumeRecord {
        name: name.to_string(),
        size,
        chunk_size,
        layout: VolumeLayout::Striped { id, segment_size },
    };
    Ok((index, record))
}

/// The striped volume with id `id`.
pub fn find_striped(table: &[u8], id: u64) -> Result<VolumeRecord, TableError> {
    list(table)?
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| matches!(v.layout, VolumeLayout::Striped { id: found, .. } if found == id))
        .ok_or_else(|| TableError::NotFound(format!("volume id {id}")))
}

fn check_size(size: u64) -> Result<(), TableError> {
    if size == 0 || size % 4096 != 0 {
        return Err(TableError::Invalid(format!(
            "a volume's size is a positive multiple of 4096 bytes, not {size}"
        )));
    }
    Ok(())
}

fn free_record(table: &[u8], volumes: &[(usize, VolumeRecord)]) -> Result<usize, TableError> {
    let records = table.len() / RECORD_LEN;
    let taken: std::collections::BTreeSet<usize> = volumes.iter().map(|(i, _)| *i).collect();
    (0..records)
        .find(|i| !taken.contains(i))
        .ok_or(TableError::Full(records))
}

/// The record index of the volume to delete.
pub fn plan_delete(table: &[u8], name: &str) -> Result<(usize, VolumeRecord), TableError> {
    list(table)?
        .into_iter()
        .find(|(_, v)| v.name == name)
        .ok_or_else(|| TableError::NotFound(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(table: &mut [u8], index: usize, record: Option<&VolumeRecord>) {
        let bytes = record.map_or_else(|| vec![0u8; RECORD_LEN], VolumeRecord::encode);
        table[index * RECORD_LEN..(index + 1) * RECORD_LEN].copy_from_slice(&bytes);
    }

    fn first(volume: &VolumeRecord) -> ChunkId {
        match volume.layout {
            VolumeLayout::Single { first_chunk, .. } => first_chunk,
            VolumeLayout::Striped { .. } => panic!("a striped volume"),
        }
    }

    #[test]
    fn striped_volumes_get_ids_and_bounded_geometry_beside_single_ones() {
        let mut table = vec![0u8; 4 * RECORD_LEN];
        let (index, single) = plan_create(&table, "s", 64 << 20, CopysetId(2), 16 << 20).unwrap();
        apply(&mut table, index, Some(&single));
        let (index, a) =
            plan_create_striped(&table, "a", 8 << 30, 16 << 20, 1 << 30, FIRST_STRIPED_ID).unwrap();
        assert_eq!(
            a.layout,
            VolumeLayout::Striped {
                id: FIRST_STRIPED_ID,
                segment_size: 1 << 30
            }
        );
        assert_eq!((a.chunks(), a.segments()), (512, 8));
        apply(&mut table, index, Some(&a));
        assert_eq!(VolumeRecord::decode(&a.encode()).unwrap(), Some(a.clone()));
        let (_, b) = plan_create_striped(&table, "b", 4096, 16 << 20, 1 << 30, 900).unwrap();
        assert!(matches!(b.layout, VolumeLayout::Striped { id: 900, .. }));
        for id in [FIRST_STRIPED_ID, 5, LAST_STRIPED_ID] {
            assert!(
                matches!(
                    plan_create_striped(&table, "b", 4096, 16 << 20, 1 << 30, id),
                    Err(TableError::Invalid(_))
                ),
                "id {id}: taken or out of range"
            );
        }
        assert_eq!(find_striped(&table, FIRST_STRIPED_ID).unwrap(), a);
        assert!(find_striped(&table, 7).is_err());
        assert_eq!(
            plan_create_striped(&table, "a", 4096, 16 << 20, 1 << 30, 901),
            Err(TableError::Exists("a".into()))
        );
        // A segment that is not whole chunks, one too many chunks for a record, a volume
        // past what one segment table holds (4096 segments of a 16 MiB table chunk).
        for (size, segment) in [
            (4096, 3 << 20),
            (4096, 16 << 30),
            ((4097u64) << 30, 1 << 30),
        ] {
            assert!(
                matches!(
                    plan_create_striped(&table, "c", size, 16 << 20, segment, 902),
                    Err(TableError::Invalid(_))
                ),
                "{size} {segment}"
            );
        }
        assert!(plan_create_striped(&table, "c", 4096 << 30, 16 << 20, 1 << 30, 902).is_ok());
    }

    #[test]
    fn volumes_are_created_found_listed_and_deleted() {
        let mut table = vec![0u8; 4 * RECORD_LEN];
        let (index, a) = plan_create(&table, "a", 64 << 20, CopysetId(2), 1 << 20).unwrap();
        assert_eq!((index, first(&a)), (0, ChunkId(FIRST_VOLUME_CHUNK)));
        apply(&mut table, index, Some(&a));
        let (index, b) = plan_create(&table, "b", 4096, CopysetId(3), 1 << 20).unwrap();
        assert_eq!(index, 1);
        assert_eq!(
            first(&b),
            ChunkId(FIRST_VOLUME_CHUNK + 64),
            "after a's 64 chunks"
        );
        apply(&mut table, index, Some(&b));
        assert_eq!(find(&table, "b").unwrap(), b);
        assert_eq!(
            plan_create(&table, "a", 4096, CopysetId(2), 1 << 20),
            Err(TableError::Exists("a".into()))
        );
        let (index, _) = plan_delete(&table, "a").unwrap();
        apply(&mut table, index, None);
        let names: Vec<String> = list(&table)
            .unwrap()
            .into_iter()
            .map(|(_, v)| v.name)
            .collect();
        assert_eq!(names, vec!["b".to_string()]);
        assert_eq!(
            plan_delete(&table, "a"),
            Err(TableError::NotFound("a".into()))
        );
        // A freed record is reused; chunk ids are never handed out twice while b exists.
        let (index, c) = plan_create(&table, "c", 4096, CopysetId(2), 1 << 20).unwrap();
        assert_eq!(index, 0);
        assert_eq!(first(&c), ChunkId(FIRST_VOLUME_CHUNK + 65));
    }

    #[test]
    fn bad_names_sizes_a_full_table_and_corruption_are_refused() {
        let mut table = vec![0u8; RECORD_LEN];
        for (name, size) in [("", 4096), ("a/b", 4096), ("a", 100), ("a", 0)] {
            assert!(matches!(
                plan_create(&table, name, size, CopysetId(2), 1 << 20),
                Err(TableError::Invalid(_))
            ));
        }
        assert!(plan_create(&table, "x", 4096, METADATA_COPYSET, 1 << 20).is_err());
        let long = "v".repeat(MAX_NAME + 1);
        assert!(plan_create(&table, &long, 4096, CopysetId(2), 1 << 20).is_err());
        let (index, a) = plan_create(&table, "a", 4096, CopysetId(2), 1 << 20).unwrap();
        apply(&mut table, index, Some(&a));
        assert_eq!(
            plan_create(&table, "b", 4096, CopysetId(2), 1 << 20),
            Err(TableError::Full(1))
        );
        table[100] ^= 1;
        assert!(matches!(list(&table), Err(TableError::Corrupt(_))));
    }
}
