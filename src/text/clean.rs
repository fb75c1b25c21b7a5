//! Open-Sora 1.2's prompt preprocessing, step for step as the official code does it.
//!
//! `scripts/inference.py` (tag v1.2.0) appends `" aesthetic score: {aes:.1f}."` to each prompt
//! that does not already say `aesthetic score:` (`append_score_to_prompts` in
//! `opensora/utils/inference_utils.py`), then runs `text_preprocessing`
//! (`opensora/models/text_encoder/t5.py`): `clean_caption` twice. `clean_caption` is the
//! DeepFloyd IF / PixArt-alpha caption cleaner; [`clean_caption`] ports every step in order
//! with Python's regular-expression semantics (see [`super::pyre`]), `urllib.parse.unquote_plus`,
//! `str.strip`/`str.lower`, `BeautifulSoup(..., "html.parser").text` (see [`super::html`]),
//! `html.unescape`, and `ftfy.fix_text` (see [`super::ftfy`] for the one part not ported:
//! ftfy's mojibake repair).
//!
//! Known departures from the Python pipeline, all on inputs no real prompt contains:
//! * ftfy's `fix_encoding` (mojibake repair) is not applied;
//! * markup that makes `html.parser` raise (`<![` followed by something other than a known
//!   marked-section keyword, e.g. `"<![x]>"`) makes Python's `clean_caption` raise; here the
//!   HTML step then leaves the text as it is;
//! * the HTML parser follows CPython 3.11's `html.parser`; later CPython security releases
//!   changed how unterminated `<script>`/comments at the very end of the text are handled;
//! * Unicode character data comes from the Rust crates (newer Unicode versions than Python
//!   3.11's 14.0), which only matters for characters assigned since.

use std::sync::LazyLock;

use fancy_regex::Regex;

use super::ftfy::fix_text;
use super::html::{py_unescape, soup_text};
use super::pyre::{compile, py_strip, sub, sub_with};

macro_rules! re {
    ($name:ident, $pat:expr) => {
        static $name: LazyLock<Regex> = LazyLock::new(|| compile($pat));
    };
}

re!(
    URL_HTTP,
    r"‹b›((?:https?:(?:/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[‹wc›/-]*‹b›/?(?!@)))"
);
re!(
    URL_WWW,
    r"‹b›((?:www:(?:/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[‹wc›/-]*‹b›/?(?!@)))"
);
re!(HANDLE, r"@[‹wc›‹d›]+‹b›");
re!(
    DASHES,
    r"[\x{2D}\x{58A}\x{5BE}\x{1400}\x{1806}\x{2010}-\x{2015}\x{2E17}\x{2E1A}\x{2E3A}\x{2E3B}\x{2E40}\x{301C}\x{3030}\x{30A0}\x{FE31}\x{FE32}\x{FE58}\x{FE63}\x{FF0D}]+"
);
re!(QUOT, r"&quot;?");
re!(IP_ADDRESS, r"‹d›{1,3}\.‹d›{1,3}\.‹d›{1,3}\.‹d›{1,3}");
re!(ARTICLE_ID, r"‹d›:‹d›‹d›‹s›+‹$›");
re!(HASH_SHORT, r"#‹d›{1,3}‹b›");
re!(HASH_LONG, r"#‹d›{5,}‹b›");
re!(LONG_NUMBER, r"‹b›‹d›{6,}‹b›");
re!(FILENAME, r"‹S›+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)");
re!(REPEATED_QUOTES, r#"["']{2,}"#);
re!(REPEATED_DOTS, r"\.{2,}");
// BAD_PUNCT_REGEX: `#®•©™&@·º½¾¿¡§~`, `)`, `(`, `]`, `[`, `}`, `{`, `|`, `\`, `/`, `*`.
re!(BAD_PUNCT, r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+");
re!(SPACED_DOT, r"‹s›+\.‹s›+");
re!(CODE_SHORT, r"‹b›[a-zA-Z]{1,3}‹d›{3,15}‹b›");
re!(CODE_LETTERS, r"‹b›[a-zA-Z]+‹d›+[a-zA-Z]+‹b›");
re!(CODE_DIGITS, r"‹b›‹d›+[a-zA-Z]+‹d›+‹b›");
re!(SHIPPING, r"(worldwide‹s›+)?(free‹s›+)?shipping");
re!(DOWNLOAD, r"(free‹s›)?download(‹s›free)?");
re!(CLICK, r"‹b›click‹b›‹s›(?:for|on)‹s›‹w›+");
re!(
    IMAGE_EXT,
    r"‹b›(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(‹s›image[s]?)?"
);
re!(PAGE, r"‹b›page‹s›+‹d›+‹b›");
re!(CODE_MIXED, r"‹b›‹d›*[a-zA-Z]+‹d›+[a-zA-Z]+‹d›+[a-zA-Z‹d›]*‹b›");
re!(DIMENSIONS, r"‹b›‹d›+\.?‹d›*[xх×]‹d›+\.?‹d›*‹b›");
re!(SPACED_COLON, r"‹b›‹s›+:‹s›+");
re!(PUNCT_BEFORE_WORD, r"(‹D›[,./])‹b›");
re!(WHITESPACE, r"‹s›+");
re!(QUOTED, r#"^["']((?s:.)+)["']‹$›"#);
re!(LEADING_PUNCT, r"^['_,\-:;]");
re!(TRAILING_PUNCT, r"['_,\-:\-+]‹$›");
re!(DOT_WORD, r"^\.‹S›+‹$›");

/// `urllib.parse.unquote_plus(s)` (UTF-8, errors="replace"): `+` becomes a space, `%XX`
/// escapes inside each run of ASCII characters are decoded as UTF-8.
pub fn unquote_plus(s: &str) -> String {
    let s = s.replace('+', " ");
    if !s.contains('%') {
        return s;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while !rest.is_empty() {
        let ascii = rest.find(|c: char| !c.is_ascii()).unwrap_or(rest.len());
        out.push_str(&unquote_ascii(&rest[..ascii]));
        rest = &rest[ascii..];
        let other = rest.find(|c: char| c.is_ascii()).unwrap_or(rest.len());
        out.push_str(&rest[..other]);
        rest = &rest[other..];
    }
    out
}

fn unquote_ascii(s: &str) -> String {
    let mut parts = s.split('%');
    let mut bytes: Vec<u8> = parts.next().unwrap_or("").as_bytes().to_vec();
    for item in parts {
        let b = item.as_bytes();
        let hex = |c: u8| (c as char).to_digit(16);
        match (b.first().copied().and_then(hex), b.get(1).copied().and_then(hex)) {
            (Some(h), Some(l)) => {
                bytes.push((h * 16 + l) as u8);
                bytes.extend_from_slice(&b[2..]);
            }
            _ => {
                bytes.push(b'%');
                bytes.extend_from_slice(b);
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `basic_clean`: `ftfy.fix_text`, `html.unescape` twice, `strip`.
fn basic_clean(text: &str) -> String {
    let text = fix_text(text);
    let text = py_unescape(&py_unescape(&text));
    py_strip(&text).to_string()
}

/// One pass of Open-Sora's `clean_caption`.
pub fn clean_caption(caption: &str) -> String {
    let mut c = unquote_plus(caption);
    c = py_strip(&c).to_lowercase();
    c = c.replace("<person>", "person");
    // urls
    c = sub(&URL_HTTP, &c, "");
    c = sub(&URL_WWW, &c, "");
    // html
    if let Ok(text) = soup_text(&c) {
        c = text;
    }
    // @<nickname>
    c = sub(&HANDLE, &c, "");
    // CJK strokes, katakana phonetic extensions, enclosed CJK, CJK compatibility, CJK unified
    // ideographs (extension A and base), Yijing hexagrams: together U+31C0..U+9FFF.
    c.retain(|ch| !('\u{31c0}'..='\u{9fff}').contains(&ch));
    // all kinds of dashes -> "-"
    c = sub(&DASHES, &c, "-");
    // quotes to one standard
    c = c
        .chars()
        .map(|ch| match ch {
            '`' | '\u{b4}' | '\u{ab}' | '\u{bb}' | '\u{201c}' | '\u{201d}' | '\u{a8}' => '"',
            '\u{2018}' | '\u{2019}' => '\'',
            ch => ch,
        })
        .collect();
    // &quot; and &amp
    c = sub(&QUOT, &c, "");
    c = c.replace("&amp", "");
    // ip addresses
    c = sub(&IP_ADDRESS, &c, " ");
    // article ids
    c = sub(&ARTICLE_ID, &c, "");
    // a literal backslash-n
    c = c.replace("\\n", " ");
    // "#123", "#12345..", "123456.."
    c = sub(&HASH_SHORT, &c, "");
    c = sub(&HASH_LONG, &c, "");
    c = sub(&LONG_NUMBER, &c, "");
    // filenames
    c = sub(&FILENAME, &c, "");
    c = sub(&REPEATED_QUOTES, &c, "\"");
    c = sub(&REPEATED_DOTS, &c, " ");
    c = sub(&BAD_PUNCT, &c, " ");
    c = sub(&SPACED_DOT, &c, " ");
    // this-is-my-cute-cat / this_is_my_cute_cat
    if c.chars().filter(|&ch| ch == '-' || ch == '_').count() > 3 {
        c = c.replace(['-', '_'], " ");
    }
    c = basic_clean(&c);
    c = sub(&CODE_SHORT, &c, "");
    c = sub(&CODE_LETTERS, &c, "");
    c = sub(&CODE_DIGITS, &c, "");
    c = sub(&SHIPPING, &c, "");
    c = sub(&DOWNLOAD, &c, "");
    c = sub(&CLICK, &c, "");
    c = sub(&IMAGE_EXT, &c, "");
    c = sub(&PAGE, &c, "");
    c = sub(&CODE_MIXED, &c, " ");
    c = sub(&DIMENSIONS, &c, "");
    c = sub(&SPACED_COLON, &c, ": ");
    c = sub_with(&PUNCT_BEFORE_WORD, &c, |caps| format!("{} ", &caps[1]));
    c = sub(&WHITESPACE, &c, " ");
    // (the original calls `caption.strip()` here and discards the result)
    c = sub_with(&QUOTED, &c, |caps| caps[1].to_string());
    c = sub(&LEADING_PUNCT, &c, "");
    c = sub(&TRAILING_PUNCT, &c, "");
    c = sub(&DOT_WORD, &c, "");
    py_strip(&c).to_string()
}

/// Open-Sora's `text_preprocessing(prompt)`: `clean_caption` applied twice.
pub fn clean_caption_text(prompt: &str) -> String {
    clean_caption(&clean_caption(prompt))
}

/// The aesthetic score as `f"{aes:.1f}"` prints it (`append_score_to_prompts`): 6.5 -> "6.5",
/// 7.0 -> "7.0", 6.25 -> "6.2". The `f32` is first read as the decimal number it prints as
/// (what a Python config value written that way holds), then rounded as Python rounds.
pub fn format_aes(aes: f32) -> String {
    let v: f64 = aes.to_string().parse().unwrap_or(aes as f64);
    if v.is_nan() {
        "nan".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{v:.1}")
    }
}

/// `append_score_to_prompts`: `" aesthetic score: {aes:.1f}."` appended when `aes` is
/// given and the prompt does not already contain `aesthetic score:`.
pub fn append_score(prompt: &str, aes: Option<f32>) -> String {
    match aes {
        Some(a) if !prompt.contains("aesthetic score:") => format!("{prompt} aesthetic score: {}.", format_aes(a)),
        _ => prompt.to_string(),
    }
}

/// The prompt exactly as Open-Sora 1.2's inference script hands it to the T5 tokenizer:
/// [`append_score`], then [`clean_caption_text`].
pub fn prepare_prompt(prompt: &str, aes: Option<f32>) -> String {
    clean_caption_text(&append_score(prompt, aes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aesthetic_score_is_formatted_like_python() {
        assert_eq!(format_aes(6.5), "6.5");
        assert_eq!(format_aes(7.0), "7.0");
        assert_eq!(format_aes(6.25), "6.2"); // exact tie: round half to even
        assert_eq!(format_aes(6.75), "6.8");
        assert_eq!(format_aes(6.55), "6.5"); // 6.55 is 6.5499999... as a Python float
        assert_eq!(format_aes(5.0e-2), "0.1");
    }

    #[test]
    fn unquote_plus_matches_python() {
        assert_eq!(unquote_plus("a+b%20c%zz%4"), "a b c%zz%4");
        assert_eq!(unquote_plus("%E5%B1%B1 %E5é%41"), "山 \u{fffd}éA");
    }

    #[test]
    fn score_not_appended_twice() {
        assert_eq!(
            prepare_prompt("a cat. aesthetic score: 5.0.", Some(6.5)),
            "a cat. aesthetic score: 5.0."
        );
    }
}
