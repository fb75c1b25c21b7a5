//! `adacache`: Adaptive Caching (Kahatapitiya et al., 2024, "Adaptive Caching
//! for Faster Video Generation with Diffusion Transformers"). After each computed
//! step, the rate of change of a probe block's residual (its self-attention output
//! before the gate, against the one of the previous computed step, relative L1 per
//! step between them) is looked up in a codebook that says how many of the
//! following steps reuse every block's cached sub-module outputs (with the current
//! gates): slowly changing features are reused longer. The first and the last
//! steps are computed.

use super::{divergence, SubCache};
use crate::backend::Backend;
use crate::model::stdit3::{BlockId, BlockKind, ForwardHooks, StepAction, SubAction, SubModule};
use crate::tensor::Tensor;

pub struct AdaCache {
    /// `(bound, steps)`, ascending bounds: a rate below `bound` means the
    /// computed step serves `steps` steps (itself included).
    pub codebook: Vec<(f32, usize)>,
    /// The block whose self-attention output is measured.
    pub probe: BlockId,
    reuse_left: usize,
    reusing: bool,
    step: usize,
    steps: usize,
    last_probe: Option<(usize, Tensor)>,
    pub kept: SubCache,
}

impl Default for AdaCache {
    /// The paper's codebook shape, scaled to 30-step schedules: rates under 0.08
    /// per step keep a result 6 steps, ... above 0.40 recompute every step.
    fn default() -> Self {
        let codebook = vec![(0.08, 6), (0.16, 5), (0.24, 4), (0.32, 3), (0.40, 2), (f32::INFINITY, 1)];
        AdaCache { codebook, probe: BlockId { kind: BlockKind::Spatial, index: 0 }, reuse_left: 0, reusing: false, step: 0, steps: 0, last_probe: None, kept: SubCache::default() }
    }
}

impl AdaCache {
    /// Steps a computed result serves at this rate of change.
    fn steps_for(&self, rate: f32) -> usize {
        self.codebook.iter().find(|(bound, _)| rate < *bound).map_or(1, |c| c.1.max(1))
    }
}

impl ForwardHooks for AdaCache {
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        if step == 0 {
            let precision = self.kept.precision;
            *self = AdaCache { codebook: std::mem::take(&mut self.codebook), probe: self.probe, ..AdaCache::default() };
            self.kept.precision = precision;
        }
        (self.step, self.steps) = (step, steps);
        self.reusing = self.reuse_left > 0 && step + 1 < steps;
        self.reuse_left = self.reuse_left.saturating_sub(1);
        StepAction::Compute
    }
    fn sub_action(&mut self, id: BlockId, sub: SubModule) -> SubAction {
        if self.reusing && self.kept.contains(id, sub) {
            SubAction::Reuse
        } else {
            SubAction::ComputeAndStore
        }
    }
    fn store(&mut self, be: &dyn Backend, id: BlockId, sub: SubModule, output: Tensor) {
        if id == self.probe && sub == SubModule::SelfAttention {
            // The rate of change since the last computed step decides how long this one serves.
            if let Some((at, before)) = &self.last_probe {
                if let Ok(d) = divergence(be, &output, before, 1) {
                    self.reuse_left = self.steps_for(d[0] / (self.step - at).max(1) as f32) - 1;
                }
            }
            self.last_probe = Some((self.step, output.clone()));
        }
        self.kept.insert(be, id, sub, output);
    }
    fn cached(&self, id: BlockId, sub: SubModule) -> Option<crate::backend::CachedRef<'_>> {
        self.kept.get(id, sub)
    }
    fn cache_bytes(&self) -> usize {
        self.kept.bytes()
    }
    /// Every sub-module of every block, and the probe's last output.
    fn cache_bytes_needed(&self, rows: usize, channels: usize, blocks: usize, elem: usize) -> usize {
        3 * blocks * self.kept.precision.tensor_bytes(rows, channels, elem) + rows * channels * elem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the policy as the forward does, with a probe output whose change per
    /// step is given: slow change -> long reuse, fast change -> every step computed.
    fn schedule(change: f32) -> Vec<bool> {
        let mut p = AdaCache::default();
        let probe = p.probe;
        let mut value = 1.0f32;
        (0..30)
            .map(|step| {
                p.step_action(step, 30);
                match p.sub_action(probe, SubModule::SelfAttention) {
                    SubAction::Reuse => false,
                    _ => {
                        value *= 1.0 + change;
                        p.store(&crate::backend::cpu::CpuBackend::new(), probe, SubModule::SelfAttention, Tensor::from_f32(&[4], vec![value; 4]).unwrap());
                        true
                    }
                }
            })
            .collect()
    }

    #[test]
    fn the_codebook_sets_the_reuse_length() {
        let computed = |c: &[bool]| (0..30).filter(|&i| c[i]).collect::<Vec<_>>();
        // Changing 1% per step (a relative L1 of about 0.01 per step): after the two steps
        // that measure it, each computed step serves 6.
        let slow = schedule(0.01);
        assert_eq!(computed(&slow), vec![0, 1, 7, 13, 19, 25, 29]);
        // Changing 50% per step: everything computed.
        assert!(schedule(0.5).iter().all(|&c| c));
        assert_eq!(AdaCache::default().steps_for(0.2), 4);
    }
}
