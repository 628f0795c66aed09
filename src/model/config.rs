//! The shape of the network: the `[model]` table of a run's config.

use serde::{Deserialize, Serialize};

use crate::layout::Activation;

/// Standard deviation of the fresh weight matrices and embeddings (GPT-2's; the residual
/// projections start smaller, see `block.rs`).
pub const INIT_STD: f64 = 0.02;

/// ε of every normalisation layer: it keeps a constant row from dividing by zero.
pub const NORM_EPS: f64 = 1e-5;

fn yes() -> bool {
    true
}

/// The normalisation before each block's attention and MLP, and before the LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// (x − mean) / √(var + ε) · w (+ b): GPT-2's LayerNorm.
    #[default]
    LayerNorm,
    /// x / √(mean(x²) + ε) · w: RMSNorm (Llama's), a learnable scale and no bias.
    Rms,
}

/// Where a model's positions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    /// A learned `(block_size, C)` embedding added to the token embedding (GPT-2's).
    #[default]
    Learned,
    /// Rotary embeddings of queries and keys ([`super::rope`]).
    Rope,
}

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
    /// Biases on W_Q, W_K and W_V too (GPT-2's `c_attn` has them; imported weights need them).
    #[serde(default)]
    pub qkv_bias: bool,
    /// The MLP's nonlinearity: `gelu` (exact, erf-based; the default), `gelu_tanh` (its tanh
    /// approximation, GPT-2's `gelu_new`) or `relu2` (max(x, 0)²).
    #[serde(default)]
    pub activation: Activation,
    /// Where positions come from: `learned` (a position embedding added to the input, GPT-2's;
    /// the default) or `rope` (rotary embeddings turning each head's queries and keys).
    #[serde(default)]
    pub position: Position,
    /// The LM head reads the token embedding (`true`, GPT-2's; the default) or has its own
    /// `(V, C)` matrix, `lm_head.weight`.
    #[serde(default = "yes")]
    pub tie_embeddings: bool,
    /// The blocks' output projections (and an untied LM head) start at zero, so each block
    /// starts as the identity and the first steps learn from the embeddings alone.
    #[serde(default)]
    pub zero_init: bool,
    /// Rows of a table of bigram features: each position adds the row of the pair (previous
    /// token, token), hashed into this many rows, to its embedding (a character model's
    /// cheapest context); 0 = off.
    #[serde(default)]
    pub bigram_buckets: usize,
    /// Logits pass through cap·tanh(logits / cap), bounding them to (−cap, cap); 0 = off.
    #[serde(default)]
    pub logit_softcap: f64,
    /// The normalisation layers: `layernorm` (GPT-2's; the default) or `rms` (RMSNorm).
    #[serde(default)]
    pub norm: NormKind,
    /// Queries and keys are RMS-normalised per head (no learnable scale) before their dot
    /// product, as modded-nanogpt does: scores stay bounded however large W_Q and W_K grow.
    #[serde(default)]
    pub qk_norm: bool,
}

impl ModelConfig {
    /// Entries of each head's query, key and value: n_embd / n_head.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }
}
