//! The wire of a softverbs queue pair: one TCP connection to the peer queue pair, dialled by
//! the lower (address, QP number) and accepted by the other's device, then driven by a reader
//! task and a writer task.

use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::Duration;

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::packet::{PACKET_READ_REQUEST, PACKET_SEND, PACKET_WRITE};
use super::state::QpInner;
use super::{SoftDevice, PACKET_BODY_MAX, PARKED_WIRES_MAX, WIRE_WRITE_TIMEOUT};
use crate::net::queue::Latch;
use crate::net::tcp::SharedStream;
use crate::net::verbs::{QpState, WcStatus};

/// Accepts the wires peers dial to this device, until it closes: each is handed to its
/// queue pair, or parked until that queue pair expects it.
pub(super) async fn accept_wires(device: Weak<SoftDevice>, listener: TcpListener, closed: Latch) {
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            closed.wait().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { return };
        let Ok(mut stream) = accepted else { continue };
        let mut hello = [0u8; 8];
        let read = future::or(
            async { stream.read_exact(&mut hello).await.is_ok() },
            async {
                glommio::timer::sleep(Duration::from_secs(5)).await;
                false
            },
        )
        .await;
        if !read {
            continue;
        }
        let destination = u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]]);
        let source = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]);
        let Some(device) = device.upgrade() else {
            return;
        };
        let qp = device
            .queue_pairs
            .borrow()
            .get(&destination)
            .and_then(Weak::upgrade);
        match qp {
            Some(qp) if qp.expects_wire_from(source) => qp.attach_wire(stream),
            _ => {
                let mut parked = device.parked_wires.borrow_mut();
                if parked.len() >= PARKED_WIRES_MAX {
                    debug!("softverbs: too many unclaimed wires, dropping one");
                    if let Some(key) = parked.keys().next().copied() {
                        parked.remove(&key);
                    }
                }
                parked.insert(destination, (source, stream));
            }
        }
    }
}

/// Dials the wire to the remote queue pair and attaches it; failing that, the queue pair
/// fails as a NIC's would when the peer never answers.
pub(super) async fn dial_wire(qp: Rc<QpInner>, addr: SocketAddr, remote_qp_num: u32) {
    let connected = TcpStream::connect_timeout(addr, Duration::from_secs(5)).await;
    let mut stream = match connected {
        Ok(stream) => stream,
        Err(error) => {
            debug!(qp = qp.qp_num, %addr, %error, "softverbs: cannot reach the remote queue pair");
            qp.fail(Some(WcStatus::RetryExceededError));
            return;
        }
    };
    let mut hello = [0u8; 8];
    hello[0..4].copy_from_slice(&remote_qp_num.to_le_bytes());
    hello[4..8].copy_from_slice(&qp.qp_num.to_le_bytes());
    if stream.write_all(&hello).await.is_err() {
        qp.fail(Some(WcStatus::RetryExceededError));
        return;
    }
    qp.attach_wire(stream);
}

impl QpInner {
    /// Whether a wire from queue pair `source` is the one this queue pair waits for.
    pub(super) fn expects_wire_from(&self, source: u32) -> bool {
        !self.wire_attached.get()
            && matches!(
                self.state.get(),
                QpState::ReadyToReceive | QpState::ReadyToSend
            )
            && self.remote.get().map(|r| r.qp_num) == Some(source)
    }

    /// Starts the reader and writer tasks on `stream`, unless a wire is already attached or
    /// the queue pair is closing.
    pub(super) fn attach_wire(self: &Rc<Self>, stream: TcpStream) {
        if self.wire_attached.replace(true) || self.wire_stop.is_set() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let stream = SharedStream::new(stream.buffered());
        glommio::spawn_local(read_wire(Rc::clone(self), stream.clone())).detach();
        glommio::spawn_local(write_wire(Rc::clone(self), stream)).detach();
    }

    /// The wire broke: what was outstanding can never be acknowledged.
    fn wire_lost(&self) {
        if self.state.get() != QpState::Error {
            debug!(
                qp = self.qp_num,
                "softverbs: wire to the remote queue pair lost"
            );
            self.fail(Some(WcStatus::RetryExceededError));
        }
    }
}

/// Reads packets from the wire and hands them to the responder or the requester, until the
/// wire ends, a packet is malformed or the queue pair stops its wire.
async fn read_wire(qp: Rc<QpInner>, mut stream: SharedStream) {
    let stop = qp.wire_stop.clone();
    let read = async {
        let mut length = [0u8; 4];
        loop {
            if stream.read_exact(&mut length).await.is_err() {
                return;
            }
            let body_len = u32::from_le_bytes(length) as usize;
            if !(5..=PACKET_BODY_MAX).contains(&body_len) {
                debug!(
                    qp = qp.qp_num,
                    body_len, "softverbs: malformed packet length"
                );
                return;
            }
            let mut body = vec![0u8; body_len];
            if stream.read_exact(&mut body).await.is_err() {
                return;
            }
            let kind = body[0];
            let psn = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
            let rest = &body[5..];
            let understood = match kind {
                PACKET_SEND | PACKET_WRITE | PACKET_READ_REQUEST => qp.on_request(kind, psn, rest),
                _ => qp.on_response(kind, psn, rest),
            };
            if !understood {
                debug!(
                    qp = qp.qp_num,
                    kind, psn, "softverbs: protocol violation from the peer"
                );
                return;
            }
            glommio::yield_if_needed().await;
        }
    };
    future::or(read, stop.wait()).await;
    qp.wire_lost();
    qp.wire_stop.set();
    qp.wake_writer.notify();
}

/// Writes queued packets to the wire, in batches, until the queue pair stops its wire or a
/// write fails or stalls.
async fn write_wire(qp: Rc<QpInner>, mut stream: SharedStream) {
    let stop = qp.wire_stop.clone();
    let mut batch = Vec::new();
    loop {
        qp.admit_sends();
        batch.clear();
        {
            let mut outbound = qp.outbound.borrow_mut();
            while let Some(packet) = outbound.pop_front() {
                batch.extend_from_slice(&packet);
                if batch.len() >= 1 << 20 {
                    break;
                }
            }
        }
        if batch.is_empty() {
            if stop.is_set() {
                break;
            }
            future::or(qp.wake_writer.notified(), stop.wait()).await;
            continue;
        }
        // Not raced with `stop`: a NAK queued just before the queue pair failed must still
        // reach the peer. The peer's reader never blocks, so only a dead peer stalls this.
        let written = future::or(async { stream.write_all(&batch).await.is_ok() }, async {
            glommio::timer::sleep(WIRE_WRITE_TIMEOUT).await;
            false
        })
        .await;
        if !written {
            break;
        }
    }
    let _ = stream.close().await;
    qp.wire_lost();
    stop.set();
}
