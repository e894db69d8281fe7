//! Scrub from the client's side (`crate::scrub` has the whole story): a range's scrub entry
//! proposed through the leader, every voter's sums of it collected and compared, and the pages
//! a replica holds wrong repaired from one that holds them right.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::{Client, ClientError};
use crate::copyset::ChunkOp;
use crate::ids::{ChunkId, CopysetId};
use crate::protocol::{self, ImageList, ImagePieceHeader, ReadImagePiece, Status};
use crate::scrub::{compare, BadPage, RangeSums, Verdict};

/// Bytes one scrub entry covers: what each replica reads in one apply.
pub const RANGE_BYTES: u32 = 1 << 20;

/// How a copyset is scrubbed.
#[derive(Debug, Clone, Copy)]
pub struct ScrubOptions {
    /// Rewrite the pages a replica holds wrong from the majority.
    pub repair: bool,
    /// Bytes of chunk data per second the scrub reads on each replica (0: unlimited).
    pub bytes_per_s: u64,
}

/// A page one replica holds differently from the majority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadPageAt {
    /// The replica.
    pub node: u64,
    /// The chunk.
    pub chunk: u64,
    /// Byte offset of the page in the chunk.
    pub offset: u64,
    /// The majority's crc32c of the page.
    pub good: u32,
    /// The replica's.
    pub bad: u32,
    /// Whether this scrub rewrote it from the majority.
    pub repaired: bool,
}

/// What a scrub of one copyset found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopysetScrub {
    /// The copyset.
    pub copyset: u64,
    /// The voters compared.
    pub voters: Vec<u64>,
    /// Chunks scrubbed.
    pub chunks: u64,
    /// Bytes compared on each replica.
    pub bytes: u64,
    /// Pages a replica holds differently from the majority.
    pub bad_pages: Vec<BadPageAt>,
    /// Pages (chunk, offset) on which no checksum has a majority: not repaired.
    pub undecided_pages: Vec<(u64, u64)>,
    /// Chunks (chunk, node) a replica lacks while the majority hold them, or the reverse.
    pub presence: Vec<(u64, u64)>,
    /// Replicas that gave no sums for a range, and why.
    pub unanswered: Vec<String>,
    /// Pages this scrub repaired.
    pub repaired: u64,
}

impl CopysetScrub {
    /// Whether every voter holds the same bytes (and answered for every range).
    pub fn is_clean(&self) -> bool {
        self.bad_pages.iter().all(|p| p.repaired)
            && self.undecided_pages.is_empty()
            && self.presence.is_empty()
            && self.unanswered.is_empty()
    }
}

impl Client {
    /// Scrubs `len` bytes at `offset` of `chunk`: proposes the scrub entry through the leader,
    /// then collects each of `voters`' sums of that entry (the leader's come with its answer).
    /// Gives the sums of those that answered, and why the others did not.
    pub async fn scrub_range(
        &self,
        copyset: CopysetId,
        voters: &[u64],
        (chunk, offset, len): (ChunkId, u32, u32),
    ) -> Result<(Vec<(u64, RangeSums)>, Vec<String>), ClientError> {
        let op = ChunkOp::Scrub { chunk, offset, len };
        let body = self
            .leader_call("scrub", copyset, protocol::SCRUB_CHUNK, op.encode())
            .await?;
        let leader_sums =
            RangeSums::decode(&body).map_err(|e| ClientError::Malformed(e.to_string()))?;
        let leader = self.cached_leader(copyset).unwrap_or(0);
        let index = leader_sums.index;
        let mut results = vec![(leader, leader_sums)];
        let mut unanswered = Vec::new();
        for &node in voters.iter().filter(|n| **n != leader) {
            let asked = self
                .with_retries(
                    "scrub result",
                    copyset,
                    Some(node),
                    protocol::SCRUB_RESULT,
                    &Bytes::copy_from_slice(&index.to_le_bytes()),
                )
                .await;
            match asked.map(|b| RangeSums::decode(&b)) {
                Ok(Ok(sums)) => results.push((node, sums)),
                Ok(Err(e)) => unanswered.push(format!("node {node}: {e}")),
                Err(e) => unanswered.push(format!("node {node}: {e}")),
            }
        }
        Ok((results, unanswered))
    }

    /// Scrubs every chunk of `copyset` range by range, at most `options.bytes_per_s`, and with
    /// `options.repair` rewrites the pages a replica holds wrong. `progress` hears (chunks
    /// done, chunks in all).
    pub async fn scrub_copyset(
        &self,
        copyset: CopysetId,
        options: ScrubOptions,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<CopysetScrub, ClientError> {
        let (voters, chunks, chunk_size) = self.scrub_plan(copyset).await?;
        let mut report = CopysetScrub {
            copyset: copyset.0,
            voters: voters.clone(),
            ..CopysetScrub::default()
        };
        let total = chunks.len() as u64;
        let started = Instant::now();
        for chunk in chunks {
            let mut offset = 0u64;
            while offset < chunk_size {
                let len = (chunk_size - offset).min(u64::from(RANGE_BYTES)) as u32;
                let range = (chunk, offset as u32, len);
                let (results, unanswered) = self.scrub_range(copyset, &voters, range).await?;
                report.unanswered.extend(
                    unanswered
                        .into_iter()
                        .map(|why| format!("chunk {chunk} at {offset}: {why}")),
                );
                // The page size is the replicas' (their sums are per page of the range).
                let pages = results
                    .iter()
                    .map(|(_, r)| r.pages.len())
                    .max()
                    .unwrap_or(0);
                let page = u64::from(len).div_ceil(pages.max(1) as u64);
                let verdict = compare(&results);
                let at = (chunk, offset, page);
                self.note_verdict(copyset, &mut report, at, (&results, &verdict), options)
                    .await;
                report.bytes += u64::from(len);
                offset += u64::from(len);
                pace(started, report.bytes, options.bytes_per_s).await;
            }
            report.chunks += 1;
            progress(report.chunks, total);
        }
        Ok(report)
    }

    /// The voters (from the leader), the chunks and the chunk size.
    async fn scrub_plan(
        &self,
        copyset: CopysetId,
    ) -> Result<(Vec<u64>, Vec<ChunkId>, u64), ClientError> {
        // Any answer through the leader finds it; the list then comes from the leader too.
        let body = self
            .leader_call(
                "list chunks",
                copyset,
                protocol::LIST_CHUNK_IMAGE,
                Bytes::new(),
            )
            .await?;
        let list = ImageList::decode(&body).map_err(|e| ClientError::Malformed(e.to_string()))?;
        let leader = self.cached_leader(copyset).unwrap_or(0);
        let status = self.copyset_status(leader, copyset).await?;
        let mut voters = status.membership.voters.clone();
        voters.sort_unstable();
        Ok((voters, list.chunks, list.chunk_size))
    }

    /// Adds a range's verdict to the report, repairing its bad pages when asked.
    async fn note_verdict(
        &self,
        copyset: CopysetId,
        report: &mut CopysetScrub,
        (chunk, offset, page): (ChunkId, u64, u64),
        (results, verdict): (&[(u64, RangeSums)], &Verdict),
        options: ScrubOptions,
    ) {
        for node in &verdict.presence {
            report.presence.push((chunk.0, *node));
        }
        for p in &verdict.undecided {
            report
                .undecided_pages
                .push((chunk.0, offset + *p as u64 * page));
        }
        for bad in &verdict.bad {
            let at = offset + bad.page as u64 * page;
            let good_node = holder_of(results, bad);
            let repaired = if options.repair {
                match self
                    .repair_page(copyset, (chunk, at, page), bad, good_node)
                    .await
                {
                    Ok(done) => done,
                    Err(why) => {
                        report
                            .unanswered
                            .push(format!("chunk {chunk} at {at}: repair: {why}"));
                        false
                    }
                }
            } else {
                false
            };
            report.repaired += u64::from(repaired);
            report.bad_pages.push(BadPageAt {
                node: bad.node,
                chunk: chunk.0,
                offset: at,
                good: bad.good,
                bad: bad.bad,
                repaired,
            });
        }
    }

    /// Rewrites one page that `bad.node` holds wrong with `good_node`'s bytes: read from that
    /// replica, checked against the majority's sum, written by a repair entry that changes the
    /// page only where it still has the bad sum. Whether the entry went through.
    async fn repair_page(
        &self,
        copyset: CopysetId,
        (chunk, offset, page): (ChunkId, u64, u64),
        bad: &BadPage,
        good_node: u64,
    ) -> Result<bool, String> {
        let request = ReadImagePiece {
            chunk,
            part: 0,
            offset,
            len: page as u32,
        };
        let (status, body) = self
            .call_node(
                good_node,
                copyset,
                protocol::READ_CHUNK_IMAGE,
                request.encode(),
            )
            .await?;
        if status != Status::Ok {
            return Err(format!("node {good_node} gave no page: {status:?}"));
        }
        let (header, data) = ImagePieceHeader::decode(&body).map_err(|e| e.to_string())?;
        let data = if header.zero {
            Bytes::from(vec![0u8; page as usize])
        } else {
            data
        };
        if crc32c::crc32c(&data) != bad.good {
            // Written since the scrub: the next scrub looks again.
            return Err(format!(
                "node {good_node}'s page changed since the scrub; scrub again"
            ));
        }
        let op = ChunkOp::Repair {
            chunk,
            offset: offset as u32,
            data,
            bad: bad.bad,
        };
        self.leader_call("repair", copyset, protocol::REPAIR_CHUNK, op.encode())
            .await
            .map(|_| true)
            .map_err(|e| e.to_string())
    }
}

/// A replica whose sum of `bad`'s page is the majority's.
fn holder_of(results: &[(u64, RangeSums)], bad: &BadPage) -> u64 {
    results
        .iter()
        .find(|(_, r)| r.pages.get(bad.page) == Some(&bad.good))
        .map_or(0, |(node, _)| *node)
}

/// Sleeps until `bytes` read since `started` is within `bytes_per_s`.
async fn pace(started: Instant, bytes: u64, bytes_per_s: u64) {
    if bytes_per_s == 0 {
        return;
    }
    let due = Duration::from_secs_f64(bytes as f64 / bytes_per_s as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        glommio::timer::sleep(wait).await;
    }
}
