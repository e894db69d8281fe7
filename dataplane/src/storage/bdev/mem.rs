//! A device in memory, like SPDK's malloc bdev: for tests, the demo and the crash simulator.

use std::cell::RefCell;
use std::rc::Rc;

use super::{check_range, Bdev, BdevError, YieldOnce};
use crate::storage::dma::{DmaBuf, DmaPool};

/// A device whose blocks live in memory. Clones share the same memory, so a test can keep a
/// handle to a device an engine owns.
#[derive(Debug, Clone)]
pub struct MemBdev {
    /// Invariant: its length is a non-zero multiple of `block_size`.
    memory: Rc<RefCell<Vec<u8>>>,
    block_size: u32,
    pool: DmaPool,
}

impl MemBdev {
    /// A zero-filled device of `size` bytes (a non-zero multiple of `block_size`).
    pub fn new(size: u64, block_size: u32, pool_bytes: usize) -> Result<MemBdev, BdevError> {
        let len = usize::try_from(size).map_err(|_| BdevError::OutOfRange {
            offset: 0,
            len: size,
            capacity: usize::MAX as u64,
        })?;
        MemBdev::from_image(vec![0; len], block_size, pool_bytes)
    }

    /// A device holding `image` (say, what a crash left of another device).
    pub fn from_image(
        image: Vec<u8>,
        block_size: u32,
        pool_bytes: usize,
    ) -> Result<MemBdev, BdevError> {
        let size = image.len() as u64;
        if !block_size.is_power_of_two() || size == 0 || size % u64::from(block_size) != 0 {
            return Err(BdevError::Unaligned {
                offset: 0,
                len: size,
                block_size,
            });
        }
        Ok(MemBdev {
            memory: Rc::new(RefCell::new(image)),
            block_size,
            pool: DmaPool::new(pool_bytes, block_size as usize)?,
        })
    }

    /// A copy of every byte on the device.
    pub fn image(&self) -> Vec<u8> {
        self.memory.borrow().clone()
    }

    /// Runs `f` over the device's bytes (for fault injection and tests).
    pub fn with_image<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        f(&mut self.memory.borrow_mut())
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, BdevError> {
        check_range(offset, len as u64, self.block_size, self.capacity())?;
        // Both fit in usize: the range lies within a Vec.
        Ok(offset as usize..offset as usize + len)
    }
}

impl Bdev for MemBdev {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn block_count(&self) -> u64 {
        self.memory.borrow().len() as u64 / u64::from(self.block_size)
    }
    fn pool(&self) -> &DmaPool {
        &self.pool
    }

    async fn read(&self, offset: u64, mut buf: DmaBuf) -> Result<DmaBuf, BdevError> {
        let range = self.range(offset, buf.len())?;
        YieldOnce::new().await;
        let target = buf.as_mut_slice().ok_or(BdevError::ReadOnlyBuffer)?;
        let memory = self.memory.borrow();
        let source = memory.get(range).ok_or(BdevError::ReadFailed {
            status: -1,
            offset,
            len: target.len() as u64,
        })?;
        target.copy_from_slice(source);
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError> {
        let range = self.range(offset, buf.len())?;
        YieldOnce::new().await;
        let mut memory = self.memory.borrow_mut();
        let target = memory.get_mut(range).ok_or(BdevError::WriteFailed {
            status: -1,
            offset,
            len: buf.len() as u64,
        })?;
        target.copy_from_slice(buf.as_slice());
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BdevError> {
        let size = usize::try_from(len).map_err(|_| BdevError::OutOfRange {
            offset,
            len,
            capacity: self.capacity(),
        })?;
        let range = self.range(offset, size)?;
        YieldOnce::new().await;
        if let Some(target) = self.memory.borrow_mut().get_mut(range) {
            target.fill(0);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BdevError> {
        YieldOnce::new().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn what_is_written_is_read_back() {
        let bdev = MemBdev::new(1 << 20, 512, 1 << 20).unwrap();
        block_on(async {
            let mut buf = bdev.alloc(1024).unwrap();
            buf.as_mut_slice().unwrap().fill(0xab);
            bdev.write(512, buf).await.unwrap();
            let back = bdev.read(0, bdev.alloc(2048).unwrap()).await.unwrap();
            assert!(back.as_slice()[..512].iter().all(|b| *b == 0));
            assert!(back.as_slice()[512..1536].iter().all(|b| *b == 0xab));
            bdev.write_zeroes(1024, 512).await.unwrap();
            let back = bdev.read(1024, bdev.alloc(512).unwrap()).await.unwrap();
            assert!(back.as_slice().iter().all(|b| *b == 0));
        });
    }

    #[test]
    fn bad_requests_change_nothing() {
        let bdev = MemBdev::new(4096, 512, 1 << 20).unwrap();
        block_on(async {
            let mut buf = bdev.alloc(1024).unwrap();
            buf.as_mut_slice().unwrap().fill(1);
            let error = bdev.write(3584, buf).await.unwrap_err();
            assert!(matches!(error, BdevError::OutOfRange { .. }), "{error}");
            let buf = bdev.alloc(100).unwrap();
            assert!(matches!(
                bdev.write(0, buf).await,
                Err(BdevError::Unaligned { .. })
            ));
        });
        assert!(bdev.image().iter().all(|b| *b == 0));
    }
}
