//! Open-Sora 1.2's video VAE (decoder).
