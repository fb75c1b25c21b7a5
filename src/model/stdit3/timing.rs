//! Wall time of each part of the STDiT3 forward, summed per thread while
//! switched on (`qc-bench quality --parts`). It shows where a step's time goes
//! inside the real sampling loop, for each mode beside the reference in the
//! same run: on a machine whose speed drifts by tens of percent between runs,
//! these shares stay comparable where separately timed ops do not. Off, a
//! part costs one thread-local read.

use std::cell::RefCell;
use std::time::Instant;

/// The parts, in forward order. Every span of a block part lies inside the
/// forward's; the block parts do not overlap each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Forward,
    /// Patch and timestep embeddings, before the first block.
    Embedding,
    Modulation,
    NormQkv,
    QkvOperands,
    SpatialAttention,
    TemporalAttention,
    AttentionProjection,
    CrossQuery,
    CrossAttention,
    CrossProjection,
    /// Norm, fc1, GELU, fc2 and the residual: one backend op.
    Mlp,
    /// Sub-modules served from the cache (the cached-residual reuse op).
    CachedReuse,
    FinalLayer,
}

pub const PARTS: [(Part, &str); 14] = [
    (Part::Forward, "whole forward"),
    (Part::Embedding, "embeddings"),
    (Part::Modulation, "modulation tables"),
    (Part::NormQkv, "norm + qkv linear"),
    (Part::QkvOperands, "qk norm, RoPE, split"),
    (Part::SpatialAttention, "spatial attention"),
    (Part::TemporalAttention, "temporal attention + row swap back"),
    (Part::AttentionProjection, "attention proj + residual"),
    (Part::CrossQuery, "cross-attention q linear"),
    (Part::CrossAttention, "cross-attention"),
    (Part::CrossProjection, "cross proj + residual"),
    (Part::Mlp, "MLP: norm, fc1, GELU, fc2, residual"),
    (Part::CachedReuse, "cached-residual reuse"),
    (Part::FinalLayer, "final layer"),
];

// PARTS lists the parts in declaration order: a part's index is `part as usize`.
const _: () = {
    let mut i = 0;
    while i < PARTS.len() {
        assert!(PARTS[i].0 as usize == i);
        i += 1;
    }
};

/// Seconds and calls of each part of [`PARTS`].
pub type Totals = [(f64, u64); PARTS.len()];

#[derive(Default)]
struct State {
    on: bool,
    slot: usize,
    slots: Vec<Totals>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Starts summing this thread's forwards into slot 0, from zero.
pub fn start() {
    STATE.with(|s| *s.borrow_mut() = State { on: true, ..State::default() });
}

/// Sums the following forwards into `slot` (the harness: one per mode).
pub fn select(slot: usize) {
    STATE.with(|s| s.borrow_mut().slot = slot);
}

/// Stops summing; returns the totals of every slot used.
pub fn stop() -> Vec<Totals> {
    STATE.with(|s| std::mem::take(&mut *s.borrow_mut()).slots)
}

/// Times `part` until dropped, when summing is on.
pub fn span(part: Part) -> Span {
    Span(STATE.with(|s| s.borrow().on).then(|| (part, Instant::now())))
}

pub struct Span(Option<(Part, Instant)>);

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((part, t0)) = self.0 {
            let secs = t0.elapsed().as_secs_f64();
            STATE.with(|s| {
                let mut s = s.borrow_mut();
                let slot = s.slot;
                if s.slots.len() <= slot {
                    s.slots.resize(slot + 1, [(0.0, 0); PARTS.len()]);
                }
                s.slots[slot][part as usize].0 += secs;
                s.slots[slot][part as usize].1 += 1;
            });
        }
    }
}

/// Seconds and calls of `part` in `totals`.
pub fn of(totals: &Totals, part: Part) -> (f64, u64) {
    totals[part as usize]
}
