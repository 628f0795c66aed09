//! tinygpt: a trainable tiny GPT-style language model on candle.
//!
//! Data flows config ([`run`]) → [`data`] (tokenizer, batches) → [`model`] → [`train`]; [`run`]
//! also saves and loads checkpoints and resolves once how a command runs (its context);
//! [`sample`] generates text, [`circuits`] and [`viz`] show what a model learned, [`interop`]
//! exports to transformers and llama.cpp and imports GPT-2, and [`serve`] shows a checkpoint in
//! the browser.
//!
//! Dependencies point one way: [`cli`] → [`serve`] / [`train`] / [`interop`] / … → [`run`] →
//! [`engine`] (the reference model or its fused copy, on a device) → [`model`] (the readable
//! reference) and [`kernels`] (fused CPU ops), which know nothing of each other and share only
//! [`layout`], the parameter layout of a block. docs/architecture.md has every arrow.

pub mod circuits;
pub mod cli;
pub mod data;
pub mod dist;
pub mod engine;
pub mod error;
pub mod interop;
pub mod kernels;
pub mod layout;
pub mod model;
pub mod progress;
pub mod rng;
pub mod run;
pub mod sample;
pub mod serve;
pub mod train;
pub mod viz;

/// Re-exported so that `tinygpt::attention::scaled_dot_product_attention` reads as in the docs.
pub use model::attention;

pub use error::{Error, Result};
