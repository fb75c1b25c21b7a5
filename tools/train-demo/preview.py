"""Samples a few prompts from a training checkpoint (or an exported model dir) and
writes a PNG grid (one row per prompt, frames left to right), for eyeballing.

    preview.py --ckpt /tmp/demo-run/last.pt --png /tmp/preview.png
    preview.py --model models/demo --png /tmp/preview.png
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tokenizer as tk  # noqa: E402
from sample_torch import encode_prompts, load_dir, prepare_prompt, sample  # noqa: E402

DEFAULT_PROMPTS = [
    "a red circle moving right",
    "a blue square moving up on a white background",
    "a green triangle moving left",
    "a yellow circle moving down on a black background",
    "a purple square moving right",
    "a cyan triangle moving up on a white background",
    "a green triangle moving up",  # held-out combination
    "a blue circle moving left on a black background",  # held-out combination
]


def to_grid(video, scale=6):
    v = ((video.clamp(-1, 1) + 1) / 2).numpy()  # [B,3,T,H,W]
    rows = []
    for s in v:
        frames = [np.pad(np.transpose(s[:, f], (1, 2, 0)), ((1, 1), (1, 1), (0, 0)), constant_values=0.5) for f in range(s.shape[1])]
        rows.append(np.concatenate(frames, 1))
    img = (np.concatenate(rows, 0) * 255).round().astype(np.uint8)
    return Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt")
    ap.add_argument("--model")
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--png", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aes", default="6.5")
    ap.add_argument("--prompt", action="append")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.ckpt:
        from export import load_models
        dit, t5, meta, _ = load_models(a.ckpt, ema=not a.raw)
        tok = tk.build()
        T, H, W, fps = meta["frames"], meta["height"], meta["width"], meta["fps"]
    else:
        dit, t5, tok, d = load_dir(a.model)
        T, H, W, fps = d["frames"], d["height"], d["width"], d["fps"]
    prompts = a.prompt or DEFAULT_PROMPTS
    aes = None if a.aes == "none" else float(a.aes)
    ids, mask = encode_prompts(tok, [prepare_prompt(p, aes) for p in prompts], dit.cfg["model_max_length"])
    with torch.no_grad():
        y = t5(ids, mask)[:, None]
    z0 = torch.randn(len(prompts), 3, T, H, W, generator=torch.Generator().manual_seed(a.seed))
    z = sample(dit, y, mask, z0, a.steps, a.cfg, fps, H, W, T)
    to_grid(z).save(a.png)
    for i, p in enumerate(prompts):
        print(i, p)


if __name__ == "__main__":
    main()
