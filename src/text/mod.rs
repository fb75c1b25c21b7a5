//! Prompt text: Open-Sora's caption cleaning and the T5 tokenizer.

pub mod clean;
mod ftfy;
mod html;
mod pyre;
mod tables;
pub mod tokenizer;

pub use clean::{clean_caption_text, prepare_prompt};
pub use tokenizer::T5Tokenizer;
