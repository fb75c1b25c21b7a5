pub mod graphs;
pub mod rflow;
