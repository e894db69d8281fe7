//! The storage engine as a target, one shard per clone (thread-per-core: each clone's executor
//! owns its shard of one device file): a write is durable the way a replicated write is on
//! each replica — its raft entry and hard state appended to the shard WAL and group-committed,
//! then applied to the chunk — without the network and without the other replicas.

use std::cell::Cell;
use std::io;
use std::ops::Deref;
use std::path::Path;
use std::rc::Rc;

use bytes::Bytes;
use dataplane::ids::{ChunkId, CopysetId};
use dataplane::storage::bdev::{self, AnyBdev, Bdev};
use dataplane::storage::dma::DmaBuf;
use dataplane::storage::engine::{EngineOptions, ShardEngine};
use dataplane::storage::StorageError;
use raftcore::{Entry, EntryKind, HardState, LogIndex, Term};

use super::{Target, WriteBuffer};

/// Chunk size of the engine target's device.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// WAL ring per shard.
pub const WAL_SIZE: u64 = 64 << 20;
/// DMA buffer pool per shard.
const POOL_BYTES: usize = 256 << 20;

/// A write buffer from the engine's own pool: it becomes the entry payload and, unchanged, the
/// chunk write's buffer.
pub enum EngineBuffer {
    /// A buffer from the pool.
    Pooled(DmaBuf),
    /// The pool was exhausted (a bound hit): the write fails with this error.
    Exhausted(String, Vec<u8>),
}

impl WriteBuffer for EngineBuffer {
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            EngineBuffer::Pooled(buffer) => buffer.as_mut_slice().unwrap_or_default(),
            EngineBuffer::Exhausted(_, empty) => empty,
        }
    }
}

/// What a read returns.
pub struct EngineRead(Bytes);

impl Deref for EngineRead {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// One clone's shard of the engine.
pub struct EngineTarget {
    engine: ShardEngine<AnyBdev>,
    copyset: CopysetId,
    next_index: Cell<u64>,
}

fn io_error(error: impl std::fmt::Display) -> io::Error {
    io::Error::other(error.to_string())
}

impl EngineTarget {
    /// Opens shard `shard` of the formatted device at `path`.
    pub async fn open(path: &Path, shard: u32) -> io::Result<EngineTarget> {
        let uri = format!("uring://{}", path.display());
        let device = bdev::open(&uri, POOL_BYTES).await.map_err(io_error)?;
        let (engine, recovery) =
            ShardEngine::open(Rc::new(device), shard, EngineOptions::default())
                .await
                .map_err(io_error)?;
        let copyset = CopysetId(1);
        let applied = recovery
            .copysets
            .iter()
            .find(|c| c.copyset == copyset)
            .map_or(0, |c| c.hard_state.commit.0.max(c.applied.0));
        Ok(EngineTarget {
            engine,
            copyset,
            next_index: Cell::new(applied),
        })
    }

    fn locate(offset: u64) -> (ChunkId, u64) {
        (ChunkId(1 + offset / CHUNK_SIZE), offset % CHUNK_SIZE)
    }

    async fn durable_write(&self, offset: u64, data: Bytes) -> Result<(), StorageError> {
        let index = self.next_index.get() + 1;
        self.next_index.set(index);
        let entry = Entry {
            term: Term(1),
            index: LogIndex(index),
            kind: EntryKind::Normal,
            data,
        };
        let hard_state = HardState {
            term: Term(1),
            vote: None,
            commit: LogIndex(index),
        };
        let wal = self.engine.wal();
        let lsn = loop {
            let appended = wal
                .append_entries(self.copyset, std::slice::from_ref(&entry))
                .and_then(|_| wal.set_hard_state(self.copyset, hard_state));
            match appended {
                Ok(lsn) => break lsn,
                Err(StorageError::WalFull { .. }) => self.engine.checkpoint().await?,
                Err(error) => return Err(error),
            }
        };
        wal.sync(lsn).await?;
        let (chunk, within) = Self::locate(offset);
        self.engine
            .write_chunk_bytes(self.copyset, chunk, within, entry.data, 1, LogIndex(index))
            .await?;
        self.engine.set_applied(self.copyset, LogIndex(index));
        self.engine.maybe_checkpoint().await?;
        Ok(())
    }
}

impl Target for EngineTarget {
    type Buffer = EngineBuffer;
    type ReadData = EngineRead;

    fn alloc(&self, len: usize) -> EngineBuffer {
        // The pool is sized for the job's depth; running out is a bound being hit, and the
        // write then fails with the pool's error rather than allocating past the bound.
        match self.engine.bdev().alloc(len) {
            Ok(buffer) => EngineBuffer::Pooled(buffer),
            Err(error) => EngineBuffer::Exhausted(error.to_string(), Vec::new()),
        }
    }

    async fn write(&self, offset: u64, data: EngineBuffer) -> io::Result<()> {
        match data {
            EngineBuffer::Pooled(buffer) => self
                .durable_write(offset, buffer.into_bytes())
                .await
                .map_err(io_error),
            EngineBuffer::Exhausted(error, _) => Err(io::Error::other(error)),
        }
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<EngineRead> {
        let (chunk, within) = Self::locate(offset);
        match self.engine.read_chunk(chunk, within, len as u64).await {
            Ok(buffer) => Ok(EngineRead(buffer.into_bytes())),
            // Never written: reads as zeroes, like a fresh device.
            Err(StorageError::ChunkNotFound(_)) => Ok(EngineRead(Bytes::from(vec![0u8; len]))),
            Err(error) => Err(io_error(error)),
        }
    }

    async fn sync(&self) -> io::Result<()> {
        // Every completed write is already durable: its WAL record was synced before it applied.
        Ok(())
    }
}
