//! A transformer block: x + attn(LN(x)), then x + mlp(LN(x)) (pre-LayerNorm, as GPT-2).

use candle_core::Tensor;
use candle_nn::kv_cache::KvCache as LayerKv;

use super::attention::{Head, MultiHeadAttention};
use super::config::{ModelConfig, INIT_STD};
use super::hooks::{patch_heads, HeadPatch, LayerTrace};
use super::layers::{dropout, Linear, Norm};
use super::params::VarBuilder;
use super::rope::Rope;
use crate::error::Result;
use crate::layout::{Activation, Affine, BlockParams};
use crate::rng::Rng;

/// Position-wise feed-forward network: C → 4C → activation (`model.activation`) → C.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    pub activation: Activation,
    pub dropout: f64,
}

impl Mlp {
    /// `vb`'s `c_fc` and `c_proj`; `proj_std`: the output projection's initial scale.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig, proj_std: f64) -> Result<Mlp> {
        let c = cfg.n_embd;
        let c_fc = Linear::new(vb.pp("c_fc"), c, 4 * c, cfg.bias, INIT_STD)?;
        let c_proj = Linear::new(vb.pp("c_proj"), 4 * c, c, cfg.bias, proj_std)?;
        Ok(Mlp {
            c_fc,
            c_proj,
            activation: cfg.activation,
            dropout: cfg.dropout,
        })
    }

    /// `(B, T, C)` → `(B, T, C)`.
    pub fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let h = x.apply(&self.c_fc)?; // (B, T, 4C)
        let h = match self.activation {
            Activation::Gelu => h.gelu_erf()?,
            Activation::Relu2 => h.relu()?.sqr()?,
            Activation::GeluTanh => h.gelu()?, // candle's `gelu` is the tanh form
        };
        dropout(&h.apply(&self.c_proj)?, self.dropout, rng)
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
    /// `vb`'s attention weights, one [`Head`] or [`MultiHeadAttention`] as `cfg.n_head` says,
    /// turning queries and keys by `rope` when given.
    pub fn new(
        vb: VarBuilder,
        cfg: &ModelConfig,
        proj_std: f64,
        rope: Option<&Rope>,
    ) -> Result<Self> {
        let (c, p) = (cfg.n_embd, cfg.dropout);
        if cfg.n_head > 1 {
            let mut mha =
                MultiHeadAttention::new(vb, c, cfg.n_head, p, cfg.bias, cfg.qkv_bias, proj_std)?;
            mha.rope = rope.cloned();
            mha.qk_norm = cfg.qk_norm;
            return Ok(SelfAttention::Multi(mha));
        }
        let mut head = Head::new(vb.clone(), c, c, p, cfg.qkv_bias)?;
        head.rope = rope.cloned();
        head.qk_norm = cfg.qk_norm;
        let c_proj = Linear::new(vb.pp("c_proj"), c, c, cfg.bias, proj_std)?;
        Ok(SelfAttention::Single { head, c_proj })
    }

    /// `(B, T, C)` → `(out (B, T, C), weights (B, n_head, T, T_k))`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rng: Option<&mut Rng>,
        cache: Option<&mut LayerKv>,
    ) -> Result<(Tensor, Tensor)> {
        let (y, w, _) = self.forward_hooked(x, mask, rng, cache, &[])?;
        Ok((y, w))
    }

    /// [`SelfAttention::forward`] with the heads in `patches` replaced before the output
    /// projection ([`super::hooks`]): `(out (B, T, C), weights (B, n_head, T, T_k), z (B,
    /// n_head, T, hs))`, z after the patches.
    pub fn forward_hooked(
        &self,
        x: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut Rng>,
        cache: Option<&mut LayerKv>,
        patches: &[(usize, &HeadPatch)],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (z, w) = match self {
            SelfAttention::Single { head, .. } => {
                let (z, w) = head.forward(x, mask, rng.as_deref_mut(), cache)?;
                (z.unsqueeze(1)?, w.unsqueeze(1)?)
            }
            SelfAttention::Multi(mha) => mha.heads(x, mask, rng.as_deref_mut(), cache)?,
        };
        let z = patch_heads(z, patches)?;
        let y = match self {
            SelfAttention::Single { head, c_proj } => {
                dropout(&z.squeeze(1)?.apply(c_proj)?, head.dropout, rng)?
            }
            SelfAttention::Multi(mha) => mha.project(&z, rng)?,
        };
        Ok((y, w, z))
    }

    /// The output projection `(C, C)` (as PyTorch lays it out, `(out, in)`) and its bias: the
    /// columns `h·hs .. (h + 1)·hs` of the matrix are W_O of head h.
    pub fn output(&self) -> &Linear {
        match self {
            SelfAttention::Single { c_proj, .. } => c_proj,
            SelfAttention::Multi(mha) => &mha.c_proj,
        }
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pub ln_1: Norm,
    pub attn: SelfAttention,
    pub ln_2: Norm,
    pub mlp: Mlp,
}

impl Block {
    /// A block with `vb`'s weights (`ln_1`, `attn`, `ln_2`, `mlp`); `rope`: the rotations of
    /// `model.position = "rope"`.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig, rope: Option<&Rope>) -> Result<Block> {
        // GPT-2: residual projections start smaller, so the residual stream's variance does not
        // grow with depth. With `zero_init` they start at zero (a 0 std means zeros).
        let proj_std = match cfg.zero_init {
            true => 0.0,
            false => INIT_STD / (2.0 * cfg.n_layer as f64).sqrt(),
        };
        let norm = |name: &str| Norm::new(vb.pp(name), cfg.n_embd, cfg.bias, cfg.norm);
        Ok(Block {
            ln_1: norm("ln_1")?,
            attn: SelfAttention::new(vb.pp("attn"), cfg, proj_std, rope)?,
            ln_2: norm("ln_2")?,
            mlp: Mlp::new(vb.pp("mlp"), cfg, proj_std)?,
        })
    }

    /// `(B, T, C)` → `(x (B, T, C), attention weights (B, n_head, T, T_k))`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rng: Option<&mut Rng>,
        cache: Option<&mut LayerKv>,
    ) -> Result<(Tensor, Tensor)> {
        let (x, layer) = self.forward_hooked(x, mask, rng, cache, &[])?;
        Ok((x, layer.attention))
    }

    /// [`Block::forward`] with the heads in `patches` replaced ([`super::hooks`]): the block's
    /// output `(B, T, C)` and what it computed on the way.
    pub fn forward_hooked(
        &self,
        x: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut Rng>,
        cache: Option<&mut LayerKv>,
        patches: &[(usize, &HeadPatch)],
    ) -> Result<(Tensor, LayerTrace)> {
        let (a, attention, heads) = self.attn.forward_hooked(
            &x.apply(&self.ln_1)?,
            mask,
            rng.as_deref_mut(),
            cache,
            patches,
        )?;
        let x = (x + &a)?;
        let m = self.mlp.forward(&x.apply(&self.ln_2)?, rng)?;
        let x = (&x + &m)?;
        let layer = LayerTrace {
            attention,
            heads,
            attn_out: a,
            mlp_out: m,
        };
        Ok((x, layer))
    }

    /// The block's parameters by name: every weight the block has, the same tensors.
    pub fn params(&self) -> BlockParams<Tensor> {
        let affine = |weight: &Tensor, bias: &Option<Tensor>| Affine {
            weight: weight.clone(),
            bias: bias.clone(),
        };
        let (w_q, w_k, w_v, attn_proj) = match &self.attn {
            SelfAttention::Single { head, c_proj } => (&head.w_q, &head.w_k, &head.w_v, c_proj),
            SelfAttention::Multi(m) => (&m.w_q, &m.w_k, &m.w_v, &m.c_proj),
        };
        BlockParams {
            ln_1: affine(&self.ln_1.weight, &self.ln_1.bias),
            w_q: affine(&w_q.weight, &w_q.bias),
            w_k: affine(&w_k.weight, &w_k.bias),
            w_v: affine(&w_v.weight, &w_v.bias),
            attn_proj: affine(&attn_proj.weight, &attn_proj.bias),
            ln_2: affine(&self.ln_2.weight, &self.ln_2.bias),
            fc: affine(&self.mlp.c_fc.weight, &self.mlp.c_fc.bias),
            mlp_proj: affine(&self.mlp.c_proj.weight, &self.mlp.c_proj.bias),
        }
    }
}
