//! Convolution-family ops (the VAE's), declared apart from the DiT's ops so
//! the two op sets grow independently. Every backend implements both.

pub trait ConvOps {}
