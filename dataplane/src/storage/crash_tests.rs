//! Crash consistency: seeded workloads against the engine on a fault-injecting device, with
//! the power pulled at a random operation, then recovery and a check that every acknowledged
//! write is there and nothing is corrupt.
//!
//! Each copyset has one writer that works in raft's order: append the entry and the hard state
//! that commits it, wait for the WAL, apply it to the chunk, record the applied index, and only
//! then count it as acknowledged. So at a crash each copyset has at most one operation in
//! flight, and after recovery every chunk must read as the acknowledged history, or that
//! history plus the one operation in flight.
//!
//! CI runs a few seeds; `scripts/storage-crash N` runs N (the ignored test below).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_lite::future::block_on;
use raftcore::{Entry, EntryKind, HardState, LogIndex, Term};

use super::bdev::{Bdev, MemBdev};
use super::engine::{format, EngineOptions, FormatOptions, ShardEngine};
use super::fault::{CrashMode, FaultBdev, FaultRng};
use super::table::ChunkId;
use super::wal::record::CopysetId;
use super::StorageError;

macro_rules! trace {
    ($($arg:tt)*) => {
        if std::env::var_os("STORAGE_CRASH_TRACE").is_some() {
            eprintln!($($arg)*);
        }
    };
}

const PAGE: u64 = 4096;
const CHUNK: u64 = 32 << 10;
const PAGES: usize = (CHUNK / PAGE) as usize;
const DEVICE: u64 = 4 << 20;
const WRITERS: u64 = 4;
const CHUNKS_PER_WRITER: u64 = 4;

fn options() -> FormatOptions {
    FormatOptions {
        page_size: PAGE as u32,
        chunk_size: CHUNK,
        wal_size: 128 << 10,
        shard_count: 1,
        max_copysets: 8,
        device_is_zeroed: true,
    }
}

/// What an entry asks the state machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Write {
        chunk: u64,
        first: u32,
        count: u32,
        fill: u8,
        sn: u64,
    },
    Delete {
        chunk: u64,
    },
    DeleteSnapshot {
        chunk: u64,
        corrected_sn: u64,
    },
}

/// A chunk as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChunkState {
    pages: Vec<u8>,
    sn: u64,
    corrected_sn: u64,
    snapshot: Option<(u64, Vec<u8>)>,
}

impl Command {
    fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(32);
        match *self {
            Command::Write {
                chunk,
                first,
                count,
                fill,
                sn,
            } => {
                out.push(1);
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
                out.push(fill);
                out.extend_from_slice(&sn.to_le_bytes());
            }
            Command::Delete { chunk } => {
                out.push(2);
                out.extend_from_slice(&chunk.to_le_bytes());
            }
            Command::DeleteSnapshot {
                chunk,
                corrected_sn,
            } => {
                out.push(3);
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&corrected_sn.to_le_bytes());
            }
        }
        Bytes::from(out)
    }

    fn decode(bytes: &[u8]) -> Option<Command> {
        let u64_at = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
        let u32_at = |at: usize| Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
        match bytes.first()? {
            1 => Some(Command::Write {
                chunk: u64_at(1)?,
                first: u32_at(9)?,
                count: u32_at(13)?,
                fill: *bytes.get(17)?,
                sn: u64_at(18)?,
            }),
            2 => Some(Command::Delete { chunk: u64_at(1)? }),
            3 => Some(Command::DeleteSnapshot {
                chunk: u64_at(1)?,
                corrected_sn: u64_at(9)?,
            }),
            _ => None,
        }
    }

    fn chunk(&self) -> u64 {
        match *self {
            Command::Write { chunk, .. }
            | Command::Delete { chunk }
            | Command::DeleteSnapshot { chunk, .. } => chunk,
        }
    }

    /// The command's effect on a chunk (`None`: the chunk does not exist). The writers only
    /// issue commands the engine accepts.
    fn apply_to(&self, state: Option<ChunkState>) -> Option<ChunkState> {
        match *self {
            Command::Write {
                first,
                count,
                fill,
                sn,
                ..
            } => {
                let mut chunk = state.unwrap_or(ChunkState {
                    pages: vec![0; PAGES],
                    sn,
                    corrected_sn: 0,
                    snapshot: None,
                });
                if sn > chunk.sn && sn > chunk.corrected_sn {
                    chunk.snapshot = Some((chunk.sn, chunk.pages.clone()));
                }
                chunk.sn = chunk.sn.max(sn);
                for page in first..first + count {
                    chunk.pages[page as usize] = fill;
                }
                Some(chunk)
            }
            Command::Delete { .. } => None,
            Command::DeleteSnapshot { corrected_sn, .. } => state.map(|mut chunk| {
                chunk.snapshot = None;
                if corrected_sn > chunk.sn {
                    chunk.corrected_sn = chunk.corrected_sn.max(corrected_sn);
                }
                chunk
            }),
        }
    }
}

async fn apply(
    engine: &ShardEngine<FaultBdev>,
    command: Command,
    index: LogIndex,
) -> Result<(), StorageError> {
    match command {
        Command::Write {
            chunk,
            first,
            count,
            fill,
            sn,
        } => {
            let mut data = engine.bdev().alloc((u64::from(count) * PAGE) as usize)?;
            if let Some(bytes) = data.as_mut_slice() {
                bytes.fill(fill);
            }
            engine
                .write_chunk(ChunkId(chunk), u64::from(first) * PAGE, data, sn, index)
                .await
        }
        Command::Delete { chunk } => engine.delete_chunk(ChunkId(chunk), index).await,
        Command::DeleteSnapshot {
            chunk,
            corrected_sn,
        } => {
            engine
                .delete_snapshot_or_correct_sn(ChunkId(chunk), corrected_sn, index)
                .await
        }
    }
}

/// The acknowledged state of every chunk, and each copyset's operation in flight.
#[derive(Debug, Default)]
struct Model {
    chunks: HashMap<u64, ChunkState>,
    in_flight: HashMap<u64, Command>,
    acknowledged: u64,
}

/// Polls every future until all are done: a deterministic stand-in for spawning tasks.
type Task<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;

struct JoinAll<'a> {
    futures: Vec<Option<Task<'a>>>,
    failure: Option<String>,
}

impl Future for JoinAll<'_> {
    type Output = Result<(), String>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut pending = false;
        for slot in &mut this.futures {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(result) => {
                        if let Err(e) = result {
                            this.failure.get_or_insert(e);
                        }
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(this.failure.take().map_or(Ok(()), Err))
        }
    }
}

fn owned_chunks(copyset: u64) -> impl Iterator<Item = u64> {
    (0..CHUNKS_PER_WRITER).map(move |i| copyset * 100 + i)
}

fn pages_of(data: &[u8], chunk: u64) -> Result<Vec<u8>, String> {
    let mut pages = Vec::with_capacity(PAGES);
    for page in data.chunks(PAGE as usize) {
        let fill = page[0];
        if page.iter().any(|b| *b != fill) {
            return Err(format!("chunk {chunk} has a page of mixed bytes (torn)"));
        }
        pages.push(fill);
    }
    Ok(pages)
}

async fn read_state(
    engine: &ShardEngine<FaultBdev>,
    chunk: u64,
) -> Result<Option<ChunkState>, String> {
    let info = match engine.chunk_info(ChunkId(chunk)) {
        Ok(info) => info,
        Err(StorageError::ChunkNotFound(_)) => return Ok(None),
        Err(e) => return Err(format!("chunk {chunk}: {e}")),
    };
    let data = engine
        .read_chunk(ChunkId(chunk), 0, CHUNK)
        .await
        .map_err(|e| format!("reading chunk {chunk}: {e}"))?;
    let snapshot = match info.snapshot_sn {
        Some(sn) => {
            let data = engine
                .read_snapshot(ChunkId(chunk), sn, 0, CHUNK)
                .await
                .map_err(|e| format!("reading chunk {chunk}'s snapshot {sn}: {e}"))?;
            Some((sn, pages_of(data.as_slice(), chunk)?))
        }
        None => None,
    };
    Ok(Some(ChunkState {
        pages: pages_of(data.as_slice(), chunk)?,
        sn: info.sn,
        corrected_sn: info.corrected_sn,
        snapshot,
    }))
}

/// One writer (one copyset): sequential operations until `operations` are done or the device
/// fails. Returns Err only for a wrong read (a real failure), never for a device error.
async fn writer(
    engine: &ShardEngine<FaultBdev>,
    model: &RefCell<Model>,
    copyset: u64,
    mut next_index: u64,
    mut rng: FaultRng,
    operations: u32,
) -> Result<(), String> {
    let id = CopysetId(copyset);
    for _ in 0..operations {
        let chunk = copyset * 100 + rng.below(CHUNKS_PER_WRITER);
        let known = model.borrow().chunks.get(&chunk).cloned();
        let command = match rng.below(20) {
            0..=11 => {
                let first = rng.below(PAGES as u64) as u32;
                let count = 1 + rng.below((PAGES as u64 - u64::from(first)).min(3)) as u32;
                // A newer sn takes a snapshot; only when the chunk has none (else the engine
                // refuses, and that is tested elsewhere).
                let sn = match &known {
                    Some(state) if state.snapshot.is_none() && rng.below(4) == 0 => {
                        state.sn.max(state.corrected_sn) + 1
                    }
                    Some(state) => state.sn,
                    None => 1,
                };
                Command::Write {
                    chunk,
                    first,
                    count,
                    fill: 1 + rng.below(255) as u8,
                    sn,
                }
            }
            12 | 13 => Command::DeleteSnapshot {
                chunk,
                corrected_sn: known.as_ref().map_or(1, |s| s.sn) + rng.below(2),
            },
            14 => Command::Delete { chunk },
            15 => {
                if engine.checkpoint().await.is_err() {
                    return Ok(());
                }
                continue;
            }
            _ => {
                let expected = model.borrow().chunks.get(&chunk).cloned();
                let Ok(actual) = read_state(engine, chunk).await else {
                    return Ok(()); // the device failed under the read
                };
                if actual != expected {
                    return Err(format!(
                        "copyset {copyset}: chunk {chunk} reads {actual:?}, acknowledged {expected:?}"
                    ));
                }
                continue;
            }
        };
        model.borrow_mut().in_flight.insert(copyset, command);
        let entry = Entry {
            term: Term(1),
            index: LogIndex(next_index),
            kind: EntryKind::Normal,
            data: command.encode(),
        };
        let hard_state = HardState {
            term: Term(1),
            vote: None,
            commit: LogIndex(next_index),
        };
        let appended = async {
            let wal = engine.wal();
            if wal.used() * 2 > wal.size() {
                engine.checkpoint().await?;
            }
            wal.append_entries(id, std::slice::from_ref(&entry))?;
            let lsn = wal.set_hard_state(id, hard_state)?;
            wal.sync(lsn).await?;
            apply(engine, command, LogIndex(next_index)).await?;
            engine.set_applied(id, LogIndex(next_index));
            Ok::<(), StorageError>(())
        }
        .await;
        trace!("copyset {copyset} index {next_index} {command:?}: {appended:?}");
        if appended.is_err() {
            return Ok(());
        }
        let mut model = model.borrow_mut();
        model.in_flight.remove(&copyset);
        let state = command.apply_to(model.chunks.remove(&command.chunk()));
        if let Some(state) = state {
            model.chunks.insert(command.chunk(), state);
        }
        model.acknowledged += 1;
        next_index += 1;
    }
    Ok(())
}

/// Recovers, applies what recovery hands back, and checks every chunk against the model.
/// Returns the engine and each copyset's next index, or None if the device died meanwhile.
async fn recover_and_check(
    device: &Rc<FaultBdev>,
    model: &RefCell<Model>,
) -> Result<Option<(ShardEngine<FaultBdev>, HashMap<u64, u64>)>, String> {
    let opened = ShardEngine::open(
        Rc::clone(device),
        0,
        EngineOptions {
            wal_max_batch: 16 << 10,
        },
    )
    .await;
    let (engine, recovery) = match opened {
        Ok(opened) => opened,
        Err(_) if device.is_dead() => return Ok(None),
        Err(e) => return Err(format!("recovery failed: {e}")),
    };
    trace!(
        "recovered generation {} chunks {} wal records {} stop {}",
        recovery.generation,
        recovery.chunks,
        recovery.wal_records,
        recovery.wal_stop
    );
    let mut next = HashMap::new();
    for copyset in &recovery.copysets {
        trace!(
            "  copyset {} applied {} commit {} to apply {:?}",
            copyset.copyset,
            copyset.applied,
            copyset.hard_state.commit,
            copyset
                .to_apply
                .iter()
                .map(|e| e.index.0)
                .collect::<Vec<_>>()
        );
        for entry in &copyset.to_apply {
            let command = Command::decode(&entry.data)
                .ok_or_else(|| format!("entry {} does not decode", entry.index))?;
            match apply(&engine, command, entry.index).await {
                Ok(()) => engine.set_applied(copyset.copyset, entry.index),
                Err(_) if device.is_dead() => return Ok(None),
                Err(e) => return Err(format!("re-applying entry {}: {e}", entry.index)),
            }
        }
        next.insert(copyset.copyset.0, copyset.hard_state.commit.0 + 1);
    }
    // Copies: if the power goes during the check, the model stays as it was.
    let in_flights = model.borrow().in_flight.clone();
    let mut chunks = model.borrow().chunks.clone();
    for copyset in 1..=WRITERS {
        let in_flight = in_flights.get(&copyset).copied();
        for chunk in owned_chunks(copyset) {
            let actual = match read_state(&engine, chunk).await {
                Ok(actual) => actual,
                Err(_) if device.is_dead() => return Ok(None),
                Err(e) => return Err(e),
            };
            let acknowledged = chunks.get(&chunk).cloned();
            let with_in_flight = in_flight
                .filter(|c| c.chunk() == chunk)
                .map(|c| c.apply_to(acknowledged.clone()));
            if actual != acknowledged && Some(&actual) != with_in_flight.as_ref() {
                return Err(format!(
                    "chunk {chunk} reads {actual:?}; acknowledged {acknowledged:?}, with the \
                     operation in flight {with_in_flight:?}"
                ));
            }
            match actual {
                Some(state) => chunks.insert(chunk, state),
                None => chunks.remove(&chunk),
            };
        }
    }
    model.borrow_mut().chunks = chunks;
    model.borrow_mut().in_flight.clear();
    let unknown: Vec<ChunkId> = engine
        .chunk_ids()
        .into_iter()
        .filter(|c| !(1..=WRITERS).any(|w| owned_chunks(w).any(|o| o == c.0)))
        .collect();
    if !unknown.is_empty() {
        return Err(format!("chunks nobody wrote exist: {unknown:?}"));
    }
    Ok(Some((engine, next)))
}

/// One seeded run: several crash-and-recover rounds, then a final clean recovery.
pub(crate) fn run_seed(seed: u64) -> Result<u64, String> {
    block_on(async {
        let mut rng = FaultRng::new(seed);
        let memory = MemBdev::new(DEVICE, 4096, 64 << 20).map_err(|e| e.to_string())?;
        format(&memory, &options(), [seed as u8; 16])
            .await
            .map_err(|e| e.to_string())?;
        let model = RefCell::new(Model::default());
        let rounds = 2 + rng.below(3);
        let mut image = memory.image();
        for round in 0..=rounds {
            let last = round == rounds;
            let memory = MemBdev::from_image(image, 4096, 64 << 20).map_err(|e| e.to_string())?;
            let device = Rc::new(FaultBdev::new(memory, rng.next_u64()));
            // The power may go during recovery too.
            if !last && rng.below(4) == 0 {
                device.arm(Some(1 + rng.below(60)), 0);
            }
            let recovered = recover_and_check(&device, &model)
                .await
                .map_err(|e| format!("round {round}: {e}"))?;
            if let Some((engine, next)) = recovered {
                if last {
                    let acknowledged = model.borrow().acknowledged;
                    return Ok(acknowledged);
                }
                let error_rate = if rng.below(3) == 0 { 2000 } else { 0 };
                device.arm(Some(20 + rng.below(600)), error_rate);
                let mut futures: Vec<Option<Task<'_>>> = Vec::new();
                for copyset in 1..=WRITERS {
                    let start = next.get(&copyset).copied().unwrap_or(1);
                    futures.push(Some(Box::pin(writer(
                        &engine,
                        &model,
                        copyset,
                        start,
                        FaultRng::new(rng.next_u64()),
                        10 + rng.below(60) as u32,
                    ))));
                }
                JoinAll {
                    futures,
                    failure: None,
                }
                .await
                .map_err(|e| format!("round {round}: {e}"))?;
                drop(engine);
            }
            let mode = if rng.below(4) == 0 {
                CrashMode::LoseAll
            } else {
                CrashMode::Random
            };
            trace!(
                "round {round}: crash {mode:?}, {} unflushed writes, {} injected errors",
                device.unflushed_writes(),
                device.injected_errors()
            );
            image = device.crash(mode);
        }
        let acknowledged = model.borrow().acknowledged;
        Ok(acknowledged)
    })
}

fn run_seeds(seeds: std::ops::Range<u64>) {
    let mut acknowledged = 0;
    for seed in seeds.clone() {
        match run_seed(seed) {
            Ok(count) => acknowledged += count,
            Err(e) => panic!(
                "crash seed {seed} failed: {e}\nreplay: STORAGE_CRASH_FIRST={seed} \
                 scripts/storage-crash 1"
            ),
        }
    }
    println!(
        "{} crash seeds from {} ran clean ({acknowledged} acknowledged operations checked)",
        seeds.end - seeds.start,
        seeds.start
    );
}

#[test]
fn acknowledged_writes_survive_power_cuts_ci_seeds() {
    run_seeds(0..40);
}

/// `scripts/storage-crash N` runs N seeds from STORAGE_CRASH_FIRST (default 1000).
#[test]
#[ignore]
fn acknowledged_writes_survive_power_cuts_many_seeds() {
    let count = std::env::var("STORAGE_CRASH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000u64);
    let first = std::env::var("STORAGE_CRASH_FIRST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000u64);
    run_seeds(first..first + count);
}

#[test]
fn the_same_seed_runs_the_same_way() {
    assert_eq!(run_seed(7), run_seed(7));
}
