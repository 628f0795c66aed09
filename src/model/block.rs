//! A transformer block: x + attn(LN(x)), then x + mlp(LN(x)) (pre-LayerNorm, as GPT-2).

use candle_core::Tensor;

use super::attention::{Head, LayerKv, MultiHeadAttention};
use super::config::ModelConfig;
use super::layers::{dropout, LayerNorm, Linear};
use super::params::Params;
use crate::error::Result;
use crate::kernels::block::{Affine, BlockWeights};
use crate::kernels::gelu::gelu;
use crate::kernels::Kernels;
use crate::rng::Rng;

/// Position-wise feed-forward network: C → 4C → GELU → C.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    pub dropout: f64,
    pub kernels: Kernels,
}

impl Mlp {
    pub fn new(p: &mut Params, name: &str, cfg: &ModelConfig, proj_std: f64) -> Result<Mlp> {
        let (c, k) = (cfg.n_embd, cfg.kernels);
        Ok(Mlp {
            c_fc: Linear::new(p, &format!("{name}.c_fc"), c, 4 * c, cfg.bias, 0.02, k)?,
            c_proj: Linear::new(
                p,
                &format!("{name}.c_proj"),
                4 * c,
                c,
                cfg.bias,
                proj_std,
                k,
            )?,
            dropout: cfg.dropout,
            kernels: k,
        })
    }

    /// `(B, T, C)` → `(B, T, C)`.
    pub fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?; // (B, T, 4C)
        let h = match self.kernels {
            Kernels::Reference => h.gelu_erf()?,
            Kernels::Fused => gelu(&h)?,
        };
        dropout(&self.c_proj.forward(&h)?, self.dropout, rng, self.kernels)
    }
}

/// The attention of a block: a lone [`Head`] (plus output projection) when n_head = 1,
/// [`MultiHeadAttention`] otherwise. Both have the same weight names.
#[derive(Debug, Clone)]
pub enum SelfAttention {
    Single { head: Head, c_proj: Linear },
    Multi(MultiHeadAttention),
}

impl SelfAttention {
    pub fn new(p: &mut Params, name: &str, cfg: &ModelConfig, proj_std: f64) -> Result<Self> {
        if cfg.n_head == 1 {
            Ok(SelfAttention::Single {
                head: Head::new(p, name, cfg.n_embd, cfg.n_embd, cfg.dropout)?
                    .with_kernels(cfg.kernels),
                c_proj: Linear::new(
                    p,
                    &format!("{name}.c_proj"),
                    cfg.n_embd,
                    cfg.n_embd,
                    cfg.bias,
                    proj_std,
                    cfg.kernels,
                )?,
            })
        } else {
            Ok(SelfAttention::Multi(
                MultiHeadAttention::new(
                    p,
                    name,
                    cfg.n_embd,
                    cfg.n_head,
                    cfg.dropout,
                    cfg.bias,
                    proj_std,
                )?
                .with_kernels(cfg.kernels),
            ))
        }
    }

    /// `(B, T, C)` → `(out (B, T, C), weights (B, n_head, T, T_k))`; the weights only when
    /// `capture` is set. Without a cache or capture this is the training path (fused when the
    /// model's kernels are); with either, the composed path that produces the weights.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut Rng>,
        cache: Option<&mut LayerKv>,
        capture: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let fast = cache.is_none() && !capture;
        match self {
            SelfAttention::Single { head, c_proj } => {
                let (y, w) = if fast {
                    (head.forward_fast(x, mask, rng.as_deref_mut())?, None)
                } else {
                    let (y, w) = head.forward(x, mask, rng.as_deref_mut(), cache)?;
                    (y, Some(w.unsqueeze(1)?))
                };
                let y = dropout(&c_proj.forward(&y)?, head.dropout, rng, head.kernels)?;
                Ok((y, w))
            }
            SelfAttention::Multi(mha) if fast => Ok((mha.forward_fast(x, mask, rng)?, None)),
            SelfAttention::Multi(mha) => {
                let (y, w) = mha.forward(x, mask, rng, cache)?;
                Ok((y, Some(w)))
            }
        }
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: SelfAttention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    /// The block's weights for [`crate::kernels::block::BlockOp`].
    pub fn fused_weights(&self) -> BlockWeights {
        let aff = |l: &Linear| Affine {
            weight: l.weight.clone(),
            bias: l.bias.clone(),
        };
        let norm = |n: &LayerNorm| Affine {
            weight: n.weight.clone(),
            bias: n.bias.clone(),
        };
        let (w_q, w_k, w_v, attn_proj, n_head) = match &self.attn {
            SelfAttention::Single { head, c_proj } => (&head.w_q, &head.w_k, &head.w_v, c_proj, 1),
            SelfAttention::Multi(m) => (&m.w_q, &m.w_k, &m.w_v, &m.c_proj, m.n_head),
        };
        BlockWeights {
            ln_1: norm(&self.ln_1),
            w_q: w_q.weight.clone(),
            w_k: w_k.weight.clone(),
            w_v: w_v.weight.clone(),
            attn_proj: aff(attn_proj),
            ln_2: norm(&self.ln_2),
            fc: aff(&self.mlp.c_fc),
            mlp_proj: aff(&self.mlp.c_proj),
            eps: self.ln_1.eps as f32,
            n_head,
        }
    }

    /// Every trainable tensor of the block (for gradients gathered by hand).
    pub fn weights(&self) -> Vec<Tensor> {
        let lin = |l: &Linear| {
            let mut v = vec![l.weight.clone()];
            v.extend(l.bias.clone());
            v
        };
        let norm = |n: &LayerNorm| {
            let mut v = vec![n.weight.clone()];
            v.extend(n.bias.clone());
            v
        };
        let mut w = norm(&self.ln_1);
        match &self.attn {
            SelfAttention::Single { head, c_proj } => {
                for l in [&head.w_q, &head.w_k, &head.w_v, c_proj] {
                    w.extend(lin(l));
                }
            }
            SelfAttention::Multi(m) => {
                for l in [&m.w_q, &m.w_k, &m.w_v, &m.c_proj] {
                    w.extend(lin(l));
                }
            }
        }
        w.extend(norm(&self.ln_2));
        w.extend(lin(&self.mlp.c_fc));
        w.extend(lin(&self.mlp.c_proj));
        w
    }

    pub fn new(p: &mut Params, name: &str, cfg: &ModelConfig) -> Result<Block> {
        // GPT-2: residual projections start smaller, so the residual stream's variance does not
        // grow with depth.
        let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        Ok(Block {
            ln_1: LayerNorm::new(
                p,
                &format!("{name}.ln_1"),
                cfg.n_embd,
                cfg.bias,
                cfg.kernels,
            )?,
            attn: SelfAttention::new(p, &format!("{name}.attn"), cfg, proj_std)?,
            ln_2: LayerNorm::new(
                p,
                &format!("{name}.ln_2"),
                cfg.n_embd,
                cfg.bias,
                cfg.kernels,
            )?,
            mlp: Mlp::new(p, &format!("{name}.mlp"), cfg, proj_std)?,
        })
    }

    /// `(B, T, C)` → `(x (B, T, C), attention weights (B, n_head, T, T_k) if `capture`)`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut Rng>,
        cache: Option<&mut LayerKv>,
        capture: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (a, w) = self.attn.forward(
            &self.ln_1.forward(x)?,
            mask,
            rng.as_deref_mut(),
            cache,
            capture,
        )?;
        let x = (x + a)?;
        let x = (&x + self.mlp.forward(&self.ln_2.forward(&x)?, rng)?)?;
        Ok((x, w))
    }
}
