//! Inverted dropout whose mask is a pure function of (seed, element index): a counter-based
//! hash decides each element, so the backward pass regenerates the mask instead of storing it
//! (for the 10M-parameter config that saves a mask as large as every dropped activation).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{f32_slice, with_f32, ELEMS_PER_TASK};

/// A well-mixed 32-bit hash of `i` under `seed` (murmur3's finaliser over a Weyl step).
#[inline(always)]
pub fn hash(seed: u64, i: u32) -> u32 {
    let mut h = i.wrapping_mul(0x9E37_79B9) ^ (seed as u32);
    h = (h ^ (h >> 16)).wrapping_mul(0x85EB_CA6B);
    h ^= (seed >> 32) as u32;
    h = (h ^ (h >> 13)).wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// The factor element `i` is multiplied by: 0 with probability `p`, else 1/(1 − p).
#[inline(always)]
pub fn keep_scale(seed: u64, i: u32, threshold: u32, scale: f32) -> f32 {
    if hash(seed, i) >> 8 < threshold {
        0.0
    } else {
        scale
    }
}

/// The 24-bit threshold below which an element is dropped.
pub fn threshold(p: f64) -> u32 {
    (p * (1u32 << 24) as f64).round() as u32
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn apply_chunk(x: &[f32], y: &mut [f32], seed: u64, first: u32, threshold: u32, scale: f32) {
    for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        *y = x * keep_scale(seed, first.wrapping_add(i as u32), threshold, scale);
    }
}

/// y = dropout(x) with `p` and mask `seed` (the mask of [`dropout`]), into `y`. `first` is the
/// number of x's first element: a slice of a larger tensor keeps the mask of its place in it.
pub fn dropout_forward_into(x: &[f32], y: &mut [f32], seed: u64, p: f64, first: usize) {
    let (t, scale) = (threshold(p), (1.0 / (1.0 - p)) as f32);
    y.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .enumerate()
        .for_each(|(c, (y, x))| {
            let first = (first + c * ELEMS_PER_TASK) as u32;
            apply_chunk(x, y, seed, first, t, scale)
        });
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn residual_chunk(out: &mut [f32], x: &[f32], mask: Option<(u64, u32, u32, f32)>) {
    match mask {
        Some((seed, first, threshold, scale)) => {
            for (i, (o, &x)) in out.iter_mut().zip(x).enumerate() {
                *o = x + *o * keep_scale(seed, first.wrapping_add(i as u32), threshold, scale);
            }
        }
        None => {
            for (o, &x) in out.iter_mut().zip(x) {
                *o += x;
            }
        }
    }
}

/// out ← x + dropout(out): a residual connection around a dropped-out branch, in one pass.
/// `mask` is (seed, p, number of out's first element, as in [`dropout_forward_into`]); element
/// i keeps or drops exactly as in [`dropout`] with that seed.
pub fn dropout_add_into(out: &mut [f32], x: &[f32], mask: Option<(u64, f64, usize)>) {
    let mask = mask.map(|(seed, p, first)| (seed, threshold(p), (1.0 / (1.0 - p)) as f32, first));
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .enumerate()
        .for_each(|(c, (o, x))| {
            let mask = mask.map(|(s, t, sc, f)| (s, (f + c * ELEMS_PER_TASK) as u32, t, sc));
            residual_chunk(o, x, mask);
        });
}

/// Dropout with probability `p` and mask seed `seed` on `x` (any shape), with a backward pass.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(DropoutOp { p, seed })
}

struct DropoutOp {
    p: f64,
    seed: u64,
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "tinygpt-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "dropout")?;
        let mut y = vec![0.0f32; x.len()];
        dropout_forward_into(x, &mut y, self.seed, self.p, 0);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let mut dx = vec![0.0f32; x.elem_count()];
        // The same mask scales the gradient: dx = dy · mask / (1 − p).
        with_f32(dy, "dropout backward", |dy| {
            dropout_forward_into(dy, &mut dx, self.seed, self.p, 0)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
