//! scalebench: one chunkserver holding many copysets, mostly idle. Prints the resident memory
//! each copyset adds (beyond the shared pools the node had before any copyset) and the CPU the
//! process burns while nothing happens.
//!
//! ```text
//! scalebench [--copysets N] [--idle-seconds S]
//! ```

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use dataplane::client::{Client, ClientConfig};
use dataplane::config::{Config, HostTopology};
use dataplane::ids::CopysetId;
use dataplane::server::{free_ports, LocalCluster};
use glommio::{LocalExecutorBuilder, Placement};

fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn cpu_seconds() -> Option<f64> {
    bench::report::process_cpu_time().map(|(user, system)| (user + system).as_secs_f64())
}

fn argument(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a number")),
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let copysets = argument(&args, "--copysets", 2000)?;
    let idle_seconds = argument(&args, "--idle-seconds", 5)?;
    let ports = free_ports(2)?;
    let text = format!(
        "[node]\nid = 1\ncores = [0]\ndata_dir = \"/tmp/scalebench\"\n\n[listen]\n\
         peer = \"tcp://127.0.0.1:{}\"\nclient = [\"tcp://127.0.0.1:{}\"]\n\n[[devices]]\n\
         backend = \"mem\"\nsize = \"{}MiB\"\n\n[storage]\nchunk_size = \"4MiB\"\n\
         wal_size_per_shard = \"64MiB\"\nmax_copysets_per_shard = {}\n",
        ports[0],
        ports[1],
        160 + copysets * 2 * 4096 / (1 << 20),
        copysets.max(1)
    );
    let file = Path::new("scalebench.toml");
    let config = Config::parse(file, &text).map_err(|e| e.to_string())?;
    let cores = config
        .validate(file, &HostTopology::detect())
        .map_err(|e| e.to_string())?
        .cores;
    let cluster = LocalCluster::start(vec![(config, cores)]);
    let addresses = cluster.addresses().to_vec();

    let result = LocalExecutorBuilder::new(Placement::Unbound)
        .name("scalebench-client")
        .spawn(move || async move {
            let client = Rc::new(Client::new(&addresses, ClientConfig::default()));
            // The node is up once it answers; its pools are allocated by then.
            client
                .create_copyset(CopysetId(1), &[1])
                .await
                .map_err(|e| e.to_string())?;
            glommio::timer::sleep(Duration::from_millis(500)).await;
            let before = resident_bytes().unwrap_or(0);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for worker in 0..16u64 {
                let client = Rc::clone(&client);
                tasks.push(glommio::spawn_local(async move {
                    let mut id = 2 + worker;
                    while id < copysets + 1 {
                        client
                            .create_copyset(CopysetId(id), &[1])
                            .await
                            .map_err(|e| e.to_string())?;
                        id += 16;
                    }
                    Ok::<(), String>(())
                }));
            }
            for task in tasks {
                task.await?;
            }
            let created_in = started.elapsed();
            // Let the single-voter groups elect themselves and settle: quiescence starts after
            // two election timeouts (2 s with the default timings).
            glommio::timer::sleep(Duration::from_secs(4)).await;
            let after = resident_bytes().unwrap_or(0);
            let cpu_before = cpu_seconds().unwrap_or(0.0);
            let idle_started = Instant::now();
            glommio::timer::sleep(Duration::from_secs(idle_seconds)).await;
            let idle_cpu = cpu_seconds().unwrap_or(0.0) - cpu_before;
            let idle_wall = idle_started.elapsed().as_secs_f64();
            Ok::<_, String>((before, after, created_in, idle_cpu / idle_wall))
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the client panicked".to_string())?;
    let stopped = cluster.stop();
    let (before, after, created_in, idle_share) = match (result, stopped) {
        (Ok(figures), Ok(())) => figures,
        (Err(error), Ok(())) | (Ok(_), Err(error)) => return Err(error),
        (Err(error), Err(node)) => return Err(format!("{error}; the node: {node}")),
    };
    let added = copysets.saturating_sub(1).max(1);
    println!(
        "scalebench: {copysets} copysets on one shard (mem device), created in {created_in:.1?}"
    );
    println!(
        "scalebench: resident {:.1} MiB before, {:.1} MiB after: {:.1} KiB per copyset (target <= 16 KiB)",
        before as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64,
        after.saturating_sub(before) as f64 / 1024.0 / added as f64
    );
    println!(
        "scalebench: idle CPU {:.1}% of one core over {idle_seconds} s (target: near zero)",
        100.0 * idle_share
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("scalebench: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
