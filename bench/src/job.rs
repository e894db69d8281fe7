//! Job files in fio's syntax: an INI file with a `[global]` section and one section per job,
//! `key=value` lines (or a bare `key` for flags), `;` and `#` comments. The supported subset is
//! documented in docs/benchmarking.md; any other key is an error that names it, because a key
//! that is silently ignored makes a benchmark measure something else than its author thinks.

use std::fmt;
use std::time::Duration;

/// The I/O pattern of a job (fio's `rw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Random mixed reads and writes (`rwmixread` percent reads).
    RandRw,
    /// Sequential mixed reads and writes.
    Rw,
}

impl Pattern {
    fn parse(value: &str) -> Option<Pattern> {
        Some(match value {
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "randrw" => Pattern::RandRw,
            "rw" | "readwrite" => Pattern::Rw,
            _ => return None,
        })
    }

    /// Whether offsets are drawn at random.
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw
        )
    }

    /// Percentage of reads, given `rwmixread`.
    pub fn read_percent(self, rwmixread: u8) -> u8 {
        match self {
            Pattern::Read | Pattern::RandRead => 100,
            Pattern::Write | Pattern::RandWrite => 0,
            Pattern::RandRw | Pattern::Rw => rwmixread,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::RandRw => "randrw",
            Pattern::Rw => "rw",
        })
    }
}

/// What a job runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A file or block device through glommio's io_uring DMA path: the baseline.
    Raw,
    /// The storage engine in-process.
    Engine,
    /// A running cluster through the client library.
    Cluster,
    /// The same cluster with metrics collection off (`metrics.collect = false`): compared
    /// with `cluster`, what collecting metrics costs.
    ClusterNoMetrics,
    /// An NBD URI.
    Nbd,
}

impl TargetKind {
    /// Parses a target name.
    pub fn parse(value: &str) -> Option<TargetKind> {
        Some(match value {
            "raw" => TargetKind::Raw,
            "engine" => TargetKind::Engine,
            "cluster" => TargetKind::Cluster,
            "cluster-nometrics" => TargetKind::ClusterNoMetrics,
            "nbd" => TargetKind::Nbd,
            _ => return None,
        })
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetKind::Raw => "raw",
            TargetKind::Engine => "engine",
            TargetKind::Cluster => "cluster",
            TargetKind::ClusterNoMetrics => "cluster-nometrics",
            TargetKind::Nbd => "nbd",
        })
    }
}

/// One entry of `bssplit`: a block size and its share of the I/Os in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizeShare {
    /// Block size in bytes.
    pub size: u64,
    /// Share in percent.
    pub percent: u8,
}

/// A fully resolved job: the global section applied, then the job's own keys, then the
/// command-line overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Section name.
    pub name: String,
    /// `target`: what to run against.
    pub target: TargetKind,
    /// `filename`: file or device (raw), engine image (engine), volume (cluster), URI (nbd).
    pub filename: Option<String>,
    /// `rw`.
    pub pattern: Pattern,
    /// `rwmixread`: percent reads for mixed patterns.
    pub rwmixread: u8,
    /// `bs`, or the sizes of `bssplit`.
    pub block_sizes: Vec<BlockSizeShare>,
    /// `size`: the region the job touches.
    pub size: u64,
    /// `offset`: where the region starts.
    pub offset: u64,
    /// `iodepth`.
    pub iodepth: u32,
    /// `numjobs`: clones of the job, each with its own region share and seed.
    pub numjobs: u32,
    /// `runtime`: the bound on the measured phase.
    pub runtime: Option<Duration>,
    /// `time_based`: run for `runtime` even when `size` has been covered.
    pub time_based: bool,
    /// `ramp_time`: warm-up excluded from the figures.
    pub ramp_time: Duration,
    /// `direct`: O_DIRECT (the raw target only supports 1).
    pub direct: bool,
    /// `fsync`: sync after every N writes (0: never).
    pub fsync_every: u32,
    /// `fdatasync`: data sync after every N writes (0: never).
    pub fdatasync_every: u32,
    /// `verify=crc32c`: write checksummed blocks and check them on read.
    pub verify: bool,
    /// `norandommap`: random offsets may repeat before the region is covered.
    pub norandommap: bool,
    /// `randseed`.
    pub randseed: u64,
    /// `group_reporting`: one summary for all clones.
    pub group_reporting: bool,
    /// `rate_iops`: open loop at this many operations per second per clone (closed loop when
    /// unset: each worker issues as soon as its previous operation completes).
    pub rate_iops: Option<u64>,
}

impl Job {
    fn new(name: &str) -> Job {
        Job {
            name: name.to_string(),
            target: TargetKind::Raw,
            filename: None,
            pattern: Pattern::Read,
            rwmixread: 50,
            block_sizes: vec![BlockSizeShare {
                size: 4096,
                percent: 100,
            }],
            size: 0,
            offset: 0,
            iodepth: 1,
            numjobs: 1,
            runtime: None,
            time_based: false,
            ramp_time: Duration::ZERO,
            direct: true,
            fsync_every: 0,
            fdatasync_every: 0,
            verify: false,
            norandommap: false,
            randseed: 0x5eed,
            group_reporting: false,
            rate_iops: None,
        }
    }

    /// The largest block size of the job.
    pub fn max_block_size(&self) -> u64 {
        self.block_sizes
            .iter()
            .map(|b| b.size)
            .max()
            .unwrap_or(4096)
    }

    fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), String> {
        let need = || value.ok_or_else(|| format!("`{key}` needs a value"));
        match key {
            "target" => {
                let v = need()?;
                self.target = TargetKind::parse(v)
                    .ok_or_else(|| format!("`{v}` is not a target (raw, engine, cluster, nbd)"))?;
            }
            "filename" => self.filename = Some(need()?.to_string()),
            "rw" | "readwrite" => {
                let v = need()?;
                self.pattern = Pattern::parse(v).ok_or_else(|| {
                    format!("`{v}` is not a pattern (read, write, randread, randwrite, randrw, rw)")
                })?;
            }
            "rwmixread" => {
                let v = parse_int(need()?)?;
                if v > 100 {
                    return Err(format!("{v} is more than 100 percent"));
                }
                self.rwmixread = v as u8;
            }
            "rwmixwrite" => {
                let v = parse_int(need()?)?;
                if v > 100 {
                    return Err(format!("{v} is more than 100 percent"));
                }
                self.rwmixread = 100 - v as u8;
            }
            "bs" | "blocksize" => {
                let size = parse_size(need()?)?;
                check_block_size(size)?;
                self.block_sizes = vec![BlockSizeShare { size, percent: 100 }];
            }
            "bssplit" => self.block_sizes = parse_bssplit(need()?)?,
            "size" => self.size = parse_size(need()?)?,
            "offset" => self.offset = parse_size(need()?)?,
            "iodepth" => {
                let v = parse_int(need()?)?;
                if v == 0 || v > 4096 {
                    return Err(format!("{v} is not an I/O depth from 1 to 4096"));
                }
                self.iodepth = v as u32;
            }
            "numjobs" => {
                let v = parse_int(need()?)?;
                if v == 0 || v > 256 {
                    return Err(format!("{v} is not a job count from 1 to 256"));
                }
                self.numjobs = v as u32;
            }
            "runtime" => self.runtime = Some(parse_time(need()?)?),
            "ramp_time" => self.ramp_time = parse_time(need()?)?,
            "time_based" => self.time_based = parse_flag(value)?,
            "direct" => self.direct = parse_flag(value)?,
            "fsync" => self.fsync_every = parse_count(need()?)?,
            "fdatasync" => self.fdatasync_every = parse_count(need()?)?,
            "verify" => match need()? {
                "crc32c" => self.verify = true,
                "0" | "none" => self.verify = false,
                other => return Err(format!("verify `{other}` is not supported (crc32c)")),
            },
            "norandommap" => self.norandommap = parse_flag(value)?,
            "randseed" => self.randseed = parse_int(need()?)?,
            "group_reporting" => self.group_reporting = parse_flag(value)?,
            "rate_iops" => {
                let v = parse_int(need()?)?;
                if v == 0 || v > 10_000_000 {
                    return Err(format!(
                        "{v} is not a rate from 1 to 10000000 operations per second"
                    ));
                }
                self.rate_iops = Some(v);
            }
            other => return Err(format!("unknown or unsupported key `{other}`")),
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("`size` is required (the region the job touches)".into());
        }
        let block = self.max_block_size();
        if self.size < block * u64::from(self.numjobs) {
            return Err(format!(
                "`size` ({}) is smaller than one block ({block}) per job",
                self.size
            ));
        }
        if self.time_based && self.runtime.is_none() {
            return Err("`time_based` needs a `runtime`".into());
        }
        if self.target != TargetKind::Nbd && !self.direct {
            return Err("`direct=0` is not supported: every target does direct I/O".into());
        }
        if self.fsync_every > 0 && self.fdatasync_every > 0 {
            return Err("`fsync` and `fdatasync` together: choose one".into());
        }
        for share in &self.block_sizes {
            if self.offset % share.size.min(4096) != 0 {
                return Err(format!("`offset` ({}) is not block-aligned", self.offset));
            }
        }
        Ok(())
    }
}

/// A job file error: where, which key, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    /// Line number (1-based), or 0 for a command-line override or a whole-job check.
    pub line: usize,
    /// The section, when known.
    pub section: String,
    /// What is wrong (it names the key).
    pub message: String,
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.section.is_empty()) {
            (0, true) => write!(f, "{}", self.message),
            (0, false) => write!(f, "job [{}]: {}", self.section, self.message),
            (line, _) => write!(f, "line {line} [{}]: {}", self.section, self.message),
        }
    }
}

impl std::error::Error for JobError {}

/// Parses a job file and applies `overrides` (`key=value` strings, as given on the command
/// line without the leading `--`) to every job. With no job file, `overrides` alone describe
/// jobs: each `name=X` starts a new one, as fio's command line does.
pub fn parse_jobs(text: Option<&str>, overrides: &[String]) -> Result<Vec<Job>, JobError> {
    let mut global: Vec<Setting> = Vec::new();
    let mut sections: Vec<(String, Vec<Setting>)> = Vec::new();
    let mut current: Option<usize> = None;
    let mut in_global = false;

    for (number, raw) in text.unwrap_or("").lines().enumerate() {
        let line = number + 1;
        let content = raw.split(['#', ';']).next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if let Some(name) = content.strip_prefix('[') {
            let name = name.strip_suffix(']').ok_or_else(|| JobError {
                line,
                section: String::new(),
                message: format!("`{content}` is not a section header"),
            })?;
            if name == "global" {
                in_global = true;
                current = None;
            } else {
                in_global = false;
                sections.push((name.to_string(), Vec::new()));
                current = Some(sections.len() - 1);
            }
            continue;
        }
        let (key, value) = match content.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
            None => (content.to_string(), None),
        };
        if in_global {
            global.push((line, key, value));
        } else if let Some(index) = current {
            sections[index].1.push((line, key, value));
        } else {
            return Err(JobError {
                line,
                section: String::new(),
                message: format!("`{key}` appears before any section"),
            });
        }
    }

    let parsed_overrides: Vec<(String, Option<String>)> = overrides
        .iter()
        .map(|o| match o.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (o.clone(), None),
        })
        .collect();
    if text.is_none() {
        // fio's command line: options before the first --name are global, each --name starts
        // a job.
        let mut cli_global = Vec::new();
        for (key, value) in parsed_overrides {
            if key == "name" {
                let name = value.unwrap_or_else(|| format!("job{}", sections.len()));
                sections.push((name, Vec::new()));
            } else if let Some(last) = sections.last_mut() {
                last.1.push((0, key, value));
            } else {
                cli_global.push((0, key, value));
            }
        }
        global.extend(cli_global);
        return build(&global, &sections, &[]);
    }
    build(&global, &sections, &parsed_overrides)
}

/// One `key=value` line: its line number (0 for the command line), key and value.
type Setting = (usize, String, Option<String>);
type Settings = [Setting];

fn build(
    global: &Settings,
    sections: &[(String, Vec<Setting>)],
    overrides: &[(String, Option<String>)],
) -> Result<Vec<Job>, JobError> {
    if sections.is_empty() {
        return Err(JobError {
            line: 0,
            section: String::new(),
            message: "no job: add a [name] section, or --name=NAME on the command line".into(),
        });
    }
    let mut jobs = Vec::new();
    for (name, settings) in sections {
        let mut job = Job::new(name);
        for (line, key, value) in global.iter() {
            job.set(key, value.as_deref()).map_err(|message| JobError {
                line: *line,
                section: "global".into(),
                message: format!("{key}: {message}"),
            })?;
        }
        for (line, key, value) in settings {
            job.set(key, value.as_deref()).map_err(|message| JobError {
                line: *line,
                section: name.clone(),
                message: format!("{key}: {message}"),
            })?;
        }
        for (key, value) in overrides {
            job.set(key, value.as_deref()).map_err(|message| JobError {
                line: 0,
                section: String::new(),
                message: format!("--{key}: {message}"),
            })?;
        }
        job.check().map_err(|message| JobError {
            line: 0,
            section: name.clone(),
            message,
        })?;
        jobs.push(job);
    }
    Ok(jobs)
}

fn parse_int(value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a whole number"))
}

fn parse_count(value: &str) -> Result<u32, String> {
    u32::try_from(parse_int(value)?).map_err(|_| format!("`{value}` is too large"))
}

fn parse_flag(value: Option<&str>) -> Result<bool, String> {
    match value.map(str::trim) {
        None | Some("1") | Some("true") => Ok(true),
        Some("0") | Some("false") => Ok(false),
        Some(other) => Err(format!("`{other}` is not 0 or 1")),
    }
}

fn check_block_size(size: u64) -> Result<(), String> {
    if size < 512 || size % 512 != 0 || size > (64 << 20) {
        return Err(format!(
            "block size {size} is not a multiple of 512 from 512 B to 64 MiB"
        ));
    }
    Ok(())
}

/// Parses a size with fio's suffixes (base 1024): `4k`, `4KiB`, `1m`, `2g`, `512`.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let text = value.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{value}` is not a size"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("unknown size suffix in `{value}`")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{value}` is too large"))
}

/// Parses a time with fio's suffixes: seconds by default, or `us`, `ms`, `s`, `m`, `h`, `d`.
pub fn parse_time(value: &str) -> Result<Duration, String> {
    let text = value.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{value}` is not a time"))?;
    let micros_per_unit: u64 = match suffix.to_ascii_lowercase().as_str() {
        "us" | "usec" => 1,
        "ms" | "msec" => 1_000,
        "" | "s" | "sec" => 1_000_000,
        "m" | "min" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => return Err(format!("unknown time suffix in `{value}`")),
    };
    number
        .checked_mul(micros_per_unit)
        .map(Duration::from_micros)
        .ok_or_else(|| format!("`{value}` is too long"))
}

fn parse_bssplit(value: &str) -> Result<Vec<BlockSizeShare>, String> {
    let mut shares = Vec::new();
    for part in value.split(':').filter(|p| !p.is_empty()) {
        let (size, percent) = part
            .split_once('/')
            .ok_or_else(|| format!("`{part}` is not SIZE/PERCENT"))?;
        let size = parse_size(size)?;
        check_block_size(size)?;
        let percent = parse_int(percent)?;
        if percent > 100 {
            return Err(format!("`{part}`: more than 100 percent"));
        }
        shares.push(BlockSizeShare {
            size,
            percent: percent as u8,
        });
    }
    let total: u32 = shares.iter().map(|s| u32::from(s.percent)).sum();
    if shares.is_empty() || total != 100 {
        return Err(format!(
            "the shares of `{value}` add up to {total}, not 100"
        ));
    }
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "
; a comment
[global]
target=raw
filename=/tmp/x.img
size=64m
direct=1
runtime=5s
time_based
randseed=42

[write-qd32]
rw=randwrite
bs=4k
iodepth=32
fdatasync=1

[mixed]
rw=randrw   # trailing comment
rwmixread=70
bssplit=4k/50:64k/50
";

    #[test]
    fn global_settings_reach_every_job_and_job_keys_override_them() {
        let jobs = parse_jobs(Some(FILE), &[]).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].name, "write-qd32");
        assert_eq!(jobs[0].pattern, Pattern::RandWrite);
        assert_eq!(jobs[0].iodepth, 32);
        assert_eq!(jobs[0].size, 64 << 20);
        assert_eq!(jobs[0].runtime, Some(Duration::from_secs(5)));
        assert!(jobs[0].time_based);
        assert_eq!(jobs[0].fdatasync_every, 1);
        assert_eq!(jobs[1].rwmixread, 70);
        assert_eq!(jobs[1].block_sizes.len(), 2);
        assert_eq!(jobs[1].randseed, 42);
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it_and_its_line() {
        let error = parse_jobs(Some("[a]\nsize=1m\nioengine=libaio\n"), &[]).unwrap_err();
        assert_eq!(error.line, 3);
        assert!(error.to_string().contains("ioengine"), "{error}");
    }

    #[test]
    fn command_line_overrides_apply_to_every_job() {
        let jobs = parse_jobs(Some(FILE), &["iodepth=8".into(), "runtime=2".into()]).unwrap();
        assert!(jobs.iter().all(|j| j.iodepth == 8));
        assert!(jobs
            .iter()
            .all(|j| j.runtime == Some(Duration::from_secs(2))));
        let error = parse_jobs(Some(FILE), &["bogus=1".into()]).unwrap_err();
        assert!(error.to_string().contains("--bogus"), "{error}");
    }

    #[test]
    fn a_command_line_alone_describes_jobs_as_fio_does() {
        let args: Vec<String> = [
            "size=1m", "name=a", "rw=write", "name=b", "rw=read", "bs=8k",
        ]
        .map(String::from)
        .into();
        let jobs = parse_jobs(None, &args).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!((jobs[0].pattern, jobs[0].size), (Pattern::Write, 1 << 20));
        assert_eq!(
            (jobs[1].pattern, jobs[1].max_block_size()),
            (Pattern::Read, 8192)
        );
    }

    #[test]
    fn suffixes_follow_fio() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("4x").is_err());
        assert_eq!(parse_time("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_time("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_time("2m").unwrap(), Duration::from_secs(120));
    }

    #[test]
    fn inconsistent_jobs_are_refused() {
        assert!(parse_jobs(Some("[a]\nrw=read\n"), &[]).is_err(), "no size");
        assert!(
            parse_jobs(Some("[a]\nsize=1m\ntime_based\n"), &[]).is_err(),
            "no runtime"
        );
        assert!(parse_jobs(Some("[a]\nsize=1m\nbssplit=4k/50:8k/40\n"), &[]).is_err());
        assert!(parse_jobs(Some("[a]\nsize=1m\nbs=1000\n"), &[]).is_err());
        assert!(parse_jobs(Some("[a]\nsize=1m\nrwmixread=101\n"), &[]).is_err());
        assert!(parse_jobs(Some("[a]\nsize=1m\ndirect=0\n"), &[]).is_err());
        assert!(
            parse_jobs(Some("size=1m\n"), &[]).is_err(),
            "key outside a section"
        );
    }
}
