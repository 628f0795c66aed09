//! Causal multi-head attention as one op: from the packed projections `qkv` `(B, T, 3C)`
//! (Q | K | V side by side, head h in columns h·hs..(h+1)·hs of each) straight to the heads'
//! outputs side by side, `(B, T, C)`:
//!
//! ```text
//! for each (b, h):  S = Q·Kᵀ/√hs,  P = softmax(S + M) row by row,  Y = dropout(P)·V
//! ```
//!
//! One rayon task per (batch, head). The products run on `gemm` with strides that read the
//! heads in place (no split, transpose or `contiguous()` copies). All six products (S, P̃·V
//! and the four of the backward pass) run in row blocks whose sums stop at the diagonal, or
//! start from it, so the masked triangle is mostly never computed, and the mask never exists
//! as a tensor. As an op, P is not stored: the backward pass
//! recomputes it from Q and K (the memory of a `(B, n_head, T, T)` tensor per layer is worth
//! more than one more Q·Kᵀ on large models). The block op keeps it when it is small
//! ([`attention_forward_keeping`]). Dropout on P uses the counter-based mask of [`super::dropout`],
//! regenerated in backward.
//!
//! Backward, with P̃ = dropout(P) and dY the output gradient:
//! ```text
//! dV = P̃ᵀ·dY,  dP = (dY·Vᵀ) ∘ mask,  dS = P ∘ (dP − rowsum(P ∘ dP)) / √hs,
//! dQ = dS·K,   dK = dSᵀ·Q
//! ```

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::dropout::{keep_scale, threshold};
use super::matmul::{matmul_serial, MatMut, MatRef};
use super::{f32_slice, math, with_f32, written_buffer};

/// The row blocks [r0, r1) of the triangular products (S, dP, and those by P̃, dS and their
/// transposes), whose sums stop at (or start from) the block's diagonal. Smaller blocks skip
/// more of the masked triangle but give `gemm` thinner shapes; 32 rows up to T = 64 and 64
/// beyond were the fastest (dev/PERFORMANCE.md).
fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    let rows = if t <= 64 { 32 } else { 64 };
    (0..t).step_by(rows).map(move |r0| (r0, (r0 + rows).min(t)))
}

/// Dropout on the attention weights: probability and mask seed.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDropout {
    pub p: f64,
    pub seed: u64,
}

/// softmax(Q·Kᵀ/√hs + M)·V for every head of `qkv` `(B, T, 3C)` → `(B, T, C)`, with a
/// backward pass. `dropout` applies to the attention weights (training only).
pub fn causal_attention(
    qkv: &Tensor,
    n_head: usize,
    dropout: Option<AttentionDropout>,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(AttentionOp {
        n_head,
        dropout: dropout.filter(|d| d.p > 0.0),
    })
}

struct AttentionOp {
    n_head: usize,
    dropout: Option<AttentionDropout>,
}

/// Sizes of one attention call.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    /// The index of the first of the `b` sequences in the whole batch (not 0 when this is a
    /// part of it): dropout masks number their elements over the whole batch.
    pub(crate) b0: usize,
    pub(crate) t: usize,
    pub(crate) c: usize,
    pub(crate) hs: usize,
    pub(crate) n_head: usize,
}

impl Dims {
    /// `b` sequences of `t` tokens, width `c` split into `n_head` heads (`c % n_head == 0`).
    pub(crate) fn from_sizes(b: usize, t: usize, c: usize, n_head: usize) -> Dims {
        Dims {
            b,
            b0: 0,
            t,
            c,
            hs: c / n_head,
            n_head,
        }
    }

    fn new(shape: &Shape, n_head: usize) -> Result<Dims> {
        let (b, t, c3) = shape.dims3()?;
        if c3 % 3 != 0 || n_head == 0 || (c3 / 3) % n_head != 0 {
            bail!("causal_attention: width {c3} is not 3 × a multiple of {n_head} heads")
        }
        let c = c3 / 3;
        Ok(Dims::from_sizes(b, t, c, n_head))
    }

    /// Q, Kᵀ and V of head `h` of batch `b`, read in place from `qkv`.
    fn qkv(&self, qkv: *const f32, b: usize, h: usize) -> (MatRef, MatRef, MatRef) {
        let c3 = 3 * self.c as isize;
        let base = qkv.wrapping_add(b * self.t * 3 * self.c + h * self.hs);
        (
            MatRef {
                ptr: base,
                rs: c3,
                cs: 1,
            },
            MatRef {
                ptr: base.wrapping_add(self.c),
                rs: 1,
                cs: c3,
            },
            MatRef {
                ptr: base.wrapping_add(2 * self.c),
                rs: c3,
                cs: 1,
            },
        )
    }
}

/// S = scale·Q·Kᵀ in row blocks that stop at the diagonal, then P = causal softmax of each row
/// in place (zero after the diagonal).
///
/// # Safety
/// `q`, `kt` must address a (T, hs) and a (hs, T) matrix.
unsafe fn scores_to_probs(d: &Dims, q: MatRef, kt: MatRef, scale: f32, p: &mut [f32]) {
    lower_product(d, q, 3 * d.c, kt, scale, p);
    softmax_causal(p, d.t);
}

/// out (T, T) = scale · A·Bᵀ for A (T, hs) with rows `a_rs` apart and `bt` = Bᵀ (hs, T),
/// computed in row blocks whose columns stop at the block's last row: the entries after the
/// diagonal are mostly never computed (those left inside a block are garbage for the caller to
/// mask).
///
/// # Safety
/// `a`, `bt` must address a (T, hs) and a (hs, T) matrix.
unsafe fn lower_product(d: &Dims, a: MatRef, a_rs: usize, bt: MatRef, scale: f32, out: &mut [f32]) {
    let t = d.t;
    for (r0, r1) in row_blocks(t) {
        matmul_serial(
            r1 - r0,
            r1,
            d.hs,
            MatMut::row_major(&mut out[r0 * t..], t),
            false,
            a.skip(r0 * a_rs),
            bt,
            scale,
        );
    }
}

/// Where a (T, T) factor of a product is zero by the causal mask.
#[derive(Clone, Copy)]
enum Zero {
    /// After its diagonal: P, P̃ and dS.
    AfterDiagonal,
    /// Before its diagonal: their transposes.
    BeforeDiagonal,
}

/// out (T, n) = A·B for a (T, T) `a` that is zero on the `zero` side of its diagonal and a
/// (T, n) `b`. Row block [r0, r1) of the output sums only over the columns of A that are not
/// zero in every row of the block: 0..r1 when A is zero after the diagonal, r0..T when before.
///
/// # Safety
/// `a`, `b` and `out` must address a (T, T), a (T, n) and a writable (T, n) matrix.
unsafe fn triangular_times(zero: Zero, t: usize, n: usize, a: MatRef, b: MatRef, out: MatMut) {
    for (r0, r1) in row_blocks(t) {
        let (k0, k1) = match zero {
            Zero::AfterDiagonal => (0, r1),
            Zero::BeforeDiagonal => (r0, t),
        };
        matmul_serial(
            r1 - r0,
            n,
            k1 - k0,
            out.offset(r0, 0),
            false,
            a.offset(r0, k0),
            b.offset(k0, 0),
            1.0,
        );
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn softmax_causal(p: &mut [f32], t: usize) {
    for (i, row) in p.chunks_exact_mut(t).enumerate() {
        let (live, masked) = row.split_at_mut(i + 1);
        let m = math::max(live);
        for x in live.iter_mut() {
            *x = math::exp(*x - m);
        }
        let inv = 1.0 / math::sum(live);
        for x in live.iter_mut() {
            *x *= inv;
        }
        masked.fill(0.0);
    }
}

/// dst = src ∘ dropout mask, row i's mask elements numbered from `first + i·t`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn drop_rows(src: &[f32], dst: &mut [f32], t: usize, seed: u64, first: u32, thr: u32, scale: f32) {
    for (i, (s, d)) in src.chunks_exact(t).zip(dst.chunks_exact_mut(t)).enumerate() {
        let row_first = first.wrapping_add((i * t) as u32);
        for (j, (s, d)) in s.iter().zip(d.iter_mut()).enumerate() {
            *d = s * keep_scale(seed, row_first.wrapping_add(j as u32), thr, scale);
        }
    }
}

/// dS = scale · P ∘ (dP − rowsum(P ∘ dP)), in place of dP, zero after the diagonal.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn softmax_backward(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
    for (i, (p, dp)) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)).enumerate() {
        let n = i + 1;
        let dot = math::sum_zip(&p[..n], &dp[..n], |a, b| a * b);
        for (d, &p) in dp[..n].iter_mut().zip(&p[..n]) {
            *d = scale * p * (*d - dot);
        }
        dp[n..].fill(0.0);
    }
}

/// Seed, first element number, threshold and scale of the dropout mask of head `h` of batch
/// `b` (the weights of all (b, h) numbered one after the other).
fn mask_of(
    dropout: Option<AttentionDropout>,
    d: &Dims,
    b: usize,
    h: usize,
) -> Option<(u64, u32, u32, f32)> {
    dropout.map(|dr| {
        let first = (((d.b0 + b) * d.n_head + h) * d.t * d.t) as u32;
        (dr.seed, first, threshold(dr.p), (1.0 / (1.0 - dr.p)) as f32)
    })
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "tinygpt-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(l.shape(), self.n_head)?;
        let qkv = f32_slice(s, l, "causal_attention")?;
        let y = attention_forward(&d, qkv, self.dropout);
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.t, d.c))))
    }

    fn bwd(&self, qkv: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let d = Dims::new(qkv.shape(), self.n_head)?;
        let dqkv = with_f32(qkv, "causal_attention backward", |qkv| {
            with_f32(dy, "causal_attention backward", |dy| {
                attention_backward(&d, qkv, dy, self.dropout, None)
            })
        })??;
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
    }
}

/// The forward pass on slices: `qkv` `(B, T, 3C)` → `(B, T, C)`.
pub(crate) fn attention_forward(
    d: &Dims,
    qkv: &[f32],
    dropout: Option<AttentionDropout>,
) -> Vec<f32> {
    attention_forward_keeping(d, qkv, dropout, false).0
}

/// [`attention_forward`], and with `keep`, the attention weights P `(B, n_head, T, T)` (before
/// dropout) for [`attention_backward`], which then need not recompute them.
pub(crate) fn attention_forward_keeping(
    d: &Dims,
    qkv: &[f32],
    dropout: Option<AttentionDropout>,
    keep: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let scale = 1.0 / (d.hs as f32).sqrt();
    let qkv_ptr = qkv.as_ptr() as usize;
    let tt = d.t * d.t;
    let mut probs = keep.then(|| vec![0.0f32; d.b * d.n_head * tt]);
    let probs_ptr = probs.as_mut().map(|p| p.as_mut_ptr() as usize);
    // Every (b, h) task writes all T rows of its hs columns: together, all of y.
    let y = written_buffer(d.b * d.t * d.c, |y| {
        let y_all = MatMut::raw(y, d.c);
        (0..d.b * d.n_head).into_par_iter().for_each(|task| {
            let (b, h) = (task / d.n_head, task % d.n_head);
            let (q, kt, v) = d.qkv(qkv_ptr as *const f32, b, h);
            let mut own = Vec::new();
            let p: &mut [f32] = match probs_ptr {
                // SAFETY: task `task` alone uses block `task` of the kept weights.
                Some(all) => unsafe {
                    std::slice::from_raw_parts_mut((all as *mut f32).add(task * tt), tt)
                },
                None => {
                    own.resize(tt, 0.0);
                    &mut own
                }
            };
            // SAFETY: q, kt, v address head h of batch b inside `qkv`; each task writes its
            // own (b, h) columns of `y`.
            unsafe {
                scores_to_probs(d, q, kt, scale, p);
                let dropped = mask_of(dropout, d, b, h).map(|(seed, first, thr, sc)| {
                    let mut pd = vec![0.0f32; tt];
                    drop_rows(p, &mut pd, d.t, seed, first, thr, sc);
                    pd
                });
                let pd = dropped.as_deref().unwrap_or(p);
                let y_bh = y_all.skip(b * d.t * d.c + h * d.hs);
                triangular_times(
                    Zero::AfterDiagonal,
                    d.t,
                    d.hs,
                    MatRef::row_major(pd, d.t),
                    v,
                    y_bh,
                );
            }
        });
    });
    (y, probs)
}

/// The backward pass on slices: `qkv` `(B, T, 3C)` and `dy` `(B, T, C)` → `dqkv` `(B, T, 3C)`.
/// `probs`: the attention weights kept by [`attention_forward_keeping`]; recomputed when `None`.
pub(crate) fn attention_backward(
    d: &Dims,
    qkv: &[f32],
    dy: &[f32],
    dropout: Option<AttentionDropout>,
    probs: Option<&[f32]>,
) -> Vec<f32> {
    let d = *d;
    let scale = 1.0 / (d.hs as f32).sqrt();
    // Every (b, h) task writes all T rows of its columns of dQ, dK and dV.
    written_buffer(d.b * d.t * 3 * d.c, |out| {
        let d_all = MatMut::raw(out, 3 * d.c);
        let (qkv_ptr, dy_ptr) = (qkv.as_ptr() as usize, dy.as_ptr() as usize);
        // dP's buffer is reused from task to task: every task overwrites all of it.
        let tt = d.t;
        let new_dp = || vec![0.0f32; tt * tt];
        (0..d.b * d.n_head)
            .into_par_iter()
            .for_each_init(new_dp, |dp, task| {
                let (b, h) = (task / d.n_head, task % d.n_head);
                let (q, kt, v) = d.qkv(qkv_ptr as *const f32, b, h);
                let k = MatRef {
                    rs: kt.cs,
                    cs: 1,
                    ..kt
                };
                let vt = MatRef {
                    rs: 1,
                    cs: v.rs,
                    ..v
                };
                let dy_bh = MatRef {
                    ptr: (dy_ptr as *const f32).wrapping_add(b * d.t * d.c + h * d.hs),
                    rs: d.c as isize,
                    cs: 1,
                };
                let at = |part: usize| d_all.skip(b * d.t * 3 * d.c + part * d.c + h * d.hs);
                let mut own = Vec::new();
                let p: &[f32] = match probs {
                    Some(all) => &all[task * tt * tt..(task + 1) * tt * tt],
                    None => {
                        own.resize(tt * tt, 0.0);
                        // SAFETY: q and kt address head h of batch b inside `qkv`.
                        unsafe { scores_to_probs(&d, q, kt, scale, &mut own) };
                        &own
                    }
                };
                // SAFETY: as in the forward pass; each task writes its own (b, h) columns
                // of the Q, K and V parts of dqkv.
                unsafe {
                    let mask = mask_of(dropout, &d, b, h);
                    let dropped = mask.map(|(seed, first, thr, sc)| {
                        let mut pd = vec![0.0f32; tt * tt];
                        drop_rows(p, &mut pd, tt, seed, first, thr, sc);
                        pd
                    });
                    let pd = dropped.as_deref().unwrap_or(p);
                    // dV = P̃ᵀ·dY
                    triangular_times(
                        Zero::BeforeDiagonal,
                        tt,
                        d.hs,
                        MatRef::transposed(pd, tt),
                        dy_bh,
                        at(2),
                    );
                    // dP̃ = dY·Vᵀ, row blocks up to the diagonal
                    lower_product(&d, dy_bh, d.c, vt, 1.0, dp);
                    if let Some((seed, first, thr, sc)) = mask {
                        let src = dp.clone();
                        drop_rows(&src, dp, tt, seed, first, thr, sc);
                    }
                    softmax_backward(p, dp, tt, scale);
                    // dQ = dS·K, dK = dSᵀ·Q
                    triangular_times(
                        Zero::AfterDiagonal,
                        tt,
                        d.hs,
                        MatRef::row_major(dp, tt),
                        k,
                        at(0),
                    );
                    triangular_times(
                        Zero::BeforeDiagonal,
                        tt,
                        d.hs,
                        MatRef::transposed(dp, tt),
                        q,
                        at(1),
                    );
                }
            });
    })
}
/// One head's attention for the newest query over `n` cached positions.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
pub fn attend_one(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    y: &mut [f32],
) {
    let hs = q.len();
    for (j, s) in scores[..n].iter_mut().enumerate() {
        *s = math::sum_zip(q, &keys[j * stride..j * stride + hs], |a, b| a * b) * scale;
    }
    let m = math::max(&scores[..n]);
    let mut total = 0.0;
    for s in scores[..n].iter_mut() {
        *s = math::exp(*s - m);
        total += *s;
    }
    y.fill(0.0);
    for (j, &p) in scores[..n].iter().enumerate() {
        let p = p / total;
        for (y, &v) in y.iter_mut().zip(&values[j * stride..j * stride + hs]) {
            *y += p * v;
        }
    }
}
