//! The actors' trajectory queue against `mpsc::sync_channel` and a
//! `Mutex<VecDeque>`, 1 and 4 producers (the workloads `medzero bench`
//! reports as a table).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medzero::cli::bench::queue::{bench_mpsc, bench_mutex, bench_throughput};

const ITEMS: usize = 20_000;

fn queues(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(ITEMS as u64));
    for producers in [1, 4] {
        g.bench_function(format!("medzero/{producers}p"), |b| {
            b.iter(|| bench_throughput(producers, ITEMS, 1024))
        });
        g.bench_function(format!("mpsc/{producers}p"), |b| {
            b.iter(|| bench_mpsc(producers, ITEMS, 1024))
        });
        g.bench_function(format!("mutex/{producers}p"), |b| {
            b.iter(|| bench_mutex(producers, ITEMS, 1024))
        });
    }
    g.finish();
}

criterion_group!(benches, queues);
criterion_main!(benches);
