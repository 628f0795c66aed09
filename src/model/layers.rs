//! The small layers the blocks are made of: Linear, LayerNorm (or RMSNorm) and dropout, on candle's
//! composed (differentiable) ops. Linear and LayerNorm are candle-nn [`Module`]s, so a forward
//! reads `x.apply(&self.ln_1)?`. Ours rather than candle-nn's: its `Linear` runs a batched
//! matmul (other rounding than one 2-D product), its fast `LayerNorm` has no backward, and its
//! dropout draws from candle's RNG, which cannot be seeded.

use candle_core::{DType, Tensor, D};
use candle_nn::Module;

use super::config::{NormKind, NORM_EPS};
use super::params::{Init, VarBuilder};
use super::precision::matmul;
use crate::error::Result;
use crate::rng::Rng;
use rand::Rng as _;

/// y = x·Wᵀ + b over the last dimension; W is `(out, in)` as in PyTorch. The product runs in
/// the scope's [`super::precision`].
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `vb`'s `weight` `(d_out, d_in)` (fresh: Normal(0, `std`)) and optional `bias` (zeros).
    pub fn new(vb: VarBuilder, d_in: usize, d_out: usize, bias: bool, std: f64) -> Result<Linear> {
        let init = match std {
            0.0 => Init::Const(0.0),
            _ => Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        };
        let weight = vb.get_with_hints((d_out, d_in), "weight", init)?;
        let bias = match bias {
            true => Some(vb.get_with_hints(d_out, "bias", Init::Const(0.0))?),
            false => None,
        };
        Ok(Linear { weight, bias })
    }
}

impl Module for Linear {
    /// `(…, in)` → `(…, out)`, as one 2-D product over all rows.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let d_in = dims[dims.len() - 1];
        let y = x.reshape((x.elem_count() / d_in, d_in))?;
        let y = matmul(&y, &self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let last = dims.len() - 1;
        dims[last] = self.weight.dim(0)?;
        y.reshape(dims)
    }
}

/// A normalisation over the last dimension (C) with a gain `weight` `(C)`: LayerNorm (with an
/// optional bias) or RMSNorm (no bias), as `model.norm` says.
#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
    pub kind: NormKind,
}

impl Norm {
    /// `vb`'s gain `weight` `(dim)` (fresh: ones) and, for a LayerNorm with `bias`, its bias
    /// (zeros).
    pub fn new(vb: VarBuilder, dim: usize, bias: bool, kind: NormKind) -> Result<Norm> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = match bias && kind == NormKind::LayerNorm {
            true => Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?),
            false => None,
        };
        Ok(Norm {
            weight,
            bias,
            eps: NORM_EPS,
            kind,
        })
    }
}

impl Module for Norm {
    /// `(…, C)` → `(…, C)`: LayerNorm (x − mean) / √(var + ε) · w + b, or RMSNorm
    /// x / √(mean(x²) + ε) · w.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let xhat = match self.kind {
            NormKind::LayerNorm => {
                let mean = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                xc.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
            NormKind::Rms => rms_normalize(x, self.eps)?,
        };
        let y = xhat.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// x / √(mean(x²) + ε) over the last dimension, no gain: RMSNorm's core, and what
/// `model.qk_norm` does to each head's queries and keys.
pub fn rms_normalize(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)
}

/// Inverted dropout: zeroes each element with probability `p` and scales the rest by 1/(1−p).
/// Masks are drawn from the run's RNG so training stays reproducible: on the CPU element by
/// element; on a GPU by the device's own generator, seeded with one number from the run's RNG
/// (drawing millions of numbers on the host and copying them over would take longer than the
/// step). Without an RNG (eval, sampling) or with p = 0 it is the identity.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut Rng>) -> Result<Tensor> {
    let Some(rng) = rng.filter(|_| p > 0.0) else {
        return Ok(x.clone());
    };
    let scale = (1.0 / (1.0 - p)) as f32;
    if !x.device().is_cpu() {
        x.device().set_seed(rng.random())?;
        let keep = Tensor::rand(0f32, 1f32, x.shape(), x.device())?.ge(p)?;
        let mask = (keep.to_dtype(DType::F32)? * scale as f64)?;
        return Ok(x.mul(&mask)?);
    }
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(DType::F32)?;
    Ok(x.mul(&mask)?)
}
