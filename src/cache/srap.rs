//! `srap`: Structural Redundancy-Aware Pruning, this project's reading of the
//! QuantCache paper. At a computed step each block's relative contribution
//! `sum |out - in| / sum |in|` is measured; a block whose contribution was below
//! the threshold is skipped whole (identity: none of its kernels run) at the
//! following steps, and measured again every `refresh` steps, so a block that
//! becomes important is brought back. The first `warmup` steps and the last step
//! run every block.

use super::divergence_of;
use crate::backend::{Backend, PendingSums};
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
    /// This step's measures, read back together at the end of the step, and their blocks.
    pending: Vec<PendingSums>,
    pending_of: Vec<BlockId>,
}

impl Srap {
    pub const DEFAULT_THRESHOLD: f32 = 0.1;

    pub fn new(threshold: f32) -> Self {
        Srap { threshold, refresh: 5, warmup: 4, step: 0, last_step: false, measured: HashMap::new(), pending: Vec::new(), pending_of: Vec::new() }
    }

    /// The measures launched during this step, to read back (with another policy's: `hlc+srap`).
    pub fn take_measures(&mut self) -> Vec<PendingSums> {
        std::mem::take(&mut self.pending)
    }

    /// Their sums as read back, in order: the blocks' contributions.
    pub fn apply_measures(&mut self, read: Vec<Vec<(f32, f32)>>) {
        for (id, sums) in std::mem::take(&mut self.pending_of).into_iter().zip(read) {
            self.measured.insert(id, (divergence_of(&sums)[0], self.step));
        }
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
        if let Ok(sums) = be.l1_distance_deferred(output, input, 1) {
            self.pending.push(sums);
            self.pending_of.push(id);
        }
    }
    /// Every block's measure of this step, in one read back.
    fn blocks_output(&mut self, be: &dyn Backend, _x: &mut Tensor) -> anyhow::Result<()> {
        let sums = self.take_measures();
        let read = be.read_sums(&sums)?;
        self.apply_measures(read);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::stdit3::BlockKind;

    /// Two blocks: one adds 5% of its input, one 50%. At threshold 0.1 the first is
    /// skipped after the warm-up, and measured again every `refresh` steps.
    #[test]
    fn blocks_that_add_little_are_skipped_and_remeasured() {
        let be = CpuBackend::new();
        let mut p = Srap::new(0.1);
        let ids = [BlockId { kind: BlockKind::Spatial, index: 0 }, BlockId { kind: BlockKind::Temporal, index: 0 }];
        let input = Tensor::from_f32(&[2, 2], vec![1.0, -2.0, 3.0, 4.0]).unwrap();
        let mut skipped = [Vec::new(), Vec::new()];
        for step in 0..12 {
            p.step_action(step, 12);
            for (b, (id, gain)) in ids.iter().zip([0.05f32, 0.5]).enumerate() {
                if p.block_action(*id) == BlockAction::Skip {
                    skipped[b].push(step);
                } else {
                    let out = Tensor::from_f32(&[2, 2], input.f32().unwrap().iter().map(|v| v * (1.0 + gain)).collect()).unwrap();
                    p.block_io(&be, *id, &input, &out);
                }
            }
            p.blocks_output(&be, &mut input.clone()).unwrap();
        }
        // Warm-up 0..3 computed; measured at 3, skipped 4..7, measured again at 8, skipped 9, 10; the last step computed.
        assert_eq!(skipped[0], vec![4, 5, 6, 7, 9, 10]);
        assert!(skipped[1].is_empty());
    }
}
