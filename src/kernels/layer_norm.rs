//! LayerNorm over the last dimension in one pass per row, forward and backward.
//!
//! Forward, per row x of width C: μ = mean(x), σ⁻¹ = 1/√(var(x) + ε), x̂ = (x − μ)·σ⁻¹,
//! y = x̂·w (+ b). Backward, with g = dy·w:
//! dx = σ⁻¹·(g − mean(g) − x̂·mean(g·x̂)), dw = Σ_rows dy·x̂, db = Σ_rows dy.
//! μ and σ⁻¹ are recomputed in the backward pass rather than stored (one cheap pass over a row
//! that is about to be read anyway).

use std::mem::MaybeUninit;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{as_uninit, f32_slice, mapped_in_chunks, math, rows_per_task, with_f32};

/// (μ, σ⁻¹) of one row.
#[inline(always)]
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let c = x.len() as f32;
    let mean = math::sum(x) / c;
    let var = math::sum_zip(x, x, |a, _| (a - mean) * (a - mean)) / c;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The forward pass over whole rows of `x`, on the calling thread.
pub(crate) fn layer_norm_forward_serial_into(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    eps: f32,
    y: &mut [f32],
) {
    // SAFETY: `forward_rows` only ever writes initialised values.
    forward_rows(x, w, b, eps, unsafe { as_uninit(y) });
}

/// [`layer_norm_forward_serial_into`] into memory that need not be initialised.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward_rows(x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, y: &mut [MaybeUninit<f32>]) {
    let c = w.len();
    for (x, y) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let (mean, rstd) = stats(x, eps);
        match b {
            Some(b) => {
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    y.write((x - mean) * rstd * w + b);
                }
            }
            None => {
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    y.write((x - mean) * rstd * w);
                }
            }
        }
    }
}

/// Backward over a run of rows: writes dx and adds this run's dw, db into `dw`, `db`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_rows(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let c = w.len();
    let inv_c = 1.0 / c as f32;
    for ((x, dy), dx) in x
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
    {
        let (mean, rstd) = stats(x, eps);
        // mean(g) and mean(g·x̂) with g = dy·w (each in its own loop of 16 lanes: as one
        // loop with two sets of lanes, it ran one element at a time)
        let s_g = math::sum_zip(dy, w, |dy, w| dy * w);
        let s_gx = math::sum_zip3(dy, w, x, |dy, w, x| dy * w * (x - mean) * rstd);
        let (m_g, m_gx) = (s_g * inv_c, s_gx * inv_c);
        for i in 0..c {
            let xhat = (x[i] - mean) * rstd;
            dx[i] = rstd * (dy[i] * w[i] - m_g - xhat * m_gx);
            dw[i] += dy[i] * xhat;
            db[i] += dy[i];
        }
    }
}

/// `(…, C)` → `(…, C)`: the forward pass over whole slices.
pub fn layer_norm_forward_into(x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, y: &mut [f32]) {
    let c = w.len();
    let chunk = rows_per_task(c) * c;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| layer_norm_forward_serial_into(x, w, b, eps, y));
}

/// The forward pass into a new buffer, written once (not zeroed first).
pub fn layer_norm_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let c = w.len();
    let rows = x.len() / c.max(1);
    let chunk = rows_per_task(c) * c;
    // SAFETY: chunks are whole rows, and `forward_rows` writes every element of them.
    unsafe { mapped_in_chunks(&x[..rows * c], chunk, |x, y| forward_rows(x, w, b, eps, y)) }
}

/// The backward pass: `(dx, dw, db)`. dw and db are summed per chunk of rows, then the chunks
/// in order, so the result does not depend on the thread count.
pub fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f32; x.len()];
    let (dw, db) = layer_norm_backward_into(x, w, dy, eps, &mut dx);
    (dx, dw, db)
}

/// [`layer_norm_backward`] with dx written into `dx` (as long as `x`); returns (dw, db).
pub fn layer_norm_backward_into(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let c = w.len();
    let chunk = rows_per_task(c) * c;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(dy.par_chunks(chunk))
        .map(|((dx, x), dy)| {
            let mut dw = vec![0.0f32; c];
            let mut db = vec![0.0f32; c];
            backward_rows(x, w, dy, eps, dx, &mut dw, &mut db);
            (dw, db)
        })
        .collect();
    let mut dw = vec![0.0f32; c];
    let mut db = vec![0.0f32; c];
    for (pw, pb) in &partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    (dw, db)
}

/// LayerNorm of `x` `(…, C)` with gain `w` `(C)` and optional bias `b` `(C)`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let op = LayerNormOp { eps: eps as f32 };
    let x = x.contiguous()?;
    match b {
        Some(b) => x.apply_op3(&w.contiguous()?, &b.contiguous()?, op),
        None => x.apply_op2(&w.contiguous()?, op),
    }
}

struct LayerNormOp {
    eps: f32,
}

impl LayerNormOp {
    fn fwd(&self, x: &[f32], w: &[f32], b: Option<&[f32]>, l: &Layout) -> Result<CpuStorage> {
        let c = w.len();
        if l.shape().dims().last() != Some(&c) || b.is_some_and(|b| b.len() != c) {
            bail!(
                "layer_norm: input {:?} does not match a gain of {c}",
                l.shape()
            )
        }
        Ok(CpuStorage::F32(layer_norm_forward(x, w, b, self.eps)))
    }

    fn bwd_tensors(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<[Tensor; 3]> {
        let (dx, dw, db) = with_f32(x, "layer_norm backward", |x| {
            with_f32(w, "layer_norm backward", |w| {
                with_f32(dy, "layer_norm backward", |dy| {
                    layer_norm_backward(x, w, dy, self.eps)
                })
            })
        })???;
        Ok([
            Tensor::from_vec(dx, x.shape(), x.device())?,
            Tensor::from_vec(dw, w.shape(), w.device())?,
            Tensor::from_vec(db, w.shape(), w.device())?,
        ])
    }
}

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        "tinygpt-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "layer_norm")?;
        let w = f32_slice(ws, wl, "layer_norm")?;
        Ok((self.fwd(x, w, None, xl)?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = self.bwd_tensors(x, w, dy)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "tinygpt-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "layer_norm")?;
        let w = f32_slice(ws, wl, "layer_norm")?;
        let b = f32_slice(bs, bl, "layer_norm")?;
        Ok((self.fwd(x, w, Some(b), xl)?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = self.bwd_tensors(x, w, dy)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}
