//! The chunk table of one shard: which slot holds which chunk, the free slots (the chunk
//! pool), and the encoding of the on-disk metadata pages. Pure: no I/O.
//!
//! Memory is fixed at open, sized from the slot count: 48 bytes of [`SlotMeta`] per slot, an
//! open-addressing index of 4-byte slot numbers at a load of at most 3/4, and one bit per slot
//! of free map — at most 59 bytes per chunk (see [`ChunkTable::memory_bytes`]).

use std::collections::BTreeSet;

use crate::storage::layout::{Reader, Writer, META_ENTRY_LEN};

pub use crate::ids::ChunkId;

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SlotState {
    /// Nothing; its bytes read as zeroes.
    Free = 0,
    /// A chunk's current data.
    Chunk = 1,
    /// The copy-on-write snapshot pages of the chunk in the slot `link`.
    Snapshot = 2,
    /// Taken out of the pool while its bytes are zeroed; free again afterwards.
    Releasing = 3,
}

/// No slot.
pub const NO_SLOT: u32 = u32::MAX;

/// Flag: the chunk is a lazy clone; pages not marked in its bitmap read from `source`.
pub const FLAG_CLONE: u8 = 1;

/// One slot's metadata, in memory and (as a 64-byte entry) on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotMeta {
    /// The chunk it belongs to (its own, or the one it is a snapshot of).
    pub chunk: ChunkId,
    /// The chunk's sequence number; for a snapshot slot, the snapshot's.
    pub sn: u64,
    /// Curve's corrected sn: a write with an sn not above it makes no snapshot. For a clone,
    /// the source chunk id.
    pub aux: u64,
    /// The log index of the last entry applied to the chunk (0: none recorded). Replaying an
    /// entry at or below it changes nothing, which makes recovery's re-apply idempotent even
    /// for snapshot operations.
    pub applied: u64,
    /// The chunk's snapshot slot, or a snapshot slot's chunk slot; [`NO_SLOT`] when none.
    pub link: u32,
    /// What the slot holds.
    pub state: SlotState,
    /// [`FLAG_CLONE`].
    pub flags: u8,
    /// The copyset whose log writes the chunk (0: not recorded — a chunk written outside a
    /// copyset, or by an image from before this field). A snapshot slot carries its chunk's.
    pub copyset: u64,
}

impl SlotMeta {
    /// A free slot.
    pub const FREE: SlotMeta = SlotMeta {
        chunk: ChunkId(0),
        sn: 0,
        aux: 0,
        applied: 0,
        link: NO_SLOT,
        state: SlotState::Free,
        flags: 0,
        copyset: 0,
    };

    fn encode(&self, out: &mut [u8]) {
        let mut w = Writer::new(out);
        // A slot being released stays marked so on disk: recovery finishes zeroing it.
        w.u8(self.state as u8);
        w.u8(self.flags);
        w.u16(0);
        w.u32(self.link);
        w.u64(self.chunk.0);
        w.u64(self.sn);
        w.u64(self.aux);
        w.u64(self.applied);
        w.u64(self.copyset);
    }

    fn decode(bytes: &[u8]) -> Result<SlotMeta, String> {
        let mut r = Reader::new(bytes);
        let state = match r.u8() {
            0 => SlotState::Free,
            1 => SlotState::Chunk,
            2 => SlotState::Snapshot,
            3 => SlotState::Releasing,
            other => return Err(format!("unknown slot state {other}")),
        };
        let flags = r.u8();
        let _reserved = r.u16();
        let link = r.u32();
        let chunk = ChunkId(r.u64());
        let sn = r.u64();
        let aux = r.u64();
        let applied = r.u64();
        let copyset = r.u64();
        if r.overrun() {
            return Err("entry shorter than its fields".into());
        }
        if state == SlotState::Free {
            return Ok(SlotMeta::FREE);
        }
        if state == SlotState::Releasing {
            return Ok(SlotMeta {
                state,
                ..SlotMeta::FREE
            });
        }
        Ok(SlotMeta {
            chunk,
            sn,
            aux,
            applied,
            link,
            state,
            flags,
            copyset,
        })
    }
}

/// Why a table operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Every slot is in use.
    #[error("no free chunk slot is left on this shard ({slots} slots)")]
    NoSpace {
        /// Slots of the shard.
        slots: u32,
    },
    /// A metadata page does not describe a consistent table.
    #[error("chunk metadata page {page}: {reason}")]
    Inconsistent {
        /// The page.
        page: u32,
        /// What is wrong.
        reason: String,
    },
    /// The chunk exists already (two creations raced; the caller decides who wins).
    #[error("chunk {chunk} exists already")]
    ChunkExists {
        /// The chunk.
        chunk: ChunkId,
    },
}

/// Open-addressing map from chunk id to slot, storing only slot numbers (the key is the
/// slot's `chunk`). Linear probing, deletion by backward shift, so no tombstones.
#[derive(Debug)]
struct ChunkIndex {
    /// `slot + 1`, or 0 for an empty bucket. Invariant: length is a power of two, and at most
    /// 3/4 of it is used (the table never holds more chunks than slots).
    buckets: Vec<u32>,
    shift: u32,
}

impl ChunkIndex {
    fn new(slots: u32) -> ChunkIndex {
        let wanted = (u64::from(slots) * 4 / 3 + 1).next_power_of_two().max(8);
        ChunkIndex {
            buckets: vec![0; wanted as usize],
            shift: 64 - wanted.trailing_zeros(),
        }
    }

    fn home(&self, chunk: ChunkId) -> usize {
        (chunk.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    fn find(&self, chunk: ChunkId, slots: &[SlotMeta]) -> Option<(usize, u32)> {
        let mut at = self.home(chunk);
        loop {
            let entry = self.buckets[at];
            if entry == 0 {
                return None;
            }
            let slot = entry - 1;
            if slots.get(slot as usize).map(|m| m.chunk) == Some(chunk) {
                return Some((at, slot));
            }
            at = (at + 1) & self.mask();
        }
    }

    fn insert(&mut self, chunk: ChunkId, slot: u32) {
        let mut at = self.home(chunk);
        while self.buckets[at] != 0 {
            at = (at + 1) & self.mask();
        }
        self.buckets[at] = slot + 1;
    }

    fn remove_at(&mut self, mut hole: usize, slots: &[SlotMeta]) {
        self.buckets[hole] = 0;
        let mut at = hole;
        loop {
            at = (at + 1) & self.mask();
            let entry = self.buckets[at];
            if entry == 0 {
                return;
            }
            let chunk = slots[(entry - 1) as usize].chunk;
            let home = self.home(chunk);
            // The entry may move back into the hole if its home is not in (hole, at].
            let distance_home = at.wrapping_sub(home) & self.mask();
            let distance_hole = at.wrapping_sub(hole) & self.mask();
            if distance_home >= distance_hole {
                self.buckets[hole] = entry;
                self.buckets[at] = 0;
                hole = at;
            }
        }
    }
}

/// The chunk table and chunk pool of one shard.
#[derive(Debug)]
pub struct ChunkTable {
    /// Invariant: a slot in `Chunk` state is in `index`; a `Free` slot has its bit in `free`.
    slots: Vec<SlotMeta>,
    index: ChunkIndex,
    /// One bit per slot, set when the slot is free.
    free: Vec<u64>,
    free_count: u32,
    entries_per_page: u32,
    /// Metadata pages changed since the last checkpoint took them.
    dirty: BTreeSet<u32>,
}

impl ChunkTable {
    /// An empty table of `slots` slots whose metadata pages hold `entries_per_page` entries.
    pub fn new(slots: u32, entries_per_page: u32) -> ChunkTable {
        assert!(entries_per_page > 0 && slots < u32::MAX);
        let words = slots.div_ceil(64) as usize;
        let mut free = vec![u64::MAX; words];
        if slots % 64 != 0 {
            if let Some(last) = free.last_mut() {
                *last = (1u64 << (slots % 64)) - 1;
            }
        }
        ChunkTable {
            slots: vec![SlotMeta::FREE; slots as usize],
            index: ChunkIndex::new(slots),
            free,
            free_count: slots,
            entries_per_page,
            dirty: BTreeSet::new(),
        }
    }

    /// How many slots.
    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// How many slots are free.
    pub fn free_count(&self) -> u32 {
        self.free_count
    }

    /// Bytes of memory the table holds.
    pub fn memory_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<SlotMeta>()
            + self.index.buckets.capacity() * 4
            + self.free.capacity() * 8
    }

    /// The slot holding `chunk`'s current data.
    pub fn lookup(&self, chunk: ChunkId) -> Option<u32> {
        self.index.find(chunk, &self.slots).map(|(_, slot)| slot)
    }

    /// A slot's metadata.
    pub fn slot(&self, slot: u32) -> Option<&SlotMeta> {
        self.slots.get(slot as usize)
    }

    fn mark_dirty(&mut self, slot: u32) {
        self.dirty.insert(slot / self.entries_per_page);
    }

    fn set_free_bit(&mut self, slot: u32, free: bool) {
        let word = &mut self.free[(slot / 64) as usize];
        let bit = 1u64 << (slot % 64);
        let was = *word & bit != 0;
        if free && !was {
            *word |= bit;
            self.free_count += 1;
        } else if !free && was {
            *word &= !bit;
            self.free_count -= 1;
        }
    }

    /// Takes the lowest free slot out of the pool for `meta` (a chunk, or a snapshot of one).
    /// Creating a chunk costs no I/O: free slots already read as zeroes.
    pub fn allocate(&mut self, meta: SlotMeta) -> Result<u32, TableError> {
        assert!(matches!(meta.state, SlotState::Chunk | SlotState::Snapshot));
        if meta.state == SlotState::Chunk && self.lookup(meta.chunk).is_some() {
            return Err(TableError::ChunkExists { chunk: meta.chunk });
        }
        let word = self
            .free
            .iter()
            .position(|w| *w != 0)
            .ok_or(TableError::NoSpace {
                slots: self.slot_count(),
            })?;
        let slot = word as u32 * 64 + self.free[word].trailing_zeros();
        self.set_free_bit(slot, false);
        self.slots[slot as usize] = meta;
        if meta.state == SlotState::Chunk {
            self.index.insert(meta.chunk, slot);
        }
        self.mark_dirty(slot);
        Ok(slot)
    }

    /// Updates a slot's metadata in place (the state does not change).
    pub fn update(&mut self, slot: u32, meta: SlotMeta) {
        let current = &mut self.slots[slot as usize];
        assert_eq!(current.state, meta.state);
        assert_eq!(current.chunk, meta.chunk);
        *current = meta;
        self.mark_dirty(slot);
    }

    /// Gives the chunk `from` the id `to` (its slot, data and metadata stay): `to` must be
    /// free. No I/O; the next checkpoint records it.
    pub fn rename(&mut self, from: ChunkId, to: ChunkId) -> Result<(), TableError> {
        if self.lookup(to).is_some() {
            return Err(TableError::ChunkExists { chunk: to });
        }
        let Some((at, slot)) = self.index.find(from, &self.slots) else {
            return Err(TableError::Inconsistent {
                page: 0,
                reason: format!("chunk {from} to rename is not in the table"),
            });
        };
        self.index.remove_at(at, &self.slots);
        self.slots[slot as usize].chunk = to;
        self.index.insert(to, slot);
        self.mark_dirty(slot);
        Ok(())
    }

    /// Takes a slot out of use: a chunk leaves the index at once; the slot stays out of the
    /// pool (`Releasing`) until [`ChunkTable::release_done`], after its bytes are zeroed.
    pub fn release(&mut self, slot: u32) {
        let meta = self.slots[slot as usize];
        if meta.state == SlotState::Chunk {
            if let Some((at, _)) = self.index.find(meta.chunk, &self.slots) {
                self.index.remove_at(at, &self.slots);
            }
        }
        self.slots[slot as usize] = SlotMeta {
            state: SlotState::Releasing,
            ..SlotMeta::FREE
        };
        self.mark_dirty(slot);
    }

    /// Returns a zeroed slot to the pool.
    pub fn release_done(&mut self, slot: u32) {
        assert_eq!(self.slots[slot as usize].state, SlotState::Releasing);
        self.slots[slot as usize] = SlotMeta::FREE;
        self.set_free_bit(slot, true);
    }

    /// Metadata pages changed since the last call, which forgets them.
    pub fn take_dirty(&mut self) -> BTreeSet<u32> {
        std::mem::take(&mut self.dirty)
    }

    /// Marks pages dirty again (a checkpoint that failed to write them).
    pub fn restore_dirty(&mut self, pages: impl IntoIterator<Item = u32>) {
        self.dirty.extend(pages);
    }

    /// Encodes metadata page `page`'s entries into `body` (the page after its header).
    pub fn encode_page(&self, page: u32, body: &mut [u8]) {
        let first = (page * self.entries_per_page) as usize;
        let last = (first + self.entries_per_page as usize).min(self.slots.len());
        for (i, meta) in self.slots[first.min(last)..last].iter().enumerate() {
            meta.encode(&mut body[i * META_ENTRY_LEN..(i + 1) * META_ENTRY_LEN]);
        }
    }

    /// Loads metadata page `page` from its body (`None`: never written, all free).
    pub fn load_page(&mut self, page: u32, body: Option<&[u8]>) -> Result<(), TableError> {
        let Some(body) = body else { return Ok(()) };
        let first = page * self.entries_per_page;
        for i in 0..self.entries_per_page {
            let slot = first + i;
            if slot >= self.slot_count() {
                break;
            }
            let at = i as usize * META_ENTRY_LEN;
            let inconsistent = |reason: String| TableError::Inconsistent { page, reason };
            let bytes = body
                .get(at..at + META_ENTRY_LEN)
                .ok_or_else(|| inconsistent("page shorter than its entries".into()))?;
            let meta =
                SlotMeta::decode(bytes).map_err(|e| inconsistent(format!("slot {slot}: {e}")))?;
            if meta.state == SlotState::Free {
                continue;
            }
            if meta.state == SlotState::Chunk && self.lookup(meta.chunk).is_some() {
                return Err(inconsistent(format!(
                    "chunk {} is in slot {slot} and another",
                    meta.chunk
                )));
            }
            self.slots[slot as usize] = meta;
            self.set_free_bit(slot, false);
            if meta.state == SlotState::Chunk {
                self.index.insert(meta.chunk, slot);
            }
        }
        Ok(())
    }

    /// Every slot in `Chunk` state, with its chunk (for recovery checks and tests).
    pub fn chunks(&self) -> impl Iterator<Item = (ChunkId, u32)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, m)| m.state == SlotState::Chunk)
            .map(|(slot, m)| (m.chunk, slot as u32))
    }

    /// Runs of free slots as (first, count): what recovery zeroes.
    pub fn free_runs(&self) -> Vec<(u32, u32)> {
        let mut runs = Vec::new();
        let mut start = None;
        for slot in 0..=self.slot_count() {
            let free = slot < self.slot_count()
                && self.free[(slot / 64) as usize] & (1 << (slot % 64)) != 0;
            match (free, start) {
                (true, None) => start = Some(slot),
                (false, Some(first)) => {
                    runs.push((first, slot - first));
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    fn chunk(id: u64) -> SlotMeta {
        SlotMeta {
            chunk: ChunkId(id),
            sn: id + 1,
            state: SlotState::Chunk,
            ..SlotMeta::FREE
        }
    }

    #[test]
    fn the_table_agrees_with_a_model_under_random_operations() {
        for seed in 0..20u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let slots = rng.gen_range(1..300);
            let mut table = ChunkTable::new(slots, 63);
            let mut model: HashMap<u64, u32> = HashMap::new();
            for step in 0..2000 {
                // Ids from a small range so that lookups, collisions and re-creation happen.
                let id = rng.gen_range(0..400u64) * if rng.gen_bool(0.5) { 1 } else { 1 << 32 };
                match rng.gen_range(0..3) {
                    0 if !model.contains_key(&id) => match table.allocate(chunk(id)) {
                        Ok(slot) => {
                            assert!(!model.values().any(|s| *s == slot));
                            model.insert(id, slot);
                        }
                        Err(TableError::NoSpace { .. }) => assert_eq!(model.len(), slots as usize),
                        Err(e) => panic!("{e}"),
                    },
                    1 => {
                        if let Some(slot) = model.remove(&id) {
                            table.release(slot);
                            table.release_done(slot);
                        }
                    }
                    _ => {}
                }
                assert_eq!(
                    table.lookup(ChunkId(id)),
                    model.get(&id).copied(),
                    "seed {seed} step {step}: replay with this seed"
                );
                assert_eq!(table.free_count() as usize, slots as usize - model.len());
            }
            for (id, slot) in &model {
                assert_eq!(table.lookup(ChunkId(*id)), Some(*slot), "seed {seed}");
            }
        }
    }

    #[test]
    fn pages_round_trip_into_an_equal_table() {
        let mut table = ChunkTable::new(200, 63);
        for id in 0..150 {
            table.allocate(chunk(id * 7)).unwrap();
        }
        for id in (0..150).step_by(3) {
            let slot = table.lookup(ChunkId(id * 7)).unwrap();
            table.release(slot);
            table.release_done(slot);
        }
        let pages = table.take_dirty();
        assert_eq!(pages.len(), 3);
        let mut loaded = ChunkTable::new(200, 63);
        for page in pages {
            let mut body = vec![0u8; 4096 - 32];
            table.encode_page(page, &mut body);
            loaded.load_page(page, Some(&body)).unwrap();
        }
        assert_eq!(loaded.free_count(), table.free_count());
        assert_eq!(
            loaded.chunks().collect::<Vec<_>>(),
            table.chunks().collect::<Vec<_>>()
        );
        assert_eq!(loaded.free_runs(), table.free_runs());
    }

    #[test]
    fn a_page_naming_one_chunk_twice_is_refused() {
        let mut table = ChunkTable::new(10, 63);
        table.allocate(chunk(5)).unwrap();
        table.allocate(chunk(6)).unwrap();
        let mut body = vec![0u8; 4064];
        table.encode_page(0, &mut body);
        body[64 + 8..64 + 16].copy_from_slice(&5u64.to_le_bytes());
        let error = ChunkTable::new(10, 63)
            .load_page(0, Some(&body))
            .unwrap_err();
        assert!(error.to_string().contains("chunk 5"), "{error}");
        body[64] = 9;
        let error = ChunkTable::new(10, 63)
            .load_page(0, Some(&body))
            .unwrap_err();
        assert!(error.to_string().contains("unknown slot state"), "{error}");
    }

    #[test]
    fn a_table_for_4_tib_of_16_mib_chunks_costs_at_most_64_bytes_per_chunk() {
        let slots = (4u64 << 40) / (16 << 20);
        let table = ChunkTable::new(slots as u32, 63);
        let per_chunk = table.memory_bytes() as f64 / slots as f64;
        println!("chunk table: {per_chunk:.1} bytes per chunk for {slots} chunks");
        assert!(per_chunk <= 64.0, "{per_chunk}");
    }
}
