//! Incremental decoding of one sequence on plain slices: the fused path's KV cache.
//!
//! Generating a token needs one row of every layer: at B = 1, T = 1 each candle op costs more
//! to dispatch than to compute, and the composed KV cache concatenates its tensors at every
//! step. The decoder copies the weights out once (W_Q, W_K, W_V stacked as one `(3C, C)`
//! matrix), keeps each layer's keys and values in preallocated `(block_size, C)` buffers, and
//! runs a token through the same math as the model's `forward_cached`:
//!
//! ```text
//! x = wte[token] + wpe[pos]
//! per block:  q|k|v = W_qkv·LN₁(x);  cache k, v at pos;  per head: p = softmax(q·Kᵀ/√hs), y = p·V
//!             x += W_proj·y (+b);  x += W_fc2·act(W_fc·LN₂(x) (+b)) (+b)
//! logits = wte · LN_f(x)
//! ```
//!
//! Matrix-vector products run their rows over rayon's threads once a matrix is large enough
//! to pay for it (the 10M-parameter config); the small one stays on the calling thread.

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
use crate::model::gpt::check_positions;

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

/// A weight matrix, stored transposed `(in, out)` so that W·x is a sum of rows of Wᵀ scaled
/// by the entries of x (vectorised along the output, no horizontal sums), and optional bias.
struct Dense {
    wt: Vec<f32>,
    b: Option<Vec<f32>>,
    d_out: usize,
}

impl Dense {
    /// From `w` `(out, in)` row-major.
    fn new(w: &[f32], b: Option<Vec<f32>>, d_in: usize) -> Dense {
        let d_out = w.len() / d_in.max(1);
        let mut wt = vec![0.0f32; w.len()];
        for (o, row) in w.chunks_exact(d_in).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                wt[i * d_out + o] = v;
            }
        }
        Dense { wt, b, d_out }
    }

    fn from_affine(l: &Affine<Tensor>) -> Result<Dense> {
        Ok(Dense::new(
            &data(&l.weight)?,
            l.bias.as_ref().map(data).transpose()?,
            l.weight.dim(1)?,
        ))
    }

    /// y = W·x (+ b).
    fn apply(&self, x: &[f32], y: &mut [f32]) {
        matvec_t(&self.wt, self.d_out, x, y);
        if let Some(b) = &self.b {
            y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
    }
}

/// Matrices at least this large (multiply-adds) split their outputs over threads.
const PARALLEL_MIN: usize = 1 << 18;

/// Output columns summed in registers at a time by [`matvec_t_cols`].
const COLS: usize = 64;

/// y[cols] = Σᵢ x[i] · Wᵀ[i, cols] for the output columns `first..first + y.len()`. Each group
/// of [`COLS`] outputs is summed in registers over the whole input, so W is streamed once and
/// y is written once (summing into y in memory loads and stores it for every input element).
/// Every output is summed in input order, as a plain loop would.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn matvec_t_cols(wt: &[f32], d_out: usize, first: usize, x: &[f32], y: &mut [f32]) {
    let mut groups = y.chunks_exact_mut(COLS);
    let mut c0 = first;
    for out in &mut groups {
        let mut acc = [0.0f32; COLS];
        for (i, &xi) in x.iter().enumerate() {
            let row: &[f32; COLS] = wt[i * d_out + c0..][..COLS].try_into().unwrap();
            for (a, &w) in acc.iter_mut().zip(row) {
                *a += xi * w;
            }
        }
        out.copy_from_slice(&acc);
        c0 += COLS;
    }
    let rest = groups.into_remainder();
    rest.fill(0.0);
    let n = rest.len();
    for (i, &xi) in x.iter().enumerate() {
        let row = &wt[i * d_out + c0..i * d_out + c0 + n];
        for (y, &w) in rest.iter_mut().zip(row) {
            *y += xi * w;
        }
    }
}

fn matvec_t(wt: &[f32], d_out: usize, x: &[f32], y: &mut [f32]) {
    if wt.len() < PARALLEL_MIN {
        return matvec_t_cols(wt, d_out, 0, x, y);
    }
    let cols = (d_out / rayon::current_num_threads()).div_ceil(16) * 16;
    y.par_chunks_mut(cols.max(16))
        .enumerate()
        .for_each(|(k, y)| matvec_t_cols(wt, d_out, k * cols.max(16), x, y));
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
    wpe: Vec<f32>,
    /// The tied LM head, `wte` transposed.
    head: Dense,
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
            wpe: data(&model.wpe)?,
            head: Dense::new(&data(&model.wte)?, None, c),
            layers,
            ln_f: Norm::new(&model.ln_f, model.eps)?,
            len: 0,
        })
    }

    /// Runs one token through every block; leaves the residual stream in `x`.
    fn one(&mut self, tok: usize, x: &mut [f32]) {
        let (c, pos) = (self.c, self.len);
        let hs = c / self.n_head;
        let scale = 1.0 / (hs as f32).sqrt();
        for ((x, &e), &p) in x
            .iter_mut()
            .zip(&self.wte[tok * c..(tok + 1) * c])
            .zip(&self.wpe[pos * c..(pos + 1) * c])
        {
            *x = e + p;
        }
        let mut h = vec![0.0f32; c];
        let mut qkv = vec![0.0f32; 3 * c];
        let mut y = vec![0.0f32; c];
        let mut a = vec![0.0f32; c];
        let mut scores = vec![0.0f32; pos + 1];
        let mut f = vec![0.0f32; 4 * c];
        let mut g = vec![0.0f32; 4 * c];
        for l in &mut self.layers {
            l.ln_1.apply(x, &mut h);
            l.qkv.apply(&h, &mut qkv);
            l.keys[pos * c..(pos + 1) * c].copy_from_slice(&qkv[c..2 * c]);
            l.values[pos * c..(pos + 1) * c].copy_from_slice(&qkv[2 * c..]);
            for head in 0..self.n_head {
                let o = head * hs;
                attend_one(
                    &qkv[o..o + hs],
                    &l.keys[o..],
                    &l.values[o..],
                    c,
                    pos + 1,
                    scale,
                    &mut scores,
                    &mut y[o..o + hs],
                );
            }
            l.proj.apply(&y, &mut a);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            l.ln_2.apply(x, &mut h);
            l.fc.apply(&h, &mut f);
            self.activation.forward_serial_into(&f, &mut g);
            l.fc_proj.apply(&g, &mut a);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
        }
        self.len += 1;
    }
}

impl Decode for Decoder {
    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        check_positions(self.len, tokens.len(), self.block_size)?;
        let mut x = vec![0.0f32; self.c];
        for &tok in tokens {
            if tok as usize >= self.vocab {
                return Err(Error::Usage(format!(
                    "token id {tok} is outside the vocabulary of {}",
                    self.vocab
                )));
            }
            self.one(tok as usize, &mut x);
        }
        let mut h = vec![0.0f32; self.c];
        self.ln_f.apply(&x, &mut h);
        let mut logits = vec![0.0f32; self.vocab];
        self.head.apply(&h, &mut logits);
        Ok(logits)
    }
}
