//! The inference service (SEED RL, arXiv 1910.06591): one thread holds the
//! model copy and every cached row; clients (MCTS trees, samplers) hold
//! handles to rows and send requests. Decode requests from all clients share
//! one continuously batched [`Engine`], so one forward pass serves rows of
//! many trees; prefills, forks and extensions run as they arrive. Rows stay
//! on the service, so a node's children and rollouts fork from its rows
//! without the prompt ever leaving the device.
//!
//! [`Generate`] is the boundary rollouts are written against: a local
//! [`Policy`] implements it directly (the per-actor path) and a [`Client`]
//! through the service, with the same results for the same random streams.
//!
//! New weights are taken from the [`WeightSlot`] between decode steps; every
//! decode reply carries the version that was current when the request was
//! admitted, and a client remembers the oldest it was served, so policy-lag
//! accounting counts the oldest weights a trajectory saw.

use super::weights::WeightSlot;
use anyhow::{Context, Result, anyhow, bail};
use crossbeam::channel::{Receiver, Sender, bounded, unbounded};
use medzero_policies::engine::{Engine, RequestId};
use medzero_policies::generate::streams;
use medzero_policies::tokenizer::Tokenizer;
use medzero_policies::{Generation, Policy, Rows, SamplingParams, SyncReport};
use rand_chacha::ChaCha8Rng;
use std::cell::Cell;
use std::collections::HashMap;
use tch::Tensor;

/// Batched generation over rows that hold their exact token ids (see
/// `medzero_policies::rows`), locally or through the service.
pub trait Generate {
    type Rows;
    fn tokenizer(&self) -> &Tokenizer;
    /// The model's context in tokens.
    fn context(&self) -> i64;
    fn prefill(&self, prompts: &[Vec<i64>], room: usize) -> Result<Self::Rows>;
    /// Copies of `picked` rows (repeats allowed) with room for `room` more tokens.
    fn select(&self, rows: &Self::Rows, picked: &[usize], room: usize) -> Result<Self::Rows>;
    fn extend(&self, rows: &mut Self::Rows, tokens: &[Vec<i64>]) -> Result<()>;
    fn sync(&self, rows: &mut Self::Rows, targets: &[Option<Vec<i64>>]) -> Result<SyncReport>;
    /// [`Policy::decode`]; the streams are consumed.
    fn decode(
        &self,
        rows: &mut Self::Rows,
        params: &SamplingParams,
        rngs: Vec<ChaCha8Rng>,
    ) -> Result<Vec<Generation>>;
    fn ids<'r>(&self, rows: &'r Self::Rows, row: usize) -> &'r [i64];
    /// Row `row`'s next-token logits [V].
    fn row_logits(&self, rows: &Self::Rows, row: usize) -> Result<Tensor>;
}

impl Generate for Policy {
    type Rows = Rows;
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    fn context(&self) -> i64 {
        self.config().max_position_embeddings
    }
    fn prefill(&self, prompts: &[Vec<i64>], room: usize) -> Result<Rows> {
        Ok(Policy::prefill(self, prompts, room)?)
    }
    fn select(&self, rows: &Rows, picked: &[usize], room: usize) -> Result<Rows> {
        Ok(rows.select(picked, room))
    }
    fn extend(&self, rows: &mut Rows, tokens: &[Vec<i64>]) -> Result<()> {
        Ok(Policy::extend(self, rows, tokens)?)
    }
    fn sync(&self, rows: &mut Rows, targets: &[Option<Vec<i64>>]) -> Result<SyncReport> {
        Ok(Policy::sync(self, rows, targets)?)
    }
    fn decode(
        &self,
        rows: &mut Rows,
        params: &SamplingParams,
        mut rngs: Vec<ChaCha8Rng>,
    ) -> Result<Vec<Generation>> {
        Ok(Policy::decode(self, rows, params, &mut rngs))
    }
    fn ids<'r>(&self, rows: &'r Rows, row: usize) -> &'r [i64] {
        rows.ids(row)
    }
    fn row_logits(&self, rows: &Rows, row: usize) -> Result<Tensor> {
        Ok(rows.logits(row))
    }
}

/// [`Policy::sample_n_batched`] on any generator: `n` completions of one
/// prompt in batches of at most `max_rows`, forked from one prefill per
/// batch, with the same streams (so the same samples).
pub fn sample_n_batched<G: Generate>(
    g: &G,
    prompt: &[i64],
    n: usize,
    max_rows: usize,
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Generation>> {
    if prompt.len() + params.max_new_tokens > g.context() as usize {
        bail!(
            "prompt of {} tokens plus {} new tokens exceeds the model's context of {}",
            prompt.len(),
            params.max_new_tokens,
            g.context()
        );
    }
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let k = max_rows.max(1).min(n - out.len());
        let one = g.prefill(&[prompt.to_vec()], 0)?;
        let mut rows = g.select(&one, &vec![0; k], params.max_new_tokens)?;
        out.extend(g.decode(&mut rows, params, streams(rng, k))?);
    }
    Ok(out)
}

type Reply<T> = Sender<Result<T, String>>;

enum Msg {
    Prefill {
        prompts: Vec<Vec<i64>>,
        room: usize,
        reply: Reply<u64>,
    },
    Select {
        from: u64,
        picked: Vec<usize>,
        room: usize,
        reply: Reply<u64>,
    },
    Extend {
        rows: u64,
        tokens: Vec<Vec<i64>>,
        reply: Reply<()>,
    },
    Sync {
        rows: u64,
        targets: Vec<Option<Vec<i64>>>,
        reply: Reply<SyncReport>,
    },
    Decode {
        rows: u64,
        params: SamplingParams,
        rngs: Vec<ChaCha8Rng>,
        reply: Reply<(Vec<Generation>, u64)>,
    },
    Logits {
        rows: u64,
        row: usize,
        reply: Reply<Tensor>,
    },
    Release(u64),
}

/// How the service batches.
#[derive(Debug, Clone, Copy)]
pub struct ServiceConfig {
    /// Decode steps between admissions of waiting requests into the batch.
    pub merge_every: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig { merge_every: 4 }
    }
}

/// What the service did, for reports and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServiceStats {
    pub decode_requests: u64,
    pub decode_steps: u64,
    /// Rows sampled per decode step, on average.
    pub mean_batch: f64,
    pub weight_swaps: u64,
    /// From a snapshot's capture after the learner's optimizer step to the
    /// service sampling with it (the next decode step), worst and mean.
    pub swap_latency_max_s: f64,
    pub swap_latency_mean_s: f64,
}

/// Makes a service's channel: hand the receiver to [`serve`] and clone
/// [`Client`]s from the returned one.
pub fn channel(tokenizer: &Tokenizer, context: i64) -> (Client<'_>, Inbox) {
    let (tx, rx) = unbounded();
    (
        Client {
            tx,
            tokenizer,
            context,
            oldest: Cell::new(None),
        },
        Inbox(rx),
    )
}

/// The service's end of the channel.
pub struct Inbox(Receiver<Msg>);

/// Serves requests on `policy` until every client is gone, taking newer
/// weights from `weights` between decode steps. Runs on the calling
/// thread, which owns the model.
pub fn serve(
    policy: &Policy,
    inbox: Inbox,
    weights: Option<&WeightSlot>,
    cfg: ServiceConfig,
) -> Result<ServiceStats> {
    let mut server = Server {
        policy,
        rows: HashMap::new(),
        next: 0,
        decoding: HashMap::new(),
        version: weights.map_or(0, WeightSlot::version),
        stats: ServiceStats::default(),
    };
    let mut engine = Engine::new(policy, cfg.merge_every);
    // Newer weights are taken before any request is handled, so a request
    // sent after a publication is served by it (a sync round's first
    // prefill included).
    let swap = |server: &mut Server| -> Result<()> {
        if let Some(slot) = weights
            && let Some(s) = slot.newer_than(server.version)
        {
            s.apply(policy)?;
            server.version = s.version;
            let latency = s.captured.elapsed().as_secs_f64();
            let st = &mut server.stats;
            st.swap_latency_max_s = st.swap_latency_max_s.max(latency);
            st.swap_latency_mean_s = (st.swap_latency_mean_s * st.weight_swaps as f64 + latency)
                / (st.weight_swaps + 1) as f64;
            st.weight_swaps += 1;
        }
        Ok(())
    };
    loop {
        let first = if engine.is_idle() {
            match inbox.0.recv() {
                Ok(msg) => Some(msg),
                Err(_) => break,
            }
        } else {
            None
        };
        for msg in first
            .into_iter()
            .chain(std::iter::from_fn(|| inbox.0.try_recv().ok()))
        {
            swap(&mut server)?;
            server.handle(msg, &mut engine);
        }
        swap(&mut server)?;
        for done in engine.step() {
            let (handle, version, reply) = server
                .decoding
                .remove(&done.id)
                .expect("every engine request comes from a decode message");
            server.rows.insert(handle, done.rows);
            let _ = reply.send(Ok((done.generations, version)));
        }
    }
    server.stats.decode_steps = engine.steps;
    server.stats.mean_batch = engine.sampled_rows as f64 / engine.steps.max(1) as f64;
    Ok(server.stats)
}

/// A decode in the engine: the rows' handle, the version it was admitted
/// under, and where the reply goes.
type Decoding = (u64, u64, Reply<(Vec<Generation>, u64)>);

struct Server<'p> {
    policy: &'p Policy,
    rows: HashMap<u64, Rows>,
    next: u64,
    /// Engine requests in flight: their handle, version and reply.
    decoding: HashMap<RequestId, Decoding>,
    version: u64,
    stats: ServiceStats,
}

impl Server<'_> {
    fn insert(&mut self, rows: Rows) -> u64 {
        let id = self.next;
        self.next += 1;
        self.rows.insert(id, rows);
        id
    }

    fn get(&mut self, id: u64) -> Result<&mut Rows, String> {
        self.rows
            .get_mut(&id)
            .ok_or_else(|| format!("inference service: no rows {id} (released or decoding)"))
    }

    fn handle(&mut self, msg: Msg, engine: &mut Engine) {
        let policy = self.policy;
        match msg {
            Msg::Prefill {
                prompts,
                room,
                reply,
            } => {
                let out = policy
                    .prefill(&prompts, room)
                    .map(|r| self.insert(r))
                    .map_err(|e| e.to_string());
                let _ = reply.send(out);
            }
            Msg::Select {
                from,
                picked,
                room,
                reply,
            } => {
                let out = self
                    .get(from)
                    .map(|r| r.select(&picked, room))
                    .map(|r| self.insert(r));
                let _ = reply.send(out);
            }
            Msg::Extend {
                rows,
                tokens,
                reply,
            } => {
                let out = self
                    .get(rows)
                    .and_then(|r| policy.extend(r, &tokens).map_err(|e| e.to_string()));
                let _ = reply.send(out);
            }
            Msg::Sync {
                rows,
                targets,
                reply,
            } => {
                let out = self
                    .get(rows)
                    .and_then(|r| policy.sync(r, &targets).map_err(|e| e.to_string()));
                let _ = reply.send(out);
            }
            Msg::Decode {
                rows,
                params,
                rngs,
                reply,
            } => match self.rows.remove(&rows) {
                Some(r) => {
                    self.stats.decode_requests += 1;
                    let id = engine.submit(r, params, rngs);
                    self.decoding.insert(id, (rows, self.version, reply));
                }
                None => {
                    let _ = reply.send(Err(format!("inference service: no rows {rows}")));
                }
            },
            Msg::Logits { rows, row, reply } => {
                let _ = reply.send(self.get(rows).map(|r| r.logits(row)));
            }
            Msg::Release(id) => {
                self.rows.remove(&id);
            }
        }
    }
}

/// A client of the service: cheap to clone, one per tree or sampler thread.
pub struct Client<'t> {
    tx: Sender<Msg>,
    tokenizer: &'t Tokenizer,
    context: i64,
    /// The oldest policy version a decode reply carried.
    oldest: Cell<Option<u64>>,
}

impl Clone for Client<'_> {
    fn clone(&self) -> Self {
        Client {
            tx: self.tx.clone(),
            tokenizer: self.tokenizer,
            context: self.context,
            oldest: Cell::new(None),
        }
    }
}

/// Rows held by the service; released when dropped.
pub struct RowsHandle {
    id: u64,
    /// The ids each row holds (the service's rows hold the same).
    ids: Vec<Vec<i64>>,
    tx: Sender<Msg>,
}

impl Drop for RowsHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Release(self.id));
    }
}

impl Client<'_> {
    /// The oldest policy version this client's decodes were served with
    /// since the last call.
    pub fn take_oldest_version(&self) -> Option<u64> {
        self.oldest.take()
    }

    fn call<T>(&self, msg: impl FnOnce(Reply<T>) -> Msg) -> Result<T> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(msg(reply))
            .map_err(|_| anyhow!("the inference service has stopped"))?;
        rx.recv()
            .context("the inference service stopped before replying")?
            .map_err(|e| anyhow!(e))
    }

    fn handle(&self, id: u64, ids: Vec<Vec<i64>>) -> RowsHandle {
        RowsHandle {
            id,
            ids,
            tx: self.tx.clone(),
        }
    }
}

impl Generate for Client<'_> {
    type Rows = RowsHandle;
    fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer
    }
    fn context(&self) -> i64 {
        self.context
    }
    fn prefill(&self, prompts: &[Vec<i64>], room: usize) -> Result<RowsHandle> {
        let prompts = prompts.to_vec();
        let id = self.call(|reply| Msg::Prefill {
            prompts: prompts.clone(),
            room,
            reply,
        })?;
        Ok(self.handle(id, prompts))
    }
    fn select(&self, rows: &RowsHandle, picked: &[usize], room: usize) -> Result<RowsHandle> {
        let id = self.call(|reply| Msg::Select {
            from: rows.id,
            picked: picked.to_vec(),
            room,
            reply,
        })?;
        Ok(self.handle(id, picked.iter().map(|&r| rows.ids[r].clone()).collect()))
    }
    fn extend(&self, rows: &mut RowsHandle, tokens: &[Vec<i64>]) -> Result<()> {
        self.call(|reply| Msg::Extend {
            rows: rows.id,
            tokens: tokens.to_vec(),
            reply,
        })?;
        for (ids, new) in rows.ids.iter_mut().zip(tokens) {
            ids.extend_from_slice(new);
        }
        Ok(())
    }
    fn sync(&self, rows: &mut RowsHandle, targets: &[Option<Vec<i64>>]) -> Result<SyncReport> {
        let report = self.call(|reply| Msg::Sync {
            rows: rows.id,
            targets: targets.to_vec(),
            reply,
        })?;
        for (ids, target) in rows.ids.iter_mut().zip(targets) {
            if let Some(t) = target {
                ids.clone_from(t);
            }
        }
        Ok(report)
    }
    fn decode(
        &self,
        rows: &mut RowsHandle,
        params: &SamplingParams,
        rngs: Vec<ChaCha8Rng>,
    ) -> Result<Vec<Generation>> {
        let (generations, version) = self.call(|reply| Msg::Decode {
            rows: rows.id,
            params: params.clone(),
            rngs,
            reply,
        })?;
        self.oldest
            .set(Some(self.oldest.get().map_or(version, |v| v.min(version))));
        // A row holds every sampled token but the last (see `Policy::decode`).
        for (ids, g) in rows.ids.iter_mut().zip(&generations) {
            ids.extend_from_slice(&g.tokens[..g.tokens.len().saturating_sub(1)]);
        }
        Ok(generations)
    }
    fn ids<'r>(&self, rows: &'r RowsHandle, row: usize) -> &'r [i64] {
        &rows.ids[row]
    }
    fn row_logits(&self, rows: &RowsHandle, row: usize) -> Result<Tensor> {
        self.call(|reply| Msg::Logits {
            rows: rows.id,
            row,
            reply,
        })
    }
}
