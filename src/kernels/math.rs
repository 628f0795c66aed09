//! Branch-free `exp`, `erfc` and GELU for f32, written with plain arithmetic and bit casts so
//! that a loop calling them vectorises (libm's versions are opaque calls, one element at a time).
//! Each is `#[inline(always)]` so that it is compiled with the caller's target features.

use std::f32::consts::{FRAC_1_SQRT_2, LOG2_E};

/// a·b + c in one rounding. In the vectorised callers (compiled with FMA enabled) this is one
/// `vfmadd` instruction: half the instructions and half the dependency chain of a multiply
/// then an add, which Rust never fuses on its own. (On a CPU without FMA it is a libm call:
/// correct, slow; every x86-64 CPU since 2013 has FMA.)
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// 1.5·2²³: adding it to a float in (−2²², 2²²) leaves round(x) in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// ln 2 split in two so that n·ln2 is exact in the high part (Cody and Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// eˣ with a relative error of a few ulp; 0 below −87 (where eˣ is subnormal), +∞ is never
/// reached (inputs are clamped at 88).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 88.0);
    // eˣ = 2ⁿ · eʳ with n = round(x / ln 2) and |r| ≤ ln2 / 2.
    let t = fma(xc, LOG2_E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = fma(-n, LN2_LO, fma(-n, LN2_HI, xc));
    // Taylor polynomial of degree 7: truncation error < 1e-8 on |r| ≤ 0.347.
    let p = fma(r, 1.0 / 5040.0, 1.0 / 720.0);
    let p = fma(r, p, 1.0 / 120.0);
    let p = fma(r, p, 1.0 / 24.0);
    let p = fma(r, p, 1.0 / 6.0);
    let p = fma(r, p, 0.5);
    let p = fma(r, p, 1.0);
    let p = fma(r, p, 1.0);
    // Add n to p's exponent (p ∈ [0.7, 1.42], n ≥ −126: the result stays a normal float).
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let y = f32::from_bits((p.to_bits() as i32).wrapping_add(n_bits << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// erfc(z) for z ≥ 0 with a fractional error below ~2e-7 (a Chebyshev fit in t = 1/(1 + z/2),
/// from Numerical Recipes), so that the tails of GELU keep their relative precision.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the published coefficients, as printed
pub fn erfc_pos(z: f32) -> f32 {
    let (t, u) = erfc_pos_parts(z);
    t * exp(u)
}

/// erfc(z) = t·eᵘ for z ≥ 0 ([`erfc_pos`]): (t, u), for loops that take the `exp` in a pass
/// of its own.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the published coefficients, as printed
pub fn erfc_pos_parts(z: f32) -> (f32, f32) {
    let t = 1.0 / fma(0.5, z, 1.0);
    let p = fma(t, 0.170_872_77, -0.822_152_23);
    let p = fma(t, p, 1.488_515_87);
    let p = fma(t, p, -1.135_203_98);
    let p = fma(t, p, 0.278_868_07);
    let p = fma(t, p, -0.186_288_06);
    let p = fma(t, p, 0.096_784_18);
    let p = fma(t, p, 0.374_091_96);
    let p = fma(t, p, 1.000_023_7);
    let poly = fma(t, p, -1.265_512_2);
    (t, fma(-z, z, poly))
}

/// Φ(x), the standard normal CDF: ½·erfc(−x/√2).
#[inline(always)]
pub fn normal_cdf(x: f32) -> f32 {
    let half_tail = 0.5 * erfc_pos(x.abs() * FRAC_1_SQRT_2);
    if x >= 0.0 {
        1.0 - half_tail
    } else {
        half_tail
    }
}

/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// GELU(x) = x·Φ(x) (the exact, erf-based form).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let (t, u) = erfc_pos_parts(x.abs() * FRAC_1_SQRT_2);
    gelu_from_parts(x, t, u)
}

/// GELU(x) given erfc(|x|/√2) = t·eᵘ ([`erfc_pos_parts`]); equal to [`gelu`] bit for bit.
#[inline(always)]
pub fn gelu_from_parts(x: f32, t: f32, u: f32) -> f32 {
    let half_tail = 0.5 * (t * exp(u));
    x * if x >= 0.0 { 1.0 - half_tail } else { half_tail }
}

/// GELU′(x) = Φ(x) + x·φ(x), with φ the standard normal density.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    fma(x * INV_SQRT_2PI, exp(-0.5 * x * x), normal_cdf(x))
}

/// GELU′(x) from x and y = GELU(x) already computed: Φ(x) = y / x (½ near 0), so only φ
/// costs an `exp`. Half the work of [`gelu_grad`], for a backward pass that kept GELU's output.
#[inline(always)]
pub fn gelu_grad_from_output(x: f32, y: f32) -> f32 {
    let cdf = if x.abs() > 1e-30 { y / x } else { 0.5 };
    fma(x * INV_SQRT_2PI, exp(-0.5 * x * x), cdf)
}

/// Σ xs with 16 independent accumulators (the loop vectorises; a single running sum cannot,
/// because float addition is not associative).
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    let mut s = 0.0;
    for r in chunks.remainder() {
        s += r;
    }
    acc.iter().sum::<f32>() + s
}

/// Σ f(a[i], b[i]) with 16 accumulators.
#[inline(always)]
pub fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += f(x[i], y[i]);
        }
    }
    let mut s = 0.0;
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        s += f(x, y);
    }
    acc.iter().sum::<f32>() + s
}

/// Σ f(a[i], b[i], c[i]) with 16 accumulators, as [`sum_zip`].
#[inline(always)]
pub fn sum_zip3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0.0f32; 16];
    let (mut ca, mut cb, mut cc) = (a.chunks_exact(16), b.chunks_exact(16), c.chunks_exact(16));
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for i in 0..16 {
            acc[i] += f(x[i], y[i], z[i]);
        }
    }
    let mut s = 0.0;
    for ((&x, &y), &z) in ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
    {
        s += f(x, y, z);
    }
    acc.iter().sum::<f32>() + s
}

/// max of xs (−∞ for an empty slice).
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &r in chunks.remainder() {
        m = m.max(r);
    }
    acc.iter().fold(m, |a, &b| a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f32, b: f64) -> f64 {
        ((a as f64 - b) / b.abs().max(1e-30)).abs()
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(rel(exp(x), (x as f64).exp()));
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn gelu_matches_erf_definition() {
        // Reference in f64 from an independent erfc series-free formula: Φ via libm's erfc.
        let mut x = -9.0f32;
        while x < 9.0 {
            let phi = 0.5 * libm_erfc(-(x as f64) / std::f64::consts::SQRT_2);
            let want = x as f64 * phi;
            let err = (gelu(x) as f64 - want).abs();
            assert!(
                err <= 1e-6 * want.abs() + 1e-7,
                "gelu({x}) = {} vs {want}",
                gelu(x)
            );
            x += 0.01;
        }
    }

    #[test]
    fn gelu_grad_from_output_matches_gelu_grad() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let (want, got) = (gelu_grad(x), gelu_grad_from_output(x, gelu(x)));
            assert!(
                (got - want).abs() <= 1e-6 * want.abs() + 1e-7,
                "x = {x}: {got} vs {want}"
            );
            x += 0.003;
        }
        for x in [0.0f32, -0.0, 1e-38, -1e-35, 1e-20] {
            assert!(
                (gelu_grad_from_output(x, gelu(x)) - 0.5).abs() < 1e-6,
                "x = {x}"
            );
        }
    }

    /// erfc in f64 by its continued fraction / series, as an independent oracle.
    fn libm_erfc(x: f64) -> f64 {
        // erf by its Taylor series for |x| < 3, the asymptotic continued fraction beyond.
        if x.abs() < 3.0 {
            let mut sum = 0.0f64;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 5.0 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
                if n > 200.0 {
                    break;
                }
            }
            1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
        } else if x > 0.0 {
            // Lentz-free continued fraction evaluated backwards.
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (x + f);
            }
            (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
        } else {
            2.0 - libm_erfc(-x)
        }
    }

    #[test]
    fn reductions_handle_every_length() {
        for n in [0usize, 1, 15, 16, 17, 33, 130] {
            let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let want: f32 = xs.iter().sum();
            assert!((sum(&xs) - want).abs() < 1e-5, "n = {n}");
            let m = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&xs), m);
            let d: f32 = xs.iter().map(|x| x * x).sum();
            assert!((sum_zip(&xs, &xs, |a, b| a * b) - d).abs() < 1e-4);
            let ys: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let t: f32 = (0..n).map(|i| xs[i] * ys[i] - 2.0 * xs[i]).sum();
            let got = sum_zip3(&xs, &ys, &xs, |a, b, c| a * b - 2.0 * c);
            assert!((got - t).abs() < 1e-4, "n = {n}: {got} vs {t}");
        }
    }
}
