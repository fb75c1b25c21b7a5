"""Trains the demo STDiT3 (pixel space) jointly with a small T5 encoder using
Open-Sora 1.2's rectified-flow objective.

    train.py --seed 0 --minutes 45 --out /tmp/demo-run
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import tokenizer as tk  # noqa: E402
from models import STDiT3, T5Encoder  # noqa: E402

MAX_LEN = 20


def configs(tok_vocab, patch_t=2):
    dit = {
        "architectures": ["STDiT3"],
        "model_type": "STDiT3",
        "caption_channels": 64,
        "class_dropout_prob": 0.1,
        "depth": 3,
        "drop_path": 0.0,
        "enable_flash_attn": False,
        "enable_layernorm_kernel": False,
        "enable_sequence_parallelism": False,
        "freeze_y_embedder": False,
        "hidden_size": 64,
        "in_channels": 3,
        "input_size": [None, None, None],
        "input_sq_size": 512,
        "mlp_ratio": 4.0,
        "model_max_length": MAX_LEN,
        "num_heads": 4,
        "only_train_temporal": False,
        "patch_size": [patch_t, 2, 2],
        "pred_sigma": True,
        "qk_norm": True,
        "skip_y_embedder": False,
        "torch_dtype": "float32",
    }
    t5 = {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_heads": 4,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "vocab_size": int(math.ceil(tok_vocab / 8) * 8),
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "initializer_factor": 1.0,
        "dropout_rate": 0.0,
        "classifier_dropout": 0.0,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "is_encoder_decoder": False,
        "tie_word_embeddings": False,
        "use_cache": False,
        "torch_dtype": "float32",
    }
    return dit, t5


def sample_t(n, gen, method, shift, mean=0.0):
    """Training timesteps in [0, 1000]. `shift` > 1 moves them towards pure noise with the
    map of Open-Sora's timestep transform, t' = s t / (1 + (s - 1) t): the prompt decides the
    background, the position and the direction only while they cannot be read from x_t."""
    if method == "logit-normal":
        t = torch.sigmoid(torch.randn(n, generator=gen) + mean)
    else:
        t = torch.rand(n, generator=gen)
    t = shift * t / (1 + (shift - 1) * t)
    return t * 1000.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--t-sample", choices=["logit-normal", "uniform"], default="logit-normal")
    ap.add_argument("--motion", choices=list(data.MOTION), default="slow", help="motion preset of the clips (data.MOTION)")
    ap.add_argument("--captions", choices=["plain", "varied"], default="plain", help="caption variants (data.varied_caption)")
    ap.add_argument("--patch-t", type=int, default=1,
                    help="temporal patch size (Open-Sora: 1); with 2 every token holds two consecutive frames")
    ap.add_argument("--t-mean", type=float, default=0.0, help="location of the logit-normal (0 = centred on t = 500)")
    ap.add_argument("--t-shift", type=float, default=1.0, help="timestep shift towards noise (1 = none)")
    ap.add_argument("--resume", help="checkpoint to continue from (weights, EMA and optimizer state)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-every", type=float, default=5.0, help="minutes between checkpoints")
    ap.add_argument("--max-steps", type=int, default=0)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    gen = torch.Generator().manual_seed(a.seed + 1)
    os.makedirs(a.out, exist_ok=True)

    tok = tk.build()
    dit_cfg, t5_cfg = configs(tok.get_vocab_size(), a.patch_t)
    dit = STDiT3(dit_cfg)
    t5 = T5Encoder(t5_cfg)
    ema_dit, ema_t5 = copy.deepcopy(dit).eval(), copy.deepcopy(t5).eval()
    for p in list(ema_dit.parameters()) + list(ema_t5.parameters()):
        p.requires_grad_(False)
    params = list(dit.parameters()) + list(t5.parameters())
    n_dit = sum(p.numel() for p in dit.parameters())
    n_t5 = sum(p.numel() for p in t5.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, betas=(0.9, 0.99))
    resumed = 0
    if a.resume:
        ck = torch.load(a.resume, map_location="cpu", weights_only=False)
        dit.load_state_dict(ck["dit"])
        t5.load_state_dict(ck["t5"])
        ema_dit.load_state_dict(ck["ema_dit"])
        ema_t5.load_state_dict(ck["ema_t5"])
        opt.load_state_dict(ck["opt"])
        resumed = ck["step"]
    meta = dict(args=vars(a), dit=dit_cfg, t5=t5_cfg, params_dit=n_dit, params_t5=n_t5,
                frames=data.FRAMES, height=data.HEIGHT, width=data.WIDTH, fps=data.FPS, max_len=MAX_LEN)
    json.dump(meta, open(os.path.join(a.out, "run.json"), "w"), indent=1)
    print(f"DiT {n_dit/1e6:.2f} M params, T5 {n_t5/1e6:.3f} M params", flush=True)

    log = open(os.path.join(a.out, "loss.log"), "a")
    B = a.batch
    fps = torch.full((B,), float(data.FPS))
    hw = torch.full((B,), float(data.HEIGHT)), torch.full((B,), float(data.WIDTH))
    start = time.time()
    last_ckpt = start
    step, run_loss = resumed, []

    def save(tag):
        sd = dict(dit=dit.state_dict(), t5=t5.state_dict(), ema_dit=ema_dit.state_dict(), ema_t5=ema_t5.state_dict(),
                  opt=opt.state_dict(), step=step, elapsed=time.time() - start, meta=meta)
        tmp = os.path.join(a.out, f"{tag}.pt.tmp")
        torch.save(sd, tmp)
        os.replace(tmp, os.path.join(a.out, f"{tag}.pt"))

    while True:
        elapsed = time.time() - start
        if elapsed > a.minutes * 60 or (a.max_steps and step >= a.max_steps):
            break
        x0, caps = data.make_batch(rng, B, motion=a.motion, captions=a.captions)
        x0 = torch.from_numpy(x0)
        ids, mask = tk.encode(tok, caps, MAX_LEN)
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        y = t5(ids, mask)[:, None]  # [B, 1, L, cc]
        drop = torch.rand(B, generator=gen) < 0.1
        y = torch.where(drop[:, None, None, None], dit.y_embedder.y_embedding[None, None].expand_as(y), y)
        t = sample_t(B, gen, a.t_sample, a.t_shift, a.t_mean)
        noise = torch.randn(x0.shape, generator=gen)
        tp = (t / 1000.0)[:, None, None, None, None]
        xt = (1 - tp) * x0 + tp * noise
        out = dit(xt, t, y, mask, fps, *hw)
        loss = ((out[:, :3] - (x0 - noise)) ** 2).mean()
        lr = a.lr * min(1.0, (step + 1) / a.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            for e, p in zip(list(ema_dit.parameters()) + list(ema_t5.parameters()), params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        step += 1
        run_loss.append(loss.item())
        if step % 20 == 0:
            msg = f"step {step} t {time.time()-start:.0f}s loss {np.mean(run_loss):.4f} gnorm {gn:.3f} lr {lr:.2e}"
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()
            run_loss = []
        if time.time() - last_ckpt > a.ckpt_every * 60:
            save("last")
            last_ckpt = time.time()
    save("last")
    print(f"done: {step} steps in {time.time()-start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
