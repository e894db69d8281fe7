//! The deterministic simulation: a fixed set of seeds in CI, any number by hand
//! (`scripts/raft-sim N`), one seed replayed with `RAFT_SIM_SEED`.

mod sim;

use raftcore::InjectedBug;
use sim::{run_seed, Options};

/// Seeds CI runs on every build.
const CI_SEEDS: u64 = 300;

#[test]
fn fixed_seeds_keep_every_safety_property_and_converge() {
    let mut failures = Vec::new();
    for seed in 0..CI_SEEDS {
        if let Err(report) = run_seed(seed, Options::default()) {
            failures.push(report);
        }
    }
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn same_seed_replays_the_same_run() {
    for seed in [3, 11] {
        let first = run_seed(seed, Options::default()).expect("seed passes");
        let second = run_seed(seed, Options::default()).expect("seed passes");
        assert_eq!(
            first.0, second.0,
            "seed {seed}: trace hashes differ, the run is not deterministic"
        );
    }
}

#[test]
fn simulator_catches_a_candidate_counting_duplicate_votes() {
    let options = Options {
        fault: Some(InjectedBug::CountDuplicateVotes),
        voters: Some(5),
        duplicate: Some(0.3),
        partition: Some(0.004),
        safety_time: Some(4_000),
        ..Options::default()
    };
    let caught = (0..30u64).find_map(|seed| run_seed(seed, options.clone()).err());
    let report = caught.expect("the broken vote count must be caught within 30 seeds");
    println!("caught: {report}");
    assert!(report.contains("failed (Correctness)"), "{report}");
}

#[test]
fn simulator_catches_votes_granted_to_stale_logs() {
    let options = Options {
        fault: Some(InjectedBug::SkipLogUpToDateCheck),
        voters: Some(5),
        partition: Some(0.004),
        ..Options::default()
    };
    let caught = (0..30u64).find_map(|seed| run_seed(seed, options.clone()).err());
    let report = caught.expect("votes for stale logs must be caught within 30 seeds");
    println!("caught: {report}");
    assert!(report.contains("failed (Correctness)"), "{report}");
}

#[test]
fn simulator_catches_acknowledgements_sent_before_persisting() {
    let options = Options {
        fault: Some(InjectedBug::AcknowledgeBeforePersisting),
        crash: Some(0.01),
        ..Options::default()
    };
    let caught = (0..200u64).find_map(|seed| run_seed(seed, options.clone()).err());
    let report = caught.expect("acknowledging unpersisted state must be caught within 200 seeds");
    println!("caught: {report}");
    assert!(report.contains("failed (Correctness)"), "{report}");
}

/// Replays one seed: `RAFT_SIM_SEED=n cargo test -p raftcore --test simulation replay_seed --
/// --ignored --nocapture`.
#[test]
#[ignore]
fn replay_seed() {
    let seed: u64 = std::env::var("RAFT_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("set RAFT_SIM_SEED to the seed to replay");
    let world = sim::World::new(seed, Options::default());
    println!("seed {seed}: {:?}", world.params);
    match run_seed(seed, Options::default()) {
        Ok((hash, stats)) => println!("seed {seed} clean: trace {hash:016x}, {stats:?}"),
        Err(report) => panic!("{report}"),
    }
}

/// Many seeds by hand: `RAFT_SIM_SEEDS=n` (default 1000) from `RAFT_SIM_FIRST` (default
/// 1_000_000, past the CI seeds).
#[test]
#[ignore]
fn many_seeds() {
    let count: u64 = std::env::var("RAFT_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let first: u64 = std::env::var("RAFT_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut total = sim::Stats::default();
    for seed in first..first + count {
        let seed_started = std::time::Instant::now();
        let outcome = run_seed(seed, Options::default());
        if seed_started.elapsed().as_secs() >= 5 {
            println!(
                "raft-sim: seed {seed} took {:.1} s",
                seed_started.elapsed().as_secs_f64()
            );
        }
        match outcome {
            Ok((_, stats)) => total.add(&stats),
            Err(report) => {
                println!("{report}");
                failures.push(seed);
            }
        }
    }
    println!("raft-sim: over the clean seeds: {total:?}");
    println!(
        "raft-sim: {} of {count} seeds clean, {} failed {:?}, in {:.1} s",
        count - failures.len() as u64,
        failures.len(),
        failures,
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty());
}
