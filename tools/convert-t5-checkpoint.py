#!/usr/bin/env python3
"""Convert a T5 checkpoint saved as PyTorch `.bin` shards (as `DeepFloyd/t5-v1_1-xxl`
ships it) into the safetensors layout `qc-run` reads, keeping only what the encoder
uses (`shared.weight`, `encoder.*`; decoder and lm_head tensors are dropped).

    python3 tools/convert-t5-checkpoint.py SRC_DIR DST_DIR [--bf16] [--shard-gb 4]

SRC_DIR holds config.json and pytorch_model*.bin (with pytorch_model.bin.index.json
when sharded). DST_DIR receives config.json and model-NNNNN-of-NNNNN.safetensors with
model.safetensors.index.json. Needs only the Python standard library: the `.bin`
files (zip archives with a pickle) are read without importing torch; tensors are
copied byte for byte (float32 stays float32 unless --bf16, which rounds to bfloat16
to halve the size; Open-Sora runs T5 in float32, so keep the default for parity).
"""
import argparse
import json
import os
import pickle
import shutil
import struct
import sys
import zipfile
from collections import OrderedDict

DTYPES = {  # torch storage class -> (safetensors dtype, bytes per element)
    "FloatStorage": ("F32", 4),
    "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2),
    "DoubleStorage": ("F64", 8),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
}


class StorageRef:
    def __init__(self, kind, key):
        self.dtype, self.itemsize = DTYPES[kind]
        self.key = key


class TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def contiguous(self):
        expect, acc = [], 1
        for d in reversed(self.size):
            expect.append(acc)
            acc *= d
        return tuple(reversed(expect)) == self.stride or acc <= 1

    def numel(self):
        n = 1
        for d in self.size:
            n *= d
        return n


def rebuild_tensor(storage, offset, size, stride, *_args, **_kw):
    return TensorRef(storage, offset, size, stride)


class TorchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor
        if module == "torch" and name in DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in checkpoint")

    def persistent_load(self, pid):
        # ('storage', storage_class, key, location, numel)
        return StorageRef(pid[1], pid[2])


def read_bin(path):
    """Yields (name, dtype, shape, bytes) for every tensor of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        root = pkl[: -len("data.pkl")]
        state = TorchUnpickler(z.open(pkl)).load()
        for name, t in state.items():
            if not isinstance(t, TensorRef):
                continue
            if not t.contiguous():
                sys.exit(f"{path}: tensor {name} is not contiguous; re-save it with torch first")
            data = z.read(f"{root}data/{t.storage.key}")
            start = t.offset * t.storage.itemsize
            yield name, t.storage.dtype, list(t.size), data[start : start + t.numel() * t.storage.itemsize]


def to_bf16(dtype, raw):
    if dtype != "F32":
        return dtype, raw
    out = bytearray(len(raw) // 2)
    for i in range(len(raw) // 4):
        (bits,) = struct.unpack_from("<I", raw, 4 * i)
        bits += 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
        struct.pack_into("<H", out, 2 * i, (bits >> 16) & 0xFFFF)
    return "BF16", bytes(out)


def write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, _, raw in tensors:
            f.write(raw)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--bf16", action="store_true", help="store float32 tensors as bfloat16")
    ap.add_argument("--shard-gb", type=float, default=4.0, help="maximum shard size in GB")
    a = ap.parse_args()
    index = os.path.join(a.src, "pytorch_model.bin.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["pytorch_model.bin"]
    os.makedirs(a.dst, exist_ok=True)
    shutil.copy(os.path.join(a.src, "config.json"), os.path.join(a.dst, "config.json"))
    limit = int(a.shard_gb * 1e9)
    shards, current, size = [], [], 0
    for f in files:
        for name, dtype, shape, raw in read_bin(os.path.join(a.src, f)):
            if not (name == "shared.weight" or name.startswith("encoder.")):
                continue
            if a.bf16:
                dtype, raw = to_bf16(dtype, raw)
            if current and size + len(raw) > limit:
                shards.append(current)
                current, size = [], 0
            current.append((name, dtype, shape, raw))
            size += len(raw)
            print(f"{name} {dtype} {shape}", file=sys.stderr)
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(a.dst, fname), shard)
        weight_map.update({n: fname for n, _, _, _ in shard})
    with open(os.path.join(a.dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    print(f"wrote {len(weight_map)} tensors in {len(shards)} shards to {a.dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
