//! Caching policies: which steps and blocks the sampler computes and which it
//! serves from earlier results. Each policy is a [`ForwardHooks`]; the
//! paper's HLC/SRAP and the peers' policies join `static:K` here.

use crate::model::stdit3::{BlockAction, BlockId, ForwardHooks, StepAction};
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

/// An acceleration mode by name: `reference` or `static:K`.
pub fn policy(name: &str) -> Result<Box<dyn ForwardHooks>> {
    if name == "reference" {
        return Ok(Box::new(Reference));
    }
    if let Some(k) = name.strip_prefix("static:") {
        match k.parse::<usize>() {
            Ok(k) if k >= 1 => return Ok(Box::new(StaticK { k })),
            _ => bail!("mode {name:?}: K must be a positive integer"),
        }
    }
    bail!("unknown mode {name:?}; known: reference, static:K")
}

/// Wraps a policy and counts the DiT block evaluations it lets happen, and
/// those a full computation would have done.
pub struct Counting<'a> {
    pub inner: &'a mut dyn ForwardHooks,
    pub blocks_computed: usize,
    pub blocks_total: usize,
    pub blocks_per_forward: usize,
}

impl<'a> Counting<'a> {
    pub fn new(inner: &'a mut dyn ForwardHooks, blocks_per_forward: usize) -> Self {
        Counting { inner, blocks_computed: 0, blocks_total: 0, blocks_per_forward }
    }

    /// Fraction of block evaluations actually computed.
    pub fn computed_fraction(&self) -> f64 {
        if self.blocks_total == 0 {
            return 1.0;
        }
        self.blocks_computed as f64 / self.blocks_total as f64
    }
}

impl ForwardHooks for Counting<'_> {
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        self.blocks_total += self.blocks_per_forward;
        self.inner.step_action(step, steps)
    }
    fn block_action(&mut self, id: BlockId) -> BlockAction {
        let a = self.inner.block_action(id);
        if a == BlockAction::Compute {
            self.blocks_computed += 1;
        }
        a
    }
    fn observe(&mut self, name: &str, value: &Tensor) {
        self.inner.observe(name, value)
    }
    fn wants_trace(&self) -> bool {
        self.inner.wants_trace()
    }
    // graph_key stays None: a replayed step would not call block_action, so the count would miss it.
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
}
