//! The model on tinygpt's fused CPU kernels: the same weights as the reference [`Gpt`] (the
//! same tensors, so an optimizer step on one is a step on the other), and the same math,
//! with each block run as one [`BlockOp`] whose backward is written out.
//!
//! ```text
//! x = drop(wte[idx] + wpe[0..T])                    (B, T, C)   kernels::positions, dropout
//! x = BlockOp(x) for each block                     (B, T, C)   kernels::block
//! logits = LN_f(x) · headᵀ                          (B, T, V)   kernels::layer_norm, linear
//! loss = cross_entropy(logits, targets)                         kernels::cross_entropy
//! ```
//!
//! Bigram features add their rows to x (candle's index_select and add). With rotary
//! embeddings there is no wpe, and each block op turns its queries and keys
//! (kernels::rope); the head is wte unless untied; capped logits go through candle's tanh.

use std::sync::Arc;

use candle_core::Tensor;
use rand::Rng as _;

use crate::error::Result;
use crate::kernels;
use crate::kernels::activation::Activation;
use crate::kernels::block::{Affine, BlockDropout, BlockGrads, BlockOp, BlockParams, GradSlot};
use crate::kernels::rope::RopeTable;
use crate::model::config::Position;
use crate::model::gpt::{bigram_ids, check_positions, softcap};
use crate::model::Gpt;
use crate::rng::Rng;

/// The fused copy of a model (see the module docs).
#[derive(Debug, Clone)]
pub struct FusedGpt {
    /// `(V, C)`: token embedding.
    pub(super) wte: Tensor,
    /// `(V, C)`: the LM head (the same tensor as `wte` when tied).
    pub(super) head: Tensor,
    /// `(block_size, C)`; none with rotary embeddings.
    pub(super) wpe: Option<Tensor>,
    /// The rotations of rotary embeddings, for every position of a block.
    pub(super) rope: Option<Arc<RopeTable>>,
    /// cap of cap·tanh(logits / cap); 0 = off.
    pub(super) softcap: f64,
    /// Bigram features `(buckets, C)`, when on.
    pub(super) bigram: Option<Tensor>,
    pub(super) blocks: Vec<BlockParams<Tensor>>,
    pub(super) ln_f: Affine<Tensor>,
    pub(super) n_head: usize,
    /// The MLP's nonlinearity.
    pub(super) activation: Activation,
    /// The LayerNorms' ε.
    pub(super) eps: f64,
    pub(super) dropout: f64,
    pub(super) block_size: usize,
    /// Training passes keep only each block's input and recompute the rest in backward.
    pub(super) recompute: bool,
}

/// One block's parameters and the slot where its op leaves their gradients.
pub(crate) type BlockRun = (BlockParams<Tensor>, GradSlot<BlockGrads>);

impl FusedGpt {
    /// The fused copy of `model`, sharing its weight tensors.
    pub fn new(model: &Gpt, recompute: bool) -> FusedGpt {
        FusedGpt {
            wte: model.wte.clone(),
            head: model.head_weight().clone(),
            wpe: model.wpe.clone(),
            rope: (model.cfg.position == Position::Rope).then(|| {
                let hs = model.cfg.n_embd / model.cfg.n_head;
                Arc::new(RopeTable::new(model.cfg.block_size, hs))
            }),
            softcap: model.cfg.logit_softcap,
            bigram: model.bigram.clone(),
            blocks: model.blocks.iter().map(|b| b.params()).collect(),
            ln_f: Affine {
                weight: model.ln_f.weight.clone(),
                bias: model.ln_f.bias.clone(),
            },
            n_head: model.cfg.n_head,
            activation: model.cfg.activation,
            eps: model.ln_f.eps,
            dropout: model.cfg.dropout,
            block_size: model.cfg.block_size,
            recompute,
        }
    }

    /// Logits `(B, T, V)` of `idx` `(B, T)`. With `rng` this is a training pass: dropout is on,
    /// and each block's op is returned with the slot its backward fills.
    pub fn forward(
        &self,
        idx: &Tensor,
        mut rng: Option<&mut Rng>,
    ) -> Result<(Tensor, Vec<BlockRun>)> {
        let (b, t) = idx.dims2()?;
        check_positions(0, t, self.block_size)?;
        let c = self.wte.dim(1)?;
        let tok = self
            .wte
            .index_select(&idx.flatten_all()?, 0)?
            .reshape((b, t, c))?;
        let mut x = match &self.wpe {
            Some(wpe) => kernels::positions::add_positions(&tok, &wpe.narrow(0, 0, t)?)?,
            None => tok,
        };
        if let Some(table) = &self.bigram {
            let ids = bigram_ids(idx, None, self.wte.dim(0)?, table.dim(0)?)?;
            x = (x + table.index_select(&ids, 0)?.reshape((b, t, c))?)?;
        }
        let p = self.dropout;
        if let Some(r) = rng.as_deref_mut().filter(|_| p > 0.0) {
            x = kernels::dropout::dropout(&x, p, r.random())?;
        }
        // Without an RNG this is an evaluation pass: it keeps nothing for a backward pass, or
        // candle's graph would hold every activation of the pass until the loss is dropped.
        let keep = rng.is_some() && !self.recompute;
        let mut runs = Vec::with_capacity(self.blocks.len());
        for params in &self.blocks {
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
            let eps = self.eps as f32;
            let op = BlockOp::new(
                params.clone(),
                self.n_head,
                eps,
                self.activation,
                dropout,
                keep,
                slot.clone(),
            )
            .with_rope(self.rope.clone());
            x = op.apply(&x)?;
            runs.push((params.clone(), slot));
        }
        let x = kernels::layer_norm::layer_norm(
            &x,
            &self.ln_f.weight,
            self.ln_f.bias.as_ref(),
            self.eps,
        )?;
        let logits = kernels::linear::linear(&x.reshape((b * t, c))?, &self.head)?;
        let logits = softcap(&logits, self.softcap)?;
        Ok((logits.reshape((b, t, self.head.dim(0)?))?, runs))
    }

    /// Mean cross-entropy of predicting `targets` `(B, T)` from `idx` `(B, T)`, and the blocks'
    /// gradient slots (see [`FusedGpt::forward`]).
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
