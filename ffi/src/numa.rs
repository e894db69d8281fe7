//! Memory placement: binding a thread's memory to one NUMA node (`set_mempolicy(2)`), so that
//! a shard's allocations come from the node its cores belong to.

/// The highest node number [`bind_thread_memory`] accepts, plus one (the node mask it passes
/// is this many bits).
pub const MAX_NODES: u32 = 1024;

/// `MPOL_BIND` from `<linux/mempolicy.h>`: allocate only from the nodes in the mask.
const MPOL_BIND: libc::c_int = 2;

/// Binds the calling thread's future allocations to NUMA node `node`. Memory already touched
/// stays where it is, so call this first thing on a shard's thread.
pub fn bind_thread_memory(node: u32) -> std::io::Result<()> {
    if node >= MAX_NODES - 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "NUMA node {node} is out of range (at most {})",
                MAX_NODES - 2
            ),
        ));
    }
    let mut mask = [0u64; (MAX_NODES / 64) as usize];
    mask[(node / 64) as usize] |= 1 << (node % 64);
    // SAFETY: set_mempolicy reads at most `maxnode` (MAX_NODES) bits from `mask`, a live array
    // of exactly MAX_NODES bits borrowed for the call; it changes only this thread's policy
    // and keeps no pointer to the mask.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_set_mempolicy,
            MPOL_BIND,
            mask.as_ptr(),
            libc::c_ulong::from(MAX_NODES),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_binds_to_node_zero_and_an_absurd_node_is_refused() {
        // Node 0 exists on every Linux host; bind a thread of our own, not the test runner's.
        let bound = std::thread::spawn(|| bind_thread_memory(0))
            .join()
            .expect("thread");
        assert!(bound.is_ok(), "{bound:?}");
        let refused = std::thread::spawn(|| bind_thread_memory(MAX_NODES))
            .join()
            .expect("thread");
        assert_eq!(
            refused.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::InvalidInput)
        );
        // A node this host does not have: the kernel refuses it.
        let missing = std::thread::spawn(|| bind_thread_memory(MAX_NODES - 2))
            .join()
            .expect("thread");
        assert!(missing.is_err(), "{missing:?}");
    }
}
