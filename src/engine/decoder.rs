//! Incremental decoding of one sequence on plain slices: the fused path's KV cache.
//!
//! Generating a token needs one row of every layer: at B = 1, T = 1 each candle op costs more
//! to dispatch than to compute, and the composed KV cache concatenates its tensors at every
//! step. The decoder copies the weights out once (W_Q, W_K, W_V stacked as one `(3C, C)`
//! matrix), keeps each layer's keys and values in preallocated `(block_size, C)` buffers, and
//! runs a token through the same math as the model's `forward_cached`:
//!
//! ```text
//! x = wte[token] + wpe[pos] (+ bigram[prev, token])   (no wpe with rotary embeddings)
//! per block:  q|k|v = W_qkv·LN₁(x);  q, k turned by pos (rotary);  cache k, v at pos;  per head: p = softmax(q·Kᵀ/√hs), y = p·V
//!             x += W_proj·y (+b);  x += W_fc2·act(W_fc·LN₂(x) (+b)) (+b)
//! logits = head · LN_f(x)                      (head = wte when tied; then soft-capped)
//! ```
//!
//! A feed of several tokens (a prompt, or the window after the cache restarts) runs them as
//! rows of one pass, each layer's matrices read once for all of them. Decoding one token is
//! bound by reading the weights, so each matrix is packed in groups of output columns that
//! stream through memory contiguously and sum in registers ([`Dense`]). Every output is summed
//! in the same order either way, so a prompt fed at once or token by token gives the same bits.
//! A single row through a large matrix (the 10M-parameter config) splits its column groups
//! over rayon's threads; the small model stays on the calling thread.

use std::sync::Arc;

use candle_core::Tensor;
use multiversion::multiversion;
use rayon::prelude::*;

use super::fused::FusedGpt;
use super::Decode;
use crate::error::{Error, Result};
use crate::kernels::activation::Activation;
use crate::kernels::block::Affine;
use crate::kernels::layer_norm::layer_norm_forward_serial_into;
use crate::kernels::math;
use crate::kernels::rope::RopeTable;
use crate::model::gpt::{bigram_row, check_positions};

fn data(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

struct Norm {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    eps: f32,
}

impl Norm {
    fn new(ln: &Affine<Tensor>, eps: f64) -> Result<Norm> {
        Ok(Norm {
            w: data(&ln.weight)?,
            b: ln.bias.as_ref().map(data).transpose()?,
            eps: eps as f32,
        })
    }

    fn apply(&self, x: &[f32], y: &mut [f32]) {
        layer_norm_forward_serial_into(x, &self.w, self.b.as_deref(), self.eps, y);
    }
}

/// A weight matrix `(out, in)` packed for [`Dense::apply`], and its optional bias. The outputs
/// are cut into groups of `cols` (the last one padded with zero weights), and each group's
/// slab of Wᵀ, `(in, cols)`, is stored contiguously, so a group streams through memory in one
/// run and y = W·x is a sum of slab rows scaled by the entries of x (vectorised along the
/// output, no horizontal sums).
struct Dense {
    packed: Vec<f32>,
    b: Option<Vec<f32>>,
    d_in: usize,
    d_out: usize,
    /// Outputs summed in registers at a time: 128 with 512-bit vectors, 64 with 256-bit ones.
    cols: usize,
}

/// Matrix-vector products at least this large (multiply-adds) split their output groups over
/// threads; a smaller one is over before a thread could be woken.
const PARALLEL_MIN: usize = 1 << 18;

impl Dense {
    /// From `w` `(out, in)` row-major.
    fn new(w: &[f32], b: Option<Vec<f32>>, d_in: usize) -> Dense {
        let d_out = w.len() / d_in.max(1);
        let cols = if wide_vectors() { 128 } else { 64 };
        let groups = d_out.div_ceil(cols);
        let mut packed = vec![0.0f32; groups * d_in * cols];
        for (o, row) in w.chunks_exact(d_in).enumerate() {
            let slab = &mut packed[(o / cols) * d_in * cols..];
            for (i, &v) in row.iter().enumerate() {
                slab[i * cols + o % cols] = v;
            }
        }
        Dense {
            packed,
            b,
            d_in,
            d_out,
            cols,
        }
    }

    fn from_affine(l: &Affine<Tensor>) -> Result<Dense> {
        Ok(Dense::new(
            &data(&l.weight)?,
            l.bias.as_ref().map(data).transpose()?,
            l.weight.dim(1)?,
        ))
    }

    /// y = x·Wᵀ (+ b) for every row of `x` `(R, in)`: `y` `(R, out)`. Every output is summed in
    /// input order, as a plain loop would, so a row gives the same bits alone or among others.
    fn apply(&self, x: &[f32], y: &mut [f32]) {
        let (slab, cols) = (self.d_in * self.cols, self.cols);
        let run = |w: &[f32], out: Out| match cols {
            128 => slab_128(w, x, out),
            _ => slab_64(w, x, out),
        };
        if x.len() == self.d_in && self.packed.len() >= PARALLEL_MIN {
            // One row through a large matrix: its groups over threads, each writing its own
            // columns.
            y.par_chunks_mut(cols)
                .zip(self.packed.par_chunks(slab))
                .for_each(|(y, w)| {
                    let n = y.len();
                    run(
                        w,
                        Out {
                            y,
                            stride: n,
                            first: 0,
                            n,
                        },
                    )
                });
        } else {
            for (g, w) in self.packed.chunks_exact(slab).enumerate() {
                let first = g * cols;
                let n = cols.min(self.d_out - first);
                let stride = self.d_out;
                run(
                    w,
                    Out {
                        y: &mut *y,
                        stride,
                        first,
                        n,
                    },
                );
            }
        }
        if let Some(b) = &self.b {
            for y in y.chunks_exact_mut(self.d_out) {
                y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
    }
}

/// Whether this CPU has 512-bit vectors (32 of them: room for 128 accumulated outputs).
fn wide_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where a group's outputs go: columns `first..first + n` of each `stride`-long row of `y`.
struct Out<'a> {
    y: &'a mut [f32],
    stride: usize,
    first: usize,
    n: usize,
}

impl Out<'_> {
    /// Row `r`'s outputs, the first `n` of `acc`.
    #[inline(always)]
    fn write(&mut self, r: usize, acc: &[f32]) {
        let at = r * self.stride + self.first;
        self.y[at..at + self.n].copy_from_slice(&acc[..self.n]);
    }
}

/// One group of `N` outputs for every row of `x`: `w` is the group's slab `(in, N)`. The `N`
/// sums of a row live in registers over the whole input and are written once; rows go in
/// pairs, so each slab row loaded feeds two rows' sums, and the slab is read from memory once
/// and from cache for the other rows.
#[inline(always)]
fn slab<const N: usize>(w: &[f32], x: &[f32], mut out: Out) {
    let d_in = w.len() / N;
    let mut pairs = x.chunks_exact(2 * d_in);
    let mut r = 0;
    for x in &mut pairs {
        let (x0, x1) = x.split_at(d_in);
        let mut acc0 = [0.0f32; N];
        let mut acc1 = [0.0f32; N];
        for ((&a, &b), row) in x0.iter().zip(x1).zip(w.chunks_exact(N)) {
            let row: &[f32; N] = row.try_into().unwrap();
            for ((s0, s1), &w) in acc0.iter_mut().zip(acc1.iter_mut()).zip(row) {
                *s0 += a * w;
                *s1 += b * w;
            }
        }
        out.write(r, &acc0);
        out.write(r + 1, &acc1);
        r += 2;
    }
    let x = pairs.remainder();
    if !x.is_empty() {
        let mut acc = [0.0f32; N];
        for (&xi, row) in x.iter().zip(w.chunks_exact(N)) {
            let row: &[f32; N] = row.try_into().unwrap();
            for (a, &w) in acc.iter_mut().zip(row) {
                *a += xi * w;
            }
        }
        out.write(r, &acc);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma"))]
fn slab_128(w: &[f32], x: &[f32], out: Out) {
    slab::<128>(w, x, out)
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn slab_64(w: &[f32], x: &[f32], out: Out) {
    slab::<64>(w, x, out)
}

/// One head's attention for the newest query over `n` cached positions.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn attend_one(
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

struct Layer {
    ln_1: Norm,
    qkv: Dense,
    proj: Dense,
    ln_2: Norm,
    fc: Dense,
    fc_proj: Dense,
    /// `(block_size, C)` keys and values of the positions seen so far.
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The fused incremental decoder of one sequence (see the module docs).
pub struct Decoder {
    c: usize,
    activation: Activation,
    n_head: usize,
    block_size: usize,
    vocab: usize,
    wte: Vec<f32>,
    /// Learned positions `(block_size, C)`; none with rotary embeddings.
    wpe: Option<Vec<f32>>,
    rope: Option<Arc<RopeTable>>,
    /// The LM head (`wte` when tied), and its soft cap (0 = none).
    head: Dense,
    softcap: f64,
    /// Bigram features `(buckets, C)`, and the last token fed (the next one's previous).
    bigram: Option<Vec<f32>>,
    last: Option<u32>,
    layers: Vec<Layer>,
    ln_f: Norm,
    len: usize,
}

impl Decoder {
    /// Copies `model`'s weights into a decoder with an empty cache.
    pub fn new(model: &FusedGpt) -> Result<Decoder> {
        let c = model.wte.dim(1)?;
        let layers = model
            .blocks
            .iter()
            .map(|p| {
                let qkv = Tensor::cat(&[&p.w_q, &p.w_k, &p.w_v], 0)?; // (3C, C)
                Ok(Layer {
                    ln_1: Norm::new(&p.ln_1, model.eps)?,
                    qkv: Dense::new(&data(&qkv)?, None, c),
                    proj: Dense::from_affine(&p.attn_proj)?,
                    ln_2: Norm::new(&p.ln_2, model.eps)?,
                    fc: Dense::from_affine(&p.fc)?,
                    fc_proj: Dense::from_affine(&p.mlp_proj)?,
                    keys: vec![0.0; model.block_size * c],
                    values: vec![0.0; model.block_size * c],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder {
            c,
            activation: model.activation,
            n_head: model.n_head,
            block_size: model.block_size,
            vocab: model.wte.dim(0)?,
            wte: data(&model.wte)?,
            wpe: model.wpe.as_ref().map(data).transpose()?,
            rope: model.rope.clone(),
            head: Dense::new(&data(&model.head)?, None, c),
            softcap: model.softcap,
            bigram: model.bigram.as_ref().map(data).transpose()?,
            last: None,
            layers,
            ln_f: Norm::new(&model.ln_f, model.eps)?,
            len: 0,
        })
    }

    /// Runs `tokens` (at the next positions) through every block, all rows of a layer at once
    /// so each weight matrix is read once per layer; leaves the last token's residual stream in
    /// `last` `(C)`.
    fn run(&mut self, tokens: &[u32], last: &mut [f32]) {
        let (c, start, rows) = (self.c, self.len, tokens.len());
        let hs = c / self.n_head;
        let scale = 1.0 / (hs as f32).sqrt();
        let mut x = vec![0.0f32; rows * c]; // (R, C)
        for (r, (x, &tok)) in x.chunks_exact_mut(c).zip(tokens).enumerate() {
            let (tok, pos) = (tok as usize, start + r);
            x.copy_from_slice(&self.wte[tok * c..(tok + 1) * c]);
            if let Some(wpe) = &self.wpe {
                let p = &wpe[pos * c..(pos + 1) * c];
                x.iter_mut().zip(p).for_each(|(x, &p)| *x += p);
            }
            if let Some(table) = &self.bigram {
                let prev = match r {
                    0 => self.last,
                    _ => Some(tokens[r - 1]),
                };
                let row = bigram_row(prev, tok, self.vocab, table.len() / c);
                let f = &table[row * c..(row + 1) * c];
                x.iter_mut().zip(f).for_each(|(x, &f)| *x += f);
            }
        }
        let mut h = vec![0.0f32; rows * c];
        let mut qkv = vec![0.0f32; rows * 3 * c];
        let mut y = vec![0.0f32; rows * c];
        let mut a = vec![0.0f32; rows * c];
        let mut scores = vec![0.0f32; start + rows];
        let mut f = vec![0.0f32; rows * 4 * c];
        let mut g = vec![0.0f32; rows * 4 * c];
        for l in &mut self.layers {
            l.ln_1.apply(&x, &mut h);
            l.qkv.apply(&h, &mut qkv);
            if let Some(rope) = &self.rope {
                rope.apply_qkv(&mut qkv, c, rows, start, false);
            }
            for (r, qkv) in qkv.chunks_exact(3 * c).enumerate() {
                let pos = start + r;
                l.keys[pos * c..(pos + 1) * c].copy_from_slice(&qkv[c..2 * c]);
                l.values[pos * c..(pos + 1) * c].copy_from_slice(&qkv[2 * c..]);
            }
            for (r, (qkv, y)) in qkv
                .chunks_exact(3 * c)
                .zip(y.chunks_exact_mut(c))
                .enumerate()
            {
                for head in 0..self.n_head {
                    let o = head * hs;
                    attend_one(
                        &qkv[o..o + hs],
                        &l.keys[o..],
                        &l.values[o..],
                        c,
                        start + r + 1,
                        scale,
                        &mut scores,
                        &mut y[o..o + hs],
                    );
                }
            }
            l.proj.apply(&y, &mut a);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            l.ln_2.apply(&x, &mut h);
            l.fc.apply(&h, &mut f);
            self.activation.forward_serial_into(&f, &mut g);
            l.fc_proj.apply(&g, &mut a);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
        }
        self.len += rows;
        self.last = tokens.last().copied();
        last.copy_from_slice(&x[(rows - 1) * c..]);
    }
}

impl Decode for Decoder {
    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.len = 0;
        self.last = None;
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        check_positions(self.len, tokens.len(), self.block_size)?;
        if let Some(tok) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(Error::Usage(format!(
                "token id {tok} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        let mut x = vec![0.0f32; self.c];
        self.run(tokens, &mut x);
        let mut h = vec![0.0f32; self.c];
        self.ln_f.apply(&x, &mut h);
        let mut logits = vec![0.0f32; self.vocab];
        self.head.apply(&h, &mut logits);
        if self.softcap > 0.0 {
            // As candle computes logits / cap and · cap: by the f32 factors 1/cap and cap.
            let (inv, cap) = ((1.0 / self.softcap) as f32, self.softcap as f32);
            logits.iter_mut().for_each(|l| *l = (*l * inv).tanh() * cap);
        }
        Ok(logits)
    }
}
