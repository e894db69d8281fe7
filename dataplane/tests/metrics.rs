//! The metrics endpoint of running chunkservers (two shards each, so a scrape gathers the
//! other shard's figures through the mesh): counters move under load, the latency summaries
//! carry the requests, the text parses as the Prometheus format, and `/status` shows the
//! copysets.

mod common;

use common::{addresses_with_shards, block, config, free_ports, Node};
use dataplane::client::{Client, ClientConfig};
use dataplane::config::CoreSpec;
use dataplane::ids::{ChunkId, CopysetId};
use dataplane::metrics::text;
use glommio::{LocalExecutorBuilder, Placement};

fn get(port: u16, path: &str) -> String {
    common::http_get(port, path)
}

fn sum(samples: &[text::Sample], name: &str, label: (&str, &str)) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.labels.iter().any(|(k, v)| k == label.0 && v == label.1))
        .map(|s| s.value)
        .sum()
}

#[test]
fn scrapes_show_counters_moving_and_parse_as_prometheus_text() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(9);
    let metrics_ports = &ports[6..9];
    let mut nodes = Vec::new();
    for id in 1..=3u32 {
        let mut config = config(id, &ports, dir.path(), "mem");
        config.node.cores = CoreSpec::List(vec![0, 1]);
        for node in &mut config.cluster.nodes {
            node.shards = 2;
        }
        config.metrics.address = Some(
            format!("127.0.0.1:{}", metrics_ports[id as usize - 1])
                .parse()
                .expect("address"),
        );
        nodes.push(Node::start_on(config, vec![0, 1]));
    }
    let addresses = addresses_with_shards(&ports, "tcp", 2);
    const WRITES: u64 = 40;
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let client = Client::new(&addresses, ClientConfig::default());
            // Two copysets, which land on different shards of each node.
            for copyset in [CopysetId(1), CopysetId(2)] {
                client
                    .create_copyset(copyset, &[1, 2, 3])
                    .await
                    .expect("create copyset");
                for i in 0..WRITES / 2 {
                    client
                        .write(copyset, ChunkId(1), i as u32 * 4096, block(i), 1)
                        .await
                        .expect("write");
                }
            }
        })
        .expect("client")
        .join()
        .expect("client thread");

    let mut writes_ok = 0.0;
    let mut write_latencies = 0.0;
    let mut write_requests = 0.0;
    let mut copysets_reported = 0;
    let mut applied_leaders = 0;
    for &port in metrics_ports {
        let body = get(port, "/metrics");
        let samples = text::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        writes_ok += samples
            .iter()
            .filter(|s| {
                s.name == "chunkserver_requests_total"
                    && s.labels.contains(&("op".into(), "write".into()))
                    && s.labels.contains(&("result".into(), "ok".into()))
            })
            .map(|s| s.value)
            .sum::<f64>();
        write_latencies += sum(
            &samples,
            "chunkserver_request_seconds_count",
            ("op", "write"),
        );
        write_requests += sum(&samples, "chunkserver_requests_total", ("op", "write"));
        let shards: std::collections::BTreeSet<String> = samples
            .iter()
            .filter(|s| s.name == "chunkserver_copysets")
            .filter_map(|s| {
                s.labels
                    .iter()
                    .find(|(k, _)| k == "shard")
                    .map(|(_, v)| v.clone())
            })
            .collect();
        assert_eq!(shards.len(), 2, "both shards report: {body}");
        let status: serde_json::Value = serde_json::from_str(&get(port, "/status")).expect("JSON");
        copysets_reported += status["copysets"].as_array().map_or(0, |c| c.len());
        // The shard, copyset and connection figures are there and moved.
        let total = |name: &str| -> f64 {
            samples
                .iter()
                .filter(|s| s.name == name)
                .map(|s| s.value)
                .sum()
        };
        for name in [
            "chunkserver_wal_flush_seconds_count",
            "chunkserver_reactor_busy_ms",
            "chunkserver_reactor_tasks",
            "chunkserver_frames_total",
            "chunkserver_frame_bytes_total",
            "chunkserver_connections_accepted_total",
        ] {
            assert!(total(name) > 0.0, "{name} did not move: {body}");
        }
        assert!(
            samples
                .iter()
                .any(|s| s.name == "chunkserver_requests_in_flight"),
            "{body}"
        );
        for copyset in ["1", "2"] {
            let applied = samples
                .iter()
                .find(|s| {
                    s.name == "chunkserver_copyset_applied_index"
                        && s.labels.contains(&("copyset".into(), copyset.into()))
                })
                .map(|s| s.value);
            assert!(
                applied.is_some_and(|a| a >= (WRITES / 2) as f64),
                "copyset {copyset}'s applied index: {applied:?}"
            );
        }
        applied_leaders += samples
            .iter()
            .filter(|s| s.name == "chunkserver_copyset_role" && s.value == 3.0)
            .count();
    }
    assert_eq!(
        applied_leaders, 2,
        "one leader per copyset in the role gauges"
    );
    assert_eq!(
        writes_ok, WRITES as f64,
        "every acknowledged write counted once, on its leader"
    );
    // Redirected attempts are requests too: every one is in the summary, none twice.
    assert!(write_requests >= WRITES as f64);
    assert_eq!(
        write_latencies, write_requests,
        "the latency summaries carry every write request"
    );
    assert_eq!(copysets_reported, 6, "two copysets on three nodes");
    for node in &mut nodes {
        node.stop();
    }
}
