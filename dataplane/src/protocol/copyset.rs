//! Copyset service bodies: creation, status and membership, listing, reset of peers.

use bytes::{BufMut, Bytes, BytesMut};
use raftcore::NodeId;

use super::reader::{Reader, WireError};

/// Encodes a list of copyset ids: count u32, then each id u64.
pub fn encode_copyset_list(ids: &[u64]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + 8 * ids.len());
    out.put_u32_le(ids.len() as u32);
    for id in ids {
        out.put_u64_le(*id);
    }
    out.freeze()
}

/// Decodes a list of copyset ids.
pub fn decode_copyset_list(bytes: &[u8]) -> Result<Vec<u64>, WireError> {
    let mut reader = Reader::new(bytes, "copyset list");
    let count = reader.u32()? as usize;
    if count > bytes.len() / 8 {
        return Err(WireError {
            what: "copyset list",
            why: "count exceeds the body",
        });
    }
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.push(reader.u64()?);
    }
    reader.finish()?;
    Ok(ids)
}

/// The voters a `RESET_PEERS` forces on a replica, with what the admin role requires: the
/// caller's confirmation that acknowledged writes may be lost, and the node's admin token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetPeers {
    /// The new voters (1 to [`MAX_PEERS`], none 0).
    pub peers: Vec<NodeId>,
    /// The caller confirms it accepts losing writes no named voter holds.
    pub confirm: bool,
    /// The node's admin token (`[admin] token_file`).
    pub token: Vec<u8>,
}

/// The longest admin token a request may carry.
pub const MAX_ADMIN_TOKEN: usize = 1024;

impl ResetPeers {
    /// Encodes: count u16, then node ids u64, then confirm u8, token length u16 and token
    /// bytes (a body that ends after the ids, from an older client, confirms nothing).
    pub fn encode(&self) -> Bytes {
        let token = &self.token[..self.token.len().min(MAX_ADMIN_TOKEN)];
        let mut out = BytesMut::with_capacity(5 + 8 * self.peers.len() + token.len());
        out.put_u16_le(self.peers.len() as u16);
        for peer in &self.peers {
            out.put_u64_le(peer.0);
        }
        out.put_u8(u8::from(self.confirm));
        out.put_u16_le(token.len() as u16);
        out.put_slice(token);
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<ResetPeers, WireError> {
        let mut reader = Reader::new(bytes, "reset peers");
        let ids = read_ids(&mut reader)?;
        let (confirm, token) = if reader.is_empty() {
            (false, Vec::new())
        } else {
            let confirm = match reader.u8()? {
                0 => false,
                1 => true,
                _ => {
                    return Err(WireError {
                        what: "reset peers",
                        why: "confirm is neither 0 nor 1",
                    })
                }
            };
            let len = reader.u16()? as usize;
            if len > MAX_ADMIN_TOKEN {
                return Err(WireError {
                    what: "reset peers",
                    why: "admin token too long",
                });
            }
            (confirm, reader.take(len)?.to_vec())
        };
        reader.finish()?;
        if ids.is_empty() || ids.contains(&0) {
            return Err(WireError {
                what: "reset peers",
                why: "no voters, or node id 0",
            });
        }
        Ok(ResetPeers {
            peers: ids.into_iter().map(NodeId).collect(),
            confirm,
            token,
        })
    }
}

/// Creates a copyset on this node with its initial voters (this node among them, unless
/// `join`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateCopyset {
    /// The initial voters.
    pub peers: Vec<NodeId>,
    /// The replica joins an existing copyset: `peers` is the copyset's *original* voter list
    /// (not including this node), so this replica starts from the same bootstrap snapshot
    /// (index 1) and takes the leader's log from index 2; a peer change then adds it.
    pub join: bool,
}

/// The most peers a copyset may start with.
pub const MAX_PEERS: usize = 16;

impl CreateCopyset {
    /// Encodes: count u16, then node ids u64, then (only when joining) a u8 1.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(3 + 8 * self.peers.len());
        out.put_u16_le(self.peers.len() as u16);
        for peer in &self.peers {
            out.put_u64_le(peer.0);
        }
        if self.join {
            out.put_u8(1);
        }
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<CreateCopyset, WireError> {
        let mut reader = Reader::new(bytes, "create copyset");
        let count = reader.u16()? as usize;
        if count > MAX_PEERS {
            return Err(WireError {
                what: "create copyset",
                why: "peer count out of range",
            });
        }
        let mut peers = Vec::with_capacity(count);
        for _ in 0..count {
            let id = reader.u64()?;
            if id == 0 {
                return Err(WireError {
                    what: "create copyset",
                    why: "peer id 0",
                });
            }
            peers.push(NodeId(id));
        }
        let join = if reader.is_empty() {
            false
        } else {
            match reader.u8()? {
                0 => false,
                1 => true,
                _ => {
                    return Err(WireError {
                        what: "create copyset",
                        why: "join flag is neither 0 nor 1",
                    })
                }
            }
        };
        reader.finish()?;
        if peers.is_empty() && !join {
            // Only a joining replica may start without voters: it learns the membership
            // from the leader's snapshot.
            return Err(WireError {
                what: "create copyset",
                why: "no peers",
            });
        }
        Ok(CreateCopyset { peers, join })
    }
}

/// A copyset's raft status, as `COPYSET_STATUS` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopysetStatus {
    /// 0 follower, 1 pre-candidate, 2 candidate, 3 leader.
    pub role: u8,
    /// Known leader (0: none).
    pub leader: u64,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// The membership this replica uses.
    pub membership: Membership,
}

/// A copyset's membership as a replica sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Voters (of the incoming configuration while joint).
    pub voters: Vec<u64>,
    /// Voters of the outgoing configuration while joint; empty otherwise.
    pub voters_outgoing: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Learners that become voters when the joint configuration is left.
    pub learners_next: Vec<u64>,
}

impl Membership {
    /// The membership of a raft `ConfState`.
    pub fn of(conf: &raftcore::ConfState) -> Membership {
        let ids = |set: &std::collections::BTreeSet<NodeId>| set.iter().map(|n| n.0).collect();
        Membership {
            voters: ids(&conf.voters),
            voters_outgoing: ids(&conf.voters_outgoing),
            learners: ids(&conf.learners),
            learners_next: ids(&conf.learners_next),
        }
    }

    /// Encodes: four lists (voters, outgoing voters, learners, next learners), each a u16
    /// count and u64 node ids.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.put(&mut out);
        out.freeze()
    }

    fn put(&self, out: &mut BytesMut) {
        for list in [
            &self.voters,
            &self.voters_outgoing,
            &self.learners,
            &self.learners_next,
        ] {
            out.put_u16_le(list.len() as u16);
            for id in list {
                out.put_u64_le(*id);
            }
        }
    }

    fn read(reader: &mut Reader<'_>) -> Result<Membership, WireError> {
        Ok(Membership {
            voters: read_ids(reader)?,
            voters_outgoing: read_ids(reader)?,
            learners: read_ids(reader)?,
            learners_next: read_ids(reader)?,
        })
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<Membership, WireError> {
        let mut reader = Reader::new(bytes, "membership");
        let membership = Membership::read(&mut reader)?;
        reader.finish()?;
        Ok(membership)
    }

    /// Whether a change of several voters is under way.
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }
}

impl CopysetStatus {
    /// Encodes: role u8, leader, term, commit, applied as u64, then the [`Membership`].
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(33);
        out.put_u8(self.role);
        out.put_u64_le(self.leader);
        out.put_u64_le(self.term);
        out.put_u64_le(self.commit);
        out.put_u64_le(self.applied);
        self.membership.put(&mut out);
        out.freeze()
    }

    /// Decodes.
    pub fn decode(bytes: &[u8]) -> Result<CopysetStatus, WireError> {
        let mut reader = Reader::new(bytes, "copyset status");
        let status = CopysetStatus {
            role: reader.u8()?,
            leader: reader.u64()?,
            term: reader.u64()?,
            commit: reader.u64()?,
            applied: reader.u64()?,
            membership: Membership::read(&mut reader)?,
        };
        reader.finish()?;
        Ok(status)
    }
}

/// Reads a list of node ids: count u16 (at most [`MAX_PEERS`]), then each id u64.
fn read_ids(reader: &mut Reader<'_>) -> Result<Vec<u64>, WireError> {
    let count = reader.u16()? as usize;
    if count > MAX_PEERS {
        return Err(WireError {
            what: reader.what,
            why: "too many node ids",
        });
    }
    (0..count).map(|_| reader.u64()).collect()
}
