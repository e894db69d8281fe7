//! The placement service on three in-process chunkservers (heartbeats every 100 ms, offline
//! after 1 s): nodes register through their heartbeats with the labels of their own
//! configuration, the pool is placed over what the service reports up (the `[cluster]`
//! addresses here are all 127.0.0.1, which alone could not keep replicas on distinct hosts),
//! a stopped node turns unstable then offline, and after the metadata copyset's leadership
//! moves, the new service instance knows every registered node from the node table and learns
//! their state from the next heartbeats.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{config, free_ports, with_client, Node};
use dataplane::client::Client;
use dataplane::config::Config;
use dataplane::protocol::placement::Topology;
use dataplane::volume::ensure_metadata_copyset;
use dataplane::volume::pool::{ensure_pool, PoolSettings};
use dataplane::volume_table::METADATA_COPYSET;

fn labelled(id: u32, ports: &[u16], dir: &Path) -> Config {
    let mut config = config(id, ports, dir, "mem");
    for node in &mut config.cluster.nodes {
        node.host = Some(format!("host-{}", node.id));
    }
    config.placement.heartbeat_ms = 100;
    config.placement.offline_after_ms = 1000;
    config.placement.copysets_per_node = 2;
    config
}

/// Four nodes on hosts of their own (heartbeats every 100 ms, offline after 1 s, a pool of
/// 3 copysets per node) on `backend` devices.
fn four_labelled(ports: &[u16], dir: &Path, backend: &str) -> Vec<Config> {
    (1..=4)
        .map(|id| {
            let mut config = common::config_of_cluster(id, 4, ports, dir, backend, "tcp");
            for node in &mut config.cluster.nodes {
                node.host = Some(format!("host-{}", node.id));
            }
            config.placement.heartbeat_ms = 100;
            config.placement.offline_after_ms = 1000;
            config.placement.copysets_per_node = 3;
            config
        })
        .collect()
}

/// Each node's state in the topology, once `wanted` holds of it, within 10 s.
async fn wait_for(
    client: &Client,
    what: &str,
    wanted: impl Fn(&BTreeMap<u64, String>) -> bool,
) -> Topology {
    let started = Instant::now();
    loop {
        if let Ok(topology) = client.topology().await {
            let states = topology
                .nodes
                .iter()
                .map(|n| (n.node, n.state.clone()))
                .collect();
            if wanted(&states) {
                return topology;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{what}: {states:?}"
            );
        } else {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{what}: no service"
            );
        }
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
}

/// With `up` nodes reporting: the metadata copyset on nodes 1 to 3, the pool placed over the
/// up nodes, and an 8 MiB striped volume `name` (4 MiB segments) whose first page of each MiB
/// is `block(i + seed)`. Gives the volume and the pool.
async fn pool_and_written_volume(
    client: &Rc<Client>,
    config: &Config,
    up: usize,
    name: &str,
    seed: u64,
) -> (
    dataplane::volume_table::VolumeRecord,
    Vec<dataplane::placement::tables::PoolCopyset>,
) {
    use dataplane::nbd::Export;
    ensure_metadata_copyset(client, &[1, 2, 3])
        .await
        .expect("metadata copyset");
    wait_for(client, "nodes up", |s| {
        s.len() == up && s.values().all(|v| v == "up")
    })
    .await;
    let settings = PoolSettings::for_cluster(client, config).await;
    let pool = ensure_pool(client, &settings).await.expect("the pool");
    let volume = dataplane::volume::pool::create_striped_volume(client, name, 8 << 20, 4 << 20)
        .await
        .expect("volume");
    let writer = dataplane::volume::Volume::new(volume.clone(), Rc::clone(client));
    for i in 0..8u64 {
        writer
            .write(i << 20, common::block(i + seed), false)
            .await
            .expect("write");
    }
    (volume, pool)
}

#[test]
fn nodes_register_by_heartbeat_and_the_service_tracks_their_state() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let configs: Vec<Config> = (1..=3).map(|id| labelled(id, &ports, dir.path())).collect();
    let mut nodes: Vec<Node> = configs.iter().cloned().map(Node::start).collect();
    let first_config = configs[0].clone();
    let (leader, stopped) = with_client(&ports, move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            ensure_metadata_copyset(&client, &[1, 2, 3])
                .await
                .expect("metadata copyset");
            let topology = wait_for(&client, "all up", |s| {
                s.len() == 3 && s.values().all(|v| v == "up")
            })
            .await;
            for node in &topology.nodes {
                assert_eq!(node.host, format!("host-{}", node.node));
                let last = node.last.as_ref().expect("a heartbeat");
                assert_eq!(last.shards, 1);
                assert!(last.slots_total > 0 && last.slots_free <= last.slots_total);
                assert!(
                    last.replicas
                        .iter()
                        .any(|r| r.copyset == METADATA_COPYSET.0),
                    "{last:?}"
                );
            }
            // The pool goes over the labels the nodes reported, not the config's addresses.
            let settings = PoolSettings::for_cluster(&client, &first_config).await;
            let hosts: Vec<&str> = settings.members.iter().map(|m| m.host.as_str()).collect();
            assert_eq!(hosts, ["host-1", "host-2", "host-3"]);
            let pool = ensure_pool(&client, &settings).await.expect("the pool");
            assert_eq!(pool.len(), 2);
            let leader = client.cached_leader(METADATA_COPYSET).expect("leader");
            let stopped = (1..=3).find(|&n| n != leader).expect("a follower");
            (leader, stopped)
        })
    });
    nodes[stopped as usize - 1].stop();
    with_client(&ports, move |client| {
        Box::pin(async move {
            client.set_peers(METADATA_COPYSET, &[1, 2, 3]);
            wait_for(&client, "the stopped node unstable", |s| {
                s.get(&stopped).is_some_and(|v| v == "unstable")
            })
            .await;
            wait_for(&client, "the stopped node offline", |s| {
                s.get(&stopped).is_some_and(|v| v == "offline")
            })
            .await;
            // Leadership moves to the other live node: a new view, the same registry.
            let other = (1..=3)
                .find(|&n| n != leader && n != stopped)
                .expect("node");
            let started = Instant::now();
            while client.topology().await.map(|t| t.service) != Ok(other) {
                let _ = client.transfer_leader(METADATA_COPYSET, other).await;
                glommio::timer::sleep(Duration::from_millis(200)).await;
                assert!(started.elapsed() < Duration::from_secs(10), "no transfer");
            }
            let fresh = client.topology().await.expect("topology");
            assert_eq!(fresh.nodes.len(), 3, "registered nodes outlive the leader");
            wait_for(&client, "live nodes up, the stopped one offline", |s| {
                s.get(&leader).is_some_and(|v| v == "up")
                    && s.get(&other).is_some_and(|v| v == "up")
                    && s.get(&stopped).is_some_and(|v| v == "offline")
            })
            .await;
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Four labelled nodes: a pool copyset holding a volume's chunk moves off one of its nodes
/// (membership change, then the removed replica deleted). The pool's record follows the
/// leader's heartbeat, and a client whose only idea of the copyset's nodes is the removed one
/// still reads the chunk: after its deadline it re-reads the voters from the pool.
#[test]
fn the_pool_follows_a_moved_copyset_and_a_stale_client_finds_it() {
    use common::{addresses_of_cluster, block};
    use dataplane::client::ClientConfig;
    use dataplane::nbd::Export;
    use dataplane::volume::pool::{create_striped_volume, read_pool, read_segment};
    use dataplane::volume::Volume;
    use dataplane::volume_table::VolumeLayout;

    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let configs = four_labelled(&ports, dir.path(), "mem");
    let mut nodes: Vec<Node> = configs.iter().cloned().map(Node::start).collect();
    let addresses = addresses_of_cluster(4, &ports, "tcp", 1);
    let first_config = configs[0].clone();
    common::with_client_of(addresses.clone(), move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            ensure_metadata_copyset(&client, &[1, 2, 3])
                .await
                .expect("metadata copyset");
            wait_for(&client, "four up", |s| {
                s.len() == 4 && s.values().all(|v| v == "up")
            })
            .await;
            let settings = PoolSettings::for_cluster(&client, &first_config).await;
            ensure_pool(&client, &settings).await.expect("the pool");
            let volume = create_striped_volume(&client, "m", 8 << 20, 4 << 20)
                .await
                .expect("volume");
            let VolumeLayout::Striped { id, .. } = volume.layout else {
                panic!("striped");
            };
            let writer = Volume::new(volume.clone(), Rc::clone(&client));
            writer.write(0, block(9), false).await.expect("write");
            let segment = read_segment(&client, id, 0)
                .await
                .expect("read")
                .expect("segment");
            let moved = segment.copysets[0];
            let pool = read_pool(&client).await.expect("pool");
            let before = pool
                .iter()
                .find(|c| c.copyset == moved)
                .expect("in pool")
                .peers
                .clone();
            let gone = before[2];
            let newcomer = (1..=4)
                .find(|n| !before.contains(n))
                .expect("a fourth node");
            let after: Vec<u64> = before
                .iter()
                .map(|&n| if n == gone { newcomer } else { n })
                .collect();
            client
                .set_voters(moved, &[1, 2, 3, 4], &after, &before)
                .await
                .expect("move");
            client
                .delete_copyset(moved, gone)
                .await
                .expect("delete the old replica");

            let started = Instant::now();
            loop {
                let pool = read_pool(&client).await.expect("pool");
                let mut now = pool
                    .iter()
                    .find(|c| c.copyset == moved)
                    .expect("in pool")
                    .peers
                    .clone();
                now.sort_unstable();
                let mut wanted = after.clone();
                wanted.sort_unstable();
                if now == wanted {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "pool still {now:?}"
                );
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }

            // A client that knows the copyset only at the node it left.
            let config = ClientConfig {
                deadline: Duration::from_secs(2),
                ..ClientConfig::default()
            };
            let stale = Rc::new(Client::new(&addresses, config));
            stale.set_peers(METADATA_COPYSET, &[1, 2, 3]);
            let reader = Volume::new(volume, Rc::clone(&stale));
            stale.set_peers(moved, &[gone]);
            assert_eq!(
                reader.read(0, 4096).await.expect("read after the move"),
                block(9)
            );
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 19's recovery, in process: four labelled nodes, a volume written over the pool; one
/// node stops for good. Once it is offline (1 s of silence here), the scheduler replaces its
/// voter in every copyset by the remaining node apart from the others; the new replicas catch
/// up, and each recovered copyset, led by its new replica, reads back what was written.
#[test]
fn the_scheduler_replaces_the_voters_of_a_lost_node() {
    use common::{addresses_of_cluster, block};
    use dataplane::nbd::Export;
    use dataplane::volume::pool::read_pool;
    use dataplane::volume::Volume;

    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let configs = four_labelled(&ports, dir.path(), "mem");
    let mut nodes: Vec<Node> = configs.iter().cloned().map(Node::start).collect();
    let addresses = addresses_of_cluster(4, &ports, "tcp", 1);
    let first_config = configs[0].clone();
    let volume = common::with_client_of(addresses.clone(), move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            let (volume, pool) = pool_and_written_volume(&client, &first_config, 4, "r", 100).await;
            assert!(pool.iter().filter(|c| c.peers.contains(&4)).count() >= 2);
            volume
        })
    });
    let lost_at = Instant::now();
    nodes[3].stop();
    common::with_client_of(addresses, move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            client.set_peers(METADATA_COPYSET, &[1, 2, 3]);
            // Every pool copyset has three voters again, none of them node 4.
            let started = Instant::now();
            let pool = loop {
                let pool = read_pool(&client).await.expect("pool");
                if pool
                    .iter()
                    .all(|c| c.peers.len() == 3 && !c.peers.contains(&4))
                {
                    break pool;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "not recovered: {pool:?}"
                );
                glommio::timer::sleep(Duration::from_millis(100)).await;
            };
            println!(
                "every copyset had three voters again {:.1} s after the node stopped",
                lost_at.elapsed().as_secs_f64()
            );
            // Each copyset led by each of its voters in turn reads the volume back: the new
            // replicas hold the data.
            for copyset in &pool {
                client.set_peers(copyset.copyset, &copyset.peers);
            }
            let reader = Volume::new(volume, Rc::clone(&client));
            for copyset in &pool {
                for &voter in &copyset.peers {
                    let moved = Instant::now();
                    while client
                        .copyset_status(voter, copyset.copyset)
                        .await
                        .map(|s| s.leader)
                        .ok()
                        != Some(voter)
                    {
                        let _ = client.transfer_leader(copyset.copyset, voter).await;
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                        assert!(moved.elapsed() < Duration::from_secs(10), "no transfer");
                    }
                    for i in 0..8u64 {
                        assert_eq!(
                            reader.read(i << 20, 4096).await.expect("read"),
                            block(i + 100),
                            "page {i} with copyset {} led by {voter}",
                            copyset.copyset
                        );
                    }
                }
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 19's balancing: with the scheduler paused, every pool copyset's leadership is moved
/// to node 1 and stays there; resumed, the scheduler spreads the leaders until the nodes'
/// counts differ by at most one, while a writer keeps writing without an error.
#[test]
fn paused_leaders_stay_piled_and_resumed_they_spread_within_one() {
    use dataplane::volume::pool::{read_pool, read_settings, set_scheduler_paused};

    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let configs: Vec<Config> = (1..=3)
        .map(|id| {
            let mut config = labelled(id, &ports, dir.path());
            config.placement.copysets_per_node = 6;
            config
        })
        .collect();
    let mut nodes: Vec<Node> = configs.iter().cloned().map(Node::start).collect();
    let first_config = configs[0].clone();
    with_client(&ports, move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            ensure_metadata_copyset(&client, &[1, 2, 3])
                .await
                .expect("metadata copyset");
            wait_for(&client, "all up", |s| {
                s.len() == 3 && s.values().all(|v| v == "up")
            })
            .await;
            set_scheduler_paused(&client, true).await.expect("pause");
            assert!(read_settings(&client).await.expect("settings").paused);
            let settings = PoolSettings::for_cluster(&client, &first_config).await;
            let pool = ensure_pool(&client, &settings).await.expect("the pool");
            assert_eq!(pool.len(), 6);
            let leaders =
                |client: Rc<Client>, pool: Vec<dataplane::placement::tables::PoolCopyset>| async move {
                    let mut led = BTreeMap::from([(1u64, 0usize), (2, 0), (3, 0)]);
                    for copyset in &pool {
                        let status = client
                            .copyset_status(1, copyset.copyset)
                            .await
                            .expect("status");
                        *led.entry(status.leader).or_default() += 1;
                    }
                    led
                };
            for copyset in &pool {
                let started = Instant::now();
                while client
                    .copyset_status(1, copyset.copyset)
                    .await
                    .map(|s| s.leader)
                    .ok()
                    != Some(1)
                {
                    let _ = client.transfer_leader(copyset.copyset, 1).await;
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                    assert!(started.elapsed() < Duration::from_secs(10), "no transfer");
                }
            }
            // Paused: ten scheduling rounds later, still piled.
            glommio::timer::sleep(Duration::from_millis(1000)).await;
            let piled = leaders(Rc::clone(&client), pool.clone()).await;
            assert_eq!(piled.get(&1), Some(&6), "{piled:?}");

            // Writes run while the leaderships move: a transfer under way must cost a retry,
            // never an error.
            let volume =
                dataplane::volume::pool::create_striped_volume(&client, "w", 24 << 20, 4 << 20)
                    .await
                    .expect("volume");
            let stop = Rc::new(std::cell::Cell::new(false));
            let volume = Rc::new(dataplane::volume::Volume::new(volume, Rc::clone(&client)));
            let writers: Vec<_> = (0..16u64)
                .map(|w| {
                    let (volume, stop) = (Rc::clone(&volume), Rc::clone(&stop));
                    glommio::spawn_local(async move {
                        use dataplane::nbd::Export;
                        let mut written = 0u64;
                        while !stop.get() {
                            let at = ((written * 16 + w) * 4096 * 97) % (24 << 20);
                            volume
                                .write(at, common::block(written), false)
                                .await
                                .map_err(|e| format!("write {written} at {at}: {e}"))?;
                            written += 1;
                        }
                        Ok::<u64, String>(written)
                    })
                })
                .collect();
            set_scheduler_paused(&client, false).await.expect("resume");
            let started = Instant::now();
            loop {
                let pool = read_pool(&client).await.expect("pool");
                let led = leaders(Rc::clone(&client), pool).await;
                let (max, min) = (led.values().max().copied(), led.values().min().copied());
                if max.zip(min).is_some_and(|(max, min)| max - min <= 1) {
                    println!(
                        "leaders {led:?} {:.1} s after the scheduler resumed",
                        started.elapsed().as_secs_f64()
                    );
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(20), "still {led:?}");
                glommio::timer::sleep(Duration::from_millis(200)).await;
            }
            glommio::timer::sleep(Duration::from_millis(300)).await;
            stop.set(true);
            for writer in writers {
                let written = writer
                    .await
                    .expect("no write failed while leaderships moved");
                assert!(written > 0);
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 19's failover: node 4 stops for good, and as it turns offline the placement service's
/// node (the metadata copyset's leader) stops too, coming back a second later with its data
/// (uring devices). Another node takes the service over, starts a new view, and the
/// recovery completes: every pool copyset has three voters, none of them node 4.
#[test]
fn a_new_service_leader_finishes_the_recovery() {
    use common::{addresses_of_cluster, block};
    use dataplane::nbd::Export;
    use dataplane::volume::pool::read_pool;
    use dataplane::volume::Volume;

    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let configs = four_labelled(&ports, dir.path(), "uring");
    let mut nodes: Vec<Node> = configs.iter().cloned().map(Node::start).collect();
    let addresses = addresses_of_cluster(4, &ports, "tcp", 1);
    let first_config = configs[0].clone();
    let (volume, service) = common::with_client_of(addresses.clone(), move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            let (volume, _) = pool_and_written_volume(&client, &first_config, 4, "f", 200).await;
            let service = client.topology().await.expect("topology").service;
            (volume, service)
        })
    });
    nodes[3].stop();
    std::thread::sleep(Duration::from_millis(900));
    nodes[service as usize - 1].stop();
    std::thread::sleep(Duration::from_millis(1000));
    nodes[service as usize - 1] = Node::start(configs[service as usize - 1].clone());
    common::with_client_of(addresses, move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            client.set_peers(METADATA_COPYSET, &[1, 2, 3]);
            let started = Instant::now();
            let pool = loop {
                if let Ok(pool) = read_pool(&client).await {
                    if pool
                        .iter()
                        .all(|c| c.peers.len() == 3 && !c.peers.contains(&4))
                    {
                        break pool;
                    }
                    if started.elapsed() >= Duration::from_secs(30) {
                        let operators = client.operators(None).await;
                        panic!("not recovered: {pool:?}; the service's operators: {operators:?}");
                    }
                }
                glommio::timer::sleep(Duration::from_millis(100)).await;
            };
            let now = client.topology().await.expect("topology").service;
            println!(
                "recovered {:.1} s after the service restarted (service was node {service}, \
                 now node {now})",
                started.elapsed().as_secs_f64()
            );
            for copyset in &pool {
                client.set_peers(copyset.copyset, &copyset.peers);
            }
            let reader = Volume::new(volume, Rc::clone(&client));
            for i in 0..8u64 {
                assert_eq!(
                    reader.read(i << 20, 4096).await.expect("read"),
                    block(i + 200)
                );
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 19's copyset balancing: the pool is placed over nodes 1 to 3 (node 4 not started
/// yet: every node holds a replica of every copyset); node 4 then joins, and the scheduler
/// moves replicas to it, one copyset at a time, until the nodes' replica counts differ by at
/// most one — the data written before reads back through the moved copysets.
#[test]
fn a_node_that_joins_gets_its_share_of_the_pool() {
    use common::{addresses_of_cluster, block};
    use dataplane::nbd::Export;
    use dataplane::volume::pool::read_pool;
    use dataplane::volume::Volume;

    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let configs = four_labelled(&ports, dir.path(), "mem");
    let mut nodes: Vec<Node> = configs[..3].iter().cloned().map(Node::start).collect();
    let addresses = addresses_of_cluster(4, &ports, "tcp", 1);
    let first_config = configs[0].clone();
    let volume = common::with_client_of(addresses.clone(), move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            let (volume, pool) = pool_and_written_volume(&client, &first_config, 3, "b", 200).await;
            assert!(pool.iter().all(|c| !c.peers.contains(&4)), "{pool:?}");
            volume
        })
    });
    let joined_at = Instant::now();
    nodes.push(Node::start(configs[3].clone()));
    common::with_client_of(addresses, move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            let pool = loop {
                let pool = read_pool(&client).await.expect("pool");
                let mut load: BTreeMap<u64, usize> = (1..=4).map(|n| (n, 0)).collect();
                for copyset in &pool {
                    for peer in &copyset.peers {
                        *load.entry(*peer).or_default() += 1;
                    }
                }
                let (min, max) = (
                    load.values().min().copied().unwrap_or(0),
                    load.values().max().copied().unwrap_or(0),
                );
                if max - min <= 1 && pool.iter().all(|c| c.peers.len() == 3) {
                    println!(
                        "replicas per node {load:?} {:.1} s after node 4 joined",
                        joined_at.elapsed().as_secs_f64()
                    );
                    break pool;
                }
                assert!(
                    joined_at.elapsed() < Duration::from_secs(60),
                    "not balanced: {load:?} {pool:?}"
                );
                glommio::timer::sleep(Duration::from_millis(200)).await;
            };
            for copyset in &pool {
                client.set_peers(copyset.copyset, &copyset.peers);
            }
            let reader = Volume::new(volume, Rc::clone(&client));
            for i in 0..8u64 {
                assert_eq!(
                    reader.read(i << 20, 4096).await.expect("read"),
                    block(i + 200),
                    "page {i}"
                );
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}
