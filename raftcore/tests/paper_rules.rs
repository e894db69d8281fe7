//! One test per rule of the raft paper (Ongaro & Ousterhout, "In Search of an Understandable
//! Consensus Algorithm", figure 2 and §5) and of the thesis (§3.10 leader transfer, §4.3 joint
//! consensus, §6.2 CheckQuorum, §6.4 reads, §9.6 PreVote), in the manner of etcd/raft's paper
//! tests. Names end with the section they prove.

mod common;

use bytes::Bytes;
use common::{default_config, ids, Cluster};
use raftcore::{
    ConfChange, ConfChangeStep, Config, Entry, EntryKind, LogIndex, Message, MessageType, NodeId,
    RaftError, StateRole, Term,
};

fn no_prevote(config: &mut Config) {
    config.pre_vote = false;
    config.check_quorum = false;
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        term: Term(term),
        index: LogIndex(index),
        kind: EntryKind::Normal,
        data: Bytes::from_static(b"x"),
    }
}

fn msg(t: MessageType, from: u64, to: u64, term: u64) -> Message {
    Message::new(t, NodeId(from), NodeId(to), Term(term))
}

// ---- §5.1: terms ----

#[test]
fn follower_adopts_a_higher_term_and_forgets_its_vote_5_1() {
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    c.node(1)
        .step(msg(MessageType::Heartbeat, 2, 1, 5))
        .unwrap();
    let raft = c.nodes[&NodeId(1)].raft();
    assert_eq!(
        (raft.term, raft.vote, raft.leader),
        (Term(5), None, Some(NodeId(2)))
    );
}

#[test]
fn leader_and_candidate_step_down_on_a_higher_term_5_1() {
    for candidate in [false, true] {
        let mut c = Cluster::new(&[1, 2, 3], no_prevote);
        if candidate {
            c.isolate(1);
            c.node(1).campaign();
            c.settle();
            assert_eq!(c.role(1), StateRole::Candidate);
        } else {
            c.elect(1);
        }
        let term = c.nodes[&NodeId(1)].raft().term.0 + 1;
        c.node(1)
            .step(msg(MessageType::AppendResponse, 2, 1, term))
            .unwrap();
        assert_eq!(c.role(1), StateRole::Follower, "candidate: {candidate}");
        assert_eq!(c.nodes[&NodeId(1)].raft().term, Term(term));
    }
}

#[test]
fn stale_term_messages_are_ignored_and_the_sender_told_the_term_5_1() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.node(1)
        .step(msg(MessageType::Heartbeat, 2, 1, 5))
        .unwrap();
    c.take_messages(1);
    let mut stale = msg(MessageType::Append, 3, 1, 4);
    stale.entries = vec![entry(2, 4)];
    c.node(1).step(stale).unwrap();
    assert_eq!(c.nodes[&NodeId(1)].raft().log.last_index(), LogIndex(1));
    let replies = c.take_messages(1);
    assert!(replies
        .iter()
        .any(|m| m.to == NodeId(3) && m.term == Term(5)));
}

// ---- §5.2: leader election ----

#[test]
fn follower_campaigns_after_its_election_timeout_5_2() {
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    c.isolate(1);
    for _ in 0..19 {
        c.node(1).tick();
        if c.role(1) == StateRole::Candidate {
            break;
        }
    }
    let raft = c.nodes[&NodeId(1)].raft();
    assert_eq!(raft.state, StateRole::Candidate);
    assert_eq!((raft.term, raft.vote), (Term(2), Some(NodeId(1))));
}

#[test]
fn election_timeouts_are_randomized_by_the_seed_5_2() {
    let mut timeouts = std::collections::BTreeSet::new();
    for seed in 0..20u64 {
        let mut c = Cluster::new(&[1, 2, 3], no_prevote);
        let mut config = c.config(1);
        config.rng_seed = seed;
        c.nodes.insert(
            NodeId(1),
            raftcore::RawNode::new(
                config,
                raftcore::MemStorage::new_with_conf_state(
                    c.nodes[&NodeId(2)].raft().conf_state().clone(),
                ),
            )
            .unwrap(),
        );
        c.isolate(1);
        let mut ticks = 0;
        while c.role(1) != StateRole::Candidate {
            c.node(1).tick();
            ticks += 1;
            assert!(ticks < 20, "timeout within [election, 2 * election)");
        }
        assert!(ticks >= 10);
        timeouts.insert(ticks);
    }
    assert!(timeouts.len() > 3, "timeouts spread: {timeouts:?}");
}

#[test]
fn candidate_wins_only_with_a_majority_5_2() {
    // (cluster size, granted votes besides its own, wins)
    let table = [
        (1, 0, true),
        (3, 1, true),
        (3, 0, false),
        (5, 1, false),
        (5, 2, true),
    ];
    for (size, granted, wins) in table {
        let voters: Vec<u64> = (1..=size).collect();
        let mut c = Cluster::new(&voters, no_prevote);
        c.node(1).campaign();
        let requests = c.take_messages(1);
        for (i, request) in requests.iter().enumerate() {
            let mut reply = msg(MessageType::RequestVoteResponse, request.to.0, 1, 2);
            reply.reject = i >= granted;
            c.node(1).step(reply).unwrap();
        }
        let leader = c.role(1) == StateRole::Leader;
        assert_eq!(leader, wins, "size {size} granted {granted}");
    }
}

#[test]
fn voter_grants_at_most_one_vote_per_term_5_2() {
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    let mut first = msg(MessageType::RequestVote, 2, 1, 2);
    first.index = LogIndex(1);
    first.log_term = Term(1);
    let mut second = first.clone();
    second.from = NodeId(3);
    c.node(1).step(first.clone()).unwrap();
    c.node(1).step(second).unwrap();
    c.node(1).step(first).unwrap();
    let replies = c.take_messages(1);
    let granted: Vec<(u64, bool)> = replies.iter().map(|m| (m.to.0, !m.reject)).collect();
    assert_eq!(granted, vec![(2, true), (3, false), (2, true)]);
    assert_eq!(c.nodes[&NodeId(1)].raft().vote, Some(NodeId(2)));
}

#[test]
fn candidate_returns_to_follower_on_append_from_a_leader_of_its_term_5_2() {
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    c.isolate(1);
    c.node(1).campaign();
    c.settle();
    let mut append = msg(MessageType::Append, 2, 1, 2);
    append.index = LogIndex(1);
    append.log_term = Term(1);
    c.node(1).step(append).unwrap();
    assert_eq!(c.role(1), StateRole::Follower);
    assert_eq!(c.nodes[&NodeId(1)].raft().leader, Some(NodeId(2)));
}

#[test]
fn election_in_a_cluster_elects_exactly_one_leader_5_2() {
    let mut c = Cluster::new(&[1, 2, 3, 4, 5], default_config);
    c.tick_all(40);
    let leaders: Vec<NodeId> = c
        .nodes
        .iter()
        .filter(|(_, n)| n.raft().state == StateRole::Leader)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(leaders.len(), 1, "{leaders:?}");
}

// ---- §5.3: log replication ----

#[test]
fn leader_replicates_and_commits_then_followers_apply_5_3() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    let index = c.propose(1, b"a");
    c.propose(1, b"b");
    for id in 1..=3 {
        assert!(c.committed(id) >= index, "node {id}");
        assert_eq!(
            c.applied_data(id),
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
    }
}

#[test]
fn follower_rejects_append_whose_previous_entry_does_not_match_5_3() {
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    let mut append = msg(MessageType::Append, 2, 1, 2);
    append.index = LogIndex(5);
    append.log_term = Term(2);
    append.entries = vec![entry(6, 2)];
    c.node(1).step(append).unwrap();
    let replies = c.take_messages(1);
    assert!(replies[0].reject);
    assert_eq!(replies[0].reject_hint, LogIndex(1), "hint: our last index");
    assert_eq!(c.nodes[&NodeId(1)].raft().log.last_index(), LogIndex(1));
}

#[test]
fn follower_deletes_conflicting_entries_and_appends_the_leaders_5_3() {
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    let mut append = msg(MessageType::Append, 2, 1, 2);
    append.index = LogIndex(1);
    append.log_term = Term(1);
    append.entries = vec![entry(2, 2), entry(3, 2), entry(4, 2)];
    c.node(1).step(append).unwrap();
    let mut overwrite = msg(MessageType::Append, 3, 1, 3);
    overwrite.index = LogIndex(2);
    overwrite.log_term = Term(2);
    overwrite.entries = vec![entry(3, 3)];
    c.node(1).step(overwrite).unwrap();
    let raft = c.nodes[&NodeId(1)].raft();
    assert_eq!(raft.log.last_index(), LogIndex(3));
    assert_eq!(raft.log.term(LogIndex(3)), Ok(Term(3)));
}

#[test]
fn leader_backs_off_past_a_whole_conflicting_term_in_one_step_5_3() {
    // Node 3 holds many entries of a stale term; the leader finds the match point with one
    // rejection per term instead of one per entry.
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    c.elect(1);
    c.isolate(1);
    for i in 0..20u8 {
        c.node(1).propose(Bytes::from(vec![i])).unwrap();
    }
    c.settle();
    c.heal();
    c.isolate(1);
    c.elect(2);
    c.propose(2, b"new");
    c.heal();
    let before = c.delivered.len();
    c.tick_all(4);
    let rejections = c.delivered[before..]
        .iter()
        .filter(|m| m.msg_type == MessageType::AppendResponse && m.reject)
        .count();
    assert!(rejections <= 3, "{rejections} rejections");
    assert_eq!(
        c.nodes[&NodeId(1)].raft().log.last_index(),
        c.nodes[&NodeId(2)].raft().log.last_index()
    );
    assert_eq!(c.applied_data(1), c.applied_data(2));
}

#[test]
fn follower_commits_up_to_the_leaders_commit_but_not_past_its_new_entries_5_3() {
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    let mut append = msg(MessageType::Append, 2, 1, 2);
    append.index = LogIndex(1);
    append.log_term = Term(1);
    append.entries = vec![entry(2, 2)];
    append.commit = LogIndex(9);
    c.node(1).step(append).unwrap();
    assert_eq!(c.committed(1), LogIndex(2));
}

#[test]
fn leader_counts_itself_toward_commit_only_once_its_entries_are_persisted_10_2_1() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    let index = c.node(1).propose(Bytes::from_static(b"p")).unwrap();
    let ready = c.node(1).ready().unwrap();
    assert!(
        ready
            .messages
            .iter()
            .any(|m| m.msg_type == MessageType::Append),
        "sent before persisting"
    );
    // One follower acknowledges; without the leader's own write there is no majority.
    for m in ready.messages.clone() {
        if m.to == NodeId(2) {
            c.deliver(m);
        }
    }
    let acks = c.take_messages(2);
    for ack in acks {
        c.deliver(ack);
    }
    assert!(c.committed(1) < index, "leader's write not yet durable");
    let node = c.node(1);
    node.store_mut().append(&ready.entries);
    if let Some(hs) = ready.hard_state {
        node.store_mut().set_hard_state(hs);
    }
    node.on_persisted(ready.number);
    assert!(c.committed(1) >= index);
}

#[test]
fn follower_acknowledges_only_after_persisting_10_2_1() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.node(1).propose(Bytes::from_static(b"p")).unwrap();
    for m in c.take_messages(1) {
        if m.to == NodeId(2) {
            c.deliver(m);
        }
    }
    let ready = c.node(2).ready().unwrap();
    assert!(!ready.entries.is_empty());
    assert!(ready
        .messages
        .iter()
        .all(|m| m.msg_type != MessageType::AppendResponse));
    c.node(2).store_mut().append(&ready.entries);
    c.node(2).on_persisted(ready.number);
    let ready = c.node(2).ready().unwrap();
    assert!(ready
        .messages
        .iter()
        .any(|m| m.msg_type == MessageType::AppendResponse));
}

// ---- §5.4: safety ----

#[test]
fn voter_refuses_a_candidate_whose_log_is_less_up_to_date_5_4_1() {
    // Voter's last entry is (index 3, term 2). (candidate last index, last term, granted)
    let table = [
        (3, 2, true),
        (4, 2, true),
        (2, 2, false),
        (9, 1, false),
        (1, 3, true),
    ];
    for (index, term, granted) in table {
        let mut c = Cluster::new(&[1, 2, 3], no_prevote);
        let mut append = msg(MessageType::Append, 2, 1, 2);
        append.index = LogIndex(1);
        append.log_term = Term(1);
        append.entries = vec![entry(2, 2), entry(3, 2)];
        c.node(1).step(append).unwrap();
        c.take_messages(1);
        let mut vote = msg(MessageType::RequestVote, 3, 1, 4);
        vote.index = LogIndex(index);
        vote.log_term = Term(term);
        c.node(1).step(vote).unwrap();
        let reply = c.take_messages(1).pop().unwrap();
        assert_eq!(!reply.reject, granted, "candidate ({index}, {term})");
    }
}

#[test]
fn leader_does_not_commit_an_earlier_terms_entry_by_counting_replicas_5_4_2() {
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    // A leader of term 2 left entry 2 on nodes 1 and 3, uncommitted.
    for to in [1, 3] {
        let mut append = msg(MessageType::Append, 2, to, 2);
        append.index = LogIndex(1);
        append.log_term = Term(1);
        append.entries = vec![entry(2, 2)];
        c.node(to).step(append).unwrap();
        c.take_messages(to);
    }
    c.node(1).campaign();
    for request in c.take_messages(1) {
        if request.to == NodeId(3) {
            c.deliver(request);
        }
    }
    for reply in c.take_messages(3) {
        c.deliver(reply);
    }
    assert_eq!(c.role(1), StateRole::Leader);
    c.take_messages(1); // its own no-op (index 3, term 3) is now persisted; appends dropped
    let mut ack = msg(MessageType::AppendResponse, 3, 1, 3);
    ack.index = LogIndex(2);
    c.node(1).step(ack).unwrap();
    assert_eq!(
        c.committed(1),
        LogIndex(1),
        "entry 2 is on a majority but of term 2"
    );
    let mut ack = msg(MessageType::AppendResponse, 3, 1, 3);
    ack.index = LogIndex(3);
    c.node(1).step(ack).unwrap();
    assert_eq!(
        c.committed(1),
        LogIndex(3),
        "commits with the no-op of term 3"
    );
}

#[test]
fn new_leader_holds_every_committed_entry_5_4_3() {
    let mut c = Cluster::new(&[1, 2, 3, 4, 5], default_config);
    c.elect(1);
    c.propose(1, b"committed");
    c.isolate(1);
    c.tick_all(40);
    let leader = c.leader().unwrap();
    assert_ne!(leader, NodeId(1));
    assert!(c
        .applied_data(leader.0)
        .contains(&Bytes::from_static(b"committed")));
}

// ---- §9.6 PreVote, §6.2 CheckQuorum ----

#[test]
fn pre_vote_of_a_partitioned_peer_does_not_raise_terms_9_6() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    let term = c.nodes[&NodeId(1)].raft().term;
    c.isolate(3);
    c.tick_all(100);
    assert_eq!(
        c.nodes[&NodeId(3)].raft().term,
        term,
        "pre-votes fail, no term bump"
    );
    c.heal();
    c.tick_all(10);
    assert_eq!(
        c.role(1),
        StateRole::Leader,
        "the returning peer does not depose the leader"
    );
    assert_eq!(c.nodes[&NodeId(1)].raft().term, term);
}

#[test]
fn pre_vote_needs_a_majority_then_a_real_election_follows_9_6() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.tick_all(30);
    let leader = c.leader().expect("a leader");
    assert_eq!(
        c.nodes[&leader].raft().term,
        Term(2),
        "one pre-vote round and one election"
    );
}

#[test]
fn leader_cut_off_from_a_quorum_steps_down_6_2() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.isolate(1);
    c.tick_all(25);
    assert_eq!(c.role(1), StateRole::Follower);
}

#[test]
fn follower_that_hears_a_leader_ignores_vote_requests_6_2() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.tick_all(11);
    let mut vote = msg(MessageType::RequestVote, 3, 2, 10);
    vote.index = LogIndex(100);
    vote.log_term = Term(9);
    c.node(2).step(vote).unwrap();
    assert_eq!(
        c.nodes[&NodeId(2)].raft().term,
        Term(2),
        "ignored: lease of the leader"
    );
    assert!(c
        .take_messages(2)
        .iter()
        .all(|m| m.msg_type != MessageType::RequestVoteResponse));
}

// ---- §6.4 reads ----

#[test]
fn read_index_is_served_after_a_quorum_confirms_leadership_6_4() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.propose(1, b"w");
    c.node(1).read_index(Bytes::from_static(b"r1")).unwrap();
    let ready = c.node(1).ready().unwrap();
    assert!(
        ready.read_states.is_empty(),
        "not before the heartbeat round"
    );
    c.node(1).advance(&ready);
    for m in ready.messages {
        c.deliver(m);
    }
    c.settle();
    let reads = &c.reads[&NodeId(1)];
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].index, c.committed(1));
}

#[test]
fn isolated_leader_never_confirms_a_read_index_6_4() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.isolate(1);
    c.node(1).read_index(Bytes::from_static(b"r")).unwrap();
    c.tick_all(5);
    assert!(c.reads[&NodeId(1)].is_empty());
}

#[test]
fn read_index_waits_for_an_entry_of_the_leaders_term_to_commit_6_4() {
    let mut c = Cluster::new(&[1, 2, 3], no_prevote);
    c.node(1).campaign();
    for m in c.take_messages(1) {
        c.deliver(m);
    }
    for id in [2, 3] {
        for m in c.take_messages(id) {
            c.deliver(m);
        }
    }
    assert_eq!(c.role(1), StateRole::Leader);
    let held_appends = c.take_messages(1);
    c.node(1).read_index(Bytes::from_static(b"r")).unwrap();
    assert!(
        c.take_messages(1).is_empty(),
        "no read round before the no-op commits"
    );
    assert!(c.reads[&NodeId(1)].is_empty());
    for m in held_appends {
        c.deliver(m);
    }
    c.settle();
    let reads = &c.reads[&NodeId(1)];
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].index, LogIndex(2), "the no-op's index");
}

#[test]
fn lease_read_is_refused_without_a_proven_lease_and_served_with_one_6_4_1() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    assert_eq!(
        c.node(1).lease_read(Bytes::new()),
        Err(RaftError::LeaseNotValid),
        "no acks yet"
    );
    c.tick_all(2);
    c.node(1).lease_read(Bytes::from_static(b"l")).unwrap();
    c.settle();
    assert_eq!(c.reads[&NodeId(1)].len(), 1);
    c.isolate(1);
    c.tick_all(9);
    assert_eq!(
        c.node(1).lease_read(Bytes::new()),
        Err(RaftError::LeaseNotValid),
        "lease ran out"
    );
}

// ---- §4.3 membership ----

#[test]
fn learner_receives_the_log_but_does_not_vote_or_count_4_2_1() {
    let mut c = Cluster::with_learners(&[1, 2], &[3], default_config);
    c.elect(1);
    c.propose(1, b"x");
    assert_eq!(c.applied_data(3), vec![Bytes::from_static(b"x")]);
    c.isolate(2);
    let index = c.node(1).propose(Bytes::from_static(b"y")).unwrap();
    c.settle();
    assert!(c.committed(1) < index, "a learner's copy does not count");
    c.tick_all(60);
    assert_ne!(c.role(3), StateRole::Leader);
    assert_ne!(c.role(3), StateRole::Candidate);
}

#[test]
fn adding_and_promoting_a_learner_one_step_at_a_time_4_1() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.add_node(4, raftcore::MemStorage::new());
    c.node(1)
        .propose_conf_change(&ConfChange::with_steps(vec![ConfChangeStep::AddLearner(
            NodeId(4),
        )]))
        .unwrap();
    c.settle();
    assert!(c.nodes[&NodeId(1)]
        .raft()
        .conf_state()
        .learners
        .contains(&NodeId(4)));
    c.propose(1, b"seen by 4");
    assert_eq!(c.applied_data(4), vec![Bytes::from_static(b"seen by 4")]);
    c.node(1)
        .propose_conf_change(&ConfChange::with_steps(vec![ConfChangeStep::AddVoter(
            NodeId(4),
        )]))
        .unwrap();
    c.settle();
    for id in 1..=4 {
        assert_eq!(
            c.nodes[&NodeId(id)].raft().conf_state().voters,
            ids(&[1, 2, 3, 4]),
            "node {id}"
        );
    }
}

#[test]
fn only_one_configuration_change_may_be_pending_4_1() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.isolate(1);
    let first = ConfChange::with_steps(vec![ConfChangeStep::AddLearner(NodeId(4))]);
    c.node(1).propose_conf_change(&first).unwrap();
    let second = ConfChange::with_steps(vec![ConfChangeStep::AddLearner(NodeId(5))]);
    assert_eq!(
        c.node(1).propose_conf_change(&second),
        Err(RaftError::ConfChangePending)
    );
}

#[test]
fn joint_consensus_needs_majorities_of_both_configurations_then_leaves_4_3() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.add_node(4, raftcore::MemStorage::new());
    c.add_node(5, raftcore::MemStorage::new());
    let change = ConfChange::with_steps(vec![
        ConfChangeStep::AddVoter(NodeId(4)),
        ConfChangeStep::AddVoter(NodeId(5)),
        ConfChangeStep::RemoveNode(NodeId(3)),
    ]);
    c.node(1).propose_conf_change(&change).unwrap();
    // Stop right after the joint configuration applies on the leader.
    for _ in 0..50 {
        c.settle();
        if c.nodes[&NodeId(1)].raft().conf_state().is_joint() {
            break;
        }
    }
    c.settle();
    let conf = c.nodes[&NodeId(1)].raft().conf_state().clone();
    assert!(!conf.is_joint(), "auto-leave happened: {conf:?}");
    assert_eq!(conf.voters, ids(&[1, 2, 4, 5]));
    // In the final configuration, nodes 4 and 5 with 1 form a quorum without 2 and 3.
    c.isolate(2);
    c.isolate(3);
    let index = c
        .node(1)
        .propose(Bytes::from_static(b"new config"))
        .unwrap();
    c.settle();
    assert!(c.committed(1) >= index);
}

#[test]
fn in_a_joint_configuration_the_old_majority_alone_cannot_commit_4_3() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.add_node(4, raftcore::MemStorage::new());
    c.add_node(5, raftcore::MemStorage::new());
    let change = ConfChange {
        steps: vec![
            ConfChangeStep::AddVoter(NodeId(4)),
            ConfChangeStep::AddVoter(NodeId(5)),
            ConfChangeStep::RemoveNode(NodeId(3)),
        ],
        transition: raftcore::ConfChangeTransition::JointExplicit,
    };
    c.node(1).propose_conf_change(&change).unwrap();
    c.settle();
    assert!(c.nodes[&NodeId(1)].raft().conf_state().is_joint());
    c.isolate(4);
    c.isolate(5);
    let index = c.node(1).propose(Bytes::from_static(b"joint")).unwrap();
    c.settle();
    assert!(
        c.committed(1) < index,
        "incoming half {{1,2,4,5}} has only 1 and 2"
    );
    c.heal();
    c.tick_all(4);
    assert!(c.committed(1) >= index);
    c.node(1)
        .propose_conf_change(&ConfChange::leave_joint())
        .unwrap();
    c.settle();
    assert!(!c.nodes[&NodeId(1)].raft().conf_state().is_joint());
}

#[test]
fn removed_leader_steps_down_once_the_change_applies_4_2_2() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.node(1)
        .propose_conf_change(&ConfChange::with_steps(vec![ConfChangeStep::RemoveNode(
            NodeId(1),
        )]))
        .unwrap();
    c.settle();
    assert_eq!(c.role(1), StateRole::Follower);
    c.tick_all(40);
    let leader = c.leader().unwrap();
    assert_ne!(leader, NodeId(1));
}

// ---- §3.10 leader transfer ----

#[test]
fn leader_transfer_catches_up_the_target_then_sends_timeout_now_3_10() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.cut_link(1, 3);
    c.propose(1, b"3 lags");
    c.heal();
    c.node(1).transfer_leader(NodeId(3)).unwrap();
    assert_eq!(
        c.node(1).propose(Bytes::from_static(b"no")),
        Err(RaftError::TransferInProgress)
    );
    c.settle();
    assert_eq!(c.role(3), StateRole::Leader);
    assert!(c
        .delivered
        .iter()
        .any(|m| m.msg_type == MessageType::TimeoutNow));
    assert!(
        c.node(1).lease_read(Bytes::new()).is_err(),
        "lease voided by TimeoutNow"
    );
}

#[test]
fn leader_transfer_is_abandoned_after_an_election_timeout_3_10() {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.isolate(3);
    c.node(1).transfer_leader(NodeId(3)).unwrap();
    c.tick_all(11);
    assert_eq!(c.role(1), StateRole::Leader);
    c.node(1)
        .propose(Bytes::from_static(b"accepted again"))
        .unwrap();
}
