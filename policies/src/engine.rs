//! Continuous batching (Orca, OSDI '22): independent decode requests share
//! one batch of a single model copy. A request joins between decode steps
//! and leaves as soon as all its rows have finished, taking its rows (cache,
//! ids, logits) with it, so its owner can continue them later. Each row
//! samples from its own random stream with its own request's parameters, and
//! every operation on a row is row-wise, so what a row generates does not
//! depend on which rows share its batch: the engine gives each request what
//! [`Policy::decode`] gives it alone (tests/generation.rs holds it to that).
//!
//! Joining copies the rows into the shared cache, right-aligned so every row
//! writes the same column; the batch is rebuilt at most every `merge_every`
//! steps (or at once when it has nothing else to do), which bounds how long a
//! request waits and how often the pool is copied. Rows of finished requests
//! are dropped at the next rebuild.

use crate::generate::{Generation, SamplingParams, sample};
use crate::kv_cache::KvCache;
use crate::policy::Policy;
use crate::rows::Rows;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use tch::Tensor;

pub type RequestId = u64;

/// A request whose rows have all finished.
pub struct Done {
    pub id: RequestId,
    /// The request's rows as [`Policy::decode`] leaves them.
    pub rows: Rows,
    pub generations: Vec<Generation>,
}

struct Request {
    params: SamplingParams,
    budget: usize,
    /// Rows still sampling.
    open: usize,
}

struct Row {
    request: RequestId,
    /// Index within its request.
    index: usize,
    rng: ChaCha8Rng,
    generation: Generation,
    ids: Vec<i64>,
    steps: usize,
    done: bool,
    /// Its request has left: the row waits for the next rebuild to go.
    dead: bool,
}

struct Pool {
    cache: KvCache,
    /// [B, V]: what each row samples from next.
    logits: Tensor,
    /// [B, V]: what each finished row's last token was drawn from.
    last: Tensor,
    rows: Vec<Row>,
}

struct Pending {
    id: RequestId,
    rows: Rows,
    rngs: Vec<ChaCha8Rng>,
}

/// Columns added to the pool at a time, so it is not reallocated every step.
const GROW: i64 = 64;

pub struct Engine<'p> {
    policy: &'p Policy,
    merge_every: usize,
    pool: Option<Pool>,
    requests: HashMap<RequestId, Request>,
    pending: Vec<Pending>,
    /// Requests that finished without a step (no budget left).
    ready: Vec<Done>,
    next_id: RequestId,
    since_merge: usize,
    /// Decode steps run, and rows sampled over them.
    pub steps: u64,
    pub sampled_rows: u64,
}

impl<'p> Engine<'p> {
    pub fn new(policy: &'p Policy, merge_every: usize) -> Self {
        Engine {
            policy,
            merge_every: merge_every.max(1),
            pool: None,
            requests: HashMap::new(),
            pending: Vec::new(),
            ready: Vec::new(),
            next_id: 0,
            since_merge: 0,
            steps: 0,
            sampled_rows: 0,
        }
    }

    /// Queues `rows` to be decoded with `params`, row i drawing from
    /// `rngs[i]`; they join the batch at a coming step.
    pub fn submit(
        &mut self,
        rows: Rows,
        params: SamplingParams,
        rngs: Vec<ChaCha8Rng>,
    ) -> RequestId {
        assert_eq!(rngs.len(), rows.len(), "submit: one random stream per row");
        let id = self.next_id;
        self.next_id += 1;
        let context = self.policy.model.cfg.max_position_embeddings as usize;
        let furthest = rows.ids.iter().map(Vec::len).max().unwrap_or(0);
        // As in `Policy::decode`: the last sampled token is never fed.
        let budget = params
            .max_new_tokens
            .min(context.saturating_sub(furthest) + 1);
        if rows.is_empty() || budget == 0 {
            let generations = (0..rows.len()).map(|_| Generation::empty()).collect();
            self.ready.push(Done {
                id,
                rows,
                generations,
            });
            return id;
        }
        self.requests.insert(
            id,
            Request {
                params,
                budget,
                open: rows.len(),
            },
        );
        self.pending.push(Pending { id, rows, rngs });
        id
    }

    /// Requests submitted and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.requests.len() + self.ready.len()
    }

    pub fn is_idle(&self) -> bool {
        self.in_flight() == 0
    }

    /// Rows sampling now.
    pub fn live_rows(&self) -> usize {
        self.pool
            .as_ref()
            .map_or(0, |p| p.rows.iter().filter(|r| !r.done).count())
    }

    /// One decode step over every live row (admitting waiting requests
    /// first when it is time); returns the requests that finished.
    pub fn step(&mut self) -> Vec<Done> {
        let mut out = std::mem::take(&mut self.ready);
        let live = self.live_rows();
        let dead = self
            .pool
            .as_ref()
            .map_or(0, |p| p.rows.iter().filter(|r| r.dead).count());
        if (!self.pending.is_empty() && (live == 0 || self.since_merge >= self.merge_every))
            || (dead > 0 && dead >= live)
        {
            self.rebuild();
        }
        if self.live_rows() == 0 {
            return out;
        }
        self.since_merge += 1;
        self.steps += 1;
        tch::no_grad(|| self.sample_and_feed());
        out.extend(self.take_finished());
        out
    }

    /// Steps until every request has finished.
    pub fn run_to_end(&mut self) -> Vec<Done> {
        let mut out = Vec::new();
        while !self.is_idle() {
            out.extend(self.step());
        }
        out
    }

    /// A new pool: the rows still in use, then every waiting request's.
    fn rebuild(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let old = self.pool.take();
        let kept: Vec<i64> = old.as_ref().map_or_else(Vec::new, |p| {
            (0..p.rows.len())
                .filter(|&i| !p.rows[i].dead)
                .map(|i| i as i64)
                .collect()
        });
        let mut rows: Vec<Row> = Vec::new();
        let mut caches: Vec<(&KvCache, Vec<i64>)> = Vec::new();
        let mut logits = Vec::new();
        let mut last = Vec::new();
        if let Some(p) = &old
            && !kept.is_empty()
        {
            let idx = Tensor::from_slice(&kept).to_device(p.logits.device());
            caches.push((&p.cache, kept.clone()));
            logits.push(p.logits.index_select(0, &idx));
            last.push(p.last.index_select(0, &idx));
        }
        for q in &pending {
            caches.push((&q.rows.cache, (0..q.rows.len() as i64).collect()));
            logits.push(q.rows.logits.shallow_clone());
            last.push(q.rows.logits.copy());
        }
        if caches.is_empty() {
            return;
        }
        let parts: Vec<(&KvCache, &[i64])> =
            caches.iter().map(|(c, r)| (*c, r.as_slice())).collect();
        let cache = KvCache::stack(&parts, GROW);
        drop(parts);
        drop(caches);
        if let Some(p) = old {
            rows.extend(p.rows.into_iter().filter(|r| !r.dead));
        }
        for q in pending {
            rows.extend(q.rows.ids.into_iter().zip(q.rngs).enumerate().map(
                |(index, (ids, rng))| Row {
                    request: q.id,
                    index,
                    rng,
                    generation: Generation::empty(),
                    ids,
                    steps: 0,
                    done: false,
                    dead: false,
                },
            ));
        }
        self.pool = Some(Pool {
            cache,
            logits: Tensor::cat(&logits, 0),
            last: Tensor::cat(&last, 0),
            rows,
        });
        self.since_merge = 0;
    }

    /// Samples a token for every live row, then runs the rows that go on.
    fn sample_and_feed(&mut self) {
        let policy = self.policy;
        let pool = self.pool.as_mut().expect("live rows are in the pool");
        let device = pool.logits.device();
        let b = pool.rows.len();
        // Rows sample in groups of equal parameters (sampling is row-wise).
        let mut groups: Vec<(RequestId, Vec<usize>)> = Vec::new();
        for (i, r) in pool.rows.iter().enumerate() {
            if r.done {
                continue;
            }
            let params = &self.requests[&r.request].params;
            match groups
                .iter_mut()
                .find(|(q, _)| self.requests[q].params == *params)
            {
                Some((_, members)) => members.push(i),
                None => groups.push((r.request, vec![i])),
            }
        }
        let mut tokens = vec![policy.tokenizer.pad_id(); b];
        let mut ended = Vec::new();
        for (request, members) in &groups {
            let params = &self.requests[request].params.clone();
            let idx: Vec<i64> = members.iter().map(|&i| i as i64).collect();
            let logits = pool
                .logits
                .index_select(0, &Tensor::from_slice(&idx).to_device(device));
            let prev: Vec<i64> = members
                .iter()
                .map(|&i| pool.rows[i].ids.last().copied().unwrap_or(-1))
                .collect();
            let forbidden = policy.forbidden(&prev, params);
            let mut rngs: Vec<ChaCha8Rng> =
                members.iter().map(|&i| pool.rows[i].rng.clone()).collect();
            let (tok, lp) = sample(
                &policy.known(&logits),
                forbidden.as_ref(),
                params,
                &mut rngs,
            );
            for (k, &i) in members.iter().enumerate() {
                let row = &mut pool.rows[i];
                row.rng = rngs[k].clone();
                row.steps += 1;
                let stop = policy.record(&mut row.generation, tok[k], lp[k], params);
                let request = self.requests.get_mut(&row.request).expect("live request");
                if stop || row.steps == request.budget {
                    row.done = true;
                    request.open -= 1;
                    ended.push(i as i64);
                } else {
                    tokens[i] = tok[k];
                }
            }
        }
        self.sampled_rows += groups.iter().map(|(_, m)| m.len() as u64).sum::<u64>();
        if !ended.is_empty() {
            let idx = Tensor::from_slice(&ended).to_device(device);
            pool.last = pool
                .last
                .index_copy(0, &idx, &pool.logits.index_select(0, &idx));
        }
        let fed: Vec<bool> = pool.rows.iter().map(|r| !r.done).collect();
        if !fed.iter().any(|&f| f) {
            return;
        }
        if pool.cache.remaining() < 1 {
            pool.cache.reserve(GROW);
        }
        let positions: Vec<i64> = pool.rows.iter().map(|r| r.ids.len() as i64).collect();
        let valid: Vec<i64> = fed.iter().map(|&f| f as i64).collect();
        let col = |v: &[i64]| Tensor::from_slice(v).to_device(device).view([b as i64, 1]);
        let h = policy.model.forward(
            &col(&tokens),
            &col(&positions),
            &col(&valid),
            Some(&mut pool.cache),
        );
        pool.logits = policy.model.logits(&h.select(1, 0));
        for (row, (&f, &t)) in pool.rows.iter_mut().zip(fed.iter().zip(&tokens)) {
            if f {
                row.ids.push(t);
            }
        }
    }

    /// Takes every request whose rows have all finished out of the pool.
    fn take_finished(&mut self) -> Vec<Done> {
        let finished: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, q)| q.open == 0)
            .map(|(&id, _)| id)
            .collect();
        let mut out = Vec::with_capacity(finished.len());
        let Some(pool) = self.pool.as_mut() else {
            return out;
        };
        for id in finished {
            self.requests.remove(&id);
            let mut slots: Vec<(usize, usize)> = pool
                .rows
                .iter()
                .enumerate()
                .filter(|(_, r)| r.request == id && !r.dead)
                .map(|(i, r)| (r.index, i))
                .collect();
            slots.sort_unstable();
            let idx: Vec<i64> = slots.iter().map(|&(_, i)| i as i64).collect();
            let t = Tensor::from_slice(&idx).to_device(pool.logits.device());
            let cache = KvCache::stack(&[(&pool.cache, &idx)], 0);
            let mut generations = Vec::with_capacity(slots.len());
            let mut ids = Vec::with_capacity(slots.len());
            for &(_, i) in &slots {
                let row = &mut pool.rows[i];
                row.dead = true;
                generations.push(std::mem::replace(&mut row.generation, Generation::empty()));
                ids.push(std::mem::take(&mut row.ids));
            }
            self.policy.finish_texts(&mut generations);
            out.push(Done {
                id,
                rows: Rows {
                    cache,
                    logits: pool.last.index_select(0, &t),
                    ids,
                },
                generations,
            });
        }
        out
    }
}
