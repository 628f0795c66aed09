//! Training: the optimizer, the learning-rate schedule, progress reporting and the loop.

pub mod optimizer;
pub mod progress;
pub mod schedule;
pub mod trainer;

pub use progress::ProgressMode;
pub use trainer::{RunOptions, RunSummary, Trainer};
