//! The node's heartbeat to the placement service: every shard's report gathered through the
//! mesh, folded into one heartbeat, sent to the metadata copyset's leader; the stale replicas
//! its answer names are removed.

use std::rc::Rc;
use std::time::Duration;

use super::shard::{ShardMessage, ShardReport, ShardServer};
use crate::shard::ShutdownSignal;
use crate::storage::bdev::Bdev;

/// How long a scrape waits for another shard's report.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the heartbeat needs from the configuration.
pub(super) struct HeartbeatSettings {
    /// This node.
    pub node: u64,
    /// How often it reports.
    pub interval: Duration,
    /// Its zone and host labels.
    pub zone: String,
    pub host: String,
    /// Where the cluster's nodes take client requests (the service is found among them).
    pub nodes: Vec<crate::protocol::NodeAddress>,
    /// Connection settings of the heartbeat's client.
    pub net: crate::config::NetSection,
    /// Its keys and role.
    pub auth: Option<crate::net::handshake::Auth>,
}

/// Gathers every shard's report: this shard's directly, the others' through the mesh.
pub(super) async fn gather_reports<B: Bdev + 'static>(
    server: &ShardServer<B>,
    mesh: &crate::shard::Mesh<ShardMessage>,
) -> Vec<ShardReport> {
    let mut reports = vec![server.report()];
    for shard in (0..mesh.shard_count()).filter(|&s| s != mesh.me().0) {
        let (sender, receiver) = glommio::channels::shared_channel::new_bounded(1);
        if mesh
            .send(crate::shard::ShardId(shard), ShardMessage::Scrape(sender))
            .await
            .is_err()
        {
            continue;
        }
        let receiver = receiver.connect().await;
        let report = futures_lite::future::or(receiver.recv(), async {
            glommio::timer::sleep(SCRAPE_TIMEOUT).await;
            None
        })
        .await;
        reports.extend(report);
    }
    reports
}

/// Every heartbeat interval until `stop`: gathers the shards' reports and sends the node's
/// heartbeat to the placement service (the metadata copyset's leader). A heartbeat that
/// finds no service (no metadata copyset yet, an election) is dropped; the next one follows.
pub(super) fn heartbeat_loop<B: Bdev + 'static>(
    settings: HeartbeatSettings,
    server: Rc<ShardServer<B>>,
    mesh: Rc<crate::shard::Mesh<ShardMessage>>,
    stop: ShutdownSignal,
) -> impl std::future::Future<Output = ()> + 'static {
    let HeartbeatSettings {
        node,
        interval,
        zone,
        host,
        nodes,
        net,
        auth,
    } = settings;
    let config = crate::client::ClientConfig {
        deadline: interval,
        net,
        auth,
        ..crate::client::ClientConfig::default()
    };
    let client = crate::client::Client::new(&nodes, config);
    async move {
        let mut failures = 0u64;
        loop {
            let slept = futures_lite::future::or(
                async {
                    glommio::timer::sleep(interval).await;
                    true
                },
                async {
                    stop.raised().await;
                    false
                },
            );
            if !slept.await {
                return;
            }
            let reports = gather_reports(&server, &mesh).await;
            let heartbeat = heartbeat_of(node, &zone, &host, reports);
            match client.heartbeat(&heartbeat).await {
                Ok(reply) => {
                    failures = 0;
                    for copyset in reply.stale {
                        let copyset = crate::ids::CopysetId(copyset);
                        match client.remove_stale_replica(copyset, node).await {
                            Ok(()) => tracing::info!(node, %copyset,
                                "stale replica removed, as the placement service asked"),
                            Err(error) => tracing::info!(node, %copyset, %error,
                                "stale replica kept"),
                        }
                    }
                }
                Err(error) => {
                    failures += 1;
                    // Quiet while the cluster has no metadata copyset; said now and then.
                    if failures % 12 == 1 {
                        tracing::debug!(node, %error, failures, "heartbeat not delivered");
                    }
                }
            }
        }
    }
}

/// The heartbeat of `node` from its shards' reports.
fn heartbeat_of(
    node: u64,
    zone: &str,
    host: &str,
    reports: Vec<ShardReport>,
) -> crate::protocol::placement::Heartbeat {
    use crate::protocol::placement::{Heartbeat, ReplicaReport};
    let field = |v: &serde_json::Value, key: &str| v.get(key).and_then(serde_json::Value::as_u64);
    let ids = |v: &serde_json::Value, key: &str| -> Vec<u64> {
        v.get(key)
            .and_then(serde_json::Value::as_array)
            .map(|v| v.iter().filter_map(serde_json::Value::as_u64).collect())
            .unwrap_or_default()
    };
    let mut heartbeat = Heartbeat {
        node,
        zone: zone.to_string(),
        host: host.to_string(),
        shards: reports.len() as u32,
        slots_total: 0,
        slots_free: 0,
        replicas: Vec::new(),
    };
    for report in reports {
        heartbeat.slots_total += report.slots.0;
        heartbeat.slots_free += report.slots.1;
        for status in &report.status {
            let Some(copyset) = field(status, "copyset") else {
                continue;
            };
            heartbeat.replicas.push(ReplicaReport {
                copyset,
                shard: field(status, "shard").unwrap_or(0) as u32,
                role: status
                    .get("role")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("unknown")
                    .to_string(),
                leader: field(status, "leader").unwrap_or(0),
                term: field(status, "term").unwrap_or(0),
                applied: field(status, "applied").unwrap_or(0),
                voters: ids(status, "voters"),
                others: ids(status, "voters_outgoing")
                    .into_iter()
                    .chain(ids(status, "learners"))
                    .collect(),
            });
        }
    }
    heartbeat
}
