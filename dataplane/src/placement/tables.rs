//! The placement tables kept in the metadata copyset, next to the volume table: the pool
//! (which copysets exist for volumes, on which nodes, and whether they were created on them)
//! and each striped volume's segment table (which copyset holds each chunk of an allocated
//! segment). Fixed-size CRC'd records in chunks of the metadata copyset, changed only by raft
//! entries ([`super::meta::MetaOp`]) whose outcome these pure functions decide, so every
//! replica applies the same log to the same bytes and gets the same tables.
//!
//! Layout:
//! - the pool chunk ([`POOL_CHUNK`]) is an array of [`POOL_RECORD_LEN`]-byte records, dense
//!   from the start (the pool only grows; the first all-zero record ends it);
//! - volume `v`'s segment table is chunk [`segment_table_chunk`]`(v)`, one
//!   [`SEGMENT_RECORD_LEN`]-byte record per segment at `segment * SEGMENT_RECORD_LEN`; an
//!   all-zero record is a segment not allocated yet (it reads as zeros).

use std::collections::BTreeSet;

use crate::ids::{ChunkId, CopysetId};

use super::segments::SegmentAllocator;
use super::{plan_copysets, CopysetRequest, Member, MemberState, PlacementError, Topology};

/// The metadata-copyset chunk holding the pool table.
pub const POOL_CHUNK: ChunkId = ChunkId(u64::MAX - 2);
/// Bytes per pool record.
pub const POOL_RECORD_LEN: usize = 256;
/// The most replicas a pool copyset records.
pub const MAX_REPLICAS: usize = 7;
/// Copysets the pool creates get ids from here up, far from ids made by hand.
pub const FIRST_POOL_COPYSET: u64 = 1 << 32;
/// Bytes per segment record.
pub const SEGMENT_RECORD_LEN: usize = 4096;
/// The most chunks a segment record can place.
pub const MAX_CHUNKS_PER_SEGMENT: u64 = ((SEGMENT_RECORD_LEN - SEGMENT_FIXED - 4) / 8) as u64;

const POOL_MAGIC: u32 = 0x504f_4c31; // "POL1"
const SEGMENT_MAGIC: u32 = 0x5345_4731; // "SEG1"
const SEGMENT_FIXED: usize = 4 + 1 + 1 + 2 + 8 + 8;
const SEGMENT_TABLE_BIT: u64 = 1 << 63;

/// The metadata-copyset chunk holding the node table: the chunkservers that registered with
/// the placement service, with their labels.
pub const NODE_CHUNK: ChunkId = ChunkId(u64::MAX - 3);
/// Bytes per node record.
pub const NODE_RECORD_LEN: usize = 256;
/// The longest zone or host label, in bytes.
pub const MAX_LABEL: usize = 100;
const NODE_MAGIC: u32 = 0x4e4f_4431; // "NOD1"

/// The metadata-copyset chunk holding the placement service's settings (one page).
pub const SETTINGS_CHUNK: ChunkId = ChunkId(u64::MAX - 4);
const SETTINGS_MAGIC: u32 = 0x5345_5431; // "SET1"

/// The placement service's settings, changed by an admin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    /// The scheduler starts no operator (recoveries, leader moves) while paused.
    pub paused: bool,
}

impl Settings {
    /// Encodes into one page: magic u32, version u8 (1), paused u8, zeroes, CRC32C in the
    /// last 4 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; 4096];
        out[..4].copy_from_slice(&SETTINGS_MAGIC.to_le_bytes());
        out[4] = 1;
        out[5] = u8::from(self.paused);
        seal(&mut out);
        out
    }

    /// Decodes the page; all zeros are the defaults.
    pub fn decode(page: &[u8]) -> Result<Settings, TablesError> {
        if !check_record(page, 4096, SETTINGS_MAGIC, "settings")? {
            return Ok(Settings::default());
        }
        Ok(Settings {
            paused: page[5] != 0,
        })
    }
}

/// The metadata-copyset chunk holding volume `volume`'s segment table.
pub fn segment_table_chunk(volume: u64) -> ChunkId {
    ChunkId(SEGMENT_TABLE_BIT | volume)
}

/// Why a placement-table change was refused, or a table cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TablesError {
    /// The topology cannot hold the copysets asked for.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// No pool copyset was created on its nodes yet.
    #[error("no copyset of the pool is ready (created on its nodes) to place chunks on")]
    NoReadyCopyset,
    /// A copyset the pool does not hold.
    #[error("copyset {0} is not in the pool")]
    UnknownCopyset(CopysetId),
    /// A request the tables cannot take.
    #[error("{0}")]
    Invalid(String),
    /// A table holds bytes that are not records.
    #[error("a placement table is corrupt: {0}")]
    Corrupt(String),
}

/// Whether a pool copyset exists on its nodes yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolState {
    /// Placed in the table; its replicas may not exist yet.
    Planned,
    /// Created on every one of its nodes: chunks may be placed on it.
    Ready,
}

/// One copyset of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCopyset {
    /// Its id.
    pub copyset: CopysetId,
    /// Its initial voters (node ids).
    pub peers: Vec<u64>,
    /// Whether it was created on them.
    pub state: PoolState,
}

impl PoolCopyset {
    /// Encodes into one record: magic u32, version u8 (1), state u8 (1 planned, 2 ready),
    /// peer count u8, a zero byte, copyset u64, the peers u64 each, zeroes, CRC32C of the
    /// record's other bytes in its last 4.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; POOL_RECORD_LEN];
        out[..4].copy_from_slice(&POOL_MAGIC.to_le_bytes());
        out[4] = 1;
        out[5] = match self.state {
            PoolState::Planned => 1,
            PoolState::Ready => 2,
        };
        let peers = &self.peers[..self.peers.len().min(MAX_REPLICAS)];
        out[6] = peers.len() as u8;
        out[8..16].copy_from_slice(&self.copyset.0.to_le_bytes());
        for (i, peer) in peers.iter().enumerate() {
            out[16 + 8 * i..24 + 8 * i].copy_from_slice(&peer.to_le_bytes());
        }
        seal(&mut out);
        out
    }

    /// Decodes a record: `Ok(None)` for a free (all-zero) one.
    pub fn decode(record: &[u8]) -> Result<Option<PoolCopyset>, TablesError> {
        if !check_record(record, POOL_RECORD_LEN, POOL_MAGIC, "pool")? {
            return Ok(None);
        }
        let state = match record[5] {
            1 => PoolState::Planned,
            2 => PoolState::Ready,
            other => {
                return Err(TablesError::Corrupt(format!(
                    "a pool record in state {other}"
                )))
            }
        };
        let count = usize::from(record[6]);
        if count == 0 || count > MAX_REPLICAS {
            return Err(TablesError::Corrupt(format!(
                "a pool record with {count} peers"
            )));
        }
        Ok(Some(PoolCopyset {
            copyset: CopysetId(u64_at(record, 8)),
            peers: (0..count).map(|i| u64_at(record, 16 + 8 * i)).collect(),
            state,
        }))
    }
}

/// The pool's copysets, in record order (the dense prefix of `table` up to its first free
/// record).
pub fn pool(table: &[u8]) -> Result<Vec<PoolCopyset>, TablesError> {
    let mut copysets = Vec::new();
    for record in table.chunks_exact(POOL_RECORD_LEN) {
        match PoolCopyset::decode(record)? {
            Some(copyset) => copysets.push(copyset),
            None => break,
        }
    }
    Ok(copysets)
}

/// The pool's ready copysets, by id: where chunks may be placed.
pub fn ready(pool: &[PoolCopyset]) -> Vec<CopysetId> {
    let ids: BTreeSet<CopysetId> = pool
        .iter()
        .filter(|c| c.state == PoolState::Ready)
        .map(|c| c.copyset)
        .collect();
    ids.into_iter().collect()
}

/// A chunkserver offered to pool creation: its node id and failure-domain labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMember {
    /// Its node id.
    pub node: u64,
    /// Its zone.
    pub zone: String,
    /// Its host.
    pub host: String,
}

/// What pool creation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRequest {
    /// Replicas per copyset.
    pub replicas: u8,
    /// Copysets per chunkserver the pool aims at: the pool gets at least
    /// `copysets_per_node × members / replicas` copysets.
    pub copysets_per_node: u32,
    /// The chunkservers.
    pub members: Vec<PoolMember>,
    /// The plan's seed.
    pub seed: u64,
}

/// The records pool creation writes at the start of an empty pool table: `None` when the
/// pool exists already (creation is idempotent: the first of two racing creations wins and
/// the second changes nothing).
pub fn plan_pool(table: &[u8], request: &PoolRequest) -> Result<Option<Vec<u8>>, TablesError> {
    if !pool(table)?.is_empty() {
        return Ok(None);
    }
    let replicas = usize::from(request.replicas);
    if replicas == 0 || replicas > MAX_REPLICAS {
        return Err(TablesError::Invalid(format!(
            "a pool copyset has 1 to {MAX_REPLICAS} replicas, not {replicas}"
        )));
    }
    let nodes: BTreeSet<u64> = request.members.iter().map(|m| m.node).collect();
    if nodes.len() != request.members.len() {
        return Err(TablesError::Invalid(
            "a node is offered to the pool twice".into(),
        ));
    }
    let topology = Topology {
        members: request
            .members
            .iter()
            .map(|m| Member {
                node: m.node,
                zone: m.zone.clone(),
                host: m.host.clone(),
                free_chunks: 1,
                state: MemberState::Up,
            })
            .collect(),
    };
    let wanted = (request.copysets_per_node as usize * request.members.len()).div_ceil(replicas);
    let copyset_request = CopysetRequest {
        replicas,
        scatter_width: (request.members.len().saturating_sub(1)).min(2 * (replicas - 1)),
        min_copysets: wanted.max(1),
        min_free_chunks: 0,
    };
    let plan = plan_copysets(&topology, &copyset_request, request.seed)?;
    let capacity = table.len() / POOL_RECORD_LEN;
    if plan.copysets.len() > capacity {
        return Err(TablesError::Invalid(format!(
            "{} copysets do not fit the pool table's {capacity} records",
            plan.copysets.len()
        )));
    }
    let mut records = Vec::with_capacity(plan.copysets.len() * POOL_RECORD_LEN);
    for (i, peers) in plan.copysets.into_iter().enumerate() {
        let record = PoolCopyset {
            copyset: CopysetId(FIRST_POOL_COPYSET + i as u64),
            peers,
            state: PoolState::Planned,
        };
        records.extend_from_slice(&record.encode());
    }
    Ok(Some(records))
}

/// `copyset`'s record in the pool table, with its index.
fn pool_record(table: &[u8], copyset: CopysetId) -> Result<(usize, PoolCopyset), TablesError> {
    pool(table)?
        .into_iter()
        .enumerate()
        .find(|(_, c)| c.copyset == copyset)
        .ok_or(TablesError::UnknownCopyset(copyset))
}

/// Marking `copyset` ready: its record's index and new bytes; `None` when it is ready already.
pub fn plan_ready(
    table: &[u8],
    copyset: CopysetId,
) -> Result<Option<(usize, Vec<u8>)>, TablesError> {
    let (index, found) = pool_record(table, copyset)?;
    if found.state == PoolState::Ready {
        return Ok(None);
    }
    let record = PoolCopyset {
        state: PoolState::Ready,
        ..found.clone()
    };
    Ok(Some((index, record.encode())))
}

/// Encodes a node record: magic u32, version u8 (1), three zero bytes, node u64, zone length
/// u8 and zone, host length u8 (at byte 117) and host, zeroes, CRC32C in the last 4 bytes.
pub fn encode_node(member: &PoolMember) -> Vec<u8> {
    let mut out = vec![0u8; NODE_RECORD_LEN];
    out[..4].copy_from_slice(&NODE_MAGIC.to_le_bytes());
    out[4] = 1;
    out[8..16].copy_from_slice(&member.node.to_le_bytes());
    for (at, label) in [(16, &member.zone), (117, &member.host)] {
        let bytes = &label.as_bytes()[..label.len().min(MAX_LABEL)];
        out[at] = bytes.len() as u8;
        out[at + 1..at + 1 + bytes.len()].copy_from_slice(bytes);
    }
    seal(&mut out);
    out
}

/// Decodes a node record: `Ok(None)` for a free one.
pub fn decode_node(record: &[u8]) -> Result<Option<PoolMember>, TablesError> {
    if !check_record(record, NODE_RECORD_LEN, NODE_MAGIC, "node")? {
        return Ok(None);
    }
    let label = |at: usize| {
        let len = usize::from(record[at]).min(MAX_LABEL);
        std::str::from_utf8(&record[at + 1..at + 1 + len])
            .map(str::to_string)
            .map_err(|_| TablesError::Corrupt("a node label that is not UTF-8".into()))
    };
    Ok(Some(PoolMember {
        node: u64_at(record, 8),
        zone: label(16)?,
        host: label(117)?,
    }))
}

/// The registered nodes, in record order (the dense prefix of `table`).
pub fn nodes(table: &[u8]) -> Result<Vec<PoolMember>, TablesError> {
    let mut nodes = Vec::new();
    for record in table.chunks_exact(NODE_RECORD_LEN) {
        match decode_node(record)? {
            Some(node) => nodes.push(node),
            None => break,
        }
    }
    Ok(nodes)
}

/// Registering `member`: the record index and bytes to write (a new node after the last, a
/// known one in place when its labels changed), or `None` when it is registered as it is.
pub fn plan_register(
    table: &[u8],
    member: &PoolMember,
) -> Result<Option<(usize, Vec<u8>)>, TablesError> {
    if member.node == 0 {
        return Err(TablesError::Invalid("node 0 cannot register".into()));
    }
    for (what, label) in [("zone", &member.zone), ("host", &member.host)] {
        if label.is_empty() || label.len() > MAX_LABEL {
            return Err(TablesError::Invalid(format!(
                "a {what} label has 1 to {MAX_LABEL} bytes, not {}",
                label.len()
            )));
        }
    }
    let known = nodes(table)?;
    let index = match known.iter().position(|n| n.node == member.node) {
        Some(index) if known[index] == *member => return Ok(None),
        Some(index) => index,
        None => known.len(),
    };
    if (index + 1) * NODE_RECORD_LEN > table.len() {
        return Err(TablesError::Invalid(format!(
            "the node table is full ({} nodes)",
            known.len()
        )));
    }
    Ok(Some((index, encode_node(member))))
}

/// Recording `copyset`'s voters as `peers` (its membership changed): the record's index and
/// new bytes, or `None` when it holds them already. The state stays.
pub fn plan_peers(
    table: &[u8],
    copyset: CopysetId,
    peers: &[u64],
) -> Result<Option<(usize, Vec<u8>)>, TablesError> {
    let distinct: BTreeSet<u64> = peers.iter().copied().collect();
    if peers.is_empty() || peers.len() > MAX_REPLICAS || distinct.len() != peers.len() {
        return Err(TablesError::Invalid(format!(
            "a pool copyset has 1 to {MAX_REPLICAS} distinct voters, not {peers:?}"
        )));
    }
    let (index, found) = pool_record(table, copyset)?;
    let known: BTreeSet<u64> = found.peers.iter().copied().collect();
    if known == distinct {
        return Ok(None);
    }
    let record = PoolCopyset {
        peers: peers.to_vec(),
        ..found.clone()
    };
    Ok(Some((index, record.encode())))
}

/// One allocated segment: the copyset of each of its chunks, in chunk order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRecord {
    /// The volume's id.
    pub volume: u64,
    /// The segment's index in the volume.
    pub segment: u64,
    /// The copyset of each chunk.
    pub copysets: Vec<CopysetId>,
}

impl SegmentRecord {
    /// Encodes into one record: magic u32, version u8 (1), a zero byte, chunk count u16,
    /// volume u64, segment u64, the copysets u64 each, zeroes, CRC32C in the last 4 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; SEGMENT_RECORD_LEN];
        out[..4].copy_from_slice(&SEGMENT_MAGIC.to_le_bytes());
        out[4] = 1;
        let copysets = &self.copysets[..self.copysets.len().min(MAX_CHUNKS_PER_SEGMENT as usize)];
        out[6..8].copy_from_slice(&(copysets.len() as u16).to_le_bytes());
        out[8..16].copy_from_slice(&self.volume.to_le_bytes());
        out[16..24].copy_from_slice(&self.segment.to_le_bytes());
        for (i, copyset) in copysets.iter().enumerate() {
            let at = SEGMENT_FIXED + 8 * i;
            out[at..at + 8].copy_from_slice(&copyset.0.to_le_bytes());
        }
        seal(&mut out);
        out
    }

    /// Decodes a record: `Ok(None)` for a segment not allocated yet (all zeroes).
    pub fn decode(record: &[u8]) -> Result<Option<SegmentRecord>, TablesError> {
        if !check_record(record, SEGMENT_RECORD_LEN, SEGMENT_MAGIC, "segment")? {
            return Ok(None);
        }
        let count = u64::from(u16::from_le_bytes([record[6], record[7]]));
        if count == 0 || count > MAX_CHUNKS_PER_SEGMENT {
            return Err(TablesError::Corrupt(format!(
                "a segment record of {count} chunks"
            )));
        }
        Ok(Some(SegmentRecord {
            volume: u64_at(record, 8),
            segment: u64_at(record, 16),
            copysets: (0..count as usize)
                .map(|i| CopysetId(u64_at(record, SEGMENT_FIXED + 8 * i)))
                .collect(),
        }))
    }
}

/// Allocating segment `segment` of volume `volume` (`chunks` chunks, of `segments` in the
/// volume): the record to write at `segment * SEGMENT_RECORD_LEN` of the volume's segment
/// table, or `None` when `existing` (the record there now) holds an allocation already —
/// allocate-if-empty, so two first writes racing to one segment agree on its copysets.
///
/// Chunks go round robin over the pool's ready copysets by id, starting where the segment
/// before would have stopped (offset by the volume id, so volumes do not all start on the
/// same copyset).
pub fn plan_segment(
    existing: &[u8],
    pool_table: &[u8],
    volume: u64,
    segment: u64,
    segments: u64,
    chunks: u64,
) -> Result<Option<SegmentRecord>, TablesError> {
    if segment >= segments {
        return Err(TablesError::Invalid(format!(
            "segment {segment} is past the volume's {segments} segments"
        )));
    }
    if chunks == 0 || chunks > MAX_CHUNKS_PER_SEGMENT {
        return Err(TablesError::Invalid(format!(
            "a segment has 1 to {MAX_CHUNKS_PER_SEGMENT} chunks, not {chunks}"
        )));
    }
    if let Some(record) = SegmentRecord::decode(existing)? {
        if record.volume != volume || record.segment != segment {
            return Err(TablesError::Corrupt(format!(
                "segment {segment} of volume {volume} holds the record of segment {} of \
                 volume {}",
                record.segment, record.volume
            )));
        }
        return Ok(None);
    }
    let ready = ready(&pool(pool_table)?);
    if ready.is_empty() {
        return Err(TablesError::NoReadyCopyset);
    }
    let start = volume
        .wrapping_mul(7)
        .wrapping_add(segment.wrapping_mul(chunks));
    let mut allocator = SegmentAllocator {
        cursor: start % ready.len() as u64,
    };
    let copysets = allocator
        .allocate(&ready, chunks)
        .map_err(|e| TablesError::Invalid(e.to_string()))?;
    Ok(Some(SegmentRecord {
        volume,
        segment,
        copysets,
    }))
}

/// Writes the CRC32C of a record's other bytes into its last 4.
fn seal(record: &mut [u8]) {
    let end = record.len() - 4;
    let crc = crc32c::crc32c(&record[..end]);
    record[end..].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a record's length, checksum, magic and version: `Ok(false)` for a free one.
fn check_record(record: &[u8], len: usize, magic: u32, what: &str) -> Result<bool, TablesError> {
    if record.len() != len {
        return Err(TablesError::Corrupt(format!(
            "a {what} record of {} bytes, not {len}",
            record.len()
        )));
    }
    if record.iter().all(|b| *b == 0) {
        return Ok(false);
    }
    let end = len - 4;
    let stored = u32::from_le_bytes([
        record[end],
        record[end + 1],
        record[end + 2],
        record[end + 3],
    ]);
    if stored != crc32c::crc32c(&record[..end]) {
        return Err(TablesError::Corrupt(format!(
            "a {what} record's checksum does not match"
        )));
    }
    if u32::from_le_bytes([record[0], record[1], record[2], record[3]]) != magic || record[4] != 1 {
        return Err(TablesError::Corrupt(format!(
            "a {what} record of another format"
        )));
    }
    Ok(true)
}

fn u64_at(record: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&record[at..at + 8]);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn members(n: u64) -> Vec<PoolMember> {
        (1..=n)
            .map(|node| PoolMember {
                node,
                zone: format!("z{node}"),
                host: format!("h{node}"),
            })
            .collect()
    }

    fn request(n: u64) -> PoolRequest {
        PoolRequest {
            replicas: 3,
            copysets_per_node: 8,
            members: members(n),
            seed: 11,
        }
    }

    /// A pool table of `records` records with the plan written at its start.
    fn planned(records: usize, request: &PoolRequest) -> Vec<u8> {
        let mut table = vec![0u8; records * POOL_RECORD_LEN];
        let bytes = plan_pool(&table, request).unwrap().expect("a new pool");
        table[..bytes.len()].copy_from_slice(&bytes);
        table
    }

    fn mark_all_ready(table: &mut [u8]) {
        for copyset in pool(table).unwrap() {
            if let Some((index, bytes)) = plan_ready(table, copyset.copyset).unwrap() {
                table[index * POOL_RECORD_LEN..(index + 1) * POOL_RECORD_LEN]
                    .copy_from_slice(&bytes);
            }
        }
    }

    #[test]
    fn a_pool_is_planned_once_with_distinct_nodes_per_copyset() {
        let mut table = planned(64, &request(3));
        let copysets = pool(&table).unwrap();
        assert_eq!(copysets.len(), 8, "8 per node × 3 nodes / 3 replicas");
        for c in &copysets {
            let distinct: BTreeSet<u64> = c.peers.iter().copied().collect();
            assert_eq!(distinct.len(), 3, "{c:?}");
            assert_eq!(c.state, PoolState::Planned);
            assert!(c.copyset.0 >= FIRST_POOL_COPYSET);
        }
        assert_eq!(plan_pool(&table, &request(5)).unwrap(), None, "idempotent");
        assert!(ready(&copysets).is_empty());
        let (index, bytes) = plan_ready(&table, copysets[2].copyset).unwrap().unwrap();
        table[index * POOL_RECORD_LEN..(index + 1) * POOL_RECORD_LEN].copy_from_slice(&bytes);
        assert_eq!(ready(&pool(&table).unwrap()), vec![copysets[2].copyset]);
        assert_eq!(plan_ready(&table, copysets[2].copyset).unwrap(), None);
        assert_eq!(
            plan_ready(&table, CopysetId(5)),
            Err(TablesError::UnknownCopyset(CopysetId(5)))
        );
    }

    #[test]
    fn a_pool_that_cannot_keep_failure_domains_is_refused_and_writes_nothing() {
        let mut one_host = request(3);
        for m in &mut one_host.members {
            m.host = "same".into();
            m.zone = "same".into();
        }
        let table = vec![0u8; 16 * POOL_RECORD_LEN];
        assert!(matches!(
            plan_pool(&table, &one_host),
            Err(TablesError::Placement(
                PlacementError::NotEnoughDomains { .. }
            ))
        ));
        let mut twice = request(3);
        twice.members[1].node = 1;
        assert!(matches!(
            plan_pool(&table, &twice),
            Err(TablesError::Invalid(_))
        ));
        let small = vec![0u8; 2 * POOL_RECORD_LEN];
        assert!(matches!(
            plan_pool(&small, &request(3)),
            Err(TablesError::Invalid(_))
        ));
    }

    #[test]
    fn segments_are_allocated_once_round_robin_over_ready_copysets() {
        let mut table = planned(64, &request(3));
        let empty = vec![0u8; SEGMENT_RECORD_LEN];
        assert_eq!(
            plan_segment(&empty, &table, 512, 0, 8, 64),
            Err(TablesError::NoReadyCopyset)
        );
        mark_all_ready(&mut table);
        let mut load: BTreeMap<CopysetId, usize> = BTreeMap::new();
        for segment in 0..8 {
            let record = plan_segment(&empty, &table, 512, segment, 8, 64)
                .unwrap()
                .expect("allocated");
            assert_eq!(record.copysets.len(), 64);
            let bytes = record.encode();
            assert_eq!(SegmentRecord::decode(&bytes).unwrap(), Some(record.clone()));
            assert_eq!(
                plan_segment(&bytes, &table, 512, segment, 8, 64).unwrap(),
                None,
                "allocate-if-empty"
            );
            for c in record.copysets {
                *load.entry(c).or_default() += 1;
            }
        }
        assert_eq!(load.len(), 8, "every copyset gets chunks");
        assert!(load.values().all(|&n| n == 64), "{load:?}");
        assert!(
            plan_segment(&empty, &table, 512, 8, 8, 64).is_err(),
            "past the end"
        );
        let other = plan_segment(&empty, &table, 512, 1, 8, 64)
            .unwrap()
            .unwrap();
        assert!(matches!(
            plan_segment(&other.encode(), &table, 512, 2, 8, 64),
            Err(TablesError::Corrupt(_))
        ));
    }

    #[test]
    fn a_moved_copyset_gets_its_new_voters_and_keeps_its_state() {
        let mut table = planned(16, &request(4));
        mark_all_ready(&mut table);
        let copyset = pool(&table).unwrap()[0].clone();
        assert_eq!(
            plan_peers(&table, copyset.copyset, &copyset.peers).unwrap(),
            None
        );
        let mut reversed = copyset.peers.clone();
        reversed.reverse();
        assert_eq!(
            plan_peers(&table, copyset.copyset, &reversed).unwrap(),
            None,
            "a set"
        );
        let (index, bytes) = plan_peers(&table, copyset.copyset, &[7, 8, 9])
            .unwrap()
            .unwrap();
        table[index * POOL_RECORD_LEN..(index + 1) * POOL_RECORD_LEN].copy_from_slice(&bytes);
        let moved = pool(&table).unwrap()[0].clone();
        assert_eq!(
            (moved.peers, moved.state),
            (vec![7, 8, 9], PoolState::Ready)
        );
        for bad in [&[][..], &[1, 1, 2][..], &[1, 2, 3, 4, 5, 6, 7, 8][..]] {
            assert!(plan_peers(&table, copyset.copyset, bad).is_err(), "{bad:?}");
        }
        assert!(plan_peers(&table, CopysetId(3), &[1]).is_err());
    }

    #[test]
    fn nodes_register_once_and_relabel_in_place() {
        let mut table = vec![0u8; 2 * NODE_RECORD_LEN];
        let write = |table: &mut Vec<u8>, planned: Option<(usize, Vec<u8>)>| {
            if let Some((index, bytes)) = planned {
                table[index * NODE_RECORD_LEN..(index + 1) * NODE_RECORD_LEN]
                    .copy_from_slice(&bytes);
            }
        };
        let [a, b, c] = [1, 2, 3].map(|node| PoolMember {
            node,
            zone: "z".into(),
            host: format!("h{node}"),
        });
        let planned = plan_register(&table, &a).unwrap();
        assert_eq!(planned.as_ref().map(|p| p.0), Some(0));
        write(&mut table, planned);
        assert_eq!(
            plan_register(&table, &a).unwrap(),
            None,
            "registered as it is"
        );
        let planned = plan_register(&table, &b).unwrap();
        write(&mut table, planned);
        let moved = PoolMember {
            host: "elsewhere".into(),
            ..a.clone()
        };
        let planned = plan_register(&table, &moved).unwrap();
        assert_eq!(planned.as_ref().map(|p| p.0), Some(0), "in place");
        write(&mut table, planned);
        assert_eq!(nodes(&table).unwrap(), vec![moved, b]);
        assert!(
            matches!(plan_register(&table, &c), Err(TablesError::Invalid(_))),
            "full"
        );
        let unlabelled = PoolMember {
            host: String::new(),
            ..c.clone()
        };
        assert!(plan_register(&table, &unlabelled).is_err());
        assert!(plan_register(&table, &PoolMember { node: 0, ..c }).is_err());
    }

    #[test]
    fn settings_round_trip_and_default_to_running() {
        assert_eq!(Settings::decode(&[0u8; 4096]), Ok(Settings::default()));
        let paused = Settings { paused: true };
        assert_eq!(Settings::decode(&paused.encode()), Ok(paused));
        let mut damaged = paused.encode();
        damaged[5] = 7;
        assert!(Settings::decode(&damaged).is_err());
    }

    #[test]
    fn damaged_records_are_errors_not_garbage() {
        let table = planned(16, &request(3));
        let mut damaged = table.clone();
        damaged[20] ^= 1;
        assert!(matches!(pool(&damaged), Err(TablesError::Corrupt(_))));
        let record = SegmentRecord {
            volume: 9,
            segment: 0,
            copysets: vec![CopysetId(1); 3],
        };
        let mut bytes = record.encode();
        bytes[100] = 1;
        assert!(SegmentRecord::decode(&bytes).is_err());
        assert!(SegmentRecord::decode(&bytes[..100]).is_err());
    }
}
