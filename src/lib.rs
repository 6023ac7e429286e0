//! warm: a reward-model inference server that serves weight-averaged reward models (WARM).
//!
//! The library holds everything; `main.rs` only parses the command line.

pub mod alloc;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod demo;
pub mod device;
pub mod dtype;
pub mod engine;
pub mod eval;
pub mod fuse;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod model;
pub mod reward_stats;
pub mod scorer;
pub mod server;
pub mod text;
