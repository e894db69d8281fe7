//! What the transports' tests share: the address to listen on, a bounded executor per case,
//! shared by the message suite and the verbs conformance tests.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::future;

/// The address tests listen on: loopback, unless `NET_TEST_ADDR` names the address of the
/// RDMA device's interface (inside the Soft-RoCE guest).
pub(crate) fn listen_addr() -> SocketAddr {
    let ip = std::env::var("NET_TEST_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    format!("{ip}:0")
        .parse()
        .unwrap_or_else(|_| panic!("NET_TEST_ADDR={ip} is not an IP address"))
}

/// Runs one case on a fresh executor, failing it if it takes longer than `limit`.
pub(crate) fn run_case<F, Fut>(limit: Duration, case: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let executor = glommio::LocalExecutorBuilder::default()
        .name("net-test")
        .spawn(move || async move {
            future::or(case(), async {
                glommio::timer::sleep(limit).await;
                panic!("test case exceeded its bound of {limit:?}");
            })
            .await
        })
        .expect("start a glommio executor");
    executor.join().expect("test case panicked");
}
