//! The raw target end to end: jobs run on a real file through io_uring, and `verify=crc32c`
//! notices a block corrupted behind the job's back.

use std::sync::Arc;

use bench::job::parse_jobs;
use bench::runner::{run_job, Progress};

fn run(text: &str) -> bench::report::JobStats {
    let jobs = parse_jobs(Some(text), &[]).expect("job file");
    let mut last = None;
    for job in &jobs {
        last = Some(run_job(job, &Arc::new(Progress::default())).expect("job runs"));
    }
    last.expect("at least one job")
}

#[test]
fn a_written_region_reads_back_verified_and_a_corrupt_block_is_caught() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("raw.img");
    let header = format!(
        "[global]\nfilename={}\nsize=1m\nbs=4k\nverify=crc32c\n",
        file.display()
    );

    let written = run(&format!("{header}[fill]\nrw=write\niodepth=4\n"));
    assert_eq!(
        written.write.ops, 256,
        "one pass over 1 MiB of 4 KiB blocks"
    );
    assert_eq!(written.errors, 0);

    let read = run(&format!("{header}[check]\nrw=randread\niodepth=8\n"));
    assert_eq!(read.read.ops, 256);
    assert_eq!(read.verify_failures, 0);

    // Flip one byte inside the block at 64 KiB, as a misbehaving device would.
    let mut bytes = std::fs::read(&file).expect("read the image");
    bytes[65536 + 100] ^= 0xff;
    std::fs::write(&file, &bytes).expect("write the image");
    let read = run(&format!("{header}[check]\nrw=randread\niodepth=8\n"));
    assert_eq!(read.verify_failures, 1);
}

#[test]
fn a_durable_write_job_syncs_as_often_as_asked() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("raw.img");
    let stats = run(&format!(
        "[w]\nfilename={}\nsize=512k\nbs=4k\nrw=randwrite\nfdatasync=8\n",
        file.display()
    ));
    assert_eq!(stats.write.ops, 128);
    assert_eq!(stats.sync.ops, 16);
}

#[test]
fn a_job_without_a_filename_fails_with_a_clear_error() {
    let jobs = parse_jobs(Some("[w]\nsize=1m\n"), &[]).expect("job file");
    let error = run_job(&jobs[0], &Arc::new(Progress::default())).expect_err("no filename");
    assert!(error.to_string().contains("filename"), "{error}");
}

#[test]
fn every_standard_profile_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("bench/profiles") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("profile");
        let jobs =
            parse_jobs(Some(&text), &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!jobs.is_empty());
        count += 1;
    }
    assert!(count >= 6, "the standard profiles are there");
}

#[test]
fn an_open_loop_job_never_runs_ahead_of_its_schedule() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("raw.img");
    let stats = run(&format!(
        "[open]\nfilename={}\nsize=4m\nbs=4k\nrw=randread\niodepth=8\nruntime=1s\ntime_based\n\
         rate_iops=500\n",
        file.display()
    ));
    // 500 per second for one second: the schedule allows at most 500 (+1 for the slot at 0).
    assert!(stats.read.ops <= 501, "{} operations", stats.read.ops);
    assert!(stats.read.ops > 0);
    assert_eq!(stats.errors, 0);
}
