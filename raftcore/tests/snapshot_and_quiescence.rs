//! InstallSnapshot in pieces (resumable after a lost piece), log compaction, and quiescence of
//! idle groups.

mod common;

use bytes::Bytes;
use common::Cluster;
use raftcore::{Config, LogIndex, LogStorage, MessageType, NodeId, StorageError};

fn small_pieces(config: &mut Config) {
    config.snapshot_piece_bytes = 16;
    config.max_inflight_msgs = 2;
    config.snapshot_retry_ticks = 3;
}

/// Leader 1 compacts its log while node 3 is cut off, with a 100-byte snapshot.
fn cluster_with_compacted_leader() -> (Cluster, LogIndex) {
    let mut c = Cluster::new(&[1, 2, 3], small_pieces);
    c.elect(1);
    c.isolate(3);
    for i in 0..10u8 {
        c.propose(1, &[i; 8]);
    }
    let applied = c.nodes[&NodeId(1)].raft().log.applied;
    let conf = c.nodes[&NodeId(1)].raft().conf_state().clone();
    let data: Vec<u8> = (0..100u8).collect();
    c.node(1)
        .store_mut()
        .create_snapshot(applied, conf, Bytes::from(data))
        .unwrap();
    assert_eq!(
        c.node(1).store().term(LogIndex(2)),
        Err(StorageError::Compacted)
    );
    (c, applied)
}

#[test]
fn follower_behind_the_compaction_point_is_caught_up_by_a_snapshot_in_pieces() {
    let (mut c, snapshot_index) = cluster_with_compacted_leader();
    c.heal();
    c.tick_all(3);
    let pieces = c
        .delivered
        .iter()
        .filter(|m| m.msg_type == MessageType::Snapshot)
        .count();
    assert!(pieces >= 7, "100 bytes in 16-byte pieces: {pieces} pieces");
    assert_eq!(c.snapshots_installed.get(&NodeId(3)), Some(&1));
    let leader_data = c.node(1).store().snapshot().data.clone();
    assert_eq!(c.node(3).store().snapshot().data, leader_data);
    assert!(c.committed(3) >= snapshot_index);
    c.propose(1, b"after");
    assert_eq!(c.applied_data(3), vec![Bytes::from_static(b"after")]);
}

#[test]
fn lost_snapshot_piece_is_resent_from_the_last_confirmed_offset() {
    let (mut c, _) = cluster_with_compacted_leader();
    let mut seen = 0;
    c.drop_if = Some(Box::new(move |m| {
        if m.msg_type == MessageType::Snapshot {
            seen += 1;
            return seen == 3;
        }
        false
    }));
    c.heal();
    c.tick_all(12);
    let offsets: Vec<u64> = c
        .delivered
        .iter()
        .filter_map(|m| m.snapshot.as_ref().map(|s| s.offset))
        .collect();
    assert!(
        offsets.contains(&32),
        "the lost piece at 32 was resent: {offsets:?}"
    );
    assert!(
        offsets.iter().filter(|o| **o == 0).count() == 1,
        "resumed, not restarted from 0: {offsets:?}"
    );
    assert_eq!(c.snapshots_installed.get(&NodeId(3)), Some(&1));
    let leader_data = c.node(1).store().snapshot().data.clone();
    assert_eq!(c.node(3).store().snapshot().data, leader_data);
}

fn quiesce_quickly(config: &mut Config) {
    config.quiesce_after_ticks = 3;
}

fn heartbeats(c: &Cluster, from: usize) -> usize {
    c.delivered[from..]
        .iter()
        .filter(|m| m.msg_type == MessageType::Heartbeat)
        .count()
}

#[test]
fn idle_group_stops_heartbeating() {
    let mut c = Cluster::new(&[1, 2, 3], quiesce_quickly);
    c.elect(1);
    c.propose(1, b"x");
    c.tick_all(10);
    assert!((1..=3).all(|id| c.nodes[&NodeId(id)].raft().is_quiescent()));
    let before = c.delivered.len();
    c.tick_all(100);
    assert_eq!(heartbeats(&c, before), 0);
    assert!(c
        .nodes
        .values()
        .all(|n| n.raft().term == c.nodes[&NodeId(1)].raft().term));
}

#[test]
fn proposal_wakes_a_quiescent_group() {
    let mut c = Cluster::new(&[1, 2, 3], quiesce_quickly);
    c.elect(1);
    c.tick_all(10);
    assert!(c.nodes[&NodeId(2)].raft().is_quiescent());
    let index = c.propose(1, b"wake");
    assert!((1..=3).all(|id| !c.nodes[&NodeId(id)].raft().is_quiescent()));
    assert!((1..=3).all(|id| c.committed(id) >= index));
    let before = c.delivered.len();
    c.tick_all(2);
    assert!(heartbeats(&c, before) > 0, "heartbeats resume");
}

#[test]
fn woken_followers_replace_a_leader_that_failed_while_quiescent() {
    let mut c = Cluster::new(&[1, 2, 3], quiesce_quickly);
    c.elect(1);
    c.tick_all(10);
    c.isolate(1);
    c.tick_all(50);
    assert_eq!(c.leader(), Some(NodeId(1)), "asleep: nobody notices");
    // The driver's failure detector wakes the group.
    c.node(2).wake();
    c.node(3).wake();
    c.tick_all(40);
    let leader = c.leader().unwrap();
    assert_ne!(leader, NodeId(1));
    assert!(c.nodes[&leader].raft().term > c.nodes[&NodeId(1)].raft().term);
}

#[test]
fn quiescent_leader_refuses_lease_reads() {
    let mut c = Cluster::new(&[1, 2, 3], quiesce_quickly);
    c.elect(1);
    c.tick_all(10);
    assert!(c.nodes[&NodeId(1)].raft().is_quiescent());
    assert!(c.node(1).lease_read(Bytes::new()).is_err());
}

#[test]
fn restarted_peer_hands_out_only_entries_after_its_applied_index() {
    let mut c = Cluster::new(&[1, 2, 3], common::default_config);
    c.elect(1);
    for i in 0..4u8 {
        c.propose(1, &[i]);
    }
    let applied = c.nodes[&NodeId(2)].raft().log.applied;
    let storage = c.nodes.remove(&NodeId(2)).unwrap().into_store();
    // The state machine recovered everything but the last two entries.
    let mut config = c.config(2);
    config.applied = LogIndex(applied.0 - 2);
    let mut node = raftcore::RawNode::new(config, storage).unwrap();
    let ready = node.ready().unwrap();
    let indexes: Vec<u64> = ready.committed_entries.iter().map(|e| e.index.0).collect();
    assert_eq!(indexes, vec![applied.0 - 1, applied.0]);
}
