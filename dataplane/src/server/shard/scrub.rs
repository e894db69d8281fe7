//! Scrub on the shard (`crate::scrub` has the whole story): applying `ChunkOp::Scrub` — the
//! range's page sums, kept by entry index for the scrubber to collect with `SCRUB_RESULT` —
//! and `ChunkOp::Repair`; and the background scrubber the placement service runs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftcore::LogIndex;
use tracing::{info, warn};

use super::ShardServer;
use crate::client::scrub::{CopysetScrub, ScrubOptions};
use crate::client::{Client, ClientConfig};
use crate::ids::{ChunkId, CopysetId};
use crate::protocol::{NodeAddress, Status};
use crate::scrub::{page_sums, RangeSums};
use crate::storage::bdev::Bdev;
use crate::storage::engine::ShardEngine;
use crate::storage::StorageError;
use crate::volume_table::METADATA_COPYSET;

/// Results kept per shard: enough for every replica's scrubber to collect a round of ranges
/// of many copysets at once; older ones are dropped first.
const KEPT: usize = 1024;

/// The sums this shard's replicas took, by copyset and entry index, newest last.
#[derive(Default)]
pub(super) struct ScrubResults {
    kept: VecDeque<((CopysetId, u64), Bytes)>,
}

impl ScrubResults {
    pub(super) fn keep(&mut self, copyset: CopysetId, index: u64, sums: Bytes) {
        if self.kept.len() == KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back(((copyset, index), sums));
    }

    fn get(&self, copyset: CopysetId, index: u64) -> Option<Bytes> {
        self.kept
            .iter()
            .rev()
            .find(|(key, _)| *key == (copyset, index))
            .map(|(_, sums)| sums.clone())
    }
}

/// Applies a scrub entry: the crc32c of each page of `offset..offset + len` of `chunk` as this
/// replica holds it now (after every earlier entry of the chunk, before every later one).
pub(super) async fn apply_scrub<B: Bdev>(
    engine: &ShardEngine<B>,
    copyset: CopysetId,
    (chunk, offset, len): (ChunkId, u32, u32),
    index: LogIndex,
) -> Result<RangeSums, StorageError> {
    engine.check_owner(chunk, copyset)?;
    let page = engine.layout().geometry.page_size as usize;
    match engine
        .read_chunk(chunk, u64::from(offset), u64::from(len))
        .await
    {
        Ok(data) => Ok(RangeSums {
            index: index.0,
            present: true,
            pages: page_sums(data.as_slice(), page),
        }),
        Err(StorageError::ChunkNotFound(_)) => Ok(RangeSums {
            index: index.0,
            present: false,
            pages: Vec::new(),
        }),
        Err(error) => Err(error),
    }
}

/// Applies a repair entry: writes `data` at `offset` of `chunk` only where the page still has
/// the checksum `bad` this replica reported — on the replicas that agreed, and on every replica
/// once a later write changed the page, it leaves the page alone.
pub(super) async fn apply_repair<B: Bdev>(
    engine: &ShardEngine<B>,
    copyset: CopysetId,
    (chunk, offset, data): (ChunkId, u32, Bytes),
    bad: u32,
    index: LogIndex,
) -> Result<bool, StorageError> {
    engine.check_owner(chunk, copyset)?;
    let offset = u64::from(offset);
    let current = match engine.read_chunk(chunk, offset, data.len() as u64).await {
        Ok(current) => current,
        Err(StorageError::ChunkNotFound(_)) => return Ok(false),
        Err(error) => return Err(error),
    };
    if crc32c::crc32c(current.as_slice()) != bad {
        engine.note_applied(copyset, chunk, index);
        return Ok(false);
    }
    // The chunk's own sequence number: a plain overwrite, no copy-on-write.
    let sn = engine.chunk_info(chunk)?.sn;
    engine
        .write_chunk_bytes(copyset, chunk, offset, data, sn, index)
        .await?;
    Ok(true)
}

impl<B: Bdev + 'static> ShardServer<B> {
    /// Keeps the sums a scrub entry gave, for `SCRUB_RESULT`.
    pub(super) fn keep_scrub(&self, copyset: CopysetId, sums: &RangeSums) -> Bytes {
        let encoded = sums.encode();
        self.scrubs
            .borrow_mut()
            .keep(copyset, sums.index, encoded.clone());
        encoded
    }

    /// `SCRUB_RESULT` (body: the scrub entry's index, u64): this replica's sums of that entry;
    /// `Retry` while it has not applied it yet, `Invalid` once the sums are gone.
    pub(super) fn serve_scrub_result(&self, copyset: CopysetId, payload: &[u8]) -> (Status, Bytes) {
        let Ok(word) = <[u8; 8]>::try_from(payload) else {
            return (
                Status::Invalid("a scrub result request is an entry index (u64)".into()),
                Bytes::new(),
            );
        };
        let index = u64::from_le_bytes(word);
        if let Some(sums) = self.scrubs.borrow().get(copyset, index) {
            return (Status::Ok, sums);
        }
        let applied = self
            .copysets
            .borrow()
            .get(&copyset)
            .map(|core| core.borrow().applied().0);
        match applied {
            None => (Status::CopysetNotFound, Bytes::new()),
            Some(applied) if applied < index => (
                Status::Retry(format!("entry {index} not applied yet (applied {applied})")),
                Bytes::new(),
            ),
            Some(_) => (
                Status::Invalid(format!(
                    "no sums of entry {index} here (applied before this process started, or \
                     dropped for newer ones)"
                )),
                Bytes::new(),
            ),
        }
    }
}

/// The background scrubber's settings (`[placement] scrub_*`).
#[derive(Debug, Clone, Copy)]
pub struct ScrubSettings {
    /// Bytes of chunk data per second each replica reads for it (0: no background scrub).
    pub bytes_per_s: u64,
    /// How often each copyset is scrubbed.
    pub every: Duration,
    /// Whether the pages a replica holds wrong are rewritten from the majority.
    pub repair: bool,
}

/// The background scrubber, run by the shard that leads the metadata copyset.
#[derive(Default)]
pub(super) struct Scrubber {
    client: Option<Rc<Client>>,
    settings: Option<ScrubSettings>,
    /// When each copyset the nodes report was last scrubbed; a copyset first seen gets a time
    /// spread over one interval back, so that first scrubs do not all fall due at once.
    last: BTreeMap<CopysetId, Instant>,
}

impl<B: Bdev + 'static> ShardServer<B> {
    /// Lets this shard scrub the cluster's copysets in the background, through a client of
    /// `nodes` with `config`, while it leads the metadata copyset.
    pub fn set_scrubber(
        &self,
        nodes: &[NodeAddress],
        settings: ScrubSettings,
        config: ClientConfig,
    ) {
        let mut scrubber = self.scrubber.borrow_mut();
        scrubber.client = Some(Rc::new(Client::new(nodes, config)));
        scrubber.settings = Some(settings);
    }

    /// Every heartbeat interval, while this replica leads the metadata copyset and the
    /// scheduler is not paused: scrubs the copyset longest due, one at a time.
    pub(super) async fn scrub_loop(self: Rc<Self>) {
        loop {
            let interval = self.mds.borrow().heartbeat;
            glommio::timer::sleep(interval).await;
            let (client, settings) = {
                let scrubber = self.scrubber.borrow();
                match (&scrubber.client, scrubber.settings) {
                    (Some(client), Some(settings)) if settings.bytes_per_s > 0 => {
                        (Rc::clone(client), settings)
                    }
                    _ => continue,
                }
            };
            if self.leading_metadata(METADATA_COPYSET).is_err() || self.scheduler_paused().await {
                continue;
            }
            let Some(copyset) = self.due_for_scrub(settings.every) else {
                continue;
            };
            let options = ScrubOptions {
                repair: settings.repair,
                bytes_per_s: settings.bytes_per_s,
            };
            let report = client.scrub_copyset(copyset, options, |_, _| {}).await;
            self.scrubber
                .borrow_mut()
                .last
                .insert(copyset, Instant::now());
            match report {
                Ok(report) => self.note_scrub(&report),
                Err(error) => warn!(%copyset, %error, "background scrub did not finish"),
            }
        }
    }

    /// The copyset whose scrub is longest overdue, if one is.
    fn due_for_scrub(&self, every: Duration) -> Option<CopysetId> {
        let reported: BTreeSet<CopysetId> = self
            .mds
            .borrow()
            .seen
            .values()
            .flat_map(|(_, heartbeat)| heartbeat.replicas.iter().map(|r| CopysetId(r.copyset)))
            .collect();
        let now = Instant::now();
        let mut scrubber = self.scrubber.borrow_mut();
        scrubber
            .last
            .retain(|copyset, _| reported.contains(copyset));
        for copyset in reported {
            scrubber.last.entry(copyset).or_insert_with(|| {
                let spread = every.mul_f64((crate::rng::mix64(copyset.0) % 1000) as f64 / 1000.0);
                now.checked_sub(spread).unwrap_or(now)
            });
        }
        scrubber
            .last
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= every)
            .min_by_key(|(_, at)| **at)
            .map(|(copyset, _)| *copyset)
    }

    /// Logs a background scrub's outcome and counts it.
    fn note_scrub(&self, report: &CopysetScrub) {
        let copyset = CopysetId(report.copyset);
        let count = |name: &str, help: &str, n: u64| {
            self.metrics.counter(name, help, &[]).add(n);
        };
        count(
            "chunkserver_scrub_bytes_total",
            "Bytes of chunk data the background scrubber compared on each replica.",
            report.bytes,
        );
        count(
            "chunkserver_scrub_bad_pages_total",
            "Pages the background scrubber found one replica holding differently from the majority.",
            report.bad_pages.len() as u64,
        );
        count(
            "chunkserver_scrub_repaired_pages_total",
            "Pages the background scrubber rewrote from the majority.",
            report.repaired,
        );
        if report.is_clean() && report.bad_pages.is_empty() {
            info!(%copyset, chunks = report.chunks, bytes = report.bytes, "scrubbed: replicas agree");
            return;
        }
        for page in &report.bad_pages {
            warn!(%copyset, node = page.node, chunk = page.chunk, offset = page.offset,
                repaired = page.repaired, "scrub: a replica holds a page differently from the majority");
        }
        if !report.is_clean() {
            warn!(%copyset, undecided = report.undecided_pages.len(), presence = report.presence.len(),
                unanswered = ?report.unanswered, "scrub: differences left (chunkctl scrub --copyset shows them)");
        }
    }
}
