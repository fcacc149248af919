//! A preallocated key/value cache: one [B, kv_heads, capacity, head_dim]
//! buffer per layer for keys and values, a validity mask over columns, and a
//! shared write column. Sequences of a batch are left-aligned by padding, so
//! every decode step writes one column for all of them; padded columns are
//! masked out. Selecting copies a row into several, so sequences that share a
//! prefix (MCTS children, N samples of one prompt) never recompute it. The
//! cache knows columns, not tokens: [`Rows`](crate::Rows) pairs it with the
//! ids each row holds, and is the only way to it from outside the crate.

use crate::llama::DecoderConfig;
use tch::{Device, Kind, Tensor};

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// [B, capacity] bool: which written columns hold real tokens.
    valid: Tensor,
    /// Columns written so far (the same for every row).
    len: i64,
}

impl KvCache {
    pub fn new(
        cfg: &DecoderConfig,
        batch: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> KvCache {
        let shape = [batch, cfg.num_kv_heads, capacity, cfg.head_dim];
        let layers = cfg.num_layers as usize;
        KvCache {
            k: (0..layers)
                .map(|_| Tensor::zeros(shape, (kind, device)))
                .collect(),
            v: (0..layers)
                .map(|_| Tensor::zeros(shape, (kind, device)))
                .collect(),
            valid: Tensor::zeros([batch, capacity], (Kind::Bool, device)),
            len: 0,
        }
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> i64 {
        self.valid.size()[0]
    }

    pub fn capacity(&self) -> i64 {
        self.valid.size()[1]
    }

    /// Columns still free.
    pub fn remaining(&self) -> i64 {
        self.capacity() - self.len
    }

    /// Marks the next `valid.size(1)` columns and returns the mask over every
    /// column up to them.
    pub(crate) fn append_valid(&mut self, valid: &Tensor) -> Tensor {
        let t = valid.size()[1];
        assert!(
            self.len + t <= self.capacity(),
            "KV cache overflow: {} + {t} > {}",
            self.len,
            self.capacity()
        );
        self.valid
            .narrow(1, self.len, t)
            .copy_(&valid.to_kind(Kind::Bool));
        self.valid.narrow(1, 0, self.len + t)
    }

    /// Writes layer `layer`'s new keys/values at column `offset` and returns
    /// the keys/values of every column so far.
    pub(crate) fn write(
        &mut self,
        layer: usize,
        offset: i64,
        k: &Tensor,
        v: &Tensor,
    ) -> (Tensor, Tensor) {
        let t = k.size()[2];
        self.k[layer].narrow(2, offset, t).copy_(k);
        self.v[layer].narrow(2, offset, t).copy_(v);
        (
            self.k[layer].narrow(2, 0, offset + t),
            self.v[layer].narrow(2, 0, offset + t),
        )
    }

    pub(crate) fn advance(&mut self, t: i64) {
        self.len += t;
    }

    /// Makes room for `extra` more columns, growing the buffers if needed.
    pub(crate) fn reserve(&mut self, extra: i64) {
        if self.remaining() >= extra {
            return;
        }
        let capacity = self.len + extra;
        let grow = |t: &Tensor, dim: i64| {
            let mut shape = t.size();
            shape[dim as usize] = capacity;
            let out = Tensor::zeros(&shape, (t.kind(), t.device()));
            out.narrow(dim, 0, self.len)
                .copy_(&t.narrow(dim, 0, self.len));
            out
        };
        self.k = self.k.iter().map(|t| grow(t, 2)).collect();
        self.v = self.v.iter().map(|t| grow(t, 2)).collect();
        self.valid = grow(&self.valid, 1);
    }

    /// Forgets row `row`'s tokens after its first `keep`: their columns stop
    /// counting as real for it (other rows keep theirs).
    pub(crate) fn truncate_row(&mut self, row: i64, keep: usize) {
        let mask = self.valid.get(row).narrow(0, 0, self.len);
        let held = Vec::<bool>::try_from(&mask.to_device(Device::Cpu)).unwrap_or_default();
        let mut seen = 0;
        for (col, &real) in held.iter().enumerate() {
            if real {
                if seen == keep {
                    let _ = mask.narrow(0, col as i64, self.len - col as i64).fill_(0);
                    return;
                }
                seen += 1;
            }
        }
    }

    /// A new cache whose rows are copies of `rows` of this one (repeats
    /// allowed), with room for `room` more columns.
    pub fn select_with_room(&self, rows: &[i64], room: i64) -> KvCache {
        let idx = Tensor::from_slice(rows).to_device(self.valid.device());
        let capacity = self.len + room.max(0);
        let grow = |t: &Tensor, dim: i64| {
            let picked = t.index_select(0, &idx).narrow(dim, 0, self.len);
            let mut shape = picked.size();
            shape[dim as usize] = capacity;
            let out = Tensor::zeros(&shape, (t.kind(), t.device()));
            out.narrow(dim, 0, self.len).copy_(&picked);
            out
        };
        KvCache {
            k: self.k.iter().map(|t| grow(t, 2)).collect(),
            v: self.v.iter().map(|t| grow(t, 2)).collect(),
            valid: grow(&self.valid, 1),
            len: self.len,
        }
    }

    /// One cache holding the rows of several: `parts[i]` names a cache and
    /// which of its rows to take (repeats allowed), stacked in order along
    /// the batch. Rows are right-aligned so they share the write column:
    /// each part keeps only the columns its rows still use, the space before
    /// them is invalid padding, and `room` more columns stay free. Keys
    /// carry their positions already (RoPE is applied before caching), so
    /// moving columns changes nothing a row attends to.
    pub fn stack(parts: &[(&KvCache, &[i64])], room: i64) -> KvCache {
        let first = parts.first().expect("stack: at least one part").0;
        let device = first.valid.device();
        let indices: Vec<Tensor> = parts
            .iter()
            .map(|(_, rows)| Tensor::from_slice(rows).to_device(device))
            .collect();
        // The columns each part's rows use: from the first valid one on.
        let spans: Vec<i64> = parts
            .iter()
            .zip(&indices)
            .map(|((c, rows), idx)| {
                if c.len == 0 || rows.is_empty() {
                    return 0;
                }
                let used = c
                    .valid
                    .narrow(1, 0, c.len)
                    .index_select(0, idx)
                    .any_dim(0, false);
                let used = Vec::<bool>::try_from(used.to_device(Device::Cpu)).unwrap_or_default();
                used.iter().position(|&u| u).map_or(0, |p| c.len - p as i64)
            })
            .collect();
        let len = spans.iter().copied().max().unwrap_or(0);
        let batch: i64 = parts.iter().map(|(_, r)| r.len() as i64).sum();
        let capacity = len + room.max(0);
        // Stacks one buffer (picked from each part by `of`) along the batch.
        let stacked = |of: &dyn Fn(&KvCache) -> &Tensor, dim: i64| {
            let mut shape = of(first).size();
            shape[0] = batch;
            shape[dim as usize] = capacity;
            let out = Tensor::zeros(&shape, (of(first).kind(), device));
            let mut at = 0;
            for (((c, rows), idx), &span) in parts.iter().zip(&indices).zip(&spans) {
                let b = rows.len() as i64;
                if b > 0 && span > 0 {
                    let from = of(c).narrow(dim, c.len - span, span).index_select(0, idx);
                    out.narrow(0, at, b)
                        .narrow(dim, len - span, span)
                        .copy_(&from);
                }
                at += b;
            }
            out
        };
        let layers = first.k.len();
        KvCache {
            k: (0..layers).map(|l| stacked(&|c| &c.k[l], 2)).collect(),
            v: (0..layers).map(|l| stacked(&|c| &c.v[l], 2)).collect(),
            valid: stacked(&|c| &c.valid, 1),
            len,
        }
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> i64 {
        let per = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        self.k.iter().chain(&self.v).map(per).sum::<i64>() + per(&self.valid)
    }
}
