//! Single-shard async primitives the transports are built from: a bounded queue whose `push`
//! waits for room (back-pressure) and whose consumer can drain without waiting (coalescing),
//! and a one-shot slot that carries one response to one waiting request.
//!
//! Both live on one executor (`Rc`, no locks): a connection and everything it touches belongs
//! to one shard.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct QueueState<T> {
    items: VecDeque<T>,
    /// Invariant: `items.len() <= capacity`.
    capacity: usize,
    /// The weight of each item (bytes it holds), and the most the queue holds at once; one
    /// item always fits an empty queue, whatever its weight.
    weight: fn(&T) -> usize,
    weight_capacity: usize,
    /// Invariant: the sum of `weight` over `items`.
    weight_held: usize,
    closed: bool,
    push_wakers: Vec<Waker>,
    pop_wakers: Vec<Waker>,
}

/// A bounded FIFO shared by the tasks of one shard. Cloning shares the queue.
pub struct BoundedQueue<T> {
    state: Rc<RefCell<QueueState<T>>>,
}

impl<T> Clone for BoundedQueue<T> {
    fn clone(&self) -> Self {
        BoundedQueue {
            state: Rc::clone(&self.state),
        }
    }
}

/// The queue was closed; the item that could not be pushed comes back.
#[derive(Debug)]
pub struct QueueClosed<T>(pub T);

impl<T> BoundedQueue<T> {
    /// A queue that holds at most `capacity` items.
    pub fn new(capacity: usize) -> BoundedQueue<T> {
        BoundedQueue::weighted(capacity, usize::MAX, |_| 0)
    }

    /// A queue that holds at most `capacity` items and at most `weight_capacity` of their
    /// `weight` (bytes, say) — but always one item, so that a heavy one still passes.
    pub fn weighted(
        capacity: usize,
        weight_capacity: usize,
        weight: fn(&T) -> usize,
    ) -> BoundedQueue<T> {
        assert!(capacity > 0, "a bounded queue needs room for one item");
        BoundedQueue {
            state: Rc::new(RefCell::new(QueueState {
                items: VecDeque::with_capacity(capacity.min(1024)),
                capacity,
                weight,
                weight_capacity,
                weight_held: 0,
                closed: false,
                push_wakers: Vec::new(),
                pop_wakers: Vec::new(),
            })),
        }
    }

    /// Appends `item`, waiting while the queue is full.
    pub async fn push(&self, item: T) -> Result<(), QueueClosed<T>> {
        let mut item = Some(item);
        std::future::poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.closed {
                return Poll::Ready(Err(QueueClosed(item.take())));
            }
            let heavy = item.as_ref().map_or(0, |i| (state.weight)(i));
            if state.has_room(heavy) {
                if let Some(item) = item.take() {
                    state.weight_held += heavy;
                    state.items.push_back(item);
                }
                wake_all(&mut state.pop_wakers);
                return Poll::Ready(Ok(()));
            }
            register(&mut state.push_wakers, cx.waker());
            Poll::Pending
        })
        .await
        .map_err(|QueueClosed(item)| QueueClosed(item.expect("item taken only on success")))
    }

    /// Appends `item` if there is room now.
    pub fn try_push(&self, item: T) -> Result<(), TryPushError<T>> {
        let mut state = self.state.borrow_mut();
        if state.closed {
            return Err(TryPushError::Closed(item));
        }
        let heavy = (state.weight)(&item);
        if !state.has_room(heavy) {
            return Err(TryPushError::Full(item));
        }
        state.weight_held += heavy;
        state.items.push_back(item);
        wake_all(&mut state.pop_wakers);
        Ok(())
    }

    /// Takes the first item, waiting while the queue is empty; `None` once it is closed and
    /// drained.
    pub async fn pop(&self) -> Option<T> {
        std::future::poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if let Some(item) = state.pop_front() {
                wake_all(&mut state.push_wakers);
                return Poll::Ready(Some(item));
            }
            if state.closed {
                return Poll::Ready(None);
            }
            register(&mut state.pop_wakers, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Waits until the queue has an item or is closed, without taking anything.
    pub async fn wait_nonempty(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if !state.items.is_empty() || state.closed {
                return Poll::Ready(());
            }
            register(&mut state.pop_wakers, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Waits until the queue has room for an item or is closed.
    pub async fn wait_room(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.has_room(0) || state.closed {
                return Poll::Ready(());
            }
            register(&mut state.push_wakers, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Takes the first item if there is one.
    pub fn try_pop(&self) -> Option<T> {
        let mut state = self.state.borrow_mut();
        let item = state.pop_front();
        if item.is_some() {
            wake_all(&mut state.push_wakers);
        }
        item
    }

    /// Refuses further pushes and wakes everyone; items already queued can still be popped.
    pub fn close(&self) {
        let mut state = self.state.borrow_mut();
        state.closed = true;
        wake_all(&mut state.push_wakers);
        wake_all(&mut state.pop_wakers);
    }

    /// Drops every queued item (after a connection died, its queued frames go nowhere).
    pub fn clear(&self) -> Vec<T> {
        let mut state = self.state.borrow_mut();
        let items = state.items.drain(..).collect();
        state.weight_held = 0;
        wake_all(&mut state.push_wakers);
        items
    }

    /// Whether [`BoundedQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.state.borrow().closed
    }

    /// Items queued now.
    pub fn len(&self) -> usize {
        self.state.borrow().items.len()
    }

    /// Whether no item is queued.
    pub fn is_empty(&self) -> bool {
        self.state.borrow().items.is_empty()
    }
}

impl<T> QueueState<T> {
    /// Whether an item of weight `heavy` may enter now.
    fn has_room(&self, heavy: usize) -> bool {
        self.items.len() < self.capacity
            && (self.items.is_empty()
                || self.weight_held.saturating_add(heavy) <= self.weight_capacity)
    }

    fn pop_front(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        self.weight_held -= (self.weight)(&item);
        Some(item)
    }
}

/// Why [`BoundedQueue::try_push`] refused an item.
#[derive(Debug)]
pub enum TryPushError<T> {
    /// No room now.
    Full(T),
    /// The queue is closed.
    Closed(T),
}

/// Adds a waker unless one that wakes the same task is there: a future polled again and again
/// without being woken (raced against a timer, say) must not pile up clones of its waker.
fn register(wakers: &mut Vec<Waker>, waker: &Waker) {
    if !wakers.iter().any(|known| known.will_wake(waker)) {
        wakers.push(waker.clone());
    }
}

fn wake_all(wakers: &mut Vec<Waker>) {
    for waker in wakers.drain(..) {
        waker.wake();
    }
}

struct OneshotState<T> {
    value: Option<T>,
    sender_gone: bool,
    waker: Option<Waker>,
}

/// The sending half of a one-shot slot.
pub struct OneshotSender<T> {
    state: Rc<RefCell<OneshotState<T>>>,
}

/// The receiving half: a future that yields the value, or `None` if the sender was dropped.
pub struct OneshotReceiver<T> {
    state: Rc<RefCell<OneshotState<T>>>,
}

/// A new one-shot slot.
pub fn oneshot<T>() -> (OneshotSender<T>, OneshotReceiver<T>) {
    let state = Rc::new(RefCell::new(OneshotState {
        value: None,
        sender_gone: false,
        waker: None,
    }));
    (
        OneshotSender {
            state: Rc::clone(&state),
        },
        OneshotReceiver { state },
    )
}

impl<T> OneshotSender<T> {
    /// Delivers the value and wakes the receiver.
    pub fn send(self, value: T) {
        let waker = {
            let mut state = self.state.borrow_mut();
            state.value = Some(value);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Drop for OneshotSender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.state.borrow_mut();
            state.sender_gone = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Future for OneshotReceiver<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.state.borrow_mut();
        if let Some(value) = state.value.take() {
            return Poll::Ready(Some(value));
        }
        if state.sender_gone {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A wake-up signal between tasks of one shard: `notify` wakes whoever waits now, and a
/// notification with no waiter is remembered until the next wait.
#[derive(Clone, Default)]
pub struct Notify {
    state: Rc<RefCell<(bool, Vec<Waker>)>>,
}

impl Notify {
    /// A signal with no pending notification.
    pub fn new() -> Notify {
        Notify::default()
    }

    /// Wakes the waiters, or marks the signal for the next wait.
    pub fn notify(&self) {
        let mut state = self.state.borrow_mut();
        state.0 = true;
        wake_all(&mut state.1);
    }

    /// Waits for a notification and consumes it.
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.0 {
                state.0 = false;
                return Poll::Ready(());
            }
            register(&mut state.1, cx.waker());
            Poll::Pending
        })
        .await
    }
}

/// A one-way latch: once set it stays set, and every waiter (now or later) proceeds.
#[derive(Clone, Default)]
pub struct Latch {
    state: Rc<RefCell<(bool, Vec<Waker>)>>,
}

impl Latch {
    /// An unset latch.
    pub fn new() -> Latch {
        Latch::default()
    }

    /// Sets the latch and wakes every waiter.
    pub fn set(&self) {
        let mut state = self.state.borrow_mut();
        state.0 = true;
        wake_all(&mut state.1);
    }

    /// Whether the latch is set.
    pub fn is_set(&self) -> bool {
        self.state.borrow().0
    }

    /// Waits until the latch is set.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.0 {
                return Poll::Ready(());
            }
            register(&mut state.1, cx.waker());
            Poll::Pending
        })
        .await
    }
}
