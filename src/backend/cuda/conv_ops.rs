//! [`ConvOps`] of [`CudaBackend`]: the VAE decoders' ops on the kernels of
//! `kernels/conv.cu` (semantics in `kernels/qc_types.h`). Convolutions run in
//! bf16 with f32 accumulation and give bf16, like the linear layers;
//! group norm, upsampling, depth-to-time and the channel affine map keep the
//! executor's elementwise rule (f32 for f32 inputs, bf16 otherwise).
//! Convolution weights are uploaded once by [`ConvOps::prepare_conv`] (called
//! by `VideoVae::prepare`); an unprepared weight is converted at every use.

use super::abi::*;
use super::buffer::DeviceBuffer;
use super::executor::{float_dtype, to_bf16, CudaBackend};
use super::launch_cfg;
use crate::backend::conv::{ConvOps, ConvWeight, Pad3};
use crate::backend::Activation;
use crate::tensor::{DType, Device, Storage, Tensor};
use anyhow::{bail, ensure, Result};

/// Threads of `qc_conv3d_bf16` (the kernel traps on any other count).
const CONV_THREADS: u32 = 128;
/// Output channels and output positions per `qc_conv3d_bf16` block.
const CONV_TILE_M: usize = 64;
const CONV_TILE_N: usize = 64;
/// Elements per group-norm statistics chunk (one block each).
const GROUP_NORM_CHUNK: usize = 16384;
const GROUP_NORM_THREADS: u32 = 256;

fn i32_dim(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{what} ({v}) is too large for the GPU convolution"))
}

impl CudaBackend {
    /// `x` `[n, c_in, t, h, w]` convolved with `w` (bf16 out), `pad` the zeros before/after per dim.
    fn conv_gpu(&self, what: &str, x: &Tensor, dims: [usize; 5], w: &ConvWeight, pad: Pad3) -> Result<Tensor> {
        let [n, c, t, h, wd] = dims;
        ensure!(c == w.in_channels, "{what}: input {:?} has {c} channels, the kernel expects {}", x.shape(), w.in_channels);
        let [kt, kh, kw] = w.kernel;
        let mut out = [0usize; 3];
        for (d, (size, k)) in [t, h, wd].into_iter().zip([kt, kh, kw]).enumerate() {
            let padded = size + pad[d][0] + pad[d][1];
            ensure!(padded >= k, "{what}: {} size {size} padded by {:?} is smaller than the kernel ({k}) for input {:?}", ["t", "h", "w"][d], pad[d], x.shape());
            out[d] = padded - k + 1;
        }
        ensure!(w.weight.numel() == w.out_channels * c * kt * kh * kw, "{what}: weight {:?} does not match {} x {c} x {:?}", w.weight.shape(), w.out_channels, w.kernel);
        let positions = n * out[0] * out[1] * out[2];
        let grid_x = positions.div_ceil(CONV_TILE_N);
        let grid_y = w.out_channels.div_ceil(CONV_TILE_M);
        ensure!(grid_x <= i32::MAX as usize && grid_y <= 65535, "{what}: output of {positions} positions x {} channels is too large for one launch", w.out_channels);
        i32_dim(c * kt * kh * kw, &format!("{what}: reduction length"))?;
        ensure!(pad.iter().flatten().all(|&p| p <= 1 << 16) && w.kernel.iter().all(|&k| k <= 1 << 16), "{what}: padding {pad:?} or kernel {:?} too large", w.kernel);
        if w.weight.device() == Device::Cpu {
            self.note_once("unprepared-conv", || {
                "a convolution's weight is on the host: it is uploaded at every use (call VideoVae::prepare with the CUDA backend once after loading)".to_string()
            });
        }
        let xb = self.dev(x, DType::BF16)?;
        let wb = self.dev_aligned(&w.weight, DType::BF16)?;
        let bias = w.bias.as_ref().map(|b| self.dev(b, DType::F32)).transpose()?;
        let y = self.alloc(DType::BF16, positions * w.out_channels)?;
        let args = QcConvArgs {
            x: xb.address(),
            w: wb.address(),
            bias: bias.as_ref().map_or(0, |b| b.address()),
            y: y.address(),
            n: i32_dim(n, &format!("{what}: batch"))?,
            c_in: i32_dim(c, &format!("{what}: input channels"))?,
            t_in: i32_dim(t, &format!("{what}: input frames"))?,
            h_in: i32_dim(h, &format!("{what}: input height"))?,
            w_in: i32_dim(wd, &format!("{what}: input width"))?,
            c_out: i32_dim(w.out_channels, &format!("{what}: output channels"))?,
            t_out: i32_dim(out[0], &format!("{what}: output frames"))?,
            h_out: i32_dim(out[1], &format!("{what}: output height"))?,
            w_out: i32_dim(out[2], &format!("{what}: output width"))?,
            kt: kt as i32,
            kh: kh as i32,
            kw: kw as i32,
            pad_t: pad[0][0] as i32,
            pad_h: pad[1][0] as i32,
            pad_w: pad[2][0] as i32,
            _pad: 0,
        };
        if positions > 0 {
            self.run_ext("qc_conv3d_bf16", ((grid_x as u32, grid_y as u32, 1), CONV_THREADS, 0), args)?;
        }
        drop((xb, wb, bias));
        self.tensor(&[n, w.out_channels, out[0], out[1], out[2]], y)
    }

    /// Runs the flat `QcResampleArgs` kernel `{name}_{suffix}` on `x` (as `dt`),
    /// with `affine`'s (scale, shift) as f32, into a fresh buffer of `out_numel`.
    fn resample(&self, name: &str, x: &Tensor, dt: DType, out_numel: usize, mut args: QcResampleArgs, affine: Option<(&Tensor, &Tensor)>) -> Result<DeviceBuffer> {
        let xb = self.dev(x, dt)?;
        let y = self.alloc(dt, out_numel)?;
        let affine = affine.map(|(a, b)| Ok::<_, anyhow::Error>((self.dev(a, DType::F32)?, self.dev(b, DType::F32)?))).transpose()?;
        args.x = xb.address();
        args.y = y.address();
        if let Some((scale, shift)) = &affine {
            args.scale = scale.address();
            args.shift = shift.address();
        }
        if out_numel > 0 {
            self.run(&format!("{name}_{}", Self::suffix(dt)?), launch_cfg::flat_scalar(out_numel as i64), args)?;
        }
        Ok(y)
    }
}

/// The VAE's ops on the GPU (see the module notes).
impl ConvOps for CudaBackend {
    fn prepare_conv(&self, w: &mut ConvWeight) -> Result<()> {
        if !matches!(w.weight.storage(), Storage::Cuda(b) if b.dtype == DType::BF16) {
            let host = w.weight.to_cpu()?;
            let buf = match host.storage() {
                Storage::BF16(v) => self.upload_raw(DType::BF16, v, "a convolution weight")?,
                _ => {
                    let v = host.to_f32()?;
                    self.upload_raw(DType::BF16, &to_bf16(v.f32()?), "a convolution weight")?
                }
            };
            w.weight = Tensor::new(host.shape(), Storage::Cuda(buf))?;
        }
        if let Some(b) = &mut w.bias {
            if b.device() == Device::Cpu || b.dtype() != DType::F32 {
                let v = b.to_cpu()?.to_f32()?;
                *b = Tensor::new(b.shape(), Storage::Cuda(self.upload_raw(DType::F32, v.f32()?, "a convolution bias")?))?;
            }
        }
        Ok(())
    }

    fn conv2d(&self, x: &Tensor, w: &ConvWeight, pad: [usize; 2]) -> Result<Tensor> {
        let s = x.shape();
        ensure!(s.len() == 4, "conv2d: input must be [N, C, H, W], got {s:?}");
        ensure!(w.kernel[0] == 1, "conv2d: kernel {:?} is 3-D", w.kernel);
        let y = self.conv_gpu("conv2d", x, [s[0], s[1], 1, s[2], s[3]], w, [[0, 0], [pad[0], pad[0]], [pad[1], pad[1]]])?;
        let o = y.shape().to_vec();
        y.reshape(&[o[0], o[1], o[3], o[4]])
    }

    fn conv3d(&self, x: &Tensor, w: &ConvWeight, pad: Pad3) -> Result<Tensor> {
        let s = x.shape();
        ensure!(s.len() == 5, "conv3d: input must be [N, C, T, H, W], got {s:?}");
        self.conv_gpu("conv3d", x, [s[0], s[1], s[2], s[3], s[4]], w, pad)
    }

    fn group_norm(&self, x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f32, act: Activation) -> Result<Tensor> {
        let s = x.shape();
        ensure!(s.len() >= 2, "group_norm: input must be [N, C, ...], got {s:?}");
        let (n, c) = (s[0], s[1]);
        ensure!(groups > 0 && c % groups == 0, "group_norm: {c} channels of {s:?} do not split into {groups} groups");
        ensure!(weight.numel() == c && bias.numel() == c, "group_norm: weight {:?} and bias {:?} must hold {c} values", weight.shape(), bias.shape());
        let silu = match act {
            Activation::None => 0,
            Activation::Silu => 1,
            Activation::GeluTanh => bail!("group_norm: only SiLU or no activation is supported on the GPU, got {act:?}"),
        };
        let dt = float_dtype(&[x]);
        let spatial = x.numel().checked_div(n * c).unwrap_or(0);
        let group_elems = (c / groups) * spatial;
        let rows = n * groups;
        let y = self.alloc(dt, x.numel())?;
        if group_elems == 0 || rows == 0 {
            return self.tensor(s, y);
        }
        let chunks = group_elems.div_ceil(GROUP_NORM_CHUNK);
        ensure!(rows <= 65535 && chunks <= i32::MAX as usize, "group_norm: {n} samples x {groups} groups of {group_elems} elements is too large for one launch");
        let xb = self.dev(x, dt)?;
        let (wb, bb) = (self.dev(weight, DType::F32)?, self.dev(bias, DType::F32)?);
        let stats = self.alloc(DType::F32, rows * chunks * 2)?;
        let args = QcGroupNormArgs {
            x: xb.address(),
            y: y.address(),
            weight: wb.address(),
            bias: bb.address(),
            stats: stats.address(),
            group_elems: group_elems as i64,
            spatial: spatial as i64,
            chunk_elems: GROUP_NORM_CHUNK as i32,
            chunks: chunks as i32,
            eps,
            silu,
            groups: groups as i32,
            _pad: 0,
        };
        let sfx = Self::suffix(dt)?;
        let grid = ((chunks as u32, rows as u32, 1), GROUP_NORM_THREADS, 0);
        self.run_ext(&format!("qc_group_norm_stats_{sfx}"), grid, args)?;
        self.run_ext(&format!("qc_group_norm_apply_{sfx}"), grid, args)?;
        drop((xb, wb, bb, stats));
        self.tensor(s, y)
    }

    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape();
        ensure!(s.len() >= 2, "upsample_nearest2x: input must have at least 2 dims, got {s:?}");
        let r = s.len();
        let (h, w) = (s[r - 2], s[r - 1]);
        let planes = s[..r - 2].iter().product::<usize>();
        let mut shape = s.to_vec();
        shape[r - 2] = 2 * h;
        shape[r - 1] = 2 * w;
        let args = QcResampleArgs { x: 0, y: 0, scale: 0, shift: 0, planes: planes as i64, h: h as i64, w: w as i64, factor: 2, _pad: 0 };
        let y = self.resample("qc_upsample_nearest2x", x, float_dtype(&[x]), x.numel() * 4, args, None)?;
        self.tensor(&shape, y)
    }

    fn depth_to_time(&self, x: &Tensor, s: usize) -> Result<Tensor> {
        let sh = x.shape();
        ensure!(sh.len() == 5, "depth_to_time: input must be [N, C, T, H, W], got {sh:?}");
        ensure!(s > 0 && sh[1].is_multiple_of(s), "depth_to_time: {} channels of {sh:?} are not a multiple of {s}", sh[1]);
        ensure!(s <= i32::MAX as usize, "depth_to_time: factor {s} too large");
        let planes = sh[0] * (sh[1] / s);
        let args = QcResampleArgs { x: 0, y: 0, scale: 0, shift: 0, planes: planes as i64, h: sh[2] as i64, w: (sh[3] * sh[4]) as i64, factor: s as i32, _pad: 0 };
        // Layout op: keeps the dtype (f32 or bf16).
        let dt = match x.dtype() {
            DType::F32 => DType::F32,
            _ => DType::BF16,
        };
        let y = self.resample("qc_depth_to_time", x, dt, x.numel(), args, None)?;
        self.tensor(&[sh[0], sh[1] / s, sh[2] * s, sh[3], sh[4]], y)
    }

    fn channel_affine(&self, x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
        let s = x.shape();
        ensure!(s.len() >= 2, "channel_affine: input must be [N, C, ...], got {s:?}");
        let c = s[1];
        ensure!(scale.numel() == c && shift.numel() == c, "channel_affine: scale {:?} and shift {:?} must hold {c} values for {s:?}", scale.shape(), shift.shape());
        let spatial = x.numel().checked_div(s[0] * c).unwrap_or(0);
        let args = QcResampleArgs { x: 0, y: 0, scale: 0, shift: 0, planes: s[0] as i64, h: c as i64, w: spatial as i64, factor: 1, _pad: 0 };
        let y = self.resample("qc_channel_affine", x, float_dtype(&[x]), x.numel(), args, Some((scale, shift)))?;
        self.tensor(s, y)
    }
}
