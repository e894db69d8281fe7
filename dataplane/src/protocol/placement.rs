//! The placement service's bodies: a chunkserver's heartbeat (what it is, what it holds, how
//! full it is) and the topology the service answers with. Control-plane messages, a few per
//! node every few seconds, so they are JSON — readable in a capture, and a field can be added
//! without a version bump — bounded in size before they are parsed.

use serde::{Deserialize, Serialize};

/// The largest heartbeat or topology body accepted.
pub const MAX_PLACEMENT_BODY: usize = 4 << 20;

/// Why a placement body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementBodyError {
    /// Larger than [`MAX_PLACEMENT_BODY`].
    #[error("a placement body of {0} bytes is over the {MAX_PLACEMENT_BODY}-byte limit")]
    TooLarge(usize),
    /// Not the JSON of the expected shape.
    #[error("a placement body is malformed: {0}")]
    Malformed(String),
}

/// One replica as its chunkserver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// The copyset.
    pub copyset: u64,
    /// The shard holding it.
    pub shard: u32,
    /// `follower`, `precandidate`, `candidate` or `leader`.
    pub role: String,
    /// The leader it knows (0: none).
    pub leader: u64,
    /// Its term.
    pub term: u64,
    /// Its applied index.
    pub applied: u64,
    /// The voters it uses.
    pub voters: Vec<u64>,
    /// The other nodes its configuration names: outgoing voters of a joint change, learners.
    #[serde(default)]
    pub others: Vec<u64>,
}

/// A chunkserver's heartbeat to the placement service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Its node id.
    pub node: u64,
    /// Its zone label.
    pub zone: String,
    /// Its host label.
    pub host: String,
    /// Its shard count.
    pub shards: u32,
    /// Chunk slots over all its shards.
    pub slots_total: u64,
    /// Chunk slots still free.
    pub slots_free: u64,
    /// Its replicas.
    pub replicas: Vec<ReplicaReport>,
}

/// The placement service's answer to a heartbeat: what the node is to do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// Copysets whose replica on the node was left behind by a membership change (stale for
    /// the service's grace period): the node removes them, unless a change joined one lately.
    #[serde(default)]
    pub stale: Vec<u64>,
}

/// A request to the scheduler's operator list (`OPERATORS`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorsRequest {
    /// The copyset whose running replacement to cancel first, if any.
    #[serde(default)]
    pub cancel: Option<u64>,
}

/// One of the scheduler's operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    /// The copyset it changes.
    pub copyset: u64,
    /// `replace` (a voter on an offline node by one on an up node) or `transfer_leader`.
    pub kind: String,
    /// The node it moves away from (the replaced voter, the old leader; 0: none).
    pub from: u64,
    /// The node it moves to.
    pub to: u64,
    /// `running`, `cancelling`, `held` (cancelled; left out of planning for a while) or
    /// `cooling` (a leadership moved lately, left alone for a while).
    pub state: String,
    /// Milliseconds since it started.
    pub age_ms: u64,
}

/// The placement service's answer to `OPERATORS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operators {
    /// The node that answered (the metadata copyset's leader).
    pub service: u64,
    /// The operators, replacements first.
    pub operators: Vec<Operator>,
}

/// A chunkserver as the placement service sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyNode {
    /// Its node id.
    pub node: u64,
    /// Its zone label.
    pub zone: String,
    /// Its host label.
    pub host: String,
    /// `up` (heartbeats arrive), `unstable` (missed lately), `offline` (silent past the
    /// offline bound), `unknown` (registered, not heard since this service instance led).
    pub state: String,
    /// Milliseconds since its last heartbeat reached this instance (none: never).
    pub age_ms: Option<u64>,
    /// What its last heartbeat said (none: never heard by this instance).
    pub last: Option<Heartbeat>,
}

/// The placement service's answer to `TOPOLOGY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// The node that answered (the metadata copyset's leader).
    pub service: u64,
    /// Every registered chunkserver, by id.
    pub nodes: Vec<TopologyNode>,
}

/// Encodes a placement body.
pub fn encode<T: Serialize>(value: &T) -> bytes::Bytes {
    // Serializing these plain structs cannot fail.
    bytes::Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// Decodes a placement body, refusing one over the size limit before parsing it.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, PlacementBodyError> {
    if bytes.len() > MAX_PLACEMENT_BODY {
        return Err(PlacementBodyError::TooLarge(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| PlacementBodyError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_round_trip_and_bad_bodies_are_errors() {
        let heartbeat = Heartbeat {
            node: 2,
            zone: "z".into(),
            host: "h".into(),
            shards: 2,
            slots_total: 600,
            slots_free: 580,
            replicas: vec![ReplicaReport {
                copyset: 7,
                shard: 1,
                role: "leader".into(),
                leader: 2,
                term: 3,
                applied: 40,
                voters: vec![1, 2, 3],
                others: vec![4],
            }],
        };
        let bytes = encode(&heartbeat);
        assert_eq!(decode::<Heartbeat>(&bytes), Ok(heartbeat));
        assert!(matches!(
            decode::<Heartbeat>(b"{\"node\": 1}"),
            Err(PlacementBodyError::Malformed(_))
        ));
        let huge = vec![b' '; MAX_PLACEMENT_BODY + 1];
        assert_eq!(
            decode::<Heartbeat>(&huge),
            Err(PlacementBodyError::TooLarge(MAX_PLACEMENT_BODY + 1))
        );
    }
}
