//! The AdamW update, vectorised and split over threads, applied in place to a parameter's
//! storage (no copy out to a Vec and back), with gradient clipping folded in as a scale.
//!
//! For each element, with g the gradient times `grad_scale`:
//! ```text
//! p ← p · decay                 (decay = 1 − lr·λ for 2-D weights, else 1)
//! m ← β₁·m + (1 − β₁)·g      v ← β₂·v + (1 − β₂)·g²
//! p ← p − step_size · m / (√v · inv_bc2 + ε)   (step_size = lr/(1 − β₁ᵗ), inv_bc2 = 1/√(1 − β₂ᵗ))
//! ```

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::ELEMS_PER_TASK;

/// The numbers of one AdamW step.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub step_size: f32,
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub inv_bc2: f32,
    pub grad_scale: f32,
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    let (b1, b2) = (s.beta1, s.beta2);
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * s.grad_scale;
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        *p = *p * s.decay - s.step_size * *m / (v.sqrt() * s.inv_bc2 + s.eps);
    }
}

/// One AdamW step over whole slices of equal length.
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    p.par_chunks_mut(ELEMS_PER_TASK)
        .zip(g.par_chunks(ELEMS_PER_TASK))
        .zip(m.par_chunks_mut(ELEMS_PER_TASK))
        .zip(v.par_chunks_mut(ELEMS_PER_TASK))
        .for_each(|(((p, g), m), v)| update_chunk(p, g, m, v, s));
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn sum_sq_chunk(x: &[f32]) -> f64 {
    super::math::sum_zip(x, x, |a, b| a * b) as f64
}

/// Σ x², in chunks of fixed size added in order (reproducible whatever the thread count).
pub fn sum_of_squares(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(ELEMS_PER_TASK).map(sum_sq_chunk).collect();
    parts.iter().sum()
}

/// Applies [`adamw_update`] to the storage of `param` in place.
pub fn adamw_update_tensor(
    param: &Tensor,
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamWStep,
) -> Result<()> {
    let op = InPlace {
        g,
        moments: RefCell::new((m, v)),
        step: *s,
    };
    param.inplace_op1(&op)
}

struct InPlace<'a> {
    g: &'a [f32],
    moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
    step: AdamWStep,
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "tinygpt-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let p = super::f32_slice_mut(storage, layout, "adamw")?;
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        if p.len() != self.g.len() || m.len() != p.len() || v.len() != p.len() {
            bail!(
                "adamw: {} parameters, {} gradients, {}/{} moments",
                p.len(),
                self.g.len(),
                m.len(),
                v.len()
            )
        }
        adamw_update(p, self.g, m, v, &self.step);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_formula_elementwise() {
        let n = 40_001; // several chunks and a ragged end
        let s = AdamWStep {
            step_size: 0.01,
            decay: 0.999,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            inv_bc2: 1.3,
            grad_scale: 0.5,
        };
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.07).cos()).collect();
        let m0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.03).sin() * 0.1).collect();
        let v0: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.05).cos().abs() * 0.01)
            .collect();
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        adamw_update(&mut p, &g, &mut m, &mut v, &s);
        for i in 0..n {
            let g = g[i] * 0.5;
            let mm = 0.9 * m0[i] + 0.1 * g;
            let vv = 0.99 * v0[i] + 0.01 * g * g;
            let pp = p0[i] * 0.999 - 0.01 * mm / (vv.sqrt() * 1.3 + 1e-8);
            assert!(
                (m[i] - mm).abs() <= 1e-7 && (v[i] - vv).abs() <= 1e-8,
                "{i}"
            );
            assert!(
                (p[i] - pp).abs() <= 1e-6 * pp.abs().max(1.0),
                "{i}: {} vs {pp}",
                p[i]
            );
        }
        let want: f64 = g.iter().map(|&x| x as f64 * x as f64).sum();
        assert!((sum_of_squares(&g) - want).abs() < 1e-6 * want);
    }
}
