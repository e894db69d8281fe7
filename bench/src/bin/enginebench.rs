//! enginebench: the storage engine alone on one shard, with the `uring` backend on a file,
//! against raw O_DIRECT io_uring I/O on a file of the same size in the same folder, in one run.
//!
//! Every figure is printed beside its raw baseline: durable 4 KiB random writes at depth 1 and
//! 32 (WAL append, group commit, apply to the chunk) against raw 4 KiB O_DIRECT writes at the
//! same depth; 4 KiB random reads at depth 32; 1 MiB sequential writes; and the raw latency of
//! a 4 KiB write followed by fdatasync. Each test runs for a few seconds and a bounded number
//! of operations.
//!
//!     cargo run --release -p bench --bin enginebench -- --dir /tmp --seconds 3

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use dataplane::storage::bdev::{self, AnyBdev, Bdev};
use dataplane::storage::engine::{format, EngineOptions, FormatOptions, ShardEngine};
use dataplane::storage::layout::DEFAULT_MAX_COPYSETS;
use dataplane::storage::table::ChunkId;
use dataplane::storage::wal::record::CopysetId;
use dataplane::storage::StorageError;
use glommio::io::{DmaFile, OpenOptions};
use glommio::LocalExecutorBuilder;
use hdrhistogram::Histogram;
use raftcore::{Entry, EntryKind, HardState, LogIndex, Term};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const PAGE: u64 = 4096;
const CHUNK: u64 = 16 << 20;
const WAL: u64 = 256 << 20;
const SEQUENTIAL: u64 = 1 << 20;

/// The engine against raw io_uring on the same file system, in one run.
#[derive(Parser, Debug)]
#[command(name = "enginebench")]
struct Args {
    /// Folder for the two test files (they are removed afterwards).
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
    /// Seconds each test runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Chunks of 16 MiB the random tests spread over (the raw file is as large).
    #[arg(long, default_value_t = 64)]
    chunks: u64,
    /// Most operations one test performs.
    #[arg(long, default_value_t = 2_000_000)]
    max_ops: u64,
    /// Rounds: every test runs once per round, raw and engine alternating, and the figures
    /// add the rounds up (this machine's noise drifts over seconds).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Also run the engine on an SPDK aio bdev over a file of the same size in the same
    /// folder (SPDK in its no-huge mode), each of its figures beside the kernel backend's
    /// (the `uring` engine) from the same rounds.
    #[cfg(feature = "spdk")]
    #[arg(long)]
    spdk_aio: bool,
}

/// The names of one engine's tests: (label, baseline) per test.
struct EngineNames {
    qd1: (&'static str, &'static str),
    qd32: (&'static str, &'static str),
    read: (&'static str, &'static str),
    sequential: (&'static str, &'static str),
}

const KERNEL: EngineNames = EngineNames {
    qd1: (
        "engine 4K randwrite durable (WAL+apply), QD1",
        "raw 4K randwrite O_DIRECT, QD1",
    ),
    qd32: (
        "engine 4K randwrite durable (WAL+apply), QD32",
        "raw 4K randwrite O_DIRECT, QD32",
    ),
    read: ("engine 4K randread, QD32", "raw 4K randread O_DIRECT, QD32"),
    sequential: (
        "engine 1M seqwrite durable (WAL+apply), QD1",
        "raw 1M seqwrite O_DIRECT, QD1",
    ),
};

#[cfg(feature = "spdk")]
const SPDK_AIO: EngineNames = EngineNames {
    qd1: (
        "spdk-aio engine 4K randwrite durable, QD1",
        "engine 4K randwrite durable (WAL+apply), QD1",
    ),
    qd32: (
        "spdk-aio engine 4K randwrite durable, QD32",
        "engine 4K randwrite durable (WAL+apply), QD32",
    ),
    read: (
        "spdk-aio engine 4K randread, QD32",
        "engine 4K randread, QD32",
    ),
    sequential: (
        "spdk-aio engine 1M seqwrite durable, QD1",
        "engine 1M seqwrite durable (WAL+apply), QD1",
    ),
};

#[derive(Clone)]
struct Measured {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Measured {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn mib_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / (1 << 20) as f64
    }
    fn us(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Every test's runs over the rounds, in the order first seen.
#[derive(Default)]
struct Results {
    rows: Vec<(&'static str, Option<&'static str>, Vec<Measured>)>,
}

impl Results {
    fn add(&mut self, name: &'static str, baseline: Option<&'static str>, run: Measured) {
        match self.rows.iter_mut().find(|(n, _, _)| *n == name) {
            Some((_, _, runs)) => runs.push(run),
            None => self.rows.push((name, baseline, vec![run])),
        }
    }

    fn merged(&self, name: &str) -> Option<Measured> {
        let (_, _, runs) = self.rows.iter().find(|(n, _, _)| *n == name)?;
        let mut all = runs.first()?.clone();
        for run in runs.iter().skip(1) {
            all.ops += run.ops;
            all.bytes += run.bytes;
            all.elapsed += run.elapsed;
            let _ = all.latency.add(&run.latency);
        }
        Some(all)
    }

    fn print(&self) {
        print_header();
        for (name, baseline, runs) in &self.rows {
            let Some(all) = self.merged(name) else {
                continue;
            };
            let raw = baseline.and_then(|b| self.merged(b));
            print_row(name, &all, raw.as_ref());
            let per_round: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.iops())).collect();
            println!("{:<46} per round: {}", "", per_round.join(" "));
        }
    }
}

fn print_header() {
    println!(
        "{:<46} {:>10} {:>9} {:>9} {:>9} {:>10} {:>8}",
        "test", "IOPS", "MiB/s", "p50 us", "p99 us", "p99.9 us", "ratio"
    );
}

fn print_row(name: &str, m: &Measured, raw: Option<&Measured>) {
    let ratio = raw.map_or("-".to_string(), |r| format!("{:.2}x", m.iops() / r.iops()));
    println!(
        "{:<46} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>8}",
        name,
        m.iops(),
        m.mib_per_second(),
        m.us(0.5),
        m.us(0.99),
        m.us(0.999),
        ratio
    );
}

/// Runs `op` from `depth` concurrent tasks until the time or the operation budget is spent.
/// `op(task, sequence)` performs one operation and returns the bytes it moved.
async fn run_at_depth<F, Fut>(depth: usize, seconds: f64, max_ops: u64, op: F) -> Measured
where
    F: Fn(usize, u64) -> Fut + 'static,
    Fut: std::future::Future<Output = Result<u64, String>> + 'static,
{
    let op = Rc::new(op);
    let histogram = Rc::new(RefCell::new(
        Histogram::<u64>::new_with_bounds(100, 60_000_000_000, 3).expect("static bounds"),
    ));
    let issued = Rc::new(Cell::new(0u64));
    let bytes = Rc::new(Cell::new(0u64));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..depth {
        let op = Rc::clone(&op);
        let histogram = Rc::clone(&histogram);
        let issued = Rc::clone(&issued);
        let bytes = Rc::clone(&bytes);
        tasks.push(glommio::spawn_local(async move {
            while Instant::now() < deadline && issued.get() < max_ops {
                let sequence = issued.get();
                issued.set(sequence + 1);
                let begin = Instant::now();
                match op(task, sequence).await {
                    Ok(moved) => {
                        let ns = begin.elapsed().as_nanos() as u64;
                        let _ = histogram.borrow_mut().record(ns.max(100));
                        bytes.set(bytes.get() + moved);
                    }
                    Err(error) => {
                        eprintln!("enginebench: operation failed: {error}");
                        std::process::exit(1);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await;
    }
    let elapsed = started.elapsed();
    let latency = histogram.borrow().clone();
    Measured {
        ops: latency.len(),
        bytes: bytes.get(),
        elapsed,
        latency,
    }
}

/// Creates `path` with `size` bytes of zeroes really written, so that neither side of the
/// comparison pays for block allocation during the run.
fn prefill(path: &Path, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let block = vec![0u8; 4 << 20];
    let mut written = 0;
    while written < size {
        let len = (size - written).min(block.len() as u64) as usize;
        file.write_all(&block[..len])?;
        written += len as u64;
    }
    file.sync_all()
}

struct Engine {
    engine: ShardEngine<AnyBdev>,
    next_index: RefCell<Vec<u64>>,
}

impl Engine {
    /// The engine's durable write: append the entry and the hard state that commits it, wait
    /// for the WAL's group commit, then apply it to the chunk.
    async fn durable_write(
        &self,
        copyset: usize,
        chunk: u64,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StorageError> {
        let index = {
            let mut next = self.next_index.borrow_mut();
            next[copyset] += 1;
            next[copyset]
        };
        let id = CopysetId(copyset as u64 + 1);
        let entry = Entry {
            term: Term(1),
            index: LogIndex(index),
            kind: EntryKind::Normal,
            data: data.clone(),
        };
        let hard_state = HardState {
            term: Term(1),
            vote: None,
            commit: LogIndex(index),
        };
        let wal = self.engine.wal();
        let lsn = loop {
            let appended = wal
                .append_entries(id, std::slice::from_ref(&entry))
                .and_then(|_| wal.set_hard_state(id, hard_state));
            match appended {
                Ok(lsn) => break lsn,
                Err(StorageError::WalFull { .. }) => self.engine.checkpoint().await?,
                Err(error) => return Err(error),
            }
        };
        wal.sync(lsn).await?;
        // The writers' copysets share the chunks (random pages over all of them), which a
        // chunkserver refuses: apply without an owner or a log index (index 0 always
        // applies), so every write costs its chunk write as a replica's apply does.
        self.engine
            .write_chunk_bytes(CopysetId(0), ChunkId(chunk), offset, data, 1, LogIndex(0))
            .await?;
        self.engine.set_applied(id, LogIndex(index));
        self.engine.maybe_checkpoint().await?;
        Ok(())
    }
}

/// Opens the device at `uri`, formats it, opens an engine on it and creates `chunks` chunks
/// (creation is measured nowhere).
async fn open_engine(uri: &str, chunks: u64) -> Result<Rc<Engine>, String> {
    let device = bdev::open(uri, 512 << 20)
        .await
        .map_err(|e| e.to_string())?;
    let options = FormatOptions {
        page_size: PAGE as u32,
        chunk_size: CHUNK,
        wal_size: WAL,
        shard_count: 1,
        max_copysets: DEFAULT_MAX_COPYSETS,
        device_is_zeroed: true,
    };
    format(&device, &options, [0x42; 16])
        .await
        .map_err(|e| e.to_string())?;
    let (engine, _) = ShardEngine::open(Rc::new(device), 0, EngineOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    if u64::from(engine.layout().slots) < chunks {
        return Err(format!(
            "the engine device holds {} chunks, fewer than {chunks}",
            engine.layout().slots
        ));
    }
    let engine = Rc::new(Engine {
        engine,
        next_index: RefCell::new(vec![0; 64]),
    });
    for chunk in 0..chunks {
        let data = payload(&engine.engine, PAGE, chunk)?;
        engine
            .durable_write(0, chunk, 0, data)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(engine)
}

fn payload(engine: &ShardEngine<AnyBdev>, len: u64, seed: u64) -> Result<Bytes, String> {
    let mut buffer = engine
        .bdev()
        .alloc(len as usize)
        .map_err(|e| e.to_string())?;
    if let Some(bytes) = buffer.as_mut_slice() {
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
    }
    // The DMA buffer becomes the entry's payload and, unchanged, the chunk write's buffer.
    Ok(buffer.into_bytes())
}

async fn run(args: Args) -> Result<(), String> {
    let folder = args.dir.join(format!("enginebench-{}", std::process::id()));
    std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    let engine_path = folder.join("engine.img");
    let raw_path = folder.join("raw.img");
    let data_bytes = args.chunks * CHUNK;
    let engine_bytes = data_bytes + WAL + (96 << 20);
    let started = Instant::now();
    prefill(&engine_path, engine_bytes).map_err(|e| format!("prefill: {e}"))?;
    prefill(&raw_path, data_bytes).map_err(|e| format!("prefill: {e}"))?;
    println!(
        "enginebench: files in {} ({} MiB engine, {} MiB raw) written in {:.1}s",
        folder.display(),
        engine_bytes >> 20,
        data_bytes >> 20,
        started.elapsed().as_secs_f64()
    );

    let engine = open_engine(&format!("uring://{}", engine_path.display()), args.chunks).await?;
    #[allow(unused_mut)] // grows only with the spdk feature
    let mut engines: Vec<(&EngineNames, Rc<Engine>)> = vec![(&KERNEL, Rc::clone(&engine))];
    #[cfg(feature = "spdk")]
    if args.spdk_aio {
        let spdk_path = folder.join("spdk-aio.img");
        prefill(&spdk_path, engine_bytes).map_err(|e| format!("prefill: {e}"))?;
        let json = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_aio_create", "params": {
                "name": "BenchAio", "filename": spdk_path.display().to_string(),
                "block_size": 4096}}]}]});
        ffi::spdk::start(&ffi::spdk::EnvOptions {
            name: "enginebench".into(),
            hugepages: false,
            mem_size_mb: 2048,
            pci: false,
            json_config: json.to_string(),
        })
        .map_err(|e| e.to_string())?;
        println!(
            "enginebench: SPDK {} (no-huge) with an aio bdev over {}",
            ffi::spdk::version(),
            spdk_path.display()
        );
        engines.push((
            &SPDK_AIO,
            open_engine("spdk://BenchAio", args.chunks).await?,
        ));
    }
    let raw: Rc<DmaFile> = Rc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&raw_path)
            .await
            .map_err(|e| format!("{}: {e}", raw_path.display()))?,
    );

    let seconds = args.seconds;
    let max_ops = args.max_ops;
    let pages = data_bytes / PAGE;
    let chunks = args.chunks;
    let rngs = Rc::new(RefCell::new(
        (0..64).map(SmallRng::seed_from_u64).collect::<Vec<_>>(),
    ));
    let random_page = {
        let rngs = Rc::clone(&rngs);
        move |task: usize| rngs.borrow_mut()[task].gen_range(0..pages)
    };

    let raw_write = |depth: usize| {
        let raw = Rc::clone(&raw);
        let random_page = random_page.clone();
        run_at_depth(depth, seconds, max_ops, move |task, _| {
            let raw = Rc::clone(&raw);
            let offset = random_page(task) * PAGE;
            async move {
                let mut buffer = raw.alloc_dma_buffer(PAGE as usize);
                buffer.as_bytes_mut().fill(7);
                raw.write_at(buffer, offset)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(PAGE)
            }
        })
    };
    let engine_write = |engine: &Rc<Engine>, depth: usize| {
        let engine = Rc::clone(engine);
        let random_page = random_page.clone();
        run_at_depth(depth, seconds, max_ops, move |task, sequence| {
            let engine = Rc::clone(&engine);
            let page = random_page(task);
            async move {
                let data = payload(&engine.engine, PAGE, sequence)?;
                let chunk = page / (CHUNK / PAGE) % chunks;
                let offset = page % (CHUNK / PAGE) * PAGE;
                engine
                    .durable_write(task, chunk, offset, data)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(PAGE)
            }
        })
    };

    let mut results = Results::default();
    let mut batches = 0;
    let mut records = 0;
    for _ in 0..args.rounds.max(1) {
        let sync = {
            let raw = Rc::clone(&raw);
            let random_page = random_page.clone();
            run_at_depth(1, seconds, max_ops, move |task, _| {
                let raw = Rc::clone(&raw);
                let offset = random_page(task) * PAGE;
                async move {
                    let mut buffer = raw.alloc_dma_buffer(PAGE as usize);
                    buffer.as_bytes_mut().fill(9);
                    raw.write_at(buffer, offset)
                        .await
                        .map_err(|e| e.to_string())?;
                    raw.fdatasync().await.map_err(|e| e.to_string())?;
                    Ok(PAGE)
                }
            })
            .await
        };
        results.add("raw 4K write + fdatasync, QD1", None, sync);

        let raw_qd1 = raw_write(1).await;
        results.add("raw 4K randwrite O_DIRECT, QD1", None, raw_qd1);
        let raw_qd32 = raw_write(32).await;
        results.add("raw 4K randwrite O_DIRECT, QD32", None, raw_qd32);
        for (names, engine) in &engines {
            let measured = engine_write(engine, 1).await;
            results.add(names.qd1.0, Some(names.qd1.1), measured);
            let stats_before = engine.engine.wal().stats();
            let measured = engine_write(engine, 32).await;
            let stats_after = engine.engine.wal().stats();
            results.add(names.qd32.0, Some(names.qd32.1), measured);
            if std::ptr::eq(*names, &KERNEL) {
                batches += stats_after.batches - stats_before.batches;
                records += stats_after.records - stats_before.records;
            }
        }

        let raw_read = {
            let raw = Rc::clone(&raw);
            let random_page = random_page.clone();
            run_at_depth(32, seconds, max_ops, move |task, _| {
                let raw = Rc::clone(&raw);
                let offset = random_page(task) * PAGE;
                async move {
                    let read = raw
                        .read_at_aligned(offset, PAGE as usize)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(read.len() as u64)
                }
            })
            .await
        };
        results.add("raw 4K randread O_DIRECT, QD32", None, raw_read);
        for (names, engine) in &engines {
            let engine_read = {
                let engine = Rc::clone(engine);
                let random_page = random_page.clone();
                run_at_depth(32, seconds, max_ops, move |task, _| {
                    let engine = Rc::clone(&engine);
                    let page = random_page(task);
                    async move {
                        let chunk = page / (CHUNK / PAGE) % chunks;
                        let offset = page % (CHUNK / PAGE) * PAGE;
                        let read = engine
                            .engine
                            .read_chunk(ChunkId(chunk), offset, PAGE)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(read.len() as u64)
                    }
                })
                .await
            };
            results.add(names.read.0, Some(names.read.1), engine_read);
        }

        let sequential_position = Rc::new(Cell::new(0u64));
        let raw_sequential = {
            let raw = Rc::clone(&raw);
            let position = Rc::clone(&sequential_position);
            run_at_depth(1, seconds, max_ops, move |_, _| {
                let raw = Rc::clone(&raw);
                let offset = position.get() % data_bytes;
                position.set(offset + SEQUENTIAL);
                async move {
                    let mut buffer = raw.alloc_dma_buffer(SEQUENTIAL as usize);
                    buffer.as_bytes_mut().fill(3);
                    raw.write_at(buffer, offset)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(SEQUENTIAL)
                }
            })
            .await
        };
        results.add("raw 1M seqwrite O_DIRECT, QD1", None, raw_sequential);
        for (names, engine) in &engines {
            sequential_position.set(0);
            let engine_sequential = {
                let engine = Rc::clone(engine);
                let position = Rc::clone(&sequential_position);
                run_at_depth(1, seconds, max_ops, move |task, sequence| {
                    let engine = Rc::clone(&engine);
                    let offset = position.get() % data_bytes;
                    position.set(offset + SEQUENTIAL);
                    async move {
                        let data = payload(&engine.engine, SEQUENTIAL, sequence)?;
                        engine
                            .durable_write(task, offset / CHUNK, offset % CHUNK, data)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(SEQUENTIAL)
                    }
                })
                .await
            };
            results.add(
                names.sequential.0,
                Some(names.sequential.1),
                engine_sequential,
            );
        }
    }
    results.print();
    println!(
        "ratio: against the raw baseline; spdk-aio rows against the kernel (uring) engine row"
    );
    println!(
        "group commit at QD32: {} WAL batches for {} records ({:.1} records per write+flush)",
        batches,
        records,
        records as f64 / batches.max(1) as f64
    );
    let (table_bytes, slots) = engine.engine.table_memory();
    println!(
        "chunk table: {} bytes for {} slots ({:.1} bytes per chunk)",
        table_bytes,
        slots,
        table_bytes as f64 / f64::from(slots.max(1))
    );
    drop(engine);
    let _ = std::fs::remove_dir_all(&folder);
    Ok(())
}

fn main() {
    let args = Args::parse();
    let outcome = LocalExecutorBuilder::default()
        .name("enginebench")
        .spawn(move || run(args))
        .map_err(|e| e.to_string())
        .and_then(|handle| handle.join().map_err(|e| e.to_string()));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(error)) | Err(error) => {
            eprintln!("enginebench: {error}");
            std::process::exit(1);
        }
    }
}
