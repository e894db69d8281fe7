//! What every [`Verbs`] backend must do, checked the same way for each: `softverbs` always,
//! ibverbs with feature `rdma` (on `rxe0` inside the Soft-RoCE guest, or a real NIC).

use std::future::Future;
use std::time::Duration;

use futures_lite::future;

use super::{
    CompletionQueue, MemoryRegion, QpCaps, QpState, QueuePair, RemoteAccess, SendOp, SendRequest,
    Verbs, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};
use crate::net::test_kit::run_case;

/// Two connected queue pairs on one device, each with its own completion queue.
pub(crate) struct Pair<V: Verbs> {
    pub(crate) device: V,
    pub(crate) a: V::Qp,
    pub(crate) a_cq: V::Cq,
    pub(crate) b: V::Qp,
    pub(crate) b_cq: V::Cq,
}

pub(crate) fn connect_pair<V: Verbs>(device: V, caps: QpCaps) -> Pair<V> {
    let (a, a_cq, b, b_cq) = connected_qps(&device, caps);
    Pair {
        device,
        a,
        a_cq,
        b,
        b_cq,
    }
}

/// Two queue pairs of `device`, connected to each other, with their completion queues.
pub(crate) fn connected_qps<V: Verbs>(device: &V, caps: QpCaps) -> (V::Qp, V::Cq, V::Qp, V::Cq) {
    connected_qps_across(device, device, caps)
}

/// A queue pair of `a_side` connected to one of `b_side` (two protection domains of one
/// device, or the same handle twice), with their completion queues.
pub(crate) fn connected_qps_across<V: Verbs>(
    a_side: &V,
    b_side: &V,
    caps: QpCaps,
) -> (V::Qp, V::Cq, V::Qp, V::Cq) {
    let a_cq = a_side.create_cq(1024).expect("create cq");
    let b_cq = b_side.create_cq(1024).expect("create cq");
    let a = a_side.create_qp(&a_cq, caps).expect("create qp");
    let b = b_side.create_qp(&b_cq, caps).expect("create qp");
    for qp in [&a, &b] {
        assert_eq!(qp.state(), QpState::Reset);
        qp.to_init().expect("to init");
    }
    a.to_ready_to_receive(&b.endpoint()).expect("a to rtr");
    b.to_ready_to_receive(&a.endpoint()).expect("b to rtr");
    a.to_ready_to_send().expect("a to rts");
    b.to_ready_to_send().expect("b to rts");
    (a, a_cq, b, b_cq)
}

/// Polls until `count` completions arrived, or fails after `limit`.
pub(crate) async fn completions<C: CompletionQueue>(
    cq: &C,
    count: usize,
    limit: Duration,
) -> Vec<WorkCompletion> {
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + limit;
    while out.len() < count {
        let missing = count - out.len();
        cq.poll(&mut out, missing).expect("poll cq");
        if out.len() >= count {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {count} completions after {limit:?}: {out:?}",
            out.len()
        );
        match cq.completion_signal() {
            Some(signal) => {
                future::or(
                    signal.notified(),
                    glommio::timer::sleep(Duration::from_millis(5)),
                )
                .await
            }
            None => glommio::timer::sleep(Duration::from_micros(50)).await,
        }
    }
    out
}

/// Asserts that no completion arrives within `window`.
async fn no_completion<C: CompletionQueue>(cq: &C, window: Duration) {
    glommio::timer::sleep(window).await;
    let mut out = Vec::new();
    cq.poll(&mut out, 16).expect("poll cq");
    assert!(out.is_empty(), "unexpected completions {out:?}");
}

const WAIT: Duration = Duration::from_secs(10);

fn send<R>(region: &R, wr_id: u64, op: SendOp, offset: usize, len: usize) -> SendRequest<'_, R> {
    SendRequest {
        wr_id,
        op,
        region,
        offset,
        len,
        signaled: true,
    }
}

pub(crate) async fn sends_arrive_in_order_with_immediate_data<V: Verbs>(device: V) {
    let pair = connect_pair(device, QpCaps::default());
    let send_region = pair
        .device
        .register(64 * 16, RemoteAccess::None)
        .expect("register");
    let recv_region = pair
        .device
        .register(64 * 16, RemoteAccess::None)
        .expect("register");
    for i in 0..16u64 {
        pair.b
            .post_recv(100 + i, &recv_region, i as usize * 64, 64)
            .expect("post recv");
    }
    for i in 0..16u64 {
        let message = vec![i as u8; 10 + i as usize];
        send_region
            .write_at(i as usize * 64, &message)
            .expect("fill");
        let op = if i % 2 == 0 {
            SendOp::Send
        } else {
            SendOp::SendWithImm(0xABC0 + i as u32)
        };
        pair.a
            .post_send(send(&send_region, i, op, i as usize * 64, message.len()))
            .expect("post send");
    }
    let received = completions(&pair.b_cq, 16, WAIT).await;
    for (i, completion) in received.iter().enumerate() {
        assert_eq!(completion.status, WcStatus::Success, "{completion:?}");
        assert_eq!(completion.opcode, WcOpcode::Recv);
        assert_eq!(
            completion.wr_id,
            100 + i as u64,
            "receives complete in order"
        );
        assert_eq!(completion.byte_len as usize, 10 + i);
        let expected_imm = (i % 2 == 1).then_some(0xABC0 + i as u32);
        assert_eq!(completion.imm_data, expected_imm);
        let mut data = vec![0u8; 10 + i];
        recv_region.read_at(i * 64, &mut data).expect("read");
        assert!(data.iter().all(|&b| b == i as u8));
    }
    let sent = completions(&pair.a_cq, 16, WAIT).await;
    let ids: Vec<u64> = sent.iter().map(|c| c.wr_id).collect();
    assert_eq!(ids, (0..16).collect::<Vec<_>>());
    assert!(sent
        .iter()
        .all(|c| c.status == WcStatus::Success && c.opcode == WcOpcode::Send));
}

pub(crate) async fn a_send_without_a_receive_waits_then_completes<V: Verbs>(device: V) {
    let pair = connect_pair(device, QpCaps::default());
    let region = pair
        .device
        .register(4096, RemoteAccess::None)
        .expect("register");
    region.write_at(0, b"late receive").expect("fill");
    pair.a
        .post_send(send(&region, 1, SendOp::Send, 0, 12))
        .expect("post send");
    // No receive posted: the send is refused (RNR) and retried, nothing completes.
    no_completion(&pair.b_cq, Duration::from_millis(50)).await;
    let recv_region = pair
        .device
        .register(4096, RemoteAccess::None)
        .expect("register");
    pair.b
        .post_recv(7, &recv_region, 0, 4096)
        .expect("post recv");
    let received = completions(&pair.b_cq, 1, WAIT).await;
    assert_eq!(received[0].status, WcStatus::Success);
    assert_eq!(received[0].byte_len, 12);
    let sent = completions(&pair.a_cq, 1, WAIT).await;
    assert_eq!(sent[0].status, WcStatus::Success);
    let mut data = [0u8; 12];
    recv_region.read_at(0, &mut data).expect("read");
    assert_eq!(&data, b"late receive");
}

pub(crate) async fn rnr_retries_run_out<V: Verbs>(device: V) {
    let caps = QpCaps {
        rnr_retry: 1,
        ..QpCaps::default()
    };
    let pair = connect_pair(device, caps);
    let region = pair
        .device
        .register(4096, RemoteAccess::None)
        .expect("register");
    pair.a
        .post_send(send(&region, 1, SendOp::Send, 0, 8))
        .expect("post send");
    pair.a
        .post_send(send(&region, 2, SendOp::Send, 0, 8))
        .expect("post send");
    let sent = completions(&pair.a_cq, 2, WAIT).await;
    assert_eq!(sent[0].wr_id, 1);
    assert_eq!(sent[0].status, WcStatus::RnrRetryExceededError);
    assert_eq!(sent[1].wr_id, 2);
    assert_eq!(sent[1].status, WcStatus::WrFlushError);
    assert_eq!(pair.a.state(), QpState::Error);
}

pub(crate) async fn rdma_write_and_read_reach_registered_memory<V: Verbs>(device: V) {
    let pair = connect_pair(device, QpCaps::default());
    let local = pair
        .device
        .register(256 * 1024, RemoteAccess::None)
        .expect("register");
    let remote = pair
        .device
        .register(256 * 1024, RemoteAccess::ReadWrite)
        .expect("register");
    let pattern: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    local.write_at(1000, &pattern).expect("fill");
    pair.a
        .post_send(send(
            &local,
            1,
            SendOp::Write(remote.remote_address(5000)),
            1000,
            pattern.len(),
        ))
        .expect("post write");
    let written = completions(&pair.a_cq, 1, WAIT).await;
    assert_eq!(written[0].status, WcStatus::Success);
    assert_eq!(written[0].opcode, WcOpcode::RdmaWrite);
    let mut landed = vec![0u8; pattern.len()];
    remote.read_at(5000, &mut landed).expect("read");
    assert_eq!(landed, pattern, "the write landed at the remote address");
    // Read it back into another place of the local region.
    pair.a
        .post_send(send(
            &local,
            2,
            SendOp::Read(remote.remote_address(5000)),
            0,
            50_000,
        ))
        .expect("post read");
    let read = completions(&pair.a_cq, 1, WAIT).await;
    assert_eq!(read[0].status, WcStatus::Success);
    assert_eq!(read[0].opcode, WcOpcode::RdmaRead);
    let mut back = vec![0u8; 50_000];
    local.read_at(0, &mut back).expect("read");
    assert_eq!(back, pattern[..50_000]);
    // A write with immediate data consumes a receive that carries the immediate.
    let recv_region = pair
        .device
        .register(64, RemoteAccess::None)
        .expect("register");
    pair.b.post_recv(9, &recv_region, 0, 64).expect("post recv");
    pair.a
        .post_send(send(
            &local,
            3,
            SendOp::WriteWithImm(remote.remote_address(0), 0xFEED),
            1000,
            4096,
        ))
        .expect("post write with imm");
    let received = completions(&pair.b_cq, 1, WAIT).await;
    assert_eq!(received[0].status, WcStatus::Success);
    assert_eq!(received[0].opcode, WcOpcode::RecvRdmaWithImm);
    assert_eq!(received[0].imm_data, Some(0xFEED));
    assert_eq!(
        completions(&pair.a_cq, 1, WAIT).await[0].status,
        WcStatus::Success
    );
}

pub(crate) async fn a_bad_rkey_completes_with_a_remote_access_error<V: Verbs>(device: V) {
    let pair = connect_pair(device, QpCaps::default());
    let local = pair
        .device
        .register(4096, RemoteAccess::None)
        .expect("register");
    let remote = pair
        .device
        .register(4096, RemoteAccess::ReadWrite)
        .expect("register");
    let mut bad = remote.remote_address(0);
    bad.rkey ^= 0x00F0_0F00;
    pair.a
        .post_send(send(&local, 1, SendOp::Write(bad), 0, 64))
        .expect("post write");
    pair.a
        .post_send(send(&local, 2, SendOp::Send, 0, 8))
        .expect("post send");
    let done = completions(&pair.a_cq, 2, WAIT).await;
    assert_eq!(done[0].status, WcStatus::RemoteAccessError);
    assert_eq!(done[1].status, WcStatus::WrFlushError);
    assert_eq!(pair.a.state(), QpState::Error);
    // Requests posted to a failed queue pair are flushed.
    pair.a
        .post_send(send(&local, 3, SendOp::Send, 0, 8))
        .expect("post to an errored qp");
    let flushed = completions(&pair.a_cq, 1, WAIT).await;
    assert_eq!(flushed[0].status, WcStatus::WrFlushError);
}

/// A region registered without remote access refuses a peer's write and read through its
/// rkey (issue 25, item 9); one registered for remote write only refuses a read.
pub(crate) async fn regions_take_only_the_remote_access_they_were_registered_for<V: Verbs>(
    device: V,
) {
    for (access, write) in [
        (RemoteAccess::None, true),
        (RemoteAccess::None, false),
        (RemoteAccess::Write, false),
    ] {
        // A fresh pair each time: a remote access error moves the queue pair to Error.
        let (a, a_cq, _b, _b_cq) = connected_qps(&device, QpCaps::default());
        let local = device.register(4096, RemoteAccess::None).expect("register");
        let target = device.register(4096, access).expect("register");
        target.write_at(0, b"untouched").expect("fill");
        let request = if write {
            SendOp::Write(target.remote_address(0))
        } else {
            SendOp::Read(target.remote_address(0))
        };
        a.post_send(send(&local, 1, request, 0, 64)).expect("post");
        let done = completions(&a_cq, 1, WAIT).await;
        assert_eq!(
            done[0].status,
            WcStatus::RemoteAccessError,
            "{access:?}, {}",
            if write { "write" } else { "read" }
        );
        let mut data = [0u8; 9];
        target.read_at(0, &mut data).expect("read");
        assert_eq!(&data, b"untouched");
    }
    // Remote write only: a write goes through.
    let pair = connect_pair(device, QpCaps::default());
    let local = pair
        .device
        .register(4096, RemoteAccess::None)
        .expect("register");
    let target = pair
        .device
        .register(4096, RemoteAccess::Write)
        .expect("register");
    local.write_at(0, b"landed").expect("fill");
    pair.a
        .post_send(send(
            &local,
            1,
            SendOp::Write(target.remote_address(0)),
            0,
            6,
        ))
        .expect("post write");
    assert_eq!(
        completions(&pair.a_cq, 1, WAIT).await[0].status,
        WcStatus::Success
    );
    let mut data = [0u8; 6];
    target.read_at(0, &mut data).expect("read");
    assert_eq!(&data, b"landed");
}

/// A queue pair reaches only the regions of its own protection domain: an RDMA write that
/// arrives on a queue pair of one domain, aimed at a region of another with a valid rkey and
/// remote access, fails (issue 25, item 9: one connection's peer cannot reach another's).
pub(crate) async fn a_queue_pair_reaches_only_its_own_domains_regions<V: Verbs>(device: V) {
    let ours = device.new_domain().expect("a domain");
    let theirs = device.new_domain().expect("another domain");
    for (target_domain, allowed) in [(&theirs, false), (&ours, true)] {
        // `a` sends from the device's first domain; `b`, its target side, is in `ours`.
        let (a, a_cq, _b, _b_cq) = connected_qps_across(&device, &ours, QpCaps::default());
        let local = device.register(4096, RemoteAccess::None).expect("register");
        let target = target_domain
            .register(4096, RemoteAccess::ReadWrite)
            .expect("register");
        local.write_at(0, b"reached").expect("fill");
        a.post_send(send(
            &local,
            1,
            SendOp::Write(target.remote_address(0)),
            0,
            7,
        ))
        .expect("post write");
        let done = completions(&a_cq, 1, WAIT).await;
        let mut data = [0u8; 7];
        target.read_at(0, &mut data).expect("read");
        if allowed {
            assert_eq!(done[0].status, WcStatus::Success);
            assert_eq!(&data, b"reached");
        } else {
            assert_eq!(done[0].status, WcStatus::RemoteAccessError);
            assert_eq!(data, [0u8; 7], "another domain's region was written");
        }
    }
}

pub(crate) async fn a_range_beyond_the_region_completes_with_a_remote_access_error<V: Verbs>(
    device: V,
) {
    let pair = connect_pair(device, QpCaps::default());
    let local = pair
        .device
        .register(8192, RemoteAccess::None)
        .expect("register");
    let remote = pair
        .device
        .register(4096, RemoteAccess::ReadWrite)
        .expect("register");
    pair.a
        .post_send(send(
            &local,
            1,
            SendOp::Read(remote.remote_address(2048)),
            0,
            4096,
        ))
        .expect("post read");
    let done = completions(&pair.a_cq, 1, WAIT).await;
    assert_eq!(done[0].status, WcStatus::RemoteAccessError);
}

pub(crate) async fn a_send_longer_than_the_receive_fails_both_sides<V: Verbs>(device: V) {
    let pair = connect_pair(device, QpCaps::default());
    let local = pair
        .device
        .register(4096, RemoteAccess::None)
        .expect("register");
    let recv_region = pair
        .device
        .register(4096, RemoteAccess::None)
        .expect("register");
    pair.b.post_recv(5, &recv_region, 0, 16).expect("post recv");
    pair.a
        .post_send(send(&local, 1, SendOp::Send, 0, 100))
        .expect("post send");
    let received = completions(&pair.b_cq, 1, WAIT).await;
    // NICs report a local length error; rdma_rxe reports a local QP operation error.
    assert!(
        matches!(
            received[0].status,
            WcStatus::LocalLengthError | WcStatus::LocalQpOperationError
        ),
        "{:?}",
        received[0]
    );
    let sent = completions(&pair.a_cq, 1, WAIT).await;
    // NICs report an invalid request; rdma_rxe reports a remote operation error.
    assert!(
        matches!(
            sent[0].status,
            WcStatus::RemoteInvalidRequestError | WcStatus::RemoteOperationError
        ),
        "{:?}",
        sent[0]
    );
}

pub(crate) async fn transitions_follow_the_rc_state_machine<V: Verbs>(device: V) {
    let cq = device.create_cq(16).expect("cq");
    let qp = device.create_qp(&cq, QpCaps::default()).expect("qp");
    let region = device.register(64, RemoteAccess::None).expect("register");
    assert!(matches!(
        qp.to_ready_to_send(),
        Err(VerbsError::BadTransition { .. })
    ));
    assert!(qp.post_send(send(&region, 1, SendOp::Send, 0, 8)).is_err());
    qp.to_init().expect("init");
    assert_eq!(qp.state(), QpState::Init);
    // Receives may be posted from Init on; they are flushed when the queue pair fails.
    qp.post_recv(1, &region, 0, 64).expect("post recv in init");
    qp.to_error();
    assert_eq!(qp.state(), QpState::Error);
    let flushed = completions(&cq, 1, WAIT).await;
    assert_eq!(flushed[0].status, WcStatus::WrFlushError);
    assert_eq!(flushed[0].wr_id, 1);
}

pub(crate) async fn a_vanished_peer_fails_outstanding_requests<V: Verbs>(device: V) {
    let pair = connect_pair(device, QpCaps::default());
    let local = pair
        .device
        .register(4096, RemoteAccess::None)
        .expect("register");
    let recv_region = pair
        .device
        .register(4096, RemoteAccess::None)
        .expect("register");
    pair.b
        .post_recv(1, &recv_region, 0, 4096)
        .expect("post recv");
    pair.a
        .post_send(send(&local, 1, SendOp::Send, 0, 64))
        .expect("post send");
    assert_eq!(
        completions(&pair.a_cq, 1, WAIT).await[0].status,
        WcStatus::Success
    );
    let Pair { a, a_cq, b, .. } = pair;
    drop(b);
    for i in 0..4u64 {
        a.post_send(send(&local, 10 + i, SendOp::Send, 0, 64))
            .expect("post send");
    }
    // softverbs sees the wire close and fails the first request with RetryExceeded at once;
    // a NIC does so after its retry timer (rdma_rxe in loopback never does: its requests to a
    // destroyed queue pair stay outstanding, measured 40 s). Either way, moving the queue pair
    // to Error must complete every outstanding request, which is what the transport does when
    // its out-of-band connection reports the peer gone.
    glommio::timer::sleep(Duration::from_millis(200)).await;
    a.to_error();
    let done = completions(&a_cq, 4, Duration::from_secs(30)).await;
    let ids: Vec<u64> = done.iter().map(|c| c.wr_id).collect();
    assert_eq!(ids, vec![10, 11, 12, 13], "completions in posting order");
    assert!(
        matches!(
            done[0].status,
            WcStatus::RetryExceededError | WcStatus::WrFlushError
        ),
        "first outstanding request: {:?}",
        done[0]
    );
    assert!(done[1..].iter().all(|c| c.status == WcStatus::WrFlushError));
    assert_eq!(a.state(), QpState::Error);
}

/// Declares the conformance tests for one backend; `$open` makes a device on the test's
/// executor, or returns `None` (having said why) to skip.
macro_rules! verbs_conformance {
    ($module:ident, $open:expr) => {
        mod $module {
            use super::*;

            fn run<V, F, Fut>(open: fn() -> Option<V>, case: F)
            where
                V: Verbs + 'static,
                F: FnOnce(V) -> Fut + Send + 'static,
                Fut: Future<Output = ()> + 'static,
            {
                run_case(Duration::from_secs(60), move || async move {
                    if let Some(device) = open() {
                        case(device).await;
                    }
                });
            }

            #[test]
            fn sends_arrive_in_order_with_immediate_data() {
                run($open, super::sends_arrive_in_order_with_immediate_data);
            }

            #[test]
            fn a_send_without_a_receive_waits_then_completes() {
                run($open, super::a_send_without_a_receive_waits_then_completes);
            }

            #[test]
            fn rnr_retries_run_out() {
                run($open, super::rnr_retries_run_out);
            }

            #[test]
            fn rdma_write_and_read_reach_registered_memory() {
                run($open, super::rdma_write_and_read_reach_registered_memory);
            }

            #[test]
            fn a_bad_rkey_completes_with_a_remote_access_error() {
                run(
                    $open,
                    super::a_bad_rkey_completes_with_a_remote_access_error,
                );
            }

            #[test]
            fn a_queue_pair_reaches_only_its_own_domains_regions() {
                run(
                    $open,
                    super::a_queue_pair_reaches_only_its_own_domains_regions,
                );
            }

            #[test]
            fn regions_take_only_the_remote_access_they_were_registered_for() {
                run(
                    $open,
                    super::regions_take_only_the_remote_access_they_were_registered_for,
                );
            }

            #[test]
            fn a_range_beyond_the_region_completes_with_a_remote_access_error() {
                run(
                    $open,
                    super::a_range_beyond_the_region_completes_with_a_remote_access_error,
                );
            }

            #[test]
            fn a_send_longer_than_the_receive_fails_both_sides() {
                run(
                    $open,
                    super::a_send_longer_than_the_receive_fails_both_sides,
                );
            }

            #[test]
            fn transitions_follow_the_rc_state_machine() {
                run($open, super::transitions_follow_the_rc_state_machine);
            }

            #[test]
            fn a_vanished_peer_fails_outstanding_requests() {
                run($open, super::a_vanished_peer_fails_outstanding_requests);
            }
        }
    };
}

fn open_soft() -> Option<super::soft::SoftVerbs> {
    Some(
        super::soft::SoftVerbs::open(crate::net::test_kit::listen_addr().ip())
            .expect("open softverbs"),
    )
}

verbs_conformance!(softverbs, open_soft);

/// The device for ibverbs tests: `RDMA_DEVICE` (first device when unset) and
/// `RDMA_GID_INDEX` (1, RoCE v2 over IPv4, when unset). `None`, having said why, when the
/// host has no RDMA device; with `RDMA_TESTS_REQUIRE_DEVICE` set that is a failure instead.
#[cfg(feature = "rdma")]
pub(crate) fn open_ib() -> Option<super::ibverbs::IbVerbs> {
    if !super::rdma_device_present() {
        return None;
    }
    let device = std::env::var("RDMA_DEVICE").ok();
    let gid_index = std::env::var("RDMA_GID_INDEX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    Some(super::ibverbs::IbVerbs::open(device.as_deref(), gid_index).expect("open the RDMA device"))
}

#[cfg(feature = "rdma")]
verbs_conformance!(ibverbs, open_ib);
