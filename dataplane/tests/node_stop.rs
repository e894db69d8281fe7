//! A node that stops leaves nothing open behind it, as a process that exits would: its ports
//! refuse connections, and a connection a peer made while it was stopping is closed rather
//! than left established and unread. A peer that kept such a connection would send its raft
//! messages into it for good, and never dial the node again once it restarts.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, free_ports, with_client, Node};
use dataplane::ids::{ChunkId, CopysetId};
use dataplane::protocol::{Frame, FrameFlags, ReadChunk, READ_CHUNK};

#[test]
fn a_stopped_node_closes_every_connection_including_those_made_while_it_stopped() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    for round in 0..3 {
        let mut node = Node::start(config(1, &ports, dir.path(), "uring"));
        let addr = listening_on(ports[0]);
        // A peer dials the port over and over while the node stops.
        let stopping = Arc::new(AtomicBool::new(false));
        let dialler = {
            let stopping = Arc::clone(&stopping);
            std::thread::spawn(move || {
                let mut made = Vec::new();
                let began = Instant::now();
                while !stopping.load(Ordering::Relaxed) && began.elapsed() < Duration::from_secs(30)
                {
                    if let Ok(stream) = TcpStream::connect(addr) {
                        made.push(stream);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                made
            })
        };
        std::thread::sleep(Duration::from_millis(50 + 30 * round));
        node.stop();
        stopping.store(true, Ordering::Relaxed);
        let made = dialler.join().expect("dialler");
        assert!(!made.is_empty(), "round {round}: no connection was made");
        assert!(
            TcpStream::connect(addr).is_err(),
            "round {round}: the stopped node's peer port still takes connections"
        );
        // Every connection made, even in the last moments, is closed by the node's side: a
        // read ends (end of stream or reset), and writes then fail — a socket the node only
        // half-closed and left open would take them without end, as it took a peer's raft
        // messages.
        for (i, mut stream) in made.into_iter().enumerate() {
            assert!(
                read_ends(&mut stream),
                "round {round}: connection {i} is still open after the node stopped"
            );
            assert!(
                writes_fail(&mut stream),
                "round {round}: connection {i} still takes writes after the node stopped"
            );
        }
    }
}

/// A second node started on the ports of a running one fails at once, saying the address is
/// in use, instead of sharing them: the kernel would otherwise hand it a share of the first
/// node's peers' and clients' connections. The first node serves on, unaffected.
#[test]
fn a_second_node_on_the_same_ports_fails_to_start() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let other = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut node = Node::start(config(1, &ports, dir.path(), "uring"));
    listening_on(ports[0]);
    let second = config(1, &ports, other.path(), "uring");
    let shutdown = dataplane::shard::ShutdownSignal::new();
    let signal = shutdown.clone();
    let started = std::thread::spawn(move || {
        dataplane::server::run_node(&second, &[0], &signal).map_err(|e| e.to_string())
    });
    let began = Instant::now();
    while !started.is_finished() && began.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    shutdown.raise();
    let outcome = started.join().expect("second node thread");
    let error = outcome.expect_err("a second node on the same ports must not start");
    assert!(
        error.contains("in use"),
        "the error names the taken address: {error}"
    );
    with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(CopysetId(3), &[1])
                .await
                .expect("the first node still serves");
        })
    });
    node.stop();
}

/// A client that asks for far more than it reads leaves the node's answers queued behind a
/// full socket; a graceful close would wait on it for the whole I/O timeout. The stopping node
/// waits a moment, then aborts the connection: the stop is prompt and the socket is gone.
#[test]
fn a_peer_that_does_not_read_does_not_hold_a_stopping_node() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut node = Node::start(config(1, &ports, dir.path(), "uring"));
    const COPYSET: CopysetId = CopysetId(9);
    with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1])
                .await
                .expect("create a one-replica copyset");
            client.set_peers(COPYSET, &[1]);
            let data = bytes::Bytes::from(vec![7u8; 1 << 20]);
            client
                .write(COPYSET, ChunkId(1), 0, data, 1)
                .await
                .expect("write a chunk");
        })
    });
    let mut stream =
        TcpStream::connect(("127.0.0.1", ports[1])).expect("connect to the client port");
    // 32 MiB of answers asked for, none read.
    let mut requests = Vec::new();
    for id in 1..=32u64 {
        let read = ReadChunk {
            chunk: ChunkId(1),
            offset: 0,
            len: 1 << 20,
        };
        Frame::new(
            READ_CHUNK,
            FrameFlags::default(),
            id,
            COPYSET.0,
            read.encode(),
        )
        .encode_into(&mut requests);
    }
    stream.write_all(&requests).expect("send the reads");
    std::thread::sleep(Duration::from_millis(500));
    let began = Instant::now();
    node.stop();
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the node took {took:?} to stop behind a client that does not read"
    );
    assert!(read_ends(&mut stream), "the connection is still open");
    assert!(
        writes_fail(&mut stream),
        "the connection still takes writes"
    );
}

/// Waits until a node takes connections on loopback `port` (at most 20 s); its address.
fn listening_on(port: u16) -> std::net::SocketAddr {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let began = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "node never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

/// Whether reading `stream` ends (end of stream or an error other than a timeout) within 2 s.
fn read_ends(stream: &mut TcpStream) -> bool {
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
    {
        return false;
    }
    let mut bytes = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut bytes) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

/// Whether writing to `stream` fails within 2 s: the first write after the other end closed
/// draws a reset, the ones after it fail.
fn writes_fail(stream: &mut TcpStream) -> bool {
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(2) {
        if stream.write_all(&[0u8; 32]).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
