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

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Outputs summed in registers at a time: 128 with 512-bit vectors, 64 with 256-bit ones
    /// or when a partner thread shares the groups.
    cols: usize,
}

/// Matrix-vector products at least this large (multiply-adds) split their output groups over
/// threads; a smaller one is over before a thread could be woken.
const PARALLEL_MIN: usize = 1 << 18;

impl Dense {
    /// From `w` `(out, in)` row-major; `halves`: packed in 64 columns so that two threads can
    /// share its groups evenly.
    fn new(w: &[f32], b: Option<Vec<f32>>, d_in: usize, halves: bool) -> Dense {
        let d_out = w.len() / d_in.max(1);
        let cols = if wide_vectors() && !halves { 128 } else { 64 };
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

    fn from_affine(l: &Affine<Tensor>, halves: bool) -> Result<Dense> {
        Ok(Dense::new(
            &data(&l.weight)?,
            l.bias.as_ref().map(data).transpose()?,
            l.weight.dim(1)?,
            halves,
        ))
    }

    /// The groups of `packed` (its first one being group `g0`) for every row of `x`, into `y`,
    /// whose rows are `stride` long and start at group `g0`'s first column.
    fn groups(&self, packed: &[f32], g0: usize, x: &[f32], y: &mut [f32], stride: usize) {
        let (slab, cols) = (self.d_in * self.cols, self.cols);
        for (g, w) in packed.chunks_exact(slab).enumerate() {
            let first = g * cols;
            let n = cols.min(self.d_out - (g0 * cols + first));
            let out = Out {
                y: &mut *y,
                stride,
                first,
                n,
            };
            match cols {
                128 => slab_128(w, x, out),
                _ => slab_64(w, x, out),
            }
        }
    }

    /// [`Dense::apply`], half of the work handed to `partner` when there is one: half the
    /// column groups of a single row, or half the rows of several.
    fn apply_shared(&self, x: &[f32], y: &mut [f32], partner: Option<&Partner>) {
        let slab = self.d_in * self.cols;
        let groups = self.packed.len() / slab;
        let rows = x.len() / self.d_in;
        match partner {
            Some(p) if rows == 1 && groups >= 2 => {
                let half = groups / 2;
                let (mine, theirs) = y.split_at_mut(half * self.cols);
                let _pending = p.run(Job {
                    dense: self,
                    x: (x.as_ptr(), x.len()),
                    y: (theirs.as_mut_ptr(), theirs.len()),
                    g0: half,
                });
                let n = mine.len();
                self.groups(&self.packed[..half * slab], 0, x, mine, n);
            }
            Some(p) if rows >= 2 => {
                let half = rows / 2;
                let (x_mine, x_theirs) = x.split_at(half * self.d_in);
                let (mine, theirs) = y.split_at_mut(half * self.d_out);
                let _pending = p.run(Job {
                    dense: self,
                    x: (x_theirs.as_ptr(), x_theirs.len()),
                    y: (theirs.as_mut_ptr(), theirs.len()),
                    g0: 0,
                });
                self.groups(&self.packed, 0, x_mine, mine, self.d_out);
            }
            _ => return self.apply(x, y),
        }
        self.add_bias(y);
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.b {
            for y in y.chunks_exact_mut(self.d_out) {
                y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
    }

    /// y = x·Wᵀ (+ b) for every row of `x` `(R, in)`: `y` `(R, out)`. Every output is summed in
    /// input order, as a plain loop would, so a row gives the same bits alone or among others.
    fn apply(&self, x: &[f32], y: &mut [f32]) {
        let (slab, cols) = (self.d_in * self.cols, self.cols);
        if x.len() == self.d_in && self.packed.len() >= PARALLEL_MIN {
            // One row through a large matrix: its groups over threads, each writing its own
            // columns.
            y.par_chunks_mut(cols)
                .zip(self.packed.par_chunks(slab))
                .enumerate()
                .for_each(|(g, (y, w))| {
                    let n = y.len();
                    self.groups(w, g, x, y, n)
                });
        } else {
            self.groups(&self.packed, 0, x, y, self.d_out);
        }
        self.add_bias(y);
    }
}

/// Half of a product for the [`Partner`]: `dense`'s groups from `g0` for the rows of `x`, into
/// `y` (as raw parts: the poster keeps them alive and untouched until its [`Pending`] drops).
struct Job {
    dense: *const Dense,
    x: (*const f32, usize),
    y: (*mut f32, usize),
    g0: usize,
}

/// What the decoder and its partner thread share: jobs posted and done, counted, and the slot
/// of the latest one.
struct Shared {
    posted: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
    job: UnsafeCell<Option<Job>>,
}

// SAFETY: `job` is written only by the poster while `done == posted` (the partner is idle) and
// read only by the partner between seeing `posted` rise and raising `done` (Release/Acquire).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// Spins of an idle partner before it sleeps: about a millisecond.
const SPINS: u32 = 1 << 16;

/// A second thread that takes half of each product of a token (or of a feed's rows): one
/// token's products are a few microseconds each, shorter than waking a sleeping thread, so
/// the partner spins between jobs while the decoder is alive. Sharing the work halves what
/// each core reads from memory per token.
struct Partner {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Partner {
    fn new() -> Partner {
        let shared = Arc::new(Shared {
            posted: AtomicU64::new(0),
            done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            job: UnsafeCell::new(None),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = 0;
            loop {
                let mut spins = 0u32;
                while s.posted.load(Ordering::Acquire) == seen {
                    if s.stop.load(Ordering::Acquire) {
                        return;
                    }
                    // Spin through the gaps between a token's products; sleep when the
                    // decoder has been idle for a while (`run` wakes it).
                    spins = spins.saturating_add(1);
                    match spins < SPINS {
                        true => std::hint::spin_loop(),
                        false => std::thread::park(),
                    }
                }
                seen += 1;
                // SAFETY: see `Shared`; the poster keeps the job's data alive until `done`.
                if let Some(job) = unsafe { (*s.job.get()).take() } {
                    let dense = unsafe { &*job.dense };
                    let x = unsafe { std::slice::from_raw_parts(job.x.0, job.x.1) };
                    let y = unsafe { std::slice::from_raw_parts_mut(job.y.0, job.y.1) };
                    let slab = dense.d_in * dense.cols;
                    dense.groups(&dense.packed[job.g0 * slab..], job.g0, x, y, dense.d_out);
                }
                s.done.store(seen, Ordering::Release);
            }
        });
        Partner {
            shared,
            thread: Some(thread),
        }
    }

    /// Posts `job`; the partner starts on it at once. The job is waited for when the returned
    /// guard drops, so its slices outlive the partner's use even if the caller unwinds.
    fn run(&self, job: Job) -> Pending<'_> {
        // SAFETY: the partner is idle (every posted job is done), so nothing reads the slot.
        unsafe { *self.shared.job.get() = Some(job) };
        self.shared.posted.fetch_add(1, Ordering::Release);
        if let Some(t) = &self.thread {
            t.thread().unpark(); // one atomic operation unless the partner sleeps
        }
        Pending(self)
    }

    /// Waits until the partner has finished the job posted last.
    fn wait(&self) {
        let posted = self.shared.posted.load(Ordering::Relaxed);
        let mut spins = 0u32;
        while self.shared.done.load(Ordering::Acquire) != posted {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) && self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                panic!("the decoder's partner thread stopped before finishing its work");
            }
        }
    }
}

/// A posted job, waited for on drop.
struct Pending<'a>(&'a Partner);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.wait();
    }
}

impl Drop for Partner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
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
                    proj: Dense::from_affine(&p.attn_proj, two)?,
                    ln_2: Norm::new(&p.ln_2, eps)?,
                    fc: Dense::from_affine(&p.fc, two)?,
                    fc_proj: Dense::from_affine(&p.mlp_proj, two)?,
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
            partner: two.then(Partner::new),
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
