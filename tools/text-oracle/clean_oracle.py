"""Differential test data for the Rust port of Open-Sora's prompt cleaning (src/text/clean.rs).

Writes random prompts built from tricky fragments (URLs, HTML, entities, percent escapes,
CJK, dashes, quotes, codes, numbers, file names, unicode) together with the output of the
official `text_preprocessing`, taken from an Open-Sora checkout (tag v1.2.0,
opensora/models/text_encoder/t5.py; only the functions from `basic_clean` on are loaded, so
torch and transformers are not needed). Compare with:

    pip install ftfy beautifulsoup4
    python3 tools/text-oracle/clean_oracle.py OPEN_SORA/opensora/models/text_encoder/t5.py 5000 \
        > /tmp/clean-oracle.json
    QC_CLEAN_ORACLE=/tmp/clean-oracle.json cargo test --release --test text_fixtures -- --ignored

Known differences, by design (see src/text/clean.rs): ftfy's mojibake repair is not ported;
markup that makes html.parser raise is written as {"error": ...} and skipped by the Rust test.
"""
import html
import json
import random
import re
import sys

import ftfy


def load_text_preprocessing(t5_py):
    src = open(t5_py, encoding="utf-8").read()
    src = src[src.index("def basic_clean"):]
    env = {"html": html, "re": re, "ftfy": ftfy}
    exec(compile(src, t5_py, "exec"), env)  # noqa: S102 - the official source, by path
    return env["text_preprocessing"]


FRAGMENTS = [
    "a", "cat", "Dog", "SUNSET", "the", "over", "hills", "timelapse", "4K", "8k", "1920x1080", "3.5x2",
    "https://example.com/a/b", "http://x.org", "www.site.net/path", "foo.com@bar", "mail@host.com", "x.it/",
    "<b>", "</b>", "<i>bold</i>", "<br>", "</br>", "<br/>", "<p class='x'>", "<script>var a=1;</script>",
    "<style>p{}</style>", "<!-- note -->", "<!DOCTYPE html>", "<?php ?>", "<![CDATA[raw]]>", "<pre>  </pre>",
    "<rt>ruby</rt>", "<a href=\"u\">link</a>", "< b >", "a<b", "x>y", "<", ">", "<<", "</", "<1>", "<person>",
    "&amp;", "&amp", "&quot;", "&quot", "&lt;", "&gt;", "&nbsp;", "&copy;", "&eacute;", "&NTILDE;", "&#65;",
    "&#x263a;", "&#128;", "&#0;", "&#12", "&notit;", "&ampx", "&", "&&", "&#", "&#;", "&#xZ;",
    "%20", "%E5%B1%B1", "%zz", "%", "100%", "+", "a+b", "%E5", "%2B",
    "山", "日本語", "한국어", "カタカナ", "ㇰ", "㈱", "㎏", "䷀", "中文字", "Ελληνικά", "ΣΑΣ", "İstanbul", "straße",
    "--", "---", "—", "–", "‐", "〜", "-", "_", "__", "a-b-c-d-e", "snake_case_name",
    "“quote”", "‘single’", "«guillemets»", "`tick`", "´", "¨", "\"", "'", "''", "\"\"", "„low“", "‚x‛",
    "192.168.0.1", "1:23 ", "\\n", "#123", "#12345", "#1234", "123456", "1234567", "file.png", "photo.JPG",
    "clip.mp4", "doc.pdf", "x.jpeg", "...", "..", ".", " . ", ",", ";", ":", " : ", "!", "?",
    "#", "®", "•", "©", "™", "@", "·", "º", "½", "¾", "¿", "¡", "§", "~", "(", ")", "[", "]", "{", "}", "|",
    "\\", "/", "*", "@user", "@user_123", "jc6640", "jc6640vc", "6640vc231", "j2d1a2a", "abc123", "ab12cd34",
    "free shipping", "worldwide free shipping", "download free", "free download", "click for more",
    "click on link", "png images", "jpg image", "page 12", "page 3 of", "word,word", "end.", "a/b",
    "ﬁne", "ﬂow", "ＦＵＬＬ", "　", "\u00a0", "\u2009", "\u200b", "\ufeff", "\u0301", "e\u0301", "\x1b[31m",
    "\t", "\n", "\r\n", "\x1c", "\u2028", "\x85", "\x07", "²", "Ⅻ", "①", "‿", "\u0915\u093f", "😀", "🎬",
    "aesthetic score: 6.5.", "35mm", "f/1.8", "24fps", "close-up", "slow-motion", "It's", "don't",
]


def make_prompt(rng):
    n = rng.randint(1, 12)
    parts = []
    for _ in range(n):
        parts.append(rng.choice(FRAGMENTS))
        parts.append(rng.choice(["", " ", " ", " ", "  ", ", ", ". "]))
    s = "".join(parts)
    if rng.random() < 0.3:
        s = rng.choice(["'", "\"", " ", ".", "-", "_", ":"]) + s + rng.choice(["'", "\"", " ", ".", "-", "+"])
    return s


def main():
    text_preprocessing = load_text_preprocessing(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = make_prompt(rng)
        try:
            out.append({"prompt": p, "cleaned": text_preprocessing(p)})
        except Exception as e:  # noqa: BLE001 - html.parser rejects some markup
            out.append({"prompt": p, "error": type(e).__name__})
    json.dump(out, sys.stdout, ensure_ascii=False, indent=0)


if __name__ == "__main__":
    main()
