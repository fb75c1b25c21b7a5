//! Caching policies: which steps and blocks the sampler computes and which it
//! serves from earlier results. Each policy is a [`ForwardHooks`]; the
//! paper's HLC/SRAP and the peers' policies join `static:K` here.

use crate::model::stdit3::{BlockAction, BlockId, ForwardHooks, StepAction, SubAction, SubModule};

pub mod adacache;
pub mod pab;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// `static:K`: compute every K-th step, reuse the last computed velocity in
/// between (the naive baseline every caching policy must beat).
pub struct StaticK {
    pub k: usize,
}

impl ForwardHooks for StaticK {
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        // The first and the last step are always computed.
        if step % self.k == 0 || step + 1 == steps {
            StepAction::Compute
        } else {
            StepAction::ReusePrevious
        }
    }
    /// Every computed step is the full forward.
    fn graph_key(&mut self, _step: usize, _steps: usize) -> Option<u64> {
        Some(0)
    }
}

/// The full computation (the reference every accelerated mode is judged against).
pub struct Reference;
impl ForwardHooks for Reference {
    fn graph_key(&mut self, _step: usize, _steps: usize) -> Option<u64> {
        Some(0)
    }
}

/// The names `policy` accepts.
pub const POLICY_NAMES: &str = "none (or reference), static:K, pab, adacache";

/// A caching policy by name: `none` / `reference` (compute everything), `static:K`, `pab`, `adacache`.
pub fn policy(name: &str) -> Result<Box<dyn ForwardHooks>> {
    if name == "reference" || name == "none" {
        return Ok(Box::new(Reference));
    }
    if name == "pab" {
        return Ok(Box::new(pab::Pab::default()));
    }
    if name == "adacache" {
        return Ok(Box::new(adacache::AdaCache::default()));
    }
    if let Some(k) = name.strip_prefix("static:") {
        match k.parse::<usize>() {
            Ok(k) if k >= 1 => return Ok(Box::new(StaticK { k })),
            _ => bail!("mode {name:?}: K must be a positive integer"),
        }
    }
    bail!("unknown caching policy {name:?}; known: {POLICY_NAMES}")
}

/// Wraps a policy and counts the denoising steps that run the DiT and the
/// DiT block evaluations it lets happen (a block counts when at least one of
/// its sub-modules is computed), against those a full computation would have done. The policy's graph keys pass through, so CUDA graphs still
/// replay: a replayed step calls no hook inside the forward, so it is counted
/// as the eager step of the same key was (same key, same blocks: the
/// [`ForwardHooks::graph_key`] contract).
pub struct Counting<'a> {
    pub inner: &'a mut dyn ForwardHooks,
    pub steps_computed: usize,
    pub blocks_computed: usize,
    pub blocks_total: usize,
    pub blocks_per_forward: usize,
    /// The graph key of the step in progress and the blocks it computed so far.
    step: Option<(Option<u64>, usize)>,
    /// A block the policy computes whose sub-modules have not yet computed anything
    /// (a block whose sub-modules are all reused or skipped is not a block evaluation).
    block_open: bool,
    /// Blocks computed by the last eager step of each graph key.
    per_key: std::collections::HashMap<u64, usize>,
    /// Bytes of the sub-module outputs the policy keeps (the latest per sub-module), and their peak.
    kept_bytes: std::collections::HashMap<(BlockId, SubModule), usize>,
    pub cache_peak_bytes: usize,
}

impl<'a> Counting<'a> {
    pub fn new(inner: &'a mut dyn ForwardHooks, blocks_per_forward: usize) -> Self {
        Counting { inner, steps_computed: 0, blocks_computed: 0, blocks_total: 0, blocks_per_forward, step: None, block_open: false, per_key: Default::default(), kept_bytes: Default::default(), cache_peak_bytes: 0 }
    }

    /// Fraction of block evaluations actually computed.
    pub fn computed_fraction(&self) -> f64 {
        if self.blocks_total == 0 {
            return 1.0;
        }
        self.blocks_computed as f64 / self.blocks_total as f64
    }

    /// Closes the step in progress: a keyed step that called no block hook was replayed.
    fn close_step(&mut self) {
        if let Some((key, blocks)) = self.step.take() {
            match key {
                Some(k) if blocks == 0 => self.blocks_computed += self.per_key.get(&k).copied().unwrap_or(0),
                Some(k) => {
                    self.per_key.insert(k, blocks);
                }
                None => {}
            }
        }
    }

    /// The counts once sampling is over (closes the last step).
    pub fn finish(&mut self) {
        self.close_step();
    }
}

impl ForwardHooks for Counting<'_> {
    fn timestep(&mut self, t: f32) {
        self.inner.timestep(t)
    }
    fn sub_action(&mut self, id: BlockId, sub: SubModule) -> SubAction {
        let a = self.inner.sub_action(id, sub);
        if self.block_open && matches!(a, SubAction::Compute | SubAction::ComputeAndStore) {
            self.block_open = false;
            self.blocks_computed += 1;
            if let Some((_, n)) = &mut self.step {
                *n += 1;
            }
        }
        a
    }
    fn store(&mut self, id: BlockId, sub: SubModule, output: Tensor) {
        self.kept_bytes.insert((id, sub), crate::tensor::byte_len(output.dtype(), output.numel()));
        self.cache_peak_bytes = self.cache_peak_bytes.max(self.kept_bytes.values().sum());
        self.inner.store(id, sub, output)
    }
    fn cached(&self, id: BlockId, sub: SubModule) -> Option<&Tensor> {
        self.inner.cached(id, sub)
    }
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        self.close_step();
        self.blocks_total += self.blocks_per_forward;
        let a = self.inner.step_action(step, steps);
        if a == StepAction::Compute {
            self.steps_computed += 1;
            self.step = Some((None, 0));
        }
        a
    }
    fn block_action(&mut self, id: BlockId) -> BlockAction {
        let a = self.inner.block_action(id);
        self.block_open = a == BlockAction::Compute;
        a
    }
    fn observe(&mut self, name: &str, value: &Tensor) {
        self.inner.observe(name, value)
    }
    fn wants_trace(&self) -> bool {
        self.inner.wants_trace()
    }
    fn graph_key(&mut self, step: usize, steps: usize) -> Option<u64> {
        let key = self.inner.graph_key(step, steps);
        if let Some((k, _)) = &mut self.step {
            *k = key;
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_k_computes_every_kth_and_the_last_step() {
        let mut p = StaticK { k: 3 };
        let computed: Vec<usize> = (0..8).filter(|&i| p.step_action(i, 8) == StepAction::Compute).collect();
        assert_eq!(computed, vec![0, 3, 6, 7]);
        assert!(policy("static:0").is_err() && policy("magic").is_err() && policy("static:2").is_ok());
    }

    /// The sampler's hook calls for 7 steps of static:3 with CUDA graphs: computed steps 0, 3
    /// and 6; step 0 runs eagerly (4 blocks), step 3 is a replay (no block hook), step 6 (the
    /// last) eagerly again. Every computed step counts its 4 blocks.
    #[test]
    fn counting_sees_replayed_steps() {
        let mut inner = StaticK { k: 3 };
        let mut c = Counting::new(&mut inner, 4);
        let id = BlockId { kind: crate::model::stdit3::BlockKind::Spatial, index: 0 };
        for step in 0..7 {
            if c.step_action(step, 7) == StepAction::Compute {
                assert_eq!(c.graph_key(step, 7), Some(0));
                if step != 3 {
                    for _ in 0..4 {
                        c.block_action(id);
                        for sub in [SubModule::SelfAttention, SubModule::CrossAttention, SubModule::Mlp] {
                            c.sub_action(id, sub);
                        }
                    }
                }
            }
        }
        c.finish();
        assert_eq!((c.steps_computed, c.blocks_computed, c.blocks_total), (3, 12, 28));
    }

    /// A block whose sub-modules are all reused (or skipped) is not a block evaluation;
    /// one computed sub-module makes it one.
    #[test]
    fn counting_counts_blocks_that_compute_something() {
        struct Reusing(bool);
        impl ForwardHooks for Reusing {
            fn sub_action(&mut self, _id: BlockId, sub: SubModule) -> SubAction {
                if self.0 && sub == SubModule::Mlp { SubAction::Compute } else { SubAction::Reuse }
            }
        }
        let id = BlockId { kind: crate::model::stdit3::BlockKind::Temporal, index: 1 };
        for (mlp, want) in [(false, 0), (true, 1)] {
            let mut inner = Reusing(mlp);
            let mut c = Counting::new(&mut inner, 1);
            c.step_action(0, 1);
            c.block_action(id);
            for sub in [SubModule::SelfAttention, SubModule::CrossAttention, SubModule::Mlp] {
                c.sub_action(id, sub);
            }
            c.finish();
            assert_eq!((c.blocks_computed, c.blocks_total), (want, 1));
        }
        // Kept outputs: the latest per sub-module, their peak in bytes.
        let mut inner = Reusing(false);
        let mut c = Counting::new(&mut inner, 1);
        c.store(id, SubModule::Mlp, Tensor::zeros(&[4, 8]));
        c.store(id, SubModule::Mlp, Tensor::zeros(&[4, 8]));
        c.store(id, SubModule::SelfAttention, Tensor::zeros(&[2, 8]));
        assert_eq!(c.cache_peak_bytes, 4 * (32 + 16));
    }
}
