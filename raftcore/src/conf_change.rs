//! Membership changes: what a configuration-change entry carries and how it transforms a
//! `ConfState`. A change of at most one voter is applied in one step; a change of several
//! voters goes through a joint configuration (raft paper §6, thesis §4.3), left by an empty
//! change, automatically when `auto_leave` is set.

use bytes::{BufMut, Bytes};

use crate::codec::{DecodeError, Reader};
use crate::types::{ConfState, NodeId};

/// One membership step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfChangeStep {
    /// Make the node a voter (a learner is promoted).
    AddVoter(NodeId),
    /// Make the node a learner (a voter is demoted; while joint it stays a voter of the
    /// outgoing half until the joint configuration is left).
    AddLearner(NodeId),
    /// Remove the node from every role.
    RemoveNode(NodeId),
}

/// How a change of several voters leaves its joint configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfChangeTransition {
    /// One step when at most one voter changes, else joint with automatic leave.
    Auto,
    /// Always joint; the application proposes the empty change that leaves it.
    JointExplicit,
}

/// A configuration change, as proposed and as carried by a `ConfChange` entry. An empty
/// `steps` leaves the joint configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfChange {
    /// The membership steps, applied in order.
    pub steps: Vec<ConfChangeStep>,
    /// How a joint configuration is left.
    pub transition: ConfChangeTransition,
}

/// Why a configuration change cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfChangeError {
    /// A change while joint must first leave the joint configuration.
    #[error("configuration is joint; leave it before another change")]
    AlreadyJoint,
    /// Leaving was asked of a configuration that is not joint.
    #[error("configuration is not joint; nothing to leave")]
    NotJoint,
    /// The change would leave no voter.
    #[error("the change removes every voter")]
    NoVoters,
    /// Node id 0 is reserved for "none".
    #[error("node id 0 is not a node")]
    ZeroNode,
    /// The bytes of a ConfChange entry did not decode.
    #[error("configuration change does not decode: {0}")]
    Decode(#[from] DecodeError),
}

impl ConfChange {
    /// The change that leaves a joint configuration.
    pub fn leave_joint() -> ConfChange {
        ConfChange {
            steps: Vec::new(),
            transition: ConfChangeTransition::Auto,
        }
    }

    /// A change made of `steps`, joint only when needed.
    pub fn with_steps(steps: Vec<ConfChangeStep>) -> ConfChange {
        ConfChange {
            steps,
            transition: ConfChangeTransition::Auto,
        }
    }

    /// Encodes the change as a ConfChange entry's data: u8 version, u8 transition, u32 count,
    /// then per step u8 kind and u64 node.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(6 + self.steps.len() * 9);
        out.put_u8(1);
        out.put_u8(match self.transition {
            ConfChangeTransition::Auto => 0,
            ConfChangeTransition::JointExplicit => 1,
        });
        out.put_u32_le(self.steps.len() as u32);
        for step in &self.steps {
            let (kind, node) = match step {
                ConfChangeStep::AddVoter(node) => (0u8, node),
                ConfChangeStep::AddLearner(node) => (1, node),
                ConfChangeStep::RemoveNode(node) => (2, node),
            };
            out.put_u8(kind);
            out.put_u64_le(node.0);
        }
        Bytes::from(out)
    }

    /// Decodes a ConfChange entry's data.
    pub fn decode(data: Bytes) -> Result<ConfChange, DecodeError> {
        let mut reader = Reader::new(data);
        let version = reader.u8("conf change version")?;
        if version != 1 {
            return Err(DecodeError::Version(version));
        }
        let transition = match reader.u8("conf change transition")? {
            0 => ConfChangeTransition::Auto,
            1 => ConfChangeTransition::JointExplicit,
            other => return Err(DecodeError::EntryKind(other)),
        };
        let count = reader.count("conf change steps", 9)?;
        let mut steps = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = reader.u8("conf change step")?;
            let node = NodeId(reader.u64("conf change node")?);
            steps.push(match kind {
                0 => ConfChangeStep::AddVoter(node),
                1 => ConfChangeStep::AddLearner(node),
                2 => ConfChangeStep::RemoveNode(node),
                other => return Err(DecodeError::EntryKind(other)),
            });
        }
        reader.finish()?;
        Ok(ConfChange { steps, transition })
    }

    /// Whether this change, applied to `conf`, goes through a joint configuration.
    pub fn needs_joint(&self, conf: &ConfState) -> bool {
        if self.steps.is_empty() {
            return false;
        }
        if self.transition == ConfChangeTransition::JointExplicit {
            return true;
        }
        let mut voters = conf.voters.clone();
        apply_steps(&mut voters, &mut conf.learners.clone(), &self.steps);
        voters.symmetric_difference(&conf.voters).count() > 1
    }

    /// The configuration after this change. Pure: `conf` is left as it is.
    pub fn apply_to(&self, conf: &ConfState) -> Result<ConfState, ConfChangeError> {
        if self.steps.iter().any(|s| step_node(s) == NodeId(0)) {
            return Err(ConfChangeError::ZeroNode);
        }
        let mut next = conf.clone();
        if self.steps.is_empty() {
            if !conf.is_joint() {
                return Err(ConfChangeError::NotJoint);
            }
            next.voters_outgoing.clear();
            let promoted: Vec<NodeId> = next.learners_next.iter().copied().collect();
            next.learners.extend(promoted);
            next.learners_next.clear();
            next.auto_leave = false;
            return Ok(next);
        }
        if conf.is_joint() {
            return Err(ConfChangeError::AlreadyJoint);
        }
        if self.needs_joint(conf) {
            next.voters_outgoing = conf.voters.clone();
            next.auto_leave = self.transition == ConfChangeTransition::Auto;
        }
        for step in &self.steps {
            match *step {
                ConfChangeStep::AddVoter(node) => {
                    next.learners.remove(&node);
                    next.learners_next.remove(&node);
                    next.voters.insert(node);
                }
                ConfChangeStep::AddLearner(node) => {
                    next.voters.remove(&node);
                    if next.voters_outgoing.contains(&node) {
                        // Still a voter of the outgoing half: it becomes a learner on leave.
                        next.learners_next.insert(node);
                    } else {
                        next.learners.insert(node);
                    }
                }
                ConfChangeStep::RemoveNode(node) => {
                    next.voters.remove(&node);
                    next.learners.remove(&node);
                    next.learners_next.remove(&node);
                }
            }
        }
        if next.voters.is_empty() {
            return Err(ConfChangeError::NoVoters);
        }
        Ok(next)
    }
}

fn step_node(step: &ConfChangeStep) -> NodeId {
    match *step {
        ConfChangeStep::AddVoter(n) | ConfChangeStep::AddLearner(n) => n,
        ConfChangeStep::RemoveNode(n) => n,
    }
}

fn apply_steps(
    voters: &mut std::collections::BTreeSet<NodeId>,
    learners: &mut std::collections::BTreeSet<NodeId>,
    steps: &[ConfChangeStep],
) {
    for step in steps {
        match *step {
            ConfChangeStep::AddVoter(node) => {
                learners.remove(&node);
                voters.insert(node);
            }
            ConfChangeStep::AddLearner(node) => {
                voters.remove(&node);
                learners.insert(node);
            }
            ConfChangeStep::RemoveNode(node) => {
                voters.remove(&node);
                learners.remove(&node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ids(list: &[u64]) -> BTreeSet<NodeId> {
        list.iter().map(|i| NodeId(*i)).collect()
    }

    fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
        ConfState {
            voters: ids(voters),
            learners: ids(learners),
            ..ConfState::default()
        }
    }

    #[test]
    fn single_voter_change_is_one_step_and_several_go_joint() {
        use ConfChangeStep::*;
        let base = conf(&[1, 2, 3], &[]);
        // (steps, joint?, voters after, outgoing after)
        type Row = (Vec<ConfChangeStep>, bool, Vec<u64>, Vec<u64>);
        let table: Vec<Row> = vec![
            (vec![AddVoter(NodeId(4))], false, vec![1, 2, 3, 4], vec![]),
            (vec![RemoveNode(NodeId(3))], false, vec![1, 2], vec![]),
            (vec![AddLearner(NodeId(5))], false, vec![1, 2, 3], vec![]),
            (
                vec![AddVoter(NodeId(4)), RemoveNode(NodeId(1))],
                true,
                vec![2, 3, 4],
                vec![1, 2, 3],
            ),
            (
                vec![AddVoter(NodeId(4)), AddVoter(NodeId(5))],
                true,
                vec![1, 2, 3, 4, 5],
                vec![1, 2, 3],
            ),
        ];
        for (steps, joint, voters, outgoing) in table {
            let change = ConfChange::with_steps(steps.clone());
            let next = change.apply_to(&base).unwrap();
            assert_eq!(change.needs_joint(&base), joint, "{steps:?}");
            assert_eq!(next.voters, ids(&voters), "{steps:?}");
            assert_eq!(next.voters_outgoing, ids(&outgoing), "{steps:?}");
        }
    }

    #[test]
    fn demoted_voter_becomes_learner_only_when_joint_is_left() {
        let base = conf(&[1, 2, 3], &[]);
        let change = ConfChange::with_steps(vec![
            ConfChangeStep::AddLearner(NodeId(3)),
            ConfChangeStep::AddVoter(NodeId(4)),
        ]);
        let joint = change.apply_to(&base).unwrap();
        assert_eq!(joint.learners_next, ids(&[3]));
        assert!(joint.auto_leave);
        let left = ConfChange::leave_joint().apply_to(&joint).unwrap();
        assert_eq!(left.learners, ids(&[3]));
        assert_eq!(left.voters, ids(&[1, 2, 4]));
        assert!(!left.is_joint());
    }

    #[test]
    fn invalid_changes_are_refused() {
        let base = conf(&[1], &[]);
        let remove_all = ConfChange::with_steps(vec![ConfChangeStep::RemoveNode(NodeId(1))]);
        assert_eq!(remove_all.apply_to(&base), Err(ConfChangeError::NoVoters));
        assert_eq!(
            ConfChange::leave_joint().apply_to(&base),
            Err(ConfChangeError::NotJoint)
        );
        let joint = ConfChange::with_steps(vec![
            ConfChangeStep::AddVoter(NodeId(2)),
            ConfChangeStep::AddVoter(NodeId(3)),
        ])
        .apply_to(&base)
        .unwrap();
        let again = ConfChange::with_steps(vec![ConfChangeStep::AddVoter(NodeId(4))]);
        assert_eq!(again.apply_to(&joint), Err(ConfChangeError::AlreadyJoint));
    }

    #[test]
    fn conf_change_roundtrips_and_rejects_garbage() {
        let change = ConfChange {
            steps: vec![
                ConfChangeStep::AddLearner(NodeId(7)),
                ConfChangeStep::RemoveNode(NodeId(2)),
            ],
            transition: ConfChangeTransition::JointExplicit,
        };
        assert_eq!(ConfChange::decode(change.encode()), Ok(change.clone()));
        let mut bytes = change.encode().to_vec();
        bytes.push(0);
        assert!(ConfChange::decode(Bytes::from(bytes)).is_err());
        assert!(ConfChange::decode(Bytes::from_static(&[1, 0, 255, 255, 255, 255])).is_err());
    }
}
