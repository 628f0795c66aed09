//! y = x·Wᵀ as one custom op whose backward runs both gradient products on [`matmul`]:
//! dx = dy·W and dW = dyᵀ·x, written straight into contiguous buffers (candle's own matmul
//! backward goes through transposed views and a half-idle thread pool).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::matmul::{matmul, MatMut, MatRef};
use super::{f32_slice, with_f32, written_buffer};

struct LinearOp;

/// y `(rows, out)` = x `(rows, in)` · Wᵀ into `y`.
///
/// # Safety
/// `y` must address `rows · out` writable floats (they may be uninitialised).
unsafe fn linear_forward_ptr(x: &[f32], d_in: usize, w: &[f32], y: *mut f32) {
    let (rows, out) = (x.len() / d_in, w.len() / d_in);
    matmul(
        rows,
        out,
        d_in,
        MatMut::raw(y, out),
        false,
        MatRef::row_major(x, d_in),
        MatRef::transposed(w, d_in),
        1.0,
    )
}

/// [`linear_forward`] written into `y` `(rows, out)`.
pub(crate) fn linear_forward_into(x: &[f32], d_in: usize, w: &[f32], y: &mut [f32]) {
    let (rows, out) = (x.len() / d_in, w.len() / d_in);
    assert_eq!(
        y.len(),
        rows * out,
        "linear_forward_into: output of the wrong size"
    );
    // SAFETY: y holds rows·out floats.
    unsafe { linear_forward_ptr(x, d_in, w, y.as_mut_ptr()) }
}

/// y `(rows, out)` = x `(rows, in)` · Wᵀ for W `(out, in)` (PyTorch's layout).
pub(crate) fn linear_forward(x: &[f32], d_in: usize, w: &[f32]) -> Vec<f32> {
    let (rows, out) = (x.len() / d_in, w.len() / d_in);
    // SAFETY: the buffer has rows·out elements, all written by the product.
    written_buffer(rows * out, |y| unsafe { linear_forward_ptr(x, d_in, w, y) })
}

/// `(m, n)` = aᵀ · b for a `(rows, m)` and b `(rows, n)`, both row-major: a weight's
/// gradient from its output's gradient and its input.
pub(crate) fn linear_backward_weight(a: &[f32], m: usize, b: &[f32], n: usize) -> Vec<f32> {
    let rows = a.len() / m;
    // SAFETY: the sizes match the slices; the product writes all m·n elements.
    written_buffer(m * n, |dst| unsafe {
        matmul(
            m,
            n,
            rows,
            MatMut::raw(dst, n),
            false,
            MatRef::transposed(a, m),
            MatRef::row_major(b, n),
            1.0,
        )
    })
}

/// `(rows, n)` = a `(rows, k)` · w `(k, n)` into `dst`: an input's gradient through a weight.
///
/// # Safety
/// `dst` must address `rows · n` writable floats (they may be uninitialised).
unsafe fn linear_backward_input_ptr(a: &[f32], k: usize, w: &[f32], n: usize, dst: *mut f32) {
    matmul(
        a.len() / k,
        n,
        k,
        MatMut::raw(dst, n),
        false,
        MatRef::row_major(a, k),
        MatRef::row_major(w, n),
        1.0,
    )
}

/// `(rows, n)` = a `(rows, k)` · w `(k, n)`: an input's gradient through a weight.
pub(crate) fn linear_backward_input(a: &[f32], k: usize, w: &[f32], n: usize) -> Vec<f32> {
    // SAFETY: the buffer has rows · n elements, all written by the product.
    written_buffer(a.len() / k * n, |dst| unsafe {
        linear_backward_input_ptr(a, k, w, n, dst)
    })
}

/// [`linear_backward_input`] written over `dst`, a buffer that is no longer needed.
pub(crate) fn linear_backward_input_into(
    a: &[f32],
    k: usize,
    w: &[f32],
    n: usize,
    dst: &mut [f32],
) {
    assert_eq!(
        dst.len(),
        a.len() / k * n,
        "linear_backward_input_into: destination of the wrong size"
    );
    // SAFETY: dst has exactly rows · n elements (checked above).
    unsafe { linear_backward_input_ptr(a, k, w, n, dst.as_mut_ptr()) }
}

/// `x` `(…, in)` · `w`ᵀ with `w` `(out, in)` → `(…, out)`. No bias: the caller adds it.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp)
}

fn dims(x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
    let (out, d_in) = w.shape().dims2()?;
    let xd = x.shape().dims();
    if xd.last() != Some(&d_in) {
        bail!("linear: input {:?} does not end in {d_in}", xd)
    }
    Ok((x.shape().elem_count() / d_in, d_in, out))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "tinygpt-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, d_in, out) = dims(xl, wl)?;
        let x = f32_slice(xs, xl, "linear")?;
        let w = f32_slice(ws, wl, "linear")?;
        let y = linear_forward(x, d_in, w);
        let mut shape = xl.shape().dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, d_in) = w.dims2()?;
        let (dx, dw) = with_f32(dy, "linear backward", |dy| {
            with_f32(w, "linear backward", |w| {
                with_f32(x, "linear backward", |x| {
                    // dx (rows, in) = dy (rows, out) · W (out, in)
                    let dx = linear_backward_input(dy, out, w, d_in);
                    // dW (out, in) = dyᵀ (out, rows) · x (rows, in)
                    (dx, linear_backward_weight(dy, out, x, d_in))
                })
            })
        })???;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}
