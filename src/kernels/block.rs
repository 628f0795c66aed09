//! A whole transformer block, forward and backward, as one custom op on plain buffers:
//!
//! ```text
//! forward                                  backward (dy in; dx and every weight's gradient out)
//! a   = LN₁(x)                             dm = drop₃(dy);  dW₄ = dmᵀ·g;  dg = dm·W₄
//! qkv = a·[W_Q; W_K; W_V]ᵀ      (N, 3C)    dh = dg ∘ GELU′(h);  dW₃ = dhᵀ·b;  db = dh·W₃
//! att = attention(qkv)          (N, C)     dx₁ = dy + LN₂ᵀ(db)
//! x₁  = x + drop₂(att·W_Oᵀ)     (N, C)     dp = drop₂(dx₁);  dW_O = dpᵀ·att;  datt = dp·W_O
//! b   = LN₂(x₁)                            dqkv = attentionᵀ(datt);  dW_QKV = dqkvᵀ·a
//! h   = b·W₃ᵀ                   (N, 4C)    dx = dx₁ + LN₁ᵀ(dqkv·W_QKV)
//! y   = x₁ + drop₃(GELU(h)·W₄ᵀ) (N, C)
//! ```
//! (N = B·T rows; biases, when the model has them, are added after their products and their
//! gradients are column sums.)
//!
//! Why one op: run op by op under candle's autograd, a block is about a dozen graph nodes, and
//! every gradient candle passes between them is a fresh zeroed tensor plus an addition (zeroing
//! and adding were 6% of a training step on the small config). Here the backward pass is
//! written out: each product writes its result where the next step reads it, the GELU gradient
//! is computed over the buffer it came in, and the 4C-wide activations exist once.
//!
//! What is kept for backward: `qkv`, `att` and `h`, 8C floats a row (the input x is kept by
//! candle anyway), and GELU(h), x₁, the attention weights and the two LN outputs when they are
//! small. When they are large they are recomputed: the LN outputs (a cheap pass each), GELU(h),
//! x₁ (a (C, C) product) and the attention weights (Q·Kᵀ and a softmax); dropout masks are regenerated
//! from their seeds. With `keep_activations` off, nothing is kept and backward reruns the
//! forward pass first: activation recomputation, at the price of the block's forward products.
//!
//! The weights' gradients cannot be outputs of a one-input op, so they go to a
//! [`WeightGrads`] store that the trainer adds to candle's gradients.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, TensorId};
use rayon::prelude::*;

use super::attention::{self, AttentionDropout, Dims};
use super::dropout::{add_dropped, dropout_into};
use super::gelu::{gelu_backward_from_output, gelu_backward_over_input, gelu_forward, gelu_new};
use super::layer_norm::{
    layer_norm_backward, layer_norm_backward_into, layer_norm_forward, layer_norm_new,
};
use super::linear::{
    input_grad, input_grad_into, linear_forward, linear_forward_into, weight_grad,
};
use super::matmul::{matmul, serially, MatMut, MatRef};
use super::{f32_slice, rows_per_task, with_f32};

/// Weight gradients computed inside block ops during one backward pass, by weight tensor id.
#[derive(Debug, Clone, Default)]
pub struct WeightGrads(Arc<Mutex<Vec<(TensorId, Tensor)>>>);

impl WeightGrads {
    /// Records the gradient `g` of the weight whose tensor id is `id`.
    pub fn push(&self, id: TensorId, g: Tensor) {
        if let Ok(mut v) = self.0.lock() {
            v.push((id, g));
        }
    }

    /// Takes (and clears) the gradients collected so far, as (weight's tensor id, gradient).
    pub fn take(&self) -> Vec<(TensorId, Tensor)> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// A weight `(out, in)` (PyTorch's layout) or a LayerNorm gain `(C)`, and its optional bias.
#[derive(Debug, Clone)]
pub struct Affine {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// The weights of one block, as the model holds them.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// LayerNorm gain `(C)` and bias.
    pub ln_1: Affine,
    /// W_Q, W_K, W_V, `(C, C)` each: the heads' rows one after the other (no biases).
    pub w_q: Tensor,
    pub w_k: Tensor,
    pub w_v: Tensor,
    /// Attention output projection `(C, C)`.
    pub attn_proj: Affine,
    pub ln_2: Affine,
    /// MLP expansion `(4C, C)`.
    pub fc: Affine,
    /// MLP projection `(C, 4C)`.
    pub mlp_proj: Affine,
    pub eps: f32,
    pub n_head: usize,
}

impl BlockWeights {
    /// Every tensor in a fixed order: LN₁ (gain, bias), W_Q, W_K, W_V, W_O (weight, bias),
    /// LN₂, W₃, W₄ (each weight, bias).
    fn tensors(&self) -> Vec<Option<&Tensor>> {
        fn aff(a: &Affine) -> [Option<&Tensor>; 2] {
            [Some(&a.weight), a.bias.as_ref()]
        }
        let mut v = Vec::with_capacity(13);
        v.extend(aff(&self.ln_1));
        v.extend([Some(&self.w_q), Some(&self.w_k), Some(&self.w_v)]);
        v.extend(aff(&self.attn_proj));
        v.extend(aff(&self.ln_2));
        v.extend(aff(&self.fc));
        v.extend(aff(&self.mlp_proj));
        v
    }
}

/// Dropout inside the block: probability and one mask seed per place.
#[derive(Debug, Clone, Copy)]
pub struct BlockDropout {
    pub p: f64,
    /// On the attention weights (the mask of [`attention::causal_attention`]).
    pub attention: u64,
    /// On the attention branch's output, before the residual addition.
    pub attn_proj: u64,
    /// On the MLP branch's output, before the residual addition.
    pub mlp_proj: u64,
}

/// A block as one op on `x` `(B, T, C)` → `(B, T, C)`.
pub struct BlockOp {
    weights: BlockWeights,
    dropout: Option<BlockDropout>,
    keep_activations: bool,
    grads: WeightGrads,
    /// Per part of the batch ([`parts`]), what its backward pass needs, and [W_Q; W_K; W_V]
    /// as the forward pass stacked them.
    saved: Mutex<Option<(Vec<Activations>, Vec<f32>)>>,
    /// The largest GELU(h), x₁, attention weights or LN output kept from forward ([`KEEP_BYTES`]).
    keep_bytes: usize,
    /// Rows per step of the MLP backward when GELU(h) is not kept ([`MLP_ROWS`]).
    mlp_rows: usize,
}

impl BlockOp {
    /// `keep_activations`: keep what backward needs (fast), or recompute it there (small).
    pub fn new(
        weights: BlockWeights,
        dropout: Option<BlockDropout>,
        keep_activations: bool,
        grads: WeightGrads,
    ) -> BlockOp {
        BlockOp {
            weights,
            dropout: dropout.filter(|d| d.p > 0.0),
            keep_activations,
            grads,
            saved: Mutex::new(None),
            keep_bytes: KEEP_BYTES,
            mlp_rows: MLP_ROWS,
        }
    }

    /// Never keeps GELU(h), x₁, the attention weights or the LN outputs, and runs the MLP backward `rows` rows
    /// at a time: the path large models take, for tests on small ones.
    pub fn with_streamed_mlp(mut self, rows: usize) -> BlockOp {
        self.keep_bytes = 0;
        self.mlp_rows = rows.max(1);
        self
    }

    /// Runs the block on `x` `(B, T, C)`, the result a tensor on candle's graph.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(self)
    }
}

/// What the backward pass needs from the forward pass.
struct Activations {
    qkv: Vec<f32>,
    att: Vec<f32>,
    h: Vec<f32>,
    /// GELU(h), x₁, the attention weights `(B, n_head, T, T)` and the LayerNorms' outputs,
    /// each when small enough to keep ([`KEEP_BYTES`]).
    g: Option<Vec<f32>>,
    x1: Option<Vec<f32>>,
    probs: Option<Vec<f32>>,
    ln1: Option<Vec<f32>>,
    ln2: Option<Vec<f32>>,
}

/// Read access to the f32 data of the block's weight tensors for the length of one pass.
struct Reader<'a, G> {
    guards: Vec<Option<(G, &'a Layout)>>,
}

fn reader(w: &BlockWeights) -> Result<Reader<'_, impl Deref<Target = Storage> + '_>> {
    let mut guards = Vec::new();
    for t in w.tensors() {
        guards.push(match t {
            Some(t) => {
                if !t.is_contiguous() {
                    bail!("block: weight {:?} is not contiguous", t.shape())
                }
                Some(t.storage_and_layout())
            }
            None => None,
        });
    }
    Ok(Reader { guards })
}

impl<G: Deref<Target = Storage>> Reader<'_, G> {
    fn get(&self, i: usize) -> Result<Option<&[f32]>> {
        match &self.guards[i] {
            None => Ok(None),
            Some((storage, layout)) => match &**storage {
                Storage::Cpu(s) => Ok(Some(f32_slice(s, layout, "block")?)),
                _ => bail!("block: the fused kernels run on the CPU only"),
            },
        }
    }

    fn req(&self, i: usize) -> Result<&[f32]> {
        match self.get(i)? {
            Some(s) => Ok(s),
            None => bail!("block: missing weight {i}"),
        }
    }
}

/// Slices of every weight (a weight and its optional bias).
struct W<'a> {
    ln1: (&'a [f32], Option<&'a [f32]>),
    /// [W_Q; W_K; W_V] stacked: `(3C, C)`.
    wqkv: Vec<f32>,
    proj: (&'a [f32], Option<&'a [f32]>),
    ln2: (&'a [f32], Option<&'a [f32]>),
    fc: (&'a [f32], Option<&'a [f32]>),
    mlp: (&'a [f32], Option<&'a [f32]>),
}

impl<'a> W<'a> {
    /// The weights of `r`, with [W_Q; W_K; W_V] stacked unless `stacked` already holds them
    /// (from the forward pass: the weights do not change before its backward pass).
    fn new<G: Deref<Target = Storage>>(
        r: &'a Reader<'_, G>,
        stacked: Option<Vec<f32>>,
    ) -> Result<W<'a>> {
        let wqkv = match stacked {
            Some(w) => w,
            None => {
                let mut w = Vec::with_capacity(3 * r.req(2)?.len());
                for i in 2..5 {
                    w.extend_from_slice(r.req(i)?);
                }
                w
            }
        };
        Ok(W {
            ln1: (r.req(0)?, r.get(1)?),
            wqkv,
            proj: (r.req(5)?, r.get(6)?),
            ln2: (r.req(7)?, r.get(8)?),
            fc: (r.req(9)?, r.get(10)?),
            mlp: (r.req(11)?, r.get(12)?),
        })
    }
}

/// y `(n, out)` = x `(n, in)` · Wᵀ (+ b), W `(out, in)`.
fn affine(x: &[f32], d_in: usize, w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let mut y = linear_forward(x, d_in, w);
    add_bias(&mut y, b);
    y
}

/// [`affine`] written into `y`.
fn affine_into(x: &[f32], d_in: usize, w: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
    linear_forward_into(x, d_in, w, y);
    add_bias(y, b);
}

/// y `(n, out)` += b `(out)` on every row.
fn add_bias(y: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        let out = b.len();
        y.par_chunks_mut(rows_per_task(out) * out).for_each(|rows| {
            for row in rows.chunks_exact_mut(out) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        });
    }
}

/// `buf` cut into one piece per part of the batch, `row` floats per sequence.
fn split_parts<'a>(mut buf: &'a mut [f32], parts: &[Dims], row: usize) -> Vec<&'a mut [f32]> {
    let mut pieces = Vec::with_capacity(parts.len());
    for d in parts {
        let (piece, rest) = buf.split_at_mut(d.b * row);
        pieces.push(piece);
        buf = rest;
    }
    pieces
}

/// Σ over the rows of `x` `(rows, n)`: a bias's gradient. Summed per chunk of rows, then the
/// chunks in order, so the result does not depend on the thread count.
fn column_sums(x: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = x
        .par_chunks(rows_per_task(n) * n)
        .map(|rows| {
            let mut s = vec![0.0f32; n];
            for row in rows.chunks_exact(n) {
                s.iter_mut().zip(row).for_each(|(s, x)| *s += x);
            }
            s
        })
        .collect();
    let mut s = vec![0.0f32; n];
    for p in &partials {
        s.iter_mut().zip(p).for_each(|(s, x)| *s += x);
    }
    s
}

/// The weights' gradients from a backward pass, in [`BlockWeights::tensors`] order (`None`
/// for a bias the block does not have), except that W_Q's place holds the gradient of
/// [W_Q; W_K; W_V] stacked, `(3C, C)`, and W_K's and W_V's are `None`: the three are views
/// of it ([`BlockOp::push_grads`]).
type Gradients = Vec<Option<Vec<f32>>>;

/// Which of the optional activations a forward pass keeps ([`KEEP_BYTES`]).
#[derive(Clone, Copy)]
struct Keep {
    g: bool,
    x1: bool,
    probs: bool,
    /// LN₁(x) and LN₂(x₁).
    ln: bool,
}

/// The batch's sequences in two halves, run side by side, when the block has at most
/// [`SPLIT_ROWS`] rows (B·T) and B ≥ 2; otherwise one part.
///
/// Why: op by op, both cores wait for each other at the end of every product and kernel (a
/// few dozen times per block), and the small steps between them run on one core. Two
/// halves, each taken through the whole block by one core, meet twice per block. (Measured:
/// two single-threaded processes training on 6 sequences each step in 30.3 ms, one
/// two-threaded process on 12 in 32.6.) Kernels inside a half still split their work, so a
/// core that finishes its half first takes over pieces of the other's. The split depends on
/// the sizes only, not on the number of threads, so the results do not either.
fn parts(dims: &Dims) -> Vec<Dims> {
    let half = dims.b / 2;
    if half == 0 || dims.b * dims.t > SPLIT_ROWS {
        return vec![*dims];
    }
    vec![
        Dims { b: half, ..*dims },
        Dims {
            b: dims.b - half,
            b0: dims.b0 + half,
            ..*dims
        },
    ]
}

/// Runs `f`, the work of part `part` of the batch `whole`, with its products unsplit when it
/// is one of two halves ([`serially`]).
fn run_part<R>(part: &Dims, whole: &Dims, f: impl FnOnce() -> R) -> R {
    if part.b < whole.b {
        serially(f)
    } else {
        f()
    }
}

/// The parts' weight gradients summed in part order (the tensors side by side).
fn merge(results: Vec<Gradients>) -> Gradients {
    let mut parts = results.into_iter();
    let mut grads = parts.next().unwrap_or_default();
    for part in parts {
        grads.par_iter_mut().zip(part).for_each(|(sum, g)| {
            if let (Some(sum), Some(g)) = (sum.as_mut(), g) {
                sum.iter_mut().zip(&g).for_each(|(s, g)| *s += g);
            }
        });
    }
    grads
}

/// The most rows (B·T) a block op splits into halves ([`parts`]). Where ops are short the
/// halves pay: the small config (768 rows) steps 3% faster. Where they are long they do not:
/// the 10M config (16,384 rows) stepped 2–4% slower split, and its peak memory rose from 1.78
/// to 2.1–2.2 GB (each thread's allocator arena keeps the buffers it freed).
pub const SPLIT_ROWS: usize = 4096;

/// Rows of the 4C-wide MLP activations handled at a time in backward.
const MLP_ROWS: usize = 1024;

/// GELU(h), x₁, the attention weights and the LN outputs are each kept from the forward pass
/// when they take at most this many bytes per block: recomputing them is 5% (GELU), 3% (x₁,
/// one (C, C) product), 2% (weights) and 1% (both LNs) of a step on the small config, where
/// they are 1.5, 0.4, 0.8 and 2 × 0.4 MiB a block, while on the 10M config they are 96, 24, 96
/// and 2 × 24 MiB a block, worth more than the time.
const KEEP_BYTES: usize = 16 << 20;

/// Through W₄ and the GELU: dW₄ = dmᵀ·GELU(h) and dh = (dm·W₄) ∘ GELU′(h), written over `h`.
/// With `g` = GELU(h) kept from the forward pass, in one go, GELU′ taking Φ(h) = g / h instead
/// of recomputing it; without, a block of rows at a time, so that GELU(h) and dm·W₄ never
/// exist as whole `(N, 4C)` tensors (for the 10M config that is 96 MiB less at the peak).
fn mlp_backward(
    mut h: Vec<f32>,
    g: Option<Vec<f32>>,
    dm: &[f32],
    w4: &[f32],
    c: usize,
    hid: usize,
    block_rows: usize,
) -> (Vec<f32>, Vec<f32>) {
    if let Some(g) = g {
        let dw = weight_grad(dm, c, &g, hid);
        let dg = input_grad(dm, c, w4, hid);
        gelu_backward_from_output(&mut h, &g, &dg);
        return (dw, h);
    }
    let n = h.len() / hid;
    let mut dw = vec![0.0f32; c * hid];
    let mut buf = vec![0.0f32; block_rows.min(n) * hid];
    for r0 in (0..n).step_by(block_rows) {
        let rows = block_rows.min(n - r0);
        let hc = &mut h[r0 * hid..(r0 + rows) * hid];
        let dmc = &dm[r0 * c..(r0 + rows) * c];
        let gc = &mut buf[..rows * hid];
        gelu_forward(hc, gc);
        // SAFETY: dmc is (rows, c), gc is (rows, hid), dw is (c, hid).
        unsafe {
            matmul(
                c,
                hid,
                rows,
                MatMut::row_major(&mut dw, hid),
                r0 > 0,
                MatRef::transposed(dmc, c),
                MatRef::row_major(gc, hid),
                1.0,
            )
        };
        input_grad_into(dmc, c, w4, hid, gc);
        gelu_backward_over_input(hc, gc);
    }
    (dw, h)
}

impl BlockOp {
    fn attention_dropout(&self) -> Option<AttentionDropout> {
        self.dropout.map(|d| AttentionDropout {
            p: d.p,
            seed: d.attention,
        })
    }

    /// Which optional activations a block on the whole batch `dims` keeps ([`KEEP_BYTES`]),
    /// `keep` saying whether a backward pass will use them at all.
    fn keeps(&self, dims: &Dims, keep: bool) -> Keep {
        let fits = |floats: usize| keep && floats * 4 <= self.keep_bytes;
        let n = dims.b * dims.t;
        Keep {
            g: fits(n * self.weights.fc.weight.dims()[0]),
            x1: fits(n * dims.c),
            probs: fits(dims.b * dims.n_head * dims.t * dims.t),
            ln: fits(n * dims.c),
        }
    }

    /// The forward pass on `x` `(B, T, C)`, one part of the batch: the output, written into
    /// `y` (as long as `x`), and what backward needs (the optional parts as `keep` says).
    fn forward(&self, w: &W, x: &[f32], dims: &Dims, keep: Keep, y: &mut [f32]) -> Activations {
        let (n, c, eps) = (dims.b * dims.t, dims.c, self.weights.eps);
        let first = dims.b0 * dims.t * c; // x's first element's number in the whole batch
        let a = layer_norm_new(x, w.ln1.0, w.ln1.1, eps);
        let qkv = affine(&a, c, &w.wqkv, None);
        let (att, probs) =
            attention::forward_keeping(dims, &qkv, self.attention_dropout(), keep.probs);
        let x1 = self.attention_residual(w, x, &att, first);
        let (b, ln1) = match keep.ln {
            true => (layer_norm_new(&x1, w.ln2.0, w.ln2.1, eps), Some(a)),
            false => {
                let mut b = a; // LN₁'s output is not needed any more
                layer_norm_forward(&x1, w.ln2.0, w.ln2.1, eps, &mut b);
                (b, None)
            }
        };
        let h = affine(&b, c, w.fc.0, w.fc.1);
        let g = gelu_new(&h);
        affine_into(&g, h.len() / n, w.mlp.0, w.mlp.1, y);
        add_dropped(y, &x1, self.dropout.map(|d| (d.mlp_proj, d.p, first)));
        let g = keep.g.then_some(g);
        let x1 = keep.x1.then_some(x1);
        let ln2 = keep.ln.then_some(b);
        Activations {
            qkv,
            att,
            h,
            g,
            x1,
            probs,
            ln1,
            ln2,
        }
    }

    /// x₁ = x + drop₂(att·W_Oᵀ (+ b)): computed in forward, and again in backward when it is
    /// not kept ([`KEEP_BYTES`]). `first`: the number of x's first element in the whole batch (for the dropout mask).
    fn attention_residual(&self, w: &W, x: &[f32], att: &[f32], first: usize) -> Vec<f32> {
        let c = w.ln1.0.len();
        let mut x1 = affine(att, c, w.proj.0, w.proj.1);
        add_dropped(&mut x1, x, self.dropout.map(|d| (d.attn_proj, d.p, first)));
        x1
    }

    /// The backward pass: dx written into `dx` (as long as `x`), and the weights' gradients
    /// returned in [`BlockWeights::tensors`] order.
    #[allow(clippy::too_many_arguments)] // the part's inputs, its saved activations, its dx
    fn backward(
        &self,
        w: &W,
        x: &[f32],
        dy: &[f32],
        dims: &Dims,
        act: Activations,
        dx: &mut [f32],
    ) -> Gradients {
        let (n, c, eps) = (dims.b * dims.t, dims.c, self.weights.eps);
        let first = dims.b0 * dims.t * c;
        let hid = act.h.len() / n;
        let Activations {
            qkv,
            att,
            h,
            g,
            x1,
            probs,
            ln1,
            ln2,
        } = act;
        let x1 = x1.unwrap_or_else(|| self.attention_residual(w, x, &att, first));
        let p = self.dropout.map_or(0.0, |d| d.p);
        let dropped = |d: &[f32], seed: Option<u64>| -> Option<Vec<f32>> {
            let seed = seed?;
            let mut out = vec![0.0f32; d.len()];
            dropout_into(d, &mut out, seed, p, first);
            Some(out)
        };
        // The MLP branch.
        let dm_own = dropped(dy, self.dropout.map(|d| d.mlp_proj));
        let dm = dm_own.as_deref().unwrap_or(dy);
        let d_mlp_b = w.mlp.1.map(|_| column_sums(dm, c));
        let (d_mlp_w, g) = mlp_backward(h, g, dm, w.mlp.0, c, hid, self.mlp_rows); // g: dL/dh
        drop(dm_own);
        let d_fc_b = w.fc.1.map(|_| column_sums(&g, hid));
        let mut b = ln2.unwrap_or_else(|| {
            let mut b = vec![0.0f32; n * c];
            layer_norm_forward(&x1, w.ln2.0, w.ln2.1, eps, &mut b);
            b
        });
        let d_fc_w = weight_grad(&g, hid, &b, c);
        input_grad_into(&g, hid, w.fc.0, c, &mut b); // b now holds dL/dLN₂(x₁)
        drop(g);
        let (mut dx1, d_ln2_w, d_ln2_b) = layer_norm_backward(&x1, w.ln2.0, &b, eps);
        drop(x1);
        add_dropped(&mut dx1, dy, None);
        // The attention branch.
        let dp_own = dropped(&dx1, self.dropout.map(|d| d.attn_proj));
        let dp = dp_own.as_deref().unwrap_or(&dx1);
        let d_proj_b = w.proj.1.map(|_| column_sums(dp, c));
        let d_proj_w = weight_grad(dp, c, &att, c);
        let mut datt = att; // att is not needed after dW_O
        input_grad_into(dp, c, w.proj.0, c, &mut datt);
        drop(dp_own);
        let dropout = self.attention_dropout();
        let dqkv = attention::backward_slices(dims, &qkv, &datt, dropout, probs.as_deref());
        drop((qkv, probs));
        let mut a = datt; // datt is not needed any more
        let d_qkv_w = match &ln1 {
            Some(ln1) => weight_grad(&dqkv, 3 * c, ln1, c),
            None => {
                layer_norm_forward(x, w.ln1.0, w.ln1.1, eps, &mut a);
                weight_grad(&dqkv, 3 * c, &a, c)
            }
        };
        drop(ln1);
        input_grad_into(&dqkv, 3 * c, &w.wqkv, c, &mut a); // a now holds dL/dLN₁(x)
        let (d_ln1_w, d_ln1_b) = layer_norm_backward_into(x, w.ln1.0, &a, eps, dx);
        add_dropped(dx, &dx1, None);
        vec![
            Some(d_ln1_w),
            w.ln1.1.map(|_| d_ln1_b),
            Some(d_qkv_w),
            None,
            None,
            Some(d_proj_w),
            d_proj_b,
            Some(d_ln2_w),
            w.ln2.1.map(|_| d_ln2_b),
            Some(d_fc_w),
            d_fc_b,
            Some(d_mlp_w),
            d_mlp_b,
        ]
    }

    /// Hands the weights' gradients to the [`WeightGrads`] store, W_Q's, W_K's and W_V's as
    /// views of their stacked gradient (no copies).
    fn push_grads(&self, grads: Gradients) -> Result<()> {
        let w = &self.weights;
        for (i, (t, g)) in w.tensors().into_iter().zip(grads).enumerate() {
            let (Some(t), Some(g)) = (t, g) else { continue };
            if i != 2 {
                self.grads
                    .push(t.id(), Tensor::from_vec(g, t.shape(), t.device())?);
                continue;
            }
            let c = t.dim(1)?;
            let stacked = Tensor::from_vec(g, (3 * c, c), t.device())?;
            for (k, wt) in [&w.w_q, &w.w_k, &w.w_v].into_iter().enumerate() {
                self.grads.push(wt.id(), stacked.narrow(0, k * c, c)?);
            }
        }
        Ok(())
    }

    fn dims(&self, shape: &Shape) -> Result<Dims> {
        let (b, t, c) = shape.dims3()?;
        let cw = self.weights.ln_1.weight.dims1()?;
        let n_head = self.weights.n_head;
        if c != cw || n_head == 0 || c % n_head != 0 {
            bail!("block: input width {c} does not fit a block of width {cw} and {n_head} heads")
        }
        Ok(Dims::from_sizes(b, t, c, n_head))
    }
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "tinygpt-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l.shape())?;
        let x = f32_slice(s, l, "block")?;
        let r = reader(&self.weights)?;
        let w = W::new(&r, None)?;
        let keep = self.keeps(&dims, self.keep_activations);
        let row = dims.t * dims.c;
        let parts = parts(&dims);
        let mut y = vec![0.0f32; x.len()];
        let acts: Vec<Activations> = parts
            .par_iter()
            .zip(split_parts(&mut y, &parts, row))
            .map(|(d, y)| {
                run_part(d, &dims, || {
                    self.forward(&w, &x[d.b0 * row..(d.b0 + d.b) * row], d, keep, y)
                })
            })
            .collect();
        if self.keep_activations {
            if let Ok(mut saved) = self.saved.lock() {
                *saved = Some((acts, w.wqkv));
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dims = self.dims(x.shape())?;
        let (saved, stacked) = match self.saved.lock().ok().and_then(|mut s| s.take()) {
            Some((acts, stacked)) => (Some(acts), Some(stacked)),
            None => (None, None),
        };
        let (dx, grads) = with_f32(x, "block backward", |x| {
            with_f32(dy, "block backward", |dy| -> Result<_> {
                let r = reader(&self.weights)?;
                let w = W::new(&r, stacked)?;
                let row = dims.t * dims.c;
                let parts = parts(&dims);
                let acts: Vec<Option<Activations>> = match saved {
                    Some(v) if v.len() == parts.len() => v.into_iter().map(Some).collect(),
                    _ => parts.iter().map(|_| None).collect(),
                };
                let keep = self.keeps(&dims, true);
                let mut dx = vec![0.0f32; x.len()];
                let results: Vec<Gradients> = parts
                    .par_iter()
                    .zip(acts)
                    .zip(split_parts(&mut dx, &parts, row))
                    .map(|((d, act), dx)| {
                        let rows = d.b0 * row..(d.b0 + d.b) * row;
                        let (x, dy) = (&x[rows.clone()], &dy[rows]);
                        run_part(d, &dims, || {
                            let act = act.unwrap_or_else(|| {
                                self.forward(&w, x, d, keep, &mut vec![0.0f32; x.len()])
                            });
                            self.backward(&w, x, dy, d, act, dx)
                        })
                    })
                    .collect();
                Ok((dx, merge(results)))
            })
        })???;
        self.push_grads(grads)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
