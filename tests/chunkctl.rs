//! `chunkctl` against three real chunkserver processes: create a copyset, see its leader in
//! `status` (text and JSON), `health` passes, and fails once a node is gone.

mod common;

use std::time::{Duration, Instant};

use common::{chunkctl, free_ports, start, text, write_config, write_config_sized, Cluster, Sizes};

#[test]
fn chunkctl_creates_reports_and_checks_health() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let configs: Vec<_> = (1..=3)
        .map(|id| write_config(dir.path(), id, &ports))
        .collect();
    let mut cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };
    let config = &configs[0];

    let created = chunkctl(
        config,
        &["copyset", "create", "--id", "5", "--peers", "1,2,3"],
    );
    assert!(created.status.success(), "{}", text(&created));

    // A leader is elected within a few election timeouts.
    let started = Instant::now();
    loop {
        let health = chunkctl(config, &["health"]);
        if health.status.success() {
            assert!(
                text(&health).contains("healthy: 1 copyset(s) on 3 node(s)"),
                "{}",
                text(&health)
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never healthy: {}",
            text(&health)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = chunkctl(config, &["status"]);
    assert!(status.status.success());
    let out = text(&status);
    assert_eq!(out.matches(" leader ").count(), 1, "one leader: {out}");
    assert_eq!(out.matches(" follower ").count(), 2, "two followers: {out}");

    let json = chunkctl(config, &["--json", "status"]);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON status");
    assert_eq!(parsed["copysets"][0]["copyset"], 5);
    assert_eq!(
        parsed["copysets"][0]["replicas"]
            .as_array()
            .map(|r| r.len()),
        Some(3)
    );

    // Take node 3 away: health reports it and exits non-zero.
    if let Some(mut child) = cluster.children[2].take() {
        child.kill().expect("kill node 3");
        child.wait().expect("reap");
    }
    let health = chunkctl(config, &["health"]);
    assert_eq!(health.status.code(), Some(1), "{}", text(&health));
    assert!(
        text(&health).contains("node 3 unreachable"),
        "{}",
        text(&health)
    );
}

#[test]
fn chunkctl_replaces_a_node_and_changes_peers() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    // Every node has an admin token: reset-peers needs it (issue 25, item 8).
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "chunkctl-test-admin-token\n").expect("token file");
    let configs: Vec<_> = (1..=4)
        .map(|id| {
            let path = write_config(dir.path(), id, &ports);
            let mut text = std::fs::read_to_string(&path).expect("read config");
            text.push_str(&format!(
                "\n[admin]\ntoken_file = \"{}\"\n",
                token_file.display()
            ));
            std::fs::write(&path, text).expect("write config");
            path
        })
        .collect();
    let mut cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };
    let config = &configs[0];
    let created = chunkctl(
        config,
        &["copyset", "create", "--id", "5", "--peers", "1,2,3"],
    );
    assert!(created.status.success(), "{}", text(&created));

    // Replace node 3 by node 4 (joint consensus, left automatically). Node 4's replica starts
    // empty and learns the copyset from the leader's snapshot.
    let replaced = chunkctl(
        config,
        &["copyset", "change-peers", "--id", "5", "--peers", "1,2,4"],
    );
    assert!(replaced.status.success(), "{}", text(&replaced));
    assert_eq!(text(&replaced).trim(), "copyset 5: voters [1, 2, 4]");

    let removed = chunkctl(
        config,
        &[
            "--json",
            "copyset",
            "remove-peer",
            "--id",
            "5",
            "--node",
            "2",
        ],
    );
    assert!(removed.status.success(), "{}", text(&removed));
    let parsed: serde_json::Value = serde_json::from_slice(&removed.stdout).expect("JSON");
    assert_eq!(parsed["voters"], serde_json::json!([1, 4]));

    let added = chunkctl(
        config,
        &[
            "copyset",
            "add-peer",
            "--id",
            "5",
            "--node",
            "2",
            "--initial-peers",
            "1,2,3",
        ],
    );
    assert!(added.status.success(), "{}", text(&added));
    assert_eq!(text(&added).trim(), "copyset 5: voters [1, 2, 4]");

    // Status shows the membership each replica uses; node 4 is a voter on the leader.
    let json = chunkctl(config, &["--json", "status"]);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON status");
    let replicas = parsed["copysets"][0]["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let leader = replicas
        .iter()
        .find(|r| r["role"] == "leader")
        .expect("a leader");
    assert_eq!(leader["voters"], serde_json::json!([1, 2, 4]), "{parsed}");

    // Node 4 is killed and restarted from its files: it knows the new membership, and it
    // follows the membership changes made after its restart.
    if let Some(mut child) = cluster.children[3].take() {
        child.kill().expect("kill node 4");
        child.wait().expect("reap");
    }
    cluster.children[3] = Some(start(&configs[3]));
    let removed = chunkctl(
        config,
        &["copyset", "remove-peer", "--id", "5", "--node", "2"],
    );
    assert!(removed.status.success(), "{}", text(&removed));
    assert_eq!(text(&removed).trim(), "copyset 5: voters [1, 4]");
    let started = Instant::now();
    loop {
        let json = chunkctl(config, &["--json", "status"]);
        let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
        let replicas = parsed["copysets"][0]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let node = |id: u64| replicas.iter().find(|r| r["node"] == id).cloned();
        let (Some(leader), Some(four)) = (replicas.iter().find(|r| r["role"] == "leader"), node(4))
        else {
            assert!(started.elapsed() < Duration::from_secs(20), "{parsed}");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if four["applied"] == leader["applied"] && four["voters"] == serde_json::json!([1, 4]) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "restarted node 4 does not catch up: {parsed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The replicas of the removed nodes go, chunks and all.
    for node in ["2", "3"] {
        let deleted = chunkctl(config, &["copyset", "delete", "--id", "5", "--node", node]);
        assert!(deleted.status.success(), "{}", text(&deleted));
        assert_eq!(
            text(&deleted).trim(),
            format!("copyset 5: replica on node {node} deleted")
        );
    }
    let again = chunkctl(config, &["copyset", "delete", "--id", "5", "--node", "3"]);
    assert_eq!(again.status.code(), Some(1), "an error: {}", text(&again));
    assert_eq!(
        text(&again).trim(),
        "error: delete copyset on copyset 5 refused: CopysetNotFound"
    );

    // Node 4 dies for good: {1, 4} has no quorum. Reset node 1's peers to itself.
    if let Some(mut child) = cluster.children[3].take() {
        child.kill().expect("kill node 4");
        child.wait().expect("reap");
    }
    let token = token_file.to_string_lossy().into_owned();
    let reset_args = ["copyset", "reset-peers", "--id", "5", "--peers", "1"];
    let unconfirmed = chunkctl(
        config,
        &[&reset_args[..], &["--admin-token-file", &token]].concat(),
    );
    assert!(!unconfirmed.status.success(), "{}", text(&unconfirmed));
    assert!(
        text(&unconfirmed).contains("needs the caller's confirmation"),
        "{}",
        text(&unconfirmed)
    );
    let reset = chunkctl(
        config,
        &[
            &reset_args[..],
            &["--admin-token-file", &token, "--confirm-data-loss"],
        ]
        .concat(),
    );
    assert!(reset.status.success(), "{}", text(&reset));
    assert_eq!(
        text(&reset).trim(),
        "copyset 5: voters reset to [1] (without consensus)"
    );
    // The same again (idempotent), as JSON: the one command the `--json` shape test leaves
    // out, since it needs the admin token.
    let again = chunkctl(
        config,
        &[
            &["--json"][..],
            &reset_args[..],
            &["--admin-token-file", &token, "--confirm-data-loss"],
        ]
        .concat(),
    );
    assert!(again.status.success(), "{}", text(&again));
    let parsed: serde_json::Value = serde_json::from_slice(&again.stdout).expect("JSON");
    assert_eq!(parsed["copyset"], 5, "{parsed}");
    assert_eq!(parsed["voters"], serde_json::json!([1]), "{parsed}");
    let started = Instant::now();
    loop {
        let json = chunkctl(config, &["--json", "status"]);
        let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
        let replicas = parsed["copysets"][0]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let one = replicas.iter().find(|r| r["node"] == 1).cloned();
        if one.is_some_and(|r| r["role"] == "leader" && r["voters"] == serde_json::json!([1])) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "node 1 does not lead alone after the reset: {parsed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn chunkctl_creates_lists_shows_and_deletes_volumes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let configs: Vec<_> = (1..=3)
        .map(|id| write_config(dir.path(), id, &ports))
        .collect();
    let _cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };
    let config = &configs[0];
    let create = |name: &str, size: &str| {
        chunkctl(
            config,
            &[
                "volume",
                "create",
                "--name",
                name,
                "--size",
                size,
                "--copyset",
                "2",
            ],
        )
    };
    let created = create("vol0", "64MiB");
    assert!(created.status.success(), "{}", text(&created));
    assert_eq!(
        text(&created).trim(),
        "volume vol0: 67108864 bytes on copyset 2, chunks 1099511627776..1099511627840 \
         (64 of 1048576 bytes)"
    );
    let again = create("vol0", "8MiB");
    assert!(!again.status.success(), "{}", text(&again));
    assert_eq!(text(&again).trim(), "error: volume \"vol0\" exists already");
    let second = create("vol1", "8MiB");
    assert!(second.status.success(), "{}", text(&second));

    let listed = chunkctl(config, &["volume", "list"]);
    assert!(listed.status.success(), "{}", text(&listed));
    let lines: Vec<String> = text(&listed).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[1].starts_with("vol0") && lines[1].ends_with(" 64"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("vol1") && lines[2].ends_with(" 8"),
        "{lines:?}"
    );

    let info = chunkctl(config, &["--json", "volume", "info", "--name", "vol1"]);
    assert!(info.status.success(), "{}", text(&info));
    let parsed: serde_json::Value = serde_json::from_slice(&info.stdout).expect("JSON");
    assert_eq!(parsed["size"], 8 << 20);
    assert_eq!(
        parsed["first_chunk"],
        (1u64 << 40) + 64,
        "after vol0's chunks"
    );

    let deleted = chunkctl(config, &["volume", "delete", "--name", "vol0"]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert_eq!(text(&deleted).trim(), "volume vol0 deleted");
    let missing = chunkctl(config, &["volume", "info", "--name", "vol0"]);
    assert!(!missing.status.success());
    assert_eq!(text(&missing).trim(), "error: no volume named \"vol0\"");
    let listed = chunkctl(config, &["--json", "volume", "list"]);
    let parsed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    assert_eq!(parsed["volumes"].as_array().map(Vec::len), Some(1));
}

/// Issue 24: chunkctl's exit codes — 2 for bad usage (arguments, an unreadable
/// configuration), 3 when no node of the cluster answers (its deadline passes), 1 for an
/// error the cluster answers with (checked in the tests above).
#[test]
fn chunkctl_exit_codes_say_usage_and_unavailable_apart() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let config = write_config(dir.path(), 1, &ports);
    let usage = chunkctl(&config, &["scheduler", "sideways"]);
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage));
    let flag = chunkctl(&config, &["volume", "list", "--no-such-flag"]);
    assert_eq!(flag.status.code(), Some(2), "{}", text(&flag));
    let missing = chunkctl(&dir.path().join("none.toml"), &["status"]);
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing));
    // No node runs: the metadata copyset cannot be read before the deadline.
    let unavailable = chunkctl(&config, &["volume", "list"]);
    assert_eq!(unavailable.status.code(), Some(3), "{}", text(&unavailable));
}

/// Issue 24: every chunkctl command with `--json` prints one JSON object on stdout, with the
/// keys a script reads (progress events of long operations go to stderr). Three nodes on
/// 127.0.0.1–.3, so that a pool can be placed.
#[test]
fn every_chunkctl_command_prints_one_json_object_with_its_keys() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let hosts: Vec<String> = (1..=3).map(|n| format!("127.0.0.{n}")).collect();
    let sizes = Sizes {
        device: "2GiB",
        wal: "64MiB",
        chunk: "4MiB",
    };
    let configs: Vec<_> = (1..=3)
        .map(|id| write_config_sized(dir.path(), id, &hosts, &ports, &sizes, 1))
        .collect();
    let _cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };
    let config = &configs[0];
    let json = |args: &[&str], keys: &[&str]| -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let began = std::time::Instant::now();
        let output = loop {
            let output = chunkctl(config, &all);
            // Only the first commands may meet nodes still starting.
            if output.status.success() || began.elapsed() > Duration::from_secs(30) {
                break output;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        assert!(output.status.success(), "{args:?}: {}", text(&output));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(stdout.lines().count(), 1, "{args:?}: one line: {stdout}");
        let value: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"));
        assert!(value.is_object(), "{args:?}: {value}");
        for key in keys {
            assert!(value.get(key).is_some(), "{args:?}: no {key:?} in {value}");
        }
        value
    };
    json(
        &["copyset", "create", "--id", "7", "--peers", "1,2,3"],
        &["created", "peers"],
    );
    let began = Instant::now();
    while !chunkctl(config, &["health"]).status.success() {
        assert!(began.elapsed() < Duration::from_secs(30), "no leader");
        std::thread::sleep(Duration::from_millis(200));
    }
    json(&["status"], &["copysets", "unreachable"]);
    json(&["health"], &["healthy", "problems"]);
    json(
        &["copyset", "transfer-leader", "--id", "7", "--to", "2"],
        &["copyset", "transfer_to"],
    );
    let membership = ["copyset", "voters", "voters_outgoing", "learners"];
    json(
        &["copyset", "remove-peer", "--id", "7", "--node", "3"],
        &membership,
    );
    json(
        &["copyset", "delete", "--id", "7", "--node", "3"],
        &["copyset", "deleted_on"],
    );
    json(
        &["copyset", "add-peer", "--id", "7", "--node", "3"],
        &membership,
    );
    json(
        &["copyset", "change-peers", "--id", "7", "--peers", "1,2,3"],
        &membership,
    );
    json(&["scrub", "--copyset", "7"], &["scrubbed"]);
    json(
        &["volume", "create", "--name", "v", "--size", "64MiB"],
        &["name", "size", "layout", "segments"],
    );
    json(&["volume", "list"], &["volumes"]);
    json(
        &["volume", "info", "--name", "v"],
        &["name", "size", "chunks"],
    );
    json(
        &["volume", "map", "--name", "v"],
        &["volume", "segments", "allocated"],
    );
    json(&["pool"], &["pool"]);
    json(&["topology"], &["service", "nodes"]);
    json(&["scheduler", "pause"], &["paused"]);
    json(&["scheduler", "resume"], &["paused"]);
    json(&["scheduler", "status"], &["paused"]);
    json(&["scheduler", "operators"], &["service", "operators"]);
    json(
        &[
            "volume", "snapshot", "create", "--volume", "v", "--name", "s",
        ],
        &["name", "seq", "state", "chunks"],
    );
    json(
        &["volume", "snapshot", "list", "--volume", "v"],
        &["volume", "snapshots"],
    );
    json(
        &["volume", "snapshot", "info", "--volume", "v", "--name", "s"],
        &["volume", "snapshots"],
    );
    json(
        &["volume", "clone", "--from", "v@s", "--name", "c"],
        &["cloned", "from"],
    );
    json(
        &["volume", "rollback", "--name", "v", "--to", "s"],
        &["volume", "rolled_back_to"],
    );
    json(
        &[
            "volume", "snapshot", "delete", "--volume", "v", "--name", "s",
        ],
        &["deleted", "volume"],
    );
    json(&["volume", "delete", "--name", "c"], &["deleted"]);

    // Output into a pipe closed early (`chunkctl status | head -1`) ends chunkctl quietly.
    let mut piped = std::process::Command::new(env!("CARGO_BIN_EXE_chunkctl"))
        .arg("--config")
        .arg(config)
        .arg("status")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("chunkctl");
    drop(piped.stdout.take());
    let ended = piped.wait_with_output().expect("chunkctl");
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
