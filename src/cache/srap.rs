//! `srap`: Structural Redundancy-Aware Pruning, this project's reading of the
//! QuantCache paper. At a computed step each block's relative contribution
//! `sum |out - in| / sum |in|` is measured; a block whose contribution was below
//! the threshold is skipped whole (identity: none of its kernels run) at the
//! following steps, and measured again every `refresh` steps, so a block that
//! becomes important is brought back. The first `warmup` steps and the last step
//! run every block.

use super::divergence;
use crate::backend::Backend;
use crate::model::stdit3::{BlockAction, BlockId, ForwardHooks, StepAction};
use crate::tensor::Tensor;
use std::collections::HashMap;

pub struct Srap {
    pub threshold: f32,
    pub refresh: usize,
    pub warmup: usize,
    step: usize,
    last_step: bool,
    /// Per block: its relative contribution and the step it was measured at.
    measured: HashMap<BlockId, (f32, usize)>,
}

impl Srap {
    pub const DEFAULT_THRESHOLD: f32 = 0.1;

    pub fn new(threshold: f32) -> Self {
        Srap { threshold, refresh: 5, warmup: 4, step: 0, last_step: false, measured: HashMap::new() }
    }

    /// Whether block `id` is skipped at this step.
    fn skips(&self, id: BlockId) -> bool {
        if self.step < self.warmup || self.last_step {
            return false;
        }
        self.measured.get(&id).is_some_and(|&(c, at)| c < self.threshold && self.step - at < self.refresh)
    }
}

impl ForwardHooks for Srap {
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        if step == 0 {
            self.measured.clear();
        }
        (self.step, self.last_step) = (step, step + 1 == steps);
        StepAction::Compute
    }
    fn block_action(&mut self, id: BlockId) -> BlockAction {
        if self.skips(id) {
            BlockAction::Skip
        } else {
            BlockAction::Compute
        }
    }
    fn wants_block_io(&self, _id: BlockId) -> bool {
        true
    }
    fn block_io(&mut self, be: &dyn Backend, id: BlockId, input: &Tensor, output: &Tensor) {
        // sum |out - in| / sum |in|: the divergence of the output from the input.
        if let Ok(d) = divergence(be, output, input, 1) {
            self.measured.insert(id, (d[0], self.step));
        }
    }
}
