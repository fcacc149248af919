//! Generation state that cannot drift from its text.
//!
//! [`Rows`] are rows of a KV cache together with, per row, the exact token
//! ids the cache holds and the logits of the row's next token. A row's next
//! position is the number of ids it holds, kept on the host: no tensor of
//! positions is ever handed between calls, so no call can move another's
//! positions (a position tensor passed by handle and advanced in place once
//! put every MCTS child at the wrong RoPE position). Every operation keeps
//! the invariant "row i gives what a fresh prefill of `ids(i)` gives":
//!
//! - [`Policy::prefill`](crate::Policy::prefill) makes rows from prompts;
//! - [`Rows::select`] copies rows (a node's children, N samples of a prompt);
//! - [`Policy::extend`](crate::Policy::extend) appends tokens (ragged);
//! - [`Policy::decode`](crate::Policy::decode) samples; afterwards each row
//!   holds what it held plus every sampled token but the last, and its logits
//!   are the ones that last token was drawn from;
//! - [`Policy::sync`](crate::Policy::sync) makes rows hold given ids, keeping
//!   the longest common prefix and re-running only the rest.

use crate::kv_cache::KvCache;
use tch::Tensor;

pub struct Rows {
    pub(crate) cache: KvCache,
    /// [B, V]: the distribution of each row's next token.
    pub(crate) logits: Tensor,
    pub(crate) ids: Vec<Vec<i64>>,
}

impl Rows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The token ids row `row` holds.
    pub fn ids(&self, row: usize) -> &[i64] {
        &self.ids[row]
    }

    /// Where row `row`'s next token goes: the number of ids it holds.
    pub fn position(&self, row: usize) -> i64 {
        self.ids[row].len() as i64
    }

    /// Row `row`'s next-token logits [V] (a copy).
    pub fn logits(&self, row: usize) -> Tensor {
        self.logits.get(row as i64).copy()
    }

    /// Copies of `rows` (repeats allowed) with cache room for `room` more
    /// tokens each: the children of a node, or n samples of one prompt.
    pub fn select(&self, rows: &[usize], room: usize) -> Rows {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let t = Tensor::from_slice(&idx).to_device(self.logits.device());
        Rows {
            cache: self.cache.select_with_room(&idx, room as i64),
            logits: self.logits.index_select(0, &t),
            ids: rows.iter().map(|&r| self.ids[r].clone()).collect(),
        }
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> i64 {
        self.cache.bytes()
    }
}

/// What [`Policy::sync`](crate::Policy::sync) had to redo.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Rows whose cached ids diverged from the target before its end, so
    /// their cache was cut back to the common prefix.
    pub rewound: usize,
    /// Tokens run through the model to bring the rows to their targets.
    pub fed: usize,
}
