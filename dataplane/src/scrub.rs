//! Scrub: comparing what the replicas of a copyset hold, page by page, and repairing the odd
//! one out. The pure part: the result one replica gives for a range, its encoding, and the
//! verdict over all replicas' results.
//!
//! How a scrub runs (docs/architecture.md, "Scrub"): the leader proposes `ChunkOp::Scrub` for a
//! range of a chunk; every replica, applying that entry, reads the range and takes a crc32c of
//! each page. Entries of one chunk apply in log order, so all replicas hash the same version of
//! the range — the one after every earlier write and before every later one — while writes go
//! on. The scrubber collects each replica's result by the entry's index (`SCRUB_RESULT`) and
//! compares. A page on which one replica differs from a majority is repaired by
//! `ChunkOp::Repair`: the majority's bytes, applied only where the page still has the bad
//! replica's checksum, so a write that came after the scrub (which every replica applied alike)
//! is never undone.

use serde::Serialize;

/// One replica's checksums of a range, taken when it applied the scrub entry at `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSums {
    /// The scrub entry's log index.
    pub index: u64,
    /// Whether the chunk existed on this replica (an absent chunk has no page sums).
    pub present: bool,
    /// crc32c of each page of the range.
    pub pages: Vec<u32>,
}

/// Why bytes are not a [`RangeSums`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scrub result of {len} bytes is malformed")]
pub struct Malformed {
    /// Length of what arrived.
    pub len: usize,
}

/// The most pages one scrub entry covers (1 MiB of 4 KiB pages; a range is bounded so that an
/// apply reads little at a time).
pub const MAX_PAGES: usize = 4096;

impl RangeSums {
    /// `index u64 | present u8 | count u32 | count × crc32c u32`, little endian.
    pub fn encode(&self) -> bytes::Bytes {
        let mut out = Vec::with_capacity(13 + 4 * self.pages.len());
        out.extend_from_slice(&self.index.to_le_bytes());
        out.push(u8::from(self.present));
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        for sum in &self.pages {
            out.extend_from_slice(&sum.to_le_bytes());
        }
        bytes::Bytes::from(out)
    }

    /// The inverse of [`RangeSums::encode`]; refuses a wrong length or count.
    pub fn decode(bytes: &[u8]) -> Result<RangeSums, Malformed> {
        let bad = Malformed { len: bytes.len() };
        if bytes.len() < 13 {
            return Err(bad);
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[..8]);
        let index = u64::from_le_bytes(word);
        let present = match bytes[8] {
            0 => false,
            1 => true,
            _ => return Err(bad),
        };
        let mut count = [0u8; 4];
        count.copy_from_slice(&bytes[9..13]);
        let count = u32::from_le_bytes(count) as usize;
        if count > MAX_PAGES || bytes.len() != 13 + 4 * count {
            return Err(bad);
        }
        let pages = bytes[13..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(RangeSums {
            index,
            present,
            pages,
        })
    }
}

/// The crc32c of each `page_size` page of `data` (a last short page is summed as it is).
pub fn page_sums(data: &[u8], page_size: usize) -> Vec<u32> {
    data.chunks(page_size.max(1)).map(crc32c::crc32c).collect()
}

/// A page on which one replica differs from the majority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadPage {
    /// The replica (node id) that differs.
    pub node: u64,
    /// The page's index within the range.
    pub page: usize,
    /// The majority's checksum.
    pub good: u32,
    /// The replica's checksum.
    pub bad: u32,
}

/// What the replicas' results of one range say.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Verdict {
    /// Pages on which a replica differs from a majority: repairable from it.
    pub bad: Vec<BadPage>,
    /// Pages on which no checksum has a majority: reported, not repaired.
    pub undecided: Vec<usize>,
    /// Replicas that do not have the chunk while a majority do (or have it while a majority
    /// do not).
    pub presence: Vec<u64>,
}

impl Verdict {
    /// Whether every replica agrees.
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty() && self.undecided.is_empty() && self.presence.is_empty()
    }
}

/// Compares the replicas' results of one range: `(node, sums)` for each replica that answered.
/// A majority is more than half of the replicas given.
pub fn compare(results: &[(u64, RangeSums)]) -> Verdict {
    let mut verdict = Verdict::default();
    let majority = results.len() / 2 + 1;
    let present = results.iter().filter(|(_, r)| r.present).count();
    let chunk_is_there = present >= majority;
    if present != 0 && present != results.len() {
        verdict.presence = results
            .iter()
            .filter(|(_, r)| r.present != chunk_is_there)
            .map(|(node, _)| *node)
            .collect();
    }
    let holders: Vec<&(u64, RangeSums)> = results.iter().filter(|(_, r)| r.present).collect();
    if !chunk_is_there {
        return verdict;
    }
    let pages = holders
        .iter()
        .map(|(_, r)| r.pages.len())
        .max()
        .unwrap_or(0);
    for page in 0..pages {
        let sums: Vec<Option<u32>> = holders
            .iter()
            .map(|(_, r)| r.pages.get(page).copied())
            .collect();
        let winner = sums
            .iter()
            .flatten()
            .find(|s| sums.iter().filter(|t| **t == Some(**s)).count() >= majority)
            .copied();
        match winner {
            Some(good) => {
                for ((node, _), sum) in holders.iter().zip(&sums) {
                    if let Some(bad) = sum.filter(|s| *s != good) {
                        verdict.bad.push(BadPage {
                            node: *node,
                            page,
                            good,
                            bad,
                        });
                    }
                }
            }
            None if sums.iter().flatten().any(|s| Some(*s) != sums[0]) => {
                verdict.undecided.push(page);
            }
            None => {}
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(index: u64, pages: &[u32]) -> RangeSums {
        RangeSums {
            index,
            present: true,
            pages: pages.to_vec(),
        }
    }

    #[test]
    fn the_encoding_round_trips_and_refuses_bad_lengths() {
        let r = sums(42, &[1, 2, 0xdead_beef]);
        assert_eq!(RangeSums::decode(&r.encode()).unwrap(), r);
        let absent = RangeSums {
            index: 7,
            present: false,
            pages: vec![],
        };
        assert_eq!(RangeSums::decode(&absent.encode()).unwrap(), absent);
        let encoded = r.encode();
        assert!(RangeSums::decode(&encoded[..encoded.len() - 1]).is_err());
        assert!(RangeSums::decode(&encoded[..5]).is_err());
        let mut huge = encoded.to_vec();
        huge[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(RangeSums::decode(&huge).is_err());
    }

    #[test]
    fn agreeing_replicas_are_clean() {
        let r = [
            (1, sums(5, &[1, 2])),
            (2, sums(5, &[1, 2])),
            (3, sums(5, &[1, 2])),
        ];
        assert!(compare(&r).is_clean());
    }

    #[test]
    fn the_odd_replica_is_named_with_its_page_and_the_majority_sum() {
        let r = [
            (1, sums(5, &[1, 2, 3])),
            (2, sums(5, &[1, 9, 3])),
            (3, sums(5, &[1, 2, 3])),
        ];
        let verdict = compare(&r);
        assert_eq!(
            verdict.bad,
            vec![BadPage {
                node: 2,
                page: 1,
                good: 2,
                bad: 9
            }]
        );
        assert!(verdict.undecided.is_empty());
    }

    #[test]
    fn three_different_sums_have_no_majority_and_are_not_repaired() {
        let r = [(1, sums(5, &[1])), (2, sums(5, &[2])), (3, sums(5, &[3]))];
        let verdict = compare(&r);
        assert!(verdict.bad.is_empty());
        assert_eq!(verdict.undecided, vec![0]);
    }

    #[test]
    fn a_replica_missing_the_chunk_is_named() {
        let absent = RangeSums {
            index: 5,
            present: false,
            pages: vec![],
        };
        let r = [(1, sums(5, &[1])), (2, absent), (3, sums(5, &[1]))];
        let verdict = compare(&r);
        assert_eq!(verdict.presence, vec![2]);
        assert!(verdict.bad.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = RangeSums::decode(&bytes);
        }
    }

    #[test]
    fn page_sums_are_per_page() {
        let mut data = vec![0u8; 3 * 4096];
        data[4096] = 1;
        let s = page_sums(&data, 4096);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0], s[2]);
        assert_ne!(s[0], s[1]);
    }
}
