//! The dtype of the model's matrix products, PyTorch's `torch.autocast` for candle: inside
//! [`autocast`]`(Precision::Bf16, …)` every product of the forward pass ([`matmul`]) rounds
//! its two operands to bf16 and returns f32, while the weights, the normalisations, the
//! softmax and the loss stay f32. The weights themselves (the master copy the optimizer
//! updates) are never rounded; their gradients flow back through the casts in f32.
//!
//! A scope rather than a field of every layer: the precision belongs to a run, not to the
//! model's weights, and one model can run under either (as a checkpoint trained in bf16 is
//! evaluated in f32).

use std::cell::Cell;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// The dtype of matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the CPU's; the reference for tests).
    #[default]
    F32,
    /// f32, with a GPU's products on TF32 tensor cores (10 bits of mantissa: PyTorch's
    /// `allow_tf32`); the same as `f32` on the CPU.
    Tf32,
    /// bf16 operands, f32 results: a GPU's tensor cores at twice f32's (TF32's) rate.
    Bf16,
}

impl Precision {
    /// `f32` or `bf16`, as configs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
}

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `f` with matrix products in `precision` on this thread, then restores the previous one.
pub fn autocast<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(precision)));
    f()
}

/// The precision of matrix products on this thread.
pub fn current() -> Precision {
    CURRENT.with(|c| c.get())
}

/// `a · b` (candle's batched matmul) in the current precision: f32 operands and result in
/// any case. (TF32 is a switch of candle's CUDA backend, set for the whole process by
/// [`set_tf32`].)
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    match current() {
        Precision::F32 | Precision::Tf32 => a.matmul(b),
        Precision::Bf16 => a
            .to_dtype(DType::BF16)?
            .matmul(&b.to_dtype(DType::BF16)?)?
            .to_dtype(DType::F32),
    }
}

/// Lets a GPU's f32 products run on TF32 tensor cores (`on`), or keeps them exact. candle
/// has one switch for the whole process; without the CUDA feature it does nothing.
pub fn set_tf32(on: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bf16_rounds_the_operands_and_returns_f32() {
        let dev = Device::Cpu;
        // 1 + 2⁻¹⁰ is exact in f32 but rounds to 1 in bf16 (8 bits of mantissa).
        let a = Tensor::new(&[[1.0f32 + 1.0 / 1024.0, 2.0]], &dev).unwrap();
        let b = Tensor::new(&[[1.0f32], [0.5]], &dev).unwrap();
        let f32 = matmul(&a, &b).unwrap();
        let bf16 = autocast(Precision::Bf16, || matmul(&a, &b)).unwrap();
        assert_eq!(bf16.dtype(), DType::F32);
        assert_eq!(f32.to_vec2::<f32>().unwrap(), [[2.0 + 1.0 / 1024.0]]);
        assert_eq!(bf16.to_vec2::<f32>().unwrap(), [[2.0]]);
        assert_eq!(current(), Precision::F32, "the scope restores f32");
    }

    #[test]
    fn gradients_flow_back_through_the_casts_in_f32() {
        let dev = Device::Cpu;
        let w = candle_core::Var::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();
        let x = Tensor::new(&[[1.0f32, 3.0]], &dev).unwrap();
        let y = autocast(Precision::Bf16, || matmul(&x, w.as_tensor())).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(w.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::F32);
        // d(Σ x·W)/dW[i][j] = x[i]
        assert_eq!(g.to_vec2::<f32>().unwrap(), [[1.0, 1.0], [3.0, 3.0]]);
    }
}
