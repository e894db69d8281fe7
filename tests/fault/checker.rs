//! Linearizability of single-register histories (Wing & Gong's search with Lowe's
//! just-in-time linearization and a cache of visited configurations).
//!
//! Every write writes a value no other write writes, so a read names the one write it saw.
//! A write whose outcome is unknown (the client gave up) may take effect at any time after it
//! began, or never: it is given an end at infinity; one that no read ever saw is dropped
//! first, since placing it last is always allowed. Failed reads say nothing and are dropped.

use std::collections::{HashMap, HashSet};

/// What an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Wrote this value (unique across the history).
    Write(u64),
    /// Read; the value is in the outcome.
    Read,
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged; for a read, the value seen (`None`: the page was never written).
    Ok(Option<u64>),
    /// Definitely not applied (refused), or a read that failed: no information.
    Failed,
    /// The client gave up; a write may or may not take effect, at any later time.
    Unknown,
    /// A read returned a page that is no value ever written whole (torn or corrupt).
    Corrupt,
}

/// One client operation on one register; times in microseconds since the run began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Which register.
    pub register: usize,
    /// Write or read.
    pub kind: OpKind,
    /// When the client called.
    pub start: u64,
    /// When the client got the answer (or gave up).
    pub end: u64,
    /// What came back.
    pub outcome: Outcome,
}

/// The register's value before any write: the zero page.
const INITIAL: Option<u64> = None;
/// Search steps after which the checker gives up (reported, never taken as a pass).
const STEP_LIMIT: u64 = 200_000_000;

/// Checks one register's history (every op has the same `register`).
pub fn check_register(ops: &[Op]) -> Result<(), String> {
    let written: HashSet<u64> = ops
        .iter()
        .filter_map(|op| match op.kind {
            OpKind::Write(v) if op.outcome != Outcome::Failed => Some(v),
            _ => None,
        })
        .collect();
    let mut observed = HashSet::new();
    for op in ops {
        match (op.kind, op.outcome) {
            (OpKind::Read, Outcome::Corrupt) => {
                return Err(format!("a read returned a torn or corrupt page: {op:?}"))
            }
            (OpKind::Read, Outcome::Ok(Some(v))) => {
                if !written.contains(&v) {
                    return Err(format!("a read returned {v}, which no write wrote: {op:?}"));
                }
                observed.insert(v);
            }
            _ => {}
        }
    }
    // The operations the search places: acknowledged ones, and unknown writes someone saw.
    let kept: Vec<Op> = ops
        .iter()
        .copied()
        .filter(|op| match (op.kind, op.outcome) {
            (OpKind::Read, Outcome::Ok(_)) => true,
            (OpKind::Write(_), Outcome::Ok(_)) => true,
            (OpKind::Write(v), Outcome::Unknown) => observed.contains(&v),
            _ => false,
        })
        .collect();
    search(&kept)
}

fn ends_at(op: &Op) -> u64 {
    if op.outcome == Outcome::Unknown {
        u64::MAX
    } else {
        op.end
    }
}

/// Zobrist key of operation `i`: the cache stores the XOR of the linearized ops' keys.
fn key(i: usize) -> u128 {
    let mut x = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (u128::from(next()) << 64) | u128::from(next())
}

fn search(ops: &[Op]) -> Result<(), String> {
    const HEAD: usize = 0;
    const NIL: usize = usize::MAX;
    // Events 1..=2n: (time, is_return, op). At equal times calls come first (concurrent).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        events.push((op.start, false, i));
        events.push((ends_at(op), true, i));
    }
    events.sort_unstable();
    let n = events.len();
    let mut next = vec![NIL; n + 1];
    let mut prev = vec![NIL; n + 1];
    for slot in 0..=n {
        next[slot] = if slot == n { NIL } else { slot + 1 };
        prev[slot] = if slot == 0 { NIL } else { slot - 1 };
    }
    let mut call_of = vec![0usize; ops.len()];
    let mut return_of = vec![0usize; ops.len()];
    for (index, &(_, is_return, op)) in events.iter().enumerate() {
        if is_return {
            return_of[op] = index + 1;
        } else {
            call_of[op] = index + 1;
        }
    }
    let event = |slot: usize| events[slot - 1];
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, slot: usize| {
        let (p, q) = (prev[slot], next[slot]);
        next[p] = q;
        if q != NIL {
            prev[q] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, slot: usize| {
        let (p, q) = (prev[slot], next[slot]);
        next[p] = slot;
        if q != NIL {
            prev[q] = slot;
        }
    };

    let mut state = INITIAL;
    let mut linearized: u128 = 0;
    let mut cache: HashSet<(u128, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut entry = next[HEAD];
    let mut steps = 0u64;
    while next[HEAD] != NIL {
        steps += 1;
        if steps > STEP_LIMIT {
            return Err(format!(
                "undecided: the search passed {STEP_LIMIT} steps on {} operations",
                ops.len()
            ));
        }
        assert!(entry != NIL, "every call has its return after it");
        let (_, is_return, index) = event(entry);
        let op = &ops[index];
        if !is_return {
            let (legal, after) = match (op.kind, op.outcome) {
                (OpKind::Write(v), _) => (true, Some(v)),
                (OpKind::Read, Outcome::Ok(seen)) => (seen == state, state),
                (OpKind::Read, _) => unreachable!("only acknowledged reads are kept"),
            };
            let with = linearized ^ key(index);
            if legal && cache.insert((with, after)) {
                stack.push((entry, state));
                state = after;
                linearized = with;
                unlink(&mut next, &mut prev, entry);
                unlink(&mut next, &mut prev, return_of[index]);
                entry = next[HEAD];
            } else {
                entry = next[entry];
            }
        } else {
            let Some((call, before)) = stack.pop() else {
                return Err(describe(ops, index));
            };
            let (_, _, undone) = event(call);
            state = before;
            linearized ^= key(undone);
            relink(&mut next, &mut prev, return_of[undone]);
            relink(&mut next, &mut prev, call);
            debug_assert_eq!(call, call_of[undone]);
            entry = next[call];
        }
    }
    Ok(())
}

/// Names the operation that cannot be linearized and the operations around it.
fn describe(ops: &[Op], index: usize) -> String {
    let op = &ops[index];
    let mut around: Vec<&Op> = ops
        .iter()
        .filter(|o| o.start <= op.end && ends_at(o) >= op.start.saturating_sub(2_000_000))
        .collect();
    around.sort_by_key(|o| o.start);
    let mut lines = format!(
        "not linearizable: no order places {op:?} ({} operations in the history); \
         operations overlapping it or ending up to 2 s before it:",
        ops.len()
    );
    for o in around.iter().take(40) {
        lines.push_str(&format!("\n    {o:?}"));
    }
    lines
}

/// Splits a mixed history by register and checks each.
pub fn check_all(ops: &[Op]) -> Vec<(usize, Result<(), String>)> {
    let mut by_register: HashMap<usize, Vec<Op>> = HashMap::new();
    for op in ops {
        by_register.entry(op.register).or_default().push(*op);
    }
    let mut registers: Vec<usize> = by_register.keys().copied().collect();
    registers.sort_unstable();
    registers
        .into_iter()
        .map(|r| (r, check_register(&by_register[&r])))
        .collect()
}
