//! Each target end to end on small sizes with verify on: the cluster (three in-process
//! chunkservers), the engine (one shard per clone) and an NBD export.

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
         [fill]\nrw=write\niodepth=4\n[mixed]\nrw=randrw\niodepth=8\n",
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

#[test]
fn a_job_runs_against_an_nbd_export_and_verifies() {
    use std::rc::Rc;

    use dataplane::nbd::{bind, serve, Exports, MemExport, NbdConfig};
    use dataplane::shard::ShutdownSignal;

    let shutdown = ShutdownSignal::new();
    let stop = shutdown.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let listener = bind("127.0.0.1:0".parse().expect("address")).expect("bind");
            tx.send(listener.local_addr().expect("address"))
                .expect("report");
            let mut exports = Exports::new();
            exports.insert("bench", Rc::new(MemExport::new(8 << 20, false)));
            serve(listener, Rc::new(exports), NbdConfig::default(), stop)
                .await
                .expect("serve");
        })
        .expect("server");
    let addr = rx.recv().expect("server address");
    let text = format!(
        "[global]\ntarget=nbd\nfilename=nbd://{addr}/bench\nsize=2m\nbs=4k\nverify=crc32c\n\
         [fill]\nrw=write\niodepth=8\nfdatasync=16\n[check]\nrw=randread\niodepth=8\n"
    );
    let jobs = parse_jobs(Some(&text), &[]).expect("job file");
    let written = run_job(&jobs[0], &Arc::new(Progress::default())).expect("write job");
    assert_eq!(
        (written.write.ops, written.sync.ops, written.errors),
        (512, 32, 0)
    );
    let read = run_job(&jobs[1], &Arc::new(Progress::default())).expect("read job");
    assert_eq!(
        (read.read.ops, read.verify_failures, read.errors),
        (512, 0, 0)
    );
    let too_big = format!("[j]\ntarget=nbd\nfilename=nbd://{addr}/bench\nsize=16m\n");
    let job = parse_jobs(Some(&too_big), &[]).expect("job file").remove(0);
    let error = run_job(&job, &Arc::new(Progress::default())).expect_err("export too small");
    assert!(error.to_string().contains("the export holds"), "{error}");
    shutdown.raise();
    server.join().expect("server stops");
}
