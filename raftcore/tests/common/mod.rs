//! A synchronous in-memory cluster for rule tests: every ready is persisted and applied at
//! once, messages are delivered in order unless a link is cut.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use raftcore::{
    ConfChange, ConfState, Config, Entry, EntryKind, LogIndex, MemStorage, Message, NodeId,
    RawNode, ReadState, StateRole,
};

pub fn ids(list: &[u64]) -> BTreeSet<NodeId> {
    list.iter().map(|i| NodeId(*i)).collect()
}

/// Decides whether to drop a message.
pub type DropFilter = Box<dyn FnMut(&Message) -> bool>;

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, RawNode<MemStorage>>,
    /// Application entries each node applied, in order.
    pub applied: BTreeMap<NodeId, Vec<Entry>>,
    pub reads: BTreeMap<NodeId, Vec<ReadState>>,
    pub snapshots_installed: BTreeMap<NodeId, usize>,
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Every message delivered, for tests that look at the traffic.
    pub delivered: Vec<Message>,
    pub configure: fn(&mut Config),
    /// Drops a message when it answers true.
    pub drop_if: Option<DropFilter>,
}

pub fn default_config(_: &mut Config) {}

impl Cluster {
    pub fn new(voters: &[u64], configure: fn(&mut Config)) -> Cluster {
        Cluster::with_learners(voters, &[], configure)
    }

    pub fn with_learners(voters: &[u64], learners: &[u64], configure: fn(&mut Config)) -> Cluster {
        let conf = ConfState {
            voters: ids(voters),
            learners: ids(learners),
            ..Default::default()
        };
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            snapshots_installed: BTreeMap::new(),
            cut: BTreeSet::new(),
            delivered: Vec::new(),
            configure,
            drop_if: None,
        };
        for id in voters.iter().chain(learners) {
            cluster.add_node(*id, MemStorage::new_with_conf_state(conf.clone()));
        }
        cluster
    }

    pub fn config(&self, id: u64) -> Config {
        let mut config = Config::new(NodeId(id));
        config.rng_seed = id * 7919;
        (self.configure)(&mut config);
        config
    }

    pub fn add_node(&mut self, id: u64, storage: MemStorage) {
        let node = RawNode::new(self.config(id), storage).expect("valid config");
        self.nodes.insert(NodeId(id), node);
        self.applied.entry(NodeId(id)).or_default();
    }

    pub fn node(&mut self, id: u64) -> &mut RawNode<MemStorage> {
        self.nodes.get_mut(&NodeId(id)).expect("node exists")
    }

    pub fn role(&self, id: u64) -> StateRole {
        self.nodes[&NodeId(id)].raft().state
    }

    pub fn leader(&self) -> Option<NodeId> {
        let leaders: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.raft().state == StateRole::Leader)
            .map(|(id, _)| *id)
            .collect();
        leaders
            .iter()
            .max_by_key(|id| self.nodes[id].raft().term)
            .copied()
    }

    /// Persists and applies everything `id` has ready; returns the messages it sends.
    pub fn process(&mut self, id: NodeId) -> Vec<Message> {
        let mut out = Vec::new();
        for _ in 0..100 {
            let Some(node) = self.nodes.get_mut(&id) else {
                return out;
            };
            if !node.has_ready() {
                break;
            }
            let mut ready = node.ready().expect("ready");
            out.append(&mut ready.messages);
            if let Some(snapshot) = ready.snapshot.clone() {
                node.store_mut().apply_snapshot(snapshot);
                *self.snapshots_installed.entry(id).or_default() += 1;
            }
            node.store_mut().append(&ready.entries);
            if let Some(hard_state) = ready.hard_state {
                node.store_mut().set_hard_state(hard_state);
            }
            for entry in &ready.committed_entries {
                match entry.kind {
                    EntryKind::ConfChange => {
                        let change = ConfChange::decode(entry.data.clone()).expect("conf change");
                        node.apply_conf_change(&change).expect("valid conf change");
                    }
                    EntryKind::Normal if !entry.data.is_empty() => {
                        self.applied.entry(id).or_default().push(entry.clone());
                    }
                    EntryKind::Normal => {}
                }
            }
            self.reads
                .entry(id)
                .or_default()
                .extend(ready.read_states.iter().cloned());
            node.advance(&ready);
        }
        out
    }

    /// Messages `id` wants to send, without delivering them.
    pub fn take_messages(&mut self, id: u64) -> Vec<Message> {
        self.process(NodeId(id))
    }

    pub fn deliver(&mut self, msg: Message) {
        if self.cut.contains(&(msg.from, msg.to)) {
            return;
        }
        if let Some(drop_if) = self.drop_if.as_mut() {
            if drop_if(&msg) {
                return;
            }
        }
        // Every message crosses the wire format.
        let bytes = raftcore::encode_to_bytes(&msg);
        let msg = raftcore::decode(bytes).expect("own encoding decodes");
        self.delivered.push(msg.clone());
        if let Some(node) = self.nodes.get_mut(&msg.to) {
            node.step(msg).expect("step");
        }
    }

    /// Processes and delivers until nothing moves.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            let mut queue = VecDeque::new();
            for id in ids {
                queue.extend(self.process(id));
            }
            if queue.is_empty() {
                return;
            }
            while let Some(msg) = queue.pop_front() {
                self.deliver(msg);
            }
        }
        panic!("cluster did not settle");
    }

    pub fn tick_all(&mut self, ticks: u32) {
        for _ in 0..ticks {
            for node in self.nodes.values_mut() {
                node.tick();
            }
            self.settle();
        }
    }

    pub fn elect(&mut self, id: u64) {
        self.node(id).campaign();
        self.settle();
        assert_eq!(
            self.role(id),
            StateRole::Leader,
            "node {id} should have won"
        );
    }

    pub fn propose(&mut self, id: u64, data: &[u8]) -> LogIndex {
        let index = self
            .node(id)
            .propose(Bytes::copy_from_slice(data))
            .expect("propose");
        self.settle();
        index
    }

    pub fn isolate(&mut self, id: u64) {
        let others: Vec<NodeId> = self.nodes.keys().copied().filter(|n| n.0 != id).collect();
        for other in others {
            self.cut.insert((NodeId(id), other));
            self.cut.insert((other, NodeId(id)));
        }
    }

    pub fn cut_link(&mut self, from: u64, to: u64) {
        self.cut.insert((NodeId(from), NodeId(to)));
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn committed(&self, id: u64) -> LogIndex {
        self.nodes[&NodeId(id)].raft().log.committed
    }

    pub fn applied_data(&self, id: u64) -> Vec<Bytes> {
        self.applied[&NodeId(id)]
            .iter()
            .map(|e| e.data.clone())
            .collect()
    }
}
