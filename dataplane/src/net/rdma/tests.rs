//! The RDMA transport over softverbs: small rings, large payloads, vanishing peers.

use super::*;
use std::time::Duration;

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::config::{Endpoint, Transport};
use crate::net::context::NetContext;
use crate::net::verbs::soft::SoftVerbs;
use crate::net::verbs::{
    MemoryRegion, QpCaps, QueuePair, RemoteAccess, RemoteAddress, SendOp, SendRequest, Verbs,
};
use crate::net::NetError;
use crate::protocol::frame::Frame;

use crate::net::transport::{connect as connect_endpoint, Listener};
use crate::net::{
    message_suite::context,
    test_kit::{listen_addr, run_case},
};
use crate::net::{Message, Opcode};
use bytes::Bytes;

fn small_rings() -> NetContext {
    let mut context = context();
    context.rdma.recv_ring_depth = 4;
    context.rdma.landing_slots = 1;
    context
}

/// With a ring of 4 and one landing slot, hundreds of messages of every size go through:
/// credits and slots run out again and again and come back.
#[test]
fn credits_and_slots_run_out_and_come_back() {
    run_case(Duration::from_secs(60), || async {
        let context = small_rings();
        let (endpoint, sequence) =
            crate::net::message_suite::start_echo_server(Transport::SoftRdma, &context).await;
        let connection = connect_endpoint(&endpoint, &context)
            .await
            .expect("connect");
        let calls: Vec<_> = (0..300u64)
            .map(|i| {
                let connection = connection.clone();
                glommio::spawn_local(async move {
                    let len = [10usize, 5000, 100_000][i as usize % 3];
                    let payload = Bytes::from(vec![(i % 251) as u8; len]);
                    let response = connection
                        .call(Message::new(Opcode::PING, i, payload.clone()))
                        .await
                        .expect("echo");
                    assert_eq!(response.payload, payload);
                })
            })
            .collect();
        for call in calls {
            call.await;
        }
        assert!(sequence.borrow().is_empty());
    });
}

#[test]
fn a_hello_with_a_bad_magic_is_refused_and_the_listener_keeps_serving() {
    run_case(Duration::from_secs(30), || async {
        let context = context();
        let (endpoint, _) =
            crate::net::message_suite::start_echo_server(Transport::SoftRdma, &context).await;
        let mut raw = TcpStream::connect(endpoint.addr)
            .await
            .expect("raw connect");
        raw.write_all(&[0x55; HELLO_LEN]).await.expect("write");
        let mut rest = Vec::new();
        let _ = raw.read_to_end(&mut rest).await;
        let connection = connect_endpoint(&endpoint, &context)
            .await
            .expect("connect");
        let response = connection
            .call(Message::new(Opcode::PING, 0, Bytes::from_static(b"after")))
            .await
            .expect("echo");
        assert_eq!(&response.payload[..], b"after");
    });
}

/// Peers that open the out-of-band connection and then say nothing hold no other peer back:
/// set-ups run side by side, so a well-behaved client connects at once while they sit there
/// (with set-ups one after the other it waited out every silent peer's timeout first).
#[test]
fn silent_peers_do_not_hold_back_other_connections() {
    run_case(Duration::from_secs(30), || async {
        let mut context = context();
        context.connection.connect_timeout = Duration::from_secs(4);
        let (endpoint, _) =
            crate::net::message_suite::start_echo_server(Transport::SoftRdma, &context).await;
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(
                TcpStream::connect(endpoint.addr)
                    .await
                    .expect("raw connect"),
            );
        }
        // Let the listener take the silent ones first.
        glommio::timer::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let connection = connect_endpoint(&endpoint, &context)
            .await
            .expect("connect past the silent peers");
        let response = connection
            .call(Message::new(Opcode::PING, 0, Bytes::from_static(b"hi")))
            .await
            .expect("echo");
        assert_eq!(&response.payload[..], b"hi");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "connecting took {:?} behind 3 silent peers",
            started.elapsed()
        );
        drop(silent);
    });
}

/// A hand-made peer for the listener's first connection: a real softverbs queue pair that
/// completes set-up advertising `landing`, whatever that is.
struct HandMadePeer {
    device: SoftVerbs,
    qp: super::super::verbs::soft::SoftQp,
    _cq: super::super::verbs::soft::SoftCq,
    _ring: super::super::verbs::soft::SoftRegion,
    _stream: TcpStream,
}

async fn hand_made_peer(listener: Listener, landing: RemoteAddress) -> HandMadePeer {
    let Listener::Rdma(listener) = listener else {
        panic!("softrdma gives an RDMA listener")
    };
    let mut stream = listener.listener.accept().await.expect("accept");
    let device = SoftVerbs::open(listen_addr().ip()).expect("device");
    let cq = device.create_cq(64).expect("cq");
    let qp = device.create_qp(&cq, QpCaps::default()).expect("qp");
    qp.to_init().expect("init");
    let ring = device.register(8 * 8192, RemoteAccess::None).expect("ring");
    for i in 0..8 {
        qp.post_recv(i as u64, &ring, i * 8192, 8192).expect("recv");
    }
    let hello = Hello {
        endpoint: qp.endpoint(),
        recv_ring_depth: 8,
        recv_buffer_size: 8192,
        landing_slots: 1,
        landing_slot_size: 4 << 20,
        landing,
    };
    stream.write_all(&hello.encode()).await.expect("hello");
    let mut theirs = [0u8; HELLO_LEN];
    stream.read_exact(&mut theirs).await.expect("their hello");
    let theirs = Hello::decode(&theirs).expect("decode");
    qp.to_ready_to_receive(&theirs.endpoint).expect("rtr");
    qp.to_ready_to_send().expect("rts");
    stream.write_all(b"R").await.expect("ready");
    let mut ready = [0u8; 1];
    stream.read_exact(&mut ready).await.expect("ready");
    HandMadePeer {
        device,
        qp,
        _cq: cq,
        _ring: ring,
        _stream: stream,
    }
}

async fn bound_listener(context: &NetContext) -> (Listener, Endpoint) {
    let listener = Listener::bind(
        &Endpoint {
            transport: Transport::SoftRdma,
            addr: listen_addr(),
        },
        context,
    )
    .await
    .expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    (listener, endpoint)
}

/// A peer whose landing-slot rkey is wrong: the first large payload fails with a remote
/// access error, the connection closes, and the calls on it fail rather than hang.
#[test]
fn a_bad_rkey_from_the_peer_closes_the_connection() {
    run_case(Duration::from_secs(30), || async {
        let context = context();
        let (listener, endpoint) = bound_listener(&context).await;
        let bad_landing = RemoteAddress {
            addr: 0x1234_0000,
            rkey: 0xBAD,
        };
        let (peer, connection) = future::zip(
            hand_made_peer(listener, bad_landing),
            connect_endpoint(&endpoint, &context),
        )
        .await;
        let connection = connection.expect("connect");
        let large = Bytes::from(vec![1u8; 100_000]);
        let result = connection.call(Message::new(Opcode::PING, 0, large)).await;
        match result {
            Err(NetError::Io { reason, .. }) => {
                assert!(reason.contains("RemoteAccessError"), "{reason}")
            }
            other => panic!("expected a remote access error, got {other:?}"),
        }
        assert!(connection.is_closed());
        drop(peer);
    });
}

/// A peer that sends a corrupt frame (and one that breaks the credit rules) gets its
/// connection closed with the reason, and the calls waiting on it fail.
#[test]
fn a_malformed_message_closes_the_connection() {
    type Corrupt = fn(&mut Vec<u8>);
    let cases: [(&str, Corrupt); 4] = [
        ("header checksum", |m| m[PREFIX_LEN + 10] ^= 1),
        ("payload checksum", |m| {
            let last = m.len() - 1;
            m[last] ^= 1
        }),
        ("credits beyond the ring", |m| {
            m[2..4].copy_from_slice(&1000u16.to_le_bytes())
        }),
        ("unknown kind", |m| m[0] = 9),
    ];
    for (name, corrupt) in cases {
        run_case(Duration::from_secs(30), move || async move {
            let context = context();
            let (listener, endpoint) = bound_listener(&context).await;
            let landing = RemoteAddress { addr: 0, rkey: 0 };
            let (peer, connection) = future::zip(
                hand_made_peer(listener, landing),
                connect_endpoint(&endpoint, &context),
            )
            .await;
            let connection = connection.expect("connect");
            let waiting = {
                let connection = connection.clone();
                glommio::spawn_local(async move {
                    connection
                        .call(Message::new(Opcode::PING, 0, Bytes::from_static(b"q")))
                        .await
                })
            };
            let frame = Frame::new(
                Opcode::PING,
                crate::protocol::frame::FrameFlags::ONE_WAY,
                0,
                0,
                Bytes::from_static(b"payload"),
            );
            let mut message = vec![KIND_INLINE, 0, 0, 0, 0, 0, 0, 0];
            frame.encode_into(&mut message);
            corrupt(&mut message);
            let region = peer
                .device
                .register(message.len(), RemoteAccess::None)
                .expect("register");
            region.write_at(0, &message).expect("fill");
            peer.qp
                .post_send(SendRequest {
                    wr_id: 1,
                    op: SendOp::Send,
                    region: &region,
                    offset: 0,
                    len: message.len(),
                    signaled: true,
                })
                .expect("post");
            let result = waiting.await;
            assert!(result.is_err(), "{name}: the call survived: {result:?}");
            assert!(connection.is_closed(), "{name}: connection still open");
            let reason = connection.closed_reason().map(|r| r.to_string());
            assert!(
                matches!(
                    connection.closed_reason(),
                    Some(NetError::Frame(_)) | Some(NetError::Protocol { .. })
                ),
                "{name}: closed for {reason:?}"
            );
            drop(peer);
        });
    }
}
