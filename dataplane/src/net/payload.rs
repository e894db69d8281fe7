//! Where received payloads land. A transport reads each payload into a buffer from a
//! [`PayloadAllocator`] and hands it on as `bytes::Bytes` whose owner is that buffer, so a
//! payload can travel from the socket (or the RDMA receive) to the WAL without a copy once the
//! allocator is the storage engine's pool of aligned DMA buffers.

use std::rc::Rc;

use bytes::Bytes;
use thiserror::Error;

/// A writable buffer of exactly the length asked for, which becomes the owner of a `Bytes`.
pub trait PayloadBuffer: AsRef<[u8]> + AsMut<[u8]> + Send + 'static {}

impl<T: AsRef<[u8]> + AsMut<[u8]> + Send + 'static> PayloadBuffer for T {}

/// The allocator could not give a buffer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no payload buffer of {len} bytes: {reason}")]
pub struct AllocError {
    /// The length asked for.
    pub len: usize,
    /// Why not (pool exhausted, length beyond the pool's buffers, ...).
    pub reason: String,
}

/// Gives out payload buffers. One allocator serves one shard.
pub trait PayloadAllocator {
    /// A buffer of exactly `len` bytes (its contents are overwritten by the caller).
    fn allocate(&self, len: usize) -> Result<Box<dyn PayloadBuffer>, AllocError>;
}

/// Turns a filled buffer into `Bytes` without copying it.
pub fn freeze(buffer: Box<dyn PayloadBuffer>) -> Bytes {
    Bytes::from_owner(OwnedPayload(buffer))
}

struct OwnedPayload(Box<dyn PayloadBuffer>);

impl AsRef<[u8]> for OwnedPayload {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

/// The default allocator: heap buffers whose first byte sits on an `alignment` boundary, the
/// alignment O_DIRECT and most NICs want.
#[derive(Debug, Clone, Copy)]
pub struct AlignedHeapAllocator {
    /// Invariant: a power of two.
    alignment: usize,
}

impl AlignedHeapAllocator {
    /// Buffers aligned to `alignment` bytes (a power of two).
    pub fn new(alignment: usize) -> AlignedHeapAllocator {
        assert!(
            alignment.is_power_of_two(),
            "alignment must be a power of two"
        );
        AlignedHeapAllocator { alignment }
    }

    /// The shared default: 4 KiB alignment.
    pub fn shared_default() -> Rc<dyn PayloadAllocator> {
        Rc::new(AlignedHeapAllocator::new(4096))
    }
}

impl PayloadAllocator for AlignedHeapAllocator {
    fn allocate(&self, len: usize) -> Result<Box<dyn PayloadBuffer>, AllocError> {
        let storage_len = len.checked_add(self.alignment - 1).ok_or(AllocError {
            len,
            reason: "length overflows".into(),
        })?;
        let storage = vec![0u8; storage_len];
        let misalignment = storage.as_ptr() as usize & (self.alignment - 1);
        let start = (self.alignment - misalignment) & (self.alignment - 1);
        Ok(Box::new(AlignedHeapBuffer {
            storage,
            start,
            len,
        }))
    }
}

/// A heap buffer viewed from an aligned offset.
struct AlignedHeapBuffer {
    storage: Vec<u8>,
    /// Invariant: `start + len <= storage.len()`, and `storage[start..]` is aligned.
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for AlignedHeapBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl AsMut<[u8]> for AlignedHeapBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_exactly_sized() {
        let allocator = AlignedHeapAllocator::new(4096);
        for len in [0usize, 1, 64, 4096, 131_072] {
            let mut buffer = allocator.allocate(len).unwrap();
            assert_eq!((*buffer).as_ref().len(), len);
            if len > 0 {
                assert_eq!((*buffer).as_ref().as_ptr() as usize % 4096, 0);
                (*buffer).as_mut()[len - 1] = 7;
            }
            let bytes = freeze(buffer);
            assert_eq!(bytes.len(), len);
            if len > 0 {
                assert_eq!(bytes[len - 1], 7);
                assert_eq!(bytes.as_ptr() as usize % 4096, 0, "freeze must not copy");
            }
        }
    }
}
