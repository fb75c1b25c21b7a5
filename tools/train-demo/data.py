"""Procedural clips: one coloured shape moving over a plain background, with a caption.
Deterministic from a seed. Values in [-1, 1], shape [3, T, H, W]."""

import json
import os

import numpy as np

FRAMES, HEIGHT, WIDTH = 8, 16, 16
FPS = 8

COLOURS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.95, 0.1),
    "purple": (0.7, 0.15, 0.95),
    "cyan": (0.1, 0.95, 0.95),
}
SHAPES = ["circle", "square", "triangle"]
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
BACKGROUNDS = {"black": 0.08, "white": 0.92}

# Combinations never shown in training (compositional generalisation check).
HELDOUT_COMBOS = [
    ("green", "triangle", "up"),
    ("blue", "circle", "left"),
    ("yellow", "square", "down"),
    ("purple", "triangle", "right"),
    ("cyan", "circle", "down"),
    ("red", "square", "up"),
]

AES_SUFFIX = " aesthetic score: 6.5."
SS = 4  # supersampling for anti-aliased edges


def caption(colour, shape, direction, background=None):
    s = f"a {colour} {shape} moving {direction}"
    if background is not None:
        s += f" on a {background} background"
    return s


def render(colour, shape, direction, background, cx, cy, radius, speed, frames=FRAMES, height=HEIGHT, width=WIDTH):
    """cx, cy, radius, speed in pixels (speed per frame). Returns float32 [3, T, H, W] in [-1, 1]."""
    bg = BACKGROUNDS[background]
    col = np.array(COLOURS[colour], dtype=np.float32)
    dx, dy = DIRECTIONS[direction]
    ys = (np.arange(height * SS) + 0.5) / SS
    xs = (np.arange(width * SS) + 0.5) / SS
    X, Y = np.meshgrid(xs, ys)
    out = np.empty((3, frames, height, width), dtype=np.float32)
    for f in range(frames):
        px, py = cx + dx * speed * f, cy + dy * speed * f
        u, v = X - px, Y - py
        if shape == "circle":
            inside = u * u + v * v <= radius * radius
        elif shape == "square":
            r = radius * 0.85
            inside = (np.abs(u) <= r) & (np.abs(v) <= r)
        else:  # upward-pointing triangle
            r = radius * 1.1
            top, bottom = -r, r * 0.75
            inside = (v >= top) & (v <= bottom) & (np.abs(u) <= (v - top) / (bottom - top) * r * 1.05)
        cov = inside.reshape(height, SS, width, SS).mean(axis=(1, 3)).astype(np.float32)
        for c in range(3):
            out[c, f] = bg * (1 - cov) + col[c] * cov
    return out * 2.0 - 1.0


# Motion presets. "slow" (the exported model): radius 3-3.8 px, 0.9-1.25 px per frame, half a
# patch. "fast" (an experiment, README): radius 2.4-2.8 px, 1.5-1.7 px per frame, so that
# consecutive frames put the shape on different 2x2 patches and the motion crosses most of the
# frame: STDiT3 has no absolute frame position (only RoPE's relative one in temporal attention),
# so the direction must be learned from how the shape shifts between frames.
MOTION = {
    "slow": dict(radius=(0.19, 0.24), travel=(0.4, 0.55), start=(0.2, 0.3), perp=(0.35, 0.65)),
    "fast": dict(radius=(0.15, 0.175), travel=(0.66, 0.74), start=(0.155, 0.2), perp=(0.3, 0.7)),
}


def sample_params(rng, colour, shape, direction, frames=FRAMES, height=HEIGHT, width=WIDTH, motion="slow"):
    m = MOTION[motion]
    background = rng.choice(list(BACKGROUNDS))
    radius = rng.uniform(*m["radius"]) * min(height, width)
    travel = rng.uniform(*m["travel"])  # fraction of the frame crossed during the clip
    dx, dy = DIRECTIONS[direction]
    size = width if dx else height
    speed = travel * size / (frames - 1)
    start_along = rng.uniform(*m["start"]) * size
    perp = rng.uniform(*m["perp"])
    if dx:
        cx = start_along if dx > 0 else size - start_along
        cy = perp * height
    else:
        cy = start_along if dy > 0 else size - start_along
        cx = perp * width
    return dict(background=background, cx=cx, cy=cy, radius=radius, speed=speed)


def training_combos():
    held = set(HELDOUT_COMBOS)
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS if (c, s, d) not in held]


def varied_caption(rng, colour, shape, direction, background=None):
    """Experimental captions: 60% complete, 25% only "moving {direction}", 15% without the
    colour. A model trained on complete captions alone learnt to read the colour and
    ignore the direction word; captions in which the direction is the only content
    make it attend to that word."""
    u = rng.random()
    if u < 0.25:
        s = f"moving {direction}"
    elif u < 0.4:
        s = f"a {shape} moving {direction}"
    else:
        return caption(colour, shape, direction, background)
    if background is not None:
        s += f" on a {background} background"
    return s


def make_sample(rng, combos=None, motion="slow", captions="plain"):
    """One training example: (video [3,T,H,W], caption)."""
    combos = combos or training_combos()
    colour, shape, direction = combos[rng.integers(len(combos))]
    p = sample_params(rng, colour, shape, direction, motion=motion)
    video = render(colour, shape, direction, **p)
    bg = p["background"] if rng.random() < 0.5 else None
    cap = caption(colour, shape, direction, bg) if captions == "plain" else varied_caption(rng, colour, shape, direction, bg)
    if rng.random() < 0.5:
        cap += AES_SUFFIX  # the engine appends this by default (--aes 6.5)
    return video, cap


def make_batch(rng, n, combos=None, motion="slow", captions="plain"):
    vids, caps = zip(*(make_sample(rng, combos, motion, captions) for _ in range(n)))
    return np.stack(vids), list(caps)


def all_caption_words():
    words = {"a", "moving", "on", "background", "aesthetic", "score"}
    words |= set(COLOURS) | set(SHAPES) | set(DIRECTIONS) | set(BACKGROUNDS)
    return sorted(words)


def write_heldout(path, seed=1234):
    """50 prompts: every held-out combination (with and without a background), the rest
    drawn from training combinations; each with its ground truth."""
    rng = np.random.default_rng(seed)
    items = []
    for c, s, d in HELDOUT_COMBOS:
        for bg in (None, "black", "white"):
            items.append(dict(prompt=caption(c, s, d, bg), colour=c, shape=s, direction=d, background=bg, seen_in_training=False))
    seen = training_combos()
    order = rng.permutation(len(seen))
    for i in order[: 50 - len(items)]:
        c, s, d = seen[i]
        bg = [None, "black", "white"][rng.integers(3)]
        items.append(dict(prompt=caption(c, s, d, bg), colour=c, shape=s, direction=d, background=bg, seen_in_training=True))
    items.insert(0, items.pop(next(i for i, it in enumerate(items) if it["seen_in_training"])))
    with open(path, "w") as f:
        json.dump(items, f, indent=1)
    return items


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    items = write_heldout(os.path.join(here, "heldout_prompts.json"))
    print(len(items), "held-out prompts;", len(training_combos()), "training combinations")
    rng = np.random.default_rng(0)
    v, c = make_batch(rng, 4)
    print(v.shape, v.min(), v.max(), c)
