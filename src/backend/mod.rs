//! The op interface the model runs on, and its implementations.
//!
//! The model never touches tensor data itself: every op goes through
//! [`Backend`], so a CUDA backend, quantized weights and cached or skipped
//! blocks change what runs without changing the model code.

pub mod conv;
pub mod cpu;
pub mod cuda;
pub mod select;

pub use conv::ConvOps;

use crate::tensor::Tensor;
use anyhow::Result;

/// Weights of one linear layer, `y = x W^T + b`, with `W` of shape `[n, k]`.
/// The representation is an enum so quantized formats (int8, packed int4 with
/// per-channel scales) are new variants, not new call sites.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// Row-major `[n, k]` f32, as PyTorch stores it (often read in place from the checkpoint).
    F32(Tensor),
    /// Row-major `[n, k]` bf16 or f16 as the checkpoint stores it, widened to f32
    /// one layer at a time when used, so half-precision checkpoints stay half-size in memory.
    Half(Tensor),
    /// Symmetric int8 per output channel (W8); activations are quantized per
    /// token on the fly (A8 or A6) and multiplied in integers.
    Int8(std::sync::Arc<crate::quant::int8::Int8Weight>),
    /// Packed int4 with per-output-channel, per-group scales (W4); activations as for `Int8`.
    Int4(std::sync::Arc<crate::quant::int4::Int4Weight>),
}

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// The same layer with its weight quantized to int8 (per output channel), the
    /// optional smoothing vector folded in, activations quantized to `act_qmax`.
    pub fn to_int8(&self, smooth: Option<&[f32]>, act_qmax: i32) -> Result<Self> {
        let q = crate::quant::int8::Int8Weight::quantize(&self.float_weight()?, self.out_features, self.in_features, smooth, act_qmax)?;
        Ok(self.with_weight(LinearWeight::Int8(std::sync::Arc::new(q))))
    }

    /// The same layer with its weight quantized to packed int4 (per output channel and
    /// group of `W4_GROUP` inputs), the optional smoothing vector folded in.
    pub fn to_int4(&self, smooth: Option<&[f32]>, act_qmax: i32) -> Result<Self> {
        self.to_int4_weighted(smooth, act_qmax, None)
    }

    /// [`Linear::to_int4`] with the group clips chosen by the error weighted by the
    /// inputs' per-channel mean squares `act_sq` (see `Int4Weight::quantize_weighted`).
    pub fn to_int4_weighted(&self, smooth: Option<&[f32]>, act_qmax: i32, act_sq: Option<&[f32]>) -> Result<Self> {
        let q = crate::quant::int4::Int4Weight::quantize_weighted(&self.float_weight()?, self.out_features, self.in_features, smooth, act_qmax, act_sq)?;
        Ok(self.with_weight(LinearWeight::Int4(std::sync::Arc::new(q))))
    }

    /// The weight `[n, k]` as f32 (an error for a quantized layer).
    pub fn float_weight(&self) -> Result<Vec<f32>> {
        Ok(match &self.weight {
            LinearWeight::F32(t) => t.f32()?.to_vec(),
            LinearWeight::Half(t) => t.to_f32()?.f32()?.to_vec(),
            LinearWeight::Int8(_) | LinearWeight::Int4(_) => anyhow::bail!("linear layer is already quantized"),
        })
    }

    fn with_weight(&self, weight: LinearWeight) -> Self {
        Linear { weight, bias: self.bias.clone(), in_features: self.in_features, out_features: self.out_features }
    }

    /// A linear layer over an f32, bf16 or f16 weight `[n, k]` and an optional f32 bias `[n]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        use crate::tensor::DType;
        anyhow::ensure!(weight.shape().len() == 2, "linear weight must be 2-D, got {:?}", weight.shape());
        let (n, k) = (weight.shape()[0], weight.shape()[1]);
        if let Some(b) = &bias {
            anyhow::ensure!(b.shape() == [n], "linear bias must be [{n}], got {:?}", b.shape());
        }
        let weight = match weight.dtype() {
            DType::F32 => LinearWeight::F32(weight),
            DType::BF16 | DType::F16 => LinearWeight::Half(weight),
            other => anyhow::bail!("linear weight of dtype {} needs a quantized format", other.name()),
        };
        Ok(Linear { weight, bias, in_features: k, out_features: n })
    }
}

/// Activation fused after a linear layer's bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    GeluTanh,
    Silu,
}

/// Which row of a modulation table each token row uses. Rows come in groups
/// of `group_size` consecutive rows; group `g` reads table entry `index[g]`.
/// Without `x_mask` a group is one sample; with it a group is one frame of one
/// sample and conditioning frames point at the `t0` entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowGroups {
    pub group_size: usize,
    pub index: Vec<usize>,
}

impl RowGroups {
    /// One group per sample, entry `b` for sample `b`.
    pub fn per_sample(batch: usize, rows_per_sample: usize) -> Self {
        RowGroups { group_size: rows_per_sample, index: (0..batch).collect() }
    }

    pub fn rows(&self) -> usize {
        self.group_size * self.index.len()
    }
}

/// One chunk of a modulation table `[entries, chunks, C]`, e.g. the `gate_msa`
/// vectors of every sample, addressed per row through `groups`.
#[derive(Clone, Copy, Debug)]
pub struct ModRef<'a> {
    pub table: &'a Tensor,
    pub chunk: usize,
    pub groups: &'a RowGroups,
}

/// Rotary position embedding applied along sequences of `seq_len` rows.
#[derive(Clone, Copy, Debug)]
pub struct Rope<'a> {
    /// `head_dim / 2` frequencies (`rope.freqs`).
    pub freqs: &'a [f32],
    pub seq_len: usize,
}

/// Shape of a batched multi-head attention. `q` is `[groups * q_len, heads * head_dim]`;
/// group `g` attends to the rows `kv_ranges[g].0..kv_ranges[g].1` of `k` and `v`
/// (block-diagonal masks, e.g. each sample's own text tokens, or key padding).
/// Scores are `scale * q.k`, plus `bias[h, i, j - start]` when a bias is given.
#[derive(Clone, Debug)]
pub struct AttnSpec {
    pub groups: usize,
    pub q_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub kv_ranges: Vec<(usize, usize)>,
    pub scale: f32,
    /// Compute `q.k` with Q and K quantized to int8 (per block of 64 rows of a
    /// group and head, K smoothed by its mean: `kernels/qc_types.h`,
    /// attention_int8.cu) in exact integer products; no score bias then.
    /// False in the constructors.
    pub qk_int8: bool,
    /// Compute both products with bf16 operands (Q, K, V and the softmax's
    /// probabilities rounded to bf16, f32 accumulation); false in the
    /// constructors. The CUDA backend's attention always runs so (bf16
    /// activations) and reads no flag.
    pub bf16: bool,
}

impl AttnSpec {
    /// Every group attends to its own `kv_len` consecutive rows, scale `1/sqrt(head_dim)`.
    pub fn dense(groups: usize, q_len: usize, kv_len: usize, heads: usize, head_dim: usize) -> Self {
        Self::ragged(q_len, heads, head_dim, (0..groups).map(|g| (g * kv_len, (g + 1) * kv_len)).collect())
    }

    /// Group `g` attends to `ranges[g]`, scale `1/sqrt(head_dim)`.
    pub fn ragged(q_len: usize, heads: usize, head_dim: usize, ranges: Vec<(usize, usize)>) -> Self {
        AttnSpec { groups: ranges.len(), q_len, heads, head_dim, kv_ranges: ranges, scale: 1.0 / (head_dim as f32).sqrt(), qk_int8: false, bf16: false }
    }

    /// The shape checks every backend's attention makes: `q` `[groups x q_len,
    /// heads x head_dim]`, `k` and `v` alike and covering every kv range, and
    /// the score bias, when given, `[heads, q_len, >= the longest range]`.
    pub fn check(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        let (g, lq, h, d) = (self.groups, self.q_len, self.heads, self.head_dim);
        let c = h * d;
        anyhow::ensure!(q.shape().last() == Some(&c) && q.numel() == g * lq * c, "attention: q {:?} is not [{} x {lq}, {c}]", q.shape(), g);
        anyhow::ensure!(k.shape() == v.shape(), "attention: k {:?} and v {:?} differ", k.shape(), v.shape());
        anyhow::ensure!(self.kv_ranges.len() == g, "attention: {} kv ranges for {g} groups", self.kv_ranges.len());
        anyhow::ensure!(self.kv_ranges.iter().all(|&(a, b)| a <= b), "attention: a kv range ends before it starts");
        let max_end = self.kv_ranges.iter().map(|r| r.1).max().unwrap_or(0);
        anyhow::ensure!(k.shape().last() == Some(&c) && max_end * c <= k.numel(), "attention: k {:?} too small for kv ranges up to {max_end}", k.shape());
        if let Some(b) = bias {
            let (s, max_len) = (b.shape(), self.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap_or(0));
            anyhow::ensure!(s.len() == 3 && s[0] == h && s[1] == lq && s[2] >= max_len, "attention: bias {s:?} is not [{h}, {lq}, >= {max_len}]");
        }
        Ok(())
    }

    /// Ranges from cumulative offsets: group `g` owns `offsets[g]..offsets[g + 1]`.
    pub fn ranges_from_offsets(offsets: &[usize]) -> Vec<(usize, usize)> {
        offsets.windows(2).map(|w| (w[0], w[1])).collect()
    }
}

/// Patch geometry of a latent video `[B, C, T, H, W]` cut into `pt x ph x pw` patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGrid {
    pub batch: usize,
    pub channels: usize,
    /// Unpadded sizes.
    pub t: usize,
    pub h: usize,
    pub w: usize,
    pub patch: [usize; 3],
}

impl PatchGrid {
    /// Token grid after zero-padding to whole patches.
    pub fn tokens(&self) -> [usize; 3] {
        let [pt, ph, pw] = self.patch;
        [self.t.div_ceil(pt), self.h.div_ceil(ph), self.w.div_ceil(pw)]
    }

    pub fn patch_len(&self) -> usize {
        self.channels * self.patch.iter().product::<usize>()
    }
}

/// Sums of a reduction not yet read back (`[parts, 2]` f32, host or device):
/// [`Backend::l1_distance_deferred`], read by [`Backend::read_sums`].
pub struct PendingSums(pub Tensor);

impl PendingSums {
    /// `(sum |a - b|, sum |b|)` per part from the host copy `host` of these sums.
    pub fn to_pairs(&self, host: &Tensor) -> Result<Vec<(f32, f32)>> {
        Ok(host.f32()?.chunks_exact(2).map(|p| (p[0], p[1])).collect())
    }
}

/// A sub-module output kept across steps, as a caching policy stores it: as
/// computed, or int8 with one scale per row ([`Backend::quantize_rows_i8`]).
#[derive(Clone, Copy)]
pub enum CachedRef<'a> {
    Native(&'a Tensor),
    Int8 { q: &'a Tensor, scales: &'a Tensor },
}

impl<'a> From<&'a Tensor> for CachedRef<'a> {
    fn from(t: &'a Tensor) -> Self {
        CachedRef::Native(t)
    }
}

impl<'a> CachedRef<'a> {
    /// `x += gate * cached` (the cached-residual reuse op; dequantized in the same kernel for int8).
    pub fn add_gated(self, be: &dyn Backend, x: &mut Tensor, gate: Option<ModRef>) -> Result<()> {
        match self {
            CachedRef::Native(y) => be.add_gated(x, y, gate),
            CachedRef::Int8 { q, scales } => be.add_gated_i8(x, q, scales, gate),
        }
    }

    /// The kept values as a tensor shaped like `like` (dequantized for int8; kept
    /// as computed, borrowed, not copied).
    pub fn values(self, be: &dyn Backend, like: &Tensor) -> Result<std::borrow::Cow<'a, Tensor>> {
        match self {
            CachedRef::Native(y) => Ok(std::borrow::Cow::Borrowed(y)),
            CachedRef::Int8 { q, scales } => {
                let mut z = be.axpby(0.0, like, 0.0, like)?;
                be.add_gated_i8(&mut z, q, scales, None)?;
                Ok(std::borrow::Cow::Owned(z))
            }
        }
    }
}

/// [`Backend::mlp_residual`] as its two ops: [`Backend::norm_modulate_linear`]
/// with GELU, then [`Backend::linear_residual`] (or `_kept` where `keep`).
#[allow(clippy::too_many_arguments)]
pub fn mlp_residual_unfused<B: Backend + ?Sized>(be: &B, x: &mut Tensor, eps: f32, modulation: (ModRef, ModRef), fc1: &Linear, fc2: &Linear, gate: Option<ModRef>, keep: bool) -> Result<Option<Tensor>> {
    let h = be.norm_modulate_linear(x, eps, Some(modulation), fc1, Activation::GeluTanh)?;
    if keep {
        return Ok(Some(be.linear_residual_kept(&h, fc2, x, gate)?));
    }
    be.linear_residual(&h, fc2, x, gate)?;
    Ok(None)
}

/// Every op the DiT forward and the sampler need. All tensors are row-major;
/// "rows" are tokens and the last dimension is the channel.
pub trait Backend: ConvOps + Send + Sync {
    fn name(&self) -> String;

    /// Moves a loaded layer's weights to where this backend computes, once, before
    /// the layer is used (the CUDA backend uploads them as bf16); the default keeps
    /// them as they are. Models call it from their `prepare`.
    fn prepare_linear(&self, _w: &mut Linear) -> Result<()> {
        Ok(())
    }

    /// Likewise for a weight tensor that ops read directly (norm weights, tables).
    fn prepare_tensor(&self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }

    /// `act(x W^T + b)` for `x` of shape `[.., k]`.
    fn linear(&self, x: &Tensor, w: &Linear, act: Activation) -> Result<Tensor>;

    /// `residual += gate * (x W^T + b)`, gate per row group (or 1 when `None`).
    fn linear_residual(&self, x: &Tensor, w: &Linear, residual: &mut Tensor, gate: Option<ModRef>) -> Result<()>;

    /// [`linear_residual`](Backend::linear_residual) that also returns `x W^T + b`
    /// (a caching policy keeps it); the default is `linear`, then `add_gated`.
    fn linear_residual_kept(&self, x: &Tensor, w: &Linear, residual: &mut Tensor, gate: Option<ModRef>) -> Result<Tensor> {
        let out = self.linear(x, w, Activation::None)?;
        self.add_gated(residual, &out, gate)?;
        Ok(out)
    }

    /// LayerNorm without affine over the last dim, then `* (1 + scale) + shift` when given.
    fn layer_norm_modulate(&self, x: &Tensor, eps: f32, modulation: Option<(ModRef, ModRef)>) -> Result<Tensor>;

    /// `linear(layer_norm_modulate(x, eps, modulation), w, act)`, the same values.
    /// The CPU backend fuses it for integer weights: each row is normalized,
    /// modulated, divided by the importance vector and quantized in one pass,
    /// with no float copy of the normalized tensor. Others run the two ops.
    fn norm_modulate_linear(&self, x: &Tensor, eps: f32, modulation: Option<(ModRef, ModRef)>, w: &Linear, act: Activation) -> Result<Tensor> {
        let h = self.layer_norm_modulate(x, eps, modulation)?;
        self.linear(&h, w, act)
    }

    /// The MLP sub-module and its residual, `x += gate * fc2(GELU(fc1(
    /// layer_norm_modulate(x, eps, modulation))))`, returning fc2's output
    /// (before the gate) where `keep` (a caching policy keeps it). The default
    /// is [`mlp_residual_unfused`]; the CPU backend chains two integer linears
    /// per task, the same values.
    #[allow(clippy::too_many_arguments)]
    fn mlp_residual(&self, x: &mut Tensor, eps: f32, modulation: (ModRef, ModRef), fc1: &Linear, fc2: &Linear, gate: Option<ModRef>, keep: bool) -> Result<Option<Tensor>> {
        mlp_residual_unfused(self, x, eps, modulation, fc1, fc2, gate, keep)
    }
    /// `x += gate * y` per row (`x += y` without a gate), `y` holding the same rows as `x`: a
    /// sub-module's contribution added from its output before the gate (the
    /// cached-residual reuse op; `linear_residual` fuses the same add into the GEMM).
    fn add_gated(&self, x: &mut Tensor, y: &Tensor, gate: Option<ModRef>) -> Result<()>;

    /// Per-row symmetric int8 of `y` ([rows, C], f32 or bf16): returns `(q, scales)`,
    /// `q` I8 [rows, C] with q = round_half_away(y / s) clamped to [-127, 127], `scales`
    /// F32 [rows] with s = max_c |y| / 127 (a zero row: s = 0, q = 0). For caches kept
    /// across steps in a quarter (f32) or half (bf16) of the memory.
    ///
    /// Exactly, in f32 with each operation rounded once: `s = amax / 127`, `q =
    /// clamp((y / s).round(), -127, 127)` (`y / s` a true division, ties away from
    /// zero; a NaN quotient gives 0). Both backends give the same `q` and `s` bit for
    /// bit from the same f32 values (the GPU reads bf16 activations, widened exactly).
    fn quantize_rows_i8(&self, y: &Tensor) -> Result<(Tensor, Tensor)>;

    /// `x += gate * (q * s)` per row: `add_gated` reading an int8 cache with per-row scales
    /// (the dequantization fused into the reuse op; same gate semantics as add_gated).
    ///
    /// The cached value is `(q as f32) * s` (one f32 multiply), then added as `add_gated`
    /// adds `y`: on the CPU bit for bit `add_gated` with the dequantized f32 tensor; on
    /// the GPU (bf16 `x`) bit for bit its `add_gated` with the dequantized tensor rounded
    /// to bf16 (`gate * value` and the sum rounded to bf16 as there). `q` I8 and `scales`
    /// F32 as `quantize_rows_i8` returns them, on the host or the device.
    fn add_gated_i8(&self, x: &mut Tensor, q: &Tensor, scales: &Tensor, gate: Option<ModRef>) -> Result<()>;

    /// Divergence of `a` from `b` (same shapes, [rows, ..]), rows split into `parts` equal
    /// contiguous parts (e.g. the two classifier-free-guidance halves): per part
    /// `(sum |a - b|, sum |b|)`, accumulated in f64 on the CPU and f32 per block then f64/
    /// f32 tree on the GPU. On the GPU one kernel (or two) and ONE small device-to-host copy.
    ///
    /// `rows` is the leading dimension (`shape[0]`), which `parts` (>= 1) must divide;
    /// `a` and `b` are f32 or bf16. The relative L1 distance of part `p` is
    /// `r[p].0 / r[p].1`. The result is deterministic (no atomics) on both backends.
    /// It is read on the host, so a CUDA graph capture refuses it (like any download).
    fn l1_distance(&self, a: &Tensor, b: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>>;

    /// [`Backend::l1_distance`] launched but not read back: its sums stay where they
    /// were computed (on the GPU, `parts x 2` floats in the arena) until
    /// [`Backend::read_sums`] reads many of them at once (a policy's one read per step).
    fn l1_distance_deferred(&self, a: &Tensor, b: &Tensor, parts: usize) -> Result<PendingSums> {
        let sums = self.l1_distance(a, b, parts)?;
        Ok(PendingSums(Tensor::from_f32(&[parts, 2], sums.iter().flat_map(|&(d, m)| [d, m]).collect())?))
    }

    /// The sums of every pending reduction, in one read back (one download on the GPU).
    fn read_sums(&self, pending: &[PendingSums]) -> Result<Vec<Vec<(f32, f32)>>> {
        pending.iter().map(|p| p.to_pairs(&p.0.to_cpu()?.to_f32()?)).collect()
    }

    /// `(sum |a|, sum a^2)` per part, same split, for cheap statistics of a tensor (one small read).
    fn abs_sum(&self, a: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>>;

    /// In place on `[rows, heads * head_dim]`: RMS norm with `weight` over each head,
    /// then rotary embedding with position `row % seq_len` when `rope` is given.
    fn qk_norm_rope(&self, x: &mut Tensor, heads: usize, weight: &Tensor, eps: f32, rope: Option<Rope>) -> Result<()>;

    /// Splits the last dim into `parts` equal pieces, each made contiguous.
    fn split_last(&self, x: &Tensor, parts: usize) -> Result<Vec<Tensor>>;

    /// Self-attention's operands from the qkv projection (`[rows, 3 * heads *
    /// head_dim]`): q, k and v, each moved `[a, b, c, d] -> [a, c, b, d]` by
    /// `swap` (the temporal blocks) and q and k normalized by
    /// [`Backend::qk_norm_rope`] with `q_norm` and `k_norm`. By default those
    /// ops one after the other; the CPU does it in one pass over `qkv`.
    #[allow(clippy::too_many_arguments)]
    fn qkv_operands(&self, qkv: &Tensor, heads: usize, q_norm: &Tensor, k_norm: &Tensor, eps: f32, swap: Option<[usize; 4]>, rope: Option<Rope>) -> Result<[Tensor; 3]> {
        let mut parts = self.split_last(qkv, 3)?;
        if let Some(dims) = swap {
            for p in parts.iter_mut() {
                *p = self.swap_middle(p, dims)?;
            }
        }
        self.qk_norm_rope(&mut parts[0], heads, q_norm, eps, rope)?;
        self.qk_norm_rope(&mut parts[1], heads, k_norm, eps, rope)?;
        let [q, k, v]: [Tensor; 3] = parts.try_into().map_err(|_| anyhow::anyhow!("split_last gave other than 3 parts"))?;
        Ok([q, k, v])
    }

    /// `[a, b, c, d] -> [a, c, b, d]` (frames-major tokens to position-major and back).
    fn swap_middle(&self, x: &Tensor, dims: [usize; 4]) -> Result<Tensor>;

    /// Softmax attention per `spec`, with an optional additive score bias
    /// `[heads, q_len, max kv range length]` shared by all groups: out `[groups * q_len, heads * head_dim]`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, bias: Option<&Tensor>) -> Result<Tensor>;

    /// Elementwise `a * b`, same shapes.
    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;

    fn silu(&self, x: &Tensor) -> Result<Tensor>;

    /// `out[e, j, :] = table[j, :] + emb[e, j*C..]` when `emb` is `[E, K*C]`, or
    /// `table[j, :] + emb[e, :]` when `emb` is `[E, C]`: the adaLN modulation vectors `[E, K, C]`.
    fn modulation_table(&self, table: &Tensor, emb: &Tensor) -> Result<Tensor>;

    /// Concatenation along dim 0.
    fn concat(&self, parts: &[&Tensor]) -> Result<Tensor>;

    /// `len` entries of dimension `dim` starting at `start`.
    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor>;

    /// `a + b`, same shapes.
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;

    /// `x[g * rows + r, :] += rows_table[r, :]` for every group `g` (position embeddings).
    fn add_rows_broadcast(&self, x: &mut Tensor, rows_table: &Tensor) -> Result<()>;

    /// `out[r] = if pick_a[group(r)] { a[r] } else { b[r] }` with groups of `group_size` rows.
    fn select_rows(&self, pick_a: &[bool], group_size: usize, a: &Tensor, b: &Tensor) -> Result<Tensor>;

    /// Rows of `x` (`[n, C]`) at `indices`, in that order.
    fn gather_rows(&self, x: &Tensor, indices: &[usize]) -> Result<Tensor>;

    /// Sinusoidal embedding `[cos(t f), sin(t f)]`, `f_i = 10000^(-i / (dim/2))`: `[len, dim]`.
    fn timestep_embedding(&self, t: &[f32], dim: usize) -> Result<Tensor>;

    /// Open-Sora's `PositionEmbedding2D` for an `h x w` token grid: `[h * w, dim]`.
    fn pos_embed_2d(&self, h: usize, w: usize, dim: usize, scale: f32, base_size: f32) -> Result<Tensor>;

    /// `[B, C, T, H, W]` -> `[B * Tp * Hp * Wp, C * pt * ph * pw]`, zero-padding to whole patches;
    /// the patch vector is ordered `(c, pt, ph, pw)` like a Conv3d weight.
    fn patchify(&self, x: &Tensor, grid: &PatchGrid) -> Result<Tensor>;

    /// Inverse of `patchify` for `[B * tokens, pt * ph * pw * C_out]` laid out `(pt, ph, pw, c)`,
    /// cropped back to `grid`'s unpadded sizes: `[B, C_out, T, H, W]`.
    fn unpatchify(&self, x: &Tensor, grid: &PatchGrid, out_channels: usize) -> Result<Tensor>;

    /// `out = uncond + scale * (cond - uncond)`.
    fn guidance(&self, cond: &Tensor, uncond: &Tensor, scale: f32) -> Result<Tensor>;

    /// `out = a * x + b * y`, same shapes (residuals of cached features: `out - in`,
    /// and their extrapolation across steps).
    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor>;

    /// `z[b] += dt[b] * v[b]` over the leading (batch) dim.
    fn euler_step(&self, z: &mut Tensor, v: &Tensor, dt: &[f32]) -> Result<()>;

    /// A session that captures one denoising step's device work and replays it
    /// (the CUDA backend's graphs), for one sampling run; `None` when this
    /// backend has none or it is turned off. See [`StepGraphSession`].
    fn step_graphs(&self) -> Option<Box<dyn StepGraphSession + '_>> {
        None
    }
}

/// The host values of a denoising step that change from step to step.
#[derive(Clone, Copy, Debug)]
pub struct StepInputs<'a> {
    /// The DiT's timesteps, exactly as the step passes them to
    /// [`Backend::timestep_embedding`] (empty when the step runs no forward).
    pub timesteps: &'a [f32],
    /// The Euler step sizes, exactly as the step passes them to [`Backend::euler_step`].
    pub step_sizes: &'a [f32],
}

/// One denoising step, run on the latent `z` (updated in place): returns the
/// guided velocity it used.
pub type StepFn<'a> = dyn FnMut(&mut Tensor) -> Result<Tensor> + 'a;

/// Capture of a denoising step as a device graph and its replay, for one
/// sampling run (the sampler decides when: `sampler::graphs`). While a step runs
/// through the session, the backend reads the [`StepInputs`] from fixed device
/// buffers that the session rewrites before every step, so a captured step
/// reads the current step's values when replayed.
pub trait StepGraphSession {
    /// Runs `step` now (eagerly) with `inputs` in the session's buffers: the
    /// warm-up before a capture (it fills the backend's caches), or a step that
    /// must not disturb a captured graph's memory.
    fn run_bound(&mut self, inputs: &StepInputs, z: &mut Tensor, step: &mut StepFn) -> Result<Tensor>;

    /// Captures `step` into a graph (dropping any earlier one) and launches it;
    /// returns the velocity. `Ok(Err(why))` when the step cannot be captured (an
    /// upload, a download or a synchronization inside it, a driver error): the
    /// step has then not run and `z` is unchanged, so the caller runs it eagerly.
    /// `step` must update `z` in place (as `euler_step` does).
    fn capture(&mut self, inputs: &StepInputs, z: &mut Tensor, step: &mut StepFn) -> Result<std::result::Result<Tensor, String>>;

    /// Replays the captured graph with `inputs`; `Ok(None)` when there is no
    /// graph or replaying it would be unsafe (the backend's memory changed since
    /// the capture, `z` moved or is shared, or the inputs' lengths differ).
    fn replay(&mut self, inputs: &StepInputs, z: &mut Tensor) -> Result<Option<Tensor>>;
}
