"""Checks models.py against the engine's golden fixtures (official Open-Sora outputs)."""
import json, os, sys
import torch
from safetensors.torch import load_file
sys.path.insert(0, os.path.dirname(__file__))
from models import STDiT3, T5Encoder

FIX = os.path.join(os.path.dirname(__file__), "../../../shared/fixtures")
rel = lambda a, b: float((a - b).norm() / b.norm())

cfg = json.load(open(f"{FIX}/stdit3-tiny/config.json"))
m = STDiT3(cfg)
sd = load_file(f"{FIX}/stdit3-tiny/model.safetensors")
missing = m.load_state_dict(sd, strict=True)
for case in ["stdit3-tiny-forward", "stdit3-tiny-forward-odd"]:
    f = load_file(f"{FIX}/{case}.safetensors")
    if f["x"].shape[-1] % 2 or f["x"].shape[-2] % 2:
        print(case, "skipped (odd size)", f["x"].shape); continue
    with torch.no_grad():
        out = m(f["x"], f["timestep"], f["y"], f["mask"], f["fps"], f["height"], f["width"])
    print(case, "out rel", rel(out, f["out"]))

tc = json.load(open(f"{FIX}/t5-tiny/config.json"))
t5 = T5Encoder(tc)
sd = load_file(f"{FIX}/t5-tiny/model.safetensors")
sd = {k: v for k, v in sd.items() if k == "shared.weight" or k.startswith("encoder.")}
print(t5.load_state_dict(sd, strict=False))
f = load_file(f"{FIX}/t5-tiny-io.safetensors")
with torch.no_grad():
    h = t5(f["input_ids"], f["attention_mask"])
print("t5 rel", rel(h, f["last_hidden_state"]))
