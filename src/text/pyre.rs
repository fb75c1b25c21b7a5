//! Python `re` semantics on top of `fancy_regex`, for porting Open-Sora's caption regexes.
//!
//! Python 3 `str` patterns are Unicode-aware, but their classes differ from Rust's:
//! `\w` is `str.isalnum()` or `_` (exactly `[\p{L}\p{N}_]`, checked over all code points with
//! Python 3.11), `\s` is `str.isspace()` (Rust's `White_Space` plus U+001C..U+001F), `\d` is
//! `\p{Nd}`, and `\b` is a boundary between Python word and non-word characters. `$` without
//! MULTILINE matches at the end or before a final `\n`. Patterns in this crate are written with
//! the placeholders below and expanded by [`py`], so every class means what it means in Python.

use fancy_regex::{Captures, Regex, RegexBuilder, RegexInput};

/// Body of a character class equal to Python's `\w`.
pub const W: &str = r"\p{L}\p{N}_";
/// Body of a character class equal to Python's `\s`.
pub const S: &str =
    r"\t\n\x0B\x0C\r\x1C-\x1F\x20\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}";

/// Expands the placeholders of a Python-style pattern:
/// `‹w›` `[\w]`, `‹W›` `[^\w]`, `‹s›` `[\s]`, `‹S›` `[^\s]`, `‹d›` `\p{Nd}`, `‹D›` `\P{Nd}`,
/// `‹b›` Python's `\b`, `‹$›` Python's `$`; inside a class, `‹wc›` and `‹sc›` splice the bodies.
pub fn py(pattern: &str) -> String {
    let boundary = format!("(?:(?<=[{W}])(?![{W}])|(?<![{W}])(?=[{W}]))");
    pattern
        .replace("‹wc›", W)
        .replace("‹sc›", S)
        .replace("‹w›", &format!("[{W}]"))
        .replace("‹W›", &format!("[^{W}]"))
        .replace("‹s›", &format!("[{S}]"))
        .replace("‹S›", &format!("[^{S}]"))
        .replace("‹d›", r"\p{Nd}")
        .replace("‹D›", r"\P{Nd}")
        .replace("‹b›", &boundary)
        .replace("‹$›", r"(?=\n?\z)")
}

/// Compiles a Python-style pattern (see [`py`]); panics on a bad pattern (they are constants).
pub fn compile(pattern: &str) -> Regex {
    let expanded = py(pattern);
    RegexBuilder::new(&expanded)
        .backtrack_limit(10_000_000)
        .build()
        .unwrap_or_else(|e| panic!("bad pattern {pattern:?} ({expanded:?}): {e}"))
}

/// `re.sub(pattern, repl, text)` with a replacement computed from the captures. Python scans
/// left to right for non-overlapping matches exactly as `captures_iter` does (none of the
/// patterns used here can match the empty string). If the backtracking limit is ever hit, the
/// text is returned unchanged rather than half-substituted.
pub fn sub_with(re: &Regex, text: &str, mut rep: impl FnMut(&Captures<str>) -> String) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for caps in re.captures_iter(text) {
        let Ok(caps) = caps else { return text.to_string() };
        let m = caps.get(0).expect("group 0");
        out.push_str(&text[last..m.start()]);
        out.push_str(&rep(&caps));
        last = m.end();
    }
    out.push_str(&text[last..]);
    out
}

/// `re.sub(pattern, literal, text)`.
pub fn sub(re: &Regex, text: &str, literal: &str) -> String {
    sub_with(re, text, |_| literal.to_string())
}

/// Python's `pattern.match(text, pos)`: a match that starts exactly at byte `pos` (lookbehinds
/// still see the text before it).
pub fn match_at<'t>(re: &Regex, text: &'t str, pos: usize) -> Option<Captures<'t, str>> {
    re.captures_input(RegexInput::new(text).from_pos(pos).anchored(true))
        .ok()
        .flatten()
}

/// Python's `pattern.search(text, pos)`: `(start, end)` of the first match at or after `pos`.
pub fn search_from(re: &Regex, text: &str, pos: usize) -> Option<(usize, usize)> {
    re.find_from_pos(text, pos).ok().flatten().map(|m| (m.start(), m.end()))
}

/// `str.isspace()` for one character.
pub fn is_py_space(c: char) -> bool {
    matches!(c, '\t'..='\r' | '\x1c'..='\x20' | '\u{85}' | '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}'
        | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

/// `str.strip()` (Python's whitespace, which includes U+001C..U+001F).
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_python() {
        let w = compile("‹w›");
        assert!(w.is_match("½").unwrap()); // No: a word character in Python, not in Rust
        assert!(!w.is_match("\u{301}").unwrap()); // a combining mark is not
        assert!(!w.is_match("\u{203f}").unwrap()); // nor connector punctuation other than `_`
        let s = compile("‹s›");
        assert!(s.is_match("\x1c").unwrap());
        let b = compile("‹b›x‹b›");
        assert!(b.is_match("a x b").unwrap());
        assert!(!b.is_match("ax").unwrap());
        assert!(!b.is_match("\u{b2}x").unwrap()); // ² is a Python word character
        let end = compile("a‹$›");
        assert!(end.is_match("a\n").unwrap());
        assert!(!end.is_match("a\n\n").unwrap());
        assert_eq!(py_strip("\x1c a \u{3000}"), "a");
    }
}
