//! The realistic profile's bulk workload: volumes on copysets of their own, served by a real
//! `chunkserver nbd` process and written by unmodified fio (`--ioengine=nbd`). Before the
//! faults fio fills every volume sequentially; during them it loops, each round a 4 KiB
//! random write with `verify=crc32c` (every block read back and checked) on one volume and
//! 128 KiB random writes on the others. Every fio run must exit 0: an I/O error, a failed
//! verification or a hang past its bound fails the suite.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::ids::CopysetId;

/// The bulk volumes: (copyset, name). With the register workload's copyset and the
/// metadata copyset, every shard holds six copysets.
pub const VOLUMES: [(u64, &str); 4] = [(21, "bulk1"), (22, "bulk2"), (23, "bulk3"), (24, "bulk4")];
/// Each bulk volume's size.
pub const VOLUME_BYTES: u64 = 256 << 20;
/// The same, as `chunkserver nbd --volume` takes it.
const VOLUME_SIZE: &str = "256MiB";
/// Bytes of the verified volume one round writes and verifies.
const VERIFY_BYTES: u64 = 32 << 20;
/// One fio run may take at most this long (its own runtime cap, plus verification).
const FIO_BOUND: Duration = Duration::from_secs(120);

/// The copysets the bulk workload uses.
pub fn copysets() -> Vec<CopysetId> {
    VOLUMES.iter().map(|(c, _)| CopysetId(*c)).collect()
}

/// A running `chunkserver nbd` serving the bulk volumes.
pub struct Bulk {
    nbd: Child,
    address: String,
    log: PathBuf,
}

/// What the fio runs of one phase did.
#[derive(Debug, Default, Clone)]
pub struct Written {
    /// fio runs that exited 0.
    pub runs: u64,
    /// Bytes they wrote.
    pub bytes: u64,
    /// Blocks read back and verified.
    pub verified_bytes: u64,
    /// Runs that failed, with the end of their output.
    pub failures: Vec<String>,
}

impl Bulk {
    /// Starts `chunkserver nbd` on 127.0.0.1:`port` with the cluster of `config`, creating
    /// the volumes (and their copysets) when missing; waits until it serves.
    pub fn start(config: &Path, dir: &Path, port: u16) -> Result<Bulk, String> {
        let log = dir.join("nbd.log");
        let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let address = format!("127.0.0.1:{port}");
        let mut command = Command::new(env!("CARGO_BIN_EXE_chunkserver"));
        command
            .args(["nbd", "--config"])
            .arg(config)
            .args(["--listen", &address]);
        for (copyset, name) in VOLUMES {
            command.args(["--volume", &format!("{name}:{copyset}:{VOLUME_SIZE}")]);
        }
        let nbd = command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| format!("start chunkserver nbd: {e}"))?;
        let mut bulk = Bulk { nbd, address, log };
        let began = Instant::now();
        loop {
            if std::net::TcpStream::connect(&bulk.address).is_ok() {
                return Ok(bulk);
            }
            if let Ok(Some(status)) = bulk.nbd.try_wait() {
                return Err(format!(
                    "chunkserver nbd exited: {status}; {}",
                    bulk.log_tail()
                ));
            }
            if began.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "chunkserver nbd did not serve within 60 s; {}",
                    bulk.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.address)
    }

    /// The end of the export's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Fills every volume once, sequentially, 1 MiB at depth 2 (8 MiB in flight: the debug
    /// build on two shared cores must answer each within the client's 10 s deadline).
    pub fn fill(&self) -> Written {
        let mut args = vec![
            "--ioengine=nbd".to_string(),
            "--rw=write".into(),
            "--bs=1M".into(),
            "--iodepth=2".into(),
            format!("--size={VOLUME_BYTES}"),
        ];
        for (_, name) in VOLUMES {
            args.push(format!("--name={name}"));
            args.push(format!("--uri={}", self.uri(name)));
        }
        let mut written = Written::default();
        run_fio(&args, &mut written);
        written
    }

    /// Rounds of fio until `stop`: a verified 4 KiB random write on the first volume (a
    /// different 32 MiB region each round) beside 128 KiB random writes on the others.
    pub fn during(self: &Arc<Self>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Written> {
        let bulk = Arc::clone(self);
        std::thread::spawn(move || {
            let mut written = Written::default();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let region = round % (VOLUME_BYTES / VERIFY_BYTES);
                let mut args = vec![
                    "--ioengine=nbd".to_string(),
                    format!("--name=verify{round}"),
                    format!("--uri={}", bulk.uri(VOLUMES[0].1)),
                    "--rw=randwrite".into(),
                    "--bs=4k".into(),
                    "--iodepth=8".into(),
                    format!("--offset={}", region * VERIFY_BYTES),
                    format!("--size={VERIFY_BYTES}"),
                    "--verify=crc32c".into(),
                    "--do_verify=1".into(),
                    "--verify_fatal=1".into(),
                    "--verify_state_save=0".into(),
                ];
                for (_, name) in &VOLUMES[1..] {
                    args.extend([
                        format!("--name={name}-{round}"),
                        format!("--uri={}", bulk.uri(name)),
                        "--rw=randwrite".into(),
                        "--bs=128k".into(),
                        "--iodepth=2".into(),
                        format!("--size={VOLUME_BYTES}"),
                        "--time_based".into(),
                        "--runtime=10".into(),
                    ]);
                }
                run_fio(&args, &mut written);
                round += 1;
            }
            written
        })
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        let _ = self.nbd.kill();
        let _ = self.nbd.wait();
    }
}

/// Runs fio with `args` (JSON output), adding what it wrote to `written` or its failure.
fn run_fio(args: &[String], written: &mut Written) {
    let began = Instant::now();
    let child = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            written.failures.push(format!("cannot run fio: {e}"));
            return;
        }
    };
    // fio bounds itself; this only guards against a hang.
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if began.elapsed() > FIO_BOUND => {
                let _ = child.kill();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                written.failures.push(format!("fio: {e}"));
                return;
            }
        }
    }
    let output = match child.wait_with_output() {
        Ok(output) => output,
        Err(e) => {
            written.failures.push(format!("fio: {e}"));
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() || began.elapsed() > FIO_BOUND {
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        written.failures.push(format!(
            "fio {} after {:.1} s ({}): {}",
            output.status,
            began.elapsed().as_secs_f64(),
            args.iter()
                .filter(|a| a.starts_with("--name="))
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
        return;
    }
    // fio may print warnings before its JSON.
    let json = stdout.find('{').map_or("", |at| &stdout[at..]);
    let Ok(report) = serde_json::from_str::<serde_json::Value>(json) else {
        written.failures.push("fio printed no JSON report".into());
        return;
    };
    written.runs += 1;
    for job in report["jobs"].as_array().into_iter().flatten() {
        written.bytes += job["write"]["io_bytes"].as_u64().unwrap_or(0);
        written.verified_bytes += job["read"]["io_bytes"].as_u64().unwrap_or(0);
    }
}
