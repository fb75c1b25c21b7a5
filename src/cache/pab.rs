//! `pab`: Pyramid Attention Broadcast (Zhao et al., 2024, "Real-Time Video
//! Generation with Pyramid Attention Broadcast"). In the middle of the
//! trajectory, where attention outputs change least from step to step, each
//! attention's output is computed once and broadcast (reused, with the current
//! step's gate) to the following steps; the less an attention varies, the longer
//! its range: spatial every 2 steps, temporal every 4, cross-attention every 6
//! (the paper's pyramid for Open-Sora). MLPs are always computed. Outside the
//! window every attention is computed (and kept for the window's first reuses).

use super::SubCache;
use crate::backend::Backend;
use crate::model::stdit3::{BlockId, BlockKind, ForwardHooks, SubAction, SubModule};
use crate::tensor::Tensor;
use std::collections::HashMap;

/// The policy's parameters and its cache of attention outputs.
pub struct Pab {
    /// Broadcast ranges: one computed step serves this many steps (1 = always compute).
    pub spatial: usize,
    pub temporal: usize,
    pub cross: usize,
    /// Timesteps `[low, high]` (0..1000) inside which attention is broadcast.
    pub window: (f32, f32),
    t: f32,
    step: usize,
    /// Per attention kind: the step it was last computed at.
    computed_at: HashMap<(BlockKind, SubModule), usize>,
    pub kept: SubCache,
}

impl Default for Pab {
    /// The paper's pyramid for Open-Sora (spatial 2, temporal 4, cross 6) in its
    /// broadcast window (timesteps 540 to 930 for spatial and temporal; one window here).
    fn default() -> Self {
        Pab { spatial: 2, temporal: 4, cross: 6, window: (540.0, 930.0), t: 1000.0, step: 0, computed_at: HashMap::new(), kept: SubCache::default() }
    }
}

impl Pab {
    /// The broadcast range of a sub-module (`None`: never broadcast).
    fn range(&self, kind: BlockKind, sub: SubModule) -> Option<usize> {
        match (sub, kind) {
            (SubModule::Mlp, _) => None,
            (SubModule::CrossAttention, _) => Some(self.cross),
            (SubModule::SelfAttention, BlockKind::Spatial) => Some(self.spatial),
            (SubModule::SelfAttention, BlockKind::Temporal) => Some(self.temporal),
        }
    }
}

impl ForwardHooks for Pab {
    fn timestep(&mut self, t: f32) {
        self.t = t;
    }
    fn step_action(&mut self, step: usize, _steps: usize) -> crate::model::stdit3::StepAction {
        if step == 0 {
            self.computed_at.clear();
            self.kept.clear();
        }
        self.step = step;
        crate::model::stdit3::StepAction::Compute
    }
    fn sub_action(&mut self, id: BlockId, sub: SubModule) -> SubAction {
        let Some(range) = self.range(id.kind, sub) else { return SubAction::Compute };
        let inside = self.t >= self.window.0 && self.t <= self.window.1;
        let kind = (id.kind, sub);
        let last = self.computed_at.get(&kind).copied();
        let fresh = last.is_some_and(|s| s != self.step && self.step - s < range);
        if inside && fresh && self.kept.contains(id, sub) {
            return SubAction::Reuse;
        }
        // Computed this step: every block of this kind computes it (the first asked decides).
        self.computed_at.insert(kind, self.step);
        SubAction::ComputeAndStore
    }
    fn store(&mut self, be: &dyn Backend, id: BlockId, sub: SubModule, output: Tensor) {
        self.kept.insert(be, id, sub, output);
    }
    fn cached(&self, id: BlockId, sub: SubModule) -> Option<crate::backend::CachedRef<'_>> {
        self.kept.get(id, sub)
    }
    fn cache_bytes(&self) -> usize {
        self.kept.bytes()
    }
    /// Self- and cross-attention of every block.
    fn cache_bytes_needed(&self, rows: usize, channels: usize, blocks: usize, elem: usize) -> usize {
        2 * blocks * self.kept.precision.tensor_bytes(rows, channels, elem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The actions over 30 steps of timesteps 1000 .. 33: outside the window every
    /// attention is computed; inside it spatial attention is reused 1 step in 2,
    /// temporal 3 in 4, cross 5 in 6; MLPs always computed.
    #[test]
    fn the_pyramid_of_ranges() {
        let mut p = Pab::default();
        let be = crate::backend::cpu::CpuBackend::new();
        let id = |kind, index| BlockId { kind, index };
        let mut reused: HashMap<(BlockKind, SubModule), Vec<usize>> = HashMap::new();
        for step in 0..30 {
            let t = 1000.0 * (1.0 - step as f32 / 30.0);
            p.timestep(t);
            p.step_action(step, 30);
            for kind in [BlockKind::Spatial, BlockKind::Temporal] {
                for index in 0..2 {
                    for sub in [SubModule::SelfAttention, SubModule::CrossAttention, SubModule::Mlp] {
                        match p.sub_action(id(kind, index), sub) {
                            SubAction::Reuse => {
                                assert!(p.cached(id(kind, index), sub).is_some());
                                reused.entry((kind, sub)).or_default().push(step);
                            }
                            SubAction::ComputeAndStore => p.store(&be, id(kind, index), sub, Tensor::zeros(&[1])),
                            SubAction::Compute => assert_eq!(sub, SubModule::Mlp),
                            SubAction::Skip => panic!("pab never skips"),
                        }
                    }
                }
            }
        }
        // Window 540..=930: steps 3 (t 900) to 13 (t 566.7); both blocks of a kind agree.
        let steps = |kind, sub| reused.get(&(kind, sub)).cloned().unwrap_or_default();
        let dedup = |v: Vec<usize>| {
            let mut v = v;
            v.dedup();
            v
        };
        assert_eq!(dedup(steps(BlockKind::Spatial, SubModule::SelfAttention)), vec![3, 5, 7, 9, 11, 13]);
        assert_eq!(dedup(steps(BlockKind::Temporal, SubModule::SelfAttention)), vec![3, 4, 5, 7, 8, 9, 11, 12, 13]);
        assert_eq!(dedup(steps(BlockKind::Spatial, SubModule::CrossAttention)), vec![3, 4, 5, 6, 7, 9, 10, 11, 12, 13]);
        assert!(steps(BlockKind::Spatial, SubModule::Mlp).is_empty());
    }
}
