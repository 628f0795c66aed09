//! Mean cross-entropy of logits `(N, V)` against target ids `(N)`, with the softmax, the log
//! and the gather done in one pass per row (log-sum-exp with the row max subtracted, so huge
//! logits do not overflow). Backward: d logits = (softmax − onehot(target)) · dL / N.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{f32_slice, math, rows_per_task, with_f32};

/// log Σ exp(row), stably.
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let m = math::max(row);
    let mut acc = [0.0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += math::exp(c[i] - m);
        }
    }
    let mut s = 0.0;
    for &r in chunks.remainder() {
        s += math::exp(r - m);
    }
    m + (acc.iter().sum::<f32>() + s).ln()
}

/// Σ over the rows of −log softmax(row)[target], in f64.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn loss_rows(logits: &[f32], targets: &[u32], v: usize) -> f64 {
    logits
        .chunks_exact(v)
        .zip(targets)
        .map(|(row, &t)| (log_sum_exp(row) - row[t as usize]) as f64)
        .sum()
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn grad_rows(logits: &[f32], targets: &[u32], v: usize, scale: f32, d: &mut [f32]) {
    for ((row, &t), d) in logits
        .chunks_exact(v)
        .zip(targets)
        .zip(d.chunks_exact_mut(v))
    {
        let lse = log_sum_exp(row);
        for (d, &x) in d.iter_mut().zip(row) {
            *d = math::exp(x - lse) * scale;
        }
        d[t as usize] -= scale;
    }
}

fn check_targets(targets: &[u32], v: usize) -> Result<()> {
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("cross_entropy: target id {bad} is outside the vocabulary of {v}")
    }
    Ok(())
}

/// Mean over rows of −log softmax(logits)[target]: a scalar tensor.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropyOp)
}

struct CrossEntropyOp;

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        bail!("cross_entropy: targets must be u32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("cross_entropy: targets must be contiguous")
    };
    Ok(&v[a..b])
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "tinygpt-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = ll.shape().dims2()?;
        let logits = f32_slice(ls, ll, "cross_entropy")?;
        let targets = u32_slice(ts, tl)?;
        if targets.len() != n {
            bail!("cross_entropy: {} targets for {n} rows", targets.len())
        }
        check_targets(targets, v)?;
        let rows = rows_per_task(v);
        let partial: Vec<f64> = logits
            .par_chunks(rows * v)
            .zip(targets.par_chunks(rows))
            .map(|(l, t)| loss_rows(l, t, v))
            .collect();
        let loss = partial.iter().sum::<f64>() / n.max(1) as f64;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = logits.dims2()?;
        let scale = dloss
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?
            / n.max(1) as f32;
        let targets = targets.to_vec1::<u32>()?;
        let mut d = vec![0.0f32; n * v];
        with_f32(logits, "cross_entropy backward", |l| {
            let rows = rows_per_task(v);
            d.par_chunks_mut(rows * v)
                .zip(l.par_chunks(rows * v))
                .zip(targets.par_chunks(rows))
                .for_each(|((d, l), t)| grad_rows(l, t, v, scale, d));
        })?;
        Ok((Some(Tensor::from_vec(d, (n, v), logits.device())?), None))
    }
}
