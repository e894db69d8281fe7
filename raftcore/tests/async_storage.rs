//! A log store that is not always in memory (the shard WAL): reads may answer
//! `TemporarilyUnavailable`; raft must then neither spin nor lose work, and must carry on once
//! the driver reports the entries fetched.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use raftcore::{
    ConfState, Config, Entry, HardState, LogIndex, LogStorage, MemStorage, Message, NodeId,
    RawNode, SnapshotMeta, SnapshotPiece, StateRole, StorageError, Term,
};

/// MemStorage whose entries are "on disk" (TemporarilyUnavailable) while `cold` is set.
struct FetchingStorage {
    inner: MemStorage,
    cold: Rc<Cell<bool>>,
    refused: Rc<Cell<u32>>,
}

impl LogStorage for FetchingStorage {
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError> {
        self.inner.initial_state()
    }
    fn entries(&self, low: LogIndex, high: LogIndex, max: u64) -> Result<Vec<Entry>, StorageError> {
        if self.cold.get() {
            self.refused.set(self.refused.get() + 1);
            return Err(StorageError::TemporarilyUnavailable);
        }
        self.inner.entries(low, high, max)
    }
    fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        self.inner.term(index)
    }
    fn first_index(&self) -> Result<LogIndex, StorageError> {
        self.inner.first_index()
    }
    fn last_index(&self) -> Result<LogIndex, StorageError> {
        self.inner.last_index()
    }
    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError> {
        self.inner.snapshot_meta()
    }
    fn snapshot_piece(&self, i: LogIndex, o: u64, m: u64) -> Result<SnapshotPiece, StorageError> {
        self.inner.snapshot_piece(i, o, m)
    }
}

struct Group {
    nodes: Vec<RawNode<FetchingStorage>>,
    cold: Vec<Rc<Cell<bool>>>,
    refused: Vec<Rc<Cell<u32>>>,
    applied: Vec<Vec<Bytes>>,
    isolated: Option<u64>,
}

impl Group {
    fn new() -> Group {
        let conf = ConfState {
            voters: (1..=3).map(NodeId).collect(),
            ..ConfState::default()
        };
        let mut group = Group {
            nodes: Vec::new(),
            cold: Vec::new(),
            refused: Vec::new(),
            applied: vec![Vec::new(); 3],
            isolated: None,
        };
        for id in 1..=3u64 {
            let cold = Rc::new(Cell::new(false));
            let refused = Rc::new(Cell::new(0));
            let storage = FetchingStorage {
                inner: MemStorage::new_with_conf_state(conf.clone()),
                cold: cold.clone(),
                refused: refused.clone(),
            };
            group
                .nodes
                .push(RawNode::new(Config::new(NodeId(id)), storage).unwrap());
            group.cold.push(cold);
            group.refused.push(refused);
        }
        group
    }

    fn settle(&mut self) {
        let mut queue: VecDeque<Message> = VecDeque::new();
        for _ in 0..1000 {
            for i in 0..3 {
                let node = &mut self.nodes[i];
                let mut spins = 0;
                while node.has_ready() {
                    spins += 1;
                    assert!(spins < 50, "node {} spins on has_ready", i + 1);
                    let ready = node.ready().unwrap();
                    queue.extend(ready.messages.iter().cloned());
                    node.store_mut().inner.append(&ready.entries);
                    if let Some(hs) = ready.hard_state {
                        node.store_mut().inner.set_hard_state(hs);
                    }
                    for entry in &ready.committed_entries {
                        if !entry.data.is_empty() {
                            self.applied[i].push(entry.data.clone());
                        }
                    }
                    node.advance(&ready);
                }
            }
            if queue.is_empty() {
                return;
            }
            while let Some(msg) = queue.pop_front() {
                if self
                    .isolated
                    .is_some_and(|id| msg.from.0 == id || msg.to.0 == id)
                {
                    continue;
                }
                self.nodes[(msg.to.0 - 1) as usize].step(msg).unwrap();
            }
        }
        panic!("group did not settle");
    }

    fn tick(&mut self, ticks: u32) {
        for _ in 0..ticks {
            for node in &mut self.nodes {
                node.tick();
            }
            self.settle();
        }
    }
}

#[test]
fn leader_retries_appends_once_entries_are_fetched() {
    let mut g = Group::new();
    g.nodes[0].campaign();
    g.settle();
    assert_eq!(g.nodes[0].raft().state, StateRole::Leader);
    g.isolated = Some(3);
    for i in 0..5u8 {
        g.nodes[0].propose(Bytes::from(vec![i])).unwrap();
        g.settle();
    }
    assert_eq!(g.applied[1].len(), 5);
    // Node 1's log goes cold, then node 3 comes back and needs entries from storage.
    g.cold[0].set(true);
    g.isolated = None;
    g.tick(4);
    assert!(
        g.refused[0].get() > 0,
        "the leader asked and was told to wait"
    );
    assert!(g.applied[2].is_empty(), "nothing could be sent yet");
    g.cold[0].set(false);
    g.nodes[0].on_entries_fetched();
    g.settle();
    g.tick(2);
    assert_eq!(g.applied[2], g.applied[0]);
}

#[test]
fn applying_waits_for_the_fetch_report_without_spinning() {
    let mut g = Group::new();
    g.nodes[0].campaign();
    g.settle();
    g.nodes[0].propose(Bytes::from_static(b"one")).unwrap();
    g.settle();
    // Follower 2 persists the next entry but cannot read it back to apply it.
    g.isolated = Some(3);
    g.nodes[0].propose(Bytes::from_static(b"two")).unwrap();
    g.cold[1].set(true);
    g.settle();
    g.tick(3);
    assert_eq!(
        g.applied[1],
        vec![Bytes::from_static(b"one")],
        "waits, and settle saw no spin"
    );
    assert!(!g.nodes[1].has_ready() || g.refused[1].get() > 0);
    g.cold[1].set(false);
    g.nodes[1].on_entries_fetched();
    g.settle();
    assert_eq!(
        g.applied[1],
        vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")]
    );
}
