//! tinygpt: a trainable tiny GPT-style language model on candle.
//!
//! Data flows config → [`tokenizer`] → [`data`] → [`model`] → [`train`]; [`checkpoint`] saves
//! and loads runs, [`sample`] generates text, [`inspect`] reports on a checkpoint, [`interop`]
//! exports to transformers and llama.cpp and imports GPT-2, [`serve`] shows a checkpoint in the
//! browser, and [`lock`] keeps a run directory to one writer; [`device`] says where a run's tensors
//! live (the CPU, or a GPU through candle's CUDA backend).
//!
//! Dependencies point one way: [`cli`] → [`train`] / [`sample`] / [`inspect`] / [`interop`] /
//! [`serve`] → [`engine`] (the reference model or its fused copy, chosen once) → [`model`] (the
//! readable reference) → [`kernels`] (fused CPU ops, which know nothing above them).

pub mod circuits;
pub mod cli;
pub mod data;
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
