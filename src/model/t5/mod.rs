//! The T5 v1.1 text encoder.
