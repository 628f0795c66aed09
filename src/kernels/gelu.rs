//! GELU (exact, erf-based: x·Φ(x)) and its derivative Φ(x) + x·φ(x), elementwise.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{as_uninit, f32_slice, mapped_in_chunks, math, with_f32, ELEMS_PER_TASK};

/// y = GELU(x) on the calling thread ([`forward_chunk`]).
pub(crate) fn gelu_forward_serial_into(x: &[f32], y: &mut [f32]) {
    // SAFETY: `forward_chunk` only ever writes initialised values.
    forward_chunk(x, unsafe { as_uninit(y) });
}

/// y = GELU(x) on the calling thread, into memory that need not be initialised.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward_chunk(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    for (y, &x) in y.iter_mut().zip(x) {
        y.write(math::gelu(x));
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_chunk(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        *dx = dy * math::gelu_grad(x);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_chunk_over_input(x: &mut [f32], dy: &[f32]) {
    for (x, &dy) in x.iter_mut().zip(dy) {
        *x = dy * math::gelu_grad(*x);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_chunk_from_output(x: &mut [f32], y: &[f32], dy: &[f32]) {
    for ((x, &y), &dy) in x.iter_mut().zip(y).zip(dy) {
        *x = dy * math::gelu_grad_from_output(*x, y);
    }
}

/// x ← dy · GELU′(x) given y = GELU(x) from the forward pass (half the arithmetic of
/// [`gelu_backward_over_input`]), written over the input.
pub fn gelu_backward_from_output(x: &mut [f32], y: &[f32], dy: &[f32]) {
    x.par_chunks_mut(ELEMS_PER_TASK)
        .zip(y.par_chunks(ELEMS_PER_TASK))
        .zip(dy.par_chunks(ELEMS_PER_TASK))
        .for_each(|((x, y), dy)| backward_chunk_from_output(x, y, dy));
}

/// x ← dy · GELU′(x): the backward pass written over the input, which is not needed after.
pub fn gelu_backward_over_input(x: &mut [f32], dy: &[f32]) {
    x.par_chunks_mut(ELEMS_PER_TASK)
        .zip(dy.par_chunks(ELEMS_PER_TASK))
        .for_each(|(x, dy)| backward_chunk_over_input(x, dy));
}

/// GELU of every element of `x` (any shape), with a backward pass.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluOp)
}

/// y = GELU(x) over slices of equal length.
pub fn gelu_forward_into(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .for_each(|(y, x)| gelu_forward_serial_into(x, y));
}

/// GELU(x) in a new buffer, written once (not zeroed first: for the MLP's 4C-wide
/// activations, zeroing was most of the memory traffic of the GELU).
pub fn gelu_forward(x: &[f32]) -> Vec<f32> {
    // SAFETY: `forward_chunk` writes every element of its output.
    unsafe { mapped_in_chunks(x, ELEMS_PER_TASK, forward_chunk) }
}

/// dx = dy · GELU′(x) over slices of equal length.
pub fn gelu_backward_into(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .zip(dy.par_chunks(ELEMS_PER_TASK))
        .for_each(|((dx, x), dy)| backward_chunk(x, dy, dx));
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "tinygpt-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        Ok((CpuStorage::F32(gelu_forward(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let mut dx = vec![0.0f32; x.elem_count()];
        with_f32(x, "gelu backward", |x| {
            with_f32(dy, "gelu backward", |dy| gelu_backward_into(x, dy, &mut dx))
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_equals_gelu_bit_for_bit() {
        // A ragged chunk; zero, tiny values and both tails.
        let x: Vec<f32> = (0..817)
            .map(|i| (i as f32 - 400.0) * 0.037)
            .chain([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0])
            .collect();
        let mut y = vec![f32::NAN; x.len()];
        gelu_forward_serial_into(&x, &mut y);
        for (&x, &y) in x.iter().zip(&y) {
            assert_eq!(y.to_bits(), math::gelu(x).to_bits(), "GELU({x})");
        }
        // A new buffer over several tasks' chunks: every element written, and the same.
        let x: Vec<f32> = (0..2 * ELEMS_PER_TASK + 37)
            .map(|i| ((i * 7919 % 10007) as f32 / 10007.0 - 0.5) * 16.0)
            .collect();
        let y = gelu_forward(&x);
        assert_eq!(y.len(), x.len());
        for (&x, &y) in x.iter().zip(&y) {
            assert_eq!(y.to_bits(), math::gelu(x).to_bits(), "GELU({x})");
        }
    }
}
