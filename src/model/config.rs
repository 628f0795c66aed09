//! The shape of the network: the `[model]` table of a run's config.

use serde::{Deserialize, Serialize};

pub use crate::kernels::activation::Activation;
use crate::kernels::Kernels;

/// Shape of the network (nanoGPT's `GPTConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Longest context the model sees, in tokens (T).
    pub block_size: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block; a block with one head uses [`super::Head`].
    pub n_head: usize,
    /// Width of the residual stream (C); must be a multiple of `n_head`.
    pub n_embd: usize,
    /// Dropout probability on attention weights and residual branches while training.
    #[serde(default)]
    pub dropout: f64,
    /// Biases in the linear layers (except W_Q, W_K, W_V) and LayerNorms.
    #[serde(default)]
    pub bias: bool,
    /// The MLP's nonlinearity: `gelu` (exact, GPT-2's; the default) or `relu2` (max(x, 0)²).
    #[serde(default)]
    pub activation: Activation,
    /// Which engine runs the model: `reference` (this module's composed candle ops) or `fused`
    /// (tinygpt's CPU kernels). Read where the engine is built, never by the model itself.
    #[serde(default)]
    pub kernels: Kernels,
}
