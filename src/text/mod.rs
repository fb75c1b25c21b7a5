//! Prompt text: Open-Sora's caption cleaning and the T5 tokenizer.
