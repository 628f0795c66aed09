//! The small layers the blocks are made of: Linear, LayerNorm and dropout. Each has two
//! implementations, chosen by `model.kernels`: candle's composed (differentiable) ops, written
//! to be read, and tinygpt's fused CPU kernels ([`crate::kernels`]), written to be fast.

use candle_core::{DType, Tensor, D};
use rand::Rng as _;

use super::params::{Init, Params};
use crate::error::Result;
use crate::kernels;
use crate::kernels::Kernels;
use crate::rng::Rng;

/// y = x·Wᵀ + b over the last dimension; W is `(out, in)` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub kernels: Kernels,
}

impl Linear {
    /// A Linear layer named `name` with weights Normal(0, `std`) and optional zero bias.
    pub fn new(
        p: &mut Params,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        std: f64,
        kernels: Kernels,
    ) -> Result<Linear> {
        let weight = p.get(&format!("{name}.weight"), &[d_out, d_in], Init::Normal(std))?;
        let bias = if bias {
            Some(p.get(&format!("{name}.bias"), &[d_out], Init::Zeros)?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            kernels,
        })
    }

    /// `(…, in)` → `(…, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.kernels == Kernels::Fused {
            let y = kernels::linear::linear(x, &self.weight)?;
            return Ok(match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        let dims = x.dims().to_vec();
        let d_in = dims[dims.len() - 1];
        let rows = x.elem_count() / d_in;
        let y = x.reshape((rows, d_in))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

/// Layer normalisation over the last dimension (C), with a gain and an optional bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
    pub kernels: Kernels,
}

impl LayerNorm {
    pub fn new(
        p: &mut Params,
        name: &str,
        dim: usize,
        bias: bool,
        kernels: Kernels,
    ) -> Result<LayerNorm> {
        let weight = p.get(&format!("{name}.weight"), &[dim], Init::Ones)?;
        let bias = if bias {
            Some(p.get(&format!("{name}.bias"), &[dim], Init::Zeros)?)
        } else {
            None
        };
        Ok(LayerNorm {
            weight,
            bias,
            eps: 1e-5,
            kernels,
        })
    }

    /// `(B, T, C)` → `(B, T, C)`: (x − mean) / √(var + ε) · w + b.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.kernels == Kernels::Fused {
            let b = self.bias.as_ref();
            return Ok(kernels::layer_norm::layer_norm(
                x,
                &self.weight,
                b,
                self.eps,
            )?);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xhat = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = xhat.broadcast_mul(&self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Inverted dropout: zeroes each element with probability `p` and scales the rest by 1/(1−p).
/// Masks are drawn from the run's RNG so training stays reproducible (the fused version draws
/// one seed for a counter-based mask). Without an RNG (eval, sampling) or with p = 0 it is the
/// identity.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut Rng>, kernels: Kernels) -> Result<Tensor> {
    let Some(rng) = rng else {
        return Ok(x.clone());
    };
    if p == 0.0 {
        return Ok(x.clone());
    }
    if kernels == Kernels::Fused {
        return Ok(kernels::dropout::dropout(x, p, rng.random())?);
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(DType::F32)?;
    Ok(x.mul(&mask)?)
}
