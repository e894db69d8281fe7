//! What an NBD export serves: a sized, byte-addressed device. The cluster's volumes implement
//! [`Export`] (a write completes once replicated and applied); [`MemExport`] keeps its bytes in
//! memory, like the storage engine's `mem` bdev, for the demo and the protocol tests.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use super::protocol::errno;

/// A boxed future on the shard's executor.
pub type ExportFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ExportError>> + 'a>>;

/// Why an export refused or failed an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The range is past the end of the export.
    #[error("range {offset}+{len} is past the end ({size})")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// The export is read-only.
    #[error("the export is read-only")]
    ReadOnly,
    /// The device or the cluster failed the operation.
    #[error("I/O error: {0}")]
    Io(String),
    /// No space left.
    #[error("no space left")]
    NoSpace,
    /// The export does not do this.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
}

impl ExportError {
    /// The errno the NBD reply carries.
    pub fn errno(&self) -> u32 {
        match self {
            ExportError::OutOfRange { .. } => errno::EINVAL,
            ExportError::ReadOnly => errno::EPERM,
            ExportError::Io(_) => errno::EIO,
            ExportError::NoSpace => errno::ENOSPC,
            ExportError::Unsupported(_) => errno::ENOTSUP,
        }
    }
}

/// A device served over NBD. Offsets and lengths are in bytes and already checked against
/// `size()` by the server; implementations check again where they can be called otherwise.
pub trait Export {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Minimum, preferred and maximum request sizes the export wants.
    fn block_sizes(&self) -> (u32, u32, u32) {
        (1, 4096, 32 << 20)
    }
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> ExportFuture<'_, Bytes>;
    /// Writes `data` at `offset`; with `fua`, durable before it completes.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> ExportFuture<'_, ()>;
    /// Makes every completed write durable.
    fn flush(&self) -> ExportFuture<'_, ()>;
    /// Discards a range (its contents become unspecified; ours read as zeroes).
    fn trim(&self, offset: u64, len: u32) -> ExportFuture<'_, ()>;
    /// Writes zeroes over a range.
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> ExportFuture<'_, ()>;
}

/// An export whose bytes live in memory.
pub struct MemExport {
    /// Invariant: its length never changes.
    bytes: RefCell<Vec<u8>>,
    read_only: bool,
}

impl MemExport {
    /// A zeroed export of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> MemExport {
        MemExport {
            bytes: RefCell::new(vec![0; size as usize]),
            read_only,
        }
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, ExportError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(ExportError::OutOfRange { offset, len, size }),
        }
    }

    fn writable(&self) -> Result<(), ExportError> {
        if self.read_only {
            Err(ExportError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.bytes.borrow().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, len: u32) -> ExportFuture<'_, Bytes> {
        let result = self
            .range(offset, u64::from(len))
            .map(|range| Bytes::copy_from_slice(&self.bytes.borrow()[range]));
        Box::pin(async move { result })
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> ExportFuture<'_, ()> {
        let result = self
            .writable()
            .and_then(|()| self.range(offset, data.len() as u64))
            .map(|range| {
                self.bytes.borrow_mut()[range].copy_from_slice(&data);
            });
        Box::pin(async move { result })
    }

    fn flush(&self) -> ExportFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, offset: u64, len: u32) -> ExportFuture<'_, ()> {
        self.write_zeroes(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> ExportFuture<'_, ()> {
        let result = self
            .writable()
            .and_then(|()| self.range(offset, u64::from(len)))
            .map(|range| {
                self.bytes.borrow_mut()[range].fill(0);
            });
        Box::pin(async move { result })
    }
}
