//! The optimizer's updates as candle tensor ops, for parameters that live on a GPU: the same
//! arithmetic as the CPU kernels ([`crate::kernels::adamw`], [`crate::kernels::muon`]), with
//! the moments as device tensors, so that a step never copies a parameter, a gradient or a
//! moment to the host. Muon's Newton–Schulz iterations are matrix products on the device.

use candle_core::{Result, Tensor, Var};

use crate::kernels::adamw::AdamWStep;
use crate::kernels::muon::{MuonStep, NS_STEPS};

/// The Newton–Schulz quintic's coefficients (see [`crate::kernels::muon`]).
const NS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// Σ g² as a device scalar (f32), without a copy to the host.
pub fn sum_of_squares(g: &Tensor) -> Result<Tensor> {
    g.sqr()?.sum_all()
}

/// One AdamW step of `p` with gradient `g` and moments `m`, `v` (replaced by the new ones):
/// ```text
/// g ← g·grad_scale;  m ← β₁·m + (1 − β₁)·g;  v ← β₂·v + (1 − β₂)·g²
/// p ← p·decay − step_size · m / (√v · inv_bc2 + ε)
/// ```
pub fn adamw(p: &Var, g: &Tensor, m: &mut Tensor, v: &mut Tensor, s: &AdamWStep) -> Result<()> {
    let (b1, b2) = (s.beta1, s.beta2);
    let g = scale(g, s.grad_scale)?;
    *m = (scale(m, b1)? + scale(&g, 1.0 - b1)?)?;
    *v = (scale(v, b2)? + scale(&g.sqr()?, 1.0 - b2)?)?;
    let denom = v.sqrt()?.affine(s.inv_bc2 as f64, s.eps as f64)?;
    let step = (scale(m, s.step_size)? / denom)?;
    p.set(&(scale(p.as_tensor(), s.decay)? - step)?)
}

/// One Muon step of the 2-D weight `p` with gradient `g` and momentum buffer `buf`:
/// ```text
/// buf ← β·buf + (1 − β)·g;   u = (1 − β)·g + β·buf
/// p ← p·decay − lr·√max(1, rows/cols)·NS(u)
/// ```
pub fn muon(p: &Var, g: &Tensor, buf: &mut Tensor, s: &MuonStep) -> Result<()> {
    let (rows, cols) = p.dims2()?;
    let beta = s.momentum;
    let g = scale(g, s.grad_scale)?;
    *buf = (scale(buf, beta)? + scale(&g, 1.0 - beta)?)?;
    let u = (scale(&g, 1.0 - beta)? + scale(buf, beta)?)?;
    let o = orthogonalize(&u)?;
    let step = s.lr * (rows as f32 / cols as f32).max(1.0).sqrt();
    p.set(&(scale(p.as_tensor(), s.decay)? - scale(&o, step)?)?)
}

/// `u` `(rows, cols)` with its singular values pushed towards 1 by [`NS_STEPS`] Newton–Schulz
/// iterations (in the wide orientation, so that X·Xᵀ is the smaller square).
pub fn orthogonalize(u: &Tensor) -> Result<Tensor> {
    let (rows, cols) = u.dims2()?;
    let norm = sum_of_squares(u)?.sqrt()?;
    let x = u.broadcast_div(&(norm + 1e-7)?)?;
    let mut x = if rows <= cols {
        x
    } else {
        x.t()?.contiguous()?
    };
    let (a, b, c) = NS;
    for _ in 0..NS_STEPS {
        let gram = x.matmul(&x.t()?)?;
        let poly = ((&gram * b)? + (gram.matmul(&gram)? * c)?)?;
        x = ((&x * a)? + poly.matmul(&x)?)?;
    }
    if rows <= cols {
        Ok(x)
    } else {
        x.t()?.contiguous()
    }
}

/// `t · k` with the f32 factor as the kernels use it.
fn scale(t: &Tensor, k: f32) -> Result<Tensor> {
    t.affine(k as f64, 0.0)
}
