//! Placement over random topologies: failure domains always hold, scatter width and balance
//! where the topology allows them, the same seed gives the same plan.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn member(node: u64, zone: usize, host: usize, free_chunks: u64) -> Member {
    Member {
        node,
        zone: format!("z{zone}"),
        host: format!("h{zone}-{host}"),
        free_chunks,
        state: MemberState::Up,
    }
}

/// `shape[z][h]` chunkservers on host `h` of zone `z`.
fn topology(shape: &[Vec<usize>], free: impl Fn(u64) -> u64) -> Topology {
    let mut members = Vec::new();
    let mut node = 1;
    for (z, hosts) in shape.iter().enumerate() {
        for (h, &count) in hosts.iter().enumerate() {
            for _ in 0..count {
                members.push(member(node, z, h, free(node)));
                node += 1;
            }
        }
    }
    Topology { members }
}

fn request(scatter_width: usize) -> CopysetRequest {
    CopysetRequest {
        replicas: 3,
        scatter_width,
        min_copysets: 0,
        min_free_chunks: 1,
    }
}

proptest! {
    #[test]
    fn replicas_land_in_distinct_failure_domains(
        shape in proptest::collection::vec(proptest::collection::vec(1usize..4, 1..4), 1..6),
        scatter_width in 1usize..12,
        seed in any::<u64>(),
    ) {
        let topology = topology(&shape, |node| 100 + node % 7 * 50);
        let by_node: BTreeMap<u64, &Member> =
            topology.members.iter().map(|m| (m.node, m)).collect();
        let zones = shape.len();
        let hosts: usize = shape.iter().map(Vec::len).sum();
        match plan_copysets(&topology, &request(scatter_width), seed) {
            Err(PlacementError::NotEnoughDomains { .. }) => prop_assert!(zones < 3 && hosts < 3),
            Err(other) => prop_assert!(false, "unexpected refusal: {}", other),
            Ok(plan) => {
                prop_assert_eq!(plan.domain, if zones >= 3 { Domain::Zone } else { Domain::Host });
                let n = topology.members.len();
                prop_assert!(plan.copysets.len() >= (scatter_width * n).div_ceil(6));
                for voters in &plan.copysets {
                    prop_assert_eq!(voters.len(), 3);
                    let domains: BTreeSet<(String, String)> = voters
                        .iter()
                        .map(|v| {
                            let m = by_node[v];
                            match plan.domain {
                                Domain::Zone => (m.zone.clone(), String::new()),
                                Domain::Host => (m.zone.clone(), m.host.clone()),
                            }
                        })
                        .collect();
                    prop_assert_eq!(domains.len(), 3, "two replicas in one domain: {:?}", voters);
                }
                // Every chunkserver takes copysets, and reaches the scatter width it can.
                let widths = scatter_widths(&plan.copysets);
                for m in &topology.members {
                    let reachable = topology
                        .members
                        .iter()
                        .filter(|o| match plan.domain {
                            Domain::Zone => o.zone != m.zone,
                            Domain::Host => (&o.zone, &o.host) != (&m.zone, &m.host),
                        })
                        .count();
                    let width = widths.get(&m.node).copied().unwrap_or(0);
                    prop_assert!(
                        width >= scatter_width.min(reachable),
                        "node {} has scatter width {} of {} reachable, target {}",
                        m.node, width, reachable, scatter_width
                    );
                }
                // The same seed, the same plan.
                prop_assert_eq!(plan_copysets(&topology, &request(scatter_width), seed), Ok(plan));
            }
        }
    }
}

/// Chunkservers that are not up, or lack free space, take no copyset.
#[test]
fn only_up_chunkservers_with_room_take_copysets() {
    let mut topology = topology(&[vec![2], vec![2], vec![2], vec![2]], |_| 1000);
    topology.members[0].state = MemberState::Offline;
    topology.members[2].state = MemberState::Retired;
    topology.members[4].free_chunks = 3;
    let request = CopysetRequest {
        min_free_chunks: 10,
        ..request(4)
    };
    let plan = plan_copysets(&topology, &request, 7).expect("a plan");
    let used: BTreeSet<u64> = plan.copysets.iter().flatten().copied().collect();
    for excluded in [1, 3, 5] {
        assert!(!used.contains(&excluded), "node {excluded} took a copyset");
    }
    assert_eq!(used.len(), 5);
}

/// With alike chunkservers in even zones, copysets are spread evenly; a chunkserver with
/// twice the free space takes about twice the copysets.
#[test]
fn copysets_follow_free_space() {
    let even = topology(&[vec![3], vec![3], vec![3]], |_| 1000);
    let plan = plan_copysets(
        &even,
        &CopysetRequest {
            min_copysets: 30,
            ..request(4)
        },
        1,
    )
    .expect("a plan");
    let mut load: BTreeMap<u64, usize> = BTreeMap::new();
    for node in plan.copysets.iter().flatten() {
        *load.entry(*node).or_default() += 1;
    }
    let (low, high) = (load.values().min(), load.values().max());
    assert!(high.zip(low).is_some_and(|(h, l)| h - l <= 1), "{load:?}");

    let uneven = topology(&[vec![4], vec![4], vec![4]], |node| {
        if node % 4 == 1 {
            2000
        } else {
            1000
        }
    });
    let plan = plan_copysets(
        &uneven,
        &CopysetRequest {
            min_copysets: 120,
            ..request(4)
        },
        1,
    )
    .expect("a plan");
    let mut load: BTreeMap<u64, usize> = BTreeMap::new();
    for node in plan.copysets.iter().flatten() {
        *load.entry(*node).or_default() += 1;
    }
    for zone in 0..3u64 {
        let big = load[&(zone * 4 + 1)] as f64;
        let small = load[&(zone * 4 + 2)] as f64;
        assert!(
            (1.6..=2.4).contains(&(big / small)),
            "zone {zone}: {load:?}"
        );
    }
}

/// Too few zones and hosts for the replicas: a clear refusal, nothing planned.
#[test]
fn too_few_domains_are_refused() {
    let one_host = topology(&[vec![5]], |_| 1000);
    match plan_copysets(&one_host, &request(2), 1) {
        Err(PlacementError::NotEnoughDomains {
            zones: 1, hosts: 1, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let two_hosts = topology(&[vec![2, 2]], |_| 1000);
    assert!(plan_copysets(&two_hosts, &request(2), 1).is_err());
    assert_eq!(
        plan_copysets(
            &two_hosts,
            &CopysetRequest {
                replicas: 0,
                ..request(2)
            },
            1
        ),
        Err(PlacementError::NoReplicas)
    );
}
