//! Muon's update of a 2-D weight (Keller Jordan's optimizer for hidden layers): momentum, then
//! the momentum's nearest semi-orthogonal matrix by Newton–Schulz iterations, applied in place.
//!
//! For a weight W `(rows, cols)` with gradient g (times `grad_scale`):
//! ```text
//! buf ← β·buf + (1 − β)·g            u = (1 − β)·g + β·buf          (Nesterov momentum)
//! O = NS(u)                           ≈ U·Vᵀ where u = U·Σ·Vᵀ: every singular value near 1
//! W ← W·decay − lr·√max(1, rows/cols)·O
//! ```
//! Orthogonalising makes every direction of the update move as far, however unevenly the
//! gradient spreads over them; the iteration needs only matrix products (no SVD), run here on
//! `gemm` ([`super::matmul`]).

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};

use super::matmul::{matmul, MatMut, MatRef};

/// The quintic X ← a·X + b·(X·Xᵀ)·X + c·(X·Xᵀ)²·X, with the coefficients of Keller Jordan's
/// Muon: chosen to pull singular values anywhere in (0, 1] into about [0.7, 1.2] in five steps,
/// as fast as possible rather than exactly to 1.
const NS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);

/// Newton–Schulz iterations per update.
pub const NS_STEPS: usize = 5;

/// The numbers of one Muon step.
#[derive(Debug, Clone, Copy)]
pub struct MuonStep {
    pub lr: f32,
    /// Decoupled weight decay: W ← W·decay before the update.
    pub decay: f32,
    /// Momentum β.
    pub momentum: f32,
    /// Gradient clipping's scale.
    pub grad_scale: f32,
}

/// `g` `(rows, cols)` row-major orthogonalised by [`NS_STEPS`] Newton–Schulz iterations: the
/// same shape, its singular vectors kept and its singular values pushed towards 1.
pub fn orthogonalize(g: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    // Work on the wide orientation, so that X·Xᵀ is the smaller square.
    let (r, c, wide) = if rows <= cols {
        (rows, cols, g.to_vec())
    } else {
        (cols, rows, transpose(g, rows, cols))
    };
    let norm = g.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
    let mut x: Vec<f32> = wide.iter().map(|&v| v / (norm + 1e-7)).collect();
    let (a, b, cc) = NS;
    let mut gram = vec![0.0f32; r * r];
    let mut poly = vec![0.0f32; r * r];
    let mut next = vec![0.0f32; r * c];
    for _ in 0..NS_STEPS {
        // SAFETY: every buffer is row-major with the dimensions given; outputs do not alias
        // inputs.
        unsafe {
            // gram = X·Xᵀ
            let xt = MatRef::transposed(&x, c);
            let gm = MatMut::row_major(&mut gram, r);
            matmul(r, r, c, gm, false, MatRef::row_major(&x, c), xt, 1.0);
            // poly = b·gram + c·gram·gram
            poly.iter_mut().zip(&gram).for_each(|(p, &g)| *p = b * g);
            let (gr, pm) = (MatRef::row_major(&gram, r), MatMut::row_major(&mut poly, r));
            matmul(r, r, r, pm, true, gr, gr, cc);
            // next = a·X + poly·X
            next.iter_mut().zip(&x).for_each(|(n, &v)| *n = a * v);
            let nm = MatMut::row_major(&mut next, c);
            matmul(
                r,
                c,
                r,
                nm,
                true,
                MatRef::row_major(&poly, r),
                MatRef::row_major(&x, c),
                1.0,
            );
        }
        std::mem::swap(&mut x, &mut next);
    }
    if rows <= cols {
        x
    } else {
        transpose(&x, cols, rows)
    }
}

/// `m` `(rows, cols)` row-major, transposed.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; m.len()];
    for (i, row) in m.chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
}

/// One Muon step of the 2-D weight `param` `(rows, cols)` with gradient `g` and momentum buffer
/// `buf`, applied to its storage in place.
pub fn muon_update_tensor(param: &Tensor, g: &[f32], buf: &mut [f32], s: &MuonStep) -> Result<()> {
    let (rows, cols) = param.dims2()?;
    if g.len() != rows * cols || buf.len() != g.len() {
        bail!(
            "muon: {rows}×{cols} weight, {} gradients, {} momenta",
            g.len(),
            buf.len()
        )
    }
    let beta = s.momentum;
    let mut u = vec![0.0f32; g.len()];
    for ((u, b), &g) in u.iter_mut().zip(buf.iter_mut()).zip(g) {
        let g = g * s.grad_scale;
        *b = beta * *b + (1.0 - beta) * g;
        *u = (1.0 - beta) * g + beta * *b;
    }
    let o = orthogonalize(&u, rows, cols);
    let step = s.lr * (rows as f32 / cols as f32).max(1.0).sqrt();
    param.inplace_op1(&InPlace {
        o: RefCell::new(o),
        decay: s.decay,
        step,
    })
}

struct InPlace {
    o: RefCell<Vec<f32>>,
    decay: f32,
    step: f32,
}

impl InplaceOp1 for InPlace {
    fn name(&self) -> &'static str {
        "tinygpt-muon"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let p = super::f32_slice_mut(storage, layout, "muon")?;
        let o = self.o.borrow();
        if p.len() != o.len() {
            bail!("muon: {} parameters, {} updates", p.len(), o.len())
        }
        for (p, &o) in p.iter_mut().zip(o.iter()) {
            *p = *p * self.decay - self.step * o;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `(rows, cols)` matrix with `s[i]` at (pᵢ, qᵢ) for permutations p, q: its singular values
    /// are `s`, its singular vectors unit vectors, so its orthogonalisation has ones there.
    fn scrambled_diagonal(rows: usize, cols: usize, s: &[f32]) -> (Vec<f32>, Vec<(usize, usize)>) {
        let mut m = vec![0.0f32; rows * cols];
        let at: Vec<(usize, usize)> = (0..s.len())
            .map(|i| ((i * 7 + 3) % rows, (i * 5 + 1) % cols))
            .collect();
        for (&(r, c), &v) in at.iter().zip(s) {
            m[r * cols + c] = v;
        }
        (m, at)
    }

    #[test]
    fn singular_values_go_to_about_one_and_vectors_stay() {
        // Singular values over two orders of magnitude, wide and tall shapes.
        for (rows, cols) in [(8, 24), (24, 8), (16, 16)] {
            let n = rows.min(cols);
            let s: Vec<f32> = (0..n)
                .map(|i| 10f32.powf(-2.0 * i as f32 / n as f32))
                .collect();
            let (m, at) = scrambled_diagonal(rows, cols, &s);
            assert_eq!(at.iter().collect::<std::collections::HashSet<_>>().len(), n);
            let o = orthogonalize(&m, rows, cols);
            for (k, v) in o.iter().enumerate() {
                let here = at.iter().position(|&(r, c)| r * cols + c == k);
                match here {
                    Some(i) => assert!(
                        (0.65..=1.25).contains(v),
                        "{rows}×{cols}: singular value {} became {v}",
                        s[i]
                    ),
                    None => assert!(v.abs() < 1e-5, "{rows}×{cols}: off-support {v}"),
                }
            }
        }
    }

    #[test]
    fn update_follows_the_formula() {
        let dev = candle_core::Device::Cpu;
        let (rows, cols) = (6, 3);
        let w0: Vec<f32> = (0..18).map(|i| (i as f32 * 0.3).sin()).collect();
        let g: Vec<f32> = (0..18).map(|i| (i as f32 * 0.7).cos()).collect();
        let b0: Vec<f32> = (0..18).map(|i| (i as f32 * 0.2).sin() * 0.1).collect();
        let w = candle_core::Var::from_vec(w0.clone(), (rows, cols), &dev).unwrap();
        let mut buf = b0.clone();
        let s = MuonStep {
            lr: 0.02,
            decay: 0.99,
            momentum: 0.9,
            grad_scale: 0.5,
        };
        muon_update_tensor(w.as_tensor(), &g, &mut buf, &s).unwrap();
        let u: Vec<f32> = (0..18)
            .map(|i| {
                let b = 0.9 * b0[i] + 0.1 * g[i] * 0.5;
                assert!((buf[i] - b).abs() < 1e-7);
                0.1 * g[i] * 0.5 + 0.9 * b
            })
            .collect();
        let o = orthogonalize(&u, rows, cols);
        let got = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..18 {
            let want = w0[i] * 0.99 - 0.02 * 2f32.sqrt() * o[i];
            assert!((got[i] - want).abs() < 1e-6, "{i}: {} vs {want}", got[i]);
        }
    }
}
