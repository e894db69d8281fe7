//! Registered memory of a softverbs device: a byte buffer with an rkey and a virtual
//! address range of its own.

use std::cell::RefCell;
use std::rc::Rc;

use crate::net::verbs::{MemoryRegion, RemoteAddress, VerbsError};

/// Registered memory of a [`SoftVerbs`](super::SoftVerbs) device. Dropping it deregisters it.
pub struct SoftRegion {
    pub(super) inner: Rc<RegionInner>,
}

/// The memory and keys of a region, shared with the requests that target it.
pub(super) struct RegionInner {
    pub(super) bytes: RefCell<Box<[u8]>>,
    pub(super) rkey: u32,
    /// Invariant: `base = rkey * REGION_ADDRESS_SPAN`, so addresses of regions never overlap.
    pub(super) base: u64,
    /// What peers may do through the rkey.
    pub(super) remote: crate::net::verbs::RemoteAccess,
    /// Its protection domain.
    pub(super) domain: u64,
}

impl RegionInner {
    /// Whether `[offset, offset + len)` lies inside the region.
    pub(super) fn check(&self, offset: usize, len: usize) -> Result<(), VerbsError> {
        let region_len = self.bytes.borrow().len();
        match offset.checked_add(len) {
            Some(end) if end <= region_len => Ok(()),
            _ => Err(VerbsError::OutOfRange {
                offset,
                len,
                region_len,
            }),
        }
    }

    /// The offset of `[addr, addr + len)` in this region, if it lies inside.
    pub(super) fn offset_of(&self, addr: u64, len: usize) -> Option<usize> {
        let offset = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        self.check(offset, len).ok()?;
        Some(offset)
    }

    /// Copies `data` in at `offset` (a range outside the region is ignored: callers check).
    pub(super) fn write(&self, offset: usize, data: &[u8]) {
        if let Some(target) = self.bytes.borrow_mut().get_mut(offset..offset + data.len()) {
            target.copy_from_slice(data);
        }
    }

    /// A copy of `len` bytes at `offset` (empty for a range outside the region).
    pub(super) fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        self.bytes
            .borrow()
            .get(offset..offset + len)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
}

impl MemoryRegion for SoftRegion {
    fn len(&self) -> usize {
        self.inner.bytes.borrow().len()
    }

    fn remote_address(&self, offset: usize) -> RemoteAddress {
        RemoteAddress {
            addr: self.inner.base + offset as u64,
            rkey: self.inner.rkey,
        }
    }

    fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), VerbsError> {
        self.inner.check(offset, data.len())?;
        self.inner.write(offset, data);
        Ok(())
    }

    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), VerbsError> {
        self.inner.check(offset, out.len())?;
        let bytes = self.inner.bytes.borrow();
        out.copy_from_slice(&bytes[offset..offset + out.len()]);
        Ok(())
    }
}
