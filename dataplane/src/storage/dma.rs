//! DMA buffers: aligned memory that a device may read or write directly.
//!
//! A [`DmaBuf`] owns its memory, so I/O takes it by value and a dropped future can never free
//! memory the device is still using. Memory comes from a bounded per-shard [`DmaPool`]; when the
//! bound is reached the answer is an error (back-pressure), never growth.
//!
//! A buffer converts to `bytes::Bytes` without a copy ([`DmaBuf::into_bytes`]), and a `Bytes`
//! whose pointer and length are already aligned converts back without a copy
//! ([`DmaBuf::from_bytes`]): the buffer then holds the `Bytes` alive for as long as the device
//! may read it. That is how a payload received from the network reaches the WAL and the chunk
//! as the same memory.
//!
//! This module and `ffi/` are the only places with `unsafe`.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// Why a buffer could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// The pool's bound would be exceeded.
    #[error("DMA pool exhausted: {requested} bytes requested, {in_use} of {limit} in use")]
    PoolExhausted {
        /// Bytes asked for.
        requested: usize,
        /// Bytes already handed out.
        in_use: usize,
        /// The pool's bound.
        limit: usize,
    },
    /// A zero-length buffer, or an alignment that is not a power of two.
    #[error("invalid DMA buffer request: {len} bytes aligned to {align}")]
    InvalidRequest {
        /// Bytes asked for.
        len: usize,
        /// Alignment asked for.
        align: usize,
    },
    /// The system allocator refused.
    #[error("the allocator could not provide {len} bytes aligned to {align}")]
    OutOfMemory {
        /// Bytes asked for.
        len: usize,
        /// Alignment asked for.
        align: usize,
    },
}

/// Accounting shared by a pool and every buffer it handed out. Atomic because a buffer turned
/// into `Bytes` may be dropped on another thread (a `Bytes` is `Send`).
#[derive(Debug)]
struct PoolAccount {
    /// Invariant: `in_use <= limit` after every successful allocation.
    in_use: AtomicUsize,
    limit: usize,
}

/// A bounded source of aligned memory for one shard.
#[derive(Debug, Clone)]
pub struct DmaPool {
    account: Arc<PoolAccount>,
    align: usize,
    /// Memory comes from SPDK's DMA allocator (pinned and registered for devices), and a
    /// `Bytes` from elsewhere is always copied in rather than wrapped.
    spdk: bool,
    /// Freed SPDK blocks kept for reuse: SPDK's allocator (DPDK's heap) costs far more per
    /// call than the I/O it serves, so blocks go round as SPDK's own mempools do.
    #[cfg(feature = "spdk")]
    cache: Arc<SpdkCache>,
}

/// SPDK blocks freed and kept for the next allocation of the same size and alignment.
#[cfg(feature = "spdk")]
#[derive(Debug, Default)]
struct SpdkCache {
    free: std::sync::Mutex<std::collections::HashMap<(usize, usize), Vec<ffi::spdk::DmaBlock>>>,
    bytes: AtomicUsize,
}

#[cfg(feature = "spdk")]
impl SpdkCache {
    /// Most bytes kept for reuse per pool; beyond it freed blocks go back to SPDK.
    const LIMIT: usize = 64 << 20;

    fn take(&self, len: usize, align: usize) -> Option<ffi::spdk::DmaBlock> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let block = free.get_mut(&(len, align))?.pop()?;
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        Some(block)
    }

    fn put(&self, align: usize, block: ffi::spdk::DmaBlock) {
        let len = block.len();
        if self.bytes.load(Ordering::Relaxed) + len > Self::LIMIT {
            return; // dropped: freed to SPDK
        }
        self.bytes.fetch_add(len, Ordering::Relaxed);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.entry((len, align)).or_default().push(block);
    }
}

impl DmaPool {
    /// A pool that hands out at most `limit` bytes at a time, aligned to `align` (a power of
    /// two, at least the device's block size).
    pub fn new(limit: usize, align: usize) -> Result<DmaPool, DmaError> {
        if !align.is_power_of_two() {
            return Err(DmaError::InvalidRequest { len: 0, align });
        }
        Ok(DmaPool {
            account: Arc::new(PoolAccount {
                in_use: AtomicUsize::new(0),
                limit,
            }),
            align,
            spdk: false,
            #[cfg(feature = "spdk")]
            cache: Arc::default(),
        })
    }

    /// A pool whose memory comes from SPDK's DMA allocator (the environment must be up).
    #[cfg(feature = "spdk")]
    pub fn spdk(limit: usize, align: usize) -> Result<DmaPool, DmaError> {
        let mut pool = DmaPool::new(limit, align)?;
        pool.spdk = true;
        Ok(pool)
    }

    /// The alignment of every buffer of this pool.
    pub fn align(&self) -> usize {
        self.align
    }

    /// Bytes currently handed out.
    pub fn in_use(&self) -> usize {
        self.account.in_use.load(Ordering::Relaxed)
    }

    /// A zero-filled buffer of `len` bytes (rounded up to the alignment for the allocation; the
    /// buffer's length is `len`).
    pub fn alloc(&self, len: usize) -> Result<DmaBuf, DmaError> {
        Ok(DmaBuf {
            storage: Storage::Owned(self.reserve(len, true)?),
            len,
        })
    }

    /// A buffer holding a copy of `source`, without zeroing the memory first (for reads that
    /// arrive in another buffer, as glommio's do).
    pub fn alloc_copy(&self, source: &[u8]) -> Result<DmaBuf, DmaError> {
        let len = source.len();
        let block = self.reserve(len, false)?;
        // SAFETY: `block.ptr` points to a fresh allocation of `layout.size() >= len` bytes
        // that nothing else references, and `source` cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(source.as_ptr(), block.ptr.as_ptr(), len) };
        Ok(DmaBuf {
            storage: Storage::Owned(block),
            len,
        })
    }

    /// Takes `len` bytes (rounded up to the alignment) from the pool's bound and allocates
    /// them, zeroed or not.
    fn reserve(&self, len: usize, zeroed: bool) -> Result<OwnedBlock, DmaError> {
        let align = self.align;
        let invalid = DmaError::InvalidRequest { len, align };
        if len == 0 {
            return Err(invalid);
        }
        let capacity = len.checked_next_multiple_of(align).ok_or(invalid.clone())?;
        let layout = Layout::from_size_align(capacity, align).map_err(|_| invalid)?;
        let account = &self.account;
        let mut in_use = account.in_use.load(Ordering::Relaxed);
        loop {
            let next = in_use.saturating_add(capacity);
            if next > account.limit {
                return Err(DmaError::PoolExhausted {
                    requested: capacity,
                    in_use,
                    limit: account.limit,
                });
            }
            match account.in_use.compare_exchange_weak(
                in_use,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => in_use = seen,
            }
        }
        #[cfg(feature = "spdk")]
        if self.spdk {
            let block = match self.cache.take(capacity, align) {
                Some(block) => Ok(block),
                None => ffi::spdk::DmaBlock::new(capacity, align, false),
            };
            return match block {
                Ok(block) => {
                    if zeroed {
                        // SAFETY: the block owns `capacity` writable bytes at `as_ptr()`, and
                        // nothing else references them (fresh, or taken from the cache).
                        unsafe { std::ptr::write_bytes(block.as_ptr().as_ptr(), 0, capacity) };
                    }
                    Ok(OwnedBlock {
                        ptr: block.as_ptr(),
                        layout,
                        account: Arc::clone(account),
                        spdk: Some((block, Arc::clone(&self.cache))),
                    })
                }
                Err(_) => {
                    account.in_use.fetch_sub(capacity, Ordering::Relaxed);
                    Err(DmaError::OutOfMemory { len, align })
                }
            };
        }
        let raw = if zeroed {
            // SAFETY: `layout` has a non-zero size (len > 0) and a power-of-two alignment.
            unsafe { std::alloc::alloc_zeroed(layout) }
        } else {
            // SAFETY: as above; the caller initializes the memory before anyone reads it.
            unsafe { std::alloc::alloc(layout) }
        };
        match NonNull::new(raw) {
            Some(ptr) => Ok(OwnedBlock {
                ptr,
                layout,
                account: Arc::clone(account),
                #[cfg(feature = "spdk")]
                spdk: None,
            }),
            None => {
                account.in_use.fetch_sub(capacity, Ordering::Relaxed);
                Err(DmaError::OutOfMemory { len, align })
            }
        }
    }

    /// A buffer holding `bytes`: the same memory when it is aligned to this pool's alignment
    /// (pointer and length), otherwise a copy in pool memory.
    pub fn from_bytes_or_copy(&self, bytes: Bytes) -> Result<DmaBuf, DmaError> {
        let wrapped = if self.spdk {
            Err(bytes)
        } else {
            DmaBuf::from_bytes(bytes, self.align)
        };
        match wrapped {
            Ok(buf) => Ok(buf),
            Err(bytes) => {
                let mut buf = self.alloc(bytes.len())?;
                buf.as_mut_slice()
                    .ok_or(DmaError::InvalidRequest {
                        len: bytes.len(),
                        align: self.align,
                    })?
                    .copy_from_slice(&bytes);
                Ok(buf)
            }
        }
    }
}

/// Memory allocated by a pool, freed (and returned to the pool's account) on drop.
#[derive(Debug)]
struct OwnedBlock {
    ptr: NonNull<u8>,
    layout: Layout,
    account: Arc<PoolAccount>,
    /// SPDK memory, which goes back to its pool's cache (or frees itself); `ptr` points
    /// into it.
    #[cfg(feature = "spdk")]
    spdk: Option<(ffi::spdk::DmaBlock, Arc<SpdkCache>)>,
}

// SAFETY: the block is the only owner of its allocation (nothing else holds `ptr`), the global
// allocator may free it from any thread, and the account it returns bytes to is atomic.
unsafe impl Send for OwnedBlock {}
// SAFETY: shared access only ever reads the memory (`&self` methods give out `&[u8]`).
unsafe impl Sync for OwnedBlock {}

impl Drop for OwnedBlock {
    fn drop(&mut self) {
        #[cfg(feature = "spdk")]
        let heap = match self.spdk.take() {
            Some((block, cache)) => {
                cache.put(self.layout.align(), block);
                false
            }
            None => true,
        };
        #[cfg(not(feature = "spdk"))]
        let heap = true;
        if heap {
            // SAFETY: `ptr` came from `alloc` or `alloc_zeroed` with `self.layout` and is
            // freed exactly once, here.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
        }
        self.account
            .in_use
            .fetch_sub(self.layout.size(), Ordering::Relaxed);
    }
}

#[derive(Debug)]
enum Storage {
    /// Pool memory, writable.
    Owned(OwnedBlock),
    /// Memory owned by a `Bytes` that is already aligned; read-only.
    Shared(Bytes),
}

/// An aligned buffer that I/O takes by value.
///
/// Invariant: the memory starts at an address aligned to the pool's (or the caller's)
/// alignment, and `len` bytes of it are initialized (zeroed at allocation, or copied in).
#[derive(Debug)]
pub struct DmaBuf {
    storage: Storage,
    len: usize,
}

impl DmaBuf {
    /// Wraps `bytes` without copying when its address and length are multiples of `align`;
    /// gives it back otherwise.
    pub fn from_bytes(bytes: Bytes, align: usize) -> Result<DmaBuf, Bytes> {
        let aligned = align.is_power_of_two()
            && !bytes.is_empty()
            && (bytes.as_ptr() as usize) % align == 0
            && bytes.len() % align == 0;
        if aligned {
            let len = bytes.len();
            Ok(DmaBuf {
                storage: Storage::Shared(bytes),
                len,
            })
        } else {
            Err(bytes)
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes (never true for a buffer from a pool).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the device may write into it (pool memory, not a shared `Bytes`).
    pub fn is_writable(&self) -> bool {
        matches!(self.storage, Storage::Owned(_))
    }

    /// Its bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.storage {
            // SAFETY: the block holds at least `len` initialized bytes (zeroed or copied in at
            // allocation; see the invariant), owned by `self` for the lifetime of the borrow.
            Storage::Owned(block) => unsafe {
                std::slice::from_raw_parts(block.ptr.as_ptr(), self.len)
            },
            Storage::Shared(bytes) => &bytes[..self.len.min(bytes.len())],
        }
    }

    /// Its bytes, writable; `None` for a buffer that shares a `Bytes` (read-only memory).
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        match &mut self.storage {
            Storage::Owned(block) => {
                // SAFETY: as in `as_slice`, and `&mut self` guarantees no other borrow exists.
                let slice = unsafe { std::slice::from_raw_parts_mut(block.ptr.as_ptr(), self.len) };
                Some(slice)
            }
            Storage::Shared(_) => None,
        }
    }

    /// Shortens the buffer to `len` bytes (no effect when `len` is not shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Turns the buffer into `Bytes` without copying. The memory goes back to its pool when
    /// the last clone of the `Bytes` is dropped.
    pub fn into_bytes(self) -> Bytes {
        match self.storage {
            Storage::Shared(bytes) => bytes.slice(..self.len.min(bytes.len())),
            Storage::Owned(_) => Bytes::from_owner(self),
        }
    }
}

// SAFETY: a writable buffer's memory is its pool block, which stays at its address until the
// buffer is dropped (moves move only the handle); a shared buffer's memory is held by its
// `Bytes` for as long; `len` bytes of either are valid. A shared buffer gives no mutable
// pointer, so the device never writes into memory a `Bytes` shares.
#[cfg(feature = "spdk")]
unsafe impl ffi::spdk::IoBuffer for DmaBuf {
    fn io_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }
    fn io_mut_ptr(&mut self) -> Option<*mut u8> {
        self.as_mut_slice().map(|s| s.as_mut_ptr())
    }
    fn io_len(&self) -> usize {
        self.len
    }
}

impl AsRef<[u8]> for DmaBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_accounted() {
        let pool = DmaPool::new(64 << 10, 4096).unwrap();
        let buf = pool.alloc(100).unwrap();
        assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0);
        assert_eq!(buf.len(), 100);
        assert!(buf.as_slice().iter().all(|b| *b == 0));
        assert_eq!(pool.in_use(), 4096);
        drop(buf);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn the_pool_bound_is_back_pressure_not_growth() {
        let pool = DmaPool::new(8192, 4096).unwrap();
        let a = pool.alloc(4096).unwrap();
        let _b = pool.alloc(4096).unwrap();
        assert!(matches!(
            pool.alloc(1),
            Err(DmaError::PoolExhausted { limit: 8192, .. })
        ));
        drop(a);
        assert!(pool.alloc(4096).is_ok());
    }

    #[test]
    fn a_buffer_round_trips_through_bytes_without_a_copy() {
        let pool = DmaPool::new(1 << 20, 4096).unwrap();
        let mut buf = pool.alloc(8192).unwrap();
        buf.as_mut_slice().unwrap()[..5].copy_from_slice(b"hello");
        let address = buf.as_slice().as_ptr();
        let bytes = buf.into_bytes();
        assert_eq!(bytes.as_ptr(), address);
        assert_eq!(pool.in_use(), 8192, "the Bytes keeps the memory");
        let clone = bytes.clone();
        let back = pool.from_bytes_or_copy(bytes).unwrap();
        assert_eq!(
            back.as_slice().as_ptr(),
            address,
            "aligned Bytes is not copied"
        );
        assert!(!back.is_writable());
        assert_eq!(&back.as_slice()[..5], b"hello");
        drop(back);
        drop(clone);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn a_copy_needs_no_zeroing_and_is_accounted() {
        let pool = DmaPool::new(1 << 20, 4096).unwrap();
        let source: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let copy = pool.alloc_copy(&source).unwrap();
        assert_eq!(copy.as_slice(), &source[..]);
        assert_eq!(copy.as_slice().as_ptr() as usize % 4096, 0);
        assert_eq!(pool.in_use(), 8192);
        drop(copy);
        assert_eq!(pool.in_use(), 0);
        assert!(pool.alloc_copy(&[]).is_err());
    }

    #[test]
    fn unaligned_bytes_are_copied_into_pool_memory() {
        let pool = DmaPool::new(1 << 20, 4096).unwrap();
        let bytes = Bytes::from(vec![7u8; 4097]).slice(1..);
        let buf = pool.from_bytes_or_copy(bytes.clone()).unwrap();
        assert_eq!(buf.as_slice(), &bytes[..]);
        assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0);
    }

    #[test]
    fn bytes_may_be_dropped_on_another_thread() {
        let pool = DmaPool::new(1 << 20, 4096).unwrap();
        let bytes = pool.alloc(4096).unwrap().into_bytes();
        std::thread::spawn(move || drop(bytes)).join().unwrap();
        assert_eq!(pool.in_use(), 0);
    }
}
