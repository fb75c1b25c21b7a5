//! STDiT3 (Open-Sora 1.2's DiT), computed exactly as `opensora/models/stdit/stdit3.py` v1.2.0.

mod config;
pub mod inputs;
pub mod timing;
mod weights;

pub use config::Stdit3Config;
pub use weights::{BlockWeights, Stdit3Weights, SubModule};

use crate::backend::{Activation, AttnSpec, Backend, CachedRef, ModRef, PatchGrid, Rope, RowGroups};
use crate::checkpoint::Checkpoint;
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::Path;
use timing::{span, Part};

const NORM_EPS: f32 = 1e-6;
const FREQ_DIM: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockKind {
    Spatial,
    Temporal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockId {
    pub kind: BlockKind,
    pub index: usize,
}

/// What the executor does with one block in this forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockAction {
    Compute,
    /// Identity: the block's work is not done at all.
    Skip,
}

/// What the executor does with one sub-module (self-attention, cross-attention,
/// MLP) of a block it computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubAction {
    /// Compute it (the fused kernels).
    Compute,
    /// Compute it and hand its output before the gate to
    /// [`ForwardHooks::store`], for reuse at later steps.
    ComputeAndStore,
    /// Do not compute it: add `gate * cached` with this step's gate and the
    /// output [`ForwardHooks::cached`] holds (the cached-residual reuse op).
    Reuse,
    /// Leave it out (identity): its work is not done at all.
    Skip,
}

/// What the sampler does at one denoising step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepAction {
    Compute,
    /// Reuse the previous step's guided velocity: the DiT is not run at all.
    ReusePrevious,
    /// Extrapolate the conditional and unconditional velocities of the last two
    /// computed steps in t along their line, the slope scaled by the policy's
    /// [`ForwardHooks::extrapolation_slope`] (the previous one when only one was
    /// computed): the DiT is not run at all.
    Extrapolate,
    /// Run the DiT on the conditional half only and extrapolate the unconditional
    /// velocity (classifier-free-guidance halves deciding separately): half the rows.
    /// Block hooks are not called in such a forward (caches hold both halves).
    ComputeConditional,
}

/// Callbacks through which policies (caching, pruning) steer sampling and the
/// forward, and tracing observes it. Every method defaults to "compute, ignore".
pub trait ForwardHooks {
    /// Called by the sampler before each step's `step_action` with the step's
    /// timestep (0..1000, the first sample's).
    fn timestep(&mut self, _t: f32) {}
    /// Called by the sampler before step `step` of `steps`.
    fn step_action(&mut self, _step: usize, _steps: usize) -> StepAction {
        StepAction::Compute
    }
    /// The fraction of the line's slope an extrapolated velocity follows
    /// ([`StepAction::Extrapolate`], [`StepAction::ComputeConditional`]): 1 is
    /// linear extrapolation, 0 the last computed velocity.
    fn extrapolation_slope(&self) -> f32 {
        1.0
    }
    fn block_action(&mut self, _id: BlockId) -> BlockAction {
        BlockAction::Compute
    }
    /// For a computed block, what happens to each of its sub-modules.
    fn sub_action(&mut self, _id: BlockId, _sub: SubModule) -> SubAction {
        SubAction::Compute
    }
    /// Receives a sub-module's output before the gate (`[B * N, C]`, the whole
    /// classifier-free-guidance batch) when its action was `ComputeAndStore`.
    fn store(&mut self, _be: &dyn Backend, _id: BlockId, _sub: SubModule, _output: Tensor) {}
    /// Whether [`ForwardHooks::block_io`] wants block `id`'s input and output this step.
    fn wants_block_io(&self, _id: BlockId) -> bool {
        false
    }
    /// A computed block's input and output (`[B * N, C]`), when `wants_block_io`.
    fn block_io(&mut self, _be: &dyn Backend, _id: BlockId, _input: &Tensor, _output: &Tensor) {}
    /// Whether [`ForwardHooks::blocks_input`] wants the timestep-modulated input of
    /// the first block (`modulate(norm1(x))`, TeaCache's signal) this step.
    fn wants_modulated_input(&self) -> bool {
        false
    }
    /// The embedded tokens entering the block stack and, when asked, the first
    /// spatial block's modulated input; called before any block hook of the step.
    fn blocks_input(&mut self, _be: &dyn Backend, _x: &Tensor, _modulated: Option<&Tensor>) {}
    /// The tokens leaving the block stack, in place: a policy may keep
    /// `x - input` (the stack's residual) or, at a step where it skipped every
    /// block, add its kept residual.
    fn blocks_output(&mut self, _be: &dyn Backend, _x: &mut Tensor) -> Result<()> {
        Ok(())
    }
    /// Bytes the policy's caches hold now (reported as the cache's peak).
    fn cache_bytes(&self) -> usize {
        0
    }
    /// Bytes the policy's caches will hold at most for forwards of `rows` tokens of
    /// `channels` over `blocks` blocks, at `elem` bytes per value as computed (4 for
    /// f32 on the CPU, 2 for the GPU's bf16): checked against the memory before sampling.
    fn cache_bytes_needed(&self, _rows: usize, _channels: usize, _blocks: usize, _elem: usize) -> usize {
        0
    }
    /// The output stored for a sub-module, which a `Reuse` action adds.
    fn cached(&self, _id: BlockId, _sub: SubModule) -> Option<CachedRef<'_>> {
        None
    }
    /// Named intermediates, called only when `wants_trace` is true.
    fn observe(&mut self, _name: &str, _value: &Tensor) {}
    fn wants_trace(&self) -> bool {
        false
    }
    /// Whether a computing step may be replayed from a device graph (CUDA
    /// graphs) captured at an earlier step: steps with the same `Some(key)`
    /// must run the same ops in the same order on the same shapes, i.e. the same
    /// `block_action` answers and no tracing, because a replayed step calls no
    /// hook inside the forward. `None` (the default, always safe) runs the step
    /// eagerly. Called after `step_action`, for steps that run the DiT, on
    /// backends with graphs; a policy whose block actions vary gives each
    /// pattern its own key. When a capture fails, that step's forward (and its
    /// hooks) runs a second time, eagerly.
    fn graph_key(&mut self, _step: usize, _steps: usize) -> Option<u64> {
        None
    }
}

/// The full computation: every step and block, no tracing.
pub struct NoHooks;
impl ForwardHooks for NoHooks {
    fn graph_key(&mut self, _step: usize, _steps: usize) -> Option<u64> {
        Some(0)
    }
}

/// Collects the intermediates under the fixtures' names (`act.*`).
#[derive(Default)]
pub struct Trace {
    pub tensors: Vec<(String, Tensor)>,
}

impl ForwardHooks for Trace {
    fn observe(&mut self, name: &str, value: &Tensor) {
        self.tensors.push((format!("act.{name}"), value.clone()));
    }
    fn wants_trace(&self) -> bool {
        true
    }
}

/// Text conditioning prepared once per prompt batch: the valid caption tokens
/// of every sample, packed, and each block's cross-attention keys and values
/// (they do not depend on the latent, so a sampling loop computes them once).
pub struct TextCond {
    pub batch: usize,
    /// Sample `b` owns token rows `offsets[b]..offsets[b + 1]`.
    pub offsets: Vec<usize>,
    /// Per block, spatial blocks first: `(k, v)`, each `[tokens, C]`.
    pub kv: Vec<(Tensor, Tensor)>,
}

impl TextCond {
    /// The conditioning of the first `b` samples (the conditional half of a guidance batch).
    pub fn first(&self, be: &dyn Backend, b: usize) -> Result<TextCond> {
        ensure!(b <= self.batch, "text conditioning has {} samples, {b} asked", self.batch);
        let tokens = self.offsets[b];
        let kv = self.kv.iter().map(|(k, v)| Ok((be.narrow(k, 0, 0, tokens)?, be.narrow(v, 0, 0, tokens)?))).collect::<Result<_>>()?;
        Ok(TextCond { batch: b, offsets: self.offsets[..=b].to_vec(), kv })
    }
}

/// One forward's inputs besides the text.
pub struct DitInput<'a> {
    /// `[B, C_in, T, H, W]` latent.
    pub x: &'a Tensor,
    /// `[B]` diffusion timesteps in 0..1000.
    pub timestep: &'a [f32],
    /// Frames per second; tiled when shorter than the batch, as the reference repeats it.
    pub fps: &'a [f32],
    /// Pixel height and width of the video (only the first sample's is used, as in the reference).
    pub height: f32,
    pub width: f32,
    /// `[B * T]`: false marks conditioning frames, which use the modulation of timestep 0.
    pub x_mask: Option<&'a [bool]>,
}

#[derive(Clone)]
pub struct Stdit3 {
    pub cfg: Stdit3Config,
    pub w: Stdit3Weights,
    /// Block weights that replace `w`'s in later timestep ranges (an aigq plan
    /// chooses a precision per sub-module and range); empty for one set.
    pub phases: Vec<Phase>,
    /// The aigq plan of a quantized checkpoint (its block linears are stored quantized).
    pub stored_plan: Option<crate::quant::plan::Plan>,
    /// Self- and cross-attention with int8 Q and K ([`AttnSpec::qk_int8`]); off after loading.
    pub qk_int8: bool,
    /// Self- and cross-attention with bf16 operands ([`AttnSpec::bf16`]); off after loading.
    pub attn_bf16: bool,
}

/// The blocks used for timesteps below `below` (phases ordered by descending
/// `below`; the last one whose `below` exceeds the step's timestep applies).
#[derive(Clone)]
pub struct Phase {
    pub below: f32,
    pub spatial: Vec<BlockWeights>,
    pub temporal: Vec<BlockWeights>,
}

fn tile(v: &[f32], n: usize, what: &str) -> Result<Vec<f32>> {
    ensure!(!v.is_empty() && n.is_multiple_of(v.len()), "{what} has {} entries, which does not divide the batch {n}", v.len());
    Ok(v.iter().copied().cycle().take(n).collect())
}

impl Stdit3 {
    /// Loads `config.json` and the weights of a Hugging Face style directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = Stdit3Config::from_dir(dir)?;
        let ck = Checkpoint::open_dir(dir)?;
        let layout = crate::quant::qdir::Layout::of(&ck)?;
        let w = Stdit3Weights::load(&ck, &cfg, layout.as_ref().map(|l| &l.layers)).with_context(|| format!("loading STDiT3 weights from {}", dir.display()))?;
        let mut model = Stdit3 { cfg, w, phases: Vec::new(), stored_plan: None, qk_int8: false, attn_bf16: false };
        if let Some(layout) = layout {
            model.phases = crate::quant::qdir::load_phases(&ck, &layout, &model)?;
            model.stored_plan = Some(layout.plan);
        }
        Ok(model)
    }

    /// A model of these weights, one set for every timestep.
    pub fn new(cfg: Stdit3Config, w: Stdit3Weights) -> Self {
        Stdit3 { cfg, w, phases: Vec::new(), stored_plan: None, qk_int8: false, attn_bf16: false }
    }

    /// Moves the weights to where `be` computes, once after loading (see [`Backend::prepare_linear`]).
    pub fn prepare(&mut self, be: &dyn Backend) -> Result<()> {
        self.w.prepare(be)?;
        for p in &mut self.phases {
            for b in p.spatial.iter_mut().chain(p.temporal.iter_mut()) {
                b.prepare(be)?;
            }
        }
        Ok(())
    }

    /// Which weight set a step at timestep `t` uses: 0 for `w`, `i + 1` for `phases[i]`.
    pub fn phase_of(&self, t: f32) -> usize {
        self.phases.iter().take_while(|p| t < p.below).count()
    }

    /// [`Stdit3::phase_blocks`], mutable.
    pub fn phase_blocks_mut(&mut self, phase: usize) -> (&mut [BlockWeights], &mut [BlockWeights]) {
        match phase {
            0 => (&mut self.w.spatial, &mut self.w.temporal),
            i => {
                let p = &mut self.phases[i - 1];
                (&mut p.spatial, &mut p.temporal)
            }
        }
    }

    /// The spatial and temporal blocks of weight set `phase` (see [`Stdit3::phase_of`]).
    fn phase_blocks(&self, phase: usize) -> (&[BlockWeights], &[BlockWeights]) {
        match phase {
            0 => (&self.w.spatial, &self.w.temporal),
            i => (&self.phases[i - 1].spatial, &self.phases[i - 1].temporal),
        }
    }

    pub fn blocks(&self) -> impl Iterator<Item = (BlockId, &BlockWeights)> {
        let s = self.w.spatial.iter().enumerate().map(|(i, b)| (BlockId { kind: BlockKind::Spatial, index: i }, b));
        let t = self.w.temporal.iter().enumerate().map(|(i, b)| (BlockId { kind: BlockKind::Temporal, index: i }, b));
        s.chain(t)
    }

    /// `y_embedder` on `[B, 1, L, caption_channels]` captions, then the valid
    /// tokens selected by `mask` (`[B', L]`, repeated when `B'` divides `B`, as
    /// the reference does for the classifier-free-guidance batch).
    pub fn encode_text(&self, be: &dyn Backend, y: &Tensor, mask: Option<&[i64]>, hooks: &mut dyn ForwardHooks) -> Result<TextCond> {
        let (l, cc, c) = (self.cfg.model_max_length, self.cfg.caption_channels, self.cfg.hidden_size);
        let s = y.shape();
        ensure!(s.len() == 4 && s[1] == 1 && s[3] == cc, "captions y must be [B, 1, L, {cc}], got {s:?}");
        let (b, len) = (s[0], s[2]);
        ensure!(len == l || len > 0, "captions have no tokens");
        if let Some(bad) = y.find_non_finite() {
            bail!("captions y contain a non-finite value at flat index {bad}");
        }
        let h = be.linear(&y.clone().reshape(&[b * len, cc])?, &self.w.y_proj[0], Activation::GeluTanh)?;
        let tokens = be.linear(&h, &self.w.y_proj[1], Activation::None)?;
        if hooks.wants_trace() {
            hooks.observe("y_embedder", &tokens.clone().reshape(&[b, 1, len, c])?);
        }
        let (tokens, offsets) = match mask {
            None => (tokens, (0..=b).map(|i| i * len).collect::<Vec<_>>()),
            Some(m) => {
                ensure!(!m.is_empty() && m.len() % len == 0, "mask has {} entries, not a multiple of the {len} caption tokens", m.len());
                let mb = m.len() / len;
                ensure!(b % mb == 0, "mask has {mb} rows, which does not divide the caption batch {b}");
                let mut idx = Vec::new();
                let mut offsets = vec![0];
                for bi in 0..b {
                    let row = &m[(bi % mb) * len..][..len];
                    idx.extend(row.iter().enumerate().filter(|(_, &v)| v != 0).map(|(j, _)| bi * len + j));
                    offsets.push(idx.len());
                }
                (be.gather_rows(&tokens, &idx)?, offsets)
            }
        };
        let kv = self
            .blocks()
            .map(|(_, bw)| {
                let kv = be.linear(&tokens, &bw.cross_kv, Activation::None)?;
                let mut parts = be.split_last(&kv, 2)?.into_iter();
                Ok((parts.next().unwrap(), parts.next().unwrap()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TextCond { batch: b, offsets, kv })
    }

    /// `TimestepEmbedder` (or the fps `SizeEmbedder`, same construction): sinusoid then MLP.
    fn embed_scalar(&self, be: &dyn Backend, values: &[f32], mlp: &[crate::backend::Linear; 2]) -> Result<Tensor> {
        let f = be.timestep_embedding(values, FREQ_DIM)?;
        let h = be.linear(&f, &mlp[0], Activation::Silu)?;
        be.linear(&h, &mlp[1], Activation::None)
    }

    /// The velocity/sigma prediction `[B, out_channels, T, H, W]`.
    pub fn forward(&self, be: &dyn Backend, inp: &DitInput, text: &TextCond, hooks: &mut dyn ForwardHooks) -> Result<Tensor> {
        let _whole = span(Part::Forward);
        let embedding = span(Part::Embedding);
        let cfg = &self.cfg;
        let c = cfg.hidden_size;
        let xs = inp.x.shape();
        ensure!(xs.len() == 5 && xs[1] == cfg.in_channels, "latent x must be [B, {}, T, H, W], got {xs:?}", cfg.in_channels);
        ensure!(xs.iter().all(|&d| d > 0), "latent x has an empty dimension: {xs:?}");
        let (b, t, h, w) = (xs[0], xs[2], xs[3], xs[4]);
        ensure!(inp.timestep.len() == b, "timestep has {} entries for batch {b}", inp.timestep.len());
        ensure!(text.batch == b, "text conditioning is for batch {}, latent batch is {b}", text.batch);
        ensure!(inp.height > 0.0 && inp.width > 0.0, "height and width must be positive, got {} x {}", inp.height, inp.width);
        if let Some(bad) = inp.x.find_non_finite() {
            bail!("latent x contains a non-finite value at flat index {bad}");
        }
        if let Some(bad) = inp.timestep.iter().chain(inp.fps).find(|v| !v.is_finite()) {
            bail!("timestep/fps contain a non-finite value ({bad})");
        }
        let grid = PatchGrid { batch: b, channels: cfg.in_channels, t, h, w, patch: cfg.patch() };
        let [nt, nh, nw] = grid.tokens();
        let s = nh * nw;
        let n = nt * s;

        // Timestep (+ fps) embedding; with x_mask, entries B..2B embed timestep 0 (`t0`).
        let with_t0 = inp.x_mask.is_some();
        let entries = if with_t0 { 2 * b } else { b };
        let mut tvals = inp.timestep.to_vec();
        if with_t0 {
            tvals.extend(std::iter::repeat_n(0.0, b));
        }
        let fps = tile(inp.fps, b, "fps")?;
        let fps_all: Vec<f32> = fps.iter().copied().cycle().take(entries).collect();
        let temb = be.add(&self.embed_scalar(be, &tvals, &self.w.t_mlp)?, &self.embed_scalar(be, &fps_all, &self.w.fps_mlp)?)?;
        let t_mlp = be.linear(&be.silu(&temb)?, &self.w.t_block, Activation::None)?;
        if hooks.wants_trace() {
            // As a module hook on `t_block` records its last call: with x_mask that is the t0 call.
            hooks.observe("t_block", &be.narrow(&t_mlp, 0, entries - b, b)?);
        }

        let groups = match inp.x_mask {
            None => RowGroups::per_sample(b, n),
            Some(m) => {
                ensure!(m.len() == b * nt, "x_mask has {} entries, expected B*T = {}", m.len(), b * nt);
                RowGroups { group_size: s, index: (0..b * nt).map(|g| if m[g] { g / nt } else { b + g / nt }).collect() }
            }
        };

        // Patch embedding plus the 2D position embedding.
        let mut x = be.linear(&be.patchify(inp.x, &grid)?, &self.w.x_embedder, Activation::None)?;
        if hooks.wants_trace() {
            hooks.observe("x_embedder", &x.clone().reshape(&[b, n, c])?);
        }
        let scale = ((inp.height as f64 * inp.width as f64).sqrt() / cfg.input_sq_size) as f32;
        let base_size = (s as f64).sqrt().round() as f32;
        be.add_rows_broadcast(&mut x, &be.pos_embed_2d(nh, nw, c, scale, base_size)?)?;

        let dims = BlockDims { b, t: nt, s };
        let phase = self.phase_of(inp.timestep[0]);
        ensure!(self.phases.is_empty() || inp.timestep.iter().all(|t| self.phase_of(*t) == phase), "a batch whose timesteps fall in different ranges of the model's per-range weights");
        let (spatial, temporal) = self.phase_blocks(phase);
        let blocks: Vec<(BlockId, &BlockWeights)> = spatial.iter().enumerate().flat_map(|(i, sb)| {
            [(BlockId { kind: BlockKind::Spatial, index: i }, sb), (BlockId { kind: BlockKind::Temporal, index: i }, &temporal[i])]
        }).collect();
        let modulated = match (hooks.wants_modulated_input(), spatial.first()) {
            (true, Some(b0)) => {
                let mods = be.modulation_table(&b0.scale_shift_table, &t_mlp)?;
                let m = |chunk| ModRef { table: &mods, chunk, groups: &groups };
                Some(be.layer_norm_modulate(&x, NORM_EPS, Some((m(0), m(1))))?)
            }
            _ => None,
        };
        drop(embedding);
        hooks.blocks_input(be, &x, modulated.as_ref());
        for (id, bw) in blocks {
            if hooks.block_action(id) == BlockAction::Compute {
                let kv_index = match id.kind {
                    BlockKind::Spatial => id.index,
                    BlockKind::Temporal => cfg.depth + id.index,
                };
                let mods = {
                    let _t = span(Part::Modulation);
                    be.modulation_table(&bw.scale_shift_table, &t_mlp)?
                };
                let input = hooks.wants_block_io(id).then(|| x.clone());
                self.block(be, bw, id, &mut x, &mods, &groups, text, kv_index, dims, hooks)?;
                if let Some(input) = input {
                    hooks.block_io(be, id, &input, &x);
                }
            }
            if hooks.wants_trace() {
                let name = match id.kind {
                    BlockKind::Spatial => format!("spatial.{}", id.index),
                    BlockKind::Temporal => format!("temporal.{}", id.index),
                };
                hooks.observe(&name, &x.clone().reshape(&[b, n, c])?);
            }
        }

        hooks.blocks_output(be, &mut x)?;

        // Final layer: modulated by `t` itself (not t_block's output).
        let _final = span(Part::FinalLayer);
        let fmods = be.modulation_table(&self.w.final_scale_shift, &temb)?;
        let per_sample = RowGroups::per_sample(b, n);
        let m = |chunk, groups| ModRef { table: &fmods, chunk, groups };
        let mut y = be.layer_norm_modulate(&x, NORM_EPS, Some((m(0, &per_sample), m(1, &per_sample))))?;
        if let Some(mask) = inp.x_mask {
            // The reference normalizes the already modulated tensor again for the
            // t0 frames (`norm_final(x)` after `x` was reassigned); kept for parity.
            let zero = RowGroups { group_size: n, index: (b..2 * b).collect() };
            let y0 = be.layer_norm_modulate(&y, NORM_EPS, Some((m(0, &zero), m(1, &zero))))?;
            y = be.select_rows(mask, s, &y, &y0)?;
        }
        let out = be.linear(&y, &self.w.final_linear, Activation::None)?;
        if hooks.wants_trace() {
            hooks.observe("final_layer", &out.clone().reshape(&[b, n, out.dim(-1)])?);
        }
        be.unpatchify(&out, &grid, cfg.out_channels())
    }

    /// Floating-point operations (2 per multiply-add) of one forward on `b`
    /// samples of `t x s` tokens with `text_tokens` caption tokens in all,
    /// counting the linear layers and attention products (what dominates).
    pub fn forward_flops(&self, b: usize, t: usize, s: usize, text_tokens: usize) -> f64 {
        let (c, m) = (self.cfg.hidden_size as f64, self.cfg.mlp_hidden() as f64);
        let rows = (b * t * s) as f64;
        let per_block_linear = rows * 2.0 * (3.0 * c * c + c * c + c * c + c * c + 2.0 * c * m);
        let text_per_sample = text_tokens as f64 / b.max(1) as f64;
        let cross = rows * text_per_sample * c * 4.0;
        let spatial_attn = rows * s as f64 * c * 4.0;
        let temporal_attn = rows * t as f64 * c * 4.0;
        let depth = self.cfg.depth as f64;
        depth * (2.0 * (per_block_linear + cross) + spatial_attn + temporal_attn) + rows * 2.0 * c * (self.cfg.patch_len_out() as f64)
    }

    /// One spatial or temporal block, updating `x` (`[B*T*S, C]`) in place.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    fn block(&self, be: &dyn Backend, bw: &BlockWeights, id: BlockId, x: &mut Tensor, mods: &Tensor, groups: &RowGroups, text: &TextCond, kv_index: usize, d: BlockDims, hooks: &mut dyn ForwardHooks) -> Result<()> {
        let m = |chunk| ModRef { table: mods, chunk, groups };
        // Each sub-module: computed, computed with its pre-gate output kept, served from
        // the kept output (gate * cached: the cached-residual reuse op), or left out.
        let subs = [(SubModule::SelfAttention, Some(2), Part::AttentionProjection), (SubModule::CrossAttention, None, Part::CrossProjection), (SubModule::Mlp, Some(5), Part::Mlp)];
        for (sub, gate, projection) in subs {
            let gate = gate.map(m);
            match hooks.sub_action(id, sub) {
                // The MLP is one backend op (the CPU chains its two integer linears per task).
                action @ (SubAction::Compute | SubAction::ComputeAndStore) if sub == SubModule::Mlp => {
                    let keep = action == SubAction::ComputeAndStore;
                    let out = {
                        let _t = span(Part::Mlp);
                        be.mlp_residual(x, NORM_EPS, (m(3), m(4)), &bw.fc1, &bw.fc2, gate, keep)?
                    };
                    if let Some(out) = out {
                        hooks.store(be, id, sub, out);
                    }
                }
                SubAction::Skip => {}
                SubAction::Reuse => {
                    let _t = span(Part::CachedReuse);
                    let cached = hooks.cached(id, sub).ok_or_else(|| anyhow!("{:?} block {} {sub:?}: reuse asked, but nothing is cached", id.kind, id.index))?;
                    cached.add_gated(be, x, gate)?;
                }
                SubAction::Compute => {
                    let (input, proj) = self.sub_module(be, bw, id.kind, sub, x, mods, groups, text, kv_index, d)?;
                    let _t = span(projection);
                    be.linear_residual(&input, proj, x, gate)?;
                }
                SubAction::ComputeAndStore => {
                    let (input, proj) = self.sub_module(be, bw, id.kind, sub, x, mods, groups, text, kv_index, d)?;
                    let out = {
                        let _t = span(projection);
                        be.linear_residual_kept(&input, proj, x, gate)?
                    };
                    hooks.store(be, id, sub, out);
                }
            }
        }
        Ok(())
    }

    /// An attention sub-module up to its output projection: the projection's input and the projection.
    #[allow(clippy::too_many_arguments)]
    fn sub_module<'w>(&self, be: &dyn Backend, bw: &'w BlockWeights, kind: BlockKind, sub: SubModule, x: &Tensor, mods: &Tensor, groups: &RowGroups, text: &TextCond, kv_index: usize, d: BlockDims) -> Result<(Tensor, &'w crate::backend::Linear)> {
        let m = |chunk| ModRef { table: mods, chunk, groups };
        let cfg = &self.cfg;
        let (c, heads, hd) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim());
        let n = d.t * d.s;
        match sub {
            SubModule::SelfAttention => {}
            SubModule::CrossAttention => {
                // Cross-attention to each sample's own caption tokens: no norm, no gate.
                let q = {
                    let _t = span(Part::CrossQuery);
                    be.linear(x, &bw.cross_q, Activation::None)?
                };
                let _t = span(Part::CrossAttention);
                let (k, v) = &text.kv[kv_index];
                let mut spec = AttnSpec::ragged(n, heads, hd, AttnSpec::ranges_from_offsets(&text.offsets));
                spec.qk_int8 = self.qk_int8;
                spec.bf16 = self.attn_bf16;
                return Ok((be.attention(&q, k, v, &spec, None)?, &bw.cross_proj));
            }
            SubModule::Mlp => bail!("the MLP runs as one op (mlp_residual), not up to its projection"),
        }

        // Self-attention: spatial over the S positions of each frame, temporal over the T frames of each position.
        let qkv = {
            let _t = span(Part::NormQkv);
            be.norm_modulate_linear(x, NORM_EPS, Some((m(0), m(1))), &bw.qkv, Activation::None)?
        };
        let temporal = kind == BlockKind::Temporal;
        let rope = temporal.then_some(Rope { freqs: &self.w.rope_freqs, seq_len: d.t });
        let parts = {
            let _t = span(Part::QkvOperands);
            be.qkv_operands(&qkv, heads, &bw.q_norm, &bw.k_norm, NORM_EPS, temporal.then_some([d.b, d.t, d.s, c]), rope)?
        };
        let _t = span(if temporal { Part::TemporalAttention } else { Part::SpatialAttention });
        let mut spec = if temporal { AttnSpec::dense(d.b * d.s, d.t, d.t, heads, hd) } else { AttnSpec::dense(d.b * d.t, d.s, d.s, heads, hd) };
        spec.qk_int8 = self.qk_int8;
        spec.bf16 = self.attn_bf16;
        let mut a = be.attention(&parts[0], &parts[1], &parts[2], &spec, None)?;
        if temporal {
            a = be.swap_middle(&a, [d.b, d.s, d.t, c])?;
        }
        Ok((a, &bw.proj))
    }
}

#[derive(Clone, Copy)]
struct BlockDims {
    b: usize,
    t: usize,
    s: usize,
}
