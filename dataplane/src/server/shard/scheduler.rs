//! The recovery scheduler's shell (issue 19): while this shard's replica leads the metadata
//! copyset, every heartbeat interval it builds the scheduler's view — the registered nodes
//! and their states from the placement service's heartbeats, the pool's copysets and voters
//! from the pool table — asks `placement::schedule::plan_recovery` for replacements, and
//! carries each out with the client's membership change (`set_voters`: the new node's replica
//! is created, then one joint change adds it and removes the dead voter; the new replica
//! catches up by snapshot install). The pool's record follows with the leader's next
//! heartbeat. Operators run in their own tasks; what runs is kept in memory (a new service
//! instance starts afresh, and replaying a replacement that finished is harmless: the dead
//! voter is gone, so the round plans nothing for it). While nothing is being recovered, the
//! round also balances leaders (`plan_leaders`): the node leading the most copysets hands
//! leaderships to less loaded voters until the counts are within one, a few transfers a round,
//! a moved copyset left alone for ten intervals.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use tracing::{info, warn};

use super::ShardServer;
use crate::client::{Client, ClientConfig};
use crate::ids::CopysetId;
use crate::net::queue::Notify;
use crate::placement::schedule::{
    plan_balance, plan_leaders, plan_recovery, Limits, NodeView, Replace, Stuck,
};
use crate::placement::tables::POOL_RECORD_LEN;
use crate::placement::tables::{self, PoolState, NODE_CHUNK, NODE_RECORD_LEN, POOL_CHUNK};
use crate::protocol::placement::{Operator, Operators, OperatorsRequest};
use crate::protocol::NodeAddress;
use crate::protocol::Status;
use crate::storage::bdev::Bdev;
use crate::volume_table::METADATA_COPYSET;

/// The scheduler's state on this shard.
pub(super) struct Scheduler {
    /// A client of the cluster, to carry operators out (none: no scheduling).
    client: Option<Rc<Client>>,
    /// Every node's id, for the membership changes' leader search.
    nodes: Vec<u64>,
    /// Copysets with a replacement under way.
    running: BTreeMap<CopysetId, Running>,
    /// Copysets whose operator an admin cancelled, left out of planning until the instant.
    held: BTreeMap<CopysetId, Instant>,
    /// The limits of each round.
    limits: Limits,
    /// When a stuck copyset was last reported, to say it once a minute.
    reported: BTreeMap<CopysetId, Instant>,
    /// Whether leaders are balanced.
    balance_leaders: bool,
    /// Whether replicas are balanced over the nodes (copyset counts).
    balance_copysets: bool,
    /// When each copyset's leadership was last moved (cooling), from and to which node.
    moved: BTreeMap<CopysetId, (Instant, u64, u64)>,
}

/// A replacement under way.
struct Running {
    /// What it does.
    replace: Replace,
    /// When it started.
    started: Instant,
    /// Raised by an admin's cancel: the operator's task stops waiting for its change.
    cancel: Notify,
}

/// Leadership transfers one round starts at most.
const TRANSFERS_PER_ROUND: usize = 4;
/// How long an operator waits for its new replica's snapshot install.
const INSTALL_WAIT: Duration = Duration::from_secs(1800);
/// Heartbeat intervals a moved leadership is left alone.
const COOLING_INTERVALS: u32 = 10;

impl Scheduler {
    pub(super) fn new() -> Scheduler {
        Scheduler {
            client: None,
            nodes: Vec::new(),
            running: BTreeMap::new(),
            held: BTreeMap::new(),
            limits: Limits {
                max_running: 4,
                max_per_node: 2,
            },
            reported: BTreeMap::new(),
            balance_leaders: true,
            balance_copysets: true,
            moved: BTreeMap::new(),
        }
    }
}

impl<B: Bdev + 'static> ShardServer<B> {
    /// Lets this shard schedule recoveries through a client of `nodes`, `limits` at a time,
    /// and balance leaders and replicas (each when its flag says so); the client's deadline and
    /// connection settings are `config`'s.
    pub fn set_scheduler(
        &self,
        nodes: &[NodeAddress],
        limits: Limits,
        (balance_leaders, balance_copysets): (bool, bool),
        config: ClientConfig,
    ) {
        let mut scheduler = self.scheduler.borrow_mut();
        scheduler.client = Some(Rc::new(Client::new(nodes, config)));
        scheduler.nodes = nodes.iter().map(|n| n.id).collect();
        scheduler.limits = limits;
        scheduler.balance_leaders = balance_leaders;
        scheduler.balance_copysets = balance_copysets;
    }

    /// Runs a scheduling round every heartbeat interval while this replica leads the
    /// metadata copyset.
    pub(super) async fn schedule_loop(self: Rc<Self>) {
        loop {
            let interval = self.mds.borrow().heartbeat;
            glommio::timer::sleep(interval).await;
            if self.scheduler.borrow().client.is_none() {
                continue;
            }
            if self.leading_metadata(METADATA_COPYSET).is_err() {
                continue;
            }
            self.schedule_round().await;
        }
    }

    /// One round: the view, the plan, the operators started — none while an admin paused
    /// the scheduler (`MetaOp::SchedulerPaused`, in the settings page).
    async fn schedule_round(self: &Rc<Self>) {
        if self.scheduler_paused().await {
            return;
        }
        let Some((nodes, copysets)) = self.scheduler_view().await else {
            return;
        };
        let (mut started, stuck, running, plannable) = {
            let mut scheduler = self.scheduler.borrow_mut();
            let now = Instant::now();
            scheduler.held.retain(|_, until| *until > now);
            let running: BTreeMap<CopysetId, u64> = scheduler
                .running
                .iter()
                .map(|(c, r)| (*c, r.replace.add))
                .collect();
            let plannable: Vec<_> = copysets
                .iter()
                .filter(|(c, _)| !scheduler.held.contains_key(c))
                .cloned()
                .collect();
            let (started, stuck) = plan_recovery(&nodes, &plannable, &running, scheduler.limits);
            (started, stuck, running, plannable)
        };
        self.report_stuck(&stuck);
        let recovering = !started.is_empty() || !running.is_empty();
        let (balance_copysets, balance_leaders, limits) = {
            let scheduler = self.scheduler.borrow();
            (
                scheduler.balance_copysets,
                scheduler.balance_leaders,
                scheduler.limits,
            )
        };
        if !recovering && balance_copysets {
            // One move at a time: the next round plans the next one once it is done.
            started = plan_balance(&nodes, &plannable, &running, 1, limits);
            for moved in &started {
                info!(copyset = %moved.copyset, from = moved.remove, to = moved.add,
                    "balance: moving a replica to a less loaded node");
            }
        }
        if !recovering && started.is_empty() && balance_leaders {
            self.balance_leaders(&nodes, &copysets);
        }
        for replace in started {
            self.start_operator(replace);
        }
    }

    /// Whether an admin paused the scheduler (and the background scrubber with it).
    pub(super) async fn scheduler_paused(&self) -> bool {
        let page =
            super::apply_meta::read_range(&self.engine, tables::SETTINGS_CHUNK, 0, 4096).await;
        page.ok()
            .and_then(|page| tables::Settings::decode(&page).ok())
            // A settings page that cannot be read counts as paused: the scheduler does not
            // act on what it cannot see.
            .map_or(true, |settings| settings.paused)
    }

    /// Runs `replace` in a task of its own, listed in `running` until it ends or an admin
    /// cancels it.
    fn start_operator(self: &Rc<Self>, replace: Replace) {
        let cancel = Notify::new();
        self.scheduler.borrow_mut().running.insert(
            replace.copyset,
            Running {
                replace: replace.clone(),
                started: Instant::now(),
                cancel: cancel.clone(),
            },
        );
        let server = Rc::clone(self);
        glommio::spawn_local(async move {
            let copyset = replace.copyset;
            let cancelled = futures_lite::future::or(
                async {
                    server.replace(replace).await;
                    false
                },
                async {
                    cancel.notified().await;
                    true
                },
            )
            .await;
            if cancelled {
                warn!(%copyset, "scheduler: operator cancelled by an admin");
            }
            server.scheduler.borrow_mut().running.remove(&copyset);
        })
        .detach();
    }

    /// Carries one replacement out; the copyset is free for the next round afterwards.
    async fn replace(&self, replace: Replace) {
        let (client, nodes) = {
            let scheduler = self.scheduler.borrow();
            (scheduler.client.clone(), scheduler.nodes.clone())
        };
        let Some(client) = client else {
            return;
        };
        let started = Instant::now();
        info!(copyset = %replace.copyset, remove = replace.remove, add = replace.add,
            voters = ?replace.voters, "scheduler: replacing a voter");
        let target = replace.target();
        client.set_peers(replace.copyset, &replace.voters);
        // The pool's record may lag the membership (a change that committed before a service
        // leader change, its leader's heartbeat not in yet): act on the leader's membership.
        match client.leader_membership(replace.copyset, &nodes).await {
            Ok((_, membership)) if !membership.voters.contains(&replace.remove) => {
                info!(copyset = %replace.copyset, voters = ?membership.voters,
                    "scheduler: the voter to replace is gone already");
                return;
            }
            Ok(_) => {}
            Err(error) => {
                warn!(copyset = %replace.copyset, %error,
                    "recovery: no leader answers; the next round tries again");
                return;
            }
        }
        match client
            .set_voters(replace.copyset, &nodes, &target, &replace.voters)
            .await
        {
            Ok(membership) => info!(copyset = %replace.copyset, voters = ?membership.voters,
                seconds = started.elapsed().as_secs_f64(), "recovery: voter replaced"),
            Err(error) => {
                warn!(copyset = %replace.copyset, %error,
                    "recovery: replacement failed; the next round tries again");
                return;
            }
        }
        self.wait_for_install(&client, &replace, &target).await;
        info!(copyset = %replace.copyset, node = replace.add,
            seconds = started.elapsed().as_secs_f64(),
            "recovery: the new replica holds the copyset's data");
    }

    /// Waits until the new replica applied what its leader had committed when the change
    /// was done — its snapshot installed — so that the operator, and the limits on how many
    /// run, cover the copy of the data, not only the membership change (which is done first:
    /// a voter that is still copying is no worse for the copyset's quorum than a dead one).
    /// Bounded by [`INSTALL_WAIT`]; a leader that cannot be asked ends the wait.
    async fn wait_for_install(&self, client: &Client, replace: &Replace, voters: &[u64]) {
        let Ok((leader, _)) = client.leader_membership(replace.copyset, voters).await else {
            return;
        };
        let Ok(status) = client.copyset_status(leader, replace.copyset).await else {
            return;
        };
        let began = Instant::now();
        while began.elapsed() < INSTALL_WAIT {
            if let Ok(new) = client.copyset_status(replace.add, replace.copyset).await {
                if new.applied >= status.commit {
                    return;
                }
            }
            glommio::timer::sleep(Duration::from_millis(250)).await;
        }
        warn!(copyset = %replace.copyset, node = replace.add,
            "recovery: the new replica has not installed the copyset's data yet; the operator \
             ends, the replica goes on catching up");
    }

    /// Starts the leadership transfers that bring the nodes' leader counts within one, from
    /// the leaders the heartbeats report (the newest term's claim for each copyset).
    fn balance_leaders(self: &Rc<Self>, nodes: &[NodeView], copysets: &[(CopysetId, Vec<u64>)]) {
        let mut leaders: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for (_, report) in self.mds.borrow().seen.values() {
            for replica in report.replicas.iter().filter(|r| r.role == "leader") {
                let entry = leaders.entry(replica.copyset).or_insert((0, 0));
                if replica.term >= entry.0 {
                    *entry = (replica.term, report.node);
                }
            }
        }
        let led: Vec<(CopysetId, Vec<u64>, u64)> = copysets
            .iter()
            .filter_map(|(c, voters)| {
                leaders
                    .get(&c.0)
                    .map(|(_, leader)| (*c, voters.clone(), *leader))
            })
            .collect();
        let interval = self.mds.borrow().heartbeat;
        let now = Instant::now();
        let transfers = {
            let mut scheduler = self.scheduler.borrow_mut();
            scheduler
                .moved
                .retain(|_, (at, _, _)| now.duration_since(*at) < interval * COOLING_INTERVALS);
            let cooling = scheduler.moved.keys().copied().collect();
            let transfers = plan_leaders(nodes, &led, &cooling, TRANSFERS_PER_ROUND);
            for transfer in &transfers {
                scheduler
                    .moved
                    .insert(transfer.copyset, (now, transfer.from, transfer.to));
            }
            transfers
        };
        let Some(client) = self.scheduler.borrow().client.clone() else {
            return;
        };
        for transfer in transfers {
            let client = Rc::clone(&client);
            glommio::spawn_local(async move {
                info!(copyset = %transfer.copyset, from = transfer.from, to = transfer.to,
                    "balance: moving a leadership");
                if let Err(error) = client.transfer_leader(transfer.copyset, transfer.to).await {
                    warn!(copyset = %transfer.copyset, %error, "balance: transfer failed");
                }
            })
            .detach();
        }
    }

    /// `OPERATORS`: the scheduler's operators — replacements running, leaderships moved
    /// lately (cooling), copysets held after a cancel — after cancelling the replacement of
    /// `request.cancel` if asked: its task stops waiting for its change (a membership change
    /// already proposed completes in raft; the copyset is then as the change left it) and the
    /// copyset is left out of planning for ten heartbeat intervals. To stop the scheduler for
    /// good, pause it.
    pub(super) fn operators(&self, copyset: CopysetId, payload: &[u8]) -> (Status, Bytes) {
        if let Err(answer) = self.leading_metadata(copyset) {
            return answer;
        }
        let request: OperatorsRequest = match crate::protocol::placement::decode(payload) {
            Ok(request) => request,
            Err(error) => return (Status::Invalid(error.to_string()), Bytes::new()),
        };
        let interval = self.mds.borrow().heartbeat;
        let mut scheduler = self.scheduler.borrow_mut();
        let now = Instant::now();
        if let Some(cancel) = request.cancel {
            let Some(running) = scheduler.running.get(&CopysetId(cancel)) else {
                return (
                    Status::Invalid(format!("copyset {cancel} has no operator running")),
                    Bytes::new(),
                );
            };
            running.cancel.notify();
            scheduler
                .held
                .insert(CopysetId(cancel), now + interval * COOLING_INTERVALS);
        }
        let age = |at: &Instant| now.saturating_duration_since(*at).as_millis() as u64;
        let mut operators: Vec<Operator> = scheduler
            .running
            .iter()
            .map(|(c, r)| Operator {
                copyset: c.0,
                kind: "replace".into(),
                from: r.replace.remove,
                to: r.replace.add,
                state: "running".into(),
                age_ms: age(&r.started),
            })
            .collect();
        operators.extend(scheduler.moved.iter().map(|(c, (at, from, to))| Operator {
            copyset: c.0,
            kind: "transfer_leader".into(),
            from: *from,
            to: *to,
            state: "cooling".into(),
            age_ms: age(at),
        }));
        for (c, until) in &scheduler.held {
            if let Some(operator) = operators
                .iter_mut()
                .find(|o| o.copyset == c.0 && o.kind == "replace")
            {
                operator.state = "cancelling".into();
            } else if *until > now {
                operators.push(Operator {
                    copyset: c.0,
                    kind: "replace".into(),
                    from: 0,
                    to: 0,
                    state: "held".into(),
                    age_ms: 0,
                });
            }
        }
        let answer = Operators {
            service: self.node,
            operators,
        };
        (Status::Ok, crate::protocol::placement::encode(&answer))
    }

    /// The registered nodes with their states, and the ready pool copysets with their voters.
    async fn scheduler_view(&self) -> Option<(Vec<NodeView>, Vec<(CopysetId, Vec<u64>)>)> {
        let node_table = super::apply_meta::read_dense(&self.engine, NODE_CHUNK, NODE_RECORD_LEN)
            .await
            .ok()?;
        let registered = tables::nodes(&node_table).ok()?;
        let pool_table = super::apply_meta::read_dense(&self.engine, POOL_CHUNK, POOL_RECORD_LEN)
            .await
            .ok()?;
        let pool = tables::pool(&pool_table).ok()?;
        let mds = self.mds.borrow();
        let now = Instant::now();
        let nodes = registered
            .into_iter()
            .map(|member| {
                let (state, _) = mds.state(member.node, now);
                NodeView {
                    node: member.node,
                    zone: member.zone,
                    host: member.host,
                    up: state == "up",
                    offline: state == "offline",
                }
            })
            .collect();
        let copysets = pool
            .into_iter()
            .filter(|c| c.state == PoolState::Ready)
            .map(|c| (c.copyset, c.peers))
            .collect();
        Some((nodes, copysets))
    }

    /// Says what no operator can fix, once a minute per copyset.
    fn report_stuck(&self, stuck: &[Stuck]) {
        let mut scheduler = self.scheduler.borrow_mut();
        let now = Instant::now();
        for problem in stuck {
            let copyset = match problem {
                Stuck::NoQuorum(c) | Stuck::NoCandidate(c) => *c,
            };
            let due = scheduler.reported.get(&copyset).map_or(true, |at| {
                now.duration_since(*at) >= Duration::from_secs(60)
            });
            if due {
                scheduler.reported.insert(copyset, now);
                match problem {
                    Stuck::NoQuorum(_) => warn!(%copyset,
                        "recovery: a majority of the copyset's voters is offline; only an \
                         operator can recover it (chunkctl copyset reset-peers)"),
                    Stuck::NoCandidate(_) => warn!(%copyset,
                        "recovery: no up node can take the copyset's replica without sharing \
                         a host or zone with another voter"),
                }
            }
        }
    }
}
