//! Disk faults in a running process: the fault suite's disk faults.
//!
//! With `[fault] injection = true` every shard's device is wrapped in an [`InjectedBdev`], and
//! one [`DiskFaults`] per process — the switchboard — decides what each operation does. The
//! metrics endpoint arms it at run time (`POST /fault?disk=…`):
//!
//! - `errors`: reads and writes fail at a rate (millionths). Half the failures are submission
//!   failures that change nothing; the other half are completion failures, and a failed write
//!   may have landed torn, a prefix of whole blocks.
//! - `full`: every write fails with `ENOSPC` and changes nothing (a full file system under a
//!   file-backed device).
//! - `power-cut`: the power goes. Every write that no completed flush of its device covers is
//!   lost, kept, or torn at a 512-byte boundary, decided from the seed; the device file is
//!   left as a disk would be after the cut, and the process exits at once with
//!   [`EXIT_POWER_CUT`]. From the cut on, no operation of any shard completes.
//!
//! To lose a write the switchboard keeps the bytes it replaced, read just before it: writes
//! cost a read more with injection on, which is why it is for tests only. The writes the
//! engine has in flight at once never overlap (it never depends on the order of two
//! concurrent writes to the same blocks), which is what makes "undo newest first" exact.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::fault::{FaultRng, SECTOR};
use super::{check_range, AnyBdev, Bdev, BdevError};
use crate::metrics::http::FaultAnswer;
use crate::storage::dma::{DmaBuf, DmaPool};

/// The exit status of a process whose power was cut by fault injection.
pub const EXIT_POWER_CUT: i32 = 4;

/// The fault armed in a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFault {
    /// Operations go through.
    Off,
    /// Reads fail with probability `read`, writes and flushes with `write` (millionths).
    Errors {
        /// Read failures per million reads.
        read: u32,
        /// Write and flush failures per million.
        write: u32,
    },
    /// Every write fails with `ENOSPC`; reads and flushes go through.
    Full,
}

impl std::fmt::Display for DiskFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskFault::Off => f.write_str("off"),
            DiskFault::Errors { read, write } => {
                write!(f, "errors (reads {read}, writes {write} per million)")
            }
            DiskFault::Full => f.write_str("full (writes fail with ENOSPC)"),
        }
    }
}

/// A write that landed and that no flush of its device covers yet.
#[derive(Debug)]
struct Landed {
    device: u32,
    offset: u64,
    old: Vec<u8>,
    new: Vec<u8>,
    sequence: u64,
}

#[derive(Debug)]
struct State {
    fault: DiskFault,
    rng: FaultRng,
    unflushed: Vec<Landed>,
    next_sequence: u64,
    powered_off: bool,
    injected: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// What one operation does, decided under the switchboard's lock.
enum Verdict {
    Go,
    /// Fails before reaching the device.
    Dispatch,
    /// Reaches the device and fails; a write keeps this many bytes.
    Failed {
        keep: u64,
    },
    /// The device is full.
    Full,
    /// The power is off: the operation never completes.
    Off,
}

/// The process's disk-fault switchboard, shared by every shard's device.
#[derive(Debug)]
pub struct DiskFaults {
    state: Mutex<State>,
    /// The device file, where a power cut leaves its mark (none for memory devices, whose
    /// contents go with the process anyway).
    file: Option<PathBuf>,
}

impl DiskFaults {
    /// A switchboard with no fault armed, drawing its decisions from `seed`.
    pub fn new(seed: u64, file: Option<PathBuf>) -> Arc<DiskFaults> {
        Arc::new(DiskFaults {
            state: Mutex::new(State {
                fault: DiskFault::Off,
                rng: FaultRng::new(seed),
                unflushed: Vec::new(),
                next_sequence: 0,
                powered_off: false,
                injected: 0,
            }),
            file,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state: every change is one step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms `fault` (or turns faults off).
    pub fn set(&self, fault: DiskFault) {
        self.lock().fault = fault;
    }

    /// The fault armed now.
    pub fn fault(&self) -> DiskFault {
        self.lock().fault
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Writes that landed and that no flush covers yet.
    pub fn unflushed_writes(&self) -> usize {
        self.lock().unflushed.len()
    }

    fn decide(&self, op: Op, len: u64, block: u64) -> Verdict {
        let mut state = self.lock();
        if state.powered_off {
            return Verdict::Off;
        }
        let rate = match (state.fault, op) {
            (DiskFault::Off, _) => return Verdict::Go,
            (DiskFault::Full, Op::Write) => {
                state.injected += 1;
                return Verdict::Full;
            }
            (DiskFault::Full, _) => return Verdict::Go,
            (DiskFault::Errors { read, .. }, Op::Read) => read,
            (DiskFault::Errors { write, .. }, _) => write,
        };
        if rate == 0 || state.rng.below(1_000_000) >= u64::from(rate) {
            return Verdict::Go;
        }
        state.injected += 1;
        if state.rng.below(2) == 0 {
            Verdict::Dispatch
        } else {
            let blocks = len / block.max(1);
            let keep = state.rng.below(blocks + 1) * block;
            Verdict::Failed { keep }
        }
    }

    fn landed(&self, device: u32, offset: u64, old: Vec<u8>, new: Vec<u8>) {
        let mut state = self.lock();
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        state.unflushed.push(Landed {
            device,
            offset,
            old,
            new,
            sequence,
        });
    }

    /// Cuts the power: from now on no operation completes, and every write no flush covers
    /// is lost, kept or torn in the device file. Returns what happened, for the log and the
    /// caller; the caller then ends the process.
    pub fn power_cut(&self) -> Result<String, String> {
        let mut state = self.lock();
        state.powered_off = true;
        let unflushed = std::mem::take(&mut state.unflushed);
        let Some(path) = &self.file else {
            return Ok(format!(
                "power cut: {} unflushed writes go with the memory device",
                unflushed.len()
            ));
        };
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| format!("power cut: cannot open {}: {e}", path.display()))?;
        let write = |offset: u64, bytes: &[u8]| {
            file.write_all_at(bytes, offset)
                .map_err(|e| format!("power cut: writing {}: {e}", path.display()))
        };
        // Undo every unflushed write, newest first, to reach what the medium held at the
        // last flushes; then let each, in order, land whole, not at all, or torn.
        for landed in unflushed.iter().rev() {
            write(landed.offset, &landed.old)?;
        }
        let (mut lost, mut kept, mut torn) = (0, 0, 0);
        for landed in &unflushed {
            let sectors = landed.new.len().div_ceil(SECTOR) as u64;
            let keep_sectors = match state.rng.below(3) {
                0 => 0,
                1 => sectors,
                _ => state.rng.below(sectors + 1),
            };
            match keep_sectors {
                0 => lost += 1,
                n if n == sectors => kept += 1,
                _ => torn += 1,
            }
            let keep = (keep_sectors as usize * SECTOR).min(landed.new.len());
            if keep > 0 {
                write(landed.offset, &landed.new[..keep])?;
            }
        }
        file.sync_all()
            .map_err(|e| format!("power cut: syncing {}: {e}", path.display()))?;
        Ok(format!(
            "power cut: {} unflushed writes: {lost} lost, {kept} kept, {torn} torn",
            unflushed.len()
        ))
    }
}

/// Failures per million an `errors` fault injects where the query names no rate: 1%.
pub const DEFAULT_ERROR_RATE: u32 = 10_000;

/// Answers `POST /fault?QUERY`: `disk=off`, `disk=errors[&read=N][&write=N]` (failures per
/// million), `disk=full` or `disk=power-cut`.
pub fn control(faults: &DiskFaults, query: &str) -> FaultAnswer {
    let refuse = |text: String| FaultAnswer {
        ok: false,
        text,
        exit: None,
    };
    let mut disk = None;
    let (mut read, mut write) = (DEFAULT_ERROR_RATE, DEFAULT_ERROR_RATE);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return refuse(format!("`{pair}` is not KEY=VALUE"));
        };
        match key {
            "disk" => disk = Some(value),
            "read" | "write" => {
                let Some(rate) = value.parse::<u32>().ok().filter(|r| *r <= 1_000_000) else {
                    return refuse(format!("{key}={value}: a rate is failures per million"));
                };
                if key == "read" {
                    read = rate;
                } else {
                    write = rate;
                }
            }
            _ => return refuse(format!("unknown parameter `{key}` (disk, read, write)")),
        }
    }
    let fault = match disk {
        Some("off") => DiskFault::Off,
        Some("errors") => DiskFault::Errors { read, write },
        Some("full") => DiskFault::Full,
        Some("power-cut") => {
            return match faults.power_cut() {
                Ok(text) => {
                    tracing::error!("{text}; the process ends now");
                    FaultAnswer {
                        ok: true,
                        text,
                        exit: Some(EXIT_POWER_CUT),
                    }
                }
                // The device file could not be rewritten: end anyway, the power is off.
                Err(text) => FaultAnswer {
                    ok: false,
                    text,
                    exit: Some(EXIT_POWER_CUT),
                },
            };
        }
        _ => return refuse("disk= must be off, errors, full or power-cut".into()),
    };
    faults.set(fault);
    tracing::warn!(%fault, "disk fault armed");
    FaultAnswer {
        ok: true,
        text: format!("disk fault: {fault}"),
        exit: None,
    }
}

/// One shard's device behind the switchboard.
#[derive(Debug)]
pub struct InjectedBdev {
    inner: AnyBdev,
    faults: Arc<DiskFaults>,
    /// Which device this is (the shard): a flush covers only its own device's writes.
    device: u32,
}

impl InjectedBdev {
    /// Wraps `inner`, shard `device`'s device, behind `faults`.
    pub fn new(inner: AnyBdev, faults: Arc<DiskFaults>, device: u32) -> InjectedBdev {
        InjectedBdev {
            inner,
            faults,
            device,
        }
    }

    /// The switchboard.
    pub fn faults(&self) -> &Arc<DiskFaults> {
        &self.faults
    }

    /// Writes `new` (all of it, or `None` for zeroes) at `offset`, keeping what it replaced;
    /// hands the buffer back.
    async fn write_bytes(
        &self,
        offset: u64,
        new: Option<DmaBuf>,
        len: u64,
    ) -> Result<Option<DmaBuf>, BdevError> {
        check_range(offset, len, self.block_size(), self.capacity())?;
        let block = u64::from(self.block_size());
        let failed = |status: i32| BdevError::WriteFailed {
            status,
            offset,
            len,
        };
        let verdict = self.faults.decide(Op::Write, len, block);
        let (keep, fails) = match verdict {
            Verdict::Off => return std::future::pending().await,
            Verdict::Full => return Err(failed(-libc::ENOSPC)),
            Verdict::Dispatch => {
                return Err(BdevError::WriteDispatch {
                    errno: libc::EIO,
                    offset,
                    len,
                })
            }
            Verdict::Go => (len, false),
            Verdict::Failed { keep } => (keep, true),
        };
        let size = usize::try_from(len).map_err(|_| failed(-libc::EINVAL))?;
        let old = Box::pin(self.inner.read_new(offset, size))
            .await?
            .as_slice()
            .to_vec();
        let bytes = match &new {
            Some(buf) => buf.as_slice().to_vec(),
            None => vec![0u8; size],
        };
        if keep == len {
            let back = match new {
                Some(buf) => Some(Box::pin(self.inner.write(offset, buf)).await?),
                None => {
                    Box::pin(self.inner.write_zeroes(offset, len)).await?;
                    None
                }
            };
            self.faults.landed(self.device, offset, old, bytes);
            return if fails {
                Err(failed(-libc::EIO))
            } else {
                Ok(back)
            };
        }
        if keep > 0 {
            let mut prefix = self.inner.alloc(keep as usize)?;
            prefix
                .as_mut_slice()
                .ok_or(BdevError::ReadOnlyBuffer)?
                .copy_from_slice(&bytes[..keep as usize]);
            Box::pin(self.inner.write(offset, prefix)).await?;
            self.faults.landed(self.device, offset, old, bytes);
        }
        Err(failed(-libc::EIO))
    }
}

impl Bdev for InjectedBdev {
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
        match self
            .faults
            .decide(Op::Read, len, u64::from(self.block_size()))
        {
            Verdict::Go | Verdict::Full => Box::pin(self.inner.read(offset, buf)).await,
            Verdict::Off => std::future::pending().await,
            Verdict::Dispatch => Err(BdevError::ReadDispatch {
                errno: libc::EIO,
                offset,
                len,
            }),
            Verdict::Failed { .. } => Err(BdevError::ReadFailed {
                status: -libc::EIO,
                offset,
                len,
            }),
        }
    }

    async fn write(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError> {
        let len = buf.len() as u64;
        self.write_bytes(offset, Some(buf), len)
            .await?
            .ok_or(BdevError::WriteFailed {
                status: -libc::EIO,
                offset,
                len,
            })
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BdevError> {
        self.write_bytes(offset, None, len).await.map(drop)
    }

    async fn flush(&self) -> Result<(), BdevError> {
        let covered = {
            let state = self.faults.lock();
            state.next_sequence
        };
        match self.faults.decide(Op::Flush, 0, 1) {
            Verdict::Off => return std::future::pending().await,
            Verdict::Dispatch | Verdict::Failed { .. } => {
                return Err(BdevError::FlushFailed { status: -libc::EIO })
            }
            Verdict::Go | Verdict::Full => {}
        }
        Box::pin(self.inner.flush()).await?;
        let device = self.device;
        self.faults
            .lock()
            .unflushed
            .retain(|w| w.device != device || w.sequence >= covered);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::bdev::{open, MemBdev};
    use futures_lite::future::block_on;
    use glommio::LocalExecutorBuilder;

    fn mem(faults: &Arc<DiskFaults>) -> InjectedBdev {
        let inner = AnyBdev::Mem(MemBdev::new(1 << 20, 4096, 1 << 20).unwrap());
        InjectedBdev::new(inner, Arc::clone(faults), 0)
    }

    fn filled(bdev: &InjectedBdev, fill: u8, len: usize) -> DmaBuf {
        let mut buf = bdev.alloc(len).unwrap();
        buf.as_mut_slice().unwrap().fill(fill);
        buf
    }

    #[test]
    fn a_full_device_refuses_writes_and_changes_nothing() {
        block_on(async {
            let faults = DiskFaults::new(1, None);
            let bdev = mem(&faults);
            bdev.write(0, filled(&bdev, 1, 4096)).await.unwrap();
            assert!(control(&faults, "disk=full").ok);
            let error = bdev.write(0, filled(&bdev, 2, 4096)).await.unwrap_err();
            assert_eq!(
                error,
                BdevError::WriteFailed {
                    status: -libc::ENOSPC,
                    offset: 0,
                    len: 4096
                }
            );
            assert!(bdev.write_zeroes(0, 4096).await.is_err());
            bdev.flush().await.unwrap();
            let read = bdev.read_new(0, 4096).await.unwrap();
            assert!(read.as_slice().iter().all(|b| *b == 1));
            assert!(control(&faults, "disk=off").ok);
            bdev.write(0, filled(&bdev, 3, 4096)).await.unwrap();
            assert_eq!(faults.injected(), 2);
        });
    }

    #[test]
    fn errors_come_at_the_armed_rate_and_a_failed_write_lands_whole_blocks_or_none() {
        block_on(async {
            let faults = DiskFaults::new(7, None);
            let bdev = mem(&faults);
            assert!(control(&faults, "disk=errors&read=1000000&write=1000000").ok);
            for round in 0..20u8 {
                assert!(bdev.read_new(0, 4096).await.is_err());
                assert!(bdev.flush().await.is_err());
                assert!(bdev.write(0, filled(&bdev, round, 16384)).await.is_err());
            }
            assert_eq!(faults.injected(), 60);
            control(&faults, "disk=off");
            let image = bdev.read_new(0, 16384).await.unwrap();
            // Each 4 KiB block holds one write's byte throughout: whole blocks, never less.
            for block in image.as_slice().chunks(4096) {
                assert!(block.iter().all(|b| *b == block[0]));
            }
            assert!(control(&faults, "disk=errors&read=0&write=250000").ok);
            let mut failed = 0;
            for _ in 0..400 {
                if bdev.write(0, filled(&bdev, 9, 4096)).await.is_err() {
                    failed += 1;
                }
            }
            assert!((60..140).contains(&failed), "{failed} of 400 failed at 25%");
            assert!(!control(&faults, "disk=errors&write=2000000").ok);
            assert!(!control(&faults, "disk=melt").ok);
            assert!(!control(&faults, "speed=1").ok);
        });
    }

    #[test]
    fn a_power_cut_keeps_flushed_writes_and_loses_keeps_or_tears_the_others() {
        let (mut lost, mut kept) = (0, 0);
        for seed in 0..12 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("device");
            let file = path.clone();
            let (summary, stuck) = LocalExecutorBuilder::default()
                .spawn(move || async move {
                    let faults = DiskFaults::new(seed, Some(file.clone()));
                    let uri = format!("uring://{}?size={}", file.display(), 1 << 20);
                    let bdev = InjectedBdev::new(
                        open(&uri, 1 << 20).await.unwrap(),
                        Arc::clone(&faults),
                        0,
                    );
                    bdev.write(0, filled(&bdev, 1, 8192)).await.unwrap();
                    bdev.flush().await.unwrap();
                    bdev.write(8192, filled(&bdev, 2, 8192)).await.unwrap();
                    bdev.write(0, filled(&bdev, 3, 4096)).await.unwrap();
                    assert_eq!(faults.unflushed_writes(), 2);
                    let summary = faults.power_cut().unwrap();
                    // No operation completes once the power is off.
                    let write = bdev.write(0, filled(&bdev, 4, 4096));
                    let stuck = futures_lite::future::or(async { write.await.is_ok() }, async {
                        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
                        false
                    })
                    .await;
                    (summary, !stuck)
                })
                .unwrap()
                .join()
                .unwrap();
            assert!(stuck, "seed {seed}");
            assert!(summary.contains("2 unflushed writes"), "{summary}");
            let image = std::fs::read(&path).unwrap();
            // The flushed write's second block is untouched; its first is 1s or a sector-wise
            // prefix of 3s over 1s. The unflushed write to fresh blocks is a prefix over 0s.
            assert!(image[4096..8192].iter().all(|b| *b == 1), "seed {seed}");
            let threes = image[..4096].iter().take_while(|b| **b == 3).count();
            assert_eq!(threes % SECTOR, 0, "seed {seed}");
            assert!(image[threes..4096].iter().all(|b| *b == 1), "seed {seed}");
            let twos = image[8192..16384].iter().take_while(|b| **b == 2).count();
            assert_eq!(twos % SECTOR, 0, "seed {seed}");
            assert!(
                image[8192 + twos..16384].iter().all(|b| *b == 0),
                "seed {seed}"
            );
            match twos {
                0 => lost += 1,
                8192 => kept += 1,
                _ => {}
            }
        }
        assert!(
            lost > 0 && kept > 0,
            "{lost} lost, {kept} kept over 12 seeds"
        );
    }
}
