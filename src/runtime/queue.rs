//! The bounded hand-off of trajectories from the actor threads to the learner.
//!
//! A fixed-capacity lock-free ring ([`ArrayQueue`]) gives backpressure
//! without a lock on the hot path: when the learner falls behind, actors wait
//! on a full queue instead of growing memory. A waiting thread spins briefly,
//! then yields (crossbeam's [`Backoff`]), then sleeps until the other side
//! makes progress. Sleeping and waking go through an event count: while
//! nobody sleeps, a push or pop pays one fence and one load to learn that;
//! the mutex behind the condvar is taken only by a thread going to sleep and
//! by the one waking it. Both sides count their waits, which tells which side
//! is the bottleneck.
//!
//! Shutdown: [`close`] makes every push fail (waiting producers included,
//! which get their item back), while the consumer still drains what was
//! pushed and then sees [`is_drained`]. A push that returned `Ok` is always
//! delivered: pushes announce themselves before checking the closed flag, and
//! the queue reports drained only once none is in flight.
//!
//! [`close`]: TrajectoryQueue::close
//! [`is_drained`]: TrajectoryQueue::is_drained

use crossbeam::queue::ArrayQueue;
use crossbeam::utils::{Backoff, CachePadded};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Bit of [`TrajectoryQueue::state`] set by `close`.
const CLOSED: usize = 1;
/// One push in flight, counted in the bits above [`CLOSED`].
const IN_FLIGHT: usize = 2;

/// Longest single sleep. Every change a sleeper waits for notifies it; the
/// cap only keeps any wait from resting on one notification alone, at ~100
/// wake-ups a second for a thread that waits long.
const MAX_SLEEP: Duration = Duration::from_millis(10);

/// A bounded multi-producer queue of trajectories, shared by `Arc`.
pub struct TrajectoryQueue<T> {
    queue: ArrayQueue<T>,
    /// `CLOSED` bit plus `IN_FLIGHT` times the pushes between their closed
    /// check and the end of their attempt.
    state: CachePadded<AtomicUsize>,
    pushed: CachePadded<AtomicU64>,
    popped: CachePadded<AtomicU64>,
    push_wait_ns: AtomicU64,
    pop_wait_ns: AtomicU64,
    /// Consumers sleep here; every push attempt notifies.
    not_empty: Signal,
    /// Producers sleep here; every pop notifies.
    not_full: Signal,
}

/// Counters since creation, each read atomically (not as one snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub pushed: u64,
    pub popped: u64,
    /// Total time producers spent waiting on a full queue.
    pub push_wait_ns: u64,
    /// Total time consumers spent waiting on an empty queue.
    pub pop_wait_ns: u64,
}

/// Why [`TrajectoryQueue::try_push`] gave the item back: a full queue is worth
/// retrying, a closed one is not.
#[derive(PartialEq, Eq)]
pub enum TryPushError<T> {
    Full(T),
    Closed(T),
}

impl<T> TryPushError<T> {
    pub fn into_inner(self) -> T {
        match self {
            TryPushError::Full(item) | TryPushError::Closed(item) => item,
        }
    }
}

impl<T> fmt::Debug for TryPushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryPushError::Full(_) => f.write_str("Full(..)"),
            TryPushError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

impl<T> fmt::Display for TryPushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryPushError::Full(_) => f.write_str("trajectory queue is full"),
            TryPushError::Closed(_) => f.write_str("trajectory queue is closed"),
        }
    }
}

impl<T> std::error::Error for TryPushError<T> {}

impl<T> TrajectoryQueue<T> {
    /// Panics if `capacity` is 0.
    pub fn new(capacity: usize) -> Self {
        TrajectoryQueue {
            queue: ArrayQueue::new(capacity),
            state: CachePadded::new(AtomicUsize::new(0)),
            pushed: CachePadded::new(AtomicU64::new(0)),
            popped: CachePadded::new(AtomicU64::new(0)),
            push_wait_ns: AtomicU64::new(0),
            pop_wait_ns: AtomicU64::new(0),
            not_empty: Signal::default(),
            not_full: Signal::default(),
        }
    }

    /// Pushes, waiting while the queue is full. Gives the item back if the
    /// queue is closed, before or during the wait.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut item = match self.try_push(item) {
            Ok(()) => return Ok(()),
            Err(TryPushError::Closed(item)) => return Err(item),
            Err(TryPushError::Full(item)) => item,
        };
        let start = Instant::now();
        let backoff = Backoff::new();
        let result = loop {
            self.not_full.wait(&backoff, Duration::MAX, || {
                !self.queue.is_full() || self.is_closed()
            });
            match self.try_push(item) {
                Ok(()) => break Ok(()),
                Err(TryPushError::Closed(back)) => break Err(back),
                Err(TryPushError::Full(back)) => item = back,
            }
        };
        self.push_wait_ns.fetch_add(nanos(start), Ordering::Relaxed);
        result
    }

    /// Pushes if there is room and the queue is open; never waits.
    pub fn try_push(&self, item: T) -> Result<(), TryPushError<T>> {
        // Announce the push before checking the flag: a consumer that sees the
        // queue closed with nothing in flight knows no more items can arrive.
        let result = if self.state.fetch_add(IN_FLIGHT, Ordering::Acquire) & CLOSED != 0 {
            Err(TryPushError::Closed(item))
        } else {
            let pushed = self.queue.push(item).map_err(TryPushError::Full);
            if pushed.is_ok() {
                self.pushed.fetch_add(1, Ordering::Relaxed);
            }
            pushed
        };
        // Release: a consumer that reads no push in flight sees this item.
        self.state.fetch_sub(IN_FLIGHT, Ordering::Release);
        // Whatever the outcome, a consumer may wait for this item or for the
        // last push in flight to end.
        self.not_empty.notify();
        result
    }

    /// Pops up to `max` items, waiting at most `timeout` for the first one.
    /// Returns an empty batch on timeout, and at once when the queue is
    /// drained (closed, empty, nothing in flight) or `max` is 0.
    pub fn pop_batch(&self, max: usize, timeout: Duration) -> Vec<T> {
        let mut batch = Vec::new();
        if max == 0 {
            return batch;
        }
        let mut waiting: Option<(Instant, Backoff)> = None;
        loop {
            while batch.len() < max {
                match self.queue.pop() {
                    Some(item) => batch.push(item),
                    None => break,
                }
            }
            if !batch.is_empty() || self.is_drained() {
                break;
            }
            let (start, backoff) = waiting.get_or_insert_with(|| (Instant::now(), Backoff::new()));
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            self.not_empty.wait(backoff, left, || {
                !self.queue.is_empty() || self.is_drained()
            });
        }
        if let Some((start, _)) = waiting {
            self.pop_wait_ns.fetch_add(nanos(start), Ordering::Relaxed);
        }
        if !batch.is_empty() {
            self.popped.fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.not_full.notify();
        }
        batch
    }

    pub fn try_pop(&self) -> Option<T> {
        let item = self.queue.pop();
        if item.is_some() {
            self.popped.fetch_add(1, Ordering::Relaxed);
            self.not_full.notify();
        }
        item
    }

    /// Makes every later push fail and wakes waiting producers, which get
    /// their item back. Items already queued stay poppable.
    pub fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::Release);
        self.not_full.notify();
        self.not_empty.notify();
    }

    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// True once no item will ever be popped again: closed, no push in
    /// flight, and empty. The consumer's loop condition:
    /// `while !queue.is_drained() { for t in queue.pop_batch(..) { .. } }`.
    /// (`is_closed() && is_empty()` is not enough: a push may still land.)
    pub fn is_drained(&self) -> bool {
        // Acquire pairs with the Release that ends every push, so a push
        // counted out before this load is visible to `is_empty` below.
        self.state.load(Ordering::Acquire) == CLOSED && self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    pub fn stats(&self) -> QueueStats {
        QueueStats {
            pushed: self.pushed.load(Ordering::Relaxed),
            popped: self.popped.load(Ordering::Relaxed),
            push_wait_ns: self.push_wait_ns.load(Ordering::Relaxed),
            pop_wait_ns: self.pop_wait_ns.load(Ordering::Relaxed),
        }
    }
}

impl<T> fmt::Debug for TrajectoryQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrajectoryQueue")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .field("closed", &self.is_closed())
            .field("stats", &self.stats())
            .finish()
    }
}

/// An event count: where waiters sleep once spinning is exhausted, and how
/// they are woken without a lock on the path where nobody sleeps.
///
/// A sleeper registers, then re-checks its condition; a notifier changes the
/// state, then reads the registrations. A SeqCst fence on each side between
/// the two steps guarantees that the sleeper sees the change or the notifier
/// sees the sleeper. The mutex closes the gap between a sleeper's re-check
/// and its wait. A notification clears the registrations, so a sleeper that
/// is slow to wake costs the next notifiers one load each, not a syscall.
#[derive(Default)]
struct Signal {
    /// Sleepers not yet notified; changed only under `generation`'s lock.
    sleepers: AtomicUsize,
    /// Bumped by each notification that found sleepers.
    generation: Mutex<u64>,
    cond: Condvar,
}

impl Signal {
    /// One step of a wait for `ready`: spins or yields while `backoff` lasts,
    /// then sleeps until notified, at most `limit` (and [`MAX_SLEEP`]).
    fn wait(&self, backoff: &Backoff, limit: Duration, ready: impl Fn() -> bool) {
        if !backoff.is_completed() {
            backoff.snooze();
            return;
        }
        let generation = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let registered = *generation;
        self.sleepers.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let generation = if ready() {
            generation
        } else {
            let (generation, _) = self
                .cond
                .wait_timeout(generation, limit.min(MAX_SLEEP))
                .unwrap_or_else(PoisonError::into_inner);
            generation
        };
        if *generation == registered {
            // Not notified (ready already, timed out, or woken spuriously).
            self.sleepers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Wakes every sleeper; call after the change they may wait for.
    fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            let mut generation = self
                .generation
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *generation += 1;
            self.sleepers.store(0, Ordering::Relaxed);
            self.cond.notify_all();
        }
    }
}

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
