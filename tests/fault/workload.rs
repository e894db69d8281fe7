//! The client workload: per register (one 4 KiB page of chunk 1) one writer of unique values
//! (`FAULT_WRITERS` of them if set) and two readers, plus one writer that writes each value to a fresh page (chunks 2..) and
//! never overwrites it. Every operation is recorded with its start, end and outcome.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dataplane::client::{Client, ClientConfig, ClientError, NodeAddress};
use dataplane::ids::{ChunkId, CopysetId};

use super::checker::{Op, OpKind, Outcome};

pub const COPYSET: CopysetId = CopysetId(7);
pub const PAGE: usize = 4096;
pub const REGISTERS: usize = 4;
const REGISTER_CHUNK: ChunkId = ChunkId(1);
/// Pages of the write-once area: chunks 2..=65 of 256 pages each.
pub const ONCE_PAGES: u64 = 64 * 256;
/// One operation gives up after this long (then a write's outcome is unknown).
pub const OP_DEADLINE: Duration = Duration::from_secs(2);

/// A write to a fresh page and what became of it.
#[derive(Debug, Clone, Copy)]
pub struct OnceWrite {
    pub page: u64,
    pub value: u64,
    pub outcome: Outcome,
}

/// Everything the workload did.
#[derive(Debug, Default)]
pub struct Record {
    pub ops: Vec<Op>,
    pub once: Vec<OnceWrite>,
    /// When the writers stopped because the write budget was spent.
    pub budget_reached_us: Option<u64>,
}

/// Page contents for `value` of register (or area) `tag`: decodable and checkable whole.
pub fn page(tag: u64, value: u64) -> Bytes {
    let mut data = vec![0u8; PAGE];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (value.wrapping_mul(31) ^ tag.wrapping_mul(7) ^ (i as u64).wrapping_mul(13)) as u8;
    }
    data[..8].copy_from_slice(&value.to_le_bytes());
    data[8..16].copy_from_slice(&tag.to_le_bytes());
    Bytes::from(data)
}

/// The value a page holds: `Ok(None)` for the zero page, `Err` for anything not written whole.
pub fn decode(tag: u64, data: &[u8]) -> Result<Option<u64>, String> {
    if data.len() != PAGE {
        return Err(format!("{} bytes instead of {PAGE}", data.len()));
    }
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&data[..8]);
    let value = u64::from_le_bytes(word);
    if page(tag, value) == data {
        Ok(Some(value))
    } else {
        Err(format!(
            "page of tag {tag} claims value {value} but is not that page whole"
        ))
    }
}

pub fn addresses(hosts: &[String], ports: &[u16]) -> Vec<NodeAddress> {
    hosts
        .iter()
        .enumerate()
        .map(|(n, host)| NodeAddress {
            id: n as u64 + 1,
            endpoint: format!("tcp://{host}:{}", ports[2 * n + 1])
                .parse()
                .expect("endpoint of a generated address"),
            shards: 1,
        })
        .collect()
}

pub fn client(addresses: &[NodeAddress], deadline: Duration) -> Client {
    let client = Client::new(
        addresses,
        ClientConfig {
            deadline,
            ..ClientConfig::default()
        },
    );
    client.set_peers(COPYSET, &[1, 2, 3]);
    client
}

fn micros(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}

fn write_outcome(result: &Result<(), ClientError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Ok(None),
        Err(ClientError::Refused { .. }) => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    }
}

/// Writes `value` to register `register`, recorded.
pub async fn write_register(
    client: &Client,
    base: Instant,
    ops: &RefCell<Vec<Op>>,
    register: usize,
    value: u64,
) -> Outcome {
    let start = micros(base);
    let result = client
        .write(
            COPYSET,
            REGISTER_CHUNK,
            (register * PAGE) as u32,
            page(register as u64, value),
            1,
        )
        .await;
    let outcome = write_outcome(&result);
    ops.borrow_mut().push(Op {
        register,
        kind: OpKind::Write(value),
        start,
        end: micros(base),
        outcome,
    });
    outcome
}

/// Reads register `register`, recorded.
pub async fn read_register(
    client: &Client,
    base: Instant,
    ops: &RefCell<Vec<Op>>,
    register: usize,
) -> Outcome {
    let start = micros(base);
    let result = client
        .read(
            COPYSET,
            REGISTER_CHUNK,
            (register * PAGE) as u64,
            PAGE as u32,
        )
        .await;
    let outcome = match result {
        Ok(data) => match decode(register as u64, &data) {
            Ok(value) => Outcome::Ok(value),
            Err(why) => {
                eprintln!("register {register}: {why}");
                Outcome::Corrupt
            }
        },
        Err(_) => Outcome::Failed,
    };
    ops.borrow_mut().push(Op {
        register,
        kind: OpKind::Read,
        start,
        end: micros(base),
        outcome,
    });
    outcome
}

pub fn once_location(page_index: u64) -> (ChunkId, u32) {
    (
        ChunkId(2 + page_index / 256),
        ((page_index % 256) as usize * PAGE) as u32,
    )
}

/// Tag of the write-once area's pages (registers use their index).
pub const ONCE_TAG: u64 = 1000;

/// Shared between the workload's tasks.
struct Shared {
    client: Client,
    base: Instant,
    stop: Arc<AtomicBool>,
    leader: Arc<AtomicU64>,
    /// Operations finished so far, for the progress lines of long runs.
    completed: Arc<AtomicU64>,
    next_value: RefCell<u64>,
    /// Writes left before the writers stop (`None`: no limit).
    budget: RefCell<Option<u64>>,
    budget_reached_us: RefCell<Option<u64>>,
    ops: RefCell<Vec<Op>>,
    once: RefCell<Vec<OnceWrite>>,
}

impl Shared {
    fn value(&self) -> u64 {
        let mut next = self.next_value.borrow_mut();
        *next += 1;
        *next
    }

    /// Takes one write from the budget; false once it is spent.
    fn may_write(&self) -> bool {
        let mut budget = self.budget.borrow_mut();
        match budget.as_mut() {
            None => true,
            Some(0) => {
                self.budget_reached_us
                    .borrow_mut()
                    .get_or_insert_with(|| micros(self.base));
                false
            }
            Some(left) => {
                *left -= 1;
                true
            }
        }
    }

    fn note_leader(&self) {
        if let Some(leader) = self.client.cached_leader(COPYSET) {
            self.leader.store(leader, Ordering::Relaxed);
        }
    }
}

/// Creates the copyset and gives every register a first value (recorded). Before any fault.
pub async fn prepare(client: &Client, base: Instant, ops: &RefCell<Vec<Op>>) -> u64 {
    // The nodes may still be starting (formatting their devices): keep trying for a while.
    let started = Instant::now();
    while let Err(error) = client.create_copyset(COPYSET, &[1, 2, 3]).await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "create the copyset before any fault: {error}"
        );
        glommio::timer::sleep(Duration::from_millis(200)).await;
    }
    for register in 0..REGISTERS {
        let outcome = write_register(client, base, ops, register, register as u64 + 1).await;
        assert_eq!(
            outcome,
            Outcome::Ok(None),
            "first write of register {register} before any fault"
        );
    }
    REGISTERS as u64
}

/// How the test's thread steers the workload and what it sees of it.
pub struct Controls {
    /// Set to stop the workload.
    pub stop: Arc<AtomicBool>,
    /// The leader the client last saw (0: none yet).
    pub leader: Arc<AtomicU64>,
    /// Operations finished so far.
    pub completed: Arc<AtomicU64>,
    /// Writes at most (0: no limit).
    pub write_budget: u64,
    /// Concurrent writers per register.
    pub writers: usize,
    /// Told once the copyset exists and every register has its first value.
    pub ready: std::sync::mpsc::Sender<()>,
}

/// Runs the workload until `controls.stop` is set; returns the record.
pub async fn run(addresses: Vec<NodeAddress>, base: Instant, controls: Controls) -> Record {
    let Controls {
        stop,
        leader,
        completed,
        write_budget,
        writers,
        ready,
    } = controls;
    let client = client(&addresses, OP_DEADLINE);
    let ops = RefCell::new(Vec::new());
    let last = prepare(&client, base, &ops).await;
    let shared = Rc::new(Shared {
        client,
        base,
        stop,
        leader,
        completed,
        next_value: RefCell::new(last),
        budget: RefCell::new((write_budget > 0).then_some(write_budget)),
        budget_reached_us: RefCell::new(None),
        ops,
        once: RefCell::new(Vec::new()),
    });
    shared.note_leader();
    let _ = ready.send(());
    let mut tasks = Vec::new();
    for (register, _) in (0..REGISTERS).flat_map(|r| (0..writers).map(move |w| (r, w))) {
        let writer = Rc::clone(&shared);
        tasks.push(glommio::spawn_local(async move {
            while !writer.stop.load(Ordering::Relaxed) && writer.may_write() {
                let value = writer.value();
                let outcome =
                    write_register(&writer.client, writer.base, &writer.ops, register, value).await;
                if let Outcome::Ok(_) = outcome {
                    writer.note_leader();
                }
                writer.completed.fetch_add(1, Ordering::Relaxed);
                glommio::timer::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    for register in 0..REGISTERS {
        for _ in 0..2 {
            let reader = Rc::clone(&shared);
            tasks.push(glommio::spawn_local(async move {
                while !reader.stop.load(Ordering::Relaxed) {
                    read_register(&reader.client, reader.base, &reader.ops, register).await;
                    reader.completed.fetch_add(1, Ordering::Relaxed);
                    glommio::timer::sleep(Duration::from_millis(3)).await;
                }
            }));
        }
    }
    let once_writer = Rc::clone(&shared);
    tasks.push(glommio::spawn_local(async move {
        let mut page_index = 0;
        while !once_writer.stop.load(Ordering::Relaxed)
            && page_index < ONCE_PAGES
            && once_writer.may_write()
        {
            let value = once_writer.value();
            let (chunk, offset) = once_location(page_index);
            let result = once_writer
                .client
                .write(COPYSET, chunk, offset, page(ONCE_TAG, value), 1)
                .await;
            once_writer.once.borrow_mut().push(OnceWrite {
                page: page_index,
                value,
                outcome: write_outcome(&result),
            });
            once_writer.completed.fetch_add(1, Ordering::Relaxed);
            page_index += 1;
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
    }));
    for task in tasks {
        task.await;
    }
    Record {
        ops: shared.ops.take(),
        once: shared.once.take(),
        budget_reached_us: shared.budget_reached_us.take(),
    }
}
