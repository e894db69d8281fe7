//! The SPDK backend (feature `spdk`): `spdk://NAME[?offset=BYTES&size=BYTES]`, a bdev that the
//! process's SPDK JSON config defines (malloc, aio, uring, NVMe …), opened on an SPDK thread of
//! the shard's own OS thread, with DMA buffers from SPDK's allocator.
//!
//! The optional window (`offset`, `size`) makes a part of the bdev the device, so that one
//! bdev can hold several engines (the storage-engine tests give each test its own window).
//!
//! Durability: a flush goes to the bdev as an SPDK flush where the bdev supports it (NVMe, aio:
//! fdatasync, malloc). SPDK's uring bdev takes no flush; on it a flush only waits for the
//! writes before it, which is durable only on a device without a volatile write cache, and
//! opening one says so in the log.

use std::rc::Rc;

use ffi::spdk::{BdevHandle, IoKind, SpdkError, SpdkThread};

use super::{check_range, Bdev, BdevError};
use crate::storage::dma::{DmaBuf, DmaPool};

/// A bdev (or a window of one) on this shard.
#[derive(Debug)]
pub struct SpdkBdev {
    handle: BdevHandle,
    pool: DmaPool,
    /// Where the window starts on the bdev, in bytes.
    start: u64,
    block_count: u64,
    flushes: bool,
}

impl SpdkBdev {
    /// Opens bdev `name` on a new SPDK thread of this OS thread; `window` is (offset, size)
    /// in bytes, the whole bdev when `None`. SPDK must be started ([`ffi::spdk::start`]).
    pub fn open(
        name: &str,
        window: Option<(u64, u64)>,
        pool_bytes: usize,
    ) -> Result<SpdkBdev, BdevError> {
        let uri = format!("spdk://{name}");
        let open_error = |reason: String| BdevError::Open {
            uri: uri.clone(),
            reason,
        };
        let thread =
            SpdkThread::create(&format!("shard:{name}")).map_err(|e| open_error(e.to_string()))?;
        let handle =
            BdevHandle::open(name, Rc::clone(&thread)).map_err(|e| open_error(e.to_string()))?;
        let block = u64::from(handle.block_size());
        let capacity = handle.block_count() * block;
        let (start, size) = window.unwrap_or((0, capacity));
        if start % block != 0 || size % block != 0 || size == 0 {
            return Err(open_error(format!(
                "the window {start}+{size} is not a non-empty multiple of the block size {block}"
            )));
        }
        if start.checked_add(size).map_or(true, |end| end > capacity) {
            return Err(open_error(format!(
                "the window {start}+{size} reaches past the bdev's {capacity} bytes"
            )));
        }
        let align = handle
            .buf_align()
            .max(handle.block_size() as usize)
            .max(4096);
        let pool = DmaPool::spdk(pool_bytes, align)?;
        let flushes = handle.supports_flush();
        if !flushes {
            tracing::warn!(
                bdev = name,
                "this SPDK bdev takes no flush (SPDK's uring bdev): writes are durable only on \
                 a device without a volatile write cache"
            );
        }
        Ok(SpdkBdev {
            handle,
            pool,
            start,
            block_count: size / block,
            flushes,
        })
    }

    /// The bdev's name.
    pub fn name(&self) -> &str {
        self.handle.name()
    }

    /// A task for the shard's executor that polls this device's SPDK thread every
    /// millisecond, for what arrives while no request is in flight (messages from SPDK's app
    /// thread, timed pollers); requests in flight poll it themselves. It ends when the device
    /// is dropped.
    pub fn idle_poller(&self) -> impl std::future::Future<Output = ()> + 'static {
        let thread = Rc::downgrade(self.handle.thread());
        async move {
            loop {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                match thread.upgrade() {
                    Some(thread) => {
                        thread.poll();
                    }
                    None => return,
                }
            }
        }
    }

    async fn io(
        &self,
        op: IoKind,
        offset: u64,
        len: u64,
        mut buffer: Option<DmaBuf>,
    ) -> Result<Option<DmaBuf>, BdevError> {
        if op != IoKind::Flush {
            check_range(offset, len, self.block_size(), self.capacity())?;
        }
        let device_offset = self.start + offset;
        loop {
            match self.handle.submit(op, device_offset, len, buffer) {
                Ok(completion) => {
                    return completion.await.map_err(|e| bdev_error(e, offset, len));
                }
                // The bdev layer is out of request structures: let completions free some.
                Err((SpdkError::Submit { rc, .. }, back)) if rc == -libc::ENOMEM => {
                    buffer = back;
                    self.handle.thread().poll();
                    futures_lite::future::yield_now().await;
                }
                Err((error, _)) => return Err(bdev_error(error, offset, len)),
            }
        }
    }
}

/// SPDK's failure as the engine's, with the offset within the window.
fn bdev_error(error: SpdkError, offset: u64, len: u64) -> BdevError {
    match error {
        SpdkError::Submit { op, rc, .. } => match op {
            IoKind::Read => BdevError::ReadDispatch {
                errno: -rc,
                offset,
                len,
            },
            IoKind::Write | IoKind::WriteZeroes => BdevError::WriteDispatch {
                errno: -rc,
                offset,
                len,
            },
            IoKind::Flush => BdevError::FlushFailed { status: rc },
        },
        SpdkError::Failed { op, .. } => match op {
            IoKind::Read => BdevError::ReadFailed {
                status: -libc::EIO,
                offset,
                len,
            },
            IoKind::Write | IoKind::WriteZeroes => BdevError::WriteFailed {
                status: -libc::EIO,
                offset,
                len,
            },
            IoKind::Flush => BdevError::FlushFailed { status: -libc::EIO },
        },
        other => BdevError::Open {
            uri: "spdk".into(),
            reason: other.to_string(),
        },
    }
}

impl Bdev for SpdkBdev {
    fn block_size(&self) -> u32 {
        self.handle.block_size()
    }
    fn block_count(&self) -> u64 {
        self.block_count
    }
    fn pool(&self) -> &DmaPool {
        &self.pool
    }

    async fn read(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError> {
        let len = buf.len() as u64;
        if !buf.is_writable() {
            return Err(BdevError::ReadOnlyBuffer);
        }
        self.io(IoKind::Read, offset, len, Some(buf))
            .await?
            .ok_or(BdevError::ReadFailed {
                status: -libc::EIO,
                offset,
                len,
            })
    }

    async fn write(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError> {
        let len = buf.len() as u64;
        // Memory SPDK did not allocate is not registered for device DMA: copy it first.
        let buf = if buf.is_writable() {
            buf
        } else {
            self.pool.alloc_copy(buf.as_slice())?
        };
        self.io(IoKind::Write, offset, len, Some(buf))
            .await?
            .ok_or(BdevError::WriteFailed {
                status: -libc::EIO,
                offset,
                len,
            })
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BdevError> {
        self.io(IoKind::WriteZeroes, offset, len, None)
            .await
            .map(drop)
    }

    async fn flush(&self) -> Result<(), BdevError> {
        if !self.flushes {
            // Every write before this has completed (the engine flushes after its writes
            // complete); nothing more to wait for on this bdev.
            return Ok(());
        }
        self.io(IoKind::Flush, 0, self.capacity(), None)
            .await
            .map(drop)
    }
}
