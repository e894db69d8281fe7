use std::collections::BTreeSet;

use super::*;

fn host(cores: u32) -> HostTopology {
    let online: BTreeSet<u32> = (0..cores).collect();
    HostTopology {
        online_cores: online.clone(),
        numa_nodes: vec![(0, online)],
    }
}

const GOOD: &str = r#"
[node]
id = 1
cores = [0, 1]
data_dir = "/tmp/cs"

[listen]
peer = "tcp://127.0.0.1:7100"
client = ["tcp://127.0.0.1:7200"]

[[devices]]
backend = "mem"
size = "1GiB"
"#;

fn check(text: &str) -> Result<Resolved, ConfigError> {
    let file = Path::new("test.toml");
    Config::parse(file, text)?.validate(file, &host(2))
}

#[test]
fn a_minimal_file_is_valid_and_takes_the_defaults() {
    let file = Path::new("test.toml");
    let config = Config::parse(file, GOOD).unwrap();
    assert_eq!(config.storage, StorageSection::default());
    assert_eq!(config.raft, RaftSection::default());
    assert_eq!(check(GOOD).unwrap().cores, vec![0, 1]);
}

#[test]
fn an_unknown_key_is_named() {
    let text = GOOD.replace("[[devices]]", "[storage]\nchunk_sise = 4096\n\n[[devices]]");
    let error = check(&text).unwrap_err();
    assert!(error.key.starts_with("storage"), "{error}");
    assert!(error.message.contains("chunk_sise"), "{error}");
    assert!(!error.to_string().contains('\n'));
}

#[test]
fn a_core_that_does_not_exist_is_refused() {
    let error = check(&GOOD.replace("cores = [0, 1]", "cores = [0, 7]")).unwrap_err();
    assert_eq!(error.key, "node.cores");
    assert!(error.message.contains("core 7"), "{error}");
}

#[test]
fn a_bad_address_is_refused() {
    let error = check(&GOOD.replace("tcp://127.0.0.1:7100", "tcp://127.0.0.1")).unwrap_err();
    assert_eq!(error.key, "listen.peer");
    let error = check(&GOOD.replace("tcp://127.0.0.1:7200", "udp://127.0.0.1:7200")).unwrap_err();
    assert!(error.key.starts_with("listen.client"), "{error}");
}

#[test]
fn a_size_not_a_multiple_of_the_page_is_refused() {
    let text = GOOD.replace(
        "[[devices]]",
        "[storage]\nchunk_size = 10000\n\n[[devices]]",
    );
    let error = check(&text).unwrap_err();
    assert_eq!(error.key, "storage.chunk_size");
    let error = check(&GOOD.replace("\"1GiB\"", "1073741825")).unwrap_err();
    assert_eq!(error.key, "devices[0].size");
}

#[test]
fn a_wal_too_small_for_a_1_mib_write_is_refused_with_a_size_that_works() {
    let with_wal = |size: &str| {
        GOOD.replace(
            "[[devices]]",
            &format!("[storage]\nwal_size_per_shard = \"{size}\"\n\n[[devices]]"),
        )
    };
    let error = check(&with_wal("8MiB")).unwrap_err();
    assert_eq!(error.key, "storage.wal_size_per_shard");
    assert!(error.to_string().contains("use at least 16MiB"), "{error}");
    check(&with_wal("16MiB")).unwrap();
}

#[test]
fn a_syntax_error_names_the_line() {
    let error = check("[node]\nid = = 1\n").unwrap_err();
    assert_eq!(error.key, "line 2", "{error}");
}

#[test]
fn timings_that_cannot_work_together_are_refused() {
    let text = GOOD.replace("[[devices]]", "[raft]\nlease_ms = 1000\n\n[[devices]]");
    assert_eq!(check(&text).unwrap_err().key, "raft.lease_ms");
    let text = GOOD.replace(
        "[[devices]]",
        "[raft]\nheartbeat_interval_ms = 600\n\n[[devices]]",
    );
    assert_eq!(check(&text).unwrap_err().key, "raft.heartbeat_interval_ms");
}

#[test]
fn cores_accept_a_cpulist_and_numa() {
    assert_eq!(parse_cpulist("0-2,5").unwrap(), vec![0, 1, 2, 5]);
    assert!(parse_cpulist("3-1").is_err());
    let resolved = check(&GOOD.replace("cores = [0, 1]", "cores = \"numa\"")).unwrap();
    assert_eq!(resolved.cores, vec![0, 1]);
    let resolved = check(&GOOD.replace("cores = [0, 1]", "cores = \"1\"")).unwrap();
    assert_eq!(resolved.cores, vec![1]);
}

#[test]
fn sizes_parse_with_suffixes() {
    assert_eq!("16MiB".parse::<ByteSize>().unwrap(), ByteSize(16 << 20));
    assert_eq!("4K".parse::<ByteSize>().unwrap(), ByteSize(4096));
    assert!("12XB".parse::<ByteSize>().is_err());
    assert!("99999999999T".parse::<ByteSize>().is_err());
    assert_eq!(ByteSize(16 << 20).to_string(), "16MiB");
}

#[test]
fn every_key_is_documented_in_operations_md() {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    let config = Config::parse(Path::new("test.toml"), GOOD).unwrap();
    let value = toml::Value::try_from(&config).unwrap();
    let mut keys = Vec::new();
    collect_keys("", &value, &mut keys);
    for key in [
        "devices.path",
        "devices.bdev",
        "devices.create",
        "devices.pcie",
        "spdk.mem_size",
        "spdk.hugepages",
        "spdk.pci",
        "spdk.config_file",
        "spdk.format",
        "fault.injection",
        "fault.seed",
        "metrics.address",
        "auth.secret_file",
        "auth.key_file",
        "auth.role",
        "net.connect_timeout_ms",
        "net.request_timeout_ms",
        "net.io_timeout_ms",
        "net.rdma_device",
        "net.rdma_gid_index",
        "net.rdma_recv_ring_depth",
        "net.rdma_landing_slots",
        "cluster.nodes.id",
        "cluster.nodes.peer",
        "cluster.nodes.client",
        "cluster.nodes.shards",
    ] {
        keys.push(key.to_string());
    }
    for key in keys {
        assert!(
            docs.contains(&format!("`{key}`")),
            "docs/operations.md does not document `{key}`"
        );
    }
}

fn collect_keys(prefix: &str, value: &toml::Value, keys: &mut Vec<String>) {
    match value {
        toml::Value::Table(table) => {
            for (name, inner) in table {
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                if matches!(inner, toml::Value::Table(_) | toml::Value::Array(_))
                    && !is_leaf_array(inner)
                {
                    collect_keys(&key, inner, keys);
                } else {
                    keys.push(key);
                }
            }
        }
        toml::Value::Array(items) => {
            for item in items {
                collect_keys(prefix, item, keys);
            }
        }
        _ => keys.push(prefix.to_string()),
    }
}

fn is_leaf_array(value: &toml::Value) -> bool {
    matches!(value, toml::Value::Array(items) if items.iter().all(|i| !matches!(i, toml::Value::Table(_))))
}

/// Sizes near the top of u64 are refused with a message, not an arithmetic overflow (the
/// device-size check added the WAL rings of every shard in plain u64).
#[test]
fn absurd_wal_sizes_are_refused_not_overflowed() {
    let text = GOOD.replace(
        "[[devices]]",
        "[storage]\nwal_size_per_shard = \"16777215TiB\"\n\n[[devices]]",
    );
    let error = check(&text).unwrap_err();
    assert_eq!(error.key, "storage.wal_size_per_shard", "{error}");
    assert!(error.message.contains("larger than 1024TiB"), "{error}");
}

#[test]
fn net_settings_are_read_and_bad_ones_refused() {
    let with_net =
        |body: &str| GOOD.replace("[[devices]]", &format!("[net]\n{body}\n\n[[devices]]"));
    let text =
        with_net("connect_timeout_ms = 30000\nrdma_device = \"rxe0\"\nrdma_landing_slots = 1");
    let config = Config::parse(Path::new("test.toml"), &text).unwrap();
    assert_eq!(config.net.connect_timeout_ms, 30_000);
    assert_eq!(config.net.rdma_device.as_deref(), Some("rxe0"));
    assert_eq!(config.net.rdma_landing_slots, 1);
    assert_eq!(config.net.request_timeout_ms, defaults::REQUEST_TIMEOUT_MS);
    check(&text).unwrap();
    let context = crate::net::NetContext::from_section(&config.net);
    assert_eq!(
        context.connection.connect_timeout,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(context.rdma.landing_slots, 1);
    assert_eq!(
        check(&with_net("io_timeout_ms = 0")).unwrap_err().key,
        "net.io_timeout_ms"
    );
    assert_eq!(
        check(&with_net("rdma_recv_ring_depth = 2"))
            .unwrap_err()
            .key,
        "net.rdma_recv_ring_depth"
    );
    assert_eq!(
        check(&with_net("rdma_landing_slots = 0")).unwrap_err().key,
        "net.rdma_landing_slots"
    );
}
