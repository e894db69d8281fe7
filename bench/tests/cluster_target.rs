//! The cluster target end to end: three in-process chunkservers, the job's region written once,
//! then a verified write pass and a verified random-read pass through the cluster.

use std::sync::Arc;

use bench::job::parse_jobs;
use bench::runner::{run_job, Progress};

#[test]
fn a_job_runs_against_a_three_replica_cluster_and_verifies() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let base = dir.path().join("bench.img");
    let text = format!(
        "[global]\ntarget=cluster\nfilename={}\nsize=2m\nbs=4k\nverify=crc32c\n\
         [fill]\nrw=write\niodepth=4\n[check]\nrw=randread\niodepth=8\n",
        base.display()
    );
    let jobs = parse_jobs(Some(&text), &[]).expect("job file");
    let written = run_job(&jobs[0], &Arc::new(Progress::default())).expect("write job");
    assert_eq!(written.write.ops, 512);
    assert_eq!(written.errors, 0);
    // Each job starts its own cluster: the second one reads what the layout wrote (no verify
    // header there) and checks nothing is corrupt.
    let read = run_job(&jobs[1], &Arc::new(Progress::default())).expect("read job");
    assert_eq!(read.read.ops, 512);
    assert_eq!(read.verify_failures, 0);
    assert!(
        !dir.path().join("bench.img.cluster").exists(),
        "the run cleans up its files"
    );
}

#[test]
fn a_job_runs_against_the_storage_engine_one_shard_per_clone_and_verifies() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let base = dir.path().join("bench.img");
    let text = format!(
        "[global]\ntarget=engine\nfilename={}\nsize=4m\nbs=4k\nverify=crc32c\nnumjobs=2\n\
         [fill]\nrw=write\niodepth=4\n",
        base.display()
    );
    let jobs = parse_jobs(Some(&text), &[]).expect("job file");
    let written = run_job(&jobs[0], &Arc::new(Progress::default())).expect("write job");
    assert_eq!(
        written.write.ops, 1024,
        "two clones, 2 MiB each, of 4 KiB blocks"
    );
    assert_eq!(written.errors, 0);
    assert!(
        !dir.path().join("bench.img.engine").exists(),
        "the run removes its device file"
    );
}
