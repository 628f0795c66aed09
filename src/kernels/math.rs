//! Branch-free `exp`, `erf` and GELU for f32, written with plain arithmetic and bit casts so
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

/// erf(z) to within about 4·10⁻⁷ (absolute; a few ulp of values near ±1), with no `exp`:
/// erf(z) ≈ z·P(z²)/Q(z²) on |z| < 4, a rational fit of degree 5 over 5 in z² that we made
/// for this (near-minimax, weighted least squares against f64 erf), and ±1 beyond, where
/// 1 − erf(4) = 1.5·10⁻⁸ is below f32's resolution at 1. Eleven fused multiply-adds and a
/// division, and no `exp`, so it vectorises cheaply.
/// Like the usual vectorised erfs (Abramowitz and Stegun's 1 − poly·exp, 1.5·10⁻⁷ absolute),
/// it trades the tails' relative precision for an absolute bound: GELU(x) for x ≪ 0 is within
/// ~2·10⁻⁷·|x| of its tiny value, not within a few ulp of it. Training does not see it: from
/// the same weights and batches, tinygpt and PyTorch agree on every loss of a 2000-step run
/// to 3·10⁻⁶ (dev/PERFORMANCE.md, "Checked against PyTorch").
#[inline(always)]
#[allow(clippy::excessive_precision)] // the fitted coefficients, as printed by the fit
pub fn erf(z: f32) -> f32 {
    let z = z.clamp(-4.0, 4.0);
    let s = z * z;
    let p = fma(s, 1.974_799_117e-6, 2.880_458_937e-4);
    let p = fma(s, p, 4.003_827_724e-3);
    let p = fma(s, p, 5.346_802_744e-2);
    let p = fma(s, p, 1.962_530_971e-1);
    let p = fma(s, p, 1.128_378_976);
    let q = fma(s, 3.748_078_608e-5, 1.216_405_073e-3);
    let q = fma(s, q, 1.544_478_132e-2);
    let q = fma(s, q, 1.164_781_330e-1);
    let q = fma(s, q, 5.072_559_371e-1);
    let q = fma(s, q, 1.0);
    let r = z * p / q;
    // At the clamp the fit is 2 ulp short of ±1; beyond it, erf is ±1 to f32 precision.
    if s >= 16.0 {
        1.0f32.copysign(z)
    } else {
        r
    }
}

/// Φ(x), the standard normal CDF: ½ + ½·erf(x/√2).
#[inline(always)]
pub fn normal_cdf(x: f32) -> f32 {
    fma(0.5, erf(x * FRAC_1_SQRT_2), 0.5)
}

/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// GELU(x) = x·Φ(x) = ½x·(1 + erf(x/√2)) (the exact, erf-based form, as PyTorch's default).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let half_x = 0.5 * x;
    fma(half_x, erf(x * FRAC_1_SQRT_2), half_x)
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

/// √(2/π), the tanh GELU's scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The tanh GELU's cubic coefficient.
const GELU_TANH_CUBIC: f32 = 0.044_715;

/// GELU's tanh approximation (GPT-2's `gelu_new`, PyTorch's `approximate="tanh"`):
/// ½x·(1 + tanh(u)), u = √(2/π)·(x + 0.044715x³), computed as x·σ(2u) (the same function,
/// since 1 + tanh(u) = 2σ(2u)) so that one `exp` suffices.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * fma(GELU_TANH_CUBIC * x, x * x, x);
    x / (1.0 + exp(-2.0 * u))
}

/// d/dx of [`gelu_tanh`]: s + x·s·(1 − s)·2u′ with s = σ(2u), u′ = √(2/π)·(1 + 3·0.044715x²).
#[inline(always)]
pub fn gelu_tanh_grad(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * fma(GELU_TANH_CUBIC * x, x * x, x);
    let s = 1.0 / (1.0 + exp(-2.0 * u));
    let du = 2.0 * SQRT_2_OVER_PI * fma(3.0 * GELU_TANH_CUBIC * x, x, 1.0);
    fma(x * s * (1.0 - s), du, s)
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
    fn erf_is_within_its_bound_and_odd() {
        let mut worst = (0.0f64, 0.0f32);
        let mut z = -7.0f32;
        while z < 7.0 {
            let want = 1.0 - libm_erfc(z as f64);
            let err = (erf(z) as f64 - want).abs();
            if err > worst.0 {
                worst = (err, z);
            }
            assert_eq!(erf(-z).to_bits(), (-erf(z)).to_bits(), "erf(-{z})");
            z += 0.000_7;
        }
        assert!(
            worst.0 < 4.5e-7,
            "worst |error| {:e} at z = {}",
            worst.0,
            worst.1
        );
        assert_eq!(erf(0.0), 0.0);
        assert!((erf(1e-20) as f64 - 2.0 / std::f64::consts::PI.sqrt() * 1e-20).abs() < 1e-26);
        assert!((erf(1000.0) - 1.0).abs() < 1e-7 && (erf(f32::INFINITY) - 1.0).abs() < 1e-7);
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_matches_erf_definition() {
        // Reference in f64 from an independent erfc (series and continued fraction). The bound:
        // erf's absolute error times |x|/2, and a few ulp.
        let mut x = -9.0f32;
        while x < 9.0 {
            let phi = 0.5 * libm_erfc(-(x as f64) / std::f64::consts::SQRT_2);
            let want = x as f64 * phi;
            let err = (gelu(x) as f64 - want).abs();
            assert!(
                err <= 1e-6 * want.abs() + 2.5e-7 * (x as f64).abs(),
                "gelu({x}) = {} vs {want}",
                gelu(x)
            );
            x += 0.001;
        }
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(-100.0), 0.0);
        assert!((gelu(100.0) - 100.0).abs() <= 100.0 * 1e-7);
    }

    #[test]
    fn gelu_tanh_matches_its_definition_and_derivative() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd);
            let want = 0.5 * xd * (1.0 + u.tanh());
            let got = gelu_tanh(x) as f64;
            assert!(
                (got - want).abs() <= 2e-7 * want.abs() + 1e-7,
                "gelu_tanh({x}) = {got} vs {want}"
            );
            let h = 1e-3;
            let f = |x: f64| {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + u.tanh())
            };
            let want = (f(xd + h) - f(xd - h)) / (2.0 * h);
            let got = gelu_tanh_grad(x) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "gelu_tanh_grad({x}) = {got} vs {want}"
            );
            x += 0.003;
        }
        assert!(gelu_tanh(-100.0).abs() < 1e-30);
        assert_eq!(gelu_tanh(100.0), 100.0);
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
