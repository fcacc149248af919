//! Hand-off throughput of the runtime's trajectory queue and of its two
//! obvious peers, measured
//! the same way, for `medzero bench` and the criterion bench: `producers`
//! threads send `items` boxed 1 KB payloads in total (allocated by the
//! producer, as an actor builds a trajectory) to one consumer that drops them.
//! The clock runs from a barrier that releases all threads together until the
//! consumer holds the last item, so thread start-up is not counted. Each
//! function returns items per second.

use crate::runtime::queue::TrajectoryQueue;
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::mpsc;
use std::sync::{Barrier, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes of one payload: the small end of a trajectory.
pub const ITEM_BYTES: usize = 1024;
/// Most items the consumer takes per call, where the queue allows batches.
const BATCH: usize = 256;

type Item = Box<[u8]>;

/// [`TrajectoryQueue`] with `pop_batch`.
pub fn bench_throughput(producers: usize, items: usize, capacity: usize) -> f64 {
    let queue = TrajectoryQueue::new(capacity);
    drive(
        producers,
        items,
        |item| queue.push(item).expect("queue is never closed"),
        || consume(queue.pop_batch(BATCH, Duration::from_secs(1))),
    )
}

/// `std::sync::mpsc::sync_channel`, one `recv` per item.
pub fn bench_mpsc(producers: usize, items: usize, capacity: usize) -> f64 {
    let (tx, rx) = mpsc::sync_channel(capacity);
    drive(
        producers,
        items,
        |item| tx.send(item).expect("receiver outlives the producers"),
        || {
            black_box(rx.recv().expect("senders outlive the consumer"));
            1
        },
    )
}

/// A `Mutex<VecDeque>` bounded by two condvars, drained in batches like
/// ours; each side notifies only when the other may be waiting.
pub fn bench_mutex(producers: usize, items: usize, capacity: usize) -> f64 {
    let deque = Mutex::new(VecDeque::with_capacity(capacity));
    let (not_empty, not_full) = (Condvar::new(), Condvar::new());
    drive(
        producers,
        items,
        |item| {
            let mut deque = deque.lock().unwrap();
            while deque.len() == capacity {
                deque = not_full.wait(deque).unwrap();
            }
            deque.push_back(item);
            if deque.len() == 1 {
                not_empty.notify_one();
            }
        },
        || {
            let mut deque = deque.lock().unwrap();
            while deque.is_empty() {
                deque = not_empty.wait(deque).unwrap();
            }
            let len = deque.len();
            let batch: Vec<Item> = deque.drain(..len.min(BATCH)).collect();
            drop(deque);
            if len == capacity {
                not_full.notify_all();
            }
            consume(batch)
        },
    )
}

fn consume(batch: Vec<Item>) -> usize {
    let n = batch.len();
    for item in batch {
        black_box(item);
    }
    n
}

/// Runs `send` for `items` fresh payloads spread over `producers` threads
/// and calls `recv` (returning how many it took) until all arrived.
fn drive(
    producers: usize,
    items: usize,
    send: impl Fn(Item) + Sync,
    mut recv: impl FnMut() -> usize,
) -> f64 {
    assert!(producers > 0, "at least one producer");
    let start = Barrier::new(producers + 1);
    thread::scope(|scope| {
        for first in 0..producers {
            let (send, start) = (&send, &start);
            scope.spawn(move || {
                start.wait();
                for i in (first..items).step_by(producers) {
                    send(vec![i as u8; ITEM_BYTES].into_boxed_slice());
                }
            });
        }
        start.wait();
        let clock = Instant::now();
        let mut received = 0;
        while received < items {
            received += recv();
        }
        items as f64 / clock.elapsed().as_secs_f64()
    })
}
