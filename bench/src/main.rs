//! chunkbench: fio-style benchmarks whose every figure is printed beside its baseline.
//!
//! ```text
//! chunkbench [JOBFILE] [--KEY=VALUE ...] [--output-format=normal|json]
//!            [--compare=TARGET_A,TARGET_B] [--rounds=N]
//! ```
//! `--KEY=VALUE` sets a job key for every job, as fio's command line does; with no job file,
//! `--name=NAME` starts a job. See docs/benchmarking.md for the supported keys.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bench::job::{parse_jobs, Job, TargetKind};
use bench::report::{human_count, human_summary, job_json, JobStats};
use bench::runner::{run_job, Progress, PROGRESS_INTERVAL};

const USAGE: &str = "usage: chunkbench [JOBFILE] [--KEY=VALUE ...] [--output-format=normal|json] \
                     [--compare=[TARGET_A,]TARGET_B] [--rounds=N] [--plot=FILE.svg]\n\
                     Job keys and targets: docs/benchmarking.md";

struct Options {
    job_file: Option<String>,
    overrides: Vec<String>,
    json: bool,
    /// Where to draw the SVG plot, if asked.
    plot: Option<String>,
    /// (A, B); A `None` means each job's own target.
    compare: Option<(Option<TargetKind>, TargetKind)>,
    rounds: u32,
}

/// Options that also take their value as the next argument (`--compare engine`).
const SPACED: [&str; 6] = [
    "compare",
    "target",
    "output-format",
    "rounds",
    "filename",
    "name",
];

/// Joins `--option value` into `--option=value` for the options in `SPACED`.
fn join_spaced(args: &[String]) -> Vec<String> {
    let mut joined = Vec::with_capacity(args.len());
    let mut iter = args.iter().peekable();
    while let Some(arg) = iter.next() {
        let spaced = arg
            .strip_prefix("--")
            .is_some_and(|name| SPACED.contains(&name));
        match iter.peek() {
            Some(value) if spaced && !value.starts_with("--") => {
                joined.push(format!("{arg}={value}"));
                iter.next();
            }
            _ => joined.push(arg.clone()),
        }
    }
    joined
}

fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let args = join_spaced(args);
    let mut options = Options {
        job_file: None,
        overrides: Vec::new(),
        json: false,
        compare: None,
        plot: None,
        rounds: 2,
    };
    for arg in &args {
        if arg == "--help" || arg == "-h" {
            return Ok(None);
        }
        if arg == "--version" {
            println!("chunkbench {}", env!("CARGO_PKG_VERSION"));
            return Ok(None);
        }
        if let Some(format) = arg.strip_prefix("--output-format=") {
            options.json = match format {
                "json" => true,
                "normal" => false,
                other => return Err(format!("--output-format: `{other}` is not normal or json")),
            };
        } else if let Some(pair) = arg.strip_prefix("--compare=") {
            let target = |name: &str| {
                TargetKind::parse(name).ok_or_else(|| {
                    format!("--compare: `{name}` is not raw, engine, cluster or nbd")
                })
            };
            // `A,B`, or just `B`: each job's own target (after --target) against B.
            options.compare = Some(match pair.split_once(',') {
                Some((a, b)) => (Some(target(a)?), target(b)?),
                None => (None, target(pair)?),
            });
        } else if let Some(file) = arg.strip_prefix("--plot=") {
            if !file.ends_with(".svg") {
                return Err(format!("--plot: `{file}` should name an .svg file"));
            }
            options.plot = Some(file.to_string());
        } else if let Some(rounds) = arg.strip_prefix("--rounds=") {
            options.rounds = rounds
                .parse()
                .ok()
                .filter(|r| (1..=100).contains(r))
                .ok_or_else(|| format!("--rounds: `{rounds}` is not a number from 1 to 100"))?;
        } else if let Some(pair) = arg.strip_prefix("--") {
            options.overrides.push(pair.to_string());
        } else if options.job_file.is_none() {
            options.job_file = Some(arg.clone());
        } else {
            return Err(format!("a second job file `{arg}`: give one"));
        }
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("chunkbench: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let text = match &options.job_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) => {
                eprintln!("chunkbench: cannot read {path}: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let jobs = match parse_jobs(text.as_deref(), &options.overrides) {
        Ok(jobs) => jobs,
        Err(error) => {
            let file = options.job_file.as_deref().unwrap_or("command line");
            eprintln!("chunkbench: {file}: {error}");
            return ExitCode::from(2);
        }
    };
    match run(&jobs, &options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("chunkbench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(jobs: &[Job], options: &Options) -> Result<(), String> {
    let mut json_jobs = Vec::new();
    let mut json_comparisons = Vec::new();
    let mut plotted = Vec::new();
    for job in jobs {
        match options.compare {
            None => {
                let stats = run_with_progress(job)?;
                plotted.push((job.clone(), stats.clone()));
                if options.json {
                    json_jobs.push(job_json(job, &stats));
                } else {
                    print!("{}", human_summary(job, &stats));
                }
            }
            Some((a, b)) => {
                let a = a.unwrap_or(job.target);
                let (job_a, stats_a, job_b, stats_b) = compare(job, a, b, options.rounds)?;
                let comparison = Comparison::new(&stats_a, &stats_b);
                plotted.push((job_a.clone(), stats_a.clone()));
                plotted.push((job_b.clone(), stats_b.clone()));
                if options.json {
                    json_comparisons.push(serde_json::json!({
                        "name": job.name,
                        "rounds": options.rounds,
                        "a": job_json(&job_a, &stats_a),
                        "b": job_json(&job_b, &stats_b),
                        "iops_ratio": comparison.iops_ratio,
                        "p50_ratio": comparison.p50_ratio,
                        "p99_ratio": comparison.p99_ratio,
                    }));
                } else {
                    print!("{}", human_summary(&job_a, &stats_a));
                    print!("{}", human_summary(&job_b, &stats_b));
                    println!(
                        "  {}: {} vs {} over {} rounds (A B A B ...): IOPS {} vs {} = {:.2}x, \
                         p50 latency {:.2}x, p99 latency {:.2}x",
                        job.name,
                        b,
                        a,
                        options.rounds,
                        human_count(stats_b.iops()),
                        human_count(stats_a.iops()),
                        comparison.iops_ratio,
                        comparison.p50_ratio,
                        comparison.p99_ratio
                    );
                }
            }
        }
    }
    if let Some(file) = &options.plot {
        std::fs::write(file, bench::plot::render(&plotted))
            .map_err(|e| format!("--plot: cannot write {file}: {e}"))?;
        eprintln!("chunkbench: plot written to {file}");
    }
    if options.json {
        let document = serde_json::json!({
            "chunkbench_version": env!("CARGO_PKG_VERSION"),
            "jobs": json_jobs,
            "comparisons": json_comparisons,
        });
        let text = serde_json::to_string_pretty(&document).map_err(|e| e.to_string())?;
        println!("{text}");
    }
    Ok(())
}

/// B relative to A: IOPS ratio, and latency ratios (above 1 means B is slower).
struct Comparison {
    iops_ratio: f64,
    p50_ratio: f64,
    p99_ratio: f64,
}

impl Comparison {
    fn new(a: &JobStats, b: &JobStats) -> Comparison {
        let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
        let percentile = |stats: &JobStats, p: f64| {
            let direction = if stats.write.ops >= stats.read.ops {
                &stats.write
            } else {
                &stats.read
            };
            direction.latency_ns.value_at_percentile(p) as f64
        };
        Comparison {
            iops_ratio: ratio(b.iops(), a.iops()),
            p50_ratio: ratio(percentile(b, 50.0), percentile(a, 50.0)),
            p99_ratio: ratio(percentile(b, 99.0), percentile(a, 99.0)),
        }
    }
}

/// Runs the job on `a` and `b` alternately, `rounds` times each, merging each side's rounds.
fn compare(
    job: &Job,
    a: TargetKind,
    b: TargetKind,
    rounds: u32,
) -> Result<(Job, JobStats, Job, JobStats), String> {
    let mut job_a = job.clone();
    job_a.target = a;
    let mut job_b = job.clone();
    job_b.target = b;
    let mut total_a = JobStats::default();
    let mut total_b = JobStats::default();
    for _ in 0..rounds {
        for (side, total) in [(&job_a, &mut total_a), (&job_b, &mut total_b)] {
            let stats = run_with_progress(side)?;
            let elapsed = total.elapsed + stats.elapsed;
            let (user, system) = (
                total.cpu_user + stats.cpu_user,
                total.cpu_system + stats.cpu_system,
            );
            total.merge(&stats);
            // Rounds run one after the other: their times add up.
            total.elapsed = elapsed;
            total.cpu_user = user;
            total.cpu_system = system;
        }
    }
    Ok((job_a, total_a, job_b, total_b))
}

/// Runs a job with a one-line progress report on stderr when stderr is a terminal.
fn run_with_progress(job: &Job) -> Result<JobStats, String> {
    let progress = Arc::new(Progress::default());
    let done = Arc::new(AtomicBool::new(false));
    let reporter = std::io::stderr().is_terminal().then(|| {
        let progress = Arc::clone(&progress);
        let done = Arc::clone(&done);
        let name = job.name.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut last_ops = 0;
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(PROGRESS_INTERVAL);
                let ops = progress.ops.load(Ordering::Relaxed);
                let bytes = progress.bytes.load(Ordering::Relaxed);
                eprint!(
                    "\r{name}: {} IOPS, {:.1} MiB done, {:.0}s   ",
                    human_count((ops - last_ops) as f64 / PROGRESS_INTERVAL.as_secs_f64()),
                    bytes as f64 / (1 << 20) as f64,
                    start.elapsed().as_secs_f64()
                );
                last_ops = ops;
            }
            eprint!("\r{:60}\r", "");
        })
    });
    let result = run_job(job, &progress).map_err(|e| e.to_string());
    done.store(true, Ordering::Release);
    if let Some(reporter) = reporter {
        drop(reporter.join());
    }
    result
}
