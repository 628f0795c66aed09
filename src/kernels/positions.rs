//! x + positions: the position embeddings `(T, C)` added to every sequence of the token
//! embeddings `(B, T, C)`, with a backward pass whose position gradient Σ_b dy is one
//! vectorised pass over dy (candle's `broadcast_add` sums it with a strided reduction that
//! runs one element at a time, on one core).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, with_f32};

struct AddPositions;

/// `x` `(B, T, C)` + `pos` `(T, C)` on every sequence.
pub fn add_positions(x: &Tensor, pos: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&pos.contiguous()?, AddPositions)
}

/// The elements of one sequence, checking that `pos` is `(T, C)` for `x` `(B, T, C)`.
fn sequence_len(x: &Shape, pos: &Shape) -> Result<usize> {
    let (_, t, c) = x.dims3()?;
    if pos.dims() != [t, c] {
        bail!("add_positions: positions {pos:?} do not fit tokens {x:?}")
    }
    Ok(t * c)
}

impl CustomOp2 for AddPositions {
    fn name(&self) -> &'static str {
        "tinygpt-add-positions"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = sequence_len(xl.shape(), pl.shape())?;
        let x = f32_slice(xs, xl, "add_positions")?;
        let p = f32_slice(ps, pl, "add_positions")?;
        let mut y = x.to_vec();
        y.par_chunks_mut(n).for_each(|seq| {
            seq.iter_mut().zip(p).for_each(|(y, p)| *y += p);
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        pos: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = sequence_len(dy.shape(), pos.shape())?;
        // Σ over the sequences, in order (the same sum whatever the thread count).
        let dpos = with_f32(dy, "add_positions backward", |dy| {
            let mut sum = vec![0.0f32; n];
            for seq in dy.chunks_exact(n) {
                sum.iter_mut().zip(seq).for_each(|(s, d)| *s += d);
            }
            sum
        })?;
        let dpos = Tensor::from_vec(dpos, pos.shape(), pos.device())?;
        Ok((Some(dy.clone()), Some(dpos)))
    }
}
