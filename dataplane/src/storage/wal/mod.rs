//! The shard WAL: one ring per shard, shared by every copyset on the shard.
//!
//! Appends from all copysets are encoded into the open batch at once (no I/O); whoever waits
//! for durability first while no flush is running becomes the flusher: it writes the oldest
//! batch with one write, flushes once, and wakes everyone the flush covered. While that batch
//! is in flight the next one accumulates, so batches grow with the load (natural group commit)
//! and at most one batch is ever unflushed.
//!
//! Batches start on block boundaries and end with a pad record, so a batch write never
//! rewrites a block that holds acknowledged records. Records never straddle the ring's end.
//! Recovery scans from the head to the first record that is missing, torn or stale, and
//! zeroes one batch's worth of ring past that point, so that remains of a torn batch can
//! never be mistaken for records written later.

mod budget;
pub mod log;
pub mod record;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use raftcore::{ConfState, Entry, HardState, LogIndex, Snapshot};

use crate::storage::bdev::Bdev;
use crate::storage::StorageError;
pub use budget::{max_batch_for, WalBudget, DEFAULT_MAX_BATCH};
use log::CopysetLog;
use record::{CopysetId, Record, RecordBody, HEADER_LEN};

/// Where the ring is and how it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalConfig {
    /// Byte offset of the ring on the device.
    pub ring_offset: u64,
    /// Size of the ring; a multiple of `block_size`.
    pub ring_size: u64,
    /// The device block size.
    pub block_size: u64,
    /// The largest batch written at once; a multiple of `block_size`, at most the ring size.
    pub max_batch: u64,
}

fn align_up(value: u64, block: u64) -> u64 {
    value.div_ceil(block) * block
}

#[derive(Debug)]
struct OpenBatch {
    start: u64,
    bytes: Vec<u8>,
    /// Invariant: a multiple of the block size, and `start + capacity` does not cross the
    /// ring's end.
    capacity: u64,
}

#[derive(Debug)]
struct SealedBatch {
    start: u64,
    /// A multiple of the block size.
    bytes: Vec<u8>,
    /// Bytes of ring the batch covers (more than `bytes` for a pad to the ring's end).
    span: u64,
}

/// Counters of the WAL's work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Batches written (each one write and one flush).
    pub batches: u64,
    /// Records appended.
    pub records: u64,
    /// Bytes written to the ring.
    pub bytes: u64,
}

#[derive(Debug)]
struct WalState {
    config: WalConfig,
    /// Oldest position still needed. Invariant: `head <= durable <= next`.
    head: u64,
    /// Everything before it is durable.
    durable: u64,
    /// Where the next new batch starts.
    next: u64,
    open: Option<OpenBatch>,
    sealed: VecDeque<SealedBatch>,
    flushing: bool,
    failed: Option<String>,
    /// Bumped on every change waiters care about.
    version: u64,
    waiters: Vec<Waker>,
    logs: BTreeMap<CopysetId, CopysetLog>,
    spare: Vec<u8>,
    stats: WalStats,
    /// Where batch write-and-flush latencies go, once the shard set it.
    flush_latency: Option<std::rc::Rc<crate::metrics::Latency>>,
    /// Client data was refused for room since the last checkpoint: one is wanted even if
    /// not due by ring use alone.
    wanted: bool,
}

impl WalState {
    fn wake_all(&mut self) {
        self.version += 1;
        for waker in self.waiters.drain(..) {
            waker.wake();
        }
    }

    fn seal_open(&mut self) {
        let Some(mut batch) = self.open.take() else {
            return;
        };
        if batch.bytes.is_empty() {
            self.spare = batch.bytes;
            return;
        }
        let block = self.config.block_size;
        let used = batch.bytes.len() as u64;
        let mut pad = align_up(used, block) - used;
        if pad > 0 && pad < HEADER_LEN as u64 {
            pad += block;
        }
        if pad > 0 {
            Record {
                lsn: batch.start + used,
                copyset: CopysetId(0),
                body: RecordBody::Pad(pad as u32),
            }
            .encode(&mut batch.bytes);
            batch.bytes.resize((used + pad) as usize, 0);
        }
        let span = batch.bytes.len() as u64;
        assert!(span <= batch.capacity);
        self.next = batch.start + span;
        self.sealed.push_back(SealedBatch {
            start: batch.start,
            bytes: batch.bytes,
            span,
        });
    }

    /// Bytes of live records (see [`WalBudget`]).
    fn live_bytes(&self) -> u64 {
        self.logs.values().map(CopysetLog::live_bytes).sum()
    }

    /// Whether the ring can take bytes up to `end`, `adds_live` of them live. Unless the
    /// append moves live entries forward itself (`moving`), room to move every live entry
    /// forward stays free (see [`WalBudget`]); and one batch's worth of ring always stays
    /// free: recovery zeroes that much past the last valid record, and it must never reach
    /// the head.
    fn check_room(&self, end: u64, adds_live: u64, moving: bool) -> Result<(), StorageError> {
        let used = end - self.head;
        let full = if moving {
            used + self.config.max_batch > self.config.ring_size
        } else {
            !WalBudget::of(&self.config).fits(used, self.live_bytes() + adds_live)
        };
        if full {
            return Err(StorageError::WalFull {
                used: self.next - self.head,
                size: self.config.ring_size,
            });
        }
        Ok(())
    }

    /// Finds room for a record of `len` bytes and returns its position. `adds_live`: live
    /// bytes the record adds; `moving`: the record moves a live entry forward.
    fn place(&mut self, len: u64, adds_live: u64, moving: bool) -> Result<u64, StorageError> {
        let config = self.config;
        let block = config.block_size;
        let needed = len + HEADER_LEN as u64;
        if align_up(needed, block) > config.max_batch {
            return Err(StorageError::RecordTooLarge {
                len,
                limit: config.max_batch - block,
            });
        }
        loop {
            if let Some(batch) = &self.open {
                let used = batch.bytes.len() as u64;
                if align_up(used + needed, block) <= batch.capacity {
                    self.check_room(
                        batch.start + align_up(used + needed, block),
                        adds_live,
                        moving,
                    )?;
                    return Ok(batch.start + used);
                }
                self.seal_open();
                continue;
            }
            let start = self.next;
            let to_ring_end = config.ring_size - start % config.ring_size;
            let capacity = config.max_batch.min(to_ring_end);
            if align_up(needed, block) > capacity {
                // Not enough ring before its end: a pad batch covers the rest.
                self.check_room(start + to_ring_end, adds_live, moving)?;
                let mut bytes = Vec::with_capacity(block as usize);
                Record {
                    lsn: start,
                    copyset: CopysetId(0),
                    body: RecordBody::Pad(to_ring_end as u32),
                }
                .encode(&mut bytes);
                bytes.resize(block as usize, 0);
                self.sealed.push_back(SealedBatch {
                    start,
                    bytes,
                    span: to_ring_end,
                });
                self.next = start + to_ring_end;
                continue;
            }
            self.check_room(start + align_up(needed, block), adds_live, moving)?;
            let mut bytes = std::mem::take(&mut self.spare);
            bytes.clear();
            self.open = Some(OpenBatch {
                start,
                bytes,
                capacity,
            });
        }
    }
}

/// What recovery found in the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecovery {
    /// Records replayed.
    pub records: usize,
    /// Where valid records ended.
    pub end: u64,
    /// Why the scan stopped there.
    pub stop: String,
    /// Records that did not fit their copyset's log (an index gap) and were skipped.
    pub skipped: usize,
}

/// A shard's WAL. Clones share it.
#[derive(Debug)]
pub struct ShardWal<B: Bdev> {
    bdev: Rc<B>,
    state: Rc<RefCell<WalState>>,
}

impl<B: Bdev> Clone for ShardWal<B> {
    fn clone(&self) -> Self {
        ShardWal {
            bdev: Rc::clone(&self.bdev),
            state: Rc::clone(&self.state),
        }
    }
}

/// Resets `flushing` and wakes the waiters however the flusher's future ends (completed,
/// failed or dropped), so that another waiter takes over.
struct FlushGuard<'a>(&'a RefCell<WalState>);

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.0.borrow_mut();
        state.flushing = false;
        state.wake_all();
    }
}

/// Resolves once the WAL's version moves past the one seen.
struct Changed<'a> {
    state: &'a RefCell<WalState>,
    seen: u64,
}

impl Future for Changed<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state.borrow_mut();
        if state.version != self.seen {
            Poll::Ready(())
        } else {
            // Once per task: a waiter polled again while still waiting must not pile up
            // clones of its waker (glommio counts them in 16 bits).
            if !state.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                state.waiters.push(cx.waker().clone());
            }
            Poll::Pending
        }
    }
}

impl<B: Bdev> ShardWal<B> {
    /// Opens the ring: replays records from `head` on top of the checkpointed `logs`, and
    /// zeroes the ring past the last valid record.
    pub async fn recover(
        bdev: Rc<B>,
        config: WalConfig,
        head: u64,
        mut logs: BTreeMap<CopysetId, CopysetLog>,
    ) -> Result<(ShardWal<B>, WalRecovery), StorageError> {
        assert!(config.ring_size % config.block_size == 0);
        assert!(
            config.max_batch % config.block_size == 0 && 2 * config.max_batch <= config.ring_size
        );
        let image = read_ring(&*bdev, &config, head).await?;
        let scan = record::scan(&image, head);
        // Damage before the tail is refused, not taken for a torn tail (issue 25, item 5).
        record::check_tail(&image, head, &scan, config.max_batch, config.block_size).map_err(
            |reason| StorageError::CorruptMetadata {
                what: "WAL ring",
                offset: config.ring_offset + scan.end % config.ring_size,
                reason,
            },
        )?;
        let (tail, closing) = record::close_tail(&image, head, scan.end, config.block_size);
        drop(image);
        let mut skipped = 0;
        let records = scan.records.len();
        for record in scan.records {
            if record.body == RecordBody::Removed {
                logs.remove(&record.copyset);
                continue;
            }
            let log = logs.entry(record.copyset).or_default();
            if log.take(&record.body, record.lsn).is_err() {
                skipped += 1;
                tracing::warn!(
                    copyset = %record.copyset,
                    lsn = record.lsn,
                    "WAL record does not follow its copyset's log; skipped"
                );
            }
        }
        if let Some((start, bytes)) = closing {
            write_ring(&*bdev, &config, start, &bytes).await?;
        }
        zero_ring(&*bdev, &config, tail, config.max_batch).await?;
        bdev.flush().await?;
        let state = WalState {
            config,
            head,
            durable: tail,
            next: tail,
            open: None,
            sealed: VecDeque::new(),
            flushing: false,
            failed: None,
            version: 0,
            waiters: Vec::new(),
            logs,
            spare: Vec::new(),
            stats: WalStats::default(),
            flush_latency: None,
            wanted: false,
        };
        Ok((
            ShardWal {
                bdev,
                state: Rc::new(RefCell::new(state)),
            },
            WalRecovery {
                records,
                end: scan.end,
                stop: scan.stop,
                skipped,
            },
        ))
    }

    fn append_record(&self, copyset: CopysetId, body: RecordBody) -> Result<u64, StorageError> {
        let mut state = self.state.borrow_mut();
        Self::append_to(&mut state, copyset, body, false)
    }

    fn append_to(
        state: &mut WalState,
        copyset: CopysetId,
        body: RecordBody,
        moving: bool,
    ) -> Result<u64, StorageError> {
        if let Some(reason) = &state.failed {
            return Err(StorageError::WalFailed(reason.clone()));
        }
        let mut record = Record {
            lsn: 0,
            copyset,
            body,
        };
        let len = record.encoded_len() as u64;
        let adds_live = match &record.body {
            RecordBody::Entry(_) => len,
            _ => 0,
        };
        let lsn = state.place(len, adds_live, moving)?;
        record.lsn = lsn;
        if record.body == RecordBody::Removed {
            state.logs.remove(&copyset);
        } else {
            let log = state.logs.entry(copyset).or_default();
            log.take(&record.body, lsn).map_err(|gap| {
                StorageError::Copyset(
                    copyset.0,
                    format!(
                        "entry {} does not follow the log's last index {}",
                        gap.index, gap.last
                    ),
                )
            })?;
        }
        state.stats.records += 1;
        let batch = state
            .open
            .as_mut()
            .ok_or_else(|| StorageError::WalFailed("no open batch after placing".into()))?;
        record.encode(&mut batch.bytes);
        Ok(lsn + len)
    }

    /// Appends raft entries of a copyset; an entry at an index the log has replaces it and
    /// what follows. Returns the position to [`ShardWal::sync`] to.
    pub fn append_entries(
        &self,
        copyset: CopysetId,
        entries: &[Entry],
    ) -> Result<u64, StorageError> {
        let mut end = self.appended();
        for entry in entries {
            end = self.append_record(copyset, RecordBody::Entry(entry.clone()))?;
        }
        Ok(end)
    }

    /// Records a copyset's hard state.
    pub fn set_hard_state(&self, copyset: CopysetId, hs: HardState) -> Result<u64, StorageError> {
        self.append_record(copyset, RecordBody::HardState(hs))
    }

    /// Records a copyset's membership.
    pub fn set_conf_state(&self, copyset: CopysetId, cs: ConfState) -> Result<u64, StorageError> {
        self.append_record(copyset, RecordBody::ConfState(cs))
    }

    /// Records a snapshot received from the leader: the copyset's log before it is gone.
    pub fn install_snapshot(
        &self,
        copyset: CopysetId,
        snapshot: Snapshot,
    ) -> Result<u64, StorageError> {
        self.append_record(copyset, RecordBody::Snapshot(snapshot))
    }

    /// Records that `copyset` was deleted from the shard: its log goes now, and a replay of
    /// the ring drops it at this record. Returns the position to [`ShardWal::sync`] to.
    pub fn remove_copyset(&self, copyset: CopysetId) -> Result<u64, StorageError> {
        self.append_record(copyset, RecordBody::Removed)
    }

    /// Records a snapshot the state machine made at `index` (applied, so in the log) and
    /// compacts the log up to it.
    pub fn create_snapshot(
        &self,
        copyset: CopysetId,
        index: LogIndex,
        conf_state: ConfState,
        data: Bytes,
    ) -> Result<u64, StorageError> {
        let snapshot = self
            .with_log(copyset, |log| log.snapshot_at(index, conf_state, data))
            .flatten()
            .ok_or_else(|| {
                StorageError::Copyset(copyset.0, format!("no entry at {index} to snapshot"))
            })?;
        self.append_record(copyset, RecordBody::Snapshot(snapshot))
    }

    /// Whether `incoming` bytes of client data could ever enter this ring (they would, were it
    /// empty).
    pub fn could_admit(&self, incoming: u64) -> bool {
        let state = self.state.borrow();
        WalBudget::of(&state.config).admits(0, 0, incoming + HEADER_LEN as u64)
    }

    /// Whether `incoming` bytes of client data (a proposal's payload, or the entries of a
    /// replicated append) may enter the ring now. Refusing is back-pressure on client writes
    /// only: raft's control records never ask (see [`WalBudget`]).
    pub fn admits(&self, incoming: u64) -> bool {
        let mut state = self.state.borrow_mut();
        let used = state
            .open
            .as_ref()
            .map_or(state.next, |b| b.start + b.bytes.len() as u64)
            - state.head;
        let incoming = incoming + HEADER_LEN as u64;
        let admitted = WalBudget::of(&state.config).admits(used, state.live_bytes(), incoming);
        if !admitted {
            state.wanted = true;
        }
        admitted
    }

    /// Whether client data was refused for room since the last call (a checkpoint is wanted
    /// then, whatever the ring's use).
    pub fn take_wanted(&self) -> bool {
        std::mem::take(&mut self.state.borrow_mut().wanted)
    }

    /// Position of the oldest live record (an entry above its copyset's applied index).
    pub fn oldest_live_lsn(&self) -> Option<u64> {
        self.state
            .borrow()
            .logs
            .values()
            .filter_map(|log| log.first_needed_lsn(log.applied))
            .min()
    }

    /// The largest entry (its data) one record can hold: a batch less the record's header
    /// and the header of the pad record that may seal its batch.
    pub fn entry_limit(&self) -> u64 {
        self.state.borrow().config.max_batch - 2 * HEADER_LEN as u64
    }

    /// Bytes of live records: entries above their copyset's applied index.
    pub fn live_bytes(&self) -> u64 {
        self.state.borrow().live_bytes()
    }

    /// The ring's budget.
    pub fn budget(&self) -> WalBudget {
        WalBudget::of(&self.state.borrow().config)
    }

    /// Appends the live entries of every copyset whose oldest live record lies before `cut`
    /// again (the engine passes the end of the ring's records: all of them), so that the head
    /// may pass their old copies (a checkpoint calls it when what is
    /// applied is not enough to reclaim: a copyset that cannot apply, idle or without quorum,
    /// would otherwise pin the head). All or nothing: nothing is appended unless the ring has
    /// room for all of them. Returns the copysets moved and the bytes appended.
    pub fn move_live_entries(&self, cut: u64) -> (usize, u64) {
        let mut state = self.state.borrow_mut();
        if state.failed.is_some() {
            return (0, 0);
        }
        let moving: Vec<(CopysetId, Vec<Entry>, u64)> = state
            .logs
            .iter()
            .filter(|(_, log)| {
                log.first_needed_lsn(log.applied)
                    .is_some_and(|lsn| lsn < cut)
            })
            .map(|(copyset, log)| (*copyset, log.live_entries(), log.live_bytes()))
            .collect();
        let bytes: u64 = moving.iter().map(|(_, _, bytes)| *bytes).sum();
        if moving.is_empty() {
            return (0, 0);
        }
        let budget = WalBudget::of(&state.config);
        let end = state
            .open
            .as_ref()
            .map_or(state.next, |b| b.start + b.bytes.len() as u64);
        if end - state.head + budget.moving_room(bytes) + state.config.max_batch
            > state.config.ring_size
        {
            tracing::warn!(
                bytes,
                used = end - state.head,
                "WAL: no room to move live entries forward"
            );
            return (0, 0);
        }
        for (copyset, entries, _) in &moving {
            for entry in entries {
                let appended =
                    Self::append_to(&mut state, *copyset, RecordBody::Entry(entry.clone()), true);
                if let Err(error) = appended {
                    // Room was checked for all of them above, so this is not expected; what
                    // was moved so far is sound (a copy of an entry with the same term
                    // changes nothing else in the log, on replay too).
                    tracing::error!(%copyset, %error, "WAL: moving a live entry forward failed");
                    return (0, 0);
                }
            }
        }
        (moving.len(), bytes)
    }

    /// The position every record appended so far ends before.
    pub fn appended(&self) -> u64 {
        let state = self.state.borrow();
        state
            .open
            .as_ref()
            .map_or(state.next, |b| b.start + b.bytes.len() as u64)
    }

    /// Waits until everything before `lsn` is durable.
    pub async fn sync(&self, lsn: u64) -> Result<(), StorageError> {
        loop {
            let seen = {
                let mut state = self.state.borrow_mut();
                if let Some(reason) = &state.failed {
                    return Err(StorageError::WalFailed(reason.clone()));
                }
                if state.durable >= lsn {
                    return Ok(());
                }
                if !state.flushing {
                    state.flushing = true;
                    None
                } else {
                    Some(state.version)
                }
            };
            match seen {
                None => {
                    let _guard = FlushGuard(&self.state);
                    if let Err(error) = self.write_one_batch().await {
                        let mut state = self.state.borrow_mut();
                        state.failed = Some(error.to_string());
                        return Err(error);
                    }
                }
                Some(seen) => {
                    Changed {
                        state: &self.state,
                        seen,
                    }
                    .await
                }
            }
        }
    }

    /// Where the latency of each batch's write and flush is recorded (the shard's metrics).
    pub fn set_flush_latency(&self, sink: std::rc::Rc<crate::metrics::Latency>) {
        self.state.borrow_mut().flush_latency = Some(sink);
    }

    async fn write_one_batch(&self) -> Result<(), StorageError> {
        let (start, span, buffer) = {
            let mut state = self.state.borrow_mut();
            if state.sealed.is_empty() {
                state.seal_open();
            }
            let Some(batch) = state.sealed.front() else {
                return Ok(());
            };
            // Every byte is copied in: no zeroing first.
            let buffer = self.bdev.pool().alloc_copy(&batch.bytes)?;
            (batch.start, batch.span, buffer)
        };
        let config = self.state.borrow().config;
        let len = buffer.len() as u64;
        let began = std::time::Instant::now();
        self.bdev
            .write(config.ring_offset + start % config.ring_size, buffer)
            .await?;
        self.bdev.flush().await?;
        let mut state = self.state.borrow_mut();
        if let Some(sink) = &state.flush_latency {
            sink.record(began.elapsed());
        }
        if state.sealed.front().map(|b| b.start) == Some(start) {
            if let Some(done) = state.sealed.pop_front() {
                if state.spare.capacity() < done.bytes.capacity() {
                    state.spare = done.bytes;
                }
            }
        }
        state.durable = state.durable.max(start + span);
        state.stats.batches += 1;
        state.stats.bytes += len;
        state.wake_all();
        Ok(())
    }

    /// Runs `f` over a copyset's log (`None` when the shard has no such copyset).
    pub fn with_log<R>(&self, copyset: CopysetId, f: impl FnOnce(&CopysetLog) -> R) -> Option<R> {
        self.state.borrow().logs.get(&copyset).map(f)
    }

    /// Runs `f` over a copyset's log, or over an empty log when the shard has none.
    pub fn with_log_or_empty<R>(&self, copyset: CopysetId, f: impl FnOnce(&CopysetLog) -> R) -> R {
        let state = self.state.borrow();
        match state.logs.get(&copyset) {
            Some(log) => f(log),
            None => f(&CopysetLog::default()),
        }
    }

    /// Runs `f` over a copyset's log, creating an empty one if needed.
    pub fn with_log_mut<R>(&self, copyset: CopysetId, f: impl FnOnce(&mut CopysetLog) -> R) -> R {
        f(self.state.borrow_mut().logs.entry(copyset).or_default())
    }

    /// The copysets with a log on this shard.
    pub fn copysets(&self) -> Vec<CopysetId> {
        self.state.borrow().logs.keys().copied().collect()
    }

    /// A copy of every copyset's log state (entries excluded are cheap: payloads are shared).
    pub fn logs(&self) -> BTreeMap<CopysetId, CopysetLog> {
        self.state.borrow().logs.clone()
    }

    /// Oldest position still needed.
    pub fn head(&self) -> u64 {
        self.state.borrow().head
    }

    /// Position before which everything is durable.
    pub fn durable(&self) -> u64 {
        self.state.borrow().durable
    }

    /// Bytes of ring in use (head to the end of the last batch placed).
    pub fn used(&self) -> u64 {
        let state = self.state.borrow();
        let end = state
            .open
            .as_ref()
            .map_or(state.next, |b| b.start + b.bytes.len() as u64);
        end - state.head
    }

    /// The ring's size.
    pub fn size(&self) -> u64 {
        self.state.borrow().config.ring_size
    }

    /// Moves the head forward once a checkpoint has made the records before it unneeded.
    pub fn advance_head(&self, head: u64) {
        let mut state = self.state.borrow_mut();
        assert!(
            head <= state.durable,
            "head {head} past durable {}",
            state.durable
        );
        if head > state.head {
            state.head = head;
            state.wake_all();
        }
    }

    /// Counters.
    pub fn stats(&self) -> WalStats {
        self.state.borrow().stats
    }

    /// Stops the WAL: nothing more is appended or made durable (the engine calls it when the
    /// device failed under a checkpoint).
    pub fn fail(&self, reason: &str) {
        let mut state = self.state.borrow_mut();
        if state.failed.is_none() {
            state.failed = Some(reason.to_string());
        }
        state.wake_all();
    }

    /// Whether the WAL stopped after a device error.
    pub fn failed(&self) -> Option<String> {
        self.state.borrow().failed.clone()
    }
}

/// Reads the whole ring and rotates it so that the result starts at logical position `head`
/// (which need not be block-aligned: it is where a record starts).
async fn read_ring<B: Bdev>(
    bdev: &B,
    config: &WalConfig,
    head: u64,
) -> Result<Vec<u8>, StorageError> {
    const PIECE: u64 = 4 << 20;
    let mut image = Vec::with_capacity(config.ring_size as usize);
    let mut done = 0;
    while done < config.ring_size {
        let len = PIECE.min(config.ring_size - done);
        let buffer = bdev
            .read(config.ring_offset + done, bdev.alloc(len as usize)?)
            .await?;
        image.extend_from_slice(buffer.as_slice());
        done += len;
    }
    image.rotate_left((head % config.ring_size) as usize);
    Ok(image)
}

/// Writes `bytes` (whole blocks) into the ring from logical position `from`, in two pieces
/// where they cross the ring's end.
async fn write_ring<B: Bdev>(
    bdev: &B,
    config: &WalConfig,
    from: u64,
    bytes: &[u8],
) -> Result<(), StorageError> {
    let mut done = 0usize;
    while done < bytes.len() {
        let physical = (from + done as u64) % config.ring_size;
        let piece = (bytes.len() - done).min((config.ring_size - physical) as usize);
        let buffer = bdev.pool().alloc_copy(&bytes[done..done + piece])?;
        bdev.write(config.ring_offset + physical, buffer).await?;
        done += piece;
    }
    Ok(())
}

/// Writes zeroes (real writes: the ring keeps its blocks allocated) over `len` bytes of ring
/// from logical position `from`.
async fn zero_ring<B: Bdev>(
    bdev: &B,
    config: &WalConfig,
    from: u64,
    len: u64,
) -> Result<(), StorageError> {
    let mut done = 0;
    let len = len.min(config.ring_size);
    while done < len {
        let physical = (from + done) % config.ring_size;
        let piece = (len - done).min(config.ring_size - physical).min(1 << 20);
        let zeroes = bdev.alloc(piece as usize)?;
        bdev.write(config.ring_offset + physical, zeroes).await?;
        done += piece;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
