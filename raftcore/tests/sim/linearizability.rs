//! A linearizability checker for a key-value store of registers, in the manner of Porcupine
//! and Knossos: the history is split per key (registers are independent, so the whole history
//! is linearizable iff each key's is), then Wing & Gong's search looks for an order of the
//! operations that respects real time and the register's semantics, memoizing every
//! (set of linearized operations, register value) pair already explored.

use std::collections::{BTreeMap, HashSet};

/// What an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOp {
    /// Wrote the value.
    Write(u64),
    /// Read the value (`None`: never written).
    Read(Option<u64>),
}

/// One client operation on one key. Times are positions in one global event order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    /// The key.
    pub key: u64,
    /// When the client invoked it.
    pub call: u64,
    /// When the client got the answer; `u64::MAX` when it never did (the operation may or may
    /// not have taken effect).
    pub ret: u64,
    /// What it did.
    pub op: RegisterOp,
}

/// Upper bound of explored states per key, so that a pathological history fails loudly
/// instead of running forever.
const STATE_BUDGET: usize = 1_000_000;

/// Checks a whole history; on failure names the key whose history is not linearizable.
pub fn check_history(ops: &[Operation]) -> Result<(), String> {
    let mut per_key: BTreeMap<u64, Vec<Operation>> = BTreeMap::new();
    for op in ops {
        per_key.entry(op.key).or_default().push(*op);
    }
    for (key, ops) in per_key {
        match check_register(&ops) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "history of key {key} is not linearizable ({} operations): {ops:?}",
                    ops.len()
                ))
            }
            Err(why) => return Err(format!("key {key}: {why}")),
        }
    }
    Ok(())
}

struct Search<'a> {
    ops: &'a [Operation],
    done: Vec<u64>,
    remaining_completed: usize,
    seen: HashSet<(Vec<u64>, Option<u64>)>,
}

impl Search<'_> {
    fn is_done(&self, i: usize) -> bool {
        self.done[i / 64] & (1 << (i % 64)) != 0
    }

    fn flip(&mut self, i: usize) {
        self.done[i / 64] ^= 1 << (i % 64);
    }

    fn explore(&mut self, value: Option<u64>) -> Result<bool, String> {
        if self.remaining_completed == 0 {
            return Ok(true);
        }
        if !self.seen.insert((self.done.clone(), value)) {
            return Ok(false);
        }
        if self.seen.len() > STATE_BUDGET {
            return Err("linearizability search exceeded its state budget".into());
        }
        // An operation may come next only if it was invoked before every other remaining
        // operation returned.
        let min_ret = (0..self.ops.len())
            .filter(|i| !self.is_done(*i))
            .map(|i| self.ops[i].ret)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..self.ops.len() {
            if self.is_done(i) || self.ops[i].call > min_ret {
                continue;
            }
            let next = match self.ops[i].op {
                RegisterOp::Write(v) => Some(v),
                RegisterOp::Read(seen) if seen == value => value,
                RegisterOp::Read(_) => continue,
            };
            let completed = self.ops[i].ret != u64::MAX;
            self.flip(i);
            if completed {
                self.remaining_completed -= 1;
            }
            let found = self.explore(next)?;
            self.flip(i);
            if completed {
                self.remaining_completed += 1;
            }
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Whether one register's history (starting unwritten) is linearizable.
pub fn check_register(ops: &[Operation]) -> Result<bool, String> {
    // A write that never returned and whose value nobody read constrains nothing (it may
    // never have happened): leave it out, since every such write doubles the search.
    let read_values: HashSet<u64> = ops
        .iter()
        .filter_map(|op| match op.op {
            RegisterOp::Read(Some(v)) => Some(v),
            _ => None,
        })
        .collect();
    let mut ops: Vec<Operation> = ops
        .iter()
        .filter(|op| match op.op {
            RegisterOp::Write(v) => op.ret != u64::MAX || read_values.contains(&v),
            RegisterOp::Read(_) => true,
        })
        .copied()
        .collect();
    ops.sort_by_key(|op| op.call);
    let remaining_completed = ops.iter().filter(|op| op.ret != u64::MAX).count();
    let mut search = Search {
        ops: &ops,
        done: vec![0; ops.len().div_ceil(64)],
        remaining_completed,
        seen: HashSet::new(),
    };
    search.explore(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: u64, op: RegisterOp) -> Operation {
        Operation {
            key: 0,
            call,
            ret,
            op,
        }
    }

    #[test]
    fn checker_accepts_linearizable_and_rejects_stale_reads() {
        use RegisterOp::*;
        // (history, linearizable)
        let table: Vec<(Vec<Operation>, bool)> = vec![
            (vec![op(0, 1, Write(1)), op(2, 3, Read(Some(1)))], true),
            (vec![op(0, 1, Write(1)), op(2, 3, Read(None))], false),
            // Concurrent write and read: either order.
            (vec![op(0, 5, Write(1)), op(1, 2, Read(None))], true),
            (vec![op(0, 5, Write(1)), op(1, 2, Read(Some(1)))], true),
            // A read sees 2 then a later read sees 1 again: impossible.
            (
                vec![
                    op(0, 1, Write(1)),
                    op(2, 9, Write(2)),
                    op(3, 4, Read(Some(2))),
                    op(5, 6, Read(Some(1))),
                ],
                false,
            ),
            // A write that never returned may take effect late, or never.
            (
                vec![
                    op(0, u64::MAX, Write(7)),
                    op(5, 6, Read(None)),
                    op(7, 8, Read(Some(7))),
                ],
                true,
            ),
            (
                vec![
                    op(0, u64::MAX, Write(7)),
                    op(5, 6, Read(Some(7))),
                    op(7, 8, Read(None)),
                ],
                false,
            ),
        ];
        for (history, expected) in table {
            assert_eq!(check_register(&history), Ok(expected), "{history:?}");
        }
    }
}
