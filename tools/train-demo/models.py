"""STDiT3 and a T5 v1.1 encoder in plain PyTorch, computing what the quantcache
engine computes (src/model/stdit3, src/model/t5, src/backend/cpu/embed.rs), with
the official parameter names so `state_dict()` exports directly."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6
FREQ_DIM = 256


# ----------------------------------------------------------------------------- helpers

def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def layer_norm(x):
    """LayerNorm without affine parameters, eps 1e-6."""
    return F.layer_norm(x, (x.shape[-1],), eps=EPS)


def rms_norm(x, weight, eps=EPS):
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * weight


def timestep_embedding(t, dim=FREQ_DIM):
    """Sinusoid `[cos, sin]`, max period 10000 (the engine's `timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed_2d(h, w, dim, scale, base_size):
    """2D sin-cos position embedding: first half encodes the column, second the row,
    each `[sin, cos]`; positions are `(i / scale) * (base_size / n)`; token `r * w + c`."""
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
    row = (torch.arange(h, dtype=torch.float32) / scale) * (base_size / h)
    col = (torch.arange(w, dtype=torch.float32) / scale) * (base_size / w)
    def sincos(p):
        a = p[:, None] * inv_freq[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)
    ec = sincos(col)  # [w, half]
    er = sincos(row)  # [h, half]
    emb = torch.cat([ec[None, :, :].expand(h, w, half), er[:, None, :].expand(h, w, half)], dim=-1)
    return emb.reshape(h * w, dim)


def apply_rope(x, freqs):
    """GPT-J style rotary embedding over the last dim; x: [..., T, D], freqs [D/2]."""
    t = x.shape[-2]
    pos = torch.arange(t, dtype=torch.float32)
    ang = pos[:, None] * freqs[None]            # [T, D/2]
    ang = ang.repeat_interleave(2, dim=-1)       # [T, D]
    cos, sin = ang.cos(), ang.sin()
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    rot = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return x * cos + rot * sin


# ----------------------------------------------------------------------------- STDiT3

class Mlp2(nn.Module):
    """Linear -> act -> Linear, named `mlp.0` / `mlp.2` (timestep / fps embedders)."""

    def __init__(self, inp, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(inp, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x):
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, in_ch, hidden, patch):
        super().__init__()
        self.proj = nn.Conv3d(in_ch, hidden, kernel_size=patch, stride=patch)

    def forward(self, x):
        x = self.proj(x)                     # [B, C, T, H/2, W/2]
        return x.flatten(2).transpose(1, 2)  # [B, T*S, C], order (t, h, w)


class YProj(nn.Module):
    def __init__(self, cc, hidden):
        super().__init__()
        self.fc1 = nn.Linear(cc, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, y):
        return self.fc2(gelu_tanh(self.fc1(y)))


class CaptionEmbedder(nn.Module):
    def __init__(self, cc, hidden, max_len):
        super().__init__()
        self.y_proj = YProj(cc, hidden)
        # The classifier-free-guidance null caption: a fixed random buffer.
        self.register_buffer("y_embedding", torch.randn(max_len, cc) / cc ** 0.5)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.hd = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.Module()
        self.q_norm.weight = nn.Parameter(torch.ones(self.hd))
        self.k_norm = nn.Module()
        self.k_norm.weight = nn.Parameter(torch.ones(self.hd))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope_freqs=None):
        n, l, c = x.shape
        qkv = self.qkv(x).reshape(n, l, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]       # [n, heads, l, hd]
        q = rms_norm(q, self.q_norm.weight)
        k = rms_norm(k, self.k_norm.weight)
        if rope_freqs is not None:
            q = apply_rope(q, rope_freqs)
            k = apply_rope(k, rope_freqs)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(n, l, c))


class CrossAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.hd = dim // heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, mask):
        """x [B, N, C]; y [B, L, C] projected caption tokens; mask [B, L] (1 = valid)."""
        b, n, c = x.shape
        l = y.shape[1]
        q = self.q_linear(x).reshape(b, n, self.heads, self.hd).transpose(1, 2)
        kv = self.kv_linear(y).reshape(b, l, 2, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        am = mask.bool()[:, None, None, :]  # attend only to the sample's valid tokens
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=am)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class MlpBlock(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, temporal):
        super().__init__()
        self.temporal = temporal
        self.attn = SelfAttention(dim, heads)
        self.cross_attn = CrossAttention(dim, heads)
        self.mlp = MlpBlock(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, mask, t_mlp, T, S, rope_freqs):
        b, n, c = x.shape
        mods = self.scale_shift_table[None] + t_mlp.reshape(b, 6, c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = [m[:, None, :] for m in mods.unbind(1)]
        h = layer_norm(x) * (1 + scale_msa) + shift_msa
        if self.temporal:
            h = h.reshape(b, T, S, c).transpose(1, 2).reshape(b * S, T, c)
            a = self.attn(h, rope_freqs)
            a = a.reshape(b, S, T, c).transpose(1, 2).reshape(b, n, c)
        else:
            a = self.attn(h.reshape(b * T, S, c)).reshape(b, n, c)
        x = x + gate_msa * a
        x = x + self.cross_attn(x, y, mask)
        h = layer_norm(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)


class FinalLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)


class STDiT3(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c = cfg["hidden_size"]
        self.c = c
        self.heads = cfg["num_heads"]
        self.depth = cfg["depth"]
        self.in_ch = cfg["in_channels"]
        self.out_ch = self.in_ch * 2 if cfg.get("pred_sigma", True) else self.in_ch
        self.patch = tuple(cfg["patch_size"])
        self.input_sq_size = float(cfg["input_sq_size"])
        hd = c // self.heads
        self.x_embedder = PatchEmbed(self.in_ch, c, self.patch)
        self.t_embedder = Mlp2(FREQ_DIM, c)
        self.fps_embedder = Mlp2(FREQ_DIM, c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(cfg["caption_channels"], c, cfg["model_max_length"])
        self.rope = nn.Module()
        self.rope.register_buffer("freqs", 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32)[: hd // 2] / hd)))
        self.spatial_blocks = nn.ModuleList([Block(c, self.heads, cfg["mlp_ratio"], False) for _ in range(self.depth)])
        self.temporal_blocks = nn.ModuleList([Block(c, self.heads, cfg["mlp_ratio"], True) for _ in range(self.depth)])
        self.final_layer = FinalLayer(c, math.prod(self.patch) * self.out_ch)
        self.initialize()

    def initialize(self):
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(xavier)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for emb in (self.t_embedder, self.fps_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for blk in list(self.spatial_blocks) + list(self.temporal_blocks):
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.bias)
        for blk in self.temporal_blocks:
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def encode_text(self, y):
        """[B, 1, L, caption_channels] -> [B, L, C] tokens."""
        return self.y_embedder.y_proj(y[:, 0])

    def forward(self, x, timestep, y, mask, fps, height, width):
        """x [B, Cin, T, H, W]; timestep [B]; y [B, 1, L, cc]; mask [B, L]; fps [B];
        height, width: [B] (the first sample's is used). Returns [B, Cout, T, H, W]."""
        b, _, T, H, W = x.shape
        pt, ph, pw = self.patch
        assert H % ph == 0 and W % pw == 0 and T % pt == 0
        nt, nh, nw = T // pt, H // ph, W // pw
        S = nh * nw
        c = self.c

        t = self.t_embedder(timestep_embedding(timestep)) + self.fps_embedder(timestep_embedding(fps))
        t_mlp = self.t_block(t)
        yt = self.encode_text(y)

        h0, w0 = float(height[0]), float(width[0])
        scale = math.sqrt(h0 * w0) / self.input_sq_size
        base_size = float(round(math.sqrt(S)))
        xx = self.x_embedder(x)
        pos = pos_embed_2d(nh, nw, c, torch.tensor(scale, dtype=torch.float32), base_size)
        xx = (xx.reshape(b, nt, S, c) + pos[None, None]).reshape(b, nt * S, c)

        for sb, tb in zip(self.spatial_blocks, self.temporal_blocks):
            xx = sb(xx, yt, mask, t_mlp, nt, S, None)
            xx = tb(xx, yt, mask, t_mlp, nt, S, self.rope.freqs)

        shift, scale_ = (self.final_layer.scale_shift_table[None] + t[:, None]).unbind(1)
        xx = layer_norm(xx) * (1 + scale_[:, None]) + shift[:, None]
        out = self.final_layer.linear(xx)  # [B, N, pt*ph*pw*Cout], ordered (pt, ph, pw, co)
        co = self.out_ch
        out = out.reshape(b, nt, nh, nw, pt, ph, pw, co)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, co, T, H, W)
        return out


# ----------------------------------------------------------------------------- T5 v1.1 encoder

def relative_position_bucket(rel, num_buckets=32, max_distance=128):
    """transformers' bidirectional `_relative_position_bucket`."""
    nb = num_buckets // 2
    ret = (rel > 0).long() * nb
    n = rel.abs()
    max_exact = nb // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact)
    ).long()
    large = torch.minimum(large, torch.full_like(large, nb - 1))
    return ret + torch.where(is_small, n, large)


class T5Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms_norm(x, self.weight)


class T5Attn(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        d, inner = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"]
        self.h, self.dk = cfg["num_heads"], cfg["d_kv"]
        self.q = nn.Linear(d, inner, bias=False)
        self.k = nn.Linear(d, inner, bias=False)
        self.v = nn.Linear(d, inner, bias=False)
        self.o = nn.Linear(inner, d, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg["relative_attention_num_buckets"], self.h)

    def forward(self, x, bias):
        b, l, _ = x.shape
        sp = lambda z: z.reshape(b, l, self.h, self.dk).transpose(1, 2)
        q, k, v = sp(self.q(x)), sp(self.k(x)), sp(self.v(x))
        scores = q @ k.transpose(-1, -2) + bias  # unscaled
        a = torch.softmax(scores.float(), dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(b, l, self.h * self.dk))


class T5Layer0(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        self.SelfAttention = T5Attn(cfg, has_bias)
        self.layer_norm = T5Norm(cfg["d_model"])


class DenseGated(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, ff = cfg["d_model"], cfg["d_ff"]
        self.wi_0 = nn.Linear(d, ff, bias=False)
        self.wi_1 = nn.Linear(d, ff, bias=False)
        self.wo = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.wo(gelu_tanh(self.wi_0(x)) * self.wi_1(x))


class T5Layer1(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = DenseGated(cfg)
        self.layer_norm = T5Norm(cfg["d_model"])


class T5Block(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5Layer0(cfg, has_bias), T5Layer1(cfg)])

    def forward(self, h, bias):
        h = h + self.layer[0].SelfAttention(self.layer[0].layer_norm(h), bias)
        return h + self.layer[1].DenseReluDense(self.layer[1].layer_norm(h))


class T5Stack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, i == 0) for i in range(cfg["num_layers"])])
        self.final_layer_norm = T5Norm(cfg["d_model"])


class T5Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        self.encoder = T5Stack(cfg)
        f = cfg.get("initializer_factor", 1.0)
        d, dk, h, ff = cfg["d_model"], cfg["d_kv"], cfg["num_heads"], cfg["d_ff"]
        nn.init.normal_(self.shared.weight, std=f * 1.0)
        for blk in self.encoder.block:
            a = blk.layer[0].SelfAttention
            nn.init.normal_(a.q.weight, std=f * (d * dk) ** -0.5)
            nn.init.normal_(a.k.weight, std=f * d ** -0.5)
            nn.init.normal_(a.v.weight, std=f * d ** -0.5)
            nn.init.normal_(a.o.weight, std=f * (h * dk) ** -0.5)
            if hasattr(a, "relative_attention_bias"):
                nn.init.normal_(a.relative_attention_bias.weight, std=f * d ** -0.5)
            m = blk.layer[1].DenseReluDense
            nn.init.normal_(m.wi_0.weight, std=f * d ** -0.5)
            nn.init.normal_(m.wi_1.weight, std=f * d ** -0.5)
            nn.init.normal_(m.wo.weight, std=f * ff ** -0.5)

    def forward(self, ids, mask):
        """ids, mask: [B, L] int64 -> last_hidden_state [B, L, d_model]."""
        b, l = ids.shape
        h = self.shared(ids)
        pos = torch.arange(l)
        rel = pos[None, :] - pos[:, None]  # key - query
        buckets = relative_position_bucket(rel, self.cfg["relative_attention_num_buckets"], self.cfg["relative_attention_max_distance"])
        bias = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias(buckets)  # [L, L, H]
        bias = bias.permute(2, 0, 1)[None]  # [1, H, L, L]
        neg = torch.finfo(torch.float32).min
        bias = bias + (1.0 - mask[:, None, None, :].float()) * neg
        for blk in self.encoder.block:
            h = blk(h, bias)
        return self.encoder.final_layer_norm(h)
