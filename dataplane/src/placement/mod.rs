//! Placement, the control plane's pure core (issue 18, first slice): where copysets go. Like
//! `raftcore`, it does no I/O and reads no clock; the placement service around it feeds it a
//! topology and carries out what it decides.
//!
//! A copyset's replicas go to distinct failure domains: distinct zones when the cluster has
//! as many zones as replicas, else distinct hosts (never two replicas on one host), else the
//! plan is refused. Copysets are spread so that every chunkserver carries a share in
//! proportion to its free space, and so that each chunkserver's *scatter width* — how many
//! other chunkservers share a copyset with it, i.e. how many peers help when it is rebuilt —
//! reaches the target `S` where the topology allows it. The number of copysets is at least
//! Curve's lower bound `S·N / (R·(R−1))` for `N` chunkservers and `R` replicas.
//!
//! Volumes are laid out as segments ([`segments`]): a segment's chunks get copysets round
//! robin over a pool when it is first written, and a chunk's id is its volume and index.
//!
//! The generator is greedy and seeded: each new copyset takes the least-loaded chunkserver
//! (load weighed by free space), then, from domains not used yet, the least-loaded candidates
//! that are not yet its peers, ties broken by the seed. The same topology and seed give the
//! same plan.

mod copysets;
pub mod meta;
pub mod schedule;
pub mod segments;
pub mod snapshots;
pub mod tables;
#[cfg(test)]
mod tests;

pub use copysets::{plan_copysets, scatter_widths};
pub use segments::{chunk_id, chunk_place, SegmentAllocator, SegmentError, SegmentLayout};

/// A chunkserver as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its node id.
    pub node: u64,
    /// Its zone: the failure-isolation unit (a rack, a power or switch domain).
    pub zone: String,
    /// Its host: the machine it runs on.
    pub host: String,
    /// Chunks it can still allocate.
    pub free_chunks: u64,
    /// What the placement service knows of it.
    pub state: MemberState,
}

/// A chunkserver's state in the placement service's eyes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Heartbeats arrive.
    Up,
    /// Heartbeats were missed lately.
    Unstable,
    /// Gone for longer than the offline bound: its replicas are to be replaced.
    Offline,
    /// Taken out of service by an operator.
    Retired,
}

/// The cluster's chunkservers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Every chunkserver known.
    pub members: Vec<Member>,
}

/// The failure domain a plan spreads each copyset's replicas over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// No two replicas in one zone.
    Zone,
    /// No two replicas on one host (the cluster has fewer zones than replicas).
    Host,
}

/// What to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopysetRequest {
    /// Replicas per copyset.
    pub replicas: usize,
    /// The scatter width to reach on every chunkserver (where the topology allows it).
    pub scatter_width: usize,
    /// At least this many copysets (0: as many as the scatter width needs).
    pub min_copysets: usize,
    /// Chunkservers with fewer free chunks take no new copyset.
    pub min_free_chunks: u64,
}

/// A plan: each copyset's voters, and the domain they were spread over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The failure domain used.
    pub domain: Domain,
    /// Each copyset's voters (node ids, distinct, in distinct domains).
    pub copysets: Vec<Vec<u64>>,
}

/// Why no plan can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Fewer failure domains than replicas among the chunkservers that can take copysets.
    #[error(
        "{replicas} replicas need {replicas} zones or hosts, but the chunkservers that can take \
         copysets ({eligible}, up and with at least the free chunks asked) are in {zones} zones \
         on {hosts} hosts"
    )]
    NotEnoughDomains {
        /// Replicas per copyset.
        replicas: usize,
        /// Chunkservers that can take copysets.
        eligible: usize,
        /// Their zones.
        zones: usize,
        /// Their hosts.
        hosts: usize,
    },
    /// A copyset needs at least one replica.
    #[error("a copyset needs at least one replica")]
    NoReplicas,
}
