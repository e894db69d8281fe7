//! What a job does, one I/O at a time: the pure, seeded generator of operations. Targets only
//! execute what this hands out, so every target sees the same sequence for the same job.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::job::{Job, Pattern};

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A read.
    Read,
    /// A write.
    Write,
}

/// One I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Read or write.
    pub kind: OpKind,
    /// Byte offset on the target.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Visits every slot of `[0, n)` exactly once per pass, in a scrambled order, with no memory:
/// a full-period linear congruential generator modulo the next power of two, skipping values
/// past `n` (fio's random map does the same job with a bitmap or an LFSR).
#[derive(Debug, Clone)]
struct Permutation {
    n: u64,
    mask: u64,
    multiplier: u64,
    increment: u64,
    state: u64,
}

impl Permutation {
    fn new(n: u64, rng: &mut SmallRng) -> Permutation {
        assert!(n > 0);
        let modulus = n.next_power_of_two().max(4);
        // Hull–Dobell: with a power-of-two modulus, an odd increment and a multiplier that is
        // 1 mod 4 give a full period.
        let multiplier = (rng.gen::<u64>() & !3) | 1;
        let increment = rng.gen::<u64>() | 1;
        Permutation {
            n,
            mask: modulus - 1,
            multiplier,
            increment,
            state: rng.gen::<u64>() & (modulus - 1),
        }
    }

    fn next(&mut self) -> u64 {
        loop {
            self.state = (self
                .state
                .wrapping_mul(self.multiplier)
                .wrapping_add(self.increment))
                & self.mask;
            if self.state < self.n {
                return self.state;
            }
        }
    }
}

/// The operations of one clone of a job (clone `index` of `numjobs`). Clones split the job's
/// region evenly so that their writes never overlap, which keeps `verify` meaningful.
#[derive(Debug, Clone)]
pub struct Workload {
    pattern: Pattern,
    read_percent: u8,
    region_start: u64,
    /// Invariant: a multiple of `unit` and at least one unit.
    region_len: u64,
    /// Offsets are multiples of the largest block size.
    unit: u64,
    block_sizes: Vec<(u64, u8)>,
    norandommap: bool,
    rng: SmallRng,
    permutation: Permutation,
    next_sequential: u64,
    issued_bytes: u64,
}

impl Workload {
    /// The generator for clone `index` of `job`.
    pub fn new(job: &Job, index: u32) -> Workload {
        let unit = job.max_block_size();
        let per_clone = job.size / u64::from(job.numjobs);
        let region_len = (per_clone / unit).max(1) * unit;
        let region_start = job.offset + u64::from(index) * region_len;
        let mut rng = SmallRng::seed_from_u64(job.randseed ^ (u64::from(index) << 32));
        let permutation = Permutation::new(region_len / unit, &mut rng);
        Workload {
            pattern: job.pattern,
            read_percent: job.pattern.read_percent(job.rwmixread),
            region_start,
            region_len,
            unit,
            block_sizes: job
                .block_sizes
                .iter()
                .map(|b| (b.size, b.percent))
                .collect(),
            norandommap: job.norandommap,
            rng,
            permutation,
            next_sequential: 0,
            issued_bytes: 0,
        }
    }

    /// Bytes in this clone's region.
    pub fn region_len(&self) -> u64 {
        self.region_len
    }

    /// Where the region starts.
    pub fn region_start(&self) -> u64 {
        self.region_start
    }

    /// Bytes issued so far.
    pub fn issued_bytes(&self) -> u64 {
        self.issued_bytes
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        let kind = match self.read_percent {
            100 => OpKind::Read,
            0 => OpKind::Write,
            p => {
                if self.rng.gen_range(0..100u8) < p {
                    OpKind::Read
                } else {
                    OpKind::Write
                }
            }
        };
        let len = self.pick_block_size();
        let slot_offset = if self.pattern.is_random() {
            let slot = if self.norandommap {
                self.rng.gen_range(0..self.region_len / self.unit)
            } else {
                self.permutation.next()
            };
            slot * self.unit
        } else {
            let offset = self.next_sequential;
            self.next_sequential = (offset + self.unit) % self.region_len;
            offset
        };
        self.issued_bytes += len;
        Op {
            kind,
            offset: self.region_start + slot_offset,
            len,
        }
    }

    fn pick_block_size(&mut self) -> u64 {
        if self.block_sizes.len() == 1 {
            return self.block_sizes[0].0;
        }
        let mut draw = self.rng.gen_range(0..100u8);
        for &(size, percent) in &self.block_sizes {
            if draw < percent {
                return size;
            }
            draw -= percent;
        }
        self.unit
    }
}

/// `verify=crc32c` blocks: a header (magic, offset, length, CRC32C of the rest) at the start of
/// each block, then seeded filler. A read checks every block that carries the magic.
pub mod verify {
    const MAGIC: u32 = 0x6368_6b76; // "chkv"
    const HEADER: usize = 4 + 8 + 4 + 4;

    /// Fills `block` (which will be written at `offset`) with a verifiable pattern.
    pub fn fill(block: &mut [u8], offset: u64, seed: u64) {
        let mut state = seed ^ offset.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
        let len = block.len();
        for chunk in block[HEADER.min(len)..].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        if len < HEADER {
            return;
        }
        block[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        block[4..12].copy_from_slice(&offset.to_le_bytes());
        block[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = crc32c::crc32c(&block[HEADER..]);
        block[16..20].copy_from_slice(&crc.to_le_bytes());
    }

    /// What a read found.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Verdict {
        /// A block written by `fill` for this offset, intact.
        Good,
        /// No header: never written by this job.
        Unwritten,
        /// A header that does not match: the wrong block, a torn or corrupt one.
        Bad,
    }

    /// Checks a block read from `offset`.
    pub fn check(block: &[u8], offset: u64) -> Verdict {
        if block.len() < HEADER {
            return Verdict::Unwritten;
        }
        let word = |range: std::ops::Range<usize>| -> u64 {
            let mut bytes = [0u8; 8];
            bytes[..range.len()].copy_from_slice(&block[range]);
            u64::from_le_bytes(bytes)
        };
        if word(0..4) as u32 != MAGIC {
            return Verdict::Unwritten;
        }
        let intact = word(4..12) == offset
            && word(12..16) as usize == block.len()
            && word(16..20) as u32 == crc32c::crc32c(&block[HEADER..]);
        if intact {
            Verdict::Good
        } else {
            Verdict::Bad
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::parse_jobs;
    use std::collections::HashSet;

    fn job(text: &str) -> Job {
        parse_jobs(Some(text), &[]).unwrap().remove(0)
    }

    #[test]
    fn random_offsets_cover_the_region_once_per_pass() {
        let job = job("[a]\nrw=randwrite\nbs=4k\nsize=1000k\n");
        let mut workload = Workload::new(&job, 0);
        let slots = workload.region_len() / 4096;
        let seen: HashSet<u64> = (0..slots).map(|_| workload.next_op().offset).collect();
        assert_eq!(seen.len() as u64, slots);
        assert!(seen.iter().all(|o| o % 4096 == 0 && *o < 1000 * 1024));
    }

    #[test]
    fn the_same_seed_gives_the_same_sequence_and_another_seed_does_not() {
        let a = job("[a]\nrw=randrw\nsize=1m\nrandseed=7\n");
        let b = job("[a]\nrw=randrw\nsize=1m\nrandseed=8\n");
        let run = |job: &Job| {
            let mut w = Workload::new(job, 0);
            (0..64).map(|_| w.next_op()).collect::<Vec<_>>()
        };
        assert_eq!(run(&a), run(&a));
        assert_ne!(run(&a), run(&b));
    }

    #[test]
    fn clones_get_disjoint_regions() {
        let job = job("[a]\nrw=write\nsize=1m\nnumjobs=4\n");
        let regions: Vec<(u64, u64)> = (0..4)
            .map(|i| {
                let w = Workload::new(&job, i);
                (w.region_start(), w.region_start() + w.region_len())
            })
            .collect();
        for pair in regions.windows(2) {
            assert!(pair[0].1 <= pair[1].0);
        }
    }

    #[test]
    fn mixed_jobs_read_about_their_share() {
        let job = job("[a]\nrw=randrw\nrwmixread=70\nsize=16m\n");
        let mut w = Workload::new(&job, 0);
        let reads = (0..10_000)
            .filter(|_| w.next_op().kind == OpKind::Read)
            .count();
        assert!((6_500..7_500).contains(&reads), "{reads}");
    }

    #[test]
    fn verify_detects_a_misdirected_or_corrupt_block() {
        let mut block = vec![0u8; 4096];
        assert_eq!(verify::check(&block, 0), verify::Verdict::Unwritten);
        verify::fill(&mut block, 8192, 1);
        assert_eq!(verify::check(&block, 8192), verify::Verdict::Good);
        assert_eq!(verify::check(&block, 4096), verify::Verdict::Bad);
        block[100] ^= 1;
        assert_eq!(verify::check(&block, 8192), verify::Verdict::Bad);
    }
}
