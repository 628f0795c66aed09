//! Matrix-vector products for decoding one token (or a few): a weight matrix packed once in
//! groups of output columns that stream through memory contiguously and sum in registers.
//! Decoding is bound by reading the weights, so the layout is chosen for that read; every
//! output is summed in input order, so a row gives the same bits alone or among others.

use multiversion::multiversion;
use rayon::prelude::*;

use super::partner::{Job, Partner};

/// A weight matrix `(out, in)` packed for [`Dense::apply`], and its optional bias. The outputs
/// are cut into groups of `cols` (the last one padded with zero weights), and each group's
/// slab of Wᵀ, `(in, cols)`, is stored contiguously, so a group streams through memory in one
/// run and y = W·x is a sum of slab rows scaled by the entries of x (vectorised along the
/// output, no horizontal sums).
pub struct Dense {
    pub(super) packed: Vec<f32>,
    b: Option<Vec<f32>>,
    pub(super) d_in: usize,
    pub(super) d_out: usize,
    /// Outputs summed in registers at a time: 128 with 512-bit vectors, 64 with 256-bit ones
    /// or when a partner thread shares the groups.
    pub(super) cols: usize,
}

/// Matrix-vector products at least this large (multiply-adds) split their output groups over
/// threads; a smaller one is over before a thread could be woken.
pub const PARALLEL_MIN: usize = 1 << 18;

impl Dense {
    /// From `w` `(out, in)` row-major; `halves`: packed in 64 columns so that two threads can
    /// share its groups evenly.
    pub fn new(w: &[f32], b: Option<Vec<f32>>, d_in: usize, halves: bool) -> Dense {
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

    /// The groups of `packed` (its first one being group `g0`) for every row of `x`, into `y`,
    /// whose rows are `stride` long and start at group `g0`'s first column.
    pub(super) fn groups(
        &self,
        packed: &[f32],
        g0: usize,
        x: &[f32],
        y: &mut [f32],
        stride: usize,
    ) {
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
    pub fn apply_shared(&self, x: &[f32], y: &mut [f32], partner: Option<&Partner>) {
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
    pub fn apply(&self, x: &[f32], y: &mut [f32]) {
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
