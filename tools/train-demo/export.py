"""Exports a training checkpoint to the official Open-Sora / Hugging Face layouts:

    models/demo/stdit3/{config.json, model.safetensors}
    models/demo/t5/{config.json, model.safetensors}
    models/demo/tokenizer/{tokenizer.json, tokenizer_config.json, special_tokens_map.json}
    models/demo/defaults.json
and tools/train-demo/parity.safetensors (reference outputs for tests/demo_parity.rs).

    export.py --ckpt /tmp/demo-run/last.pt [--raw] [--steps 30 --cfg 4.0]
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
import tokenizer as tk  # noqa: E402
from models import STDiT3, T5Encoder  # noqa: E402

ROOT = os.path.normpath(os.path.join(HERE, "../.."))
PARITY_CAPTIONS = [
    "a red circle moving right aesthetic score: 6.5.",
    "a blue square moving up on a white background",
]


def load_models(ckpt_path, ema=True):
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    meta = ck["meta"]
    dit = STDiT3(meta["dit"])
    t5 = T5Encoder(meta["t5"])
    dit.load_state_dict(ck["ema_dit" if ema else "dit"])
    t5.load_state_dict(ck["ema_t5" if ema else "t5"])
    return dit.eval(), t5.eval(), meta, ck


def contiguous(sd):
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    ap.add_argument("--out", default=os.path.join(ROOT, "models/demo"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--parity", default=os.path.join(HERE, "parity.safetensors"), help="where the parity reference goes")
    a = ap.parse_args()
    torch.set_num_threads(2)

    dit, t5, meta, ck = load_models(a.ckpt, ema=not a.raw)
    tok = tk.build()

    d = os.path.join(a.out, "stdit3")
    os.makedirs(d, exist_ok=True)
    cfg = dict(meta["dit"])
    cfg["transformers_version"] = "4.44.2"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
    save_file(contiguous(dit.state_dict()), os.path.join(d, "model.safetensors"), metadata={"format": "pt"})

    d = os.path.join(a.out, "t5")
    os.makedirs(d, exist_ok=True)
    cfg = dict(meta["t5"])
    cfg["transformers_version"] = "4.44.2"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
    save_file(contiguous(t5.state_dict()), os.path.join(d, "model.safetensors"), metadata={"format": "pt"})

    tk.save(tok, os.path.join(a.out, "tokenizer"))

    defaults = {"frames": meta["frames"], "height": meta["height"], "width": meta["width"],
                "steps": a.steps, "cfg": a.cfg, "fps": meta["fps"],
                # Trained and sampled without Open-Sora's timestep transform (with fewer than
                # 17 frames it maps every step to 0).
                "timestep_transform": False}
    json.dump(defaults, open(os.path.join(a.out, "defaults.json"), "w"), indent=2)

    # Parity reference: tokenizer, T5 and one DiT forward, all float32.
    L = meta["max_len"]
    ids, mask = tk.encode(tok, PARITY_CAPTIONS, L)
    ids, mask = torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.int64)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        hidden = t5(ids, mask)
        x = torch.randn(2, 3, meta["frames"], meta["height"], meta["width"], generator=g)
        timestep = torch.tensor([900.0, 250.5])
        fps = torch.full((2,), float(meta["fps"]))
        height = torch.full((2,), float(meta["height"]))
        width = torch.full((2,), float(meta["width"]))
        y = hidden[:, None]
        out = dit(x, timestep, y, mask, fps, height, width)
    # All held-out prompts as the engine prepares them (with the aesthetic score suffix).
    heldout = [it["prompt"] + data.AES_SUFFIX for it in json.load(open(os.path.join(HERE, "heldout_prompts.json")))]
    h_ids, h_mask = tk.encode(tok, heldout, L)
    # A short CFG sampling run (engine sampler without the timestep transform).
    from sample_torch import sample
    z0 = torch.randn(2, 3, meta["frames"], meta["height"], meta["width"], generator=g)
    s_steps, s_cfg = 4, 4.0
    s_out = sample(dit, y, mask, z0, s_steps, s_cfg, meta["fps"], meta["height"], meta["width"], meta["frames"])
    tensors = dict(heldout_ids=torch.tensor(h_ids), heldout_mask=torch.tensor(h_mask),
                   sample_z0=z0, sample_y=y.clone(), sample_mask=mask.clone(), sample_out=s_out,
                   input_ids=ids, attention_mask=mask, last_hidden_state=hidden, x=x, timestep=timestep,
                   y=y.contiguous(), mask=mask.clone(), fps=fps, height=height, width=width, out=out)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, a.parity,
              metadata={"captions": json.dumps(PARITY_CAPTIONS), "heldout_captions": json.dumps(heldout),
                        "max_length": str(L), "sample_steps": str(s_steps), "sample_cfg": str(s_cfg),
                        "fps": str(float(meta["fps"]))})

    n_dit = sum(v.numel() for v in dit.state_dict().values())
    n_t5 = sum(v.numel() for v in t5.state_dict().values())
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(a.out) for f in fs)
    print(f"exported step {ck['step']} ({'raw' if a.raw else 'EMA'}) to {a.out}: DiT {n_dit} values, T5 {n_t5}, {size/1e6:.2f} MB")


if __name__ == "__main__":
    main()
