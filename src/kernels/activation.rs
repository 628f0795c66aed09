//! The MLP's nonlinearities on slices, forward and backward: GELU (exact, erf-based), GELU's
//! tanh approximation and ReLU² (max(x, 0)²).

use multiversion::multiversion;
use rayon::prelude::*;

use super::gelu::{
    gelu_backward_from_output, gelu_backward_over_input, gelu_forward, gelu_forward_into,
    gelu_forward_serial_into,
};
use super::{mapped_in_chunks, math, ELEMS_PER_TASK};
use crate::layout::Activation;

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn relu2_chunk(x: &[f32], y: &mut [std::mem::MaybeUninit<f32>]) {
    for (y, &x) in y.iter_mut().zip(x) {
        let m = x.max(0.0);
        y.write(m * m);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_tanh_chunk(x: &[f32], y: &mut [std::mem::MaybeUninit<f32>]) {
    for (y, &x) in y.iter_mut().zip(x) {
        y.write(math::gelu_tanh(x));
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_tanh_backward_chunk(x: &mut [f32], dy: &[f32]) {
    for (x, &dy) in x.iter_mut().zip(dy) {
        *x = dy * math::gelu_tanh_grad(*x);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn relu2_backward_chunk(x: &mut [f32], dy: &[f32]) {
    for (x, &dy) in x.iter_mut().zip(dy) {
        *x = dy * 2.0 * x.max(0.0);
    }
}

impl Activation {
    /// act(x) into a new buffer (not zeroed first).
    pub fn forward(self, x: &[f32]) -> Vec<f32> {
        match self {
            Activation::Gelu => gelu_forward(x),
            // SAFETY: `relu2_chunk` writes every element of its output.
            Activation::Relu2 => unsafe { mapped_in_chunks(x, ELEMS_PER_TASK, relu2_chunk) },
            // SAFETY: `gelu_tanh_chunk` writes every element of its output.
            Activation::GeluTanh => unsafe { mapped_in_chunks(x, ELEMS_PER_TASK, gelu_tanh_chunk) },
        }
    }

    /// y = act(x) over slices of equal length.
    pub fn forward_into(self, x: &[f32], y: &mut [f32]) {
        match self {
            Activation::Gelu => gelu_forward_into(x, y),
            Activation::Relu2 => y
                .par_chunks_mut(ELEMS_PER_TASK)
                .zip(x.par_chunks(ELEMS_PER_TASK))
                // SAFETY: `relu2_chunk` only writes initialised values.
                .for_each(|(y, x)| relu2_chunk(x, unsafe { super::as_uninit(y) })),
            Activation::GeluTanh => y
                .par_chunks_mut(ELEMS_PER_TASK)
                .zip(x.par_chunks(ELEMS_PER_TASK))
                // SAFETY: `gelu_tanh_chunk` only writes initialised values.
                .for_each(|(y, x)| gelu_tanh_chunk(x, unsafe { super::as_uninit(y) })),
        }
    }

    /// y = act(x) on the calling thread (the decoder's single rows).
    pub fn forward_serial_into(self, x: &[f32], y: &mut [f32]) {
        match self {
            Activation::Gelu => gelu_forward_serial_into(x, y),
            // SAFETY: `relu2_chunk` only writes initialised values.
            Activation::Relu2 => relu2_chunk(x, unsafe { super::as_uninit(y) }),
            // SAFETY: `gelu_tanh_chunk` only writes initialised values.
            Activation::GeluTanh => gelu_tanh_chunk(x, unsafe { super::as_uninit(y) }),
        }
    }

    /// x ← dy · act′(x), given y = act(x) from the forward pass, written over the input.
    pub fn backward_from_output(self, x: &mut [f32], y: &[f32], dy: &[f32]) {
        match self {
            Activation::Gelu => gelu_backward_from_output(x, y, dy),
            Activation::Relu2 | Activation::GeluTanh => self.backward_over_input(x, dy),
        }
    }

    /// x ← dy · act′(x), written over the input.
    pub fn backward_over_input(self, x: &mut [f32], dy: &[f32]) {
        match self {
            Activation::Gelu => gelu_backward_over_input(x, dy),
            Activation::Relu2 => x
                .par_chunks_mut(ELEMS_PER_TASK)
                .zip(dy.par_chunks(ELEMS_PER_TASK))
                .for_each(|(x, dy)| relu2_backward_chunk(x, dy)),
            Activation::GeluTanh => x
                .par_chunks_mut(ELEMS_PER_TASK)
                .zip(dy.par_chunks(ELEMS_PER_TASK))
                .for_each(|(x, dy)| gelu_tanh_backward_chunk(x, dy)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu2_and_its_gradient_by_hand() {
        let x = [-2.0f32, -0.0, 0.5, 3.0];
        let a = Activation::Relu2;
        assert_eq!(a.forward(&x), vec![0.0, 0.0, 0.25, 9.0]);
        let mut y = [0.0f32; 4];
        a.forward_serial_into(&x, &mut y);
        assert_eq!(y, [0.0, 0.0, 0.25, 9.0]);
        let mut g = x;
        a.backward_over_input(&mut g, &[1.0, 1.0, 2.0, -1.0]);
        assert_eq!(g, [0.0, 0.0, 2.0, -6.0]);
        let mut g = x;
        a.backward_from_output(&mut g, &y, &[1.0; 4]);
        assert_eq!(g, [0.0, 0.0, 1.0, 6.0]);
    }
}
