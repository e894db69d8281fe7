//! `softverbs`: verbs semantics in user space, over one TCP socket per connected queue pair.
//!
//! It behaves as an RC queue pair does, so the RDMA transport tested over it is the code that
//! runs on a NIC:
//! - delivery is reliable and ordered, every request carries a packet sequence number (PSN)
//!   and is acknowledged; completions are reported in posting order;
//! - a send (or write with immediate) that finds no receive posted is refused with an RNR NAK
//!   and retried after the RNR timer, `rnr_retry` times (7: forever), go-back-N: the responder
//!   drops every later packet until the refused one comes again;
//! - RDMA write and read go to registered regions only, checked by rkey and range; a bad rkey
//!   or range completes the request with `RemoteAccessError`, a send longer than the receive
//!   buffer with `LocalLengthError` at the responder and `RemoteInvalidRequestError` at the
//!   requester; an error moves the queue pair to Error, which flushes everything outstanding
//!   with `WrFlushError`;
//! - a peer that disappears (its socket closes) fails what was in flight with
//!   `RetryExceededError`, as the transport retry timer would on a NIC.
//!
//! A device is a socket listener on one IP address. A queue pair's
//! [`QpEndpoint`](super::QpEndpoint) carries that address (`gid` = the IPv4-mapped address,
//! `lid` = the port) and its QP number; the queue pair with the lower (address, QP number)
//! dials the other when it moves to ReadyToReceive.
//!
//! Everything runs on the shard's glommio executor: posting never blocks, the socket is
//! driven by two tasks per queue pair, and completions wake the poller through a [`Notify`].
//!
//! The parts, by concern: `region` (registered memory), `cq` (completion queues), `state`
//! (a queue pair's state and its failure), `qp` (the queue-pair verbs: transitions and
//! posting), `packet` (the wire format), `requester` (transmitting requests, handling
//! their acknowledgements), `responder` (executing the peer's requests), `wire` (the socket:
//! dialling, accepting, reading and writing).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};

use super::{QpCaps, QpState, RemoteAccess, Verbs, VerbsError};
use crate::net::queue::{Latch, Notify};

mod cq;
mod packet;
mod qp;
mod region;
mod requester;
mod responder;
mod state;
mod wire;

pub use cq::SoftCq;
pub use qp::SoftQp;
pub use region::SoftRegion;

use cq::CqInner;
use region::RegionInner;
use state::QpInner;
use wire::accept_wires;

/// How long an RNR-refused request waits before it is sent again.
const RNR_DELAY: Duration = Duration::from_micros(500);
/// A wire write that makes no progress for this long means the peer is gone.
const WIRE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest packet body accepted from the wire: a request's data plus its header.
const PACKET_BODY_MAX: usize = (64 << 20) + 64;
/// Wires accepted before their queue pair reached ReadyToReceive, kept at most.
const PARKED_WIRES_MAX: usize = 256;
/// Regions are given disjoint virtual address ranges of this size (so at most 4 GiB each).
const REGION_ADDRESS_SPAN: u64 = 1 << 32;

/// A seed no peer can predict: the standard library's per-process random hash keys (taken
/// from the operating system), mixed with the time.
fn unpredictable_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.finish()
}

/// A softverbs device, through one of its protection domains.
pub struct SoftVerbs {
    device: Rc<SoftDevice>,
    /// The protection domain of the regions and queue pairs made through this handle.
    domain: u64,
}

struct SoftDevice {
    /// Where peers dial this device's queue pairs.
    addr: SocketAddr,
    regions: RefCell<HashMap<u32, Weak<RegionInner>>>,
    queue_pairs: RefCell<HashMap<u32, Weak<QpInner>>>,
    /// Wires that arrived before their queue pair was ready: destination QPN → (source QPN,
    /// stream). Invariant: at most `PARKED_WIRES_MAX` entries.
    parked_wires: RefCell<HashMap<u32, (u32, TcpStream)>>,
    /// Where rkeys come from: seeded from the operating system's randomness, so a peer
    /// cannot guess another connection's keys from its own.
    keys: RefCell<crate::rng::SplitMix64>,
    next_qp_num: Cell<u32>,
    closed: Latch,
}

impl Drop for SoftVerbs {
    fn drop(&mut self) {
        // The device closes with its last handle (each protection domain holds one).
        if Rc::strong_count(&self.device) == 1 {
            self.device.closed.set();
        }
    }
}

impl SoftVerbs {
    /// Opens a device listening on `ip` (port chosen by the system). Must run on a glommio
    /// executor: the device's tasks run there.
    pub fn open(ip: IpAddr) -> Result<SoftVerbs, VerbsError> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| VerbsError::Call {
            call: "softverbs listen",
            reason: e.to_string(),
        })?;
        let addr = listener.local_addr().map_err(|e| VerbsError::Call {
            call: "softverbs listen",
            reason: e.to_string(),
        })?;
        let device = Rc::new(SoftDevice {
            addr,
            regions: RefCell::new(HashMap::new()),
            queue_pairs: RefCell::new(HashMap::new()),
            parked_wires: RefCell::new(HashMap::new()),
            keys: RefCell::new(crate::rng::SplitMix64::new(unpredictable_seed())),
            next_qp_num: Cell::new(1),
            closed: Latch::new(),
        });
        glommio::spawn_local(accept_wires(
            Rc::downgrade(&device),
            listener,
            device.closed.clone(),
        ))
        .detach();
        let domain = device.keys.borrow_mut().next_u64();
        Ok(SoftVerbs { device, domain })
    }

    /// The socket address peers dial.
    pub fn addr(&self) -> SocketAddr {
        self.device.addr
    }
}
impl Verbs for SoftVerbs {
    type Region = SoftRegion;
    type Cq = SoftCq;
    type Qp = SoftQp;

    fn device_name(&self) -> String {
        format!("softverbs@{}", self.device.addr)
    }

    fn new_domain(&self) -> Result<SoftVerbs, VerbsError> {
        let domain = self.device.keys.borrow_mut().next_u64();
        Ok(SoftVerbs {
            device: Rc::clone(&self.device),
            domain,
        })
    }

    fn register(&self, len: usize, remote: RemoteAccess) -> Result<SoftRegion, VerbsError> {
        if len as u64 >= REGION_ADDRESS_SPAN {
            return Err(VerbsError::Call {
                call: "softverbs register",
                reason: format!("{len} bytes is beyond the 4 GiB region limit"),
            });
        }
        let mut regions = self.device.regions.borrow_mut();
        regions.retain(|_, region| region.strong_count() > 0);
        // A fresh random key no live region holds (0 is never a key).
        let rkey = loop {
            let key = self.device.keys.borrow_mut().next_u64() as u32;
            if key != 0 && !regions.contains_key(&key) {
                break key;
            }
        };
        let inner = Rc::new(RegionInner {
            bytes: RefCell::new(vec![0u8; len].into_boxed_slice()),
            rkey,
            base: u64::from(rkey) * REGION_ADDRESS_SPAN,
            remote,
            domain: self.domain,
        });
        regions.insert(rkey, Rc::downgrade(&inner));
        Ok(SoftRegion { inner })
    }

    fn create_cq(&self, depth: u32) -> Result<SoftCq, VerbsError> {
        Ok(SoftCq {
            inner: Rc::new(CqInner {
                entries: RefCell::new(VecDeque::with_capacity(depth.min(4096) as usize)),
                depth: depth.max(1),
                overrun: Cell::new(false),
                signal: Notify::new(),
            }),
        })
    }

    fn create_qp(&self, cq: &SoftCq, caps: QpCaps) -> Result<SoftQp, VerbsError> {
        let qp_num = self.device.next_qp_num.get();
        self.device.next_qp_num.set(qp_num.wrapping_add(1).max(1));
        // A deterministic start PSN per QP number: distinct enough to catch mix-ups.
        let psn_start = qp_num.wrapping_mul(0x9E37_79B9) & 0x00FF_FFFF;
        let inner = Rc::new(QpInner {
            qp_num,
            psn_start,
            caps,
            device: Rc::downgrade(&self.device),
            domain: self.domain,
            device_addr: self.device.addr,
            cq: Rc::clone(&cq.inner),
            state: Cell::new(QpState::Reset),
            remote: Cell::new(None),
            recv_queue: RefCell::new(VecDeque::new()),
            send_queue: RefCell::new(VecDeque::new()),
            in_flight: RefCell::new(VecDeque::new()),
            next_psn: Cell::new(psn_start),
            expected_psn: Cell::new(0),
            rnr_attempts: Cell::new(0),
            rnr_waiting: Cell::new(false),
            outbound: RefCell::new(VecDeque::new()),
            wake_writer: Notify::new(),
            wire_attached: Cell::new(false),
            wire_stop: Latch::new(),
        });
        let mut queue_pairs = self.device.queue_pairs.borrow_mut();
        queue_pairs.retain(|_, qp| qp.strong_count() > 0);
        queue_pairs.insert(qp_num, Rc::downgrade(&inner));
        Ok(SoftQp { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::test_kit::{listen_addr, run_case};
    use crate::net::verbs::MemoryRegion;

    /// rkeys are random, not a count a peer could continue from its own (issue 25, item 9),
    /// and two devices do not hand out the same sequence.
    #[test]
    fn rkeys_are_unpredictable() {
        run_case(Duration::from_secs(30), || async {
            let keys = |device: &SoftVerbs| -> Vec<u32> {
                let regions: Vec<SoftRegion> = (0..64)
                    .map(|_| device.register(64, RemoteAccess::None).expect("register"))
                    .collect();
                regions.iter().map(|r| r.remote_address(0).rkey).collect()
            };
            let first = keys(&SoftVerbs::open(listen_addr().ip()).expect("device"));
            let second = keys(&SoftVerbs::open(listen_addr().ip()).expect("device"));
            let distinct: std::collections::HashSet<u32> = first.iter().copied().collect();
            assert_eq!(distinct.len(), first.len(), "keys repeat");
            let steps: std::collections::HashSet<u32> =
                first.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
            assert!(steps.len() > 32, "keys follow a pattern: {first:?}");
            assert_ne!(first, second, "two devices hand out the same keys");
        });
    }
}
