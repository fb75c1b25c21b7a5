pub mod rflow;
