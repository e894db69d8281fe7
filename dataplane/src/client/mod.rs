//! The client library: talks to chunkservers over their client listeners, finds and caches
//! each copyset's leader, follows `Redirect`s, and retries with bounded backoff until a
//! deadline. Many requests may be in flight at once; each is answered once.
//!
//! Runs on a glommio executor (the connections are the shard-local ones of `net`).

mod config;
pub mod scrub;
mod service;

pub use config::ClientConfig;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftcore::{ConfChange, ConfChangeStep, NodeId};

use crate::config::Endpoint;
use crate::copyset::ChunkOp;
use crate::ids::{ChunkId, CopysetId};
use crate::net::{Backoff, Message, NetContext, NetError, Opcode, PeerConnection};
/// A node's client address (defined with the protocol's routing rules).
pub use crate::protocol::NodeAddress;
use crate::protocol::{
    self, shard_of, CopysetStatus, CreateCopyset, Membership, ReadChunk, Status,
};

/// Why a client call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No replica answered in time; `last` is what the last attempt saw.
    #[error("{op} on copyset {copyset} gave up after {elapsed:?}: {last}")]
    Deadline {
        /// The operation.
        op: &'static str,
        /// The copyset.
        copyset: CopysetId,
        /// Time spent.
        elapsed: Duration,
        /// The last failure.
        last: String,
    },
    /// The server refused the request for good (malformed, out of range, backward sn…).
    #[error("{op} on copyset {copyset} refused: {status:?}")]
    Refused {
        /// The operation.
        op: &'static str,
        /// The copyset.
        copyset: CopysetId,
        /// What the server said.
        status: Status,
    },
    /// The client knows no such node.
    #[error("node {0} is not in the client's cluster map")]
    UnknownNode(u64),
    /// The client knows no node to send a copyset's request to: its peer list for the
    /// copyset is empty and so is its cluster map.
    #[error("copyset {0}: no node to ask (an empty peer list and an empty cluster map)")]
    NoNodes(CopysetId),
    /// The answer could not be decoded.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// The request is larger than any frame may carry: sending it again cannot help.
    #[error("{op} on copyset {copyset}: a request of {len} bytes exceeds the frame limit of {max} bytes; split it")]
    TooLarge {
        /// The operation.
        op: &'static str,
        /// The copyset.
        copyset: CopysetId,
        /// The request's size.
        len: usize,
        /// The limit.
        max: u32,
    },
}

/// A client of one cluster.
pub struct Client {
    nodes: HashMap<u64, NodeAddress>,
    config: ClientConfig,
    net: NetContext,
    leaders: RefCell<HashMap<CopysetId, u64>>,
    peers: RefCell<HashMap<CopysetId, Vec<u64>>>,
    connections: RefCell<HashMap<(u64, u32), Rc<PeerConnection>>>,
}

impl Client {
    /// A client for the given nodes.
    pub fn new(nodes: &[NodeAddress], config: ClientConfig) -> Client {
        Client {
            nodes: nodes.iter().map(|n| (n.id, *n)).collect(),
            net: NetContext {
                auth: config.auth.clone().map(Rc::new),
                ..NetContext::from_section(&config.net)
            },
            config,
            leaders: RefCell::new(HashMap::new()),
            peers: RefCell::new(HashMap::new()),
            connections: RefCell::new(HashMap::new()),
        }
    }

    /// Tells the client which nodes replicate `copyset` (where to look for its leader).
    pub fn set_peers(&self, copyset: CopysetId, peers: &[u64]) {
        self.peers.borrow_mut().insert(copyset, peers.to_vec());
    }

    /// The leader the client last saw for `copyset`.
    pub fn cached_leader(&self, copyset: CopysetId) -> Option<u64> {
        self.leaders.borrow().get(&copyset).copied()
    }

    fn connection(&self, node: u64, copyset: CopysetId) -> Result<Rc<PeerConnection>, ClientError> {
        let address = self
            .nodes
            .get(&node)
            .ok_or(ClientError::UnknownNode(node))?;
        self.shard_connection(node, shard_of(copyset, address.shards))
    }

    fn shard_connection(&self, node: u64, shard: u32) -> Result<Rc<PeerConnection>, ClientError> {
        let address = self
            .nodes
            .get(&node)
            .ok_or(ClientError::UnknownNode(node))?;
        if let Some(connection) = self.connections.borrow().get(&(node, shard)) {
            return Ok(Rc::clone(connection));
        }
        let addr = address
            .endpoint
            .for_shard(shard)
            .ok_or(ClientError::UnknownNode(node))?;
        let endpoint = Endpoint {
            transport: address.endpoint.transport,
            addr,
        };
        let backoff = Backoff {
            initial: self.config.backoff_initial,
            max: self.config.backoff_max,
            attempts_max: 1,
        };
        let connection = Rc::new(PeerConnection::new(endpoint, self.net.clone(), backoff));
        self.connections
            .borrow_mut()
            .insert((node, shard), Rc::clone(&connection));
        Ok(connection)
    }

    /// One request to one node, no retries.
    pub async fn call_node(
        &self,
        node: u64,
        copyset: CopysetId,
        opcode: Opcode,
        payload: Bytes,
    ) -> Result<(Status, Bytes), String> {
        let connection = self.connection(node, copyset).map_err(|e| e.to_string())?;
        let answer = connection
            .call(Message::new(opcode, copyset.0, payload))
            .await
            .map_err(|e: NetError| e.to_string())?;
        protocol::decode_response(&answer.payload).map_err(|e| e.to_string())
    }

    /// Every copyset `node` holds, from each of its shards.
    pub async fn list_copysets(&self, node: u64) -> Result<Vec<CopysetId>, ClientError> {
        let address = *self
            .nodes
            .get(&node)
            .ok_or(ClientError::UnknownNode(node))?;
        let mut all = Vec::new();
        for shard in 0..address.shards {
            let connection = self.shard_connection(node, shard)?;
            let answer = connection
                .call(Message::new(protocol::LIST_COPYSETS, 0, Bytes::new()))
                .await
                .map_err(|e| ClientError::Malformed(format!("node {node} shard {shard}: {e}")))?;
            let (status, body) = protocol::decode_response(&answer.payload)
                .map_err(|e| ClientError::Malformed(e.to_string()))?;
            if status != Status::Ok {
                return Err(ClientError::Refused {
                    op: "list copysets",
                    copyset: CopysetId(0),
                    status,
                });
            }
            let ids = protocol::decode_copyset_list(&body)
                .map_err(|e| ClientError::Malformed(e.to_string()))?;
            all.extend(ids.into_iter().map(CopysetId));
        }
        all.sort_unstable();
        Ok(all)
    }

    /// Creates `copyset` on every one of `peers` (idempotent).
    pub async fn create_copyset(
        &self,
        copyset: CopysetId,
        peers: &[u64],
    ) -> Result<(), ClientError> {
        self.set_peers(copyset, peers);
        let body = CreateCopyset {
            peers: peers.iter().map(|&p| NodeId(p)).collect(),
            join: false,
        }
        .encode();
        for &node in peers {
            self.with_retries(
                "create copyset",
                copyset,
                Some(node),
                protocol::CREATE_COPYSET,
                &body,
            )
            .await?;
        }
        Ok(())
    }

    /// Deletes `node`'s replica of `copyset` and its chunks (remove the node from the
    /// membership first). Deleting a replica that is not there answers `CopysetNotFound`.
    pub async fn delete_copyset(&self, copyset: CopysetId, node: u64) -> Result<(), ClientError> {
        self.with_retries(
            "delete copyset",
            copyset,
            Some(node),
            protocol::DELETE_COPYSET,
            &Bytes::new(),
        )
        .await
        .map(|_| ())
    }

    /// Forces `node`'s replica of `copyset` to take `voters` as its membership, without
    /// consensus: disaster recovery for a copyset that lost its quorum for good. Send it to
    /// every surviving replica named in `voters`. The admin role: `confirm` says the caller
    /// accepts losing writes no named voter holds, `admin_token` is the node's
    /// (`[admin] token_file`); without either the node refuses.
    pub async fn reset_peers(
        &self,
        copyset: CopysetId,
        node: u64,
        voters: &[u64],
        confirm: bool,
        admin_token: &[u8],
    ) -> Result<(), ClientError> {
        let body = protocol::ResetPeers {
            peers: voters.iter().map(|&p| NodeId(p)).collect(),
            confirm,
            token: admin_token.to_vec(),
        }
        .encode();
        self.with_retries(
            "reset peers",
            copyset,
            Some(node),
            protocol::RESET_PEERS,
            &body,
        )
        .await
        .map(|_| ())
    }

    /// Creates a replica of an existing copyset on `node`, which is not one of its voters yet:
    /// `initial_peers` are the copyset's voters *at creation* (the replica starts from the
    /// same bootstrap snapshot and may take the leader's log from index 2), or empty (the
    /// replica starts empty and installs the leader's snapshot). A peer change then
    /// adds it. Idempotent.
    pub async fn create_joining_replica(
        &self,
        copyset: CopysetId,
        node: u64,
        initial_peers: &[u64],
    ) -> Result<(), ClientError> {
        let body = CreateCopyset {
            peers: initial_peers.iter().map(|&p| NodeId(p)).collect(),
            join: true,
        }
        .encode();
        self.with_retries(
            "create joining replica",
            copyset,
            Some(node),
            protocol::CREATE_COPYSET,
            &body,
        )
        .await
        .map(|_| ())
    }

    /// Proposes a membership change to the copyset's leader; returns the membership once the
    /// change is applied there (a change of several voters: once its joint configuration is
    /// left). A replica added as a voter must exist first ([`Client::create_joining_replica`]).
    pub async fn change_peers(
        &self,
        copyset: CopysetId,
        change: &ConfChange,
    ) -> Result<Membership, ClientError> {
        let answer = self
            .leader_call(
                "change peers",
                copyset,
                protocol::CHANGE_PEERS,
                change.encode(),
            )
            .await?;
        let membership =
            Membership::decode(&answer).map_err(|e| ClientError::Malformed(e.to_string()))?;
        // Later calls look for the leader among the new members too.
        let mut peers = membership.voters.clone();
        peers.extend(membership.learners.iter().copied());
        let mut known = self
            .peers
            .borrow()
            .get(&copyset)
            .cloned()
            .unwrap_or_default();
        for peer in peers {
            if !known.contains(&peer) {
                known.push(peer);
            }
        }
        self.set_peers(copyset, &known);
        Ok(membership)
    }

    /// The membership the copyset's leader uses, found by asking `candidates` in turn.
    pub async fn leader_membership(
        &self,
        copyset: CopysetId,
        candidates: &[u64],
    ) -> Result<(u64, Membership), ClientError> {
        let started = Instant::now();
        let mut wait = self.config.backoff_initial;
        loop {
            let mut best: Option<(u64, CopysetStatus)> = None;
            for &node in candidates {
                let body = match self
                    .call_node(node, copyset, protocol::COPYSET_STATUS, Bytes::new())
                    .await
                {
                    Ok((Status::Ok, body)) => body,
                    _ => continue,
                };
                let Ok(status) = CopysetStatus::decode(&body) else {
                    continue;
                };
                if status.role == 3 && best.as_ref().map_or(true, |(_, b)| status.term > b.term) {
                    best = Some((node, status));
                }
            }
            if let Some((node, status)) = best {
                return Ok((node, status.membership));
            }
            if started.elapsed() >= self.config.deadline {
                return Err(ClientError::Deadline {
                    op: "find leader",
                    copyset,
                    elapsed: started.elapsed(),
                    last: format!("no leader among nodes {candidates:?}"),
                });
            }
            glommio::timer::sleep(wait).await;
            wait = (wait * 2).min(self.config.backoff_max);
        }
    }

    /// Adds `node` as a voter: creates its replica (from the bootstrap of `initial_peers`, or
    /// empty when that is empty,
    /// the copyset's voters at creation), then changes the membership.
    pub async fn add_peer(
        &self,
        copyset: CopysetId,
        node: u64,
        initial_peers: &[u64],
    ) -> Result<Membership, ClientError> {
        self.create_joining_replica(copyset, node, initial_peers)
            .await?;
        let change = ConfChange::with_steps(vec![ConfChangeStep::AddVoter(NodeId(node))]);
        self.change_peers(copyset, &change).await
    }

    /// Removes `node` from every role in the copyset (its replica stays on the node, idle).
    pub async fn remove_peer(
        &self,
        copyset: CopysetId,
        node: u64,
    ) -> Result<Membership, ClientError> {
        let change = ConfChange::with_steps(vec![ConfChangeStep::RemoveNode(NodeId(node))]);
        self.change_peers(copyset, &change).await
    }

    /// Makes `peers` the copyset's voters: reads the leader's membership (asking `known`,
    /// the nodes that may hold it), creates the replicas of new nodes (from the bootstrap
    /// of `initial_peers`, or empty), and proposes every addition and removal as one change (joint
    /// consensus when more than one voter changes).
    pub async fn set_voters(
        &self,
        copyset: CopysetId,
        known: &[u64],
        peers: &[u64],
        initial_peers: &[u64],
    ) -> Result<Membership, ClientError> {
        let (_, current) = self.leader_membership(copyset, known).await?;
        let mut steps = Vec::new();
        for &node in peers {
            if !current.voters.contains(&node) {
                self.create_joining_replica(copyset, node, initial_peers)
                    .await?;
                steps.push(ConfChangeStep::AddVoter(NodeId(node)));
            }
        }
        for &node in &current.voters {
            if !peers.contains(&node) {
                steps.push(ConfChangeStep::RemoveNode(NodeId(node)));
            }
        }
        if steps.is_empty() && !current.is_joint() {
            return Ok(current);
        }
        self.change_peers(copyset, &ConfChange::with_steps(steps))
            .await
    }

    /// The raft status of `copyset` on `node`.
    pub async fn copyset_status(
        &self,
        node: u64,
        copyset: CopysetId,
    ) -> Result<CopysetStatus, ClientError> {
        let body = self
            .with_retries(
                "copyset status",
                copyset,
                Some(node),
                protocol::COPYSET_STATUS,
                &Bytes::new(),
            )
            .await?;
        CopysetStatus::decode(&body).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// Asks the copyset's leader to hand leadership to `to` (a voter). Returns once the leader
    /// accepted; the transfer itself completes within an election timeout.
    pub async fn transfer_leader(&self, copyset: CopysetId, to: u64) -> Result<(), ClientError> {
        let body = Bytes::copy_from_slice(&to.to_le_bytes());
        self.leader_call("transfer leader", copyset, protocol::TRANSFER_LEADER, body)
            .await?;
        // The cached leader is about to be wrong.
        self.leaders.borrow_mut().remove(&copyset);
        Ok(())
    }

    /// Writes `data` at `offset` of `chunk`; returns once replicated and applied.
    pub async fn write(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        offset: u32,
        data: Bytes,
        sn: u64,
    ) -> Result<(), ClientError> {
        let body = ChunkOp::Write {
            chunk,
            sn,
            offset,
            data,
        }
        .encode();
        self.leader_call("write", copyset, protocol::WRITE_CHUNK, body)
            .await
            .map(|_| ())
    }

    /// Deletes `chunk`.
    pub async fn delete(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        sn: u64,
    ) -> Result<(), ClientError> {
        let body = ChunkOp::Delete { chunk, sn }.encode();
        self.leader_call("delete", copyset, protocol::DELETE_CHUNK, body)
            .await
            .map(|_| ())
    }

    /// Reads `len` bytes at `offset` of the version of `chunk` with sequence number `sn` (its
    /// snapshot, or the chunk itself when `sn` is its current one), linearizably.
    pub async fn read_snapshot(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        sn: u64,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, ClientError> {
        let body = protocol::ReadSnapshot {
            chunk,
            sn,
            offset,
            len,
        }
        .encode();
        self.leader_call("read snapshot", copyset, protocol::READ_SNAPSHOT, body)
            .await
    }

    /// A chunk's size (the cluster's chunk size), from the copyset's leader; `None` when the
    /// chunk does not exist.
    pub async fn chunk_size(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
    ) -> Result<Option<u64>, ClientError> {
        let body = Bytes::copy_from_slice(&chunk.0.to_le_bytes());
        match self
            .leader_call("chunk info", copyset, protocol::GET_CHUNK_INFO, body)
            .await
        {
            Ok(info) => {
                let size = info
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_le_bytes)
                    .ok_or_else(|| ClientError::Malformed("a chunk info of no size".into()))?;
                Ok(Some(size))
            }
            Err(ClientError::Refused {
                status: Status::ChunkNotFound,
                ..
            }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// A chunk's sequence number and its snapshot's (if it has one), from the copyset's
    /// leader; `None` when the chunk does not exist.
    pub async fn chunk_versions(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
    ) -> Result<Option<(u64, Option<u64>)>, ClientError> {
        let body = Bytes::copy_from_slice(&chunk.0.to_le_bytes());
        let info = match self
            .leader_call("chunk info", copyset, protocol::GET_CHUNK_INFO, body)
            .await
        {
            Ok(info) => info,
            Err(ClientError::Refused {
                status: Status::ChunkNotFound,
                ..
            }) => return Ok(None),
            Err(error) => return Err(error),
        };
        let word = |at: usize| {
            info.get(at..at + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
        };
        let (Some(sn), Some(flag), Some(snapshot)) = (word(8), info.get(16), word(17)) else {
            return Err(ClientError::Malformed("a chunk info too short".into()));
        };
        Ok(Some((sn, (*flag != 0).then_some(snapshot))))
    }

    /// Applies one chunk operation (write, delete, snapshot deletion, clone operations)
    /// through the copyset's leader; returns once replicated and applied.
    pub async fn apply(&self, copyset: CopysetId, op: &ChunkOp) -> Result<(), ClientError> {
        let name = protocol::opcode_name(protocol::opcode_of(op));
        self.leader_call(name, copyset, protocol::opcode_of(op), op.encode())
            .await
            .map(|_| ())
    }

    /// Deletes `chunk`'s snapshot, or records `sn` as its corrected sn (Curve's
    /// DeleteSnapshotChunkOrCorrectSn).
    pub async fn delete_snapshot_or_correct_sn(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        sn: u64,
    ) -> Result<(), ClientError> {
        self.apply(copyset, &ChunkOp::DeleteSnapshotOrCorrectSn { chunk, sn })
            .await
    }

    /// Creates `chunk` as a lazy clone of `source`, a chunk of the same copyset.
    pub async fn create_clone_chunk(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        source: ChunkId,
        sn: u64,
    ) -> Result<(), ClientError> {
        self.apply(copyset, &ChunkOp::CreateClone { chunk, source, sn })
            .await
    }

    /// Fills the pages of clone `chunk` at `offset` that were not written since it was made.
    pub async fn paste_chunk(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        offset: u32,
        data: Bytes,
    ) -> Result<(), ClientError> {
        self.apply(
            copyset,
            &ChunkOp::Paste {
                chunk,
                offset,
                data,
            },
        )
        .await
    }

    /// Copies the unwritten pages of clone `chunk` in `offset..offset + len` from its source.
    pub async fn recover_chunk(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        offset: u32,
        len: u32,
    ) -> Result<(), ClientError> {
        self.apply(copyset, &ChunkOp::Recover { chunk, offset, len })
            .await
    }

    /// Makes clone `chunk` a plain chunk, copying its unwritten pages from its source.
    pub async fn flatten_chunk(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
    ) -> Result<(), ClientError> {
        self.apply(copyset, &ChunkOp::Flatten { chunk }).await
    }

    /// Reads `len` bytes at `offset` of `chunk`, linearizably (from the leader).
    pub async fn read(
        &self,
        copyset: CopysetId,
        chunk: ChunkId,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, ClientError> {
        let body = ReadChunk { chunk, offset, len }.encode();
        self.leader_call("read", copyset, protocol::READ_CHUNK, body)
            .await
    }

    async fn leader_call(
        &self,
        op: &'static str,
        copyset: CopysetId,
        opcode: Opcode,
        body: Bytes,
    ) -> Result<Bytes, ClientError> {
        self.with_retries(op, copyset, None, opcode, &body).await
    }

    /// Sends the request to `fixed` (or to the copyset's leader, found by following redirects
    /// and trying each peer in turn) until it succeeds, is refused, or the deadline passes.
    async fn with_retries(
        &self,
        op: &'static str,
        copyset: CopysetId,
        fixed: Option<u64>,
        opcode: Opcode,
        body: &Bytes,
    ) -> Result<Bytes, ClientError> {
        let started = Instant::now();
        check_fits(op, copyset, body)?;
        let candidates = self.candidates(copyset, fixed);
        if candidates.is_empty() && self.cached_leader(copyset).is_none() {
            return Err(ClientError::NoNodes(copyset));
        }
        let mut next_candidate = 0;
        let mut wait = self.config.backoff_initial;
        loop {
            let target = self.target(copyset, fixed, &candidates, &mut next_candidate);
            let outcome = self.attempt(target, copyset, opcode, body, started).await;
            let (last, redirect_now) = match self.judge(op, copyset, fixed, target, outcome)? {
                Judged::Answered(body) => return Ok(body),
                Judged::Again { last, redirect_now } => (last, redirect_now),
            };
            if started.elapsed() >= self.config.deadline {
                return Err(ClientError::Deadline {
                    op,
                    copyset,
                    elapsed: started.elapsed(),
                    last,
                });
            }
            if !redirect_now {
                glommio::timer::sleep(wait).await;
                wait = (wait * 2).min(self.config.backoff_max);
            }
        }
    }

    /// The nodes to try in turn when no leader is cached: `fixed` alone, else the copyset's
    /// peers, else every known node in id order.
    fn candidates(&self, copyset: CopysetId, fixed: Option<u64>) -> Vec<u64> {
        match fixed {
            Some(node) => vec![node],
            None => self
                .peers
                .borrow()
                .get(&copyset)
                .cloned()
                .unwrap_or_else(|| {
                    let mut all: Vec<u64> = self.nodes.keys().copied().collect();
                    all.sort_unstable();
                    all
                }),
        }
    }

    /// The node this attempt goes to: `fixed`, else the cached leader, else the next
    /// candidate in turn.
    fn target(
        &self,
        copyset: CopysetId,
        fixed: Option<u64>,
        candidates: &[u64],
        next_candidate: &mut usize,
    ) -> u64 {
        match fixed {
            Some(node) => node,
            None => match self.cached_leader(copyset) {
                Some(leader) => leader,
                None => {
                    // Not empty: `with_retries` refuses a request with no candidate and no
                    // leader, and a leader forgotten since falls back to node 0, unknown.
                    let node = candidates
                        .get(*next_candidate % candidates.len().max(1))
                        .copied()
                        .unwrap_or(0);
                    *next_candidate += 1;
                    node
                }
            },
        }
    }

    /// One attempt against `target`, given up after the attempt timeout (or what remains of
    /// the deadline, at least 1 ms).
    async fn attempt(
        &self,
        target: u64,
        copyset: CopysetId,
        opcode: Opcode,
        body: &Bytes,
        started: Instant,
    ) -> Result<(Status, Bytes), String> {
        let remaining = self.config.deadline.saturating_sub(started.elapsed());
        let limit = self
            .config
            .attempt_timeout
            .min(remaining)
            .max(Duration::from_millis(1));
        futures_lite::future::or(
            self.call_node(target, copyset, opcode, body.clone()),
            async {
                glommio::timer::sleep(limit).await;
                Err(format!("no answer within {limit:?}"))
            },
        )
        .await
    }

    /// What an attempt's outcome means: the answer, a refusal (`Err`), or another attempt;
    /// the leader cache learns from it (unless the target is `fixed`).
    fn judge(
        &self,
        op: &'static str,
        copyset: CopysetId,
        fixed: Option<u64>,
        target: u64,
        outcome: Result<(Status, Bytes), String>,
    ) -> Result<Judged, ClientError> {
        let again = |last: String, redirect_now: bool| Ok(Judged::Again { last, redirect_now });
        match outcome {
            Ok((Status::Ok, body)) => {
                if fixed.is_none() {
                    self.leaders.borrow_mut().insert(copyset, target);
                }
                Ok(Judged::Answered(body))
            }
            Ok((Status::Redirect { leader }, _)) => {
                let last = format!("node {target} redirects to {leader}");
                again(last, self.follow_redirect(copyset, target, leader))
            }
            Ok((Status::Retry(reason), _)) => again(format!("node {target}: {reason}"), false),
            Ok((Status::CopysetNotFound, _)) if fixed.is_none() => {
                // That node does not hold it (yet): look elsewhere.
                let last = format!("node {target} does not have the copyset");
                self.leaders.borrow_mut().remove(&copyset);
                again(last, false)
            }
            Ok((status, _)) => Err(ClientError::Refused {
                op,
                copyset,
                status,
            }),
            Err(error) => {
                let last = format!("node {target}: {error}");
                self.leaders.borrow_mut().remove(&copyset);
                again(last, false)
            }
        }
    }

    /// Caches the leader `target` redirected to, when it is a known node other than `target`
    /// (then the next attempt goes there at once: returns true); otherwise forgets the
    /// cached leader.
    fn follow_redirect(&self, copyset: CopysetId, target: u64, leader: u64) -> bool {
        if leader != 0 && leader != target && self.nodes.contains_key(&leader) {
            self.leaders.borrow_mut().insert(copyset, leader);
            true
        } else {
            self.leaders.borrow_mut().remove(&copyset);
            false
        }
    }
}

/// What one attempt of `with_retries` came to, short of a refusal.
enum Judged {
    /// The request succeeded with this answer.
    Answered(Bytes),
    /// Another attempt is due; `last` says why this one failed, `redirect_now` that it goes
    /// to the leader named by a redirect, without a backoff.
    Again { last: String, redirect_now: bool },
}

/// Refuses a request larger than any frame may carry: sending it again cannot help.
fn check_fits(op: &'static str, copyset: CopysetId, body: &Bytes) -> Result<(), ClientError> {
    let max = crate::protocol::frame::DEFAULT_MAX_PAYLOAD;
    if body.len() > max as usize {
        return Err(ClientError::TooLarge {
            op,
            copyset,
            len: body.len(),
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that knows no node answers a request with an error, not a panic (the
    /// candidate list was indexed without a check).
    #[test]
    fn a_client_without_nodes_refuses_instead_of_panicking() {
        let executor = glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let client = Client::new(&[], ClientConfig::default());
                let read = client.read(CopysetId(1), ChunkId(1), 0, 4096).await;
                assert!(
                    matches!(read, Err(ClientError::NoNodes(CopysetId(1)))),
                    "{read:?}"
                );
                client.set_peers(CopysetId(2), &[]);
                let write = client
                    .write(CopysetId(2), ChunkId(1), 0, Bytes::from(vec![1u8; 4096]), 1)
                    .await;
                assert!(matches!(write, Err(ClientError::NoNodes(_))), "{write:?}");
            })
            .expect("executor");
        executor.join().expect("the client panicked");
    }
}
