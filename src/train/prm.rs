//! MedS3's process reward model as a training objective: soft-label
//! cross-entropy of the 2-class head at the last token of each step, the
//! backbone trained with it.

use super::{BatchLoss, MicroLoss};
use anyhow::Result;
use medzero_policies::Policy;
use medzero_policies::prm::ValueHead;
use tch::Tensor;

/// One PRM training sequence: token ids, the last token of each step, and
/// each step's label.
pub struct PrmExample {
    pub ids: Vec<i64>,
    pub step_ends: Vec<i64>,
    pub labels: Vec<f64>,
}

/// Soft-label cross-entropy on the head, the backbone trained with it; a
/// step's micro-batches weigh by their share of the step.
pub struct PrmLoss<'a> {
    pub head: &'a ValueHead,
    pub data: Vec<PrmExample>,
    pub pad: i64,
}

impl BatchLoss for PrmLoss<'_> {
    fn items(&self) -> usize {
        self.data.len()
    }

    fn micro_loss(
        &mut self,
        policy: &Policy,
        step: &[usize],
        micro: &[usize],
    ) -> Result<MicroLoss> {
        let picked: Vec<&PrmExample> = micro.iter().map(|&i| &self.data[i]).collect();
        let ids: Vec<Vec<i64>> = picked.iter().map(|e| e.ids.clone()).collect();
        let (ids, mask) = medzero_policies::generate::pad_right_to(&ids, self.pad, 16);
        let k = picked
            .iter()
            .map(|e| e.step_ends.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut positions = Vec::with_capacity(picked.len() * k);
        let mut labels = Vec::with_capacity(picked.len() * k);
        let mut label_mask = Vec::with_capacity(picked.len() * k);
        for e in &picked {
            for j in 0..k {
                positions.push(*e.step_ends.get(j).unwrap_or(&0));
                labels.push(*e.labels.get(j).unwrap_or(&0.0) as f32);
                label_mask.push((j < e.step_ends.len()) as u8 as f32);
            }
        }
        let shape = [picked.len() as i64, k as i64];
        let loss = self.head.loss(
            policy,
            &ids,
            &mask,
            &Tensor::from_slice(&positions).view(shape),
            &Tensor::from_slice(&labels).view(shape),
            &Tensor::from_slice(&label_mask).view(shape),
        );
        Ok(MicroLoss {
            loss: loss * (micro.len() as f64 / step.len() as f64),
            tokens: mask.sum(tch::Kind::Int64).int64_value(&[]) as u64,
            metrics: Vec::new(),
        })
    }
}
