//! The job-file parser against a table of fio job files: those in the supported subset parse
//! to what they say, the others fail with an error that names the offending key.

use std::path::Path;

use bench::job::{parse_jobs, Pattern};

fn load(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/jobs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn supported_job_files_parse_to_what_they_say() {
    // (file, jobs, first job's pattern, first job's size, iodepth, numjobs)
    let table: [(&str, usize, Pattern, u64, u32, u32); 6] = [
        ("ok-randwrite.fio", 1, Pattern::RandWrite, 64 << 20, 16, 2),
        ("ok-mixed.fio", 1, Pattern::RandRw, 128 << 20, 32, 1),
        ("ok-seq.fio", 2, Pattern::Write, 256 << 20, 4, 1),
        ("ok-verify.fio", 1, Pattern::RandWrite, 16 << 20, 1, 1),
        ("ok-durable.fio", 1, Pattern::RandWrite, 32 << 20, 1, 1),
        ("ok-times.fio", 1, Pattern::RandRead, 1 << 30, 1, 1),
    ];
    for (file, count, pattern, size, iodepth, numjobs) in table {
        let jobs = parse_jobs(Some(&load(file)), &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(jobs.len(), count, "{file}");
        let job = &jobs[0];
        assert_eq!(
            (job.pattern, job.size, job.iodepth, job.numjobs),
            (pattern, size, iodepth, numjobs),
            "{file}"
        );
    }
    let mixed = parse_jobs(Some(&load("ok-mixed.fio")), &[]).unwrap();
    assert_eq!(mixed[0].block_sizes.len(), 3);
    assert_eq!(mixed[0].rwmixread, 70);
    let seq = parse_jobs(Some(&load("ok-seq.fio")), &[]).unwrap();
    assert_eq!(
        (seq[0].fdatasync_every, seq[1].max_block_size()),
        (8, 1 << 20)
    );
    let verify = parse_jobs(Some(&load("ok-verify.fio")), &[]).unwrap();
    assert!(verify[0].verify && verify[0].norandommap);
    let durable = parse_jobs(Some(&load("ok-durable.fio")), &[]).unwrap();
    assert_eq!((durable[0].fsync_every, durable[0].offset), (1, 1 << 20));
    let times = parse_jobs(Some(&load("ok-times.fio")), &[]).unwrap();
    assert_eq!(
        times[0].runtime,
        Some(std::time::Duration::from_secs(90)),
        "the job's own runtime wins"
    );
}

#[test]
fn unsupported_job_files_fail_naming_the_key() {
    let table = [
        ("bad-ioengine.fio", "ioengine"),
        ("bad-rw.fio", "rw"),
        ("bad-bssplit.fio", "bssplit"),
        ("bad-direct.fio", "direct"),
        ("bad-no-size.fio", "size"),
        ("bad-time-based.fio", "time_based"),
        ("bad-both-syncs.fio", "fdatasync"),
    ];
    for (file, key) in table {
        let error = parse_jobs(Some(&load(file)), &[])
            .expect_err(file)
            .to_string();
        assert!(
            error.contains(key),
            "{file}: `{error}` does not name `{key}`"
        );
    }
}
