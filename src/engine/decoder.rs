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
//! On a machine with a second core, a small model's decoder keeps a partner thread that takes
//! half of every product (half the column groups of one token, half the rows of a feed), so
//! each core reads half the weights per token ([`Partner`]); a single row through a large
//! matrix (the 10M-parameter config) splits its column groups over rayon's threads instead.

use std::sync::Arc;

use candle_core::Tensor;

use super::fused::FusedGpt;
use super::Decode;
use crate::error::{Error, Result};
use crate::kernels::attention::attend_one;
use crate::kernels::gemv::{Dense, PARALLEL_MIN};
use crate::kernels::layer_norm::layer_norm_forward_serial_into;
use crate::kernels::partner::Partner;
use crate::kernels::rope::RopeTable;
use crate::layout::{Activation, Affine};
use crate::model::gpt::{bigram_row, check_positions, softcap};

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

/// `l`'s weight and bias packed for matrix-vector products.
fn dense(l: &Affine<Tensor>, halves: bool) -> Result<Dense> {
    Ok(Dense::new(
        &data(&l.weight)?,
        l.bias.as_ref().map(data).transpose()?,
        l.weight.dim(1)?,
        halves,
    ))
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
    /// A second thread sharing each product, on machines with a second core.
    partner: Option<Partner>,
    layers: Vec<Layer>,
    ln_f: Norm,
    len: usize,
}

impl Decoder {
    /// Copies `fused`'s weights into a decoder with an empty cache. With `partner_threads`, a
    /// small model on a machine with a second core gets a partner thread; a large model's
    /// products split over rayon's threads instead ([`PARALLEL_MIN`]).
    pub fn new(fused: &FusedGpt, partner_threads: bool) -> Result<Decoder> {
        let c = fused.model.cfg.n_embd;
        let small = 4 * c * c < PARALLEL_MIN;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Decoder::with_partner(fused, small && cores >= 2 && partner_threads)
    }

    /// [`Decoder::new`] with or without a partner thread (the same bits either way).
    pub fn with_partner(fused: &FusedGpt, two: bool) -> Result<Decoder> {
        let model = &fused.model;
        let c = model.cfg.n_embd;
        let eps = model.ln_f.eps;
        let layers = fused
            .blocks
            .iter()
            .map(|p| {
                let qkv = Tensor::cat(&[&p.w_q.weight, &p.w_k.weight, &p.w_v.weight], 0)?; // (3C, C)
                let bias = match (&p.w_q.bias, &p.w_k.bias, &p.w_v.bias) {
                    (Some(q), Some(k), Some(v)) => Some(data(&Tensor::cat(&[q, k, v], 0)?)?),
                    _ => None,
                };
                Ok(Layer {
                    ln_1: Norm::new(&p.ln_1, eps)?,
                    qkv: Dense::new(&data(&qkv)?, bias, c, two),
                    proj: dense(&p.attn_proj, two)?,
                    ln_2: Norm::new(&p.ln_2, eps)?,
                    fc: dense(&p.fc, two)?,
                    fc_proj: dense(&p.mlp_proj, two)?,
                    keys: vec![0.0; model.cfg.block_size * c],
                    values: vec![0.0; model.cfg.block_size * c],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = Affine {
            weight: model.ln_f.weight.clone(),
            bias: model.ln_f.bias.clone(),
        };
        Ok(Decoder {
            c,
            activation: fused.activation,
            n_head: model.cfg.n_head,
            block_size: model.cfg.block_size,
            vocab: model.vocab_size,
            wte: data(&model.wte)?,
            wpe: model.wpe.as_ref().map(data).transpose()?,
            rope: fused.rope.clone(),
            head: Dense::new(&data(model.head_weight())?, None, c, false), // never shared
            partner: two.then(Partner::spawn),
            softcap: model.cfg.logit_softcap,
            bigram: model.bigram.as_ref().map(data).transpose()?,
            last: None,
            layers,
            ln_f: Norm::new(&ln_f, eps)?,
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
        let partner = self.partner.as_ref();
        for l in &mut self.layers {
            l.ln_1.apply(&x, &mut h);
            l.qkv.apply_shared(&h, &mut qkv, partner);
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
            l.proj.apply_shared(&y, &mut a, partner);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            l.ln_2.apply(&x, &mut h);
            l.fc.apply_shared(&h, &mut f, partner);
            self.activation.forward_serial_into(&f, &mut g);
            l.fc_proj.apply_shared(&g, &mut a, partner);
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
            // The model's own formula, on the one row.
            let row = Tensor::from_vec(logits, self.vocab, &candle_core::Device::Cpu)?;
            logits = softcap(&row, self.softcap)?.to_vec1::<f32>()?;
        }
        Ok(logits)
    }
}
