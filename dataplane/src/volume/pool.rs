//! The pool of copysets striped volumes spread over, seen from a client: reading it, creating
//! it (planned by the metadata copyset, then created on its nodes and marked ready), creating
//! striped volumes, and reading or allocating a segment's copysets.
//!
//! Every step is idempotent, so whoever runs it next finishes what an interrupted run left:
//! the plan is a raft entry that does nothing when a pool exists, creating a copyset on a node
//! that has it is a no-op, and marking a ready copyset ready changes nothing.

use std::collections::BTreeMap;

use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::copyset::ChunkOp;
use crate::ids::CopysetId;
use crate::placement::meta::MetaOp;
use crate::placement::tables::{
    self, PoolCopyset, PoolMember, PoolRequest, PoolState, SegmentRecord, POOL_CHUNK,
    POOL_RECORD_LEN, SEGMENT_RECORD_LEN,
};
use crate::protocol::Status;
use crate::volume_table::{TableError, VolumeRecord, METADATA_COPYSET};

use super::{find_volume, VolumeError};

/// Bytes of the pool table read per request.
const POOL_PIECE: u64 = 64 << 10;

/// How the pool is planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// Replicas per copyset.
    pub replicas: u8,
    /// Copysets per node aimed at.
    pub copysets_per_node: u32,
    /// The chunkservers and their labels.
    pub members: Vec<PoolMember>,
}

impl PoolSettings {
    /// The settings a configuration file gives: its `[placement]` section over its
    /// `[cluster]` nodes.
    pub fn from_config(config: &Config) -> PoolSettings {
        PoolSettings {
            replicas: config.placement.replicas,
            copysets_per_node: config.placement.copysets_per_node,
            members: config
                .cluster
                .nodes
                .iter()
                .map(|node| PoolMember {
                    node: u64::from(node.id),
                    zone: node.zone_label(),
                    host: node.host_label(),
                })
                .collect(),
        }
    }
}

impl PoolSettings {
    /// The settings for this cluster: the `[placement]` section, over the chunkservers the
    /// placement service reports up (registered by their heartbeats, with the labels they
    /// sent), or — before any heartbeat reached it — over the `[cluster]` nodes.
    pub async fn for_cluster(client: &Client, config: &Config) -> PoolSettings {
        let mut settings = PoolSettings::from_config(config);
        if let Ok(topology) = client.topology().await {
            let up: Vec<PoolMember> = topology
                .nodes
                .into_iter()
                .filter(|n| n.state == "up")
                .map(|n| PoolMember {
                    node: n.node,
                    zone: n.zone,
                    host: n.host,
                })
                .collect();
            if !up.is_empty() {
                settings.members = up;
            }
        }
        settings
    }
}

/// The pool's copysets (empty before the first striped volume), read linearizably.
pub async fn read_pool(client: &Client) -> Result<Vec<PoolCopyset>, VolumeError> {
    let mut bytes = Vec::new();
    let mut offset = 0u64;
    loop {
        let piece = match client
            .read(METADATA_COPYSET, POOL_CHUNK, offset, POOL_PIECE as u32)
            .await
        {
            Ok(piece) => piece,
            Err(ClientError::Refused {
                status: Status::CopysetNotFound,
                ..
            }) => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        };
        let ended = piece.len() < POOL_PIECE as usize
            || piece
                .chunks_exact(POOL_RECORD_LEN)
                .any(|r| r.iter().all(|b| *b == 0));
        bytes.extend_from_slice(&piece);
        if ended {
            break;
        }
        offset += POOL_PIECE;
    }
    tables::pool(&bytes).map_err(|e| VolumeError::Table(TableError::Corrupt(e.to_string())))
}

/// Makes sure the pool exists and every copyset of it is created and ready: plans it if
/// empty, creates planned copysets on their nodes, marks them ready, and spreads the leaders
/// of the copysets it created over their nodes. Returns the pool.
pub async fn ensure_pool(
    client: &Client,
    settings: &PoolSettings,
) -> Result<Vec<PoolCopyset>, VolumeError> {
    let mut pool = read_pool(client).await?;
    if pool.is_empty() {
        let request = PoolRequest {
            replicas: settings.replicas,
            copysets_per_node: settings.copysets_per_node,
            members: settings.members.clone(),
            seed: 0x5eed_0001,
        };
        apply_meta(client, MetaOp::PoolCreate(request)).await?;
        pool = read_pool(client).await?;
    }
    let mut created = Vec::new();
    for copyset in &pool {
        client.set_peers(copyset.copyset, &copyset.peers);
        if copyset.state == PoolState::Ready {
            continue;
        }
        client
            .create_copyset(copyset.copyset, &copyset.peers)
            .await?;
        apply_meta(
            client,
            MetaOp::CopysetReady {
                copyset: copyset.copyset,
            },
        )
        .await?;
        created.push(copyset.clone());
    }
    spread_leaders(client, &created).await;
    if !created.is_empty() {
        pool = read_pool(client).await?;
    }
    Ok(pool)
}

/// Hands each new copyset's leadership to the peer leading the fewest of them so far, so a
/// fresh pool's leaders are spread over its nodes instead of wherever elections fell. Best
/// effort: a transfer that fails leaves the elected leader (logged).
async fn spread_leaders(client: &Client, created: &[PoolCopyset]) {
    let mut led: BTreeMap<u64, usize> = BTreeMap::new();
    for copyset in created {
        let Some(&to) = copyset
            .peers
            .iter()
            .min_by_key(|peer| (led.get(peer).copied().unwrap_or(0), **peer))
        else {
            continue;
        };
        *led.entry(to).or_default() += 1;
        if let Err(error) = client.transfer_leader(copyset.copyset, to).await {
            tracing::info!(
                copyset = %copyset.copyset,
                to,
                %error,
                "pool: leadership not moved; the elected leader stays"
            );
        }
    }
}

/// Creates a volume of `size` bytes striped over the pool in segments of `segment_size`
/// bytes (the pool must exist: [`ensure_pool`]). Nothing is allocated until a segment is
/// written. Refused when the name exists or the size or geometry is bad.
pub async fn create_striped_volume(
    client: &Client,
    name: &str,
    size: u64,
    segment_size: u64,
) -> Result<VolumeRecord, VolumeError> {
    super::check_new_name(name)?;
    let op = MetaOp::VolumeCreate {
        name: name.to_string(),
        size,
        segment_size,
    };
    match apply_meta(client, op).await {
        Ok(()) => {}
        Err(VolumeError::Table(TableError::Invalid(reason)))
            if reason.contains("exists already") =>
        {
            return Err(TableError::Exists(name.to_string()).into())
        }
        Err(error) => return Err(error),
    }
    find_volume(client, name).await
}

/// The copysets of segment `segment` of striped volume `volume`: `None` when it was never
/// written (it reads as zeros).
pub async fn read_segment(
    client: &Client,
    volume: u64,
    segment: u64,
) -> Result<Option<SegmentRecord>, VolumeError> {
    let offset = segment
        .checked_mul(SEGMENT_RECORD_LEN as u64)
        .ok_or_else(|| TableError::Invalid(format!("segment {segment} is out of range")))?;
    let bytes = client
        .read(
            METADATA_COPYSET,
            tables::segment_table_chunk(volume),
            offset,
            SEGMENT_RECORD_LEN as u32,
        )
        .await?;
    let record = SegmentRecord::decode(&bytes)
        .map_err(|e| TableError::Corrupt(format!("segment {segment} of volume {volume}: {e}")))?;
    match record {
        Some(r) if r.volume != volume || r.segment != segment => Err(TableError::Corrupt(format!(
            "segment {segment} of volume {volume} holds another segment's record"
        ))
        .into()),
        other => Ok(other),
    }
}

/// The copysets of segment `segment` of striped volume `volume`, allocating them if it has
/// none (a raft entry of the metadata copyset; racing allocations agree on the first).
pub async fn allocate_segment(
    client: &Client,
    volume: u64,
    segment: u64,
) -> Result<SegmentRecord, VolumeError> {
    if let Some(record) = read_segment(client, volume, segment).await? {
        return Ok(record);
    }
    apply_meta(client, MetaOp::SegmentAllocate { volume, segment }).await?;
    read_segment(client, volume, segment).await?.ok_or_else(|| {
        TableError::Corrupt(format!(
            "segment {segment} of volume {volume} was allocated but reads as free"
        ))
        .into()
    })
}

/// Pauses (`true`) or resumes the placement service's scheduler: while paused it starts no
/// recovery and moves no leadership. Persisted in the metadata copyset.
pub async fn set_scheduler_paused(client: &Client, paused: bool) -> Result<(), VolumeError> {
    apply_meta(client, MetaOp::SchedulerPaused(paused)).await
}

/// The placement service's settings (defaults before any was set).
pub async fn read_settings(client: &Client) -> Result<tables::Settings, VolumeError> {
    let page = match client
        .read(METADATA_COPYSET, tables::SETTINGS_CHUNK, 0, 4096)
        .await
    {
        Ok(page) => page,
        Err(ClientError::Refused {
            status: Status::CopysetNotFound,
            ..
        }) => return Ok(tables::Settings::default()),
        Err(error) => return Err(error.into()),
    };
    tables::Settings::decode(&page).map_err(|e| TableError::Corrupt(e.to_string()).into())
}

/// Every copyset id a segment table names for a volume, with the count of chunks on each.
pub fn chunks_per_copyset(segments: &[SegmentRecord]) -> BTreeMap<CopysetId, usize> {
    let mut load = BTreeMap::new();
    for segment in segments {
        for copyset in &segment.copysets {
            *load.entry(*copyset).or_default() += 1;
        }
    }
    load
}

/// Applies a placement entry; a refusal comes back as `TableError::Invalid` with the table's
/// reason.
/// Proposes a placement entry to the metadata copyset; a refusal by the tables is a
/// `TableError::Invalid` with the tables' reason.
pub(crate) async fn apply_meta(client: &Client, op: MetaOp) -> Result<(), VolumeError> {
    match client.apply(METADATA_COPYSET, &ChunkOp::Meta(op)).await {
        Ok(()) => Ok(()),
        Err(ClientError::Refused {
            status: Status::Invalid(reason),
            ..
        }) => Err(TableError::Invalid(without_chunk(&reason).to_string()).into()),
        Err(error) => Err(error.into()),
    }
}

/// A refusal's reason without the `chunk N: ` the engine puts before it (the chunk is a
/// metadata table, which means nothing to the person who asked).
fn without_chunk(reason: &str) -> &str {
    match reason.split_once(": ") {
        Some((chunk, rest)) if chunk.starts_with("chunk ") => rest,
        _ => reason,
    }
}
