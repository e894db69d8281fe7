//! Quorum arithmetic over simple and joint configurations. In a joint configuration every
//! decision needs a majority of both halves (raft paper §6).

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{ConfState, NodeId};

/// The outcome of an election so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteResult {
    /// Not decided yet.
    Pending,
    /// A quorum refused.
    Lost,
    /// A quorum granted.
    Won,
}

/// The largest value that a majority of `voters` has reached (for match indexes: the commit
/// point; for ack ticks: the oldest tick a majority confirmed since). An empty set imposes no
/// bound (`u64::MAX`), so that the outgoing half of a non-joint configuration is neutral.
fn majority_value(voters: &BTreeSet<NodeId>, value_of: &impl Fn(NodeId) -> u64) -> u64 {
    if voters.is_empty() {
        return u64::MAX;
    }
    let mut values: Vec<u64> = voters.iter().map(|id| value_of(*id)).collect();
    values.sort_unstable_by(|a, b| b.cmp(a));
    values[voters.len() / 2]
}

/// The largest value a quorum of `conf` (both halves when joint) has reached.
pub fn quorum_value(conf: &ConfState, value_of: impl Fn(NodeId) -> u64) -> u64 {
    let incoming = majority_value(&conf.voters, &value_of);
    let outgoing = majority_value(&conf.voters_outgoing, &value_of);
    incoming.min(outgoing)
}

fn majority_vote(voters: &BTreeSet<NodeId>, votes: &BTreeMap<NodeId, bool>) -> VoteResult {
    if voters.is_empty() {
        return VoteResult::Won;
    }
    let granted = voters
        .iter()
        .filter(|id| votes.get(id) == Some(&true))
        .count();
    let rejected = voters
        .iter()
        .filter(|id| votes.get(id) == Some(&false))
        .count();
    let majority = voters.len() / 2 + 1;
    if granted >= majority {
        VoteResult::Won
    } else if voters.len() - rejected < majority {
        VoteResult::Lost
    } else {
        VoteResult::Pending
    }
}

/// The result of an election with `votes` (true: granted) under `conf`.
pub fn vote_result(conf: &ConfState, votes: &BTreeMap<NodeId, bool>) -> VoteResult {
    let incoming = majority_vote(&conf.voters, votes);
    let outgoing = majority_vote(&conf.voters_outgoing, votes);
    match (incoming, outgoing) {
        (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
        (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
        _ => VoteResult::Pending,
    }
}

/// Whether the members for which `active` holds form a quorum of `conf`.
pub fn is_quorum(conf: &ConfState, active: impl Fn(NodeId) -> bool) -> bool {
    quorum_value(conf, |id| active(id) as u64) >= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(voters: &[u64], outgoing: &[u64]) -> ConfState {
        ConfState {
            voters: voters.iter().map(|i| NodeId(*i)).collect(),
            voters_outgoing: outgoing.iter().map(|i| NodeId(*i)).collect(),
            ..ConfState::default()
        }
    }

    #[test]
    fn commit_point_is_the_majority_match_and_joint_takes_the_lower_half() {
        // (voters, outgoing, matches of nodes 1..=5, expected quorum value)
        type Row<'a> = (&'a [u64], &'a [u64], [u64; 5], u64);
        let table: &[Row] = &[
            (&[1], &[], [5, 0, 0, 0, 0], 5),
            (&[1, 2, 3], &[], [5, 4, 3, 0, 0], 4),
            (&[1, 2, 3, 4], &[], [5, 4, 3, 2, 0], 3),
            (&[1, 2, 3, 4, 5], &[], [9, 9, 1, 1, 1], 1),
            (&[1, 2, 3], &[3, 4, 5], [9, 9, 9, 1, 1], 1),
            (&[1, 2, 3], &[1, 4, 5], [9, 9, 1, 9, 1], 9),
        ];
        for (voters, outgoing, matches, expected) in table {
            let value = quorum_value(&conf(voters, outgoing), |id| matches[id.0 as usize - 1]);
            assert_eq!(value, *expected, "voters {voters:?} outgoing {outgoing:?}");
        }
    }

    #[test]
    fn vote_needs_a_majority_of_both_halves_when_joint() {
        let votes = |list: &[(u64, bool)]| -> BTreeMap<NodeId, bool> {
            list.iter()
                .map(|(id, granted)| (NodeId(*id), *granted))
                .collect()
        };
        let joint = conf(&[1, 2, 3], &[3, 4, 5]);
        assert_eq!(
            vote_result(&joint, &votes(&[(1, true), (2, true)])),
            VoteResult::Pending
        );
        assert_eq!(
            vote_result(
                &joint,
                &votes(&[(1, true), (2, true), (3, true), (4, true)])
            ),
            VoteResult::Won
        );
        assert_eq!(
            vote_result(
                &joint,
                &votes(&[(1, true), (2, true), (4, false), (5, false)])
            ),
            VoteResult::Lost
        );
        let simple = conf(&[1, 2, 3], &[]);
        assert_eq!(
            vote_result(&simple, &votes(&[(2, false), (3, false)])),
            VoteResult::Lost
        );
    }
}
