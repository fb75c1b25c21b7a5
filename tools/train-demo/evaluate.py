"""Scores generated clips against the held-out prompts' ground truth with simple
measurements: background = brighter or darker than mid-grey (corners), colour =
nearest palette colour of the foreground pixels, direction = the foreground
centroid's motion between the first and last frames, shape = foreground fill
ratio of its bounding box (square ~1, circle ~0.79, triangle ~0.5).

    evaluate.py --model models/demo [--seed 0]      # samples the 50 held-out prompts
    evaluate.py --ground-truth                      # sanity check on rendered clips
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402


def measure(clip):
    """clip: [3, T, H, W] in [-1, 1] -> dict of measured attributes."""
    v = (np.clip(clip, -1, 1) + 1) / 2
    _, T, H, W = v.shape
    corners = np.concatenate([v[:, :, :2, :2].reshape(3, -1), v[:, :, :2, -2:].reshape(3, -1),
                              v[:, :, -2:, :2].reshape(3, -1), v[:, :, -2:, -2:].reshape(3, -1)], 1)
    bg = np.median(corners, axis=1)
    background = "white" if bg.mean() > 0.5 else "black"
    dist = np.sqrt(((v - bg[:, None, None, None]) ** 2).sum(0))  # [T, H, W]
    fg = dist > 0.35
    out = dict(background=background)
    if fg.sum() < 3:
        return dict(out, colour=None, direction=None, shape=None)
    cols = v.transpose(1, 2, 3, 0)[fg]
    mean = cols.mean(0)
    names = list(data.COLOURS)
    out["colour"] = names[int(np.argmin([np.sum((mean - np.array(data.COLOURS[n])) ** 2) for n in names]))]
    ys, xs = np.mgrid[0:H, 0:W]
    cents = []
    for t in range(T):
        m = fg[t]
        if m.sum() >= 2:
            cents.append((t, xs[m].mean(), ys[m].mean()))
    if len(cents) >= 2:
        k = max(1, len(cents) // 3)
        a = np.mean([c[1:] for c in cents[:k]], 0)
        b = np.mean([c[1:] for c in cents[-k:]], 0)
        dx, dy = b - a
        out["direction"] = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
        out["travel_px"] = float(np.hypot(dx, dy))
    else:
        out["direction"] = None
    # shape from the frame whose foreground is most compact and not clipped by the border
    ratios = []
    for t in range(T):
        m = fg[t]
        if m.sum() < 4:
            continue
        r0, r1 = ys[m].min(), ys[m].max()
        c0, c1 = xs[m].min(), xs[m].max()
        if r0 == 0 or c0 == 0 or r1 == H - 1 or c1 == W - 1:
            continue
        ratios.append(m.sum() / ((r1 - r0 + 1) * (c1 - c0 + 1)))
    if ratios:
        r = float(np.median(ratios))
        out["fill"] = r
        out["shape"] = "square" if r > 0.86 else ("circle" if r > 0.62 else "triangle")
    else:
        out["shape"] = None
    return out


def score(items, measured):
    keys = ["colour", "direction", "shape", "background"]
    acc = {k: [] for k in keys}
    for it, m in zip(items, measured):
        for k in keys:
            if k == "background" and it.get("background") is None:
                continue
            acc[k].append(m.get(k) == it[k])
    return {k: (float(np.mean(v)) if v else None, len(v)) for k, v in acc.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "../../models/demo"))
    ap.add_argument("--ground-truth", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--aes", default="6.5")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    items = json.load(open(os.path.join(HERE, "heldout_prompts.json")))
    if a.ground_truth:
        rng = np.random.default_rng(a.seed)
        clips = []
        for it in items:
            p = data.sample_params(rng, it["colour"], it["shape"], it["direction"])
            if it["background"]:
                p["background"] = it["background"]
            clips.append(data.render(it["colour"], it["shape"], it["direction"], **p))
    else:
        from sample_torch import encode_prompts, load_dir, prepare_prompt, sample
        dit, t5, tok, d = load_dir(a.model)
        steps = a.steps or d["steps"]
        cfg = a.cfg if a.cfg is not None else d["cfg"]
        aes = None if a.aes == "none" else float(a.aes)
        ids, mask = encode_prompts(tok, [prepare_prompt(it["prompt"], aes) for it in items], dit.cfg["model_max_length"])
        with torch.no_grad():
            y = t5(ids, mask)[:, None]
        z0 = torch.randn(len(items), 3, d["frames"], d["height"], d["width"], generator=torch.Generator().manual_seed(a.seed))
        z = sample(dit, y, mask, z0, steps, cfg, d["fps"], d["height"], d["width"], d["frames"], d.get("timestep_transform", True))
        clips = list(z.numpy())
    measured = [measure(c) for c in clips]
    seen = [i for i, it in enumerate(items) if it["seen_in_training"]]
    unseen = [i for i, it in enumerate(items) if not it["seen_in_training"]]
    res = {
        "all": score(items, measured),
        "seen_combinations": score([items[i] for i in seen], [measured[i] for i in seen]),
        "unseen_combinations": score([items[i] for i in unseen], [measured[i] for i in unseen]),
    }
    for k, v in res.items():
        print(k, {kk: (round(vv[0], 2) if vv[0] is not None else None, vv[1]) for kk, vv in v.items()})
    if a.json:
        json.dump(dict(results=res, measured=measured, items=items), open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
