//! Matrix products on the `gemm` crate (candle's own CPU backend), with the work split over
//! rayon's threads by hand: gemm's own threading leaves a core idle on the thin shapes of the
//! weight gradients (a 128×768 by 768×512 product ran at one core's speed), and splitting the
//! output into one block per thread keeps both cores busy on every shape we meet.

use rayon::prelude::*;

/// A read-only strided matrix: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// A writable strided matrix.
#[derive(Clone, Copy)]
pub struct MatMut {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: the pointers are only dereferenced inside `matmul`, whose callers guarantee that the
// memory is valid and that concurrent blocks write disjoint parts of `dst`.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}
unsafe impl Send for MatMut {}
unsafe impl Sync for MatMut {}

impl MatRef {
    /// Row-major `(rows, cols)` with leading dimension `ld`.
    pub fn row_major(data: &[f32], ld: usize) -> MatRef {
        MatRef {
            ptr: data.as_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn transposed(data: &[f32], ld: usize) -> MatRef {
        MatRef {
            ptr: data.as_ptr(),
            rs: 1,
            cs: ld as isize,
        }
    }

    /// The same strides, starting `elems` elements further on.
    pub fn skip(self, elems: usize) -> MatRef {
        MatRef {
            ptr: self.ptr.wrapping_add(elems),
            ..self
        }
    }

    /// The same strides, starting at element (i, j).
    pub fn offset(self, i: usize, j: usize) -> MatRef {
        MatRef {
            ptr: self
                .ptr
                .wrapping_offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }
}

impl MatMut {
    /// Row-major `(rows, cols)` with leading dimension `ld`.
    pub fn row_major(data: &mut [f32], ld: usize) -> MatMut {
        MatMut {
            ptr: data.as_mut_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The same strides, starting `elems` elements further on.
    pub fn skip(self, elems: usize) -> MatMut {
        MatMut {
            ptr: self.ptr.wrapping_add(elems),
            ..self
        }
    }

    /// Row-major with leading dimension `ld` over memory that may be uninitialised.
    pub fn raw(ptr: *mut f32, ld: usize) -> MatMut {
        MatMut {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The same strides, starting at element (i, j).
    pub fn offset(self, i: usize, j: usize) -> MatMut {
        MatMut {
            ptr: self
                .ptr
                .wrapping_offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }
}

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether products on this thread run on it alone ([`serially`]).
fn serial_here() -> bool {
    SERIAL.with(|s| s.get())
}

/// Runs `f` with every [`matmul`] it makes on the calling thread, unsplit: for work that is
/// already one of several parts running side by side (the halves of a block op), where
/// splitting each product again only packs its operands twice.
pub fn serially<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.with(|s| s.replace(true));
    let r = f();
    SERIAL.with(|s| s.set(before));
    r
}

/// Products smaller than this many multiply-adds run on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `dst (m×n) = [dst +] scale · lhs (m×k) · rhs (k×n)` on the calling thread.
///
/// # Safety
/// Every element addressed through the three matrices for these sizes must be valid, and
/// `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)] // BLAS's shape: sizes, three matrices, flags
pub unsafe fn matmul_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.offset(i, j).ptr = 0.0;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst.cs,
        dst.rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `dst (m×n) = [dst +] scale · lhs (m×k) · rhs (k×n)`, the output split into one block of rows
/// (or of columns, whichever is longer) per thread. Each output element is computed by one
/// call, in the same order whatever the thread count, so results are reproducible.
///
/// # Safety
/// As [`matmul_serial`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
    scale: f32,
) {
    let threads = rayon::current_num_threads();
    if threads < 2 || m * n * k < PARALLEL_MIN_WORK || serial_here() {
        return matmul_serial(m, n, k, dst, accumulate, lhs, rhs, scale);
    }
    // Blocks of a multiple of 16 along the split dimension keep gemm's micro-kernels full.
    let split_rows = m >= n;
    let len = if split_rows { m } else { n };
    let parts = threads.min(len.div_ceil(16)).max(1);
    let block = len.div_ceil(parts).div_ceil(16) * 16;
    (0..len.div_ceil(block)).into_par_iter().for_each(|p| {
        let start = p * block;
        let size = block.min(len - start);
        // SAFETY: blocks cover disjoint rows (or columns) of `dst`.
        unsafe {
            if split_rows {
                matmul_serial(
                    size,
                    n,
                    k,
                    dst.offset(start, 0),
                    accumulate,
                    lhs.offset(start, 0),
                    rhs,
                    scale,
                );
            } else {
                matmul_serial(
                    m,
                    size,
                    k,
                    dst.offset(0, start),
                    accumulate,
                    lhs,
                    rhs.offset(0, start),
                    scale,
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    /// Deterministic operands a `(m, k)` and b `(k, n)`.
    fn operands(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let a = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
            .collect();
        let b = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0)
            .collect();
        (a, b)
    }

    /// a·b through [`matmul`], row-major, over a destination that starts at `init` everywhere
    /// (which the product must overwrite).
    fn product(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], init: f32) -> Vec<f32> {
        let mut c = vec![init; m * n];
        // SAFETY: three row-major buffers of these sizes.
        unsafe {
            matmul(
                m,
                n,
                k,
                MatMut::row_major(&mut c, n),
                false,
                MatRef::row_major(a, k),
                MatRef::row_major(b, n),
                1.0,
            )
        };
        c
    }

    #[test]
    fn serially_gives_the_same_product_and_restores_the_mode() {
        let (m, n, k) = (300, 200, 100);
        let (a, b) = operands(m, n, k);
        assert!(!serial_here());
        let split = product(m, n, k, &a, &b, 0.0);
        let (unsplit, nested) = serially(|| {
            let c = product(m, n, k, &a, &b, 0.0);
            (c, serially(serial_here) && serial_here())
        });
        assert!(nested, "serial mode lost inside a nested call");
        assert!(!serial_here(), "serial mode not restored");
        assert_eq!(split, unsplit);
        let worst = split
            .iter()
            .zip(naive(m, n, k, &a, &b))
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "off by {worst}");
    }

    #[test]
    fn matches_naive_on_odd_shapes_and_strides() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (130, 67, 33),
            (17, 300, 129),
            (96, 96, 0),
        ] {
            let (a, b) = operands(m, n, k);
            let want = naive(m, n, k, &a, &b);
            let mut c = product(m, n, k, &a, &b, 1.0);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{m}x{n}x{k}: {x} vs {y}");
            }
            // Transposed operands and accumulation: c += 2·(aᵀ)ᵀ·b
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            unsafe {
                matmul(
                    m,
                    n,
                    k,
                    MatMut::row_major(&mut c, n),
                    true,
                    MatRef::transposed(&at, m),
                    MatRef::row_major(&b, n),
                    2.0,
                )
            };
            for (x, y) in c.iter().zip(&want) {
                assert!(
                    (x - 3.0 * y).abs() < 1e-3,
                    "{m}x{n}x{k}: {x} vs {}",
                    3.0 * y
                );
            }
        }
    }
}
