//! Weight publication: actors adopting while the learner publishes always see
//! one whole version, never a mix, and versions only move forward.

mod support;
use medzero::runtime::weights::{PolicySnapshot, WeightSlot};
use medzero_policies::Policy;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::Kind;

fn tiny(seed: u64) -> Policy {
    support::tiny_policy("a b c d e f g h", seed)
}

/// Sets every variable to `v` (a version's fingerprint).
fn fill(policy: &Policy, v: f64) {
    tch::no_grad(|| {
        for (_, mut t) in policy.named_parameters() {
            let _ = t.fill_(v);
        }
    });
}

/// The distinct values across all variables.
fn values(policy: &Policy) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::new();
    for (_, t) in policy.named_parameters() {
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        for x in [lo, hi] {
            if !out.contains(&x) {
                out.push(x);
            }
        }
    }
    out
}

#[test]
fn actors_adopt_whole_versions_while_the_learner_publishes() {
    let learner = tiny(1);
    fill(&learner, 0.0);
    let slot = Arc::new(WeightSlot::new(PolicySnapshot::capture(&learner, 0)));
    let done = Arc::new(AtomicBool::new(false));
    let actors: Vec<_> = (0..2)
        .map(|i| {
            let (slot, done) = (Arc::clone(&slot), Arc::clone(&done));
            std::thread::spawn(move || {
                let mine = tiny(10 + i);
                let mut have = u64::MAX;
                let mut adopted = Vec::new();
                while !done.load(Ordering::Acquire) || slot.version() != have {
                    let next = if have == u64::MAX {
                        Some(slot.current())
                    } else {
                        slot.newer_than(have)
                    };
                    if let Some(s) = next {
                        s.apply(&mine).unwrap();
                        let vals = values(&mine);
                        assert_eq!(
                            vals,
                            vec![s.version as f64],
                            "actor {i} saw a torn snapshot"
                        );
                        assert!(
                            have == u64::MAX || s.version > have,
                            "versions went backwards"
                        );
                        have = s.version;
                        adopted.push(have);
                    }
                }
                adopted
            })
        })
        .collect();
    let mut publish_ms = Vec::new();
    for v in 1..=50u64 {
        fill(&learner, v as f64);
        let t = std::time::Instant::now();
        slot.publish(PolicySnapshot::capture(&learner, v));
        publish_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // The learner keeps stepping on its own weights right away.
        fill(&learner, -1.0);
    }
    done.store(true, Ordering::Release);
    for a in actors {
        let adopted = a.join().unwrap();
        assert_eq!(
            *adopted.last().unwrap(),
            50,
            "an actor never reached the last version"
        );
    }
    publish_ms.sort_by(f64::total_cmp);
    println!(
        "capture + publish of {} bytes: median {:.3} ms",
        PolicySnapshot::capture(&learner, 0).bytes(),
        publish_ms[25]
    );
    assert_eq!(learner.named_parameters()[0].1.kind(), Kind::Float);
}
