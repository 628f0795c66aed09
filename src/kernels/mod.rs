//! tinygpt's own CPU kernels for the training hot path, each a candle custom op with its
//! backward pass, so a model built from them trains with candle's autograd like any other.
//! They compute math on tensors and slices (a LayerNorm, a whole block given its weights) and
//! know nothing of the model, its config or the CLI: [`crate::engine`] translates a model into
//! calls to them.
//!
//! Why by hand: candle's CPU elementwise and reduction ops run one scalar at a time, and its
//! fused `softmax_last_dim` / `layer_norm` have no backward. Each kernel here is
//! - **fused**: one pass over memory does what the composed version does in five to ten ops
//!   (LayerNorm is ten candle ops forward and twenty backward, attention a dozen);
//! - **vectorised**: the per-row loops are written so LLVM turns them into AVX-512 or AVX2+FMA
//!   code, chosen at run time by [`multiversion`] (with a portable fallback); `exp` and `erf`
//!   are branch-free polynomials ([`math`]) so that they vectorise too;
//! - **parallel**: rows (or (batch, head) pairs) are split over rayon's threads in fixed chunks,
//!   and partial sums are added in chunk order, so results do not depend on thread timing.
//!
//! The reference model ([`crate::model`], candle's composed ops) is the readable version and
//! the oracle: `tests/kernels.rs` checks every op here, forward and backward, against it.
//! Measurements, history and what was tried: `dev/PERFORMANCE.md`.
//!
//! ## Naming
//!
//! Every module names its functions for an op `op` (`gelu`, `layer_norm`, `linear`, …) alike:
//!
//! | name | takes and gives |
//! |---|---|
//! | `op(x: &Tensor, …) -> Result<Tensor>` | the candle custom op, forward and backward |
//! | `op_forward(x: &[f32], …) -> Vec<f32>` | the forward pass on slices, into a new buffer |
//! | `op_forward_into(…, y: &mut [f32])` | the same into the caller's buffer |
//! | `op_forward_serial_into(…)` | the same on the calling thread (the decoder's single rows) |
//! | `op_backward…` | the backward pass, same suffixes; `_over_input` overwrites the input |
//! | `op_…_ptr(…, y: *mut f32)` | unsafe: through a raw pointer, for `gemm`, which never reads it |
//!
//! Private per-chunk loops (the [`multiversion`] bodies) end in `_chunk` or `_rows`.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod block;
pub mod cross_entropy;
pub mod dropout;
pub mod gelu;
pub mod gemv;
pub mod layer_norm;
pub mod linear;
pub mod math;
pub mod matmul;
pub mod muon;
pub mod partner;
pub mod positions;
pub mod rope;

use std::mem::MaybeUninit;

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// The f32 elements of a contiguous CPU storage viewed through `layout`.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: expected an f32 tensor")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: expected a contiguous tensor")
    };
    Ok(&v[a..b])
}

/// The f32 elements of a contiguous CPU storage viewed through `layout`, for an in-place op
/// (a parameter's update).
pub(crate) fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: parameters must be f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: parameters must be contiguous")
    };
    Ok(&mut v[a..b])
}

/// Runs `f` on the elements of `t` (made contiguous first if it is not).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(f(f32_slice(s, layout, op)?)),
        _ => bail!("{op}: the fused kernels run on the CPU only"),
    }
}

/// A buffer of `n` floats filled by `write`, which must store every element through the
/// pointer it gets (a matmul that does not read its destination): it skips zeroing memory
/// that is overwritten at once.
pub(crate) fn written_buffer(n: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    write(v.as_mut_ptr());
    // SAFETY: `write` initialised all n elements (the callers' contract).
    unsafe { v.set_len(n) };
    v
}

/// `x` mapped chunk by chunk, in parallel, into a new buffer of its length that is not zeroed
/// first: `f(x_chunk, y_chunk)` gets chunks of `chunk` elements (the last one shorter) of both.
///
/// # Safety
/// `f` must initialise every element of the `y_chunk` it is given.
pub(crate) unsafe fn mapped_in_chunks(
    x: &[f32],
    chunk: usize,
    f: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(x.len());
    y.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| f(x, y));
    // SAFETY: the chunks cover all x.len() elements, and `f` wrote each one (the contract).
    unsafe { y.set_len(x.len()) };
    y
}

/// `y` seen as possibly uninitialised memory, for a kernel written for both.
///
/// # Safety
/// Only initialised values may be written through the result.
pub(crate) unsafe fn as_uninit(y: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller writes only initialised values.
    unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// Rows handed to one rayon task: enough work (~16k elements) to pay for the task.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// Elements handed to one rayon task by the purely elementwise kernels.
pub(crate) const ELEMS_PER_TASK: usize = 16 * 1024;

/// Runs `f`, the forward and backward passes of a batch of `rows` rows (B·T), where the kernels
/// run best: on one of rayon's worker threads when the batch is small enough for its blocks to
/// run as halves ([`block::SPLIT_ROWS`]), else on the calling thread.
///
/// A pass is some hundred parallel kernels with short serial stretches between them; started
/// from a thread outside the pool, each kernel hands its work to the pool and puts the caller
/// to sleep until it is done (two context switches and a wake-up per kernel). Started from a
/// worker, the kernels split their work with the other workers directly. Large batches stay on
/// the calling thread: their kernels are long, so hand-offs cost little, and their largest
/// buffers would be allocated on a worker thread, from a glibc arena that serves anything over
/// 64 MiB with fresh pages every time.
pub fn in_pool<R: Send>(rows: usize, f: impl FnOnce() -> R + Send) -> R {
    if rows <= block::SPLIT_ROWS {
        rayon::scope(|_| f())
    } else {
        f()
    }
}
