//! Block devices: the seam between the engine and whatever stores the bytes.
//!
//! A [`Bdev`] reads and writes whole blocks through [`DmaBuf`]s taken by value (a dropped
//! future never frees memory the device still uses) and hands out buffers from its own
//! allocator, because a backend decides what memory it can DMA into (SPDK needs its own
//! hugepage memory). Futures are not `Send`: a bdev belongs to one shard and its completions
//! are polled on that shard's core, which is SPDK's model as much as glommio's.
//!
//! Backends are chosen in one place, [`open`], by URI: `uring:///path` (the default: io_uring
//! with O_DIRECT through glommio's DMA files) and `mem://?size=…` (memory, like SPDK's malloc
//! bdev). The SPDK backend plugs into the same trait.

pub mod fault;
pub mod inject;
mod mem;
#[cfg(feature = "spdk")]
mod spdk;
mod uring;

pub use mem::MemBdev;
#[cfg(feature = "spdk")]
pub use spdk::SpdkBdev;
pub use uring::UringBdev;

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use crate::storage::dma::{DmaBuf, DmaError, DmaPool};
use crate::units::ByteSize;

/// What a block device operation can fail with. Submission failures (the request never
/// reached the device) are told apart from completion failures (the device reported an
/// error), because only the latter may have changed the medium.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdevError {
    /// A read could not be submitted.
    #[error("read of {len} bytes at {offset} could not be submitted (errno {errno})")]
    ReadDispatch {
        /// The OS error number.
        errno: i32,
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A read was submitted and the device reported a failure (or a short read).
    #[error("read of {len} bytes at {offset} failed on the device (status {status})")]
    ReadFailed {
        /// The completion status (a negated errno, or -1 for a short transfer).
        status: i32,
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A write could not be submitted.
    #[error("write of {len} bytes at {offset} could not be submitted (errno {errno})")]
    WriteDispatch {
        /// The OS error number.
        errno: i32,
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A write was submitted and the device reported a failure (or a short write).
    #[error("write of {len} bytes at {offset} failed on the device (status {status})")]
    WriteFailed {
        /// The completion status (a negated errno, or -1 for a short transfer).
        status: i32,
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A flush failed: writes since the previous flush may not be durable.
    #[error("flush failed (status {status})")]
    FlushFailed {
        /// The completion status (a negated errno).
        status: i32,
    },
    /// The request does not lie within the device.
    #[error("{len} bytes at {offset} do not fit in the device of {capacity} bytes")]
    OutOfRange {
        /// Byte offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The device's size.
        capacity: u64,
    },
    /// Offset or length is not a multiple of the block size, or the length is zero.
    #[error("{len} bytes at {offset} are not aligned to the block size {block_size}")]
    Unaligned {
        /// Byte offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The device's block size.
        block_size: u32,
    },
    /// A read was given a buffer the device may not write into (one sharing a `Bytes`).
    #[error("a read needs a writable buffer from the device's allocator")]
    ReadOnlyBuffer,
    /// No buffer could be had.
    #[error(transparent)]
    Buffer(#[from] DmaError),
    /// The device URI names no known backend or has a bad parameter.
    #[error("bad device URI `{uri}`: {reason}")]
    BadUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The device could not be opened.
    #[error("cannot open device `{uri}`: {reason}")]
    Open {
        /// The URI as given.
        uri: String,
        /// What the system said.
        reason: String,
    },
}

/// A block device owned by one shard.
#[allow(async_fn_in_trait)] // Futures are deliberately not Send: a bdev belongs to one core.
pub trait Bdev {
    /// The unit of I/O: offsets and lengths are multiples of it.
    fn block_size(&self) -> u32;
    /// How many blocks the device has.
    fn block_count(&self) -> u64;
    /// The device's buffer allocator.
    fn pool(&self) -> &DmaPool;
    /// Reads `buf.len()` bytes at `offset` into `buf` and hands it back.
    async fn read(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError>;
    /// Writes `buf` at `offset` and hands it back. Not durable until a later [`Bdev::flush`]
    /// completes.
    async fn write(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError>;
    /// Makes `len` bytes at `offset` read as zeroes (a hole punch or an unmap where the
    /// backend can, so it costs no data transfer). Durable after the next flush.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BdevError>;
    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), BdevError>;

    /// The device's size in bytes.
    fn capacity(&self) -> u64 {
        self.block_count() * u64::from(self.block_size())
    }

    /// A zeroed buffer of `len` bytes from the device's allocator.
    fn alloc(&self, len: usize) -> Result<DmaBuf, BdevError> {
        Ok(self.pool().alloc(len)?)
    }

    /// Reads `len` bytes at `offset` into a buffer of the device's choosing (a backend whose
    /// reads land in its own memory saves zeroing one first).
    async fn read_new(&self, offset: u64, len: usize) -> Result<DmaBuf, BdevError> {
        self.read(offset, self.alloc(len)?).await
    }
}

/// Checks that `len` bytes at `offset` are block-aligned, non-empty and within the device.
pub fn check_range(offset: u64, len: u64, block_size: u32, capacity: u64) -> Result<(), BdevError> {
    let block = u64::from(block_size);
    if len == 0 || offset % block != 0 || len % block != 0 {
        return Err(BdevError::Unaligned {
            offset,
            len,
            block_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(BdevError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}

/// The backends a device URI can name.
#[derive(Debug)]
pub enum AnyBdev {
    /// `mem://?size=…`
    Mem(MemBdev),
    /// `uring:///path`
    Uring(UringBdev),
    /// `spdk://NAME` (feature `spdk`)
    #[cfg(feature = "spdk")]
    Spdk(SpdkBdev),
    /// Any of the others behind the fault injector (`[fault] injection = true`).
    Injected(Box<inject::InjectedBdev>),
}

/// What a device URI says, parsed without touching the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceUri {
    /// `mem://?size=SIZE[&block=BYTES]`
    Mem {
        /// Size in bytes.
        size: u64,
        /// Block size in bytes (default 4096).
        block_size: u32,
    },
    /// `uring:///path[?size=SIZE]`: a file (created or grown to `size` when given) or a block
    /// device.
    Uring {
        /// The file or device.
        path: std::path::PathBuf,
        /// Size to create or grow a regular file to.
        size: Option<u64>,
    },
    /// `spdk://NAME[?offset=BYTES&size=BYTES]`: an SPDK bdev, or the window of it that starts
    /// at `offset` (default 0) and holds `size` bytes (default: to the end).
    Spdk {
        /// The bdev's name.
        name: String,
        /// Where the window starts.
        offset: u64,
        /// Its size (`None`: the rest of the bdev).
        size: Option<u64>,
    },
}

impl FromStr for DeviceUri {
    type Err = BdevError;

    fn from_str(uri: &str) -> Result<DeviceUri, BdevError> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad_uri(uri, "expected SCHEME://…"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let params = UriParams::parse(uri, query)?;
        if params.offset.is_some() && scheme != "spdk" {
            return Err(bad_uri(uri, "only spdk:// takes an offset"));
        }
        DeviceUri::of_scheme(uri, scheme, path, params)
    }
}

/// The refusal of `uri`, for `reason`.
fn bad_uri(uri: &str, reason: &str) -> BdevError {
    BdevError::BadUri {
        uri: uri.to_string(),
        reason: reason.to_string(),
    }
}

/// The query parameters of a device URI.
struct UriParams {
    /// `size`, in bytes.
    size: Option<u64>,
    /// `offset`, in bytes.
    offset: Option<u64>,
    /// `block`, in bytes: a power of two from 512 to 64 KiB.
    block_size: Option<u32>,
}

impl UriParams {
    /// Parses `query` (`KEY=VALUE` pairs joined by `&`) of `uri`.
    fn parse(uri: &str, query: &str) -> Result<UriParams, BdevError> {
        let bad = |reason: &str| bad_uri(uri, reason);
        let mut size = None;
        let mut offset = None;
        let mut block_size = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad("a query parameter is not KEY=VALUE"))?;
            if key != "size" && key != "block" && key != "offset" {
                return Err(bad(&format!("unknown parameter `{key}`")));
            }
            let parsed = value
                .parse::<ByteSize>()
                .map_err(|e| bad(&format!("`{key}`: {e}")))?;
            match key {
                "size" => size = Some(parsed.bytes()),
                "offset" => offset = Some(parsed.bytes()),
                "block" => {
                    let block = u32::try_from(parsed.bytes())
                        .ok()
                        .filter(|b| b.is_power_of_two() && (512..=65536).contains(b))
                        .ok_or_else(|| bad("`block` is not a power of two from 512 to 64KiB"))?;
                    block_size = Some(block);
                }
                _ => {}
            }
        }
        Ok(UriParams {
            size,
            offset,
            block_size,
        })
    }
}

impl DeviceUri {
    /// The device `uri` names, from its scheme, path and parameters.
    fn of_scheme(
        uri: &str,
        scheme: &str,
        path: &str,
        params: UriParams,
    ) -> Result<DeviceUri, BdevError> {
        let bad = |reason: &str| bad_uri(uri, reason);
        let UriParams {
            size,
            offset,
            block_size,
        } = params;
        match scheme {
            "mem" => {
                if !path.is_empty() {
                    return Err(bad("mem:// takes no path"));
                }
                let size = size.ok_or_else(|| bad("mem:// needs ?size=…"))?;
                Ok(DeviceUri::Mem {
                    size,
                    block_size: block_size.unwrap_or(4096),
                })
            }
            "uring" => {
                if !path.starts_with('/') {
                    return Err(bad(
                        "uring:// needs an absolute path, as in uring:///dev/nvme0n1",
                    ));
                }
                if block_size.is_some() {
                    return Err(bad("uring:// takes its block size from the device"));
                }
                Ok(DeviceUri::Uring {
                    path: path.into(),
                    size,
                })
            }
            "spdk" => {
                if path.is_empty() || path.contains('/') {
                    return Err(bad("spdk:// needs a bdev name, as in spdk://Nvme0n1"));
                }
                if block_size.is_some() {
                    return Err(bad("spdk:// takes its block size from the bdev"));
                }
                Ok(DeviceUri::Spdk {
                    name: path.to_string(),
                    offset: offset.unwrap_or(0),
                    size,
                })
            }
            other => Err(bad(&format!(
                "unknown backend `{other}` (mem, uring, spdk)"
            ))),
        }
    }
}

/// Opens the device a URI names, with a DMA pool of at most `pool_bytes`. The one place where
/// a backend is chosen.
pub async fn open(uri: &str, pool_bytes: usize) -> Result<AnyBdev, BdevError> {
    match uri.parse::<DeviceUri>()? {
        DeviceUri::Mem { size, block_size } => {
            Ok(AnyBdev::Mem(MemBdev::new(size, block_size, pool_bytes)?))
        }
        DeviceUri::Uring { path, size } => Ok(AnyBdev::Uring(
            UringBdev::open(&path, size, pool_bytes)
                .await
                .map_err(|e| match e {
                    BdevError::Open { reason, .. } => BdevError::Open {
                        uri: uri.to_string(),
                        reason,
                    },
                    other => other,
                })?,
        )),
        #[cfg(feature = "spdk")]
        DeviceUri::Spdk { name, offset, size } => {
            let window = match (offset, size) {
                (0, None) => None,
                (offset, Some(size)) => Some((offset, size)),
                (_, None) => {
                    return Err(BdevError::BadUri {
                        uri: uri.to_string(),
                        reason: "an offset needs a size".into(),
                    })
                }
            };
            Ok(AnyBdev::Spdk(SpdkBdev::open(&name, window, pool_bytes)?))
        }
        #[cfg(not(feature = "spdk"))]
        DeviceUri::Spdk { .. } => Err(BdevError::BadUri {
            uri: uri.to_string(),
            reason: "the spdk backend is not part of this build (build with --features spdk)"
                .into(),
        }),
    }
}

impl Bdev for AnyBdev {
    fn block_size(&self) -> u32 {
        match self {
            AnyBdev::Mem(b) => b.block_size(),
            AnyBdev::Uring(b) => b.block_size(),
            #[cfg(feature = "spdk")]
            AnyBdev::Spdk(b) => b.block_size(),
            AnyBdev::Injected(b) => b.block_size(),
        }
    }
    fn block_count(&self) -> u64 {
        match self {
            AnyBdev::Mem(b) => b.block_count(),
            AnyBdev::Uring(b) => b.block_count(),
            #[cfg(feature = "spdk")]
            AnyBdev::Spdk(b) => b.block_count(),
            AnyBdev::Injected(b) => b.block_count(),
        }
    }
    fn pool(&self) -> &DmaPool {
        match self {
            AnyBdev::Mem(b) => b.pool(),
            AnyBdev::Uring(b) => b.pool(),
            #[cfg(feature = "spdk")]
            AnyBdev::Spdk(b) => b.pool(),
            AnyBdev::Injected(b) => b.pool(),
        }
    }
    async fn read(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError> {
        match self {
            AnyBdev::Mem(b) => b.read(offset, buf).await,
            AnyBdev::Uring(b) => b.read(offset, buf).await,
            #[cfg(feature = "spdk")]
            AnyBdev::Spdk(b) => b.read(offset, buf).await,
            AnyBdev::Injected(b) => b.read(offset, buf).await,
        }
    }
    async fn write(&self, offset: u64, buf: DmaBuf) -> Result<DmaBuf, BdevError> {
        match self {
            AnyBdev::Mem(b) => b.write(offset, buf).await,
            AnyBdev::Uring(b) => b.write(offset, buf).await,
            #[cfg(feature = "spdk")]
            AnyBdev::Spdk(b) => b.write(offset, buf).await,
            AnyBdev::Injected(b) => b.write(offset, buf).await,
        }
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BdevError> {
        match self {
            AnyBdev::Mem(b) => b.write_zeroes(offset, len).await,
            AnyBdev::Uring(b) => b.write_zeroes(offset, len).await,
            #[cfg(feature = "spdk")]
            AnyBdev::Spdk(b) => b.write_zeroes(offset, len).await,
            AnyBdev::Injected(b) => b.write_zeroes(offset, len).await,
        }
    }
    async fn flush(&self) -> Result<(), BdevError> {
        match self {
            AnyBdev::Mem(b) => b.flush().await,
            AnyBdev::Uring(b) => b.flush().await,
            #[cfg(feature = "spdk")]
            AnyBdev::Spdk(b) => b.flush().await,
            AnyBdev::Injected(b) => b.flush().await,
        }
    }
    async fn read_new(&self, offset: u64, len: usize) -> Result<DmaBuf, BdevError> {
        match self {
            AnyBdev::Mem(b) => b.read_new(offset, len).await,
            AnyBdev::Uring(b) => b.read_new(offset, len).await,
            #[cfg(feature = "spdk")]
            AnyBdev::Spdk(b) => b.read_new(offset, len).await,
            AnyBdev::Injected(b) => b.read_new(offset, len).await,
        }
    }
}

/// Lets other tasks run once, so that an in-memory device behaves like an asynchronous one
/// (requests issued together complete together, and group commit has something to group).
pub(crate) struct YieldOnce(bool);

impl YieldOnce {
    pub(crate) fn new() -> YieldOnce {
        YieldOnce(false)
    }
}

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_choose_the_backend_or_say_what_is_wrong() {
        assert_eq!(
            "mem://?size=64MiB".parse::<DeviceUri>().unwrap(),
            DeviceUri::Mem {
                size: 64 << 20,
                block_size: 4096
            }
        );
        assert_eq!(
            "uring:///tmp/x?size=1GiB".parse::<DeviceUri>().unwrap(),
            DeviceUri::Uring {
                path: "/tmp/x".into(),
                size: Some(1 << 30)
            }
        );
        for (uri, needle) in [
            ("mem://", "needs ?size"),
            ("nvme://x", "unknown backend"),
            ("uring://relative", "absolute path"),
            ("mem://?size=12XB", "size"),
            ("mem://?size=1MiB&colour=red", "unknown parameter"),
            ("mem://?size=1MiB&block=1000", "power of two"),
            ("/dev/sda", "SCHEME"),
        ] {
            let error = uri.parse::<DeviceUri>().unwrap_err().to_string();
            assert!(error.contains(needle), "{uri}: {error}");
        }
    }

    #[test]
    fn ranges_are_checked_before_any_io() {
        assert!(check_range(4096, 4096, 4096, 8192).is_ok());
        assert!(matches!(
            check_range(4096, 8192, 4096, 8192),
            Err(BdevError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX - 4095, 8192, 4096, u64::MAX),
            Err(BdevError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(100, 4096, 4096, 8192),
            Err(BdevError::Unaligned { .. })
        ));
        assert!(matches!(
            check_range(0, 0, 4096, 8192),
            Err(BdevError::Unaligned { .. })
        ));
    }
}
