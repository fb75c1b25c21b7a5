"""A tiny T5-style tokenizer (SentencePiece unigram, `tokenizers` serialization):
whole-word pieces for the caption vocabulary, single characters as fallback,
`</s>` (id 1) appended, `<pad>` id 0, `<unk>` id 2."""

import json
import os
import string

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from data import all_caption_words

SPECIAL = ["<pad>", "</s>", "<unk>"]


def build():
    words = all_caption_words()
    vocab = [(t, 0.0) for t in SPECIAL]
    vocab += [("\u2581" + w, -2.0) for w in words]
    vocab += [("\u2581", -6.0)]
    chars = string.ascii_lowercase + string.digits + ".,:;!?'\"-"
    vocab += [(ch, -8.0) for ch in chars]
    vocab += [("\u2581" + ch, -8.5) for ch in chars if "\u2581" + ch not in {v for v, _ in vocab}]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Lowercase(),
        normalizers.Strip(left=False, right=True),
        normalizers.Replace("  ", " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return tok


def save(tok, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special = {
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    cfg = {
        "add_prefix_space": True,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "T5Tokenizer",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def encode(tok, texts, max_length):
    """As the engine's `T5Tokenizer::encode_batch`: truncate to max_length (keeping `</s>`), pad with 0."""
    tok = Tokenizer.from_str(tok.to_str())
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=max_length)
    encs = tok.encode_batch(texts)
    return [e.ids for e in encs], [e.attention_mask for e in encs]


if __name__ == "__main__":
    t = build()
    print(t.get_vocab_size())
    ids, m = encode(t, ["a red circle moving right aesthetic score: 6.5.", "a Blue square moving up on a white background"], 20)
    for i in ids:
        print(i, t.decode(i), [t.id_to_token(x) for x in i])
