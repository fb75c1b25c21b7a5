//! A caching schedule recorded on one model (by [`super::Counting`] with a
//! `schedule`) and replayed on another (the same
//! decisions at every step, block and sub-module), so that a policy's speed can
//! be timed at full Open-Sora width with the decisions it makes on the
//! demonstration model (`qc-bench schedule`). Blocks of the second model take
//! the decisions of the first model's block at the same relative depth.

use super::SubCache;
use crate::backend::{Backend, CachedRef};
use crate::model::stdit3::{BlockAction, BlockId, ForwardHooks, StepAction, SubAction, SubModule};
use crate::tensor::Tensor;
use anyhow::Result;
use std::collections::HashMap;

/// One step's decisions.
#[derive(Clone, Debug, Default)]
pub struct StepRecord {
    pub action: Option<StepAction>,
    /// The policy's extrapolation slope at this step (1 when not recorded).
    pub slope: Option<f32>,
    pub blocks: HashMap<BlockId, BlockAction>,
    pub subs: HashMap<(BlockId, SubModule), SubAction>,
}

impl StepRecord {
    /// Whether the step ran the DiT and skipped every block (TeaCache's reuse of the stack residual).
    fn stack_reused(&self) -> bool {
        matches!(self.action, Some(StepAction::Compute)) && !self.blocks.is_empty() && self.blocks.values().all(|a| *a == BlockAction::Skip)
    }
}

/// Replays recorded decisions on a model of `depth` block pairs, recorded on one of `recorded_depth`.
pub struct Replay {
    steps: Vec<StepRecord>,
    depth: usize,
    recorded_depth: usize,
    step: usize,
    kept: SubCache,
    stack_input: Option<Tensor>,
    stack_residual: Option<Tensor>,
}

impl Replay {
    pub fn new(steps: Vec<StepRecord>, recorded_depth: usize, depth: usize) -> Self {
        Replay { steps, depth, recorded_depth: recorded_depth.max(1), step: 0, kept: SubCache::default(), stack_input: None, stack_residual: None }
    }

    /// The recorded block whose decisions block `id` takes.
    fn source(&self, id: BlockId) -> BlockId {
        BlockId { kind: id.kind, index: id.index * self.recorded_depth / self.depth.max(1) }
    }

    fn record(&self) -> Option<&StepRecord> {
        self.steps.get(self.step)
    }
}

impl ForwardHooks for Replay {
    fn step_action(&mut self, step: usize, _steps: usize) -> StepAction {
        self.step = step;
        self.record().and_then(|r| r.action).unwrap_or(StepAction::Compute)
    }
    fn extrapolation_slope(&self) -> f32 {
        self.record().and_then(|r| r.slope).unwrap_or(1.0)
    }
    fn block_action(&mut self, id: BlockId) -> BlockAction {
        let src = self.source(id);
        self.record().and_then(|r| r.blocks.get(&src).copied()).unwrap_or(BlockAction::Compute)
    }
    fn sub_action(&mut self, id: BlockId, sub: SubModule) -> SubAction {
        let src = self.source(id);
        match self.record().and_then(|r| r.subs.get(&(src, sub)).copied()).unwrap_or(SubAction::Compute) {
            SubAction::Reuse if !self.kept.contains(id, sub) => SubAction::ComputeAndStore,
            a => a,
        }
    }
    fn store(&mut self, be: &dyn Backend, id: BlockId, sub: SubModule, output: Tensor) {
        self.kept.insert(be, id, sub, output)
    }
    fn cached(&self, id: BlockId, sub: SubModule) -> Option<CachedRef<'_>> {
        self.kept.get(id, sub)
    }
    fn blocks_input(&mut self, _be: &dyn Backend, x: &Tensor, _modulated: Option<&Tensor>) {
        self.stack_input = Some(x.clone());
    }
    /// TeaCache's steps: the stack's residual kept at computed steps, added where every block was skipped.
    fn blocks_output(&mut self, be: &dyn Backend, x: &mut Tensor) -> Result<()> {
        let input = self.stack_input.take();
        match (self.record().is_some_and(StepRecord::stack_reused), &self.stack_residual, input) {
            (true, Some(r), _) => be.add_gated(x, r, None),
            (false, _, Some(input)) if self.steps.iter().any(StepRecord::stack_reused) => {
                self.stack_residual = Some(be.axpby(1.0, x, -1.0, &input)?);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
