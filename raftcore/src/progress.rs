//! What the leader knows about each follower: how far its log matches, what is in flight, and
//! which of the three replication states it is in (probe, replicate, snapshot).

use crate::types::LogIndex;

/// A bounded ring of in-flight appends to one follower: their last index and their size.
/// When it is full, or holds `max_bytes`, the leader stops sending until acknowledgements
/// free room (back-pressure, never growth).
#[derive(Debug, Clone)]
pub struct Inflights {
    /// Invariant: `count <= ring.len()`; the entries `start..start + count` (mod len) hold
    /// increasing last indexes.
    ring: Vec<(LogIndex, u64)>,
    start: usize,
    count: usize,
    bytes: u64,
    max_bytes: u64,
}

impl Inflights {
    /// A ring of `capacity` appends and at most `max_bytes` of payload.
    pub fn new(capacity: usize, max_bytes: u64) -> Inflights {
        assert!(
            capacity > 0,
            "an in-flight window holds at least one append"
        );
        Inflights {
            ring: vec![(LogIndex(0), 0); capacity],
            start: 0,
            count: 0,
            bytes: 0,
            max_bytes,
        }
    }

    /// Whether another append may be sent.
    pub fn full(&self) -> bool {
        self.count == self.ring.len() || self.bytes >= self.max_bytes
    }

    /// Appends in flight.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Records an append whose last entry is `last` and payload `bytes`.
    pub fn add(&mut self, last: LogIndex, bytes: u64) {
        assert!(!self.full(), "append sent into a full in-flight window");
        let slot = (self.start + self.count) % self.ring.len();
        self.ring[slot] = (last, bytes);
        self.count += 1;
        self.bytes += bytes;
    }

    /// Frees every append whose last index is at or below `index`.
    pub fn free_to(&mut self, index: LogIndex) {
        while self.count > 0 {
            let (last, bytes) = self.ring[self.start];
            if last > index {
                break;
            }
            self.bytes -= bytes;
            self.start = (self.start + 1) % self.ring.len();
            self.count -= 1;
        }
    }

    /// Frees the oldest append: used when a heartbeat answer shows the follower alive while
    /// the window is full, since appends in it may have been lost.
    pub fn free_first_one(&mut self) {
        if self.count > 0 {
            let (last, _) = self.ring[self.start];
            self.free_to(last);
        }
    }

    /// Forgets everything in flight.
    pub fn reset(&mut self) {
        self.start = 0;
        self.count = 0;
        self.bytes = 0;
    }
}

/// How the leader replicates to a follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressState {
    /// One append at a time until the follower's match point is found.
    Probe,
    /// Appends streamed optimistically, up to the in-flight window.
    Replicate,
    /// A snapshot is being sent; appends wait until it is installed.
    Snapshot,
}

/// The leader's view of one follower (or of itself: its match is what it has persisted).
#[derive(Debug, Clone)]
pub struct Progress {
    /// Highest index known to be in the follower's log.
    /// Invariant: `matched < next`, unless a follower lost entries it acknowledged.
    pub matched: LogIndex,
    /// Next index to send.
    pub next: LogIndex,
    /// Replication state.
    pub state: ProgressState,
    /// Probe: an append was sent and is not answered yet.
    pub probe_sent: bool,
    /// Appends in flight (replicate state).
    pub inflights: Inflights,
    /// Snapshot state: the index of the snapshot being sent.
    pub pending_snapshot: LogIndex,
    /// Snapshot state: bytes the follower confirmed.
    pub snapshot_acked: u64,
    /// Snapshot state: bytes sent (pieces in flight are `snapshot_sent - snapshot_acked`).
    pub snapshot_sent: u64,
    /// Snapshot state: the snapshot's total length.
    pub snapshot_total: u64,
    /// Snapshot state: ticks since the follower last confirmed a piece.
    pub snapshot_idle_ticks: u32,
    /// Heard from within the current election timeout (CheckQuorum).
    pub recent_active: bool,
    /// The follower's commit index as it last told us.
    pub commit_acked: LogIndex,
    /// Highest read-index round the follower has answered.
    pub read_seq_acked: u64,
    /// Highest leader tick (send time) of a heartbeat the follower answered: the lease.
    pub lease_tick_acked: u64,
}

impl Progress {
    /// A follower about which nothing is known yet: probe from `next`.
    pub fn new(next: LogIndex, inflight_msgs: usize, inflight_bytes: u64) -> Progress {
        Progress {
            matched: LogIndex(0),
            next,
            state: ProgressState::Probe,
            probe_sent: false,
            inflights: Inflights::new(inflight_msgs, inflight_bytes),
            pending_snapshot: LogIndex(0),
            snapshot_acked: 0,
            snapshot_sent: 0,
            snapshot_total: 0,
            snapshot_idle_ticks: 0,
            recent_active: false,
            commit_acked: LogIndex(0),
            read_seq_acked: 0,
            lease_tick_acked: 0,
        }
    }

    fn reset_state(&mut self, state: ProgressState) {
        self.probe_sent = false;
        self.pending_snapshot = LogIndex(0);
        self.state = state;
        self.inflights.reset();
    }

    /// Back to probing from just after the match point.
    pub fn become_probe(&mut self) {
        if self.state == ProgressState::Snapshot {
            let pending = self.pending_snapshot;
            self.reset_state(ProgressState::Probe);
            self.next = LogIndex(self.matched.0.max(pending.0) + 1);
        } else {
            self.reset_state(ProgressState::Probe);
            self.next = self.matched.next();
        }
    }

    /// Stream appends from just after the match point.
    pub fn become_replicate(&mut self) {
        self.reset_state(ProgressState::Replicate);
        self.next = self.matched.next();
    }

    /// Send the snapshot at `index` instead of entries.
    pub fn become_snapshot(&mut self, index: LogIndex, total: u64) {
        self.reset_state(ProgressState::Snapshot);
        self.pending_snapshot = index;
        self.snapshot_acked = 0;
        self.snapshot_sent = 0;
        self.snapshot_total = total;
        self.snapshot_idle_ticks = 0;
    }

    /// Whether the leader must hold back appends to this follower for now.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot => true,
        }
    }

    /// The follower accepted up to `index`; returns whether the match point moved.
    pub fn maybe_update(&mut self, index: LogIndex) -> bool {
        let updated = self.matched < index;
        if updated {
            self.matched = index;
        }
        self.probe_sent = false;
        if self.next <= index {
            self.next = index.next();
        }
        updated
    }

    /// The follower rejected the append after `rejected`; `hint` is where the leader should
    /// look next (from the follower's hint). Returns false for a stale rejection.
    pub fn maybe_decrease_to(&mut self, rejected: LogIndex, hint: LogIndex) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.matched {
                return false;
            }
            self.next = self.matched.next();
            return true;
        }
        if self.next.0 == 0 || self.next.0 - 1 != rejected.0 {
            return false;
        }
        // Not clamped at `matched + 1`: a follower that lost what it acknowledged (a broken
        // disk) would otherwise be probed at the same index forever.
        self.next = LogIndex(rejected.0.min(hint.0.saturating_add(1)).max(1));
        self.probe_sent = false;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflights_ring_fills_by_count_or_bytes_and_frees_in_order() {
        let mut window = Inflights::new(3, 100);
        window.add(LogIndex(2), 10);
        window.add(LogIndex(4), 10);
        window.add(LogIndex(6), 10);
        assert!(window.full());
        window.free_to(LogIndex(4));
        assert_eq!(window.count(), 1);
        window.add(LogIndex(8), 90);
        assert!(window.full(), "100 bytes in flight fill the window");
        window.free_to(LogIndex(100));
        assert_eq!(window.count(), 0);
        assert!(!window.full());
    }

    #[test]
    fn probe_ignores_stale_rejections_and_follows_the_hint() {
        let mut progress = Progress::new(LogIndex(10), 4, 1 << 20);
        assert!(
            !progress.maybe_decrease_to(LogIndex(5), LogIndex(3)),
            "stale"
        );
        assert!(progress.maybe_decrease_to(LogIndex(9), LogIndex(3)));
        assert_eq!(progress.next, LogIndex(4));
    }
}
