//! y = x·Wᵀ as one custom op whose backward runs both gradient products on [`matmul`]:
//! dx = dy·W and dW = dyᵀ·x, written straight into contiguous buffers (candle's own matmul
//! backward goes through transposed views and a half-idle thread pool).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::matmul::{matmul, MatMut, MatRef};
use super::{f32_slice, with_f32, written_buffer};

struct LinearOp;

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
        let (rows, d_in, out) = dims(xl, wl)?;
        let x = f32_slice(xs, xl, "linear")?;
        let w = f32_slice(ws, wl, "linear")?;
        // SAFETY: the buffers have exactly the sizes the strides address, and the product
        // writes every element of y.
        let y = written_buffer(rows * out, |y| unsafe {
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
        });
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
        let rows = x.elem_count() / d_in;
        let (dx, dw) = with_f32(dy, "linear backward", |dy| {
            with_f32(w, "linear backward", |w| {
                with_f32(x, "linear backward", |x| {
                    // SAFETY: as in the forward pass.
                    // dx (rows, in) = dy (rows, out) · W (out, in)
                    let dx = written_buffer(rows * d_in, |dx| unsafe {
                        matmul(
                            rows,
                            d_in,
                            out,
                            MatMut::raw(dx, d_in),
                            false,
                            MatRef::row_major(dy, out),
                            MatRef::row_major(w, d_in),
                            1.0,
                        )
                    });
                    // dW (out, in) = dyᵀ (out, rows) · x (rows, in)
                    let dw = written_buffer(out * d_in, |dw| unsafe {
                        matmul(
                            out,
                            d_in,
                            rows,
                            MatMut::raw(dw, d_in),
                            false,
                            MatRef::transposed(dy, out),
                            MatRef::row_major(x, d_in),
                            1.0,
                        )
                    });
                    (dx, dw)
                })
            })
        })???;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}
