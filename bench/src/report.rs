//! Figures of a run: latency histograms (hdrhistogram, nanoseconds) per direction, counts,
//! bytes and CPU use, merged across clones, printed fio-style or as JSON.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies from 1 µs... up to a minute at three significant digits.
fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; failing here would be a programming error.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// The figures of one direction (reads, writes or syncs).
#[derive(Debug, Clone)]
pub struct DirectionStats {
    /// Completed operations in the measured phase.
    pub ops: u64,
    /// Bytes they moved.
    pub bytes: u64,
    /// Their latencies in nanoseconds.
    pub latency_ns: Histogram<u64>,
}

impl Default for DirectionStats {
    fn default() -> Self {
        DirectionStats {
            ops: 0,
            bytes: 0,
            latency_ns: new_histogram(),
        }
    }
}

impl DirectionStats {
    /// Records one completed operation.
    pub fn record(&mut self, bytes: u64, latency: Duration) {
        self.ops += 1;
        self.bytes += bytes;
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_ns.saturating_record(nanos.max(1));
    }

    /// Adds another clone's figures.
    pub fn merge(&mut self, other: &DirectionStats) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        // Same bounds on both sides, so adding cannot fail.
        self.latency_ns
            .add(&other.latency_ns)
            .expect("histograms with equal bounds");
    }
}

/// The figures of one job (all clones merged).
#[derive(Debug, Clone, Default)]
pub struct JobStats {
    /// Reads.
    pub read: DirectionStats,
    /// Writes (with the sync they waited for, when the job syncs).
    pub write: DirectionStats,
    /// fsync/fdatasync calls.
    pub sync: DirectionStats,
    /// Length of the measured phase.
    pub elapsed: Duration,
    /// Operations that failed.
    pub errors: u64,
    /// Blocks that failed `verify`.
    pub verify_failures: u64,
    /// User CPU time of the process during the measured phase.
    pub cpu_user: Duration,
    /// System CPU time of the process during the measured phase.
    pub cpu_system: Duration,
    /// Operations completed in each `TIMELINE_STEP` of the measured phase.
    pub timeline: Vec<u64>,
}

/// The width of one step of [`JobStats::timeline`].
pub const TIMELINE_STEP: Duration = Duration::from_millis(100);
/// The longest timeline kept (steps past it are not recorded).
pub const TIMELINE_STEPS_MAX: usize = 36_000;

impl JobStats {
    /// Counts one operation completed `since_start` into the measured phase.
    pub fn record_in_timeline(&mut self, since_start: Duration) {
        let step = (since_start.as_millis() / TIMELINE_STEP.as_millis()) as usize;
        if step >= TIMELINE_STEPS_MAX {
            return;
        }
        if self.timeline.len() <= step {
            self.timeline.resize(step + 1, 0);
        }
        self.timeline[step] += 1;
    }

    /// Adds another clone's figures.
    pub fn merge(&mut self, other: &JobStats) {
        self.read.merge(&other.read);
        self.write.merge(&other.write);
        self.sync.merge(&other.sync);
        self.elapsed = self.elapsed.max(other.elapsed);
        self.errors += other.errors;
        self.verify_failures += other.verify_failures;
        if self.timeline.len() < other.timeline.len() {
            self.timeline.resize(other.timeline.len(), 0);
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            *mine += theirs;
        }
    }

    /// Operations per second over both directions.
    pub fn iops(&self) -> f64 {
        per_second(self.read.ops + self.write.ops, self.elapsed)
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// The percentiles every report shows.
pub const PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 99.99];

/// One direction, as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct DirectionJson {
    /// Operations.
    pub ops: u64,
    /// Bytes.
    pub bytes: u64,
    /// Operations per second.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// Latency: min, mean, max and percentiles, in microseconds.
    pub lat_us: LatencyJson,
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyJson {
    /// Minimum.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Maximum.
    pub max: f64,
    /// (percentile, value) pairs.
    pub percentiles: Vec<(f64, f64)>,
}

/// One job, as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct JobJson {
    /// Job name.
    pub name: String,
    /// Target it ran against.
    pub target: String,
    /// Pattern.
    pub rw: String,
    /// Largest block size.
    pub bs: u64,
    /// I/O depth per clone.
    pub iodepth: u32,
    /// Clones.
    pub numjobs: u32,
    /// Measured phase, in milliseconds.
    pub elapsed_ms: u64,
    /// Reads.
    pub read: DirectionJson,
    /// Writes.
    pub write: DirectionJson,
    /// Syncs.
    pub sync: DirectionJson,
    /// Failed operations.
    pub errors: u64,
    /// Blocks that failed verification.
    pub verify_failures: u64,
    /// User CPU, percent of one core.
    pub cpu_user_percent: f64,
    /// System CPU, percent of one core.
    pub cpu_system_percent: f64,
}

fn direction_json(stats: &DirectionStats, elapsed: Duration) -> DirectionJson {
    let h = &stats.latency_ns;
    let us = |ns: u64| ns as f64 / 1000.0;
    DirectionJson {
        ops: stats.ops,
        bytes: stats.bytes,
        iops: per_second(stats.ops, elapsed),
        bw_bytes: per_second(stats.bytes, elapsed),
        lat_us: LatencyJson {
            min: if stats.ops > 0 { us(h.min()) } else { 0.0 },
            mean: h.mean() / 1000.0,
            max: us(h.max()),
            percentiles: PERCENTILES
                .iter()
                .map(|&p| (p, us(h.value_at_percentile(p))))
                .collect(),
        },
    }
}

/// Builds the JSON form of a job's figures.
pub fn job_json(job: &crate::job::Job, stats: &JobStats) -> JobJson {
    let percent = |cpu: Duration| {
        let elapsed = stats.elapsed.as_secs_f64();
        if elapsed > 0.0 {
            100.0 * cpu.as_secs_f64() / elapsed
        } else {
            0.0
        }
    };
    JobJson {
        name: job.name.clone(),
        target: job.target.to_string(),
        rw: job.pattern.to_string(),
        bs: job.max_block_size(),
        iodepth: job.iodepth,
        numjobs: job.numjobs,
        elapsed_ms: stats.elapsed.as_millis() as u64,
        read: direction_json(&stats.read, stats.elapsed),
        write: direction_json(&stats.write, stats.elapsed),
        sync: direction_json(&stats.sync, stats.elapsed),
        errors: stats.errors,
        verify_failures: stats.verify_failures,
        cpu_user_percent: percent(stats.cpu_user),
        cpu_system_percent: percent(stats.cpu_system),
    }
}

/// Formats a count the way fio does (`12.3k`).
pub fn human_count(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

/// The fio-like human summary of one job.
pub fn human_summary(job: &crate::job::Job, stats: &JobStats) -> String {
    let json = job_json(job, stats);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: (target={}, rw={}, bs={}, iodepth={}, numjobs={})",
        json.name, json.target, json.rw, json.bs, json.iodepth, json.numjobs
    );
    for (label, direction) in [
        ("read", &json.read),
        ("write", &json.write),
        ("sync", &json.sync),
    ] {
        if direction.ops == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "  {label:>5}: IOPS={}, BW={:.1}MiB/s ({} ops, {:.1}MiB in {}ms)",
            human_count(direction.iops),
            direction.bw_bytes / (1 << 20) as f64,
            direction.ops,
            direction.bytes as f64 / (1 << 20) as f64,
            json.elapsed_ms
        );
        let lat = &direction.lat_us;
        let _ = writeln!(
            out,
            "         lat (usec): min={:.1}, avg={:.1}, max={:.1}",
            lat.min, lat.mean, lat.max
        );
        let percentiles: Vec<String> = lat
            .percentiles
            .iter()
            .map(|(p, v)| format!("{p}th=[{v:.1}]"))
            .collect();
        let _ = writeln!(
            out,
            "         lat percentiles (usec): {}",
            percentiles.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "  cpu: usr={:.1}%, sys={:.1}%   errors={} verify_failures={}",
        json.cpu_user_percent, json.cpu_system_percent, json.errors, json.verify_failures
    );
    out
}

/// User and system CPU time of this process so far, from /proc/self/stat (USER_HZ = 100 on
/// Linux for that file). None where /proc is not there.
pub fn process_cpu_time() -> Option<(Duration, Duration)> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; the fields we want follow its closing parenthesis.
    let after = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let user = ticks(11)?;
    let system = ticks(12)?;
    Some((
        Duration::from_millis(user * 10),
        Duration::from_millis(system * 10),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_counts_and_histograms() {
        let mut a = JobStats::default();
        let mut b = JobStats::default();
        for i in 1..=100 {
            a.write.record(4096, Duration::from_micros(i));
            b.write.record(4096, Duration::from_micros(100 + i));
        }
        a.elapsed = Duration::from_secs(1);
        b.elapsed = Duration::from_secs(2);
        a.merge(&b);
        assert_eq!(a.write.ops, 200);
        assert_eq!(a.write.bytes, 200 * 4096);
        assert_eq!(a.elapsed, Duration::from_secs(2));
        let median = a.write.latency_ns.value_at_percentile(50.0);
        assert!((99_000..=101_000).contains(&median), "{median}");
        assert!((a.iops() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn the_human_summary_shows_the_json_figures() {
        let job = crate::job::parse_jobs(Some("[j]\nrw=randrw\nsize=1m\n"), &[])
            .unwrap()
            .remove(0);
        let mut stats = JobStats::default();
        for i in 1..=1000 {
            stats.read.record(4096, Duration::from_micros(i));
            stats.write.record(4096, Duration::from_micros(2 * i));
        }
        stats.elapsed = Duration::from_millis(500);
        let json = job_json(&job, &stats);
        let text = serde_json::to_string(&json).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["read"]["ops"], 1000);
        let human = human_summary(&job, &stats);
        for direction in [&json.read, &json.write] {
            assert!(
                human.contains(&format!("IOPS={}", human_count(direction.iops))),
                "{human}"
            );
            for (p, v) in &direction.lat_us.percentiles {
                assert!(human.contains(&format!("{p}th=[{v:.1}]")), "{human}");
            }
        }
    }

    #[test]
    fn cpu_time_is_readable_here() {
        assert!(process_cpu_time().is_some());
    }
}
