//! TrajectoryQueue: per-producer FIFO without loss or duplication, backpressure,
//! shutdown, timeouts and exact counters.

use medzero::runtime::queue::{QueueStats, TrajectoryQueue, TryPushError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Far beyond any expected delay; only bounds a broken test.
const PATIENCE: Duration = Duration::from_secs(10);

fn wait_until(cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Joins `thread`, failing (instead of hanging) if it has not finished in time.
fn join<R>(thread: thread::JoinHandle<R>) -> R {
    assert!(
        wait_until(|| thread.is_finished()),
        "thread still running after {PATIENCE:?}"
    );
    thread.join().unwrap()
}

/// The consumer's loop: pops batches of at most `max` until the queue is
/// drained, failing if that takes longer than [`PATIENCE`].
fn consume_until_drained<T>(queue: &TrajectoryQueue<T>, max: usize, mut each: impl FnMut(T)) {
    let deadline = Instant::now() + PATIENCE;
    while !queue.is_drained() {
        assert!(Instant::now() < deadline, "queue never drained");
        let batch = queue.pop_batch(max, Duration::from_millis(5));
        assert!(batch.len() <= max);
        batch.into_iter().for_each(&mut each);
    }
}

/// A full queue and a producer blocked on one more item.
struct Blocked {
    queue: Arc<TrajectoryQueue<u32>>,
    /// Turns true once the producer's push returns.
    returned: Arc<AtomicBool>,
    producer: thread::JoinHandle<Result<(), u32>>,
}

/// Fills a queue of `capacity` with 0.. and pushes `capacity` from another
/// thread, checking that push has not returned 50 ms later.
fn blocked_producer(capacity: usize) -> Blocked {
    let queue = Arc::new(TrajectoryQueue::new(capacity));
    for i in 0..capacity as u32 {
        queue.try_push(i).unwrap();
    }
    let returned = Arc::new(AtomicBool::new(false));
    let producer = {
        let (queue, returned) = (queue.clone(), returned.clone());
        thread::spawn(move || {
            let result = queue.push(capacity as u32);
            returned.store(true, Ordering::SeqCst);
            result
        })
    };
    thread::sleep(Duration::from_millis(50));
    assert!(
        !returned.load(Ordering::SeqCst),
        "push into a full queue returned without a pop"
    );
    Blocked {
        queue,
        returned,
        producer,
    }
}

#[test]
fn queue_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<TrajectoryQueue<Box<[u8]>>>();
}

#[test]
fn every_item_arrives_once_in_each_producers_order() {
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 10_000;
    let queue = Arc::new(TrajectoryQueue::new(64));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let queue = queue.clone();
            thread::spawn(move || {
                for seq in 0..PER_PRODUCER {
                    queue.push((p, seq)).unwrap();
                }
            })
        })
        .collect();
    // Closes once every producer is done (even by panicking), so a failing
    // push fails the test instead of hanging the consumer.
    let closer = {
        let queue = queue.clone();
        thread::spawn(move || {
            let finished: Vec<bool> = producers.into_iter().map(|p| p.join().is_ok()).collect();
            queue.close();
            finished
        })
    };
    let mut next = [0; PRODUCERS];
    consume_until_drained(&queue, 32, |(p, seq)| {
        assert_eq!(
            seq, next[p],
            "producer {p}: got {seq}, expected {}",
            next[p]
        );
        next[p] += 1;
    });
    assert_eq!(join(closer), [true; PRODUCERS], "a producer panicked");
    assert_eq!(next, [PER_PRODUCER; PRODUCERS]);
    let total = (PRODUCERS * PER_PRODUCER) as u64;
    let stats = queue.stats();
    assert_eq!((stats.pushed, stats.popped), (total, total));
    assert!(queue.try_pop().is_none());
}

#[test]
fn full_queue_blocks_push_until_a_pop() {
    let Blocked {
        queue,
        returned,
        producer,
    } = blocked_producer(4);
    assert_eq!(queue.len(), 4);
    assert!(matches!(queue.try_push(99), Err(TryPushError::Full(99))));
    assert_eq!(queue.try_pop(), Some(0));
    assert!(
        wait_until(|| returned.load(Ordering::SeqCst)),
        "push still blocked after a pop"
    );
    assert_eq!(join(producer), Ok(()));
    assert_eq!(queue.pop_batch(10, Duration::ZERO), vec![1, 2, 3, 4]);
    assert!(
        queue.stats().push_wait_ns > 0,
        "the blocked push was not timed"
    );
}

#[test]
fn close_releases_a_blocked_producer_and_lets_the_consumer_drain() {
    let Blocked {
        queue,
        returned,
        producer,
    } = blocked_producer(2);
    queue.close();
    assert!(
        wait_until(|| returned.load(Ordering::SeqCst)),
        "push still blocked after close"
    );
    assert_eq!(
        join(producer),
        Err(2),
        "blocked push must give its item back"
    );
    assert!(queue.is_closed());
    assert_eq!(queue.push(7), Err(7));
    assert!(matches!(queue.try_push(8), Err(TryPushError::Closed(8))));

    assert!(!queue.is_drained());
    assert_eq!(queue.pop_batch(1, PATIENCE), vec![0]);
    assert_eq!(queue.pop_batch(10, PATIENCE), vec![1]);
    assert!(queue.is_drained());
    let start = Instant::now();
    assert!(queue.pop_batch(10, PATIENCE).is_empty());
    assert!(
        start.elapsed() < PATIENCE / 2,
        "pop_batch on a drained queue waited for its timeout"
    );
    assert_eq!(
        queue.stats().pop_wait_ns,
        0,
        "a drained queue is not waited on"
    );
}

/// Closing races with pushes in flight; a push that returned `Ok` must still
/// reach the consumer. Repeated because each round has one close to race.
#[test]
fn every_successful_push_is_delivered_when_closing_mid_stream() {
    for _ in 0..20 {
        let queue = Arc::new(TrajectoryQueue::new(8));
        let producers: Vec<_> = (0..4)
            .map(|_| {
                let queue = queue.clone();
                thread::spawn(move || {
                    let mut accepted = 0u64;
                    while queue.push(accepted).is_ok() {
                        accepted += 1;
                    }
                    accepted
                })
            })
            .collect();
        let closer = {
            let queue = queue.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(5));
                queue.close();
            })
        };
        let mut received = 0u64;
        consume_until_drained(&queue, 4, |_| received += 1);
        join(closer);
        let accepted: u64 = producers.into_iter().map(join).sum();
        assert_eq!(received, accepted, "accepted pushes lost at close");
        assert_eq!(queue.stats().pushed, accepted);
        assert_eq!(queue.stats().popped, received);
    }
}

#[test]
fn pop_batch_on_an_empty_open_queue_returns_empty_after_the_timeout() {
    let queue = TrajectoryQueue::<u32>::new(4);
    let timeout = Duration::from_millis(30);
    let start = Instant::now();
    assert!(queue.pop_batch(8, timeout).is_empty());
    assert!(start.elapsed() >= timeout);
    assert!(queue.stats().pop_wait_ns >= timeout.as_nanos() as u64);
    assert!(!queue.is_drained(), "an open queue is never drained");
}

#[test]
fn pop_batch_respects_max() {
    let queue = TrajectoryQueue::new(8);
    for i in 0..5 {
        queue.push(i).unwrap();
    }
    assert!(queue.pop_batch(0, PATIENCE).is_empty());
    assert_eq!(queue.pop_batch(3, PATIENCE), vec![0, 1, 2]);
    assert_eq!(queue.pop_batch(3, PATIENCE), vec![3, 4]);
}

#[test]
fn stats_count_exactly() {
    let queue = TrajectoryQueue::new(3);
    assert_eq!(queue.stats(), QueueStats::default());
    for i in 0..3 {
        queue.push(i).unwrap();
    }
    assert!(queue.try_push(3).is_err());
    assert_eq!(queue.try_pop(), Some(0));
    queue.try_push(3).unwrap();
    assert_eq!(queue.pop_batch(2, Duration::ZERO), vec![1, 2]);
    assert!(queue.try_pop().is_some());
    assert!(queue.try_pop().is_none());
    queue.close();
    assert!(queue.push(9).is_err());
    assert_eq!(
        queue.stats(),
        QueueStats {
            pushed: 4,
            popped: 4,
            push_wait_ns: 0,
            pop_wait_ns: 0,
        },
        "failed pushes and pops are not counted, and nothing waited"
    );
    assert_eq!((queue.len(), queue.capacity()), (0, 3));
    assert!(queue.is_empty());
}

#[test]
#[should_panic]
fn zero_capacity_is_rejected() {
    TrajectoryQueue::<u32>::new(0);
}
