//! `chunkserver demo`: three replicas on loopback, in one process, from the embedded
//! configuration; a copyset across them; a region written and read back; a short benchmark.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;

use crate::client::{Client, ClientConfig, NodeAddress};
use crate::config::{Backend, ByteSize, Config, HostTopology};
use crate::ids::{ChunkId, CopysetId};
use crate::server::LocalCluster;

/// What the demo runs on.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The three node configurations, as (file name, TOML text).
    pub configs: Vec<(String, String)>,
    /// `mem`, `uring` to keep the chunks in files under `data_dir`, or `spdk` for SPDK malloc
    /// bdevs (feature `spdk`).
    pub backend: Backend,
    /// Where the nodes keep their files.
    pub data_dir: PathBuf,
    /// Bytes written and read back through the cluster.
    pub region_bytes: u64,
    /// Length of each benchmark phase.
    pub phase: Duration,
}

/// One benchmark phase's figures.
#[derive(Debug, Clone)]
pub struct PhaseReport {
    /// What ran.
    pub name: String,
    /// Operations completed.
    pub ops: u64,
    /// Operations per second.
    pub iops: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// What the demo did.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The copyset's leader.
    pub leader: u64,
    /// Bytes written and verified.
    pub verified_bytes: u64,
    /// The benchmark phases.
    pub phases: Vec<PhaseReport>,
}

const COPYSET: CopysetId = CopysetId(1);

/// Each node's malloc bdev in the SPDK demo.
const SPDK_DEMO_BDEV: u64 = 256 << 20;

/// Runs the demo: starts the nodes, exercises them, stops them.
pub fn run(options: &DemoOptions) -> Result<DemoReport, String> {
    let host = HostTopology::detect();
    let mut configs = Vec::new();
    for (name, text) in &options.configs {
        let file = Path::new(name);
        let mut config = Config::parse(file, text).map_err(|e| e.to_string())?;
        config.node.data_dir = options.data_dir.join(format!("node{}", config.node.id));
        if options.backend == Backend::Uring {
            for device in &mut config.devices {
                device.backend = Backend::Uring;
                device.path = Some(PathBuf::from("chunks.img"));
                device.size = device.size.or(Some(ByteSize(256 << 20)));
            }
        }
        if options.backend == Backend::Spdk {
            // The three nodes share this process and so one SPDK environment: one JSON
            // config defines a malloc bdev for each, in the no-huge mode.
            let spdk_config = options.data_dir.join("spdk-bdevs.json");
            if !spdk_config.exists() {
                crate::server::node::private_dir(&options.data_dir).map_err(|e| e.to_string())?;
                let bdevs: Vec<serde_json::Value> = (1..=options.configs.len())
                    .map(|n| {
                        serde_json::json!({"method": "bdev_malloc_create", "params": {
                            "name": format!("Malloc{n}"),
                            "num_blocks": SPDK_DEMO_BDEV / 4096, "block_size": 4096}})
                    })
                    .collect();
                let json =
                    serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": bdevs}]});
                std::fs::write(&spdk_config, json.to_string()).map_err(|e| e.to_string())?;
            }
            config.spdk = crate::config::SpdkSection {
                mem_size: ByteSize(options.configs.len() as u64 * SPDK_DEMO_BDEV + (1 << 30)),
                hugepages: false,
                pci: false,
                config_file: Some(spdk_config),
                // Fresh malloc bdevs: nothing on them to keep.
                format: true,
            };
            for device in &mut config.devices {
                device.backend = Backend::Spdk;
                device.bdev = Some(format!("Malloc{}", config.node.id));
                device.path = None;
                device.size = None;
                device.create = None;
            }
        }
        let resolved = config.validate(file, &host).map_err(|e| e.to_string())?;
        configs.push((config, resolved.cores));
    }
    let chunk_size = configs
        .first()
        .map(|(c, _)| c.storage.chunk_size.bytes())
        .unwrap_or(4 << 20);
    let cluster = LocalCluster::start(configs);
    let addresses = cluster.addresses().to_vec();
    let region = options.region_bytes;
    let phase = options.phase;
    let result = LocalExecutorBuilder::new(Placement::Unbound)
        .name("demo-client")
        .spawn(move || async move { exercise(&addresses, chunk_size, region, phase).await })
        .map_err(|e| e.to_string())
        .and_then(|handle| {
            handle
                .join()
                .map_err(|_| "the demo client panicked".to_string())
        })
        .and_then(|r| r);
    let stopped = cluster.stop();
    match (result, stopped) {
        (Ok(report), Ok(())) => Ok(report),
        (Ok(_), Err(nodes)) => Err(nodes),
        (Err(error), Ok(())) => Err(error),
        (Err(error), Err(nodes)) => Err(format!("{error}; nodes: {nodes}")),
    }
}

fn pattern(offset: u64, len: usize) -> Bytes {
    let mut data = vec![0u8; len];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        let word = (offset + 8 * i as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    Bytes::from(data)
}

async fn exercise(
    addresses: &[NodeAddress],
    chunk_size: u64,
    region: u64,
    phase: Duration,
) -> Result<DemoReport, String> {
    let client = Rc::new(Client::new(addresses, ClientConfig::default()));
    let peers: Vec<u64> = addresses.iter().map(|a| a.id).collect();
    client
        .create_copyset(COPYSET, &peers)
        .await
        .map_err(|e| e.to_string())?;

    // The region, 64 KiB at a time, spread over chunks.
    const PIECE: u64 = 64 << 10;
    let locate = |offset: u64| {
        (
            ChunkId(1 + offset / chunk_size),
            (offset % chunk_size) as u32,
        )
    };
    let mut offset = 0;
    while offset < region {
        let (chunk, within) = locate(offset);
        let data = pattern(offset, PIECE as usize);
        client
            .write(COPYSET, chunk, within, data, 1)
            .await
            .map_err(|e| e.to_string())?;
        offset += PIECE;
    }
    let mut offset = 0;
    while offset < region {
        let (chunk, within) = locate(offset);
        let data = client
            .read(COPYSET, chunk, u64::from(within), PIECE as u32)
            .await
            .map_err(|e| e.to_string())?;
        if data != pattern(offset, PIECE as usize) {
            return Err(format!("read back different bytes at offset {offset}"));
        }
        offset += PIECE;
    }
    let leader = client.cached_leader(COPYSET).unwrap_or(0);

    let mut phases = Vec::new();
    for (name, depth, write) in [
        ("4k randwrite QD1", 1, true),
        ("4k randwrite QD32", 32, true),
        ("4k randread QD32", 32, false),
    ] {
        phases.push(bench(&client, name, depth, write, region, chunk_size, phase).await?);
    }
    Ok(DemoReport {
        leader,
        verified_bytes: region,
        phases,
    })
}

async fn bench(
    client: &Rc<Client>,
    name: &str,
    depth: usize,
    write: bool,
    region: u64,
    chunk_size: u64,
    phase: Duration,
) -> Result<PhaseReport, String> {
    let histogram = Rc::new(RefCell::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?,
    ));
    let failure: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
    let started = Instant::now();
    let blocks = (region / 4096).max(1);
    let mut workers = Vec::new();
    for worker in 0..depth {
        let client = Rc::clone(client);
        let histogram = Rc::clone(&histogram);
        let failure = Rc::clone(&failure);
        workers.push(glommio::spawn_local(async move {
            let mut state = 0x2545_f491_4f6c_dd1d_u64 ^ (worker as u64 + 1);
            while started.elapsed() < phase && failure.borrow().is_none() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let offset = (state % blocks) * 4096;
                let chunk = ChunkId(1 + offset / chunk_size);
                let within = offset % chunk_size;
                let began = Instant::now();
                let result = if write {
                    client
                        .write(COPYSET, chunk, within as u32, pattern(offset, 4096), 1)
                        .await
                        .map(|_| ())
                } else {
                    client.read(COPYSET, chunk, within, 4096).await.map(|_| ())
                };
                match result {
                    Ok(()) => {
                        let nanos = began.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
                        histogram.borrow_mut().saturating_record(nanos.max(1));
                    }
                    Err(error) => {
                        failure.borrow_mut().get_or_insert(error.to_string());
                    }
                }
            }
        }));
    }
    for worker in workers {
        worker.await;
    }
    if let Some(error) = failure.borrow_mut().take() {
        return Err(format!("{name}: {error}"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let histogram = histogram.borrow();
    Ok(PhaseReport {
        name: name.to_string(),
        ops: histogram.len(),
        iops: histogram.len() as f64 / elapsed.max(f64::EPSILON),
        p50: Duration::from_nanos(histogram.value_at_quantile(0.5)),
        p99: Duration::from_nanos(histogram.value_at_quantile(0.99)),
    })
}
