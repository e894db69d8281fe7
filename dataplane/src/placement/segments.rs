//! Volumes as segments (issue 18): a volume is a run of fixed-size segments, each a run of
//! chunks; a segment's chunks are given copysets when the segment is first written, round
//! robin over the pool's copysets (Curve's chunk allocator), and chunk ids follow from the
//! volume and the chunk's place in it, so no id counter is needed.

use crate::ids::{ChunkId, CopysetId};

/// Bit 63 marks metadata chunks (the volume table's); data chunk ids never set it.
const METADATA_BIT: u64 = 1 << 63;

/// A volume's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentLayout {
    /// Bytes per segment, a multiple of the chunk size.
    pub segment_size: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
}

/// Why a layout or an id cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// The segment is not a whole, positive number of chunks.
    #[error("a segment of {segment_size} bytes is not a whole number of {chunk_size}-byte chunks")]
    Geometry {
        /// Bytes per segment.
        segment_size: u64,
        /// Bytes per chunk.
        chunk_size: u64,
    },
    /// The chunk index does not fit the id's 32 bits, or the volume id its 31.
    #[error("chunk {index} of volume {volume} has no id: volumes are ids below 2^31 with at most 2^32 chunks")]
    IdRange {
        /// The volume.
        volume: u64,
        /// The chunk's index in it.
        index: u64,
    },
    /// The pool has no copyset to place chunks on.
    #[error("the pool has no copyset")]
    EmptyPool,
}

impl SegmentLayout {
    /// A layout, checked.
    pub fn new(segment_size: u64, chunk_size: u64) -> Result<SegmentLayout, SegmentError> {
        if chunk_size == 0 || segment_size == 0 || segment_size % chunk_size != 0 {
            return Err(SegmentError::Geometry {
                segment_size,
                chunk_size,
            });
        }
        Ok(SegmentLayout {
            segment_size,
            chunk_size,
        })
    }

    /// Chunks per segment.
    pub fn chunks_per_segment(&self) -> u64 {
        self.segment_size / self.chunk_size
    }

    /// The segment holding byte `offset` of the volume.
    pub fn segment_of(&self, offset: u64) -> u64 {
        offset / self.segment_size
    }

    /// The index in the volume of the chunk holding byte `offset`.
    pub fn chunk_index_of(&self, offset: u64) -> u64 {
        offset / self.chunk_size
    }
}

/// The id of chunk `index` of volume `volume`: `(volume << 32) | index`, bit 63 clear.
pub fn chunk_id(volume: u64, index: u64) -> Result<ChunkId, SegmentError> {
    if volume >= 1 << 31 || index >= 1 << 32 {
        return Err(SegmentError::IdRange { volume, index });
    }
    let id = (volume << 32) | index;
    debug_assert_eq!(id & METADATA_BIT, 0);
    Ok(ChunkId(id))
}

/// The volume and index a data chunk id stands for (`None` for a metadata chunk).
pub fn chunk_place(id: ChunkId) -> Option<(u64, u64)> {
    (id.0 & METADATA_BIT == 0).then_some((id.0 >> 32, id.0 & 0xFFFF_FFFF))
}

/// Gives segments' chunks their copysets, round robin over a pool, carrying on where the last
/// segment stopped (`cursor`, persisted with the pool, starts anywhere in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentAllocator {
    /// The next copyset's position in the pool.
    pub cursor: u64,
}

impl SegmentAllocator {
    /// The copysets of a segment's `chunks` chunks, in chunk order.
    pub fn allocate(
        &mut self,
        pool: &[CopysetId],
        chunks: u64,
    ) -> Result<Vec<CopysetId>, SegmentError> {
        if pool.is_empty() {
            return Err(SegmentError::EmptyPool);
        }
        let n = pool.len() as u64;
        let placed = (0..chunks)
            .map(|i| pool[((self.cursor + i) % n) as usize])
            .collect();
        self.cursor = (self.cursor + chunks) % n;
        Ok(placed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_segment_is_whole_chunks() {
        let layout = SegmentLayout::new(1 << 30, 16 << 20).expect("1 GiB of 16 MiB chunks");
        assert_eq!(layout.chunks_per_segment(), 64);
        assert_eq!(layout.segment_of((1 << 30) + 5), 1);
        assert_eq!(layout.chunk_index_of((1 << 30) + (16 << 20)), 65);
        for (segment, chunk) in [(0, 4096), (4096, 0), (1 << 20, 3 << 19)] {
            assert!(
                SegmentLayout::new(segment, chunk).is_err(),
                "{segment}/{chunk}"
            );
        }
    }

    #[test]
    fn chunk_ids_pack_the_volume_and_the_index() {
        let id = chunk_id(7, 65).expect("an id");
        assert_eq!(id, ChunkId((7 << 32) | 65));
        assert_eq!(chunk_place(id), Some((7, 65)));
        assert_eq!(chunk_place(ChunkId(u64::MAX - 1)), None, "metadata chunk");
        assert!(chunk_id(1 << 31, 0).is_err());
        assert!(chunk_id(1, 1 << 32).is_err());
    }

    #[test]
    fn segments_spread_their_chunks_round_robin_and_carry_on() {
        let pool: Vec<CopysetId> = (1..=10).map(CopysetId).collect();
        let mut allocator = SegmentAllocator { cursor: 3 };
        let first = allocator.allocate(&pool, 64).expect("placed");
        assert_eq!(first[0], CopysetId(4));
        let second = allocator.allocate(&pool, 64).expect("placed");
        // The second segment starts where the first stopped: 128 chunks over 10 copysets
        // give each 12 or 13.
        assert_eq!(second[0], pool[((3 + 64) % 10) as usize]);
        let mut load: BTreeMap<CopysetId, usize> = BTreeMap::new();
        for copyset in first.iter().chain(second.iter()) {
            *load.entry(*copyset).or_default() += 1;
        }
        assert_eq!(load.len(), 10);
        assert!(load.values().all(|&n| n == 12 || n == 13), "{load:?}");
        assert_eq!(
            SegmentAllocator { cursor: 0 }.allocate(&[], 4),
            Err(SegmentError::EmptyPool)
        );
    }
}
