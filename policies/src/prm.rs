//! MedS3's process reward model head: a 2-class token classifier on the
//! policy's backbone, read at the last token of each reasoning step. Training
//! and scoring go through [`ValueHead::log_probs_at`], one softmax over the
//! two classes (MedS3's public code trains a sigmoid on one logit and scores
//! with a softmax over two; here the two cannot disagree).

use crate::policy::Policy;
use tch::{Kind, Tensor, nn};

/// Variables under `score.*`, as HF's `*ForTokenClassification` names them.
pub struct ValueHead {
    w: Tensor,
    b: Tensor,
}

impl ValueHead {
    pub fn new(p: &nn::Path, hidden: i64) -> ValueHead {
        let p = p / "score";
        ValueHead {
            w: p.var(
                "weight",
                &[2, hidden],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            b: p.var("bias", &[2], nn::Init::Const(0.0)),
        }
    }

    /// Log-probabilities of (wrong, correct) [B, K, 2] at `positions` [B, K]
    /// of the backbone's hidden states [B, T, H].
    pub fn log_probs_at(&self, hidden: &Tensor, positions: &Tensor) -> Tensor {
        let (b, k) = (positions.size()[0], positions.size()[1]);
        let h = hidden.size()[2];
        let idx = positions
            .to_device(hidden.device())
            .unsqueeze(-1)
            .expand([b, k, h], false);
        let picked = hidden.gather(1, &idx, false);
        picked
            .linear(&self.w, Some(&self.b))
            .log_softmax(-1, Kind::Float)
    }

    /// P(correct) at each position: the step scores P-VS and the other
    /// selection rules use.
    pub fn scores(
        &self,
        policy: &Policy,
        ids: &Tensor,
        mask: &Tensor,
        positions: &Tensor,
    ) -> Tensor {
        self.log_probs_at(&policy.hidden(ids, mask), positions)
            .select(-1, 1)
            .exp()
    }

    /// Soft-label cross-entropy, `-(y log p + (1 - y) log(1 - p))`, averaged
    /// over the positions `label_mask` [B, K] marks (step 0 is unlabelled).
    pub fn loss(
        &self,
        policy: &Policy,
        ids: &Tensor,
        mask: &Tensor,
        positions: &Tensor,
        labels: &Tensor,
        label_mask: &Tensor,
    ) -> Tensor {
        let lp = self.log_probs_at(&policy.hidden(ids, mask), positions);
        let device = lp.device();
        let y = labels.to_device(device).to_kind(Kind::Float);
        let m = label_mask.to_device(device).to_kind(Kind::Float);
        let not_y: Tensor = y.neg() + 1.0;
        let nll: Tensor = -(&y * lp.select(-1, 1) + not_y * lp.select(-1, 0));
        (nll * &m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0)
    }
}
