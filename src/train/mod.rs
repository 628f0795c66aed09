//! Training: the optimizer, the learning-rate schedule, progress reporting and the loop.

pub mod bench;
pub mod eval;
pub mod optimizer;
pub mod schedule;
pub mod tensor_update;
pub mod trainer;

pub use crate::progress::ProgressMode;
pub use trainer::{RunOptions, RunSummary, Trainer};
