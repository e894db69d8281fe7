//! The message-level test suite every transport must pass, run once per transport: TCP and
//! `softrdma` always, real verbs with feature `rdma` (scripts/rdma-tests runs it inside a
//! Soft-RoCE guest). Each case runs on its own glommio executor under a time bound.

use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::future;

use super::connection::{Connection, Message};
use super::context::NetContext;
use super::test_kit::{listen_addr, run_case};
use super::transport::{connect, Listener};
#[cfg(feature = "rdma")]
use super::verbs::rdma_device_present;
use super::NetError;
use crate::config::{Endpoint, Transport};
use crate::protocol::frame::Opcode;

/// Opcode the echo server answers with an error.
pub(crate) const FAIL: Opcode = Opcode(200);
/// Opcode the echo server never answers.
pub(crate) const IGNORE: Opcode = Opcode(201);
/// Opcode of numbered one-way messages whose order the server records.
pub(crate) const SEQUENCE: Opcode = Opcode(202);

pub(crate) fn context() -> NetContext {
    let mut context = NetContext::default();
    context.connection.request_timeout = Duration::from_secs(10);
    context.connection.max_payload = 2 << 20;
    // Registering memory is slow under emulation (Soft-RoCE in a TCG guest).
    context.connection.connect_timeout = Duration::from_secs(20);
    // Registered memory per connection stays small: real verbs pin it.
    context.rdma.landing_slot_size = 2 << 20;
    context.rdma.landing_slots = 2;
    context.rdma.device = std::env::var("RDMA_DEVICE").ok();
    context.rdma.gid_index = std::env::var("RDMA_GID_INDEX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    context
}

/// Starts a server on a fresh port: it echoes requests, records the numbers of `SEQUENCE`
/// one-way messages, answers `FAIL` with an error and never answers `IGNORE`.
pub(crate) async fn start_echo_server(
    transport: Transport,
    context: &NetContext,
) -> (Endpoint, Rc<std::cell::RefCell<Vec<u64>>>) {
    let listener = Listener::bind(
        &Endpoint {
            transport,
            addr: listen_addr(),
        },
        context,
    )
    .await
    .expect("bind a test listener");
    let endpoint = listener.local_endpoint().expect("listener endpoint");
    let sequence = Rc::new(std::cell::RefCell::new(Vec::new()));
    let recorded = Rc::clone(&sequence);
    glommio::spawn_local(async move {
        while let Ok(connection) = listener.accept().await {
            glommio::spawn_local(serve_echo(connection, Rc::clone(&recorded))).detach();
        }
    })
    .detach();
    (endpoint, sequence)
}

pub(crate) async fn serve_echo(connection: Connection, sequence: Rc<std::cell::RefCell<Vec<u64>>>) {
    while let Some(incoming) = connection.next_incoming().await {
        let message = incoming.message.clone();
        if message.opcode == SEQUENCE {
            let mut number = [0u8; 8];
            number.copy_from_slice(&message.payload[..8]);
            sequence.borrow_mut().push(u64::from_le_bytes(number));
            continue;
        }
        if message.opcode == IGNORE {
            continue;
        }
        if message.opcode == FAIL {
            let _ = incoming.respond_error(FAIL, "asked to fail").await;
            continue;
        }
        let _ = incoming.respond(message).await;
    }
}

/// Connects to `listener` while it accepts: an RDMA connection is set up by both sides at
/// once, so `connect` returns only when the listener has accepted.
async fn connect_and_accept(
    listener: &Listener,
    endpoint: &Endpoint,
    context: &NetContext,
) -> (Connection, Connection) {
    let (client, server) = future::zip(connect(endpoint, context), listener.accept()).await;
    (client.expect("connect"), server.expect("accept"))
}

fn patterned(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    Bytes::from(bytes)
}

/// Many requests in flight on one connection all get their own response.
pub(crate) async fn pipelined_requests_get_their_own_responses(transport: Transport) {
    let context = context();
    let (endpoint, _) = start_echo_server(transport, &context).await;
    let connection = connect(&endpoint, &context).await.expect("connect");
    let calls = (0..200u64).map(|i| {
        let connection = connection.clone();
        glommio::spawn_local(async move {
            let payload = patterned((i as usize * 37) % 300, i);
            let response = connection
                .call(Message::new(Opcode::PING, i, payload.clone()))
                .await
                .expect("echo");
            assert_eq!(response.copyset, i);
            assert_eq!(response.payload, payload);
        })
    });
    let tasks: Vec<_> = calls.collect();
    for task in tasks {
        task.await;
    }
    assert_eq!(connection.in_flight(), 0);
}

/// One-way messages arrive in the order they were sent.
pub(crate) async fn one_way_messages_keep_their_order(transport: Transport) {
    let context = context();
    let (endpoint, sequence) = start_echo_server(transport, &context).await;
    let connection = connect(&endpoint, &context).await.expect("connect");
    for i in 0..500u64 {
        let len = if i % 50 == 0 {
            100_000
        } else {
            8 + (i as usize % 64)
        };
        let mut payload = patterned(len, i).to_vec();
        payload[..8].copy_from_slice(&i.to_le_bytes());
        connection
            .send(Message::new(SEQUENCE, 0, Bytes::from(payload)))
            .await
            .expect("send");
    }
    // A request after the one-way messages returns only after they were all handled.
    connection
        .call(Message::new(Opcode::PING, 0, Bytes::new()))
        .await
        .expect("ping");
    assert_eq!(*sequence.borrow(), (0..500).collect::<Vec<u64>>());
}

/// Payloads from empty to 1 MiB (inline and by RDMA write) arrive intact.
pub(crate) async fn small_and_large_payloads_arrive_intact(transport: Transport) {
    let context = context();
    let (endpoint, _) = start_echo_server(transport, &context).await;
    let connection = connect(&endpoint, &context).await.expect("connect");
    for (i, len) in [0usize, 1, 63, 64, 4096, 4097, 65_536, 131_072, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let payload = patterned(len, i as u64);
        let response = connection
            .call(Message::new(Opcode::PING, 1, payload.clone()))
            .await
            .unwrap_or_else(|e| panic!("echo of {len} bytes: {e}"));
        assert_eq!(response.payload, payload, "{len} bytes");
    }
    let too_large = Bytes::from(vec![0u8; (2 << 20) + 1]);
    assert!(matches!(
        connection
            .call(Message::new(Opcode::PING, 1, too_large))
            .await,
        Err(NetError::PayloadTooLarge { .. })
    ));
}

/// A server that stops taking requests stalls the sender (bounded queues, credits), and the
/// sender resumes when the server drains.
pub(crate) async fn a_stalled_receiver_applies_back_pressure_then_recovers(transport: Transport) {
    let mut context = context();
    context.connection.send_queue_frames = 8;
    context.connection.incoming_queue_frames = 8;
    let listener = Listener::bind(
        &Endpoint {
            transport,
            addr: listen_addr(),
        },
        &context,
    )
    .await
    .expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let (client, server) = connect_and_accept(&listener, &endpoint, &context).await;
    // The server does not read. The sender must stall well before 2000 messages of 4 KiB
    // (8 MiB) are out, whatever the socket buffers hold.
    let total = 2000u64;
    let sender = {
        let client = client.clone();
        glommio::spawn_local(async move {
            for i in 0..total {
                let mut payload = vec![0u8; 4096];
                payload[..8].copy_from_slice(&i.to_le_bytes());
                client
                    .send(Message::new(SEQUENCE, 0, Bytes::from(payload)))
                    .await
                    .expect("send");
            }
        })
    };
    glommio::timer::sleep(Duration::from_millis(300)).await;
    assert!(
        !client.is_closed(),
        "a slow receiver must not close the connection"
    );
    // Now drain, and check that everything arrives in order.
    let mut expected = 0u64;
    while expected < total {
        let incoming = server.next_incoming().await.expect("a message");
        let mut number = [0u8; 8];
        number.copy_from_slice(&incoming.message.payload[..8]);
        assert_eq!(u64::from_le_bytes(number), expected);
        expected += 1;
    }
    sender.await;
}

/// The sender's stall is real: with the receiver not reading, sending does not complete.
pub(crate) async fn a_stalled_receiver_stalls_the_sender(transport: Transport) {
    let mut context = context();
    context.connection.send_queue_frames = 4;
    context.connection.incoming_queue_frames = 4;
    let listener = Listener::bind(
        &Endpoint {
            transport,
            addr: listen_addr(),
        },
        &context,
    )
    .await
    .expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let (client, _server) = connect_and_accept(&listener, &endpoint, &context).await;
    let flood = async {
        for _ in 0..100_000u64 {
            client
                .send(Message::new(SEQUENCE, 0, Bytes::from(vec![0u8; 4096])))
                .await
                .expect("send");
        }
        true
    };
    let stalled = future::or(flood, async {
        glommio::timer::sleep(Duration::from_millis(500)).await;
        false
    })
    .await;
    assert!(!stalled, "400 MB went out to a receiver that reads nothing");
}

/// A peer that vanishes with requests in flight fails them promptly instead of hanging.
pub(crate) async fn a_vanishing_peer_fails_requests_in_flight(transport: Transport) {
    let context = context();
    let listener = Listener::bind(
        &Endpoint {
            transport,
            addr: listen_addr(),
        },
        &context,
    )
    .await
    .expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let (client, server) = connect_and_accept(&listener, &endpoint, &context).await;
    let calls: Vec<_> = (0..20u64)
        .map(|i| {
            let client = client.clone();
            glommio::spawn_local(async move {
                client
                    .call(Message::new(Opcode::PING, i, patterned(200_000, i)))
                    .await
            })
        })
        .collect();
    // Let some of the transfer happen, then the server disappears.
    let _ = server.next_incoming().await;
    drop(server);
    drop(listener);
    for call in calls {
        match call.await {
            Err(NetError::Closed { .. }) | Err(NetError::Io { .. }) => {}
            other => panic!("a call to a vanished peer returned {other:?}"),
        }
    }
    assert!(client.is_closed());
    assert!(client
        .call(Message::new(Opcode::PING, 0, Bytes::new()))
        .await
        .is_err());
}

/// An error response reaches the caller as `Remote`; a request nobody answers times out.
pub(crate) async fn errors_and_timeouts_reach_the_caller(transport: Transport) {
    let mut context = context();
    context.connection.request_timeout = Duration::from_secs(1);
    let (endpoint, _) = start_echo_server(transport, &context).await;
    let connection = connect(&endpoint, &context).await.expect("connect");
    match connection
        .call(Message::new(FAIL, 0, Bytes::from_static(b"x")))
        .await
    {
        Err(NetError::Remote { reason }) => assert_eq!(reason, "asked to fail"),
        other => panic!("expected a remote error, got {other:?}"),
    }
    match connection.call(Message::new(IGNORE, 0, Bytes::new())).await {
        Err(NetError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // The connection survives both.
    assert!(connection
        .call(Message::new(
            Opcode::PING,
            0,
            Bytes::from_static(b"still here")
        ))
        .await
        .is_ok());
}

/// Many connections to one listener work at once.
pub(crate) async fn many_connections_work_at_once(transport: Transport) {
    let context = context();
    let (endpoint, _) = start_echo_server(transport, &context).await;
    let clients: Vec<_> = (0..24u64)
        .map(|c| {
            let context = context.clone();
            glommio::spawn_local(async move {
                let connection = connect(&endpoint, &context).await.expect("connect");
                for i in 0..20u64 {
                    let len = if i % 5 == 0 { 70_000 } else { 100 };
                    let payload = patterned(len, c * 1000 + i);
                    let response = connection
                        .call(Message::new(Opcode::PING, c, payload.clone()))
                        .await
                        .expect("echo");
                    assert_eq!(response.payload, payload);
                }
            })
        })
        .collect();
    for client in clients {
        client.await;
    }
}

/// Records where each buffer it hands out starts.
struct RecordingAllocator {
    inner: super::payload::AlignedHeapAllocator,
    starts: std::cell::RefCell<Vec<usize>>,
}

impl super::payload::PayloadAllocator for RecordingAllocator {
    fn allocate(
        &self,
        len: usize,
    ) -> Result<Box<dyn super::payload::PayloadBuffer>, super::payload::AllocError> {
        let mut buffer = self.inner.allocate(len)?;
        self.starts
            .borrow_mut()
            .push((*buffer).as_mut().as_ptr() as usize);
        Ok(buffer)
    }
}

/// Every received payload is the very buffer the shard's allocator gave (no copy after it),
/// which is what lets the storage engine's DMA pool receive payloads for the WAL.
pub(crate) async fn payloads_arrive_in_buffers_from_the_shard_allocator(transport: Transport) {
    let client_context = context();
    let mut server_context = context();
    let allocator = Rc::new(RecordingAllocator {
        inner: super::payload::AlignedHeapAllocator::new(4096),
        starts: std::cell::RefCell::new(Vec::new()),
    });
    server_context.allocator = allocator.clone();
    let listener = Listener::bind(
        &Endpoint {
            transport,
            addr: listen_addr(),
        },
        &server_context,
    )
    .await
    .expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let (client, server) = connect_and_accept(&listener, &endpoint, &client_context).await;
    for (i, len) in [100usize, 4096, 200_000].into_iter().enumerate() {
        let payload = patterned(len, i as u64);
        client
            .send(Message::new(SEQUENCE, 0, payload.clone()))
            .await
            .expect("send");
        let incoming = server.next_incoming().await.expect("a message");
        assert_eq!(incoming.message.payload, payload);
        let start = incoming.message.payload.as_ptr() as usize;
        assert!(
            allocator.starts.borrow().contains(&start),
            "{len} bytes: the payload is not a buffer from the allocator"
        );
        assert_eq!(start % 4096, 0, "allocator alignment kept");
    }
}

/// Declares the suite's tests for one transport.
macro_rules! message_suite {
    ($module:ident, $transport:expr, $guard:expr) => {
        mod $module {
            use super::*;

            fn run<F, Fut>(case: F)
            where
                F: FnOnce(Transport) -> Fut + Send + 'static,
                Fut: Future<Output = ()> + 'static,
            {
                if !$guard() {
                    return;
                }
                run_case(Duration::from_secs(60), move || case($transport));
            }

            #[test]
            fn pipelined_requests_get_their_own_responses() {
                run(super::pipelined_requests_get_their_own_responses);
            }

            #[test]
            fn one_way_messages_keep_their_order() {
                run(super::one_way_messages_keep_their_order);
            }

            #[test]
            fn small_and_large_payloads_arrive_intact() {
                run(super::small_and_large_payloads_arrive_intact);
            }

            #[test]
            fn a_stalled_receiver_applies_back_pressure_then_recovers() {
                run(super::a_stalled_receiver_applies_back_pressure_then_recovers);
            }

            #[test]
            fn a_stalled_receiver_stalls_the_sender() {
                run(super::a_stalled_receiver_stalls_the_sender);
            }

            #[test]
            fn a_vanishing_peer_fails_requests_in_flight() {
                run(super::a_vanishing_peer_fails_requests_in_flight);
            }

            #[test]
            fn errors_and_timeouts_reach_the_caller() {
                run(super::errors_and_timeouts_reach_the_caller);
            }

            #[test]
            fn payloads_arrive_in_buffers_from_the_shard_allocator() {
                run(super::payloads_arrive_in_buffers_from_the_shard_allocator);
            }

            #[test]
            fn many_connections_work_at_once() {
                run(super::many_connections_work_at_once);
            }
        }
    };
}

fn always() -> bool {
    true
}

message_suite!(tcp, Transport::Tcp, always);
message_suite!(softrdma, Transport::SoftRdma, always);
#[cfg(feature = "rdma")]
message_suite!(rdma, Transport::Rdma, rdma_device_present);
