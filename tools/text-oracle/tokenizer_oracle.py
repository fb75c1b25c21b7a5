#!/usr/bin/env python3
"""Differential test data for the Rust T5 tokenizer (src/text/tokenizer.rs).

Encodes random prompts with transformers' AutoTokenizer exactly as Open-Sora's T5Embedder does
(padding="max_length", truncation=True, add_special_tokens=True) and writes the ids. Works on
any tokenizer directory, e.g. the fixture one or a downloaded DeepFloyd/t5-v1_1-xxl:

    pip install "transformers==4.44.2" sentencepiece protobuf
    python3 tools/text-oracle/tokenizer_oracle.py DIR 2000 64 > /tmp/t5-oracle.json
    QC_T5_ORACLE=/tmp/t5-oracle.json cargo test --release --test text_fixtures -- --ignored
"""
import json
import random
import sys

from transformers import AutoTokenizer

PIECES = [
    "a", "the", "cat", "Dog", "SUNSET", "over", "snowy", "hills", "timelapse", ",", ".", "!", "?", "'", '"',
    "4k", "1920x1080", "35mm", "f/1.8", " ", "  ", "   ", "\t", "\n", "\u00a0", "\u3000", "\u200b", "é", "e\u0301",
    "ﬁ", "ＡＢＣ", "½", "²", "日本語", "山", "한국어", "Ελληνικά", "😀", "🎬", "<extra_id_0>", "</s>", "<pad>",
    "<unk>", "▁", "_", "-", "—", "…", "aesthetic score: 6.5.", "close-up", "slow-motion", "It's",
]


def main():
    directory, n, max_length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 0)
    tok = AutoTokenizer.from_pretrained(directory)
    prompts = ["".join(rng.choice(PIECES) + rng.choice(["", " ", " "]) for _ in range(rng.randint(0, 40)))
               for _ in range(n)]
    enc = tok(prompts, max_length=max_length, padding="max_length", truncation=True,
              return_attention_mask=True, add_special_tokens=True)
    cases = [{"prompt": p, "input_ids": i, "attention_mask": m}
             for p, i, m in zip(prompts, enc["input_ids"], enc["attention_mask"])]
    json.dump({"dir": directory, "max_length": max_length, "cases": cases}, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
