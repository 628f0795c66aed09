//! The layout of a block's parameters, shared by the readable model and the fused kernels:
//! which weights a transformer block has, their shapes, and the MLP's nonlinearity. Both sides
//! name their weights through these types, so neither imports the other, and nothing
//! translates between two copies of the same layout. This module imports nothing of the crate.

use serde::{Deserialize, Serialize};

/// The MLP's nonlinearity (`model.activation`). The model computes it with candle's ops
/// (`model::block`), the kernels on slices (`kernels::activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// x·Φ(x), exact (erf-based): nanoGPT's.
    #[default]
    Gelu,
    /// max(x, 0)², from the GPT-2 speedrun: as cheap as ReLU.
    Relu2,
    /// GELU's tanh approximation, GPT-2's own (`gelu_new`); for imported GPT-2 weights.
    #[serde(rename = "gelu_tanh")]
    GeluTanh,
}

/// A weight `(out, in)` (PyTorch's layout) or a normalisation's gain `(C)`, and its optional bias.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine<T> {
    pub weight: T,
    pub bias: Option<T>,
}

impl<T> Affine<T> {
    /// The same weight and bias, borrowed.
    pub fn as_ref(&self) -> Affine<&T> {
        Affine {
            weight: &self.weight,
            bias: self.bias.as_ref(),
        }
    }

    /// The same weight and bias, mutably borrowed.
    pub fn as_mut(&mut self) -> Affine<&mut T> {
        Affine {
            weight: &mut self.weight,
            bias: self.bias.as_mut(),
        }
    }

    /// The weight, then the bias (if any), passed through `f`.
    pub fn try_map<U, E>(self, mut f: impl FnMut(T) -> Result<U, E>) -> Result<Affine<U>, E> {
        Ok(Affine {
            weight: f(self.weight)?,
            bias: self.bias.map(f).transpose()?,
        })
    }
}

/// The parameters of one transformer block, by name, generic over what each one holds: the
/// model's tensors, the slices the fused block op reads, the gradients it returns. Biases are
/// `None` in a model without them; W_Q, W_K, W_V have them only with `model.qkv_bias` (GPT-2's).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockParams<T> {
    /// The normalisation before attention: gain `(C)` and bias.
    pub ln_1: Affine<T>,
    /// W_Q, W_K, W_V, `(C, C)` each: the heads' rows one after the other (and their biases
    /// `(C)`).
    pub w_q: Affine<T>,
    pub w_k: Affine<T>,
    pub w_v: Affine<T>,
    /// Attention output projection `(C, C)`.
    pub attn_proj: Affine<T>,
    /// The normalisation before the MLP.
    pub ln_2: Affine<T>,
    /// MLP expansion `(4C, C)`.
    pub fc: Affine<T>,
    /// MLP projection `(C, 4C)`.
    pub mlp_proj: Affine<T>,
}

impl<T> BlockParams<T> {
    /// The same parameters, borrowed.
    pub fn as_ref(&self) -> BlockParams<&T> {
        BlockParams {
            ln_1: self.ln_1.as_ref(),
            w_q: self.w_q.as_ref(),
            w_k: self.w_k.as_ref(),
            w_v: self.w_v.as_ref(),
            attn_proj: self.attn_proj.as_ref(),
            ln_2: self.ln_2.as_ref(),
            fc: self.fc.as_ref(),
            mlp_proj: self.mlp_proj.as_ref(),
        }
    }

    /// The same parameters, mutably borrowed.
    pub fn as_mut(&mut self) -> BlockParams<&mut T> {
        BlockParams {
            ln_1: self.ln_1.as_mut(),
            w_q: self.w_q.as_mut(),
            w_k: self.w_k.as_mut(),
            w_v: self.w_v.as_mut(),
            attn_proj: self.attn_proj.as_mut(),
            ln_2: self.ln_2.as_mut(),
            fc: self.fc.as_mut(),
            mlp_proj: self.mlp_proj.as_mut(),
        }
    }

    /// Each parameter passed through `f` (biases only where present), in [`Self::named`] order.
    pub fn try_map<U, E>(self, mut f: impl FnMut(T) -> Result<U, E>) -> Result<BlockParams<U>, E> {
        Ok(BlockParams {
            ln_1: self.ln_1.try_map(&mut f)?,
            w_q: self.w_q.try_map(&mut f)?,
            w_k: self.w_k.try_map(&mut f)?,
            w_v: self.w_v.try_map(&mut f)?,
            attn_proj: self.attn_proj.try_map(&mut f)?,
            ln_2: self.ln_2.try_map(&mut f)?,
            fc: self.fc.try_map(&mut f)?,
            mlp_proj: self.mlp_proj.try_map(&mut f)?,
        })
    }

    /// Every parameter present, with its name inside the block as the model's checkpoints
    /// spell it (`ln_1.weight`, `attn.w_q.weight`, `attn.c_proj.bias`, `mlp.c_fc.weight`, …),
    /// in a fixed order: to save and load them, and to walk two sets side by side.
    pub fn named(self) -> Vec<(&'static str, T)> {
        let fields = [
            (["ln_1.weight", "ln_1.bias"], self.ln_1),
            (["attn.w_q.weight", "attn.w_q.bias"], self.w_q),
            (["attn.w_k.weight", "attn.w_k.bias"], self.w_k),
            (["attn.w_v.weight", "attn.w_v.bias"], self.w_v),
            (["attn.c_proj.weight", "attn.c_proj.bias"], self.attn_proj),
            (["ln_2.weight", "ln_2.bias"], self.ln_2),
            (["mlp.c_fc.weight", "mlp.c_fc.bias"], self.fc),
            (["mlp.c_proj.weight", "mlp.c_proj.bias"], self.mlp_proj),
        ];
        let mut v = Vec::with_capacity(16);
        for ([w, b], a) in fields {
            v.push((w, a.weight));
            v.extend(a.bias.map(|x| (b, x)));
        }
        v
    }
}
