//! The part of `ftfy.fix_text` (ftfy 6.x, default configuration) that Open-Sora's
//! `basic_clean` relies on for real prompts.
//!
//! Ported, in ftfy's order and repeated until nothing changes, line by line as ftfy splits:
//! `unescape_html` (only while no `<` has been seen, ftfy's "auto"), `fix_c1_controls`,
//! `fix_latin_ligatures`, `fix_character_width`, `uncurl_quotes`, `fix_line_breaks`,
//! `remove_terminal_escapes`, `remove_control_chars`, and NFC normalization.
//!
//! Not ported: `fix_encoding` (mojibake repair: re-encoding text that looks like UTF-8 decoded
//! as Windows-1252/Latin-1/MacRoman/... and decoding it again, with `restore_byte_a0`,
//! `replace_lossy_sequences`, `decode_inconsistent_utf8`). ftfy leaves ASCII text and text that
//! its "badness" heuristic finds plausible untouched, which covers typed prompts; a prompt that
//! already contains mojibake (such as `"cafÃ©"`) is cleaned here without that repair.
//! `fix_surrogates` has nothing to do on a Rust `str`.

use std::sync::LazyLock;

use fancy_regex::Regex;
use unicode_normalization::UnicodeNormalization;

use super::html::{html5_entity, py_unescape};
use super::pyre::{compile, sub, sub_with};
use super::tables;

static HTML_ENTITY_RE: LazyLock<Regex> = LazyLock::new(|| compile(r"&#?[0-9A-Za-z]{1,24};"));
static ANSI_RE: LazyLock<Regex> = LazyLock::new(|| compile(r"\x1b\[(?:‹d›|;)*[a-zA-Z]"));

/// ftfy `unescape_html`: `&name;` from ftfy's entity table (html5 names with `;`, plus
/// upper-cased ones such as `&NTILDE;`), and numeric references that decode completely.
fn unescape_html(text: &str) -> String {
    sub_with(&HTML_ENTITY_RE, text, |caps| {
        let m = caps.get(0).expect("group 0").as_str();
        if let Some(v) = html5_entity(&m[1..]) {
            return v.to_string();
        }
        if let Ok(i) = tables::FTFY_UPPER_ENTITIES.binary_search_by(|(k, _)| k.as_bytes().cmp(m.as_bytes())) {
            return tables::FTFY_UPPER_ENTITIES[i].1.to_string();
        }
        if m.starts_with("&#") {
            let u = py_unescape(m);
            if u.contains(';') {
                return m.to_string();
            }
            return u;
        }
        m.to_string()
    })
}

fn translate(text: &str, table: &[(char, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match table.binary_search_by(|(k, _)| k.cmp(&c)) {
            Ok(i) => out.push_str(table[i].1),
            Err(_) => out.push(c),
        }
    }
    out
}

fn fix_c1_controls(text: &str) -> String {
    text.chars()
        .map(|c| {
            if ('\u{80}'..='\u{9f}').contains(&c) {
                tables::SLOPPY_1252_C1[c as usize - 0x80]
            } else {
                c
            }
        })
        .collect()
}

fn uncurl_quotes(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{201c}'..='\u{201f}' => '"',
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            c => c,
        })
        .collect()
}

fn fix_line_breaks(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

fn remove_control_chars(text: &str) -> String {
    text.chars()
        .filter(|&c| {
            !matches!(c, '\0'..='\x08' | '\x0b' | '\x0e'..='\x1f' | '\x7f' | '\u{206a}'..='\u{206f}' | '\u{feff}'
                | '\u{fff9}'..='\u{fffc}')
        })
        .collect()
}

/// `fix_and_explain` for one segment.
fn fix_segment(mut text: String, unescape: bool) -> String {
    loop {
        let orig = text.clone();
        if unescape {
            text = unescape_html(&text);
        }
        text = fix_c1_controls(&text);
        text = translate(&text, tables::LIGATURES);
        text = translate(&text, tables::WIDTH_MAP);
        text = uncurl_quotes(&text);
        text = fix_line_breaks(&text);
        text = sub(&ANSI_RE, &text, "");
        text = remove_control_chars(&text);
        text = text.nfc().collect();
        if text == orig {
            return text;
        }
    }
}

/// `ftfy.fix_text(text)` with the default configuration, less `fix_encoding` (see the module
/// documentation).
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    let mut rest = text;
    while !rest.is_empty() {
        // ftfy cuts after each "\n" (and every 10^6 characters, which a prompt never reaches).
        let cut = rest.find('\n').map_or(rest.len(), |p| p + 1);
        let (segment, tail) = rest.split_at(cut);
        if segment.contains('<') {
            unescape = false; // "auto" is switched off for this and every later segment
        }
        out.push_str(&fix_segment(segment.to_string(), unescape));
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs of ftfy 6.3.1.
    #[test]
    fn fixers_match_ftfy() {
        assert_eq!(
            fix_text("“curly” ‘quotes’ ﬁne ＦＵＬＬ　width"),
            "\"curly\" 'quotes' fine FULL width"
        );
        assert_eq!(
            fix_text("&amp; &NTILDE; &#65; &#1; x\r\ny\u{200b}"),
            "& \u{d1} A  x\ny\u{200b}"
        );
        assert_eq!(fix_text("<b> &amp;\n&amp;"), "<b> &amp;\n&amp;");
        assert_eq!(fix_text("e\u{301}\x1b[31mred\u{7f}\u{85}"), "\u{e9}red\u{2026}");
    }
}
