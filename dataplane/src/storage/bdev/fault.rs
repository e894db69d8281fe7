//! A fault-injecting device for crash-consistency tests: an in-memory device that remembers
//! which writes no completed flush covers, so that "pulling the power" can lose them, keep
//! them, or tear them at any 512-byte boundary; and that can fail reads and writes (before
//! submission or on completion) and die at a chosen operation.
//!
//! Everything it decides comes from a seed, so a failing run replays exactly.

use std::cell::RefCell;
use std::rc::Rc;

use super::{check_range, Bdev, BdevError, MemBdev, YieldOnce};
use crate::storage::dma::{DmaBuf, DmaPool};

/// The sector: the unit a torn write keeps or loses.
pub const SECTOR: usize = 512;

/// The seeded generator faults replay from (`crate::rng::SplitMix64`).
pub type FaultRng = crate::rng::SplitMix64;

/// What happens to the writes no flush covers when the power goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every such write is lost.
    LoseAll,
    /// Each is lost, kept, or torn at a random 512-byte boundary.
    Random,
}

#[derive(Debug)]
struct Unflushed {
    offset: usize,
    /// The bytes the write replaced.
    old: Vec<u8>,
    /// Completion order; a flush covers writes completed before it was issued.
    sequence: u64,
}

#[derive(Debug)]
struct FaultState {
    rng: FaultRng,
    unflushed: Vec<Unflushed>,
    next_sequence: u64,
    operations: u64,
    /// The device dies at this operation count: it answers errors from then on.
    die_at: Option<u64>,
    dead: bool,
    /// Chance, in millionths, that an operation fails.
    error_rate: u32,
    injected_errors: u64,
}

/// The fault-injecting device. Clones share it.
#[derive(Debug, Clone)]
pub struct FaultBdev {
    inner: MemBdev,
    state: Rc<RefCell<FaultState>>,
}

enum Verdict {
    Go,
    Dead,
    Dispatch,
    Failed,
}

impl FaultBdev {
    /// A faultless wrapper around `inner`, with decisions drawn from `seed`.
    pub fn new(inner: MemBdev, seed: u64) -> FaultBdev {
        FaultBdev {
            inner,
            state: Rc::new(RefCell::new(FaultState {
                rng: FaultRng::new(seed),
                unflushed: Vec::new(),
                next_sequence: 0,
                operations: 0,
                die_at: None,
                dead: false,
                error_rate: 0,
                injected_errors: 0,
            })),
        }
    }

    /// Arms the faults: the device dies after `die_after` more operations (if given), and
    /// each operation fails with probability `error_rate` millionths.
    pub fn arm(&self, die_after: Option<u64>, error_rate: u32) {
        let mut state = self.state.borrow_mut();
        state.die_at = die_after.map(|n| state.operations + n);
        state.error_rate = error_rate;
    }

    /// Turns the faults off (a dead device stays dead).
    pub fn disarm(&self) {
        let mut state = self.state.borrow_mut();
        state.die_at = None;
        state.error_rate = 0;
    }

    /// Whether the power is off.
    pub fn is_dead(&self) -> bool {
        self.state.borrow().dead
    }

    /// Errors injected so far.
    pub fn injected_errors(&self) -> u64 {
        self.state.borrow().injected_errors
    }

    /// Writes no completed flush covers.
    pub fn unflushed_writes(&self) -> usize {
        self.state.borrow().unflushed.len()
    }

    /// Pulls the power: decides the fate of every write no flush covers and returns what
    /// the medium then holds. The device is dead afterwards.
    pub fn crash(&self, mode: CrashMode) -> Vec<u8> {
        let mut state = self.state.borrow_mut();
        state.dead = true;
        let unflushed = std::mem::take(&mut state.unflushed);
        let mut image = self.inner.image();
        // Undo every unflushed write, newest first, to find what the medium held at the last
        // flush; the new contents of each write are kept aside.
        let mut news = Vec::with_capacity(unflushed.len());
        for write in unflushed.iter().rev() {
            let range = write.offset..write.offset + write.old.len();
            news.push(image[range.clone()].to_vec());
            image[range].copy_from_slice(&write.old);
        }
        news.reverse();
        // Then let each one, in order, reach the medium whole, not at all, or torn.
        for (write, new) in unflushed.iter().zip(news) {
            let sectors = new.len().div_ceil(SECTOR) as u64;
            let kept_sectors = match mode {
                CrashMode::LoseAll => 0,
                CrashMode::Random => match state.rng.below(3) {
                    0 => 0,
                    1 => sectors,
                    _ => state.rng.below(sectors + 1),
                },
            };
            let kept = (kept_sectors as usize * SECTOR).min(new.len());
            image[write.offset..write.offset + kept].copy_from_slice(&new[..kept]);
        }
        image
    }

    fn verdict(&self) -> Verdict {
        let mut state = self.state.borrow_mut();
        state.operations += 1;
        if state.die_at.is_some_and(|at| state.operations >= at) {
            state.dead = true;
        }
        if state.dead {
            return Verdict::Dead;
        }
        if state.error_rate > 0 && state.rng.below(1_000_000) < u64::from(state.error_rate) {
            state.injected_errors += 1;
            return if state.rng.below(2) == 0 {
                Verdict::Dispatch
            } else {
                Verdict::Failed
            };
        }
        Verdict::Go
    }

    /// Applies a write to the memory, remembering what it replaced. With `keep` short of the
    /// full length, only that prefix lands (a failed completion may have changed the medium).
    fn apply(&self, offset: u64, data: Option<&[u8]>, len: usize, keep: usize) {
        let offset = offset as usize;
        let old = self
            .inner
            .with_image(|image| image[offset..offset + len].to_vec());
        self.inner.with_image(|image| {
            let target = &mut image[offset..offset + keep];
            match data {
                Some(data) => target.copy_from_slice(&data[..keep]),
                None => target.fill(0),
            }
        });
        let mut state = self.state.borrow_mut();
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        state.unflushed.push(Unflushed {
            offset,
            old,
            sequence,
        });
    }

    async fn write_bytes(
        &self,
        offset: u64,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<(), BdevError> {
        check_range(offset, len as u64, self.block_size(), self.capacity())?;
        let dead = || BdevError::WriteFailed {
            status: -libc::EIO,
            offset,
            len: len as u64,
        };
        if self.is_dead() {
            return Err(dead());
        }
        YieldOnce::new().await;
        match self.verdict() {
            Verdict::Go => {
                self.apply(offset, data, len, len);
                Ok(())
            }
            Verdict::Dead => Err(dead()),
            Verdict::Dispatch => Err(BdevError::WriteDispatch {
                errno: libc::EAGAIN,
                offset,
                len: len as u64,
            }),
            Verdict::Failed => {
                let sectors = len.div_ceil(SECTOR) as u64;
                let keep = self.state.borrow_mut().rng.below(sectors + 1) as usize * SECTOR;
                self.apply(offset, data, len, keep.min(len));
                Err(BdevError::WriteFailed {
                    status: -libc::EIO,
                    offset,
                    len: len as u64,
                })
            }
        }
    }
}

impl Bdev for FaultBdev {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }
    fn pool(&self) -> &DmaPool {
        self.inner.pool()
    }

    async fn read(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError> {
        let len = buf.len() as u64;
        check_range(offset, len, self.block_size(), self.capacity())?;
        match self.verdict() {
            Verdict::Go => self.inner.read(offset, buf).await,
            Verdict::Dispatch => Err(BdevError::ReadDispatch {
                errno: libc::EAGAIN,
                offset,
                len,
            }),
            Verdict::Dead | Verdict::Failed => Err(BdevError::ReadFailed {
                status: -libc::EIO,
                offset,
                len,
            }),
        }
    }

    async fn write(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError> {
        self.write_bytes(offset, Some(buf.as_slice()), buf.len())
            .await?;
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BdevError> {
        let size = usize::try_from(len).map_err(|_| BdevError::OutOfRange {
            offset,
            len,
            capacity: self.capacity(),
        })?;
        self.write_bytes(offset, None, size).await
    }

    async fn flush(&self) -> Result<(), BdevError> {
        let covered = self.state.borrow().next_sequence;
        YieldOnce::new().await;
        match self.verdict() {
            Verdict::Go => {
                self.state
                    .borrow_mut()
                    .unflushed
                    .retain(|w| w.sequence >= covered);
                Ok(())
            }
            _ => Err(BdevError::FlushFailed { status: -libc::EIO }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    fn filled(bdev: &FaultBdev, fill: u8) -> DmaBuf {
        let mut buf = bdev.alloc(4096).unwrap();
        buf.as_mut_slice().unwrap().fill(fill);
        buf
    }

    #[test]
    fn flushed_writes_survive_a_crash_and_unflushed_ones_may_not() {
        block_on(async {
            let bdev = FaultBdev::new(MemBdev::new(1 << 20, 4096, 1 << 20).unwrap(), 1);
            bdev.write(0, filled(&bdev, 1)).await.unwrap();
            bdev.flush().await.unwrap();
            bdev.write(4096, filled(&bdev, 2)).await.unwrap();
            bdev.write(0, filled(&bdev, 3)).await.unwrap();
            assert_eq!(bdev.unflushed_writes(), 2);
            let image = bdev.crash(CrashMode::LoseAll);
            assert!(image[..4096].iter().all(|b| *b == 1));
            assert!(image[4096..8192].iter().all(|b| *b == 0));
            assert!(matches!(
                bdev.write(0, filled(&bdev, 4)).await,
                Err(BdevError::WriteFailed { .. })
            ));
        });
    }

    #[test]
    fn a_torn_write_keeps_a_prefix_of_whole_sectors() {
        for seed in 0..50 {
            block_on(async {
                let bdev = FaultBdev::new(MemBdev::new(1 << 20, 4096, 1 << 20).unwrap(), seed);
                bdev.write(0, filled(&bdev, 9)).await.unwrap();
                let image = bdev.crash(CrashMode::Random);
                let kept = image[..4096].iter().take_while(|b| **b == 9).count();
                assert_eq!(kept % SECTOR, 0, "seed {seed}");
                assert!(image[kept..4096].iter().all(|b| *b == 0), "seed {seed}");
            });
        }
    }

    #[test]
    fn the_device_dies_at_the_chosen_operation() {
        block_on(async {
            let bdev = FaultBdev::new(MemBdev::new(1 << 20, 4096, 1 << 20).unwrap(), 1);
            bdev.arm(Some(3), 0);
            assert!(bdev.write(0, filled(&bdev, 1)).await.is_ok());
            assert!(bdev.flush().await.is_ok());
            assert!(bdev.write(0, filled(&bdev, 1)).await.is_err());
            assert!(bdev.is_dead());
        });
    }
}
