//! A listener's accepting task, shared by the TCP and RDMA transports: streams are accepted
//! and each is set up (authentication, RDMA regions and hello) in a task of its own, bounded by
//! the connect timeout, at most [`SETUPS_AT_ONCE`] at a time — one slow or silent peer (a slow
//! machine registering its regions, a port scanner that never answers the challenge) holds no
//! other peer's connection behind it.
//!
//! [`Accepting::close`] ends all of it before the listener's owner goes: the listening socket
//! closes (the kernel resets what waits in its backlog), set-ups under way are cancelled and
//! connections set up but not yet taken are closed. Nothing is left for a shard that stops to
//! leak: a peer whose connection the stopping node accepted and never served would otherwise
//! keep sending into it, and never dial the node again once it restarted.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use glommio::channels::local_channel::{new_bounded, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use tracing::debug;

use super::connection::{close_all, Connection};
use super::NetError;

/// Connection set-ups a listener runs at once; further peers wait in the kernel's backlog.
const SETUPS_AT_ONCE: u64 = 32;

/// How long closing waits for the sockets of connections set up but never taken.
const UNTAKEN_END_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

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
    /// Cancelled when the listener is dropped; ends by itself when closed.
    task: glommio::Task<()>,
    setups: Rc<SetUps>,
}

/// The set-ups under way, each a task holding its stream, so that closing cancels them; and
/// the accepting task's state, so that closing can stop it between accepts.
#[derive(Default)]
struct SetUps {
    next: Cell<u64>,
    running: RefCell<HashMap<u64, glommio::task::JoinHandle<()>>>,
    /// Set by `close`: the accepting task drops what it accepts next and ends.
    closing: Cell<bool>,
    /// The accepting task waits in `accept` (woken by a connection of our own on close).
    in_accept: Cell<bool>,
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
                let setups = Rc::new(SetUps::default());
                let task = glommio::spawn_local(accept_and_set_up(
                    Rc::clone(&self.listener),
                    Rc::clone(&self.set_up),
                    Rc::new(sender),
                    Rc::clone(&setups),
                ));
                Started {
                    ready: Rc::new(receiver),
                    task,
                    setups,
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

impl Accepting {
    /// Stops accepting and closes what the listener still holds: the accepting task ends
    /// (with it the last handle on the listening socket besides the owner's), set-ups under
    /// way are cancelled, and connections set up but never taken are closed. The owner drops
    /// its own handle on the socket.
    pub(crate) async fn close(self) {
        let Accepting {
            started, listener, ..
        } = self;
        let Some(mut started) = started.into_inner() else {
            return;
        };
        // Stop the accepting task between accepts, never inside one (`crate::listen::wake`).
        started.setups.closing.set(true);
        if started.setups.in_accept.get() {
            if let Ok(addr) = listener.local_addr() {
                crate::listen::wake(addr).await;
            }
        }
        let ended = futures_lite::future::or(
            async {
                (&mut started.task).await;
                true
            },
            async {
                glommio::timer::sleep(UNTAKEN_END_WITHIN).await;
                false
            },
        )
        .await;
        if !ended {
            debug!("the accepting task did not end when woken; cancelled");
            let _ = started.task.cancel().await;
        }
        drop(listener);
        let running: Vec<_> = started.setups.running.borrow_mut().drain().collect();
        for (_, setup) in running {
            setup.cancel();
            let _ = setup.await;
        }
        // Every sender is gone now: what is buffered comes out, then the end.
        let mut untaken = Vec::new();
        while let Some(ready) = started.ready.recv().await {
            if let Ok(connection) = ready {
                untaken.push(connection);
            }
        }
        if !close_all(&untaken, UNTAKEN_END_WITHIN).await {
            debug!("connections set up but never taken still open after the listener closed");
        }
    }
}

/// Accepts streams and sets each up in a task of its own, at most [`SETUPS_AT_ONCE`] at a
/// time; finished connections and the listener's own errors go to `ready`. A failed set-up
/// concerns that one peer only: it is logged and dropped.
async fn accept_and_set_up(
    listener: Rc<TcpListener>,
    set_up: SetUp,
    ready: Rc<LocalSender<Result<Connection, NetError>>>,
    running: Rc<SetUps>,
) {
    let setups = Rc::new(Semaphore::new(SETUPS_AT_ONCE));
    loop {
        let Ok(permit) = setups.acquire_static_permit(1).await else {
            return;
        };
        if running.closing.get() {
            return;
        }
        running.in_accept.set(true);
        let accepted = listener.accept().await;
        running.in_accept.set(false);
        if running.closing.get() {
            return; // what was accepted (our own wake-up, or a late peer) closes here
        }
        let stream = match accepted {
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
        let id = running.next.get();
        running.next.set(id + 1);
        let finished = Rc::clone(&running);
        let task = glommio::spawn_local(async move {
            let started = std::time::Instant::now();
            let result = set_up.await;
            drop(permit);
            match result {
                Ok(connection) => {
                    debug!(connection = %connection.label(), took = ?started.elapsed(),
                        "connection set up");
                    // The listener is gone when this fails; the error holds the connection's
                    // last handle, and dropping it closes the connection.
                    let _ = ready.send(Ok(connection)).await;
                }
                Err(error) => debug!(%error, "connection set-up failed"),
            }
            finished.running.borrow_mut().remove(&id);
        })
        .detach();
        // Spawned tasks first run at the next yield: this one cannot have ended yet.
        running.running.borrow_mut().insert(id, task);
    }
}
