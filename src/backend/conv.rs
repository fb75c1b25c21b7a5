//! Convolution-family ops (the VAE's), declared apart from the DiT's ops so
//! the two op sets grow independently. Every backend implements both.
//!
//! Tensors are row-major and channel-first, as in PyTorch: images are
//! `[N, C, H, W]`, videos `[N, C, T, H, W]`. Convolutions are
//! cross-correlations (PyTorch's `Conv2d`/`Conv3d`) with stride 1, dilation 1
//! and one group: the only kind the Open-Sora 1.2 VAE decoder uses.

use super::Activation;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// Weights of one convolution, in PyTorch's layout `[C_out, C_in, kt, kh, kw]`
/// (a `Conv2d` kernel `[C_out, C_in, kh, kw]` is kept with `kt = 1`), and an
/// optional bias `[C_out]`.
#[derive(Clone, Debug)]
pub struct ConvWeight {
    /// Always 5-D: `[C_out, C_in, kt, kh, kw]`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub in_channels: usize,
    pub out_channels: usize,
    /// `[kt, kh, kw]`.
    pub kernel: [usize; 3],
}

impl ConvWeight {
    /// From a 4-D (`Conv2d`) or 5-D (`Conv3d`) f32 weight and an optional `[C_out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let s = weight.shape().to_vec();
        ensure!(s.len() == 4 || s.len() == 5, "convolution weight must be 4-D or 5-D, got {s:?}");
        let kernel = if s.len() == 4 { [1, s[2], s[3]] } else { [s[2], s[3], s[4]] };
        ensure!(s[0] > 0 && s[1] > 0 && kernel.iter().all(|&k| k > 0), "convolution weight {s:?} has an empty dimension");
        if let Some(b) = &bias {
            ensure!(b.shape() == [s[0]], "convolution bias must be [{}], got {:?}", s[0], b.shape());
        }
        let weight = weight.reshape(&[s[0], s[1], kernel[0], kernel[1], kernel[2]])?;
        Ok(ConvWeight { weight, bias, in_channels: s[1], out_channels: s[0], kernel })
    }
}

/// Zero padding `[before, after]` of the `t`, `h` and `w` dimensions of a 3-D convolution.
pub type Pad3 = [[usize; 2]; 3];

/// The ops of the VAE decoders. Every op validates its shapes and fails with
/// an error naming them rather than panicking.
pub trait ConvOps {
    /// Moves a loaded convolution's weights to where this backend computes,
    /// once, before it is used (the CUDA backend uploads the weight as bf16
    /// and the bias as f32, shapes unchanged); the default keeps them as they are.
    fn prepare_conv(&self, _w: &mut ConvWeight) -> Result<()> {
        Ok(())
    }

    /// `nn.Conv2d(stride=1, padding=pad)`: `x` `[N, C_in, H, W]` zero-padded by
    /// `pad[0]` rows above and below and `pad[1]` columns left and right, then
    /// `out[n, o, y, x] = bias[o] + sum_{c, i, j} w[o, c, i, j] * xpad[n, c, y + i, x + j]`:
    /// `[N, C_out, H + 2 pad[0] - kh + 1, W + 2 pad[1] - kw + 1]`. `w.kernel[0]` must be 1.
    fn conv2d(&self, x: &Tensor, w: &ConvWeight, pad: [usize; 2]) -> Result<Tensor>;

    /// `nn.Conv3d(stride=1)` after `F.pad` with zeros: `x` `[N, C_in, T, H, W]`
    /// gets `pad[d][0]` zeros before and `pad[d][1]` after along `t`, `h`, `w`,
    /// then `out[n, o, t, y, x] = bias[o] + sum_{c, a, i, j} w[o, c, a, i, j] * xpad[n, c, t + a, y + i, x + j]`.
    /// Open-Sora's `CausalConv3d` is `pad = [[kt - 1, 0], [kh / 2; 2], [kw / 2; 2]]`.
    fn conv3d(&self, x: &Tensor, w: &ConvWeight, pad: Pad3) -> Result<Tensor>;

    /// `nn.GroupNorm(groups, C, eps)` with affine `weight`, `bias` (`[C]`) on
    /// `x` `[N, C, ...]`: for each sample and each group of `C / groups`
    /// consecutive channels, mean and biased variance over the group's channels
    /// and all trailing positions, `y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]`,
    /// then `act` (e.g. the SiLU that follows every norm in the VAE).
    fn group_norm(&self, x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f32, act: Activation) -> Result<Tensor>;

    /// `F.interpolate(scale_factor=2, mode="nearest")` on the last two dims:
    /// `[.., H, W] -> [.., 2H, 2W]` with `out[.., y, x] = x[.., y / 2, x / 2]`.
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor>;

    /// Depth to time, einops `"N (C s) T H W -> N C (T s) H W"`:
    /// `[N, C * s, T, H, W] -> [N, C, T * s, H, W]` with
    /// `out[n, c, t * s + i] = x[n, c * s + i, t]`.
    fn depth_to_time(&self, x: &Tensor, s: usize) -> Result<Tensor>;

    /// Per-channel affine map of `x` `[N, C, ...]`: `out[n, c, ..] = x[n, c, ..] * scale[c] + shift[c]`;
    /// `scale` and `shift` hold `C` values each (any shape, e.g. `[1, C, 1, 1, 1]` buffers).
    fn channel_affine(&self, x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor>;
}
