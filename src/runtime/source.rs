//! The shared source of work for the actor threads: a fixed list of items
//! handed out once each without a lock, a gate that holds actors back at a
//! round boundary (synchronous modes), and a lock-free side queue for items
//! given back after a failure, which go out again before new ones.

use crossbeam::queue::SegQueue;
use crossbeam::utils::CachePadded;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// One unit of actor work: an index into the stage's problem list, and how
/// many times it was tried before (an actor that panicked gives it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    pub index: usize,
    pub attempt: u32,
}

pub struct ProblemSource {
    items: Vec<usize>,
    /// Next position in `items` to hand out.
    cursor: CachePadded<AtomicUsize>,
    /// Items whose index is at or past the gate wait until the gate moves.
    gate: CachePadded<AtomicUsize>,
    retries: SegQueue<WorkItem>,
    stopped: AtomicBool,
}

/// What an actor gets when it asks for work.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Item(WorkItem),
    /// Nothing now; more may come when the gate moves or an item is given back.
    Wait,
    /// Nothing ever again.
    Done,
}

impl ProblemSource {
    /// Hands out `items` (ascending problem indices) in order, at first only
    /// those below `gate`. Gating by index rather than position keeps round
    /// boundaries where they were when a resumed stage skips finished items.
    pub fn new(items: Vec<usize>, gate: usize) -> Self {
        debug_assert!(items.windows(2).all(|w| w[0] < w[1]), "items ascend");
        ProblemSource {
            items,
            cursor: CachePadded::new(AtomicUsize::new(0)),
            gate: CachePadded::new(AtomicUsize::new(gate)),
            retries: SegQueue::new(),
            stopped: AtomicBool::new(false),
        }
    }

    pub fn next(&self) -> Next {
        if self.stopped.load(Ordering::Acquire) {
            return Next::Done;
        }
        if let Some(item) = self.retries.pop() {
            return Next::Item(item);
        }
        let mut at = self.cursor.load(Ordering::Relaxed);
        loop {
            if at >= self.items.len() {
                return Next::Done;
            }
            if self.items[at] >= self.gate.load(Ordering::Acquire) {
                return Next::Wait;
            }
            match self
                .cursor
                .compare_exchange_weak(at, at + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Next::Item(WorkItem {
                        index: self.items[at],
                        attempt: 0,
                    });
                }
                Err(now) => at = now,
            }
        }
    }

    /// Puts an item back to be tried again (by any actor) before new ones.
    pub fn retry(&self, item: WorkItem) {
        self.retries.push(WorkItem {
            index: item.index,
            attempt: item.attempt + 1,
        });
    }

    /// Lets actors take items with an index below `gate`. Everything written
    /// before this call (a weight publication) is visible to an actor that
    /// gets one of the newly opened items.
    pub fn open_until(&self, gate: usize) {
        self.gate.fetch_max(gate, Ordering::AcqRel);
    }

    /// Every later `next` returns `Done`.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn gate_holds_items_back_until_opened() {
        let s = ProblemSource::new(vec![10, 11, 12], 11);
        assert_eq!(
            s.next(),
            Next::Item(WorkItem {
                index: 10,
                attempt: 0
            })
        );
        assert_eq!(s.next(), Next::Wait);
        s.open_until(usize::MAX);
        assert!(matches!(s.next(), Next::Item(WorkItem { index: 11, .. })));
        s.retry(WorkItem {
            index: 10,
            attempt: 0,
        });
        assert_eq!(
            s.next(),
            Next::Item(WorkItem {
                index: 10,
                attempt: 1
            })
        );
        assert!(matches!(s.next(), Next::Item(WorkItem { index: 12, .. })));
        assert_eq!(s.next(), Next::Done);
        s.stop();
        assert_eq!(s.next(), Next::Done);
    }

    #[test]
    fn each_item_goes_out_exactly_once_across_threads() {
        let n = 20_000;
        let s = Arc::new(ProblemSource::new((0..n).collect(), n));
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Next::Item(w) = s.next() {
                        got.push(w.index);
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<usize> = takers.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }
}
