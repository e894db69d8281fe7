//! Issue 25, item 7: a client that pipelines reads and never collects the answers must not
//! grow the server's memory without bound. Alone in its test binary, so that the process's
//! resident memory is the servers' (three chunkservers in this process) and this test's.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{config, free_ports, with_client, Node};
use dataplane::ids::{ChunkId, CopysetId};
use dataplane::net::{Frame, FrameFlags};
use dataplane::protocol::{ReadChunk, READ_CHUNK};

const COPYSET: CopysetId = CopysetId(7);
/// The test cluster's chunk size: each read asks for a whole chunk.
const READ_BYTES: u32 = 1 << 20;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[test]
fn pipelined_reads_whose_answers_are_never_read_keep_the_server_memory_bounded() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let metrics_port = free_ports(1)[0];
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut config = config(id, &ports, dir.path(), "mem");
            if id == 1 {
                config.metrics.address = Some(([127, 0, 0, 1], metrics_port).into());
            }
            Node::start(config)
        })
        .collect();
    let chunk = bytes::Bytes::from(vec![0x5a; READ_BYTES as usize]);
    let written = chunk.clone();
    with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            client
                .write(COPYSET, ChunkId(5), 0, written, 1)
                .await
                .expect("write");
            common::lead_from(&client, COPYSET, 1).await;
        })
    });
    let before = resident_bytes();
    // 3,000 reads of 1 MiB (about 3 GiB of answers), written as fast as the server takes
    // them; the answers are never read. The writes stop once the server stops reading.
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", ports[1])).expect("connect to node 1");
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    let request = ReadChunk {
        chunk: ChunkId(5),
        offset: 0,
        len: READ_BYTES,
    }
    .encode();
    let began = Instant::now();
    let mut sent = 0u64;
    for id in 1..=3000u64 {
        let frame = Frame::new(READ_CHUNK, FrameFlags(0), id, COPYSET.0, request.clone());
        let mut bytes = frame.header.encode().to_vec();
        bytes.extend_from_slice(&frame.payload);
        if stream.write_all(&bytes).is_err() || began.elapsed() > Duration::from_secs(20) {
            break;
        }
        sent += 1;
    }
    std::thread::sleep(Duration::from_secs(2));
    // Requests in service on node 1: bounded by the connection's budget (64 MiB of answers:
    // 64 reads of 1 MiB), not by what the client sent.
    let metrics = common::http_get(metrics_port, "/metrics");
    let in_flight: f64 = metrics
        .lines()
        .find(|l| l.starts_with("chunkserver_requests_in_flight"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    assert!(
        in_flight <= 80.0,
        "{sent} pipelined reads sent, {in_flight} in service at once"
    );
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 600 << 20,
        "{sent} pipelined reads grew the process by {} MiB",
        grown >> 20
    );
    drop(stream);
    // The node still serves.
    with_client(&ports, |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 3]);
            let data = client
                .read(COPYSET, ChunkId(5), 0, 4096)
                .await
                .expect("read after the flood");
            assert_eq!(data, chunk.slice(..4096));
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}
