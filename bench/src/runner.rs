//! Runs a job's clones against a target: one pinned glommio executor per clone, `iodepth`
//! closed-loop workers in each, warm-up excluded, latencies in hdrhistogram, clones merged.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::client::{Client, ClientConfig};
use dataplane::server::{GeneratedCluster, LocalCluster};
use dataplane::storage::engine::{format, FormatOptions};
use dataplane::storage::layout::DEFAULT_MAX_COPYSETS;
use glommio::{LocalExecutorBuilder, Placement};

use crate::job::{Job, TargetKind};
use crate::report::{process_cpu_time, JobStats};
use crate::target::cluster::{ClusterTarget, CHUNK_SIZE, COPYSET};
use crate::target::engine::{EngineTarget, CHUNK_SIZE as ENGINE_CHUNK, WAL_SIZE as ENGINE_WAL};
use crate::target::nbd::{NbdTarget, NbdUri};
use crate::target::raw::RawTarget;
use crate::target::{Target, WriteBuffer};
use crate::workload::{verify, OpKind, Workload};

/// Why a job could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The job lacks a key its target needs.
    #[error("job [{job}]: {message}")]
    Job {
        /// The job.
        job: String,
        /// What is missing.
        message: String,
    },
    /// An I/O failed; the job stops at the first failure, as fio does by default.
    #[error("job [{job}] clone {clone}: {op} at offset {offset} ({len} bytes) failed: {source}")]
    Io {
        /// The job.
        job: String,
        /// Which clone.
        clone: u32,
        /// read, write or sync.
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The error.
        source: std::io::Error,
    },
    /// Setting up the target failed.
    #[error("job [{job}]: {message}: {source}")]
    Setup {
        /// The job.
        job: String,
        /// What was being done.
        message: String,
        /// The error.
        source: std::io::Error,
    },
    /// An executor could not start or its thread died.
    #[error("job [{job}]: executor: {message}")]
    Executor {
        /// The job.
        job: String,
        /// What happened.
        message: String,
    },
}

/// Live counters that a progress reporter reads from another thread.
#[derive(Debug, Default)]
pub struct Progress {
    /// Operations completed so far, all clones.
    pub ops: AtomicU64,
    /// Bytes completed so far, all clones.
    pub bytes: AtomicU64,
}

/// Runs `job` and returns its merged figures.
pub fn run_job(job: &Job, progress: &Arc<Progress>) -> Result<JobStats, RunError> {
    match job.target {
        TargetKind::Raw => run_raw(job, progress),
        TargetKind::Cluster => run_cluster(job, progress, true),
        TargetKind::ClusterNoMetrics => run_cluster(job, progress, false),
        TargetKind::Engine => run_engine(job, progress),
        TargetKind::Nbd => run_nbd(job, progress),
    }
}

fn filename(job: &Job, what: &str) -> Result<PathBuf, RunError> {
    job.filename
        .clone()
        .map(PathBuf::from)
        .ok_or_else(|| RunError::Job {
            job: job.name.clone(),
            message: format!("the {} target needs `filename` ({what})", job.target),
        })
}

fn run_raw(job: &Job, progress: &Arc<Progress>) -> Result<JobStats, RunError> {
    let path = filename(job, "a file or block device")?;
    lay_out(job, &path)?;
    run_clones(job, progress, move |_clone| {
        let path = path.clone();
        async move { RawTarget::open(&path).await }
    })
}

/// Starts three chunkservers whose device files sit beside `filename` (in `FILENAME.cluster/`),
/// writes the job's region once through the cluster, runs the job on it, and stops them.
fn run_cluster(
    job: &Job,
    progress: &Arc<Progress>,
    collect_metrics: bool,
) -> Result<JobStats, RunError> {
    let base = filename(job, "a path; the nodes keep their files in PATH.cluster/")?;
    let data_dir = PathBuf::from(format!("{}.cluster", base.display()));
    let created = !data_dir.exists();
    let region = job.offset + job.size;
    let wal: u64 = 64 << 20;
    let device = wal + region.div_ceil(CHUNK_SIZE) * CHUNK_SIZE + 16 * CHUNK_SIZE;
    let options = GeneratedCluster {
        data_dir: data_dir.clone(),
        backend: "uring".into(),
        device_size: device.to_string(),
        chunk_size: CHUNK_SIZE.to_string(),
        wal_size: wal.to_string(),
        collect_metrics,
    };
    let setup_error = |message: String| RunError::Setup {
        job: job.name.clone(),
        message,
        source: std::io::Error::other("cluster"),
    };
    let cluster = LocalCluster::start_generated(&options).map_err(setup_error)?;
    let addresses = cluster.addresses().to_vec();

    // Create the copyset and write the region once, as `lay_out` does for the raw target.
    let layout_addresses = addresses.clone();
    let layout = LocalExecutorBuilder::new(Placement::Unbound)
        .name("chunkbench-cluster-layout")
        .spawn(move || async move {
            let target = ClusterTarget::connect(&layout_addresses, region);
            let client = Client::new(&layout_addresses, ClientConfig::default());
            let peers: Vec<u64> = layout_addresses.iter().map(|a| a.id).collect();
            client
                .create_copyset(COPYSET, &peers)
                .await
                .map_err(|e| e.to_string())?;
            let step: u64 = 1 << 20;
            let mut offset = 0;
            while offset < region {
                let len = step.min(region - offset);
                let mut buffer = target.alloc(len as usize);
                buffer.as_bytes_mut().fill(0xa5);
                target
                    .write(offset, buffer)
                    .await
                    .map_err(|e| e.to_string())?;
                offset += len;
            }
            Ok::<(), String>(())
        })
        .map_err(|e| setup_error(e.to_string()))?;
    let laid_out = layout
        .join()
        .map_err(|_| setup_error("layout thread panicked".into()))?;
    let result = laid_out.map_err(setup_error).and_then(|()| {
        run_clones(job, progress, move |_clone| {
            let addresses = addresses.clone();
            async move { Ok(ClusterTarget::connect(&addresses, region)) }
        })
    });
    let stopped = cluster.stop();
    if created {
        // The folder is this run's own: nothing else was in it.
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    let stats = result?;
    stopped.map_err(|e| setup_error(format!("stopping the cluster: {e}")))?;
    Ok(stats)
}

/// Formats `FILENAME.engine` with one shard per clone, writes each clone's region once
/// through its shard (as `lay_out` does for the raw target), runs the job, and removes the file.
fn run_engine(job: &Job, progress: &Arc<Progress>) -> Result<JobStats, RunError> {
    let base = filename(job, "a path; the engine's device is the file PATH.engine")?;
    let path = PathBuf::from(format!("{}.engine", base.display()));
    let setup_error = |message: String| RunError::Setup {
        job: job.name.clone(),
        message,
        source: std::io::Error::other("engine"),
    };
    let shards = job.numjobs;
    let per_clone = Workload::new(job, 0).region_len();
    let chunks_per_shard = per_clone.div_ceil(ENGINE_CHUNK) + 8;
    let device = u64::from(shards) * (ENGINE_WAL + chunks_per_shard * ENGINE_CHUNK) + (64 << 20);
    // The file is this target's own (named after the job's filename): start from a fresh one.
    let _ = std::fs::remove_file(&path);
    let format_path = path.clone();
    let formatted = LocalExecutorBuilder::new(Placement::Unbound)
        .name("chunkbench-engine-format")
        .spawn(move || async move {
            let uri = format!("uring://{}?size={device}", format_path.display());
            let bdev = dataplane::storage::bdev::open(&uri, 8 << 20)
                .await
                .map_err(|e| e.to_string())?;
            let options = FormatOptions {
                page_size: 4096,
                chunk_size: ENGINE_CHUNK,
                wal_size: ENGINE_WAL,
                shard_count: shards,
                max_copysets: DEFAULT_MAX_COPYSETS,
                device_is_zeroed: true,
            };
            format(&bdev, &options, [7u8; 16])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        })
        .map_err(|e| setup_error(e.to_string()))?
        .join()
        .map_err(|_| setup_error("format thread panicked".into()))?;
    formatted.map_err(|e| setup_error(format!("formatting {}: {e}", path.display())))?;
    let job_for_layout = job.clone();
    let open_path = path.clone();
    let result = run_clones(job, progress, move |clone| {
        let path = open_path.clone();
        let job = job_for_layout.clone();
        async move {
            let target = EngineTarget::open(&path, clone).await?;
            let workload = Workload::new(&job, clone);
            let (start, end) = (
                workload.region_start(),
                workload.region_start() + workload.region_len(),
            );
            let mut offset = start;
            while offset < end {
                let len = (1u64 << 20).min(end - offset);
                let mut buffer = target.alloc(len as usize);
                buffer.as_bytes_mut().fill(0xa5);
                target.write(offset, buffer).await?;
                offset += len;
            }
            Ok(target)
        }
    });
    let _ = std::fs::remove_file(&path);
    result
}

/// Writes the job's region of the export once, then runs the job, one connection per clone.
fn run_nbd(job: &Job, progress: &Arc<Progress>) -> Result<JobStats, RunError> {
    let uri = job.filename.clone().ok_or_else(|| RunError::Job {
        job: job.name.clone(),
        message: "the nbd target needs `filename=nbd://HOST:PORT/EXPORT`".into(),
    })?;
    let uri = NbdUri::parse(&uri).map_err(|message| RunError::Job {
        job: job.name.clone(),
        message,
    })?;
    let setup_error = |message: String| RunError::Setup {
        job: job.name.clone(),
        message,
        source: std::io::Error::other("nbd"),
    };
    let region_end = job.offset + job.size;
    let layout_uri = uri.clone();
    let laid_out = LocalExecutorBuilder::new(Placement::Unbound)
        .name("chunkbench-nbd-layout")
        .spawn(move || async move {
            let target = NbdTarget::connect(&layout_uri)
                .await
                .map_err(|e| e.to_string())?;
            if target.size() < region_end {
                return Err(format!(
                    "the export holds {} bytes, the job needs {region_end}",
                    target.size()
                ));
            }
            let mut offset = 0;
            while offset < region_end {
                let len = (1u64 << 20).min(region_end - offset);
                let mut buffer = target.alloc(len as usize);
                buffer.as_bytes_mut().fill(0xa5);
                target
                    .write(offset, buffer)
                    .await
                    .map_err(|e| e.to_string())?;
                offset += len;
            }
            Ok::<(), String>(())
        })
        .map_err(|e| setup_error(e.to_string()))?
        .join()
        .map_err(|_| setup_error("layout thread panicked".into()))?;
    laid_out.map_err(|e| setup_error(format!("{}: {e}", uri.addr)))?;
    run_clones(job, progress, move |_clone| {
        let uri = uri.clone();
        async move { NbdTarget::connect(&uri).await }
    })
}

/// Runs each clone of `job` on its own pinned executor against the target `open` makes there,
/// and merges the clones' figures.
fn run_clones<T, F, Fut>(job: &Job, progress: &Arc<Progress>, open: F) -> Result<JobStats, RunError>
where
    T: Target + 'static,
    F: Fn(u32) -> Fut + Send + Clone + 'static,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let cores = online_cores();
    let cpu_before = process_cpu_time();
    let mut handles = Vec::new();
    for clone in 0..job.numjobs {
        let core = cores[clone as usize % cores.len()];
        let job_for_clone = job.clone();
        let progress = Arc::clone(progress);
        let open = open.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(core))
            .name(&format!("chunkbench-{clone}"))
            .spawn(move || async move {
                let job = job_for_clone;
                let target = open(clone).await.map_err(|source| RunError::Setup {
                    job: job.name.clone(),
                    message: "opening the target".into(),
                    source,
                })?;
                run_clone(&job, clone, Rc::new(target), &progress).await
            })
            .map_err(|e| RunError::Executor {
                job: job.name.clone(),
                message: e.to_string(),
            })?;
        handles.push(handle);
    }
    let mut merged = JobStats::default();
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(stats)) => merged.merge(&stats),
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(_) => {
                first_error.get_or_insert(RunError::Executor {
                    job: job.name.clone(),
                    message: "a clone's thread panicked".into(),
                });
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    if let (Some(before), Some(after)) = (cpu_before, process_cpu_time()) {
        // CPU time of the whole run (the cluster's nodes included, for the cluster target);
        // the warm-up is a small share for runs worth reporting.
        merged.cpu_user = after.0.saturating_sub(before.0);
        merged.cpu_system = after.1.saturating_sub(before.1);
    }
    Ok(merged)
}

fn online_cores() -> Vec<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let cores: Vec<usize> = dataplane::config::parse_cpulist(&text)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c as usize)
        .collect();
    if cores.is_empty() {
        vec![0]
    } else {
        cores
    }
}

/// Makes sure the file covers the job's region with written data, as fio lays files out, so
/// that reads hit the device rather than holes and writes do not pay for extent conversion.
fn lay_out(job: &Job, path: &PathBuf) -> Result<(), RunError> {
    let needed = job.offset + job.size;
    let setup = |message: String, source: std::io::Error| RunError::Setup {
        job: job.name.clone(),
        message,
        source,
    };
    let current = match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_file() => meta.len(),
        Ok(_) => return Ok(()), // a block device: its contents are what they are
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(setup(format!("stat {}", path.display()), e)),
    };
    if current >= needed {
        return Ok(());
    }
    let path = path.clone();
    let name = job.name.clone();
    let handle = LocalExecutorBuilder::new(Placement::Unbound)
        .name("chunkbench-layout")
        .spawn(move || async move {
            let target = RawTarget::open(&path).await?;
            let step: u64 = 1 << 20;
            let mut offset = current - current % step;
            while offset < needed {
                let len = step.min(needed - offset).next_multiple_of(4096);
                let mut buffer = target.alloc(len as usize);
                buffer.as_bytes_mut().fill(0xa5);
                target.write(offset, buffer).await?;
                offset += len;
            }
            target.sync().await
        })
        .map_err(|e| RunError::Executor {
            job: name.clone(),
            message: e.to_string(),
        })?;
    match handle.join() {
        Ok(result) => result.map_err(|e| setup("laying out the file".into(), e)),
        Err(_) => Err(RunError::Executor {
            job: name,
            message: "layout thread panicked".into(),
        }),
    }
}

/// Per-clone state shared by its workers (all on one executor, hence Rc and RefCell).
struct CloneState {
    workload: RefCell<Workload>,
    stats: RefCell<JobStats>,
    writes_since_sync: Cell<u32>,
    /// The next slot of the open-loop schedule.
    next_slot: Cell<u64>,
    stop: Cell<bool>,
    error: RefCell<Option<RunError>>,
}

async fn run_clone<T: Target + 'static>(
    job: &Job,
    clone: u32,
    target: Rc<T>,
    progress: &Arc<Progress>,
) -> Result<JobStats, RunError> {
    let workload = Workload::new(job, clone);
    let region_len = workload.region_len();
    let state = Rc::new(CloneState {
        workload: RefCell::new(workload),
        stats: RefCell::new(JobStats::default()),
        writes_since_sync: Cell::new(0),
        next_slot: Cell::new(0),
        stop: Cell::new(false),
        error: RefCell::new(None),
    });
    let start = Instant::now();
    let measured_from = start + job.ramp_time;
    let deadline = job.runtime.map(|r| measured_from + r);
    let byte_limit = if job.time_based {
        None
    } else {
        Some(region_len)
    };
    let sync_every = job.fsync_every.max(job.fdatasync_every);

    let mut workers = Vec::new();
    for _ in 0..job.iodepth {
        let state = Rc::clone(&state);
        let target = Rc::clone(&target);
        let job = job.clone();
        let progress = Arc::clone(progress);
        workers.push(glommio::spawn_local(async move {
            loop {
                if state.stop.get() {
                    return;
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    state.stop.set(true);
                    return;
                }
                let op = {
                    let mut workload = state.workload.borrow_mut();
                    if byte_limit.is_some_and(|limit| workload.issued_bytes() >= limit)
                        && now >= measured_from
                    {
                        state.stop.set(true);
                        return;
                    }
                    workload.next_op()
                };
                // Open loop (`rate_iops`): each operation has a slot in a fixed schedule and its
                // latency counts from that slot, so a stalled target shows as queueing delay
                // instead of slowing the load down (no coordinated omission).
                let began = match job.rate_iops {
                    Some(rate) => {
                        let slot = state.next_slot.get();
                        state.next_slot.set(slot + 1);
                        let at = start + Duration::from_secs_f64(slot as f64 / rate as f64);
                        if deadline.is_some_and(|d| at >= d) {
                            // The schedule ends with the run: no slot past the deadline.
                            state.stop.set(true);
                            return;
                        }
                        let now = Instant::now();
                        if at > now {
                            glommio::timer::sleep(at - now).await;
                        }
                        at
                    }
                    None => Instant::now(),
                };
                let fail = |op_name: &'static str, source: std::io::Error| RunError::Io {
                    job: job.name.clone(),
                    clone,
                    op: op_name,
                    offset: op.offset,
                    len: op.len,
                    source,
                };
                let result = match op.kind {
                    OpKind::Write => {
                        let mut buffer = target.alloc(op.len as usize);
                        if job.verify {
                            verify::fill(buffer.as_bytes_mut(), op.offset, job.randseed);
                        } else {
                            buffer.as_bytes_mut().fill((op.offset >> 12) as u8);
                        }
                        match target.write(op.offset, buffer).await {
                            Err(e) => Err(fail("write", e)),
                            Ok(()) => {
                                let written = state.writes_since_sync.get() + 1;
                                if sync_every > 0 && written >= sync_every {
                                    state.writes_since_sync.set(0);
                                    let sync_began = Instant::now();
                                    let synced = target.sync().await;
                                    if sync_began >= measured_from {
                                        state
                                            .stats
                                            .borrow_mut()
                                            .sync
                                            .record(0, sync_began.elapsed());
                                    }
                                    synced.map_err(|e| fail("sync", e))
                                } else {
                                    state.writes_since_sync.set(written);
                                    Ok(())
                                }
                            }
                        }
                    }
                    OpKind::Read => match target.read(op.offset, op.len as usize).await {
                        Err(e) => Err(fail("read", e)),
                        Ok(data) => {
                            if job.verify && verify::check(&data, op.offset) == verify::Verdict::Bad
                            {
                                state.stats.borrow_mut().verify_failures += 1;
                            }
                            Ok(())
                        }
                    },
                };
                let latency = began.elapsed();
                match result {
                    Ok(()) => {
                        if began >= measured_from {
                            let mut stats = state.stats.borrow_mut();
                            stats.record_in_timeline(Instant::now() - measured_from);
                            match op.kind {
                                OpKind::Read => stats.read.record(op.len, latency),
                                OpKind::Write => stats.write.record(op.len, latency),
                            }
                        }
                        progress.ops.fetch_add(1, Ordering::Relaxed);
                        progress.bytes.fetch_add(op.len, Ordering::Relaxed);
                    }
                    Err(error) => {
                        state.stats.borrow_mut().errors += 1;
                        state.error.borrow_mut().get_or_insert(error);
                        state.stop.set(true);
                        return;
                    }
                }
            }
        }));
    }
    for worker in workers {
        worker.await;
    }
    let ended = Instant::now();
    if let Some(error) = state.error.borrow_mut().take() {
        return Err(error);
    }
    let mut stats = state.stats.replace(JobStats::default());
    stats.elapsed = ended.saturating_duration_since(measured_from.min(ended));
    Ok(stats)
}

/// How long to wait between progress lines.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
