//! `teacache`: Timestep Embedding Aware Cache (Liu et al., 2024). At every step
//! the first block's timestep-modulated input `modulate(norm1(x))` is compared
//! with the previous step's: relative L1, rescaled by a polynomial fitted to how
//! the model output moves with it, accumulated over the steps since the last
//! computation. While the sum stays under the threshold the blocks are skipped
//! and the block stack's cached residual (its output minus its input at the last
//! computed step) is added to the new input; the embedders and the final layer
//! run every step. The first and the last steps are computed.

use super::divergence;
use crate::backend::Backend;
use crate::model::stdit3::{BlockAction, BlockId, ForwardHooks, StepAction};
use crate::tensor::Tensor;
use anyhow::Result;

pub struct TeaCache {
    pub threshold: f32,
    /// Rescaling polynomial, highest power first (numpy's `poly1d` order).
    pub coefficients: Vec<f64>,
    state: State,
}

#[derive(Default)]
struct State {
    first_or_last: bool,
    previous_modulated: Option<Tensor>,
    accumulated: f64,
    reuse: bool,
    input: Option<Tensor>,
    residual: Option<Tensor>,
}

impl TeaCache {
    pub const DEFAULT_THRESHOLD: f32 = 0.1;

    /// With `coefficients` (highest power first); `[1, 0]` is no rescaling.
    pub fn new(threshold: f32, coefficients: Vec<f64>) -> Self {
        TeaCache { threshold, coefficients, state: State::default() }
    }

    fn rescale(&self, d: f64) -> f64 {
        self.coefficients.iter().fold(0.0, |acc, c| acc * d + c)
    }
}

impl ForwardHooks for TeaCache {
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        if step == 0 {
            self.state = State::default();
        }
        self.state.first_or_last = step == 0 || step + 1 == steps;
        StepAction::Compute
    }
    fn wants_modulated_input(&self) -> bool {
        true
    }
    fn blocks_input(&mut self, be: &dyn Backend, x: &Tensor, modulated: Option<&Tensor>) {
        let distance = match (modulated, &self.state.previous_modulated) {
            (Some(m), Some(p)) => divergence(be, m, p, 1).ok().map(|d| d[0] as f64),
            _ => None,
        };
        let rescaled = distance.map(|d| self.rescale(d));
        let s = &mut self.state;
        s.reuse = false;
        match rescaled {
            Some(rescaled) if !s.first_or_last && s.residual.is_some() => {
                let acc = s.accumulated + rescaled;
                if acc < self.threshold as f64 {
                    s.accumulated = acc;
                    s.reuse = true;
                } else {
                    s.accumulated = 0.0;
                }
            }
            _ => s.accumulated = 0.0,
        }
        s.previous_modulated = modulated.cloned();
        s.input = (!s.reuse).then(|| x.clone());
    }
    fn block_action(&mut self, _id: BlockId) -> BlockAction {
        if self.state.reuse {
            BlockAction::Skip
        } else {
            BlockAction::Compute
        }
    }
    fn blocks_output(&mut self, be: &dyn Backend, x: &mut Tensor) -> Result<()> {
        let s = &mut self.state;
        match (s.reuse, s.input.take(), &s.residual) {
            (true, _, Some(r)) => be.add_gated(x, r, None),
            (false, Some(input), _) => {
                s.residual = Some(be.axpby(1.0, x, -1.0, &input)?);
                Ok(())
            }
            _ => Ok(()),
        }
    }
    /// The stack's residual, the previous modulated input and the stack's input.
    fn cache_bytes_needed(&self, rows: usize, channels: usize, _blocks: usize, elem: usize) -> usize {
        3 * rows * channels * elem
    }
    fn cache_bytes(&self) -> usize {
        [&self.state.residual, &self.state.previous_modulated].iter().filter_map(|t| t.as_ref()).map(|t| crate::tensor::byte_len(t.dtype(), t.numel())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescaling_is_horner_in_numpy_order() {
        let t = TeaCache::new(0.1, vec![2.0, -1.0, 0.5]);
        assert_eq!(t.rescale(3.0), 2.0 * 9.0 - 3.0 + 0.5);
    }
}

#[cfg(test)]
mod decision_tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// The modulated input changes by `d` (relative L1) each step; no rescaling.
    /// At threshold 0.1 and d = 0.03, three steps accumulate under it: each
    /// computed step is followed by three skipped ones, which add the cached residual.
    #[test]
    fn accumulated_distance_decides_and_the_residual_is_reused() {
        let be = CpuBackend::new();
        let mut p = TeaCache::new(0.1, vec![1.0, 0.0]);
        let mut computed = Vec::new();
        let mut m = 1.0f32;
        for step in 0..10 {
            p.step_action(step, 10);
            let x = Tensor::from_f32(&[1, 2], vec![1.0, 2.0]).unwrap();
            p.blocks_input(&be, &x, Some(&Tensor::from_f32(&[1, 2], vec![m, m]).unwrap()));
            m *= 1.03;
            let skip = p.block_action(BlockId { kind: crate::model::stdit3::BlockKind::Spatial, index: 0 }) == BlockAction::Skip;
            // Computed: the blocks add (0.5, 0.5); skipped: the cached residual must add the same.
            let mut out = if skip { x.clone() } else { Tensor::from_f32(&[1, 2], vec![1.5, 2.5]).unwrap() };
            p.blocks_output(&be, &mut out).unwrap();
            assert_eq!(out.f32().unwrap(), &[1.5, 2.5], "step {step}");
            if !skip {
                computed.push(step);
            }
        }
        assert_eq!(computed, vec![0, 4, 8, 9]);
    }
}
