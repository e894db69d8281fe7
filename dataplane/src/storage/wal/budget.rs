//! How a shard's ring is shared between client data and raft's own state: the WAL's space
//! budget (pure).

use super::record::HEADER_LEN;
use super::WalConfig;

/// How a shard's ring is shared between client data and raft's own state (pure; see
/// docs/architecture.md, "WAL space").
///
/// *Live* bytes are the records of entries above their copyset's applied index: the only
/// records a checkpoint cannot reclaim. A checkpoint can always move them forward (append
/// them again and let the head pass their old copies), so ring use after it is bounded by
/// the live bytes alone, whatever copyset sits at the head: idle, quiescent, a follower that
/// lost its leader, or a group without quorum. Three bounds keep that possible:
/// - every append leaves room to move every live entry forward (`fits`);
/// - client data (a leader's proposals, a follower's replicated entries) is admitted only
///   while a reserve stays free beyond that (`admits`), so raft's control records — votes,
///   terms, commit indexes, membership, a new leader's no-op — always find room, if need be
///   after a checkpoint that moves the live entries;
/// - a checkpoint is due once half of the room client data may use is taken (`due`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalBudget {
    /// The ring's size.
    pub ring: u64,
    /// The largest batch.
    pub max_batch: u64,
    /// The device block size.
    pub block: u64,
}

/// The largest batch the engine writes by default.
pub const DEFAULT_MAX_BATCH: u64 = 4 << 20;

/// The largest batch of a ring of `ring` bytes on a device of `block`-byte blocks, for a
/// configured largest batch of `max_batch`: at most a quarter of the ring.
pub fn max_batch_for(ring: u64, block: u64, max_batch: u64) -> u64 {
    max_batch.min(ring / 4).max(block) / block * block
}

impl WalBudget {
    /// The budget of a ring the engine would open with its default largest batch.
    pub fn for_ring(ring: u64, block: u64) -> WalBudget {
        WalBudget {
            ring,
            max_batch: max_batch_for(ring, block, DEFAULT_MAX_BATCH),
            block,
        }
    }

    /// The largest piece of client data (a request's bytes and its record header) an empty
    /// ring admits: a larger one could never be taken.
    pub fn largest_admissible(&self) -> u64 {
        let (mut low, mut high) = (0u64, self.ring);
        while low < high {
            let mid = (low + high).div_ceil(2);
            if self.admits(0, 0, mid) {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        low
    }

    /// The budget of a ring.
    pub fn of(config: &WalConfig) -> WalBudget {
        WalBudget {
            ring: config.ring_size,
            max_batch: config.max_batch,
            block: config.block_size,
        }
    }

    /// Padding that appending `bytes` of records again can cost besides a pad to the ring's
    /// end: each batch's padding to a block (every batch but the last is more than half full).
    fn padding(&self, bytes: u64) -> u64 {
        (2 * bytes / self.max_batch + 2) * (self.block + HEADER_LEN as u64)
    }

    /// Ring bytes that appending `live` bytes of records again takes at most: the records,
    /// their padding, and a pad to the ring's end.
    pub fn moving_room(&self, live: u64) -> u64 {
        live + self.padding(live) + self.max_batch
    }

    /// Ring kept free for raft's control records while client data is refused: what a move
    /// can cost beyond the bytes it moves (padding, a pad to the ring's end that may fall in
    /// the middle of the moved records), and a sixteenth of the ring for the records
    /// themselves. See docs/architecture.md, "WAL space", for why this suffices.
    pub fn reserve(&self) -> u64 {
        self.max_batch + self.padding(self.ring) + (self.ring / 16).max(4 * self.block)
    }

    /// Whether the ring may hold `used` bytes while `live` of them are live. One batch's worth
    /// stays free besides (recovery zeroes that much past the last record).
    pub fn fits(&self, used: u64, live: u64) -> bool {
        used + self.moving_room(live) + self.max_batch <= self.ring
    }

    /// Whether `incoming` bytes of client data may enter a ring with `used` bytes of which
    /// `live` are live.
    pub fn admits(&self, used: u64, live: u64, incoming: u64) -> bool {
        self.fits(used + incoming + self.reserve(), live + incoming)
    }

    /// What client data may fill: the ring less the reserve and two batches.
    fn client_room(&self) -> u64 {
        self.ring
            .saturating_sub(2 * self.max_batch + self.reserve())
    }

    /// Whether a checkpoint is due: used bytes past half of what client data may fill.
    pub fn due(&self, used: u64) -> bool {
        2 * used > self.client_room()
    }

    /// Bytes of recent history a checkpoint keeps in memory (applied entries whose records
    /// lie in the last quarter of what client data may fill), so that a replica a little behind
    /// catches up from the log, not by a copy of the chunks. A restart forgets them.
    pub fn retention(&self) -> u64 {
        self.client_room() / 4
    }

    /// Whether moving the live entries forward is worth it: a checkpoint that only reclaims
    /// what is applied would leave `pinned` bytes (from the lowest live record to the end)
    /// in use, more than a checkpoint is due at.
    pub fn worth_moving(&self, pinned: u64) -> bool {
        self.due(pinned)
    }
}
