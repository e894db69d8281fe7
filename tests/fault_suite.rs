//! The fault suite (issue 11), bounded for CI: three real `chunkserver run` processes in their
//! own network namespaces (loopback, without partitions, where namespaces cannot be made), a
//! recorded register workload, and a seeded schedule of kills, pauses and partitions; then the
//! history must be linearizable, nothing acknowledged lost, the cluster healthy again within a
//! bound. `FAULT_SECONDS` and `FAULT_SEED` override the defaults; `scripts/fault-suite SECONDS
//! SEED` runs long schedules by hand.

mod common;
mod fault;

use fault::checker::{check_register, Op, OpKind, Outcome};

fn op(kind: OpKind, start: u64, end: u64, outcome: Outcome) -> Op {
    Op {
        register: 0,
        kind,
        start,
        end,
        outcome,
    }
}

fn write(value: u64, start: u64, end: u64) -> Op {
    op(OpKind::Write(value), start, end, Outcome::Ok(None))
}

fn read(value: Option<u64>, start: u64, end: u64) -> Op {
    op(OpKind::Read, start, end, Outcome::Ok(value))
}

#[test]
fn checker_accepts_sequential_and_concurrent_histories() {
    let sequential = [
        read(None, 0, 1),
        write(1, 2, 3),
        read(Some(1), 4, 5),
        write(2, 6, 7),
        read(Some(2), 8, 9),
    ];
    assert_eq!(check_register(&sequential), Ok(()));
    // A read overlapping a write may see either value; two overlapping reads may disagree
    // as long as an order exists (old, then new).
    let concurrent = [
        write(1, 0, 1),
        write(2, 2, 10),
        read(Some(1), 3, 4),
        read(Some(2), 5, 6),
        read(Some(2), 11, 12),
    ];
    assert_eq!(check_register(&concurrent), Ok(()));
}

#[test]
fn checker_rejects_stale_reads_and_values_from_nowhere() {
    // Write 2 was acknowledged before the read began; reading 1 is stale.
    let stale = [write(1, 0, 1), write(2, 2, 3), read(Some(1), 4, 5)];
    assert!(check_register(&stale).is_err());
    // New, then old, in two reads that do not overlap: no order explains it.
    let flip = [
        write(1, 0, 1),
        write(2, 2, 20),
        read(Some(2), 3, 4),
        read(Some(1), 5, 6),
    ];
    assert!(check_register(&flip).is_err());
    // A read of a value nobody wrote.
    assert!(check_register(&[write(1, 0, 1), read(Some(9), 2, 3)]).is_err());
    // A read of a value written only after the read ended.
    assert!(check_register(&[read(Some(1), 0, 1), write(1, 2, 3)]).is_err());
    // A torn page.
    assert!(check_register(&[op(OpKind::Read, 0, 1, Outcome::Corrupt)]).is_err());
}

#[test]
fn checker_lets_unknown_writes_land_late_or_never_but_not_early() {
    let unknown = |value, start, end| op(OpKind::Write(value), start, end, Outcome::Unknown);
    // The client gave up on 2, which then landed after write 3 was acknowledged.
    let late = [
        write(1, 0, 1),
        unknown(2, 2, 3),
        write(3, 4, 5),
        read(Some(3), 6, 7),
        read(Some(2), 8, 9),
    ];
    assert_eq!(check_register(&late), Ok(()));
    // Never landed: fine.
    let never = [write(1, 0, 1), unknown(2, 2, 3), read(Some(1), 4, 5)];
    assert_eq!(check_register(&never), Ok(()));
    // Seen before it began: impossible.
    let early = [write(1, 0, 1), read(Some(2), 2, 3), unknown(2, 4, 5)];
    assert!(check_register(&early).is_err());
    // A refused write never happened.
    let refused = [
        write(1, 0, 1),
        op(OpKind::Write(2), 2, 3, Outcome::Failed),
        read(Some(2), 4, 5),
    ];
    assert!(check_register(&refused).is_err());
}

#[test]
fn checker_handles_long_histories() {
    // 20 000 ops, writes overlapping reads in pairs: linear time, not exponential.
    let mut ops = Vec::new();
    for i in 0..10_000u64 {
        let t = i * 10;
        ops.push(write(i + 1, t, t + 6));
        ops.push(read(
            Some(if i % 2 == 0 { i } else { i + 1 }).filter(|&v| v > 0),
            t + 2,
            t + 8,
        ));
    }
    assert_eq!(check_register(&ops), Ok(()));
    ops.push(read(Some(5), 200_000, 200_001));
    assert!(check_register(&ops).is_err());
}

/// About a minute in debug builds: 30 s of faults, then recovery and checks.
#[test]
fn seeded_faults_lose_no_acknowledged_write_and_stay_linearizable() {
    fault::run(fault::Settings::from_env(30, 11));
}

/// The realistic profile (issue 17), bounded for CI: 256 MiB WALs, 16 MiB chunks, six
/// copysets per shard, a GiB filled by fio through `chunkserver nbd` before the faults and
/// verified writes during them; afterwards every copyset is led again within 10 s.
/// `scripts/fault-suite --profile realistic SECONDS SEED` runs it for longer.
#[test]
fn realistic_sizes_under_faults_keep_every_copyset_led_and_fio_verified() {
    let mut settings = fault::Settings::from_env(40, 17);
    settings.profile = fault::Profile::Realistic;
    fault::run(settings);
}

/// Found by the fault suite: once the leader's WAL is half full it checkpoints and compacts
/// its log up to its own applied index, so a follower that was down meanwhile needs a
/// snapshot; before snapshot install existed ("snapshot install is not supported yet;
/// copyset stalls") the follower never caught up. Now it copies the chunks and follows.
#[test]
fn a_follower_down_across_a_log_compaction_catches_up() {
    use std::time::{Duration, Instant};

    use fault::workload::{self, COPYSET};

    let dir = tempfile::tempdir().expect("temporary directory");
    let hosts = vec!["127.0.0.1".to_string(); 3];
    let ports = common::free_ports(6);
    let configs = (1..=3)
        .map(|id| common::write_config_on_hosts(dir.path(), id, &hosts, &ports, "96MiB", "16MiB"))
        .collect();
    let mut nodes = fault::nodes::Nodes::start(configs, dir.path(), vec![Vec::new(); 3]);
    let addresses = workload::addresses(&hosts, &ports);
    let run = |addresses: Vec<dataplane::client::NodeAddress>, writes: u64, down: Option<u64>| {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let client = workload::client(&addresses, Duration::from_secs(10));
                if down.is_none() {
                    client
                        .create_copyset(COPYSET, &[1, 2, 3])
                        .await
                        .expect("create copyset");
                }
                for i in 0..writes {
                    let (chunk, offset) = workload::once_location(i % 64);
                    client
                        .write(COPYSET, chunk, offset, workload::page(0, i + 1), 1)
                        .await
                        .expect("write with a majority up");
                }
                let leader = client.cached_leader(COPYSET).unwrap_or(1);
                // Wait for the catch-up of every node but `down`.
                let started = Instant::now();
                loop {
                    let mut applied = Vec::new();
                    for node in (1..=3u64).filter(|&n| Some(n) != down) {
                        applied.push(
                            client
                                .copyset_status(node, COPYSET)
                                .await
                                .map(|s| s.applied),
                        );
                    }
                    let first = applied.first().cloned();
                    if applied
                        .iter()
                        .all(|a| a.is_ok() && Some(a.clone()) == first)
                    {
                        return Ok(leader);
                    }
                    if started.elapsed() > Duration::from_secs(30) {
                        return Err(format!("applied indexes did not converge: {applied:?}"));
                    }
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
            })
            .expect("client executor")
            .join()
            .expect("client thread")
    };
    let leader = run(addresses.clone(), 16, None).expect("a healthy start");
    let follower = (leader % 3) + 1;
    nodes.kill(follower as usize - 1);
    // 3000 writes of 4 KiB fill more than half of a 16 MiB WAL ring: the others checkpoint.
    run(addresses.clone(), 3000, Some(follower)).expect("the majority serves");
    std::thread::sleep(Duration::from_secs(1));
    nodes.restart(follower as usize - 1);
    let outcome = run(addresses, 0, None);
    let panics = nodes.panics();
    let tail = nodes.log_tail(follower as usize - 1, 20);
    drop(nodes);
    assert!(panics.is_empty(), "{panics:?}");
    assert!(
        outcome.is_ok(),
        "node {follower} did not catch up after a compaction: {outcome:?}; its log:\n{tail}"
    );
}

/// Disk faults in real processes, deterministically: the leader's device fails every write, so
/// it stops with exit status 3 (fail-stop) and the others go on; a follower's power is cut
/// (exit status 4, unflushed writes lost, kept or torn); both come back, catch up, and every
/// acknowledged write reads back from each of them as leader.
#[test]
fn a_failed_disk_stops_its_node_and_a_power_cut_loses_nothing_acknowledged() {
    use std::time::Duration;

    use fault::nodes::Nodes;
    use fault::workload::{self, COPYSET};

    let dir = tempfile::tempdir().expect("temporary directory");
    let hosts = vec!["127.0.0.1".to_string(); 3];
    let ports = common::free_ports(9);
    let control: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", ports[6 + i]))
        .collect();
    let configs = (1..=3)
        .map(|id| {
            let path =
                common::write_config_on_hosts(dir.path(), id, &hosts, &ports, "96MiB", "16MiB");
            let mut text = std::fs::read_to_string(&path).expect("read config");
            text.push_str(&format!(
                "\n[metrics]\naddress = \"{}\"\n\n[fault]\ninjection = true\nseed = {id}\n",
                control[id - 1]
            ));
            std::fs::write(&path, text).expect("write config");
            path
        })
        .collect();
    let mut nodes = Nodes::start(configs, dir.path(), vec![Vec::new(); 3]);
    nodes.set_control(control.clone());
    let addresses = workload::addresses(&hosts, &ports);
    // Writes values first..=last to pages 0..64 (value v to page v % 64), or with `check` reads
    // each page back and compares it with the last of those values, after waiting for the
    // three replicas to agree on their applied index. Returns the leader the client saw.
    let run = move |first: u64, last: u64, check: bool| {
        let addresses = addresses.clone();
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let client = workload::client(&addresses, Duration::from_secs(20));
                if first == 1 && !check {
                    client
                        .create_copyset(COPYSET, &[1, 2, 3])
                        .await
                        .map_err(|e| format!("create copyset: {e}"))?;
                }
                if check {
                    let started = std::time::Instant::now();
                    loop {
                        let mut applied = Vec::new();
                        for node in 1..=3u64 {
                            applied.push(
                                client
                                    .copyset_status(node, COPYSET)
                                    .await
                                    .map(|s| s.applied),
                            );
                        }
                        if applied.iter().all(|a| a.is_ok() && *a == applied[0]) {
                            break;
                        }
                        if started.elapsed() > Duration::from_secs(30) {
                            return Err(format!("the replicas did not converge: {applied:?}"));
                        }
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                    }
                }
                for value in first..=last {
                    let (chunk, offset) = workload::once_location(value % 64);
                    if check {
                        let data = client
                            .read(COPYSET, chunk, u64::from(offset), workload::PAGE as u32)
                            .await
                            .map_err(|e| format!("read of page {}: {e}", value % 64))?;
                        if data != workload::page(0, value) {
                            return Err(format!("page {} does not hold value {value}", value % 64));
                        }
                    } else {
                        client
                            .write(COPYSET, chunk, offset, workload::page(0, value), 1)
                            .await
                            .map_err(|e| format!("write {value} with a majority up: {e}"))?;
                    }
                }
                Ok::<u64, String>(client.cached_leader(COPYSET).unwrap_or(1))
            })
            .expect("client executor")
            .join()
            .expect("client thread")
    };
    let outcome = (|| -> Result<(), String> {
        let leader = run(1, 200, false)? as usize - 1;
        // Every write on the leader's device fails from now on: it must stop, with status 3.
        nodes.disk_fault(leader, "disk=errors&read=0&write=1000000", Some(3))?;
        let writes = run(201, 400, false);
        if !nodes.wait_fault_exit(leader, Duration::from_secs(20)) {
            return Err(format!("node {} runs on with a failed device", leader + 1));
        }
        writes?;
        nodes.restart(leader);
        let leader = run(337, 400, true)? as usize - 1;
        // The power of a follower goes while writes stream in: it loses what it had not
        // flushed, and the writes go on with the other two.
        let follower = (0..3).find(|&n| n != leader).ok_or("no follower")?;
        let writer = std::thread::spawn({
            let run = run.clone();
            move || run(401, 1000, false)
        });
        std::thread::sleep(Duration::from_millis(700));
        let answer = nodes.disk_fault(follower, "disk=power-cut", Some(4))?;
        if !nodes.wait_fault_exit(follower, Duration::from_secs(10)) {
            return Err(format!("node {} runs on after its power cut", follower + 1));
        }
        writer.join().map_err(|_| "writer panicked")??;
        nodes.restart(follower);
        // Every page reads back once the three agree, and again after the leader of the
        // moment is killed twice over (so another replica answers each time).
        let mut leader = run(937, 1000, true)? as usize - 1;
        for _ in 0..2 {
            nodes.kill(leader);
            run(937, 1000, false)?;
            nodes.restart(leader);
            leader = run(937, 1000, true)? as usize - 1;
        }
        println!("power cut: {answer}; fault exits {:?}", nodes.fault_exits);
        Ok(())
    })();
    let tails: Vec<String> = (0..3).map(|i| nodes.log_tail(i, 15)).collect();
    let unexpected = nodes.unexpected_exits.clone();
    let panics = nodes.panics();
    drop(nodes);
    assert!(outcome.is_ok(), "{outcome:?}; logs: {tails:#?}");
    assert!(unexpected.is_empty(), "exits nobody caused: {unexpected:?}");
    assert!(panics.is_empty(), "{panics:?}");
}
