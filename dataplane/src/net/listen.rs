//! Listening sockets that own their port.
//!
//! glommio's `TcpListener::bind` sets `SO_REUSEPORT`, so a second listener on a port already
//! listened on binds without error and the kernel splits new connections between the two. A
//! second chunkserver started by mistake with the same configuration would take a share of
//! its peers' and clients' connections; a listener left open by a server that stopped in the
//! same process would swallow some and never answer them. [`listen`] first binds the address
//! without `SO_REUSEPORT`, which fails with "address in use" while anything listens there,
//! then binds the listener itself.

use std::io;
use std::net::SocketAddr;

use glommio::net::TcpListener;

/// A listener on `addr` that fails with `AddrInUse` when something already listens there.
/// Port 0 picks a free port, as usual.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    if addr.port() != 0 {
        // Fails while any socket listens on the address, with or without SO_REUSEPORT.
        drop(std::net::TcpListener::bind(addr)?);
    }
    TcpListener::bind(addr).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

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
