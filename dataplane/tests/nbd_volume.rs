//! A three-replica volume served over NBD: qemu-io writes and reads a pattern, qemu-img
//! converts an image onto it, and fio's nbd engine verifies what it wrote — every byte going
//! through raft on three in-process chunkservers on loopback.

mod common;

use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use common::{addresses, config, free_ports, run, tool, Node};
use dataplane::client::{Client, ClientConfig};
use dataplane::ids::CopysetId;
use dataplane::nbd::{bind, serve, Exports, NbdConfig};
use dataplane::shard::ShutdownSignal;
use dataplane::volume::{Volume, VolumeSpec};
use glommio::{LocalExecutorBuilder, Placement};

struct Export {
    addr: std::net::SocketAddr,
    shutdown: ShutdownSignal,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

impl Drop for Export {
    fn drop(&mut self) {
        self.shutdown.raise();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Creates the volume's copyset on the three nodes and serves the volume as export `vol`.
fn export_volume(ports: &[u16], size: u64) -> Export {
    let addresses = addresses(ports);
    let shutdown = ShutdownSignal::new();
    let stop = shutdown.clone();
    let (tx, rx) = mpsc::channel();
    let thread = LocalExecutorBuilder::new(Placement::Unbound)
        .name("nbd-volume")
        .spawn(move || async move {
            let config = ClientConfig {
                deadline: Duration::from_secs(30),
                ..ClientConfig::default()
            };
            let client = Rc::new(Client::new(&addresses, config));
            let copyset = CopysetId(21);
            client
                .create_copyset(copyset, &[1, 2, 3])
                .await
                .expect("create copyset");
            // The volume is made in the volume table (the metadata copyset) and opened from it.
            dataplane::volume::ensure_metadata_copyset(&client, &[1, 2, 3])
                .await
                .expect("metadata copyset");
            let record = dataplane::volume::create_volume(&client, "vol", size, copyset)
                .await
                .expect("create volume");
            let spec = VolumeSpec::from(record);
            assert_eq!(spec.chunk_size, 1 << 20);
            let mut exports = Exports::new();
            exports.insert("vol", Rc::new(Volume::new(spec, client)));
            let listener = bind("127.0.0.1:0".parse().expect("address")).expect("bind");
            tx.send(listener.local_addr().expect("address"))
                .expect("report address");
            serve(listener, Rc::new(exports), NbdConfig::default(), stop)
                .await
                .expect("serve");
        })
        .expect("executor");
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("export is up");
    Export {
        addr,
        shutdown,
        thread: Some(thread),
    }
}

#[test]
fn qemu_and_fio_use_a_three_replica_volume_over_nbd() {
    if !tool("qemu-io") || !tool("fio") {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "mem")))
        .collect();
    let export = export_volume(&ports, 16 << 20);
    let uri = format!("nbd://{}/vol", export.addr);

    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Across a chunk boundary (chunks are 1 MiB), and not page-aligned.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x5a 1047552 3000",
            "-c",
            "read -P 0x5a 1047552 3000",
            "-c",
            "read -P 0xab 0 1047552",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let out = run(
        "fio",
        &[
            "--name=nbd-volume",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=4m",
            "--offset=8m",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--randrepeat=1",
        ],
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "{out}");

    drop(export);
    for node in &mut nodes {
        node.stop();
    }
}
