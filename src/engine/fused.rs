//! The model on tinygpt's fused CPU kernels: the reference [`Gpt`] itself (the same tensors,
//! so an optimizer step on one is a step on the other) with the parts the kernels accelerate
//! replaced, each block run as one [`BlockOp`] whose backward is written out.
//!
//! ```text
//! x = drop(wte[idx] + wpe[0..T])                    (B, T, C)   kernels::positions, dropout
//! x = BlockOp(x) for each block                     (B, T, C)   kernels::block
//! logits = LN_f(x) · headᵀ                          (B, T, V)   kernels::layer_norm, linear
//! loss = cross_entropy(logits, targets)                         kernels::cross_entropy
//! ```
//!
//! What the model computes around these (the embedding's rows, bigram features, the soft cap)
//! comes from the model's own functions. The fused path may lag behind the model: a model
//! option the kernels do not compute is declared in [`FusedGpt::supports`], and such a model
//! runs on the reference engine.

use std::fmt;
use std::sync::Arc;

use candle_core::Tensor;
use rand::Rng as _;

use super::BlockRun;
use crate::error::Result;
use crate::kernels;
use crate::kernels::block::{BlockDropout, BlockOp, GradSlot};
use crate::kernels::rope::RopeTable;
use crate::layout::{Activation, BlockParams};
use crate::model::config::{NormKind, Position};
use crate::model::gpt::softcap;
use crate::model::rope::rope_table;
use crate::model::{Gpt, ModelConfig};
use crate::rng::Rng;

/// A model option the fused kernels do not compute, as the config spells it
/// (`model.norm = "rms"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub key: &'static str,
    pub value: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}", self.key, self.value)
    }
}

/// The fused copy of a model (see the module docs).
#[derive(Debug, Clone)]
pub struct FusedGpt {
    /// The model: its weights, config and the functions shared with the reference engine.
    pub model: Gpt,
    /// Each block's weights as the block op takes them (the model's tensors).
    pub(super) blocks: Vec<BlockParams<Tensor>>,
    /// The rotations of rotary embeddings, for every position of a block.
    pub(super) rope: Option<Arc<RopeTable>>,
    /// The MLP's nonlinearity.
    pub(super) activation: Activation,
    /// Training passes keep only each block's input and recompute the rest in backward.
    pub(super) recompute: bool,
}

impl FusedGpt {
    /// Whether the fused kernels compute a model of `cfg`; if not, the first option they lack.
    /// Every key is listed, so a new model option is a compile error here until it is declared
    /// supported or not.
    pub fn supports(cfg: &ModelConfig) -> std::result::Result<(), Unsupported> {
        let ModelConfig {
            block_size: _,
            n_layer: _,
            n_head: _,
            n_embd: _,
            dropout: _,
            bias: _,
            qkv_bias: _,
            activation: _,
            position: _,
            tie_embeddings: _,
            zero_init: _,
            bigram_buckets: _,
            logit_softcap: _,
            norm,
            qk_norm,
        } = cfg;
        if *norm != NormKind::LayerNorm {
            return Err(Unsupported {
                key: "model.norm",
                value: "\"rms\"".into(),
            });
        }
        if *qk_norm {
            return Err(Unsupported {
                key: "model.qk_norm",
                value: "true".into(),
            });
        }
        Ok(())
    }

    /// The fused copy of `model`, sharing its weight tensors. The caller checks
    /// [`FusedGpt::supports`] first.
    pub fn new(model: &Gpt, recompute: bool) -> FusedGpt {
        let cfg = &model.cfg;
        FusedGpt {
            model: model.clone(),
            blocks: model.blocks.iter().map(|b| b.params()).collect(),
            rope: (cfg.position == Position::Rope).then(|| {
                let hs = cfg.head_size();
                let (cos, sin) = rope_table(cfg.block_size, hs);
                Arc::new(RopeTable::new(cos, sin, hs / 2))
            }),
            activation: cfg.activation,
            recompute,
        }
    }

    /// Logits `(B, T, V)` of `idx` `(B, T)`. With `rng` this is a training pass: dropout is on,
    /// and each block's op is returned with what takes the gradients its backward leaves.
    pub fn forward(
        &self,
        idx: &Tensor,
        mut rng: Option<&mut Rng>,
    ) -> Result<(Tensor, Vec<BlockRun>)> {
        let m = &self.model;
        let (b, t) = idx.dims2()?;
        let c = m.cfg.n_embd;
        let parts = m.embedding_parts(idx, 0, None)?;
        let mut x = match &parts.positions {
            Some(pos) => kernels::positions::add_positions(&parts.tokens, pos)?,
            None => parts.tokens,
        };
        if let Some(bigram) = parts.bigram {
            x = (x + bigram)?;
        }
        let p = m.cfg.dropout;
        if let Some(r) = rng.as_deref_mut().filter(|_| p > 0.0) {
            x = kernels::dropout::dropout(&x, p, r.random())?;
        }
        // Without an RNG this is an evaluation pass: it keeps nothing for a backward pass, or
        // candle's graph would hold every activation of the pass until the loss is dropped.
        let keep = rng.is_some() && !self.recompute;
        let mut runs = Vec::with_capacity(self.blocks.len());
        for (block, weights) in m.blocks.iter().zip(&self.blocks) {
            // One mask seed per dropout site, in the order the block reaches them.
            let dropout = rng
                .as_deref_mut()
                .filter(|_| p > 0.0)
                .map(|r| BlockDropout {
                    p,
                    attention: r.random(),
                    attn_proj: r.random(),
                    mlp_proj: r.random(),
                });
            let slot = GradSlot::default();
            let eps = block.ln_1.eps as f32;
            let op = BlockOp::new(
                weights.clone(),
                m.cfg.n_head,
                eps,
                self.activation,
                dropout,
                keep,
                slot.clone(),
            )
            .with_rope(self.rope.clone());
            x = op.apply(&x)?;
            runs.push(BlockRun {
                params: block.params(),
                grads: Box::new(move || {
                    slot.take()
                        .map(|g| g.named().into_iter().map(|(_, t)| t).collect())
                }),
            });
        }
        let x =
            kernels::layer_norm::layer_norm(&x, &m.ln_f.weight, m.ln_f.bias.as_ref(), m.ln_f.eps)?;
        let head = m.head_weight();
        let logits = kernels::linear::linear(&x.reshape((b * t, c))?, head)?;
        let logits = softcap(&logits, m.cfg.logit_softcap)?;
        Ok((logits.reshape((b, t, head.dim(0)?))?, runs))
    }

    /// Mean cross-entropy of predicting `targets` `(B, T)` from `idx` `(B, T)`, and the blocks'
    /// runs (see [`FusedGpt::forward`]).
    pub fn loss(
        &self,
        idx: &Tensor,
        targets: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<(Tensor, Vec<BlockRun>)> {
        let (logits, runs) = self.forward(idx, rng)?;
        let (b, t, v) = logits.dims3()?;
        let targets = targets.reshape(b * t)?.to_dtype(candle_core::DType::U32)?;
        let loss = kernels::cross_entropy::cross_entropy(&logits.reshape((b * t, v))?, &targets)?;
        Ok((loss, runs))
    }
}
