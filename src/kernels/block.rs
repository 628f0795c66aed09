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
//! every gradient candle passes between them is a fresh zeroed tensor plus an addition. Here the
//! backward pass is written out: each product writes its result where the next step reads it,
//! the activation's gradient is computed over the buffer it came in, and the 4C-wide
//! activations exist once.
//!
//! What is kept for backward: `qkv`, `att` and `h`, 8C floats a row (the input x is kept by
//! candle anyway), and GELU(h), x₁, the attention weights and the two LN outputs when they are
//! small. When they are large they are recomputed: the LN outputs (a cheap pass each), GELU(h),
//! x₁ (a (C, C) product) and the attention weights (Q·Kᵀ and a softmax); dropout masks are regenerated
//! from their seeds. With `keep_activations` off, nothing is kept and backward reruns the
//! forward pass first: activation recomputation, at the price of the block's forward products.
//!
//! The weights' gradients cannot be outputs of a one-input op, so backward leaves them, named
//! ([`BlockParams`]), in a [`GradSlot`] that whoever ran the op adds to candle's gradients.

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::attention::{self, AttentionDropout, Dims};
use super::dropout::{dropout_add_into, dropout_forward_into};
use super::layer_norm::{
    layer_norm_backward, layer_norm_backward_into, layer_norm_forward, layer_norm_forward_into,
};
use super::linear::{
    linear_backward_input, linear_backward_input_into, linear_backward_weight, linear_forward,
    linear_forward_into,
};
use super::matmul::{matmul, serially, MatMut, MatRef};
use super::rope::RopeTable;
use super::{f32_slice, rows_per_task, with_f32};
use crate::layout::{Activation, Affine, BlockParams};

/// Where a block op leaves its weights' gradients for whoever runs it: a custom op's backward
/// can only return the gradient of its input.
#[derive(Debug, Clone)]
pub struct GradSlot<T>(Arc<Mutex<Option<T>>>);

impl<T> Default for GradSlot<T> {
    fn default() -> Self {
        GradSlot(Arc::new(Mutex::new(None)))
    }
}

impl<T> GradSlot<T> {
    /// Leaves `g` in the slot (replacing what was there).
    pub fn put(&self, g: T) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(g);
        }
    }

    /// Takes what the slot holds.
    pub fn take(&self) -> Option<T> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }
}

/// The gradients of one block's parameters, shaped as the parameters.
pub type BlockGrads = BlockParams<Tensor>;

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
    params: BlockParams<Tensor>,
    n_head: usize,
    /// The LayerNorms' ε.
    eps: f32,
    /// The MLP's nonlinearity.
    activation: Activation,
    dropout: Option<BlockDropout>,
    keep_activations: bool,
    grads: GradSlot<BlockGrads>,
    /// Per part of the batch ([`parts`]), what its backward pass needs, and [W_Q; W_K; W_V]
    /// as the forward pass stacked them.
    saved: Mutex<Option<(Vec<Activations>, Vec<f32>)>>,
    /// The largest GELU(h), x₁, attention weights or LN output kept from forward ([`KEEP_BYTES`]).
    keep_bytes: usize,
    /// Rows per step of the MLP backward when GELU(h) is not kept ([`MLP_ROWS`]).
    mlp_rows: usize,
    /// Rotary embeddings: queries and keys turned by their positions before attention.
    rope: Option<Arc<RopeTable>>,
}

impl BlockOp {
    /// The block of `params` with `n_head` heads, LayerNorm ε `eps` and the MLP's
    /// `activation`. `keep_activations`:
    /// keep what backward needs (fast), or recompute it there (small). Backward leaves the
    /// parameters' gradients in `grads`.
    pub fn new(
        params: BlockParams<Tensor>,
        n_head: usize,
        eps: f32,
        activation: Activation,
        dropout: Option<BlockDropout>,
        keep_activations: bool,
        grads: GradSlot<BlockGrads>,
    ) -> BlockOp {
        BlockOp {
            params,
            n_head,
            eps,
            activation,
            dropout: dropout.filter(|d| d.p > 0.0),
            keep_activations,
            grads,
            saved: Mutex::new(None),
            keep_bytes: KEEP_BYTES,
            mlp_rows: MLP_ROWS,
            rope: None,
        }
    }

    /// The same block with its queries and keys turned by `rope` (rotary embeddings).
    pub fn with_rope(mut self, rope: Option<Arc<RopeTable>>) -> BlockOp {
        self.rope = rope;
        self
    }

    /// Never keeps GELU(h), x₁, the attention weights or the LN outputs, and runs the MLP
    /// backward `rows` rows at a time: the path large models take, for tests on small ones.
    #[cfg(test)]
    fn with_streamed_mlp(mut self, rows: usize) -> BlockOp {
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
    kept: Kept,
}

/// GELU(h), x₁, the attention weights `(B, n_head, T, T)` and the LayerNorms' outputs, each
/// kept from the forward pass when small enough ([`KEEP_BYTES`]).
struct Kept {
    g: Option<Vec<f32>>,
    x1: Option<Vec<f32>>,
    probs: Option<Vec<f32>>,
    ln1: Option<Vec<f32>>,
    ln2: Option<Vec<f32>>,
}

/// The optional activations ([`Kept`]) as backward asks for them: each one kept from the
/// forward pass, or recomputed where it was too large to keep ([`KEEP_BYTES`]), and handed out
/// once, so that it is freed after its last use.
struct Recall<'a> {
    op: &'a BlockOp,
    w: &'a W<'a>,
    /// The part's input `(N, C)`, and the number of its first element in the whole batch.
    x: &'a [f32],
    first: usize,
    kept: Kept,
}

impl Recall<'_> {
    /// x₁ `(N, C)`: kept, or recomputed from `att` `(N, C)` ([`BlockOp::attention_residual`]).
    fn take_x1(&mut self, att: &[f32]) -> Vec<f32> {
        let (op, w, x, first) = (self.op, self.w, self.x, self.first);
        self.kept
            .x1
            .take()
            .unwrap_or_else(|| op.attention_residual(w, x, att, first))
    }

    /// GELU(h) `(N, 4C)` when kept; `None` has [`mlp_backward`] recompute it a block of rows
    /// at a time.
    fn take_g(&mut self) -> Option<Vec<f32>> {
        self.kept.g.take()
    }

    /// LN₂(x₁) `(N, C)`: kept, or recomputed from `x1` into a new buffer.
    fn take_ln2(&mut self, x1: &[f32]) -> Vec<f32> {
        let (ln_2, eps) = (&self.w.p.ln_2, self.op.eps);
        self.kept.ln2.take().unwrap_or_else(|| {
            let mut b = vec![0.0f32; x1.len()];
            layer_norm_forward_into(x1, ln_2.weight, ln_2.bias, eps, &mut b);
            b
        })
    }

    /// The attention weights `(B, n_head, T, T)` when kept; `None` has
    /// [`attention::attention_backward`] recompute them.
    fn take_probs(&mut self) -> Option<Vec<f32>> {
        self.kept.probs.take()
    }

    /// LN₁(x) `(N, C)`: kept (handed over, to be freed after use), or recomputed into `buf`.
    fn take_ln1<'b>(&mut self, buf: &'b mut [f32]) -> Cow<'b, [f32]> {
        match self.kept.ln1.take() {
            Some(ln1) => Cow::Owned(ln1),
            None => {
                let ln_1 = &self.w.p.ln_1;
                layer_norm_forward_into(self.x, ln_1.weight, ln_1.bias, self.op.eps, buf);
                Cow::Borrowed(buf)
            }
        }
    }
}

/// Read locks on the storage of every parameter tensor, for the length of one pass.
fn lock(
    params: &BlockParams<Tensor>,
) -> Result<BlockParams<(impl Deref<Target = Storage> + '_, &Layout)>> {
    params.as_ref().try_map(|t| {
        if !t.is_contiguous() {
            bail!("block: weight {:?} is not contiguous", t.shape())
        }
        Ok(t.storage_and_layout())
    })
}

/// The parameters' f32 data, and [W_Q; W_K; W_V] stacked `(3C, C)` for the one product that
/// gives Q | K | V (with their biases stacked `(3C)`, when the model has them).
struct W<'a> {
    p: BlockParams<&'a [f32]>,
    wqkv: Vec<f32>,
    bqkv: Option<Vec<f32>>,
}

impl<'a> W<'a> {
    /// The data under `locks`, with [W_Q; W_K; W_V] stacked unless `stacked` already holds them
    /// (from the forward pass: the weights do not change before its backward pass).
    fn new<G: Deref<Target = Storage>>(
        locks: &'a BlockParams<(G, &Layout)>,
        stacked: Option<Vec<f32>>,
    ) -> Result<W<'a>> {
        let p = locks
            .as_ref()
            .try_map(|(storage, layout)| match &**storage {
                Storage::Cpu(s) => f32_slice(s, layout, "block"),
                _ => bail!("block: the fused kernels run on the CPU only"),
            })?;
        let wqkv = stacked.unwrap_or_else(|| [p.w_q.weight, p.w_k.weight, p.w_v.weight].concat());
        let bqkv = match (p.w_q.bias, p.w_k.bias, p.w_v.bias) {
            (Some(q), Some(k), Some(v)) => Some([q, k, v].concat()),
            (None, None, None) => None,
            _ => bail!("block: W_Q, W_K and W_V must all have biases or none"),
        };
        Ok(W { p, wqkv, bqkv })
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

/// The parameters' gradients from one part's backward pass.
type Gradients = BlockParams<Vec<f32>>;

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
/// halves, each taken through the whole block by one core, meet twice per block. Kernels
/// inside a half still split their work, so a
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
fn merge(results: Vec<Gradients>) -> Result<Gradients> {
    let mut parts = results.into_iter();
    let Some(mut sum) = parts.next() else {
        bail!("block: a backward pass over no part of the batch")
    };
    for part in parts {
        let sums = sum.as_mut().named();
        sums.into_par_iter()
            .zip(part.named())
            .for_each(|((_, s), (_, g))| {
                s.iter_mut().zip(&g).for_each(|(s, g)| *s += g);
            });
    }
    Ok(sum)
}

/// The most rows (B·T) a block op splits into halves ([`parts`]). Where ops are short the
/// halves pay; where they are long they do not, and each thread's allocator arena would keep
/// the large buffers it freed.
pub(crate) const SPLIT_ROWS: usize = 4096;

/// Rows of the 4C-wide MLP activations handled at a time in backward.
const MLP_ROWS: usize = 1024;

/// GELU(h), x₁, the attention weights and the LN outputs are each kept from the forward pass
/// when they take at most this many bytes per block: on small models recomputing them costs
/// more time than they take memory, on large ones (tens of MiB each a block) the other way.
const KEEP_BYTES: usize = 16 << 20;

/// Through W₄ and the activation: dW₄ = dmᵀ·act(h) and dh = (dm·W₄) ∘ act′(h), written over
/// `h`. With `g` = act(h) kept from the forward pass, in one go (GELU′ taking Φ(h) = g / h
/// instead of recomputing it); without, a block of rows at a time, so that act(h) and dm·W₄
/// never exist as whole `(N, 4C)` tensors (for the 10M config that is 96 MiB less at the peak).
#[allow(clippy::too_many_arguments)] // the MLP's activations, weights, sizes and row blocks
fn mlp_backward(
    act: Activation,
    mut h: Vec<f32>,
    g: Option<Vec<f32>>,
    dm: &[f32],
    w4: &[f32],
    c: usize,
    hid: usize,
    block_rows: usize,
) -> (Vec<f32>, Vec<f32>) {
    if let Some(g) = g {
        let dw = linear_backward_weight(dm, c, &g, hid);
        let dg = linear_backward_input(dm, c, w4, hid);
        act.backward_from_output(&mut h, &g, &dg);
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
        act.forward_into(hc, gc);
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
        linear_backward_input_into(dmc, c, w4, hid, gc);
        act.backward_over_input(hc, gc);
    }
    (dw, h)
}

/// The gradients by name, dW_QKV `(3C, C)` (and its bias `(3C)`) cut into W_Q's, W_K's and
/// W_V's.
fn block_gradients(
    c: usize,
    ln_1: Affine<Vec<f32>>,
    qkv: Affine<Vec<f32>>,
    attn_proj: Affine<Vec<f32>>,
    ln_2: Affine<Vec<f32>>,
    fc: Affine<Vec<f32>>,
    mlp_proj: Affine<Vec<f32>>,
) -> Gradients {
    // dW_QKV's rows are dW_Q's, then dW_K's, then dW_V's.
    let mut d_w_q = qkv.weight;
    let mut d_w_k = d_w_q.split_off(c * c);
    let d_w_v = d_w_k.split_off(c * c);
    let (d_b_q, d_b_k, d_b_v) = match qkv.bias {
        Some(mut q) => {
            let mut k = q.split_off(c);
            let v = k.split_off(c);
            (Some(q), Some(k), Some(v))
        }
        None => (None, None, None),
    };
    BlockParams {
        ln_1,
        w_q: Affine {
            weight: d_w_q,
            bias: d_b_q,
        },
        w_k: Affine {
            weight: d_w_k,
            bias: d_b_k,
        },
        w_v: Affine {
            weight: d_w_v,
            bias: d_b_v,
        },
        attn_proj,
        ln_2,
        fc,
        mlp_proj,
    }
}

/// The number of the first element of the part `dims` in the whole batch: where its dropout
/// masks start.
fn batch_offset(dims: &Dims) -> usize {
    dims.b0 * dims.t * dims.c
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
            g: fits(n * self.params.fc.weight.dims()[0]),
            x1: fits(n * dims.c),
            probs: fits(dims.b * dims.n_head * dims.t * dims.t),
            ln: fits(n * dims.c),
        }
    }

    /// The forward pass on `x` `(B, T, C)`, one part of the batch: the output, written into
    /// `y` (as long as `x`), and what backward needs (the optional parts as `keep` says).
    fn forward(&self, w: &W, x: &[f32], dims: &Dims, keep: Keep, y: &mut [f32]) -> Activations {
        let (n, c, eps) = (dims.b * dims.t, dims.c, self.eps);
        let first = dims.b0 * dims.t * c; // x's first element's number in the whole batch
        let a = layer_norm_forward(x, w.p.ln_1.weight, w.p.ln_1.bias, eps);
        let mut qkv = affine(&a, c, &w.wqkv, w.bqkv.as_deref());
        if let Some(rope) = &self.rope {
            rope.apply_qkv(&mut qkv, c, dims.t, 0, false);
        }
        let (att, probs) =
            attention::attention_forward_keeping(dims, &qkv, self.attention_dropout(), keep.probs);
        let x1 = self.attention_residual(w, x, &att, first);
        let (b, ln1) = match keep.ln {
            true => (
                layer_norm_forward(&x1, w.p.ln_2.weight, w.p.ln_2.bias, eps),
                Some(a),
            ),
            false => {
                let mut b = a; // LN₁'s output is not needed any more
                layer_norm_forward_into(&x1, w.p.ln_2.weight, w.p.ln_2.bias, eps, &mut b);
                (b, None)
            }
        };
        let h = affine(&b, c, w.p.fc.weight, w.p.fc.bias);
        let g = self.activation.forward(&h);
        affine_into(&g, h.len() / n, w.p.mlp_proj.weight, w.p.mlp_proj.bias, y);
        dropout_add_into(y, &x1, self.dropout.map(|d| (d.mlp_proj, d.p, first)));
        let g = keep.g.then_some(g);
        let x1 = keep.x1.then_some(x1);
        let ln2 = keep.ln.then_some(b);
        Activations {
            qkv,
            att,
            h,
            kept: Kept {
                g,
                x1,
                probs,
                ln1,
                ln2,
            },
        }
    }

    /// x₁ = x + drop₂(att·W_Oᵀ (+ b)): computed in forward, and again in backward when it is
    /// not kept ([`KEEP_BYTES`]). `first`: the number of x's first element in the whole batch (for the dropout mask).
    fn attention_residual(&self, w: &W, x: &[f32], att: &[f32], first: usize) -> Vec<f32> {
        let c = w.p.ln_1.weight.len();
        let mut x1 = affine(att, c, w.p.attn_proj.weight, w.p.attn_proj.bias);
        dropout_add_into(&mut x1, x, self.dropout.map(|d| (d.attn_proj, d.p, first)));
        x1
    }

    /// The backward pass: dx written into `dx` (as long as `x`), and the weights' gradients
    /// returned by name.
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
        let Activations { qkv, att, h, kept } = act;
        let mut saved = Recall {
            op: self,
            w,
            x,
            first: batch_offset(dims),
            kept,
        };
        let x1 = saved.take_x1(&att);
        let (dln2, fc, mlp_proj) = self.mlp_branch_backward(w, dims, dy, h, &x1, &mut saved);
        let (dx1, ln_2) = self.ln2_backward(w, x1, dln2, dy);
        let (dln1, qkv, attn_proj) =
            self.attention_branch_backward(w, dims, &dx1, qkv, att, &mut saved);
        let ln_1 = self.ln1_backward(w, x, dln1, &dx1, dx);
        block_gradients(dims.c, ln_1, qkv, attn_proj, ln_2, fc, mlp_proj)
    }

    /// `d` `(N, C)` through the dropout mask of `seed` as the forward pass drew it (`first`:
    /// the number of d's first element in the whole batch); `None` without dropout.
    fn dropped(&self, d: &[f32], seed: fn(&BlockDropout) -> u64, first: usize) -> Option<Vec<f32>> {
        let dropout = self.dropout?;
        let mut out = vec![0.0f32; d.len()];
        dropout_forward_into(d, &mut out, seed(&dropout), dropout.p, first);
        Some(out)
    }

    /// The MLP branch backward, from dy `(N, C)` through W₄, the activation and W₃ to
    /// dL/dLN₂(x₁) `(N, C)` (written over LN₂(x₁)), with W₃'s (`fc`) and W₄'s (`mlp_proj`)
    /// gradients; `h` `(N, 4C)` becomes dL/dh, freed here.
    fn mlp_branch_backward(
        &self,
        w: &W,
        dims: &Dims,
        dy: &[f32],
        h: Vec<f32>,
        x1: &[f32],
        saved: &mut Recall,
    ) -> (Vec<f32>, Affine<Vec<f32>>, Affine<Vec<f32>>) {
        let (n, c) = (dims.b * dims.t, dims.c);
        let hid = h.len() / n;
        let dm_own = self.dropped(dy, |d| d.mlp_proj, batch_offset(dims));
        let dm = dm_own.as_deref().unwrap_or(dy);
        let d_mlp_b = w.p.mlp_proj.bias.map(|_| column_sums(dm, c));
        let (d_mlp_w, g) = mlp_backward(
            self.activation,
            h,
            saved.take_g(),
            dm,
            w.p.mlp_proj.weight,
            c,
            hid,
            self.mlp_rows,
        ); // g: dL/dh
        drop(dm_own);
        let d_fc_b = w.p.fc.bias.map(|_| column_sums(&g, hid));
        let mut b = saved.take_ln2(x1);
        let d_fc_w = linear_backward_weight(&g, hid, &b, c);
        linear_backward_input_into(&g, hid, w.p.fc.weight, c, &mut b); // b now holds dL/dLN₂(x₁)
        drop(g);
        let fc = Affine {
            weight: d_fc_w,
            bias: d_fc_b,
        };
        let mlp_proj = Affine {
            weight: d_mlp_w,
            bias: d_mlp_b,
        };
        (b, fc, mlp_proj)
    }

    /// The second LayerNorm's backward and the residual: dx₁ `(N, C)` = dy + LN₂ᵀ(dln2), and
    /// LN₂'s gradients; x₁ and dln2 `(N, C)` are freed here.
    fn ln2_backward(
        &self,
        w: &W,
        x1: Vec<f32>,
        dln2: Vec<f32>,
        dy: &[f32],
    ) -> (Vec<f32>, Affine<Vec<f32>>) {
        let (mut dx1, d_ln2_w, d_ln2_b) =
            layer_norm_backward(&x1, w.p.ln_2.weight, &dln2, self.eps);
        drop(x1);
        dropout_add_into(&mut dx1, dy, None);
        let ln_2 = Affine {
            weight: d_ln2_w,
            bias: w.p.ln_2.bias.map(|_| d_ln2_b),
        };
        (dx1, ln_2)
    }

    /// The attention branch backward, from dx₁ `(N, C)` through W_O, attention and
    /// [W_Q; W_K; W_V] to dL/dLN₁(x) `(N, C)` (written over `att`), with W_O's gradient and
    /// the stacked W_QKV's `(3C, C)`; `qkv` `(N, 3C)` is freed here.
    fn attention_branch_backward(
        &self,
        w: &W,
        dims: &Dims,
        dx1: &[f32],
        qkv: Vec<f32>,
        att: Vec<f32>,
        saved: &mut Recall,
    ) -> (Vec<f32>, Affine<Vec<f32>>, Affine<Vec<f32>>) {
        let c = dims.c;
        let dp_own = self.dropped(dx1, |d| d.attn_proj, batch_offset(dims));
        let dp = dp_own.as_deref().unwrap_or(dx1);
        let d_proj_b = w.p.attn_proj.bias.map(|_| column_sums(dp, c));
        let d_proj_w = linear_backward_weight(dp, c, &att, c);
        let mut datt = att; // att is not needed after dW_O
        linear_backward_input_into(dp, c, w.p.attn_proj.weight, c, &mut datt);
        drop(dp_own);
        let dropout = self.attention_dropout();
        let probs = saved.take_probs();
        let mut dqkv = attention::attention_backward(dims, &qkv, &datt, dropout, probs.as_deref());
        if let Some(rope) = &self.rope {
            rope.apply_qkv(&mut dqkv, c, dims.t, 0, true); // the gradients of the unturned Q, K
        }
        drop((qkv, probs));
        let d_qkv_b = w.bqkv.as_ref().map(|_| column_sums(&dqkv, 3 * c));
        let mut a = datt; // datt is not needed any more
        let ln1 = saved.take_ln1(&mut a);
        let d_qkv_w = linear_backward_weight(&dqkv, 3 * c, &ln1, c);
        drop(ln1);
        linear_backward_input_into(&dqkv, 3 * c, &w.wqkv, c, &mut a); // a now holds dL/dLN₁(x)
        let qkv = Affine {
            weight: d_qkv_w,
            bias: d_qkv_b,
        };
        let attn_proj = Affine {
            weight: d_proj_w,
            bias: d_proj_b,
        };
        (a, qkv, attn_proj)
    }

    /// The first LayerNorm's backward and the residual: dx `(N, C)` = dx₁ + LN₁ᵀ(dln1), written
    /// into `dx`, and LN₁'s gradients; dln1 `(N, C)` is freed here.
    fn ln1_backward(
        &self,
        w: &W,
        x: &[f32],
        dln1: Vec<f32>,
        dx1: &[f32],
        dx: &mut [f32],
    ) -> Affine<Vec<f32>> {
        let (d_ln1_w, d_ln1_b) = layer_norm_backward_into(x, w.p.ln_1.weight, &dln1, self.eps, dx);
        dropout_add_into(dx, dx1, None);
        Affine {
            weight: d_ln1_w,
            bias: w.p.ln_1.bias.map(|_| d_ln1_b),
        }
    }

    /// The gradients as tensors shaped as the parameters they belong to.
    fn to_tensors(&self, grads: Gradients) -> Result<BlockGrads> {
        let mut shapes = self.params.as_ref().named().into_iter();
        grads.try_map(|g| {
            let Some((_, t)) = shapes.next() else {
                bail!("block: more gradients than parameters")
            };
            Tensor::from_vec(g, t.shape(), t.device())
        })
    }

    fn dims(&self, shape: &Shape) -> Result<Dims> {
        let (b, t, c) = shape.dims3()?;
        let cw = self.params.ln_1.weight.dims1()?;
        let n_head = self.n_head;
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
        let locks = lock(&self.params)?;
        let w = W::new(&locks, None)?;
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
                let locks = lock(&self.params)?;
                let w = W::new(&locks, stacked)?;
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
                Ok((dx, merge(results)?))
            })
        })???;
        self.grads.put(self.to_tensors(grads)?);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use rand::{Rng as _, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::kernels::{self, attention::AttentionDropout};

    fn random(shape: &[usize], scale: f32, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// max |got − want| ≤ 1e-4 · max |want|.
    fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes");
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (g, w) = (values(got), values(want));
        let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
        let err = g
            .iter()
            .zip(&w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-4 * scale,
            "{what}: max error {err:e} vs scale {scale:e}"
        );
    }

    /// A block's parameters at random, with biases (on W_Q, W_K, W_V too when `qkv_bias`), for
    /// width `c`.
    fn params(c: usize, seed: u64, qkv_bias: bool) -> BlockParams<Tensor> {
        let mut seed = seed;
        let mut t = |shape: &[usize], around: f32| {
            seed += 1;
            let t = (random(shape, 0.2, seed) + around as f64).unwrap();
            Var::from_tensor(&t).unwrap().as_tensor().clone() // tracked by autograd
        };
        let mut affine = |shape: &[usize], around: f32| Affine {
            weight: t(shape, around),
            bias: Some(t(&shape[..1], 0.0)),
        };
        let (ln_1, attn_proj) = (affine(&[c], 1.0), affine(&[c, c], 0.0));
        let (ln_2, fc, mlp_proj) = (
            affine(&[c], 1.0),
            affine(&[4 * c, c], 0.0),
            affine(&[c, 4 * c], 0.0),
        );
        let mut qkv = || {
            let mut a = affine(&[c, c], 0.0);
            a.bias = a.bias.filter(|_| qkv_bias);
            a
        };
        let (w_q, w_k, w_v) = (qkv(), qkv(), qkv());
        BlockParams {
            ln_1,
            w_q,
            w_k,
            w_v,
            attn_proj,
            ln_2,
            fc,
            mlp_proj,
        }
    }

    /// One block as the fused layers compute it one op at a time, each under candle's autograd,
    /// with the block op's dropout masks:
    /// x₁ = x + drop(att(LN₁(x))·W_Oᵀ), y = x₁ + drop(GELU(LN₂(x₁)·W₃ᵀ)·W₄ᵀ).
    fn layer_by_layer(
        p: &BlockParams<Tensor>,
        n_head: usize,
        act: Activation,
        x: &Tensor,
        drop: Option<BlockDropout>,
    ) -> Tensor {
        let ln = |x: &Tensor, a: &Affine<Tensor>| {
            kernels::layer_norm::layer_norm(x, &a.weight, a.bias.as_ref(), 1e-5).unwrap()
        };
        let lin = |x: &Tensor, a: &Affine<Tensor>| {
            let y = kernels::linear::linear(x, &a.weight).unwrap();
            a.bias
                .as_ref()
                .map_or(y.clone(), |b| y.broadcast_add(b).unwrap())
        };
        let dropped = |y: Tensor, seed: fn(&BlockDropout) -> u64| match drop {
            Some(d) => kernels::dropout::dropout(&y, d.p, seed(&d)).unwrap(),
            None => y,
        };
        let qkv = Tensor::cat(
            &[
                lin(&ln(x, &p.ln_1), &p.w_q),
                lin(&ln(x, &p.ln_1), &p.w_k),
                lin(&ln(x, &p.ln_1), &p.w_v),
            ],
            2,
        )
        .unwrap();
        let att_drop = drop.map(|d| AttentionDropout {
            p: d.p,
            seed: d.attention,
        });
        let att = kernels::attention::causal_attention(&qkv, n_head, att_drop).unwrap();
        let x1 = (x + dropped(lin(&att, &p.attn_proj), |d| d.attn_proj)).unwrap();
        let h = lin(&ln(&x1, &p.ln_2), &p.fc);
        let h = match act {
            Activation::Gelu => kernels::gelu::gelu(&h).unwrap(),
            Activation::Relu2 => h.relu().unwrap().sqr().unwrap(),
            Activation::GeluTanh => h.gelu().unwrap(),
        };
        (&x1 + dropped(lin(&h, &p.mlp_proj), |d| d.mlp_proj)).unwrap()
    }

    #[test]
    fn block_op_matches_the_layer_by_layer_block() {
        // (heads, width, dropout, keep activations, MLP backward streamed in blocks of 16 rows,
        // activation, biases on W_Q, W_K, W_V)
        let (gelu, relu2, tanh) = (Activation::Gelu, Activation::Relu2, Activation::GeluTanh);
        let cases = [
            (1, 32, 0.0, true, false, gelu, false),
            (2, 32, 0.0, false, true, gelu, false),
            (3, 24, 0.3, true, true, gelu, false),
            (1, 32, 0.3, false, false, gelu, false),
            (2, 32, 0.0, true, false, relu2, false),
            (2, 24, 0.3, false, true, relu2, false),
            (2, 32, 0.0, true, false, tanh, true),
            (1, 24, 0.3, false, true, tanh, true),
        ];
        for (n_head, c, p, keep, streamed, act, qkv_bias) in cases {
            let block = params(c, 100, qkv_bias);
            for tt in [1, 13, 32] {
                let what =
                    format!("{act:?} heads {n_head} C {c} p {p} keep {keep}/{streamed} qkv bias {qkv_bias} T {tt}");
                let x = random(&[3, tt, c], 1.0, 5);
                let r = random(&[3, tt, c], 1.0, 6);
                let mut rng = crate::rng::seeded(77);
                let dropout = (p > 0.0).then(|| BlockDropout {
                    p,
                    attention: rng.random(),
                    attn_proj: rng.random(),
                    mlp_proj: rng.random(),
                });
                // Layer by layer.
                let x1 = Var::from_tensor(&x).unwrap();
                let y1 = layer_by_layer(&block, n_head, act, x1.as_tensor(), dropout);
                let g1 = (&y1 * &r).unwrap().sum_all().unwrap().backward().unwrap();
                // The whole block as one op, with the same seeds.
                let x2 = Var::from_tensor(&x).unwrap();
                let sink = GradSlot::default();
                let (params, slot) = (block.clone(), sink.clone());
                let mut op = BlockOp::new(params, n_head, 1e-5, act, dropout, keep, slot);
                if streamed {
                    op = op.with_streamed_mlp(16);
                }
                let y2 = op.apply(x2.as_tensor()).unwrap();
                let g2 = (&y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
                assert_close(&format!("{what}: output"), &y2, &y1);
                assert_close(
                    &format!("{what}: input gradient"),
                    g2.get(x2.as_tensor()).unwrap(),
                    g1.get(x1.as_tensor()).unwrap(),
                );
                let got = sink
                    .take()
                    .expect("backward left the weights' gradients")
                    .named();
                let weights = block.clone().named();
                assert_eq!(got.len(), weights.len(), "{what}: every weight's gradient");
                let biases = if qkv_bias { 7 } else { 4 };
                assert_eq!(got.len(), 9 + biases, "{what}: 9 weights and their biases");
                let max_abs = |t: &Tensor| {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
                };
                for ((name, w), (_, g)) in weights.iter().zip(&got) {
                    let what = format!("{what}: gradient of {name} {:?}", w.dims());
                    if *name == "attn.w_k.bias" {
                        // q·(k + b) − q·k is the same for every key, and softmax ignores it:
                        // the gradient is zero up to rounding, in both.
                        let scale = max_abs(g1.get(&block.w_k.weight).unwrap());
                        assert!(max_abs(g) <= 1e-4 * scale, "{what}: not ≈ 0");
                        assert!(
                            max_abs(g1.get(w).unwrap()) <= 1e-4 * scale,
                            "{what}: not ≈ 0"
                        );
                        continue;
                    }
                    assert_close(&what, g, g1.get(w).unwrap());
                }
            }
        }
    }
}
