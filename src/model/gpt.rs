//! The whole model: token + position embeddings → n_layer blocks → final LayerNorm → LM head
//! tied to the token embedding (the same matrix reads tokens in and scores them out).

use candle_core::{DType, Tensor};

use super::attention::causal_mask;
use super::block::Block;
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::layers::{dropout, LayerNorm};
use super::params::{Init, Params};
use super::recompute::RecomputedBlock;
use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::block::{BlockDropout, BlockOp, WeightGrads};
use crate::kernels::Kernels;
use crate::rng::Rng;
use rand::Rng as _;

/// A GPT-style decoder-only language model.
#[derive(Debug, Clone)]
pub struct Gpt {
    pub cfg: ModelConfig,
    pub vocab_size: usize,
    /// Token embedding and (tied) LM head: `(V, C)`.
    pub wte: Tensor,
    /// Learned position embedding: `(block_size, C)`.
    pub wpe: Tensor,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
    /// Training passes recompute each block in backward instead of keeping its activations
    /// ([`super::recompute`], or [`BlockOp`]'s own recomputation on the fused kernels).
    pub recompute: bool,
    /// Training passes on the fused kernels run each block as one [`BlockOp`] (forward and
    /// backward written out, no per-layer autograd). Their weights' gradients go to
    /// `weight_grads`; whoever calls `backward` must add those (the trainer does).
    pub block_ops: bool,
    /// Where block ops (and recomputed blocks) leave their weights' gradients.
    pub weight_grads: WeightGrads,
}

/// What one forward pass gives back.
pub struct Forward {
    /// `(B, T, V)` next-token scores.
    pub logits: Tensor,
    /// Per layer, the attention weights `(B, n_head, T, T_k)`; empty unless asked for.
    pub attention: Vec<Tensor>,
}

impl Gpt {
    /// Builds the model, taking (or initialising) every weight from `p`.
    pub fn new(cfg: &ModelConfig, vocab_size: usize, p: &mut Params) -> Result<Gpt> {
        let wte = p.get("wte.weight", &[vocab_size, cfg.n_embd], Init::Normal(0.02))?;
        let wpe = p.get(
            "wpe.weight",
            &[cfg.block_size, cfg.n_embd],
            Init::Normal(0.02),
        )?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(p, &format!("h.{i}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(p, "ln_f", cfg.n_embd, cfg.bias, cfg.kernels)?;
        Ok(Gpt {
            cfg: cfg.clone(),
            vocab_size,
            wte,
            wpe,
            blocks,
            ln_f,
            recompute: false,
            block_ops: false,
            weight_grads: WeightGrads::default(),
        })
    }

    /// The forward pass of `idx` `(B, T)` (u32 token ids) at positions `offset..offset + T`.
    /// `rng` turns dropout on (training); `cache` makes it incremental; `capture` keeps every
    /// layer's attention weights.
    pub fn run(
        &self,
        idx: &Tensor,
        mut rng: Option<&mut Rng>,
        mut cache: Option<&mut KvCache>,
        capture: bool,
    ) -> Result<Forward> {
        let (b, t) = idx.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        if t == 0 {
            return Err(Error::Usage("cannot run the model on zero tokens".into()));
        }
        if offset + t > self.cfg.block_size {
            return Err(Error::Usage(format!(
                "{} positions exceed the model's block_size of {}",
                offset + t,
                self.cfg.block_size
            )));
        }
        let c = self.cfg.n_embd;
        let tok = self
            .wte
            .index_select(&idx.flatten_all()?, 0)?
            .reshape((b, t, c))?; // (B, T, C)
        let pos = self.wpe.narrow(0, offset, t)?; // (T, C)
        let x = match self.cfg.kernels {
            Kernels::Reference => tok.broadcast_add(&pos)?,
            Kernels::Fused => kernels::positions::add_positions(&tok, &pos)?,
        };
        let mut x = dropout(&x, self.cfg.dropout, rng.as_deref_mut(), self.cfg.kernels)?;
        let mask = causal_mask(t, offset + t, offset, idx.device())?;
        let mut attention = Vec::new();
        let whole_blocks = cache.is_none() && !capture;
        let block_ops = self.block_ops && self.cfg.kernels == Kernels::Fused && whole_blocks;
        for (i, block) in self.blocks.iter().enumerate() {
            if block_ops {
                // Seeds drawn in the order the layer-by-layer path draws them, so both paths
                // drop the same units.
                let p = self.cfg.dropout;
                let dropout = match rng.as_deref_mut() {
                    Some(r) if p > 0.0 => Some(BlockDropout {
                        p,
                        attention: r.random(),
                        attn_proj: r.random(),
                        mlp_proj: r.random(),
                    }),
                    _ => None,
                };
                // Without an RNG this is an evaluation pass: it keeps nothing for a backward
                // pass (one that comes anyway recomputes what it needs). Otherwise candle's
                // graph would hold every activation of the pass until the loss is dropped:
                // 2.9 GB at the peak on the 10M config instead of 1.8.
                let keep = rng.is_some() && !self.recompute;
                let op = BlockOp::new(
                    block.fused_weights(),
                    dropout,
                    keep,
                    self.weight_grads.clone(),
                );
                x = op.apply(&x)?;
                continue;
            }
            if self.recompute && whole_blocks {
                if let Some(r) = rng.as_deref_mut() {
                    let op = RecomputedBlock {
                        block: block.clone(),
                        mask: mask.clone(),
                        dropout_seed: (self.cfg.dropout > 0.0).then(|| r.random()),
                        weights: block.weights(),
                        grads: self.weight_grads.clone(),
                    };
                    x = x.contiguous()?.apply_op1(op)?;
                    continue;
                }
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (y, w) = block.forward(&x, &mask, rng.as_deref_mut(), layer_cache, capture)?;
            x = y;
            attention.extend(w);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let x = self.ln_f.forward(&x)?.reshape((b * t, c))?;
        let logits = match self.cfg.kernels {
            Kernels::Reference => x.matmul(&self.wte.t()?)?,
            Kernels::Fused => kernels::linear::linear(&x, &self.wte)?,
        };
        let logits = logits.reshape((b, t, self.vocab_size))?; // (B, T, V)
        Ok(Forward { logits, attention })
    }

    /// Logits `(B, T, V)` of a full pass; dropout is on when `rng` is given.
    pub fn forward(&self, idx: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        Ok(self.run(idx, rng, None, false)?.logits)
    }

    /// Logits and every layer's attention weights `(B, n_head, T, T)`, from the same code path
    /// as training (dropout off).
    pub fn forward_with_attention(&self, idx: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let f = self.run(idx, None, None, true)?;
        Ok((f.logits, f.attention))
    }

    /// Incremental pass: `idx` `(B, T_new)` continues the tokens already in `cache`.
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.run(idx, None, Some(cache), false)?.logits)
    }

    /// Mean cross-entropy of predicting `targets` `(B, T)` from `idx` `(B, T)`.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let logits = self.forward(idx, rng)?;
        let (b, t, v) = logits.dims3()?;
        let logits = logits.reshape((b * t, v))?;
        let targets = targets.reshape(b * t)?.to_dtype(DType::U32)?;
        Ok(match self.cfg.kernels {
            Kernels::Reference => candle_nn::loss::cross_entropy(&logits, &targets)?,
            Kernels::Fused => kernels::cross_entropy::cross_entropy(&logits, &targets)?,
        })
    }

    /// A fresh cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.n_layer)
    }
}
