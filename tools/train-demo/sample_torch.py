"""Prompt -> video with the exported demo model in PyTorch, using the engine's
RFLOW sampler (src/sampler/rflow.rs): timesteps (1 - i/N) * 1000, optional
timestep transform, CFG against the null caption masked by the prompt's mask,
Euler updates. Prints the seconds spent per stage.

    sample_torch.py --prompt "a red circle moving right" --seed 0 --output /tmp/v.safetensors
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from models import STDiT3, T5Encoder  # noqa: E402

ROOT = os.path.normpath(os.path.join(HERE, "../.."))


def transform(t, num_timesteps, height, width, num_frames, first_frames):
    """rflow.rs `transform`, in float32 like the engine."""
    f = np.float32
    t = f(t) / f(num_timesteps)
    ratio_space = np.sqrt(f(height) * f(width) / f(512.0 * 512.0), dtype=np.float32)
    frames = f(1.0) if first_frames == 1.0 else f(np.floor(f(num_frames) / f(17.0)) * f(5.0))
    ratio = f(ratio_space * np.sqrt(frames, dtype=np.float32))
    new_t = f(ratio * t / (f(1.0) + (ratio - f(1.0)) * t))
    return f(new_t * f(num_timesteps))


def timesteps(steps, height, width, frames, use_transform, num_timesteps=1000.0):
    out = []
    for i in range(steps):
        t = np.float32((1.0 - i / steps) * num_timesteps)
        out.append(transform(t, num_timesteps, height, width, frames, frames) if use_transform else t)
    return out


def prepare_prompt(prompt, aes):
    """Open-Sora appends the aesthetic score (the engine's default --aes 6.5); the caption
    cleaning is the identity on this model's simple lower-case prompts."""
    if aes is not None and "aesthetic score:" not in prompt:
        prompt = f"{prompt} aesthetic score: {aes:.1f}."
    return prompt


def encode_prompts(tok, prompts, max_len):
    tok = Tokenizer.from_str(tok.to_str())
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=max_len)
    enc = tok.encode_batch(prompts)
    return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


@torch.no_grad()
def sample(dit, y, mask, z0, steps, cfg, fps, height, width, frames, use_transform=False):
    """y [B,1,L,cc], mask [B,L], z0 [B,C,T,H,W] -> final z."""
    b = z0.shape[0]
    null = dit.y_embedder.y_embedding[None, None].expand(b, 1, *dit.y_embedder.y_embedding.shape)
    y_all = torch.cat([y, null], 0)
    mask_all = torch.cat([mask, mask], 0)
    ts = timesteps(steps, height, width, frames, use_transform)
    fps_t = torch.full((2 * b,), float(fps))
    h_t, w_t = torch.full((2 * b,), float(height)), torch.full((2 * b,), float(width))
    z = z0.clone()
    cin = dit.in_ch
    for i, t in enumerate(ts):
        t_in = torch.full((2 * b,), float(t))
        pred = dit(torch.cat([z, z], 0), t_in, y_all, mask_all, fps_t, h_t, w_t)[:, :cin]
        v_c, v_u = pred[:b], pred[b:]
        v = v_u + cfg * (v_c - v_u)
        dt = (t - ts[i + 1]) if i + 1 < len(ts) else t
        z = z + v * (float(dt) / 1000.0)
    return z


def load_dir(model_dir):
    dcfg = json.load(open(os.path.join(model_dir, "stdit3/config.json")))
    tcfg = json.load(open(os.path.join(model_dir, "t5/config.json")))
    dit, t5 = STDiT3(dcfg), T5Encoder(tcfg)
    dit.load_state_dict(load_file(os.path.join(model_dir, "stdit3/model.safetensors")))
    t5.load_state_dict(load_file(os.path.join(model_dir, "t5/model.safetensors")))
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer/tokenizer.json"))
    p = os.path.join(model_dir, "defaults.json")
    defaults = json.load(open(p)) if os.path.exists(p) else {}
    return dit.eval(), t5.eval(), tok, defaults


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models/demo"))
    ap.add_argument("--prompt", action="append", required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--fps", type=float)
    ap.add_argument("--aes", default="6.5", help='aesthetic score appended to the prompt, or "none"')
    ap.add_argument("--timestep-transform", choices=["on", "off"],
                    help="Open-Sora's resolution/length timestep transform [default: defaults.json's "
                         "timestep_transform, else on, as the engine]; the demo model turns it off: with "
                         "fewer than 17 frames its ratio is 0 and every timestep becomes 0")
    ap.add_argument("--init-noise", help="safetensors file with z0 [B,3,T,H,W]")
    ap.add_argument("--output", required=True, help=".safetensors file receiving `video` [B,3,T,H,W]")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    dit, t5, tok, d = load_dir(a.model)
    steps = a.steps or d.get("steps", 30)
    cfg = a.cfg if a.cfg is not None else d.get("cfg", 7.0)
    frames = a.frames or d.get("frames", 8)
    height = a.height or d.get("height", 16)
    width = a.width or d.get("width", 16)
    fps = a.fps or d.get("fps", 8)
    aes = None if a.aes == "none" else float(a.aes)
    use_transform = (a.timestep_transform == "on") if a.timestep_transform else bool(d.get("timestep_transform", True))

    t0 = time.time()
    prompts = [prepare_prompt(p, aes) for p in a.prompt]
    ids, mask = encode_prompts(tok, prompts, dit.cfg["model_max_length"])
    with torch.no_grad():
        y = t5(ids, mask)[:, None]
    t_text = time.time() - t0

    t0 = time.time()
    b = len(prompts)
    if a.init_noise:
        z0 = load_file(a.init_noise)["z0"].float()
    else:
        z0 = torch.randn(b, dit.in_ch, frames, height, width, generator=torch.Generator().manual_seed(a.seed))
    assert z0.shape == (b, dit.in_ch, frames, height, width), f"z0 {tuple(z0.shape)}"
    z = sample(dit, y, mask, z0, steps, cfg, fps, height, width, frames, use_transform)
    t_dit = time.time() - t0

    t0 = time.time()
    save_file({"video": z.contiguous()}, a.output, metadata={"prompts": json.dumps(prompts)})
    t_write = time.time() - t0
    print(f"text encoding {t_text:.3f}s, DiT loop {t_dit:.3f}s ({steps} steps, cfg {cfg}), writing {t_write:.3f}s")


if __name__ == "__main__":
    main()
