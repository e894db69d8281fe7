//! Listening sockets that own their port.
//!
//! glommio's `TcpListener::bind` sets `SO_REUSEPORT`, so a second listener on a port already
//! listened on binds without error and the kernel splits new connections between the two. A
//! second chunkserver started by mistake with the same configuration would take a share of
//! its peers' and clients' connections; a listener left open by a server that stopped in the
//! same process would swallow some and never answer them. [`listen`] refuses, with "address
//! in use", a port the kernel's socket table (`/proc/net/tcp`, `/proc/net/tcp6`) shows a
//! listener on, then binds. (A plain bind without `SO_REUSEPORT` would not do: sockets left
//! from a process killed a moment ago hold the port against it, though nothing listens.)

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use glommio::net::TcpListener;

/// A listener on `addr` that fails with `AddrInUse` when something already listens there.
/// Port 0 picks a free port, as usual.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    if addr.port() != 0 {
        let tables = ["/proc/net/tcp", "/proc/net/tcp6"];
        // Without the tables (no procfs) the check is skipped: the bind decides alone.
        let taken = tables
            .iter()
            .filter_map(|table| std::fs::read_to_string(table).ok())
            .flat_map(|text| listening(&text))
            .find(|listener| conflicts(*listener, addr));
        if let Some(listener) = taken {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("address in use: a socket already listens on {listener}"),
            ));
        }
    }
    TcpListener::bind(addr).map_err(io::Error::from)
}

/// Wakes an accept pending on the listener at `addr` with a connection of its own, which
/// the accepting loop, told to stop, drops. A loop must not stop by abandoning its accept:
/// glommio hands an accept that cannot complete at once to io_uring, and one the kernel
/// completes after it was abandoned leaves an accepted socket that nobody owns or closes (a
/// peer's connection that stays open for good), while the pending operation keeps the
/// listening socket itself alive.
pub async fn wake(addr: SocketAddr) {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let connect = glommio::net::TcpStream::connect_timeout(
        SocketAddr::new(ip, addr.port()),
        std::time::Duration::from_secs(1),
    );
    if let Err(error) = connect.await {
        tracing::debug!(%addr, %error, "waking the listener failed");
    }
}

/// Accepts on `listener`, handing each outcome to `accepted`, until `shutdown` is raised;
/// stops between accepts (see [`wake`]), so that nothing accepted is left unowned.
pub async fn accept_until(
    listener: &TcpListener,
    shutdown: crate::shard::ShutdownSignal,
    mut accepted: impl FnMut(io::Result<glommio::net::TcpStream>),
) {
    let stopping = std::rc::Rc::new(std::cell::Cell::new(false));
    let waker = {
        let stopping = std::rc::Rc::clone(&stopping);
        let addr = listener.local_addr().ok();
        glommio::spawn_local(async move {
            shutdown.raised().await;
            stopping.set(true);
            if let Some(addr) = addr {
                wake(addr).await;
            }
        })
    };
    loop {
        let outcome = listener.accept().await;
        if stopping.get() {
            drop(waker);
            return; // the stream accepted last (our own wake-up, or a late peer) closes here
        }
        accepted(outcome.map_err(io::Error::from));
    }
}

/// Whether a listener on `existing` takes connections meant for `wanted`: same port, and the
/// same address or a wildcard on either side.
fn conflicts(existing: SocketAddr, wanted: SocketAddr) -> bool {
    existing.port() == wanted.port()
        && (existing.ip() == wanted.ip()
            || existing.ip().is_unspecified()
            || wanted.ip().is_unspecified())
}

/// The local addresses of the listening sockets in one of the kernel's TCP tables.
fn listening(table: &str) -> Vec<SocketAddr> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            (state == LISTEN).then_some(())?;
            parse_local(local)
        })
        .collect()
}

/// `HEXADDR:HEXPORT` as the kernel prints it: the address as 32-bit words in the machine's
/// byte order (one for IPv4, four for IPv6), the port as a number.
fn parse_local(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for start in (0..address.len()).step_by(8) {
        let word = address.get(start..start + 8)?;
        bytes.extend_from_slice(&u32::from_str_radix(word, 16).ok()?.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_listeners_are_read_in_both_families() {
        let word = |ip: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(ip));
        let table = format!(
            "  sl  local_address rem_address   st tx_queue\n   \
             0: {}:07E8 00000000:0000 0A 00000000:00000000\n   \
             1: {}:3931 {}:A36E 06 00000000:00000000\n",
            word([0, 0, 0, 0]),
            word([127, 0, 0, 1]),
            word([127, 0, 0, 1]),
        );
        assert_eq!(
            listening(&table),
            vec!["0.0.0.0:2024".parse::<SocketAddr>().expect("address")]
        );
        let loopback6 = format!(
            "{}{}{}{}",
            word([0; 4]),
            word([0; 4]),
            word([0; 4]),
            word([0, 0, 0, 1])
        );
        let table6 = format!("header\n 0: {loopback6}:1F90 {loopback6}:0000 0A x\n");
        assert_eq!(
            listening(&table6),
            vec!["[::1]:8080".parse::<SocketAddr>().expect("address")]
        );
        assert_eq!(listening("header\n 0: zz:1 00:0 0A\n"), Vec::new());
    }

    #[test]
    fn a_wildcard_on_either_side_conflicts_other_addresses_do_not() {
        let at = |text: &str| text.parse::<SocketAddr>().expect("address");
        assert!(conflicts(at("0.0.0.0:80"), at("127.0.0.1:80")));
        assert!(conflicts(at("127.0.0.1:80"), at("0.0.0.0:80")));
        assert!(conflicts(at("127.0.0.1:80"), at("127.0.0.1:80")));
        assert!(!conflicts(at("127.0.0.1:80"), at("127.0.0.2:80")));
        assert!(!conflicts(at("127.0.0.1:80"), at("127.0.0.1:81")));
    }

    #[test]
    fn a_second_listener_on_a_port_is_refused_and_the_port_is_free_once_the_first_goes() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let first = listen("127.0.0.1:0".parse().expect("address")).expect("listen");
                let addr = first.local_addr().expect("address");
                let second = listen(addr);
                assert_eq!(
                    second.err().map(|e| e.kind()),
                    Some(io::ErrorKind::AddrInUse),
                    "a second listener on {addr}"
                );
                drop(first);
                listen(addr).expect("the port is free again");
            })
            .expect("executor")
            .join()
            .expect("test executor");
    }
}
