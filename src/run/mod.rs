//! A training run's files and settings: the config, checkpoints, the run directory's lock,
//! the report on a checkpoint, and the run context that resolves once how and where a command
//! runs.

pub mod checkpoint;
pub mod config;
pub mod context;
pub mod inspect;
pub mod lock;
