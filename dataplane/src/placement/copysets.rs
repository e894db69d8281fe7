//! The copyset generator: failure domains, free-space-weighted balance, scatter width.

use std::collections::{BTreeMap, BTreeSet};

use super::{CopysetRequest, Domain, Member, MemberState, PlacementError, Plan, Topology};
use crate::rng::SplitMix64;

/// How far above the lightest candidate's load a candidate may be and still be taken for
/// the new peers it brings.
const LOAD_SLACK: u128 = 1;

/// Plans copysets over `topology` as `request` asks (see the module's documentation).
pub fn plan_copysets(
    topology: &Topology,
    request: &CopysetRequest,
    seed: u64,
) -> Result<Plan, PlacementError> {
    let replicas = request.replicas;
    if replicas == 0 {
        return Err(PlacementError::NoReplicas);
    }
    let eligible: Vec<&Member> = topology
        .members
        .iter()
        .filter(|m| m.state == MemberState::Up && m.free_chunks >= request.min_free_chunks)
        .collect();
    let domain = choose_domain(&eligible, replicas)?;
    let mut generator = Generator::new(
        &eligible,
        domain,
        request.scatter_width,
        SplitMix64::new(seed),
    );
    let n = eligible.len();
    let bound = (request.scatter_width * n).div_ceil(replicas * (replicas - 1).max(1));
    let wanted = bound.max(request.min_copysets);
    while generator.copysets.len() < wanted {
        generator.add_copyset(replicas, false);
    }
    // Past the bound, copysets are added only for members still short of the scatter width:
    // each such copyset gives the shortest one at least one new peer, so this ends.
    let limit = wanted + request.scatter_width.max(1) * n;
    while generator.copysets.len() < limit && !generator.scatter_reached() {
        generator.add_copyset(replicas, true);
    }
    Ok(Plan {
        domain,
        copysets: generator.copysets,
    })
}

/// Each node's scatter width in `copysets`: how many other nodes share a copyset with it.
pub fn scatter_widths(copysets: &[Vec<u64>]) -> BTreeMap<u64, usize> {
    let mut peers: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for copyset in copysets {
        for &a in copyset {
            let entry = peers.entry(a).or_default();
            entry.extend(copyset.iter().copied().filter(|&b| b != a));
        }
    }
    peers
        .into_iter()
        .map(|(node, set)| (node, set.len()))
        .collect()
}

/// Zones when there are as many as replicas, else hosts, else a refusal.
fn choose_domain(eligible: &[&Member], replicas: usize) -> Result<Domain, PlacementError> {
    let zones: BTreeSet<&str> = eligible.iter().map(|m| m.zone.as_str()).collect();
    let hosts: BTreeSet<(&str, &str)> = eligible
        .iter()
        .map(|m| (m.zone.as_str(), m.host.as_str()))
        .collect();
    if zones.len() >= replicas {
        Ok(Domain::Zone)
    } else if hosts.len() >= replicas {
        Ok(Domain::Host)
    } else {
        Err(PlacementError::NotEnoughDomains {
            replicas,
            eligible: eligible.len(),
            zones: zones.len(),
            hosts: hosts.len(),
        })
    }
}

/// The generator's state: the copysets so far, each member's load and peers.
struct Generator<'a> {
    members: &'a [&'a Member],
    /// Each member's domain, as an index into the distinct domains.
    domain_of: Vec<usize>,
    /// Each member's weight: its free chunks (at least 1).
    weight: Vec<u128>,
    /// Copysets per member.
    load: Vec<u128>,
    /// The members' weights summed, and their number (for the mean).
    total_weight: u128,
    n: u128,
    /// Each member's peers (indices).
    peers: Vec<BTreeSet<usize>>,
    /// The most peers each member can have: the members outside its domain.
    reachable: Vec<usize>,
    /// The scatter width to reach.
    target: usize,
    rng: SplitMix64,
    copysets: Vec<Vec<u64>>,
}

impl<'a> Generator<'a> {
    fn new(
        members: &'a [&'a Member],
        domain: Domain,
        target: usize,
        rng: SplitMix64,
    ) -> Generator<'a> {
        let keys: Vec<(String, String)> = members
            .iter()
            .map(|m| match domain {
                Domain::Zone => (m.zone.clone(), String::new()),
                Domain::Host => (m.zone.clone(), m.host.clone()),
            })
            .collect();
        let distinct: BTreeSet<&(String, String)> = keys.iter().collect();
        let index: BTreeMap<&(String, String), usize> = distinct
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, i))
            .collect();
        let domain_of: Vec<usize> = keys.iter().map(|k| index[k]).collect();
        let reachable = domain_of
            .iter()
            .map(|d| domain_of.iter().filter(|e| *e != d).count())
            .collect();
        let weight: Vec<u128> = members
            .iter()
            .map(|m| u128::from(m.free_chunks.max(1)))
            .collect();
        Generator {
            members,
            total_weight: weight.iter().sum(),
            n: members.len().max(1) as u128,
            weight,
            load: vec![0; members.len()],
            peers: vec![BTreeSet::new(); members.len()],
            domain_of,
            reachable,
            target,
            rng,
            copysets: Vec::new(),
        }
    }

    /// Whether every member's scatter width reached the target, or all it can reach.
    fn scatter_reached(&self) -> bool {
        (0..self.members.len()).all(|i| self.peers[i].len() >= self.target.min(self.reachable[i]))
    }

    /// Adds one copyset of `replicas` members in distinct domains. To `widen`, it starts from
    /// the member furthest from its scatter-width target and takes, from the other domains,
    /// members new to those picked, whatever their load.
    fn add_copyset(&mut self, replicas: usize, widen: bool) {
        let mut picked: Vec<usize> = Vec::with_capacity(replicas);
        while picked.len() < replicas {
            let Some(next) = self.best_candidate(&picked, widen) else {
                break;
            };
            picked.push(next);
        }
        for &a in &picked {
            self.load[a] += 1;
            for &b in &picked {
                if a != b {
                    self.peers[a].insert(b);
                }
            }
        }
        let mut voters: Vec<u64> = picked.iter().map(|&i| self.members[i].node).collect();
        voters.sort_unstable();
        self.copysets.push(voters);
    }

    /// The member to add to `picked`: from a domain not used yet; among those whose load
    /// (for their free space) is within `LOAD_SLACK` of the lightest, the one with the fewest
    /// peers among `picked` already (it widens scatter), then the one furthest from its
    /// scatter-width target, then the lighter, then by the seed.
    fn best_candidate(&mut self, picked: &[usize], widen: bool) -> Option<usize> {
        let used: BTreeSet<usize> = picked.iter().map(|&i| self.domain_of[i]).collect();
        let candidates: Vec<(usize, u128)> = (0..self.members.len())
            .filter(|&i| !used.contains(&self.domain_of[i]))
            .map(|i| (i, self.level(i)))
            .collect();
        let lightest = candidates.iter().map(|&(_, level)| level).min()?;
        let mut best: Option<((usize, usize, u128, u64), usize)> = None;
        for (i, level) in candidates {
            if !widen && level > lightest + LOAD_SLACK {
                continue;
            }
            let known = picked
                .iter()
                .filter(|&&p| self.peers[p].contains(&i))
                .count();
            let short = self
                .target
                .min(self.reachable[i])
                .saturating_sub(self.peers[i].len());
            let key = (known, usize::MAX - short, level, self.rng.next_u64());
            if best.as_ref().map_or(true, |(k, _)| key < *k) {
                best = Some((key, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// A member's load relative to its share of the free space, in whole copysets of a
    /// member with the mean free space, counting the one it would take.
    fn level(&self, i: usize) -> u128 {
        (self.load[i] + 1) * self.total_weight / (self.weight[i] * self.n)
    }
}
