//! Starting the shards, the channel mesh between them, and the shutdown signal.
//!
//! The mesh is built before any executor starts: one bounded glommio shared channel for every
//! ordered pair of shards, handed to each shard by index. (glommio's own `MeshBuilder` numbers
//! peers by executor id, which need not match our shard order; building the pairs ourselves
//! keeps "shard i" meaning the same thing everywhere.)

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

/// A shard's index within its process: 0 .. shard count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

/// Why the shards could not run.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// No core was given.
    #[error("no core to run a shard on")]
    NoCores,
    /// The executor for a shard could not be created (bad core, io_uring refused, …).
    #[error("cannot start {shard} on core {core}: {reason}")]
    Start {
        /// Which shard.
        shard: ShardId,
        /// The core it was to be pinned to.
        core: u32,
        /// What glommio reported.
        reason: String,
    },
    /// A shard's thread panicked.
    #[error("{shard} panicked")]
    Panicked {
        /// Which shard.
        shard: ShardId,
    },
}

/// Tells every shard to stop. Set from a signal handler (SIGTERM, SIGINT) or by a test; shards
/// notice it within one poll interval.
#[derive(Debug, Clone, Default)]
pub struct ShutdownSignal {
    flag: Arc<AtomicBool>,
}

impl ShutdownSignal {
    /// How often a waiting shard looks at the flag.
    const POLL_INTERVAL: Duration = Duration::from_millis(20);

    /// A signal that is not raised.
    pub fn new() -> ShutdownSignal {
        ShutdownSignal::default()
    }

    /// Raises it on SIGTERM and SIGINT.
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&self.flag))?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&self.flag))?;
        Ok(())
    }

    /// Raises it.
    pub fn raise(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// Whether it has been raised.
    pub fn is_raised(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once the signal is raised. Must run on a glommio executor.
    pub async fn raised(&self) {
        while !self.is_raised() {
            glommio::timer::sleep(Self::POLL_INTERVAL).await;
        }
    }
}

/// One shard's ends of the channel mesh.
pub struct Mesh<M: Send + 'static> {
    me: ShardId,
    /// Indexed by destination shard; `None` at our own index.
    senders: Vec<Option<ConnectedSender<M>>>,
    /// One per source shard other than ourselves.
    receivers: Vec<(ShardId, ConnectedReceiver<M>)>,
}

impl<M: Send + 'static> Mesh<M> {
    /// The shard these ends belong to.
    pub fn me(&self) -> ShardId {
        self.me
    }

    /// Number of shards in the mesh.
    pub fn shard_count(&self) -> u32 {
        self.senders.len() as u32
    }

    /// Sends `message` to shard `to`, waiting while its queue is full (back-pressure). Gives the
    /// message back if `to` is ourselves, does not exist, or has stopped.
    pub async fn send(&self, to: ShardId, message: M) -> Result<(), M> {
        match self.senders.get(to.0 as usize) {
            Some(Some(sender)) => sender.send(message).await.map_err(|e| match e {
                glommio::GlommioError::Closed(glommio::ResourceType::Channel(m)) => m,
                glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => m,
                other => unreachable_message(other),
            }),
            _ => Err(message),
        }
    }

    /// Takes the receiving ends, one per other shard, to be drained by tasks of this shard.
    pub fn take_receivers(&mut self) -> Vec<(ShardId, ConnectedReceiver<M>)> {
        std::mem::take(&mut self.receivers)
    }

    /// Closes our sending ends so that peers' receivers end.
    pub fn close(&self) {
        for sender in self.senders.iter().flatten() {
            sender.close();
        }
    }
}

/// `ConnectedSender::send` only fails with `Closed` or `WouldBlock` carrying the message; any
/// other variant would be a change in glommio that we want to hear about loudly.
fn unreachable_message<M>(error: glommio::GlommioError<M>) -> M {
    panic!("glommio channel send failed in an undocumented way: {error}")
}

/// What a shard's task receives.
pub struct ShardContext<M: Send + 'static> {
    /// This shard.
    pub shard: ShardId,
    /// The core it is pinned to.
    pub core: u32,
    /// Its ends of the mesh.
    pub mesh: Mesh<M>,
    /// Raised when the process should stop.
    pub shutdown: ShutdownSignal,
}

/// The sending ends of the mesh, by source shard then destination shard (`None` where they
/// are the same).
type MeshSenders<M> = Vec<Vec<Option<shared_channel::SharedSender<M>>>>;
/// The receiving ends of the mesh, by destination shard, each with its source shard.
type MeshReceivers<M> = Vec<Vec<(ShardId, shared_channel::SharedReceiver<M>)>>;

/// Starts one pinned executor per core, runs `shard_main` on each, and waits for all of them.
/// Results come back in shard order. `mesh_capacity` bounds each pair's queue.
pub fn start_shards<M, T, F, Fut>(
    cores: &[u32],
    mesh_capacity: usize,
    shutdown: &ShutdownSignal,
    shard_main: F,
) -> Result<Vec<T>, ShardError>
where
    M: Send + 'static,
    T: Send + 'static,
    F: Fn(ShardContext<M>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = T> + 'static,
{
    if cores.is_empty() {
        return Err(ShardError::NoCores);
    }
    let count = cores.len();
    let (senders, receivers) = mesh_channels::<M>(count, mesh_capacity);

    let mut handles = Vec::with_capacity(count);
    for (index, ((&core, my_senders), my_receivers)) in
        cores.iter().zip(senders).zip(receivers).enumerate()
    {
        let shard = ShardId(index as u32);
        let shard_shutdown = shutdown.clone();
        let shard_main = shard_main.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(core as usize))
            .name(&format!("shard-{index}"))
            .spawn(move || async move {
                let mesh = connect_mesh(shard, my_senders, my_receivers).await;
                shard_main(ShardContext {
                    shard,
                    core,
                    mesh,
                    shutdown: shard_shutdown,
                })
                .await
            })
            .map_err(|e| ShardError::Start {
                shard,
                core,
                reason: e.to_string(),
            });
        match handle {
            Ok(handle) => handles.push((shard, handle)),
            Err(error) => {
                // The shards already started would wait forever for this one's channels:
                // tell them to stop, then report the first failure.
                shutdown.raise();
                for (_, handle) in handles {
                    drop(handle.join());
                }
                return Err(error);
            }
        }
    }
    join_shards(handles)
}

/// The channels of the mesh, not connected yet: one bounded channel of `capacity` (at least
/// 1) for every ordered pair of the `count` shards.
fn mesh_channels<M: Send + 'static>(
    count: usize,
    capacity: usize,
) -> (MeshSenders<M>, MeshReceivers<M>) {
    let mut senders: MeshSenders<M> = (0..count)
        .map(|_| (0..count).map(|_| None).collect())
        .collect();
    let mut receivers: MeshReceivers<M> = (0..count).map(|_| Vec::new()).collect();
    for (from, row) in senders.iter_mut().enumerate() {
        for (to, slot) in row.iter_mut().enumerate() {
            if from != to {
                let (sender, receiver) = shared_channel::new_bounded(capacity.max(1));
                *slot = Some(sender);
                receivers[to].push((ShardId(from as u32), receiver));
            }
        }
    }
    (senders, receivers)
}

/// Connects one shard's ends of the mesh, on its executor, once the other shards connect
/// theirs.
async fn connect_mesh<M: Send + 'static>(
    shard: ShardId,
    my_senders: Vec<Option<shared_channel::SharedSender<M>>>,
    my_receivers: Vec<(ShardId, shared_channel::SharedReceiver<M>)>,
) -> Mesh<M> {
    // Each end's connect waits for its peer's, so all of them are started before
    // any is awaited; awaiting them one by one would deadlock two shards that each
    // wait on the other's first channel.
    let senders: Vec<_> = my_senders
        .into_iter()
        .map(|sender| sender.map(|s| glommio::spawn_local(s.connect()).detach()))
        .collect();
    let receivers: Vec<_> = my_receivers
        .into_iter()
        .map(|(from, r)| (from, glommio::spawn_local(r.connect()).detach()))
        .collect();
    let mut connected_senders = Vec::with_capacity(senders.len());
    for sender in senders {
        connected_senders.push(match sender {
            Some(task) => task.await,
            None => None,
        });
    }
    let mut connected_receivers = Vec::with_capacity(receivers.len());
    for (from, task) in receivers {
        if let Some(receiver) = task.await {
            connected_receivers.push((from, receiver));
        }
    }
    let (senders, receivers) = (connected_senders, connected_receivers);
    Mesh {
        me: shard,
        senders,
        receivers,
    }
}

/// Waits for every started shard to end: their results in shard order, or the first shard
/// that panicked.
fn join_shards<T: Send + 'static>(
    handles: Vec<(ShardId, ExecutorJoinHandle<T>)>,
) -> Result<Vec<T>, ShardError> {
    let mut results = Vec::with_capacity(handles.len());
    let mut failure = None;
    for (shard, handle) in handles {
        match handle.join() {
            Ok(value) => results.push(value),
            Err(_) => {
                failure.get_or_insert(ShardError::Panicked { shard });
            }
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(results),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::timer::sleep;

    #[test]
    fn shards_exchange_messages_through_the_mesh_and_stop_on_shutdown() {
        let shutdown = ShutdownSignal::new();
        let stopper = shutdown.clone();
        let results = start_shards(
            &[0, 0, 0],
            4,
            &shutdown,
            move |mut ctx: ShardContext<u32>| {
                let stopper = stopper.clone();
                async move {
                    let me = ctx.shard.0;
                    let count = ctx.mesh.shard_count();
                    for to in (0..count).filter(|&to| to != me) {
                        let sent = ctx.mesh.send(ShardId(to), me * 100 + to).await;
                        assert!(sent.is_ok());
                    }
                    assert!(
                        ctx.mesh.send(ctx.shard, 0).await.is_err(),
                        "no channel to itself"
                    );
                    let mut got = Vec::new();
                    for (from, receiver) in ctx.mesh.take_receivers() {
                        let message = receiver.recv().await;
                        assert_eq!(message, Some(from.0 * 100 + me));
                        got.push(from.0);
                    }
                    if me == 0 {
                        stopper.raise();
                    }
                    ctx.shutdown.raised().await;
                    got
                }
            },
        )
        .unwrap();
        assert_eq!(results, vec![vec![1, 2], vec![0, 2], vec![0, 1]]);
    }

    #[test]
    fn a_shard_blocked_on_a_full_queue_resumes_when_the_peer_drains_it() {
        let shutdown = ShutdownSignal::new();
        let results = start_shards(
            &[0, 0],
            1,
            &shutdown,
            |mut ctx: ShardContext<u64>| async move {
                if ctx.shard.0 == 0 {
                    for i in 0..50 {
                        if ctx.mesh.send(ShardId(1), i).await.is_err() {
                            return 0;
                        }
                    }
                    50
                } else {
                    sleep(Duration::from_millis(20)).await;
                    let mut sum = 0;
                    let receivers = ctx.mesh.take_receivers();
                    for _ in 0..50 {
                        sum += receivers[0].1.recv().await.unwrap_or(0);
                    }
                    sum
                }
            },
        )
        .unwrap();
        assert_eq!(results, vec![50, (0..50).sum()]);
    }

    #[test]
    fn a_core_that_does_not_exist_is_an_error_not_a_hang() {
        let shutdown = ShutdownSignal::new();
        let result = start_shards(
            &[0, 100_000],
            1,
            &shutdown,
            |ctx: ShardContext<()>| async move {
                ctx.shutdown.raised().await;
            },
        );
        assert!(
            matches!(result, Err(ShardError::Start { core: 100_000, .. })),
            "{result:?}"
        );
    }
}
