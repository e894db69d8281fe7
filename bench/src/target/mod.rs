//! What a job runs against. Each target executes the operations the workload hands out; the
//! runner measures them. `raw` is the baseline every other figure is compared with.

pub mod cluster;
pub mod engine;
pub mod nbd;
pub mod raw;

use std::io;
use std::ops::Deref;

/// A buffer a target writes from: allocated by the target, so that it meets the target's
/// alignment (O_DIRECT, DMA) without a copy.
pub trait WriteBuffer {
    /// The bytes to fill.
    fn as_bytes_mut(&mut self) -> &mut [u8];
}

/// Something a job can run against. Methods run on the clone's glommio executor.
#[allow(async_fn_in_trait)] // used only in this crate, on single-threaded executors
pub trait Target {
    /// The buffer type writes take.
    type Buffer: WriteBuffer;
    /// What reads return.
    type ReadData: Deref<Target = [u8]>;
    /// A buffer of `len` bytes for a write.
    fn alloc(&self, len: usize) -> Self::Buffer;
    /// Writes `data` at `offset`; complete means the target acknowledged it.
    async fn write(&self, offset: u64, data: Self::Buffer) -> io::Result<()>;
    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> io::Result<Self::ReadData>;
    /// Makes every completed write durable.
    async fn sync(&self) -> io::Result<()>;
}
