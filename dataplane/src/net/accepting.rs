//! A listener's accepting task, shared by the TCP and RDMA transports: streams are accepted
//! and each is set up (authentication, RDMA regions and hello) in a task of its own, bounded by
//! the connect timeout, at most [`SETUPS_AT_ONCE`] at a time — one slow or silent peer (a slow
//! machine registering its regions, a port scanner that never answers the challenge) holds no
//! other peer's connection behind it.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use glommio::channels::local_channel::{new_bounded, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use tracing::debug;

use super::connection::Connection;
use super::NetError;

/// Connection set-ups a listener runs at once; further peers wait in the kernel's backlog.
const SETUPS_AT_ONCE: u64 = 32;

/// What turns an accepted stream into a connection.
pub(crate) type SetUp =
    Rc<dyn Fn(TcpStream) -> Pin<Box<dyn Future<Output = Result<Connection, NetError>>>>>;

/// The accepting side of a listener: started by the first `accept`, cancelled when dropped.
pub(crate) struct Accepting {
    listener: Rc<TcpListener>,
    set_up: SetUp,
    started: RefCell<Option<Started>>,
}

struct Started {
    ready: Rc<LocalReceiver<Result<Connection, NetError>>>,
    /// Cancelled when the listener is dropped.
    _task: glommio::Task<()>,
}

impl Accepting {
    pub(crate) fn new(listener: Rc<TcpListener>, set_up: SetUp) -> Accepting {
        Accepting {
            listener,
            set_up,
            started: RefCell::new(None),
        }
    }

    /// The next connection whose set-up finished, or an error of the listener itself.
    pub(crate) async fn accept(&self) -> Result<Connection, NetError> {
        let ready = {
            let mut started = self.started.borrow_mut();
            let started = started.get_or_insert_with(|| {
                let (sender, receiver) = new_bounded(16);
                let task = glommio::spawn_local(accept_and_set_up(
                    Rc::clone(&self.listener),
                    Rc::clone(&self.set_up),
                    Rc::new(sender),
                ));
                Started {
                    ready: Rc::new(receiver),
                    _task: task,
                }
            });
            Rc::clone(&started.ready)
        };
        ready.recv().await.unwrap_or_else(|| {
            Err(NetError::Io {
                context: "accept".into(),
                reason: "the listener's accepting task ended".into(),
            })
        })
    }
}

/// Accepts streams and sets each up in a task of its own, at most [`SETUPS_AT_ONCE`] at a
/// time; finished connections and the listener's own errors go to `ready`. A failed set-up
/// concerns that one peer only: it is logged and dropped.
async fn accept_and_set_up(
    listener: Rc<TcpListener>,
    set_up: SetUp,
    ready: Rc<LocalSender<Result<Connection, NetError>>>,
) {
    let setups = Rc::new(Semaphore::new(SETUPS_AT_ONCE));
    loop {
        let Ok(permit) = setups.acquire_static_permit(1).await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                let error = NetError::Io {
                    context: "accept".into(),
                    reason: e.to_string(),
                };
                if ready.send(Err(error)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let set_up = set_up(stream);
        let ready = Rc::clone(&ready);
        glommio::spawn_local(async move {
            let started = std::time::Instant::now();
            let result = set_up.await;
            drop(permit);
            match result {
                Ok(connection) => {
                    debug!(connection = %connection.label(), took = ?started.elapsed(),
                        "connection set up");
                    // The listener is gone when this fails: the connection closes with it.
                    let _ = ready.send(Ok(connection)).await;
                }
                Err(error) => debug!(%error, "connection set-up failed"),
            }
        })
        .detach();
    }
}
