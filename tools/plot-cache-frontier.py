#!/usr/bin/env python3
"""Speed-up against PSNR, one curve per caching policy, from a `qc-bench quality`
report (quality.md). Usage: plot-cache-frontier.py quality.md out.png

Needs matplotlib (e.g. the trainer's venv: pip install matplotlib)."""
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def rows(path):
    """(mode, psnr, dit speed-up) of the summary table."""
    lines = open(path).read().splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("| mode |"))
    cols = [c.strip() for c in lines[head].strip("|").split("|")]
    psnr, speed = cols.index("PSNR (dB)"), cols.index("speed-up")
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        yield cells[0], float(cells[psnr]), float(cells[speed].rstrip("x"))


def curve(mode):
    if mode.startswith("quantcache"):
        return "quantcache (aigq + hlc+srap, jointly calibrated)"
    if mode.startswith("aigq+"):
        return "aigq + hlc+srap, calibrated separately"
    if mode.startswith("w8a8-bf16+"):
        return "w8a8 + bf16 attention + hlc"
    if mode.startswith("w8a8+"):
        return "w8a8 + hlc"
    name = mode.split("@")[0]
    if name.startswith("static:"):
        return "static:K"
    return name + (" (int8 cache)" if mode.endswith("/int8") else "")


def main(src, out):
    curves = defaultdict(list)
    for mode, psnr, speed in rows(src):
        if mode == "reference" or psnr == float("inf"):
            continue
        curves[curve(mode)].append((speed, psnr))
    fig, ax = plt.subplots(figsize=(10.5, 5.5), dpi=110)
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*X"
    for i, (name, pts) in enumerate(sorted(curves.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if len(pts) > 1 else "", marker=markers[i % len(markers)], color=colours[(2 * i) % 20 + (i >= 10)], label=name, markersize=6)
    ax.axhline(28, color="grey", lw=0.8, ls="--")
    ax.axvline(6.72, color="grey", lw=0.8, ls=":")
    ax.text(6.6, ax.get_ylim()[0] + 0.5, "paper's 6.72x", rotation=90, ha="right", color="grey")
    ax.set_xlabel("DiT sampling speed-up over the full computation (CPU, speed-up column of the report)")
    ax.set_ylabel("PSNR against the full computation (dB)")
    ax.set_title("Caching policies on the demonstration model (10 held-out prompts, 30 steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
