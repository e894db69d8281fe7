//! The recovery scheduler's pure core (issue 19): from the placement service's view — each
//! node's state and labels, each pool copyset's voters, the operators already running — the
//! replacements to start now. Like the copyset generator it reads no clock and does no I/O;
//! the service around it builds the view from heartbeats and tables and carries out the
//! operators with membership changes.
//!
//! A copyset with a voter on an offline node gets a new voter on an up node in place of the
//! dead one — while a majority of its voters is up (without a quorum nothing can change it by
//! consensus: that is an operator's call, `reset-peers`). The new node keeps the failure
//! domains (not a host, or a zone when the copyset spans as many zones as voters, that a
//! remaining voter uses) and is the one with the fewest replicas, ties by id. At most
//! `max_running` operators run at once, and at most `max_per_node` add to one node, so a
//! recovery does not starve client I/O.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::CopysetId;

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Its id.
    pub node: u64,
    /// Its zone label.
    pub zone: String,
    /// Its host label.
    pub host: String,
    /// Whether it reports (`up`); anything else takes no new replica.
    pub up: bool,
    /// Whether it is offline (silent past the offline bound): its replicas are replaced.
    pub offline: bool,
}

/// Replace `remove` by `add` among `copyset`'s voters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replace {
    /// The copyset.
    pub copyset: CopysetId,
    /// Its voters now.
    pub voters: Vec<u64>,
    /// The voter on the offline node.
    pub remove: u64,
    /// Its replacement.
    pub add: u64,
}

impl Replace {
    /// The voters once the operator is done.
    pub fn target(&self) -> Vec<u64> {
        self.voters
            .iter()
            .map(|&v| if v == self.remove { self.add } else { v })
            .collect()
    }
}

/// Limits of one scheduling round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Operators running at once, over the cluster.
    pub max_running: usize,
    /// Operators adding a replica to one node at once.
    pub max_per_node: usize,
}

/// What a round found that no operator can fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stuck {
    /// A majority of the copyset's voters is down: no membership change can commit.
    NoQuorum(CopysetId),
    /// No up node can take the replica without breaking a failure domain.
    NoCandidate(CopysetId),
}

/// One round: the replacements to start (besides `running`, the copysets with an operator
/// under way) and what is stuck.
pub fn plan_recovery(
    nodes: &[NodeView],
    copysets: &[(CopysetId, Vec<u64>)],
    running: &BTreeMap<CopysetId, u64>,
    limits: Limits,
) -> (Vec<Replace>, Vec<Stuck>) {
    let by_id: BTreeMap<u64, &NodeView> = nodes.iter().map(|n| (n.node, n)).collect();
    let mut load: BTreeMap<u64, usize> = nodes.iter().map(|n| (n.node, 0)).collect();
    for (_, voters) in copysets {
        for v in voters {
            *load.entry(*v).or_default() += 1;
        }
    }
    let mut adding: BTreeMap<u64, usize> = BTreeMap::new();
    for add in running.values() {
        *adding.entry(*add).or_default() += 1;
        *load.entry(*add).or_default() += 1;
    }
    let mut started = Vec::new();
    let mut stuck = Vec::new();
    for (copyset, voters) in copysets {
        if running.contains_key(copyset) {
            continue;
        }
        let offline: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|v| by_id.get(v).map_or(true, |n| n.offline))
            .collect();
        let Some(&remove) = offline.first() else {
            continue;
        };
        let live = voters
            .iter()
            .filter(|v| by_id.get(v).is_some_and(|n| n.up))
            .count();
        if live * 2 <= voters.len() {
            stuck.push(Stuck::NoQuorum(*copyset));
            continue;
        }
        if running.len() + started.len() >= limits.max_running {
            continue;
        }
        let Some(add) = candidate(&by_id, voters, remove, &load, &adding, limits) else {
            stuck.push(Stuck::NoCandidate(*copyset));
            continue;
        };
        *adding.entry(add).or_default() += 1;
        *load.entry(add).or_default() += 1;
        started.push(Replace {
            copyset: *copyset,
            voters: voters.clone(),
            remove,
            add,
        });
    }
    (started, stuck)
}

/// The up node to take `remove`'s place among `voters`: not a voter, on a host (and, when the
/// other voters are in distinct zones, a zone) none of the others uses, under the per-node
/// limit, with the fewest replicas.
fn candidate(
    by_id: &BTreeMap<u64, &NodeView>,
    voters: &[u64],
    remove: u64,
    load: &BTreeMap<u64, usize>,
    adding: &BTreeMap<u64, usize>,
    limits: Limits,
) -> Option<u64> {
    let others: Vec<&NodeView> = voters
        .iter()
        .filter(|&&v| v != remove)
        .filter_map(|v| by_id.get(v).copied())
        .collect();
    let hosts: BTreeSet<&str> = others.iter().map(|n| n.host.as_str()).collect();
    let zones: BTreeSet<&str> = others.iter().map(|n| n.zone.as_str()).collect();
    let zones_apart = zones.len() == others.len();
    by_id
        .values()
        .filter(|n| n.up && !voters.contains(&n.node))
        .filter(|n| !hosts.contains(n.host.as_str()))
        .filter(|n| !zones_apart || !zones.contains(n.zone.as_str()))
        .filter(|n| adding.get(&n.node).copied().unwrap_or(0) < limits.max_per_node)
        .min_by_key(|n| (load.get(&n.node).copied().unwrap_or(0), n.node))
        .map(|n| n.node)
}

/// Copyset balancing (Curve's copyset scheduler): while the up node holding the most pool
/// replicas holds two or more than the one holding the fewest, move one of its replicas — of
/// a copyset whose voters are all up and that nothing else changes — to the least loaded node
/// that keeps the failure domains apart, at most `max` moves (and `limits.max_per_node` onto
/// one node). A node that joins an existing pool gets its share this way. The moves are
/// replacements of a live voter; the shell runs them only while nothing is being recovered.
pub fn plan_balance(
    nodes: &[NodeView],
    copysets: &[(CopysetId, Vec<u64>)],
    running: &BTreeMap<CopysetId, u64>,
    max: usize,
    limits: Limits,
) -> Vec<Replace> {
    let by_id: BTreeMap<u64, &NodeView> = nodes.iter().map(|n| (n.node, n)).collect();
    let mut load: BTreeMap<u64, usize> =
        nodes.iter().filter(|n| n.up).map(|n| (n.node, 0)).collect();
    for (_, voters) in copysets {
        for v in voters {
            if let Some(count) = load.get_mut(v) {
                *count += 1;
            }
        }
    }
    let mut adding: BTreeMap<u64, usize> = BTreeMap::new();
    let mut moves: Vec<Replace> = Vec::new();
    while moves.len() < max {
        let Some((&busiest, &most)) = load
            .iter()
            .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))
        else {
            break;
        };
        let least = load.values().copied().min().unwrap_or(0);
        if most < least + 2 {
            break;
        }
        let best = copysets
            .iter()
            .filter(|(c, voters)| {
                voters.contains(&busiest)
                    && !running.contains_key(c)
                    && !moves.iter().any(|m| m.copyset == *c)
                    && voters.iter().all(|v| by_id.get(v).is_some_and(|n| n.up))
            })
            .filter_map(|(c, voters)| {
                candidate(&by_id, voters, busiest, &load, &adding, limits)
                    .filter(|to| load.get(to).copied().unwrap_or(0) + 1 < most)
                    .map(|to| (load.get(&to).copied().unwrap_or(0), *c, voters, to))
            })
            .min_by_key(|(to_load, c, _, to)| (*to_load, *to, *c));
        let Some((_, copyset, voters, add)) = best else {
            break;
        };
        *load.entry(busiest).or_default() -= 1;
        *load.entry(add).or_default() += 1;
        *adding.entry(add).or_default() += 1;
        moves.push(Replace {
            copyset,
            voters: voters.clone(),
            remove: busiest,
            add,
        });
    }
    moves
}

/// Hand `copyset`'s leadership to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The copyset.
    pub copyset: CopysetId,
    /// Its leader now.
    pub from: u64,
    /// The voter to lead it.
    pub to: u64,
}

/// Leader balancing (Curve's leader scheduler): while the up node leading the most copysets
/// leads two or more than the one leading the fewest, move one of its leaderships to a voter
/// on a less loaded node — the least loaded such voter — at most `max` transfers a round and
/// never a copyset in `cooling` (moved lately). `copysets` are (copyset, voters, leader).
pub fn plan_leaders(
    nodes: &[NodeView],
    copysets: &[(CopysetId, Vec<u64>, u64)],
    cooling: &BTreeSet<CopysetId>,
    max: usize,
) -> Vec<Transfer> {
    let mut led: BTreeMap<u64, usize> =
        nodes.iter().filter(|n| n.up).map(|n| (n.node, 0)).collect();
    for (_, _, leader) in copysets {
        if let Some(count) = led.get_mut(leader) {
            *count += 1;
        }
    }
    let mut moved: BTreeSet<CopysetId> = BTreeSet::new();
    let mut transfers = Vec::new();
    while transfers.len() < max {
        let Some((&busiest, &most)) = led
            .iter()
            .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))
        else {
            break;
        };
        let least = led.values().copied().min().unwrap_or(0);
        if most < least + 2 {
            break;
        }
        let best = copysets
            .iter()
            .filter(|(c, _, leader)| {
                *leader == busiest && !cooling.contains(c) && !moved.contains(c)
            })
            .filter_map(|(c, voters, _)| {
                voters
                    .iter()
                    .filter(|v| led.get(v).is_some_and(|&count| count + 1 < most))
                    .min_by_key(|v| (led.get(v).copied().unwrap_or(0), **v))
                    .map(|to| (led.get(to).copied().unwrap_or(0), *c, *to))
            })
            .min();
        let Some((_, copyset, to)) = best else {
            break;
        };
        moved.insert(copyset);
        *led.entry(busiest).or_default() -= 1;
        *led.entry(to).or_default() += 1;
        transfers.push(Transfer {
            copyset,
            from: busiest,
            to,
        });
    }
    transfers
}

/// A copyset's leader as its own heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderView {
    /// The leading node.
    pub node: u64,
    /// Its term.
    pub term: u64,
    /// Every node its configuration names: voters, outgoing voters of a joint change, learners.
    pub members: Vec<u64>,
}

/// A replica a node reports holding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldReplica {
    /// The copyset.
    pub copyset: CopysetId,
    /// Whether the replica leads it.
    pub leading: bool,
    /// Its term.
    pub term: u64,
}

/// The replicas `node` holds that their copysets left behind (issue 19: a node that returns
/// after its replicas were replaced): the pool records voters without the node, *and* the
/// copyset's leader — another node, at a term no older than the replica's — names the node
/// nowhere in its configuration. Neither alone is enough: the pool's record lags a membership
/// change by a heartbeat, and a leader's report may predate one. A copyset outside the pool,
/// or without a leader's report, is never stale; nor is a replica that leads. The service
/// around this asks for the removal only once a replica stayed stale for a grace period, and
/// the node refuses it for a replica a membership change joined lately.
pub fn stale_replicas(
    node: u64,
    held: &[HeldReplica],
    pool: &BTreeMap<CopysetId, Vec<u64>>,
    leaders: &BTreeMap<CopysetId, LeaderView>,
) -> Vec<CopysetId> {
    held.iter()
        .filter(|replica| !replica.leading)
        .filter(|replica| {
            let Some(voters) = pool.get(&replica.copyset) else {
                return false;
            };
            let Some(leader) = leaders.get(&replica.copyset) else {
                return false;
            };
            !voters.contains(&node)
                && leader.node != node
                && leader.term >= replica.term
                && !leader.members.contains(&node)
        })
        .map(|replica| replica.copyset)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(node: u64, up: bool, offline: bool) -> NodeView {
        NodeView {
            node,
            zone: format!("z{node}"),
            host: format!("h{node}"),
            up,
            offline,
        }
    }

    const LIMITS: Limits = Limits {
        max_running: 8,
        max_per_node: 8,
    };

    #[test]
    fn an_offline_voter_is_replaced_by_the_least_loaded_node_apart() {
        let nodes = vec![
            node(1, true, false),
            node(2, true, false),
            node(3, false, true),
            node(4, true, false),
            node(5, true, false),
        ];
        let copysets = vec![
            (CopysetId(10), vec![1, 2, 3]),
            (CopysetId(11), vec![1, 2, 4]),
            (CopysetId(12), vec![3, 4, 5]),
        ];
        let (started, stuck) = plan_recovery(&nodes, &copysets, &BTreeMap::new(), LIMITS);
        assert!(stuck.is_empty());
        assert_eq!(started.len(), 2);
        // Node 5 holds one replica, node 4 two: 5 takes copyset 10's.
        assert_eq!((started[0].copyset, started[0].add), (CopysetId(10), 5));
        assert_eq!(started[0].target(), vec![1, 2, 5]);
        // Copyset 12 has 4 and 5: it can only go to 1 or 2; 2 is less loaded after... both
        // hold two; the lower id wins.
        assert_eq!((started[1].copyset, started[1].add), (CopysetId(12), 1));
    }

    #[test]
    fn no_quorum_no_candidate_running_and_limits_start_nothing() {
        let nodes = vec![
            node(1, true, false),
            node(2, false, true),
            node(3, false, true),
            node(4, true, false),
        ];
        let (started, stuck) = plan_recovery(
            &nodes,
            &[(CopysetId(1), vec![1, 2, 3])],
            &BTreeMap::new(),
            LIMITS,
        );
        assert!(started.is_empty());
        assert_eq!(stuck, vec![Stuck::NoQuorum(CopysetId(1))]);

        let mut same_host = vec![
            node(1, true, false),
            node(2, true, false),
            node(3, false, true),
        ];
        same_host.push(NodeView {
            host: "h1".into(),
            ..node(4, true, false)
        });
        let (started, stuck) = plan_recovery(
            &same_host,
            &[(CopysetId(1), vec![1, 2, 3])],
            &BTreeMap::new(),
            LIMITS,
        );
        assert!(started.is_empty(), "node 4 shares node 1's host");
        assert_eq!(stuck, vec![Stuck::NoCandidate(CopysetId(1))]);

        let nodes: Vec<NodeView> = (1..=6).map(|n| node(n, n != 3, n == 3)).collect();
        let copysets: Vec<(CopysetId, Vec<u64>)> =
            (0..4).map(|i| (CopysetId(i), vec![1, 2, 3])).collect();
        let running = BTreeMap::from([(CopysetId(0), 4)]);
        let limits = Limits {
            max_running: 2,
            max_per_node: 8,
        };
        let (started, _) = plan_recovery(&nodes, &copysets, &running, limits);
        assert_eq!(started.len(), 1, "one running, one more allowed");
        assert_ne!(started[0].copyset, CopysetId(0), "not the running one");
        let limits = Limits {
            max_running: 8,
            max_per_node: 1,
        };
        let (started, _) = plan_recovery(&nodes, &copysets, &running, limits);
        let adds: BTreeSet<u64> = started.iter().map(|r| r.add).collect();
        assert_eq!(adds.len(), started.len(), "one per node");
        assert!(!adds.contains(&4), "node 4 is taking one already");
    }

    #[test]
    fn leaders_piled_on_one_node_are_spread_within_one() {
        let nodes: Vec<NodeView> = (1..=3).map(|n| node(n, true, false)).collect();
        let copysets: Vec<(CopysetId, Vec<u64>, u64)> =
            (0..7).map(|i| (CopysetId(i), vec![1, 2, 3], 1)).collect();
        let transfers = plan_leaders(&nodes, &copysets, &BTreeSet::new(), 16);
        let mut led: BTreeMap<u64, usize> = BTreeMap::from([(1, 7), (2, 0), (3, 0)]);
        for t in &transfers {
            assert_eq!(t.from, 1);
            *led.get_mut(&t.from).unwrap() -= 1;
            *led.get_mut(&t.to).unwrap() += 1;
        }
        let (max, min) = (led.values().max().unwrap(), led.values().min().unwrap());
        assert!(max - min <= 1, "{led:?}");
        assert_eq!(transfers.len(), 4, "7 = 3 + 2 + 2");
        // Cooling copysets stay; the round limit holds; a balanced cluster moves nothing.
        let cooling: BTreeSet<CopysetId> = (0..6).map(CopysetId).collect();
        assert_eq!(plan_leaders(&nodes, &copysets, &cooling, 16).len(), 1);
        assert_eq!(
            plan_leaders(&nodes, &copysets, &BTreeSet::new(), 2).len(),
            2
        );
        let balanced: Vec<(CopysetId, Vec<u64>, u64)> = (0..6)
            .map(|i| (CopysetId(i), vec![1, 2, 3], i % 3 + 1))
            .collect();
        assert!(plan_leaders(&nodes, &balanced, &BTreeSet::new(), 16).is_empty());
        // A node that is not up takes no leadership.
        let mut down = nodes.clone();
        down[2].up = false;
        let transfers = plan_leaders(&down, &copysets, &BTreeSet::new(), 16);
        assert!(transfers.iter().all(|t| t.to == 2));
    }

    proptest! {
        #[test]
        fn replacements_keep_hosts_apart_and_never_pick_a_down_node(
            states in proptest::collection::vec(0u8..3, 4..9),
            seed in any::<u64>(),
        ) {
            let nodes: Vec<NodeView> = states
                .iter()
                .enumerate()
                .map(|(i, s)| node(i as u64 + 1, *s == 0, *s == 2))
                .collect();
            let n = nodes.len() as u64;
            let copysets: Vec<(CopysetId, Vec<u64>)> = (0..6u64)
                .map(|i| {
                    let a = (seed.wrapping_add(i)) % n + 1;
                    (CopysetId(i), vec![a, a % n + 1, (a + 1) % n + 1])
                })
                .collect();
            let (started, _) = plan_recovery(&nodes, &copysets, &BTreeMap::new(), LIMITS);
            for r in started {
                prop_assert!(nodes[r.add as usize - 1].up);
                prop_assert!(nodes[r.remove as usize - 1].offline);
                let target = r.target();
                let hosts: BTreeSet<String> =
                    target.iter().map(|v| nodes[*v as usize - 1].host.clone()).collect();
                prop_assert_eq!(hosts.len(), target.len());
            }
        }
    }

    #[test]
    fn a_replica_is_stale_only_when_pool_and_leader_both_left_it() {
        let c = |n| CopysetId(n);
        let pool: BTreeMap<CopysetId, Vec<u64>> = [
            (c(1), vec![1, 2, 3]),
            (c(2), vec![1, 2, 4]),
            (c(3), vec![1, 2, 3]),
            (c(4), vec![1, 2, 3]),
            (c(5), vec![1, 2, 3]),
        ]
        .into();
        let leader = |node, term, members: &[u64]| LeaderView {
            node,
            term,
            members: members.to_vec(),
        };
        let leaders: BTreeMap<CopysetId, LeaderView> = [
            // Replaced: the pool and the leader left node 4 out.
            (c(1), leader(1, 5, &[1, 2, 3])),
            // Node 4 is a voter still.
            (c(2), leader(1, 5, &[1, 2, 4])),
            // The pool left it, the leader's report still names it (a lagging report).
            (c(3), leader(1, 5, &[1, 2, 3, 4])),
            // The leader's report is of an older term than the replica's.
            (c(4), leader(2, 3, &[1, 2, 3])),
        ]
        .into();
        let held = |copyset, leading, term| HeldReplica {
            copyset: c(copyset),
            leading,
            term,
        };
        let replicas = [
            held(1, false, 5),
            held(2, false, 5),
            held(3, false, 5),
            held(4, false, 4),
            held(5, false, 1), // no leader's report
            held(6, false, 1), // not in the pool
        ];
        assert_eq!(stale_replicas(4, &replicas, &pool, &leaders), vec![c(1)]);
        // A leading replica is never stale, whatever the others say.
        assert!(stale_replicas(4, &[held(1, true, 9)], &pool, &leaders).is_empty());
    }

    #[test]
    fn a_joining_node_gets_replicas_until_counts_are_within_one() {
        let mut nodes: Vec<NodeView> = (1..=3).map(|n| node(n, true, false)).collect();
        let copysets: Vec<(CopysetId, Vec<u64>)> =
            (0..3).map(|i| (CopysetId(i), vec![1, 2, 3])).collect();
        let limits = Limits {
            max_running: 4,
            max_per_node: 2,
        };
        // Balanced already: nothing moves.
        assert!(plan_balance(&nodes, &copysets, &BTreeMap::new(), 4, limits).is_empty());
        nodes.push(node(4, true, false));
        let moves = plan_balance(&nodes, &copysets, &BTreeMap::new(), 4, limits);
        assert_eq!(moves.len(), 2, "{moves:?}");
        let mut load: BTreeMap<u64, i64> = [(1, 3), (2, 3), (3, 3), (4, 0)].into();
        for m in &moves {
            assert_eq!(m.add, 4);
            assert!(m.voters.contains(&m.remove) && !m.voters.contains(&m.add));
            *load.get_mut(&m.remove).unwrap() -= 1;
            *load.get_mut(&m.add).unwrap() += 1;
        }
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(max - min <= 1, "{load:?}");
        // A copyset with an operator running is left alone, and so is one with a voter down.
        let running: BTreeMap<CopysetId, u64> = copysets.iter().map(|(c, _)| (*c, 9)).collect();
        assert!(plan_balance(&nodes, &copysets, &running, 4, limits).is_empty());
        nodes[0].up = false;
        assert!(plan_balance(&nodes, &copysets, &BTreeMap::new(), 4, limits).is_empty());
    }
}
