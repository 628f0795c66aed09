//! Masked (causal) self-attention, the idea tinygpt exists to show:
//!
//! ```text
//! Q = X·W_Q,  K = X·W_K,  V = X·W_V
//! Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k + M) · V
//! ```
//!
//! where M is the causal mask: 0 where a query may look (itself and earlier tokens), −∞ after
//! it. Row i of the softmax is a probability distribution over tokens 0..=i: the weights of the
//! directed edges i → j of the attention graph.
//!
//! [`Head`] is one head with its own W_Q, W_K, W_V. [`MultiHeadAttention`] computes `n_head`
//! heads at once with batched matmuls (the heads are a tensor dimension, not a loop) and mixes
//! them with an output projection. Both compute attention through `attend`, which is
//! [`scaled_dot_product_attention`] plus dropout on the weights while training (with no RNG, as
//! in evaluation, sampling and inspection, the two are the same function call).

use candle_core::{Device, Tensor, D};
use candle_nn::kv_cache::KvCache as LayerKv;

use super::config::{INIT_STD, NORM_EPS};
use super::layers::{dropout, rms_normalize, Linear};
use super::params::VarBuilder;
use super::precision::matmul;
use super::rope::Rope;
use crate::error::Result;
use crate::rng::Rng;

/// The additive causal mask M for `t_q` queries at positions `offset..offset + t_q` over `t_k`
/// keys at positions `0..t_k`: `(t_q, t_k)`, 0 where key ≤ query, −∞ after.
pub fn causal_mask(t_q: usize, t_k: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t_q)
        .flat_map(|i| {
            (0..t_k).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (t_q, t_k), device)?)
}

/// Softmax over the last dimension, computed as exp(x − max) / Σ exp(x − max) so that scores
/// of ±1000 neither overflow nor underflow to NaN. The max is a constant shift (softmax does not
/// change under it), so it is detached from the gradient (candle-nn's `softmax` does not detach
/// it, which changes the gradient's rounding; its `softmax_last_dim` has no backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// softmax(Q·Kᵀ/√d_k + M)·V for `q` `(…, T_q, d_k)`, `k` `(…, T_k, d_k)`, `v` `(…, T_k, d_v)`
/// and an optional additive `mask` `(T_q, T_k)`. Returns `(output (…, T_q, d_v), weights (…, T_q, T_k))`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    attend(q, k, v, mask, 0.0, None)
}

/// [`scaled_dot_product_attention`] with dropout `p` on the weights while training (`rng` given).
/// The weights returned are those before dropout: the ones the model "means".
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    p: f64,
    rng: Option<&mut Rng>,
) -> Result<(Tensor, Tensor)> {
    let d_k = q.dim(D::Minus1)?;
    let scores = (matmul(q, &k.t()?)? * (1.0 / (d_k as f64).sqrt()))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let weights = softmax_last_dim(&scores)?;
    let dropped = dropout(&weights, p, rng)?;
    let out = matmul(&dropped, v)?;
    Ok((out, weights))
}

/// The textbook's weightless self-attention for inputs X `(T, d)`: scores = X·Xᵀ (unscaled),
/// weights = row-wise softmax, context = weights·X. Returns `(context (T, d), weights (T, T))`.
pub fn simple_self_attention(inputs: &Tensor) -> Result<(Tensor, Tensor)> {
    let scores = inputs.matmul(&inputs.t()?)?;
    let weights = softmax_last_dim(&scores)?;
    let context = weights.matmul(inputs)?;
    Ok((context, weights))
}

/// The queries `(…, T, d)` and the keys and values `(…, T_k, d)` to attend over: with a cache,
/// `k` and `v` appended to the cached ones (candle-nn's KV cache); without, `k` and `v`
/// themselves. With `qk_norm`, the new queries and keys are first RMS-normalised (each head's
/// vector on its own); with `rope`, then turned by their positions (after the cached ones).
fn with_cache(
    cache: Option<&mut LayerKv>,
    qk_norm: bool,
    rope: Option<&Rope>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let offset = cache.as_ref().map_or(0, |c| c.current_seq_len());
    let (q, k) = match qk_norm {
        true => (rms_normalize(&q, NORM_EPS)?, rms_normalize(&k, NORM_EPS)?),
        false => (q, k),
    };
    let (q, k) = match rope {
        Some(r) => (r.apply(&q, offset)?, r.apply(&k, offset)?),
        None => (q, k),
    };
    let (k, v) = match cache {
        Some(c) => c.append(&k.contiguous()?, &v)?,
        None => (k, v),
    };
    Ok((q, k, v))
}

/// One masked head of self-attention with its own W_Q, W_K, W_V, each `(hs, C)` (biases only
/// with `model.qkv_bias`).
#[derive(Debug, Clone)]
pub struct Head {
    pub w_q: Linear,
    pub w_k: Linear,
    pub w_v: Linear,
    pub dropout: f64,
    /// Rotary position embeddings of queries and keys (`model.position = "rope"`).
    pub rope: Option<Rope>,
    /// Queries and keys RMS-normalised before their dot product (`model.qk_norm`).
    pub qk_norm: bool,
}

impl Head {
    /// A head with `vb`'s weights (`w_q.weight`, …) projecting C = `n_embd` to `head_size`,
    /// with biases (`w_q.bias`, …) when `qkv_bias` (GPT-2 has them).
    pub fn new(
        vb: VarBuilder,
        n_embd: usize,
        head_size: usize,
        dropout: f64,
        qkv_bias: bool,
    ) -> Result<Head> {
        let w = |n: &str| Linear::new(vb.pp(n), n_embd, head_size, qkv_bias, INIT_STD);
        Ok(Head {
            w_q: w("w_q")?,
            w_k: w("w_k")?,
            w_v: w("w_v")?,
            dropout,
            rope: None,
            qk_norm: false,
        })
    }

    /// `x` `(B, T, C)` → `(out (B, T, hs), weights (B, T, T_k))`. `mask` is `(T, T_k)`; with a
    /// cache, T_k counts the cached tokens too.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rng: Option<&mut Rng>,
        cache: Option<&mut LayerKv>,
    ) -> Result<(Tensor, Tensor)> {
        let q = x.apply(&self.w_q)?; // (B, T, hs)
        let k = x.apply(&self.w_k)?;
        let v = x.apply(&self.w_v)?;
        let (q, k, v) = with_cache(cache, self.qk_norm, self.rope.as_ref(), q, k, v)?; // k, v: (B, T_k, hs)
        attend(&q, &k, &v, Some(mask), self.dropout, rng)
    }
}

/// `n_head` heads computed together: W_Q, W_K, W_V are `(C, C)` (the heads' matrices stacked),
/// the heads run as one batched matmul over `(B, n_head, T, hs)`, and `c_proj` mixes them.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    pub w_q: Linear,
    pub w_k: Linear,
    pub w_v: Linear,
    pub c_proj: Linear,
    pub n_head: usize,
    pub dropout: f64,
    /// Rotary position embeddings of queries and keys (`model.position = "rope"`).
    pub rope: Option<Rope>,
    /// Queries and keys RMS-normalised before their dot product (`model.qk_norm`).
    pub qk_norm: bool,
}

impl MultiHeadAttention {
    /// `n_head` heads with `vb`'s weights (`w_q.weight`, …, `c_proj.weight`); `bias`: on the
    /// output projection, `qkv_bias`: on W_Q, W_K, W_V; `proj_std`: the output projection's
    /// initial scale.
    pub fn new(
        vb: VarBuilder,
        n_embd: usize,
        n_head: usize,
        dropout: f64,
        bias: bool,
        qkv_bias: bool,
        proj_std: f64,
    ) -> Result<Self> {
        let w = |n: &str| Linear::new(vb.pp(n), n_embd, n_embd, qkv_bias, INIT_STD);
        let (w_q, w_k, w_v) = (w("w_q")?, w("w_k")?, w("w_v")?);
        let c_proj = Linear::new(vb.pp("c_proj"), n_embd, n_embd, bias, proj_std)?;
        Ok(MultiHeadAttention {
            w_q,
            w_k,
            w_v,
            c_proj,
            n_head,
            dropout,
            rope: None,
            qk_norm: false,
        })
    }

    /// `x` `(B, T, C)` → `(out (B, T, C), weights (B, n_head, T, T_k))`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut Rng>,
        cache: Option<&mut LayerKv>,
    ) -> Result<(Tensor, Tensor)> {
        let (z, weights) = self.heads(x, mask, rng.as_deref_mut(), cache)?;
        Ok((self.project(&z, rng)?, weights))
    }

    /// The heads before they are mixed: `x` `(B, T, C)` → `(z (B, n_head, T, hs), weights
    /// (B, n_head, T, T_k))`, z = softmax(Q·Kᵀ/√d_k + M)·V of each head.
    pub fn heads(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rng: Option<&mut Rng>,
        cache: Option<&mut LayerKv>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, c) = x.dims3()?;
        let hs = c / self.n_head;
        // (B, T, C) → (B, T, nh, hs) → (B, nh, T, hs)
        let split = |y: Tensor| {
            y.reshape((b, t, self.n_head, hs))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(x.apply(&self.w_q)?)?;
        let k = split(x.apply(&self.w_k)?)?;
        let v = split(x.apply(&self.w_v)?)?;
        let (q, k, v) = with_cache(cache, self.qk_norm, self.rope.as_ref(), q, k, v)?; // k, v: (B, nh, T_k, hs)
        attend(&q, &k, &v, Some(mask), self.dropout, rng)
    }

    /// The output projection: the heads' outputs `z` `(B, n_head, T, hs)` side by side
    /// `(B, T, C)`, mixed by `c_proj` (dropout after it while training).
    pub fn project(&self, z: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let (b, nh, t, hs) = z.dims4()?;
        let y = z.transpose(1, 2)?.reshape((b, t, nh * hs))?; // (B, T, C): heads side by side
        dropout(&y.apply(&self.c_proj)?, self.dropout, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(rows: &[&[f32]]) -> Tensor {
        let r = rows.len();
        let c = rows[0].len();
        Tensor::from_vec(rows.concat(), (r, c), &Device::Cpu).unwrap()
    }

    #[test]
    fn simple_self_attention_by_hand() {
        // X = [[1,0],[0,1]]: scores = I, softmax rows = [e/(e+1), 1/(e+1)] …
        let x = t2(&[&[1.0, 0.0], &[0.0, 1.0]]);
        let (ctx, w) = simple_self_attention(&x).unwrap();
        let e = std::f32::consts::E;
        let a = e / (e + 1.0);
        let b = 1.0 / (e + 1.0);
        let w = w.to_vec2::<f32>().unwrap();
        let ctx = ctx.to_vec2::<f32>().unwrap();
        for (got, want) in [(w[0][0], a), (w[0][1], b), (w[1][0], b), (w[1][1], a)] {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        // context = weights · X = weights here, since X = I
        assert!((ctx[0][0] - a).abs() < 1e-6 && (ctx[1][0] - b).abs() < 1e-6);
    }

    #[test]
    fn softmax_survives_extreme_scores() {
        let x = t2(&[&[1000.0, 1000.0, -1000.0], &[-1000.0, 0.0, 1000.0]]);
        let s = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(s[0], vec![0.5, 0.5, 0.0]);
        assert_eq!(s[1], vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn sdpa_by_hand_with_mask() {
        // d_k = 4 so √d_k = 2. q·k scores: row0 = [2, ·], row1 = [0, 4] → scaled [1, ·], [0, 2].
        let q = t2(&[&[1.0, 1.0, 0.0, 0.0], &[0.0, 0.0, 2.0, 0.0]]);
        let k = t2(&[&[1.0, 1.0, 0.0, 0.0], &[0.0, 0.0, 2.0, 0.0]]);
        let v = t2(&[&[1.0, 0.0], &[0.0, 1.0]]);
        let mask = causal_mask(2, 2, 0, &Device::Cpu).unwrap();
        let (out, w) = scaled_dot_product_attention(&q, &k, &v, Some(&mask)).unwrap();
        let w = w.to_vec2::<f32>().unwrap();
        assert_eq!(w[0], vec![1.0, 0.0]); // the first token sees only itself
        let e2 = (2.0f32).exp();
        let want = [1.0 / (1.0 + e2), e2 / (1.0 + e2)];
        assert!((w[1][0] - want[0]).abs() < 1e-6 && (w[1][1] - want[1]).abs() < 1e-6);
        let out = out.to_vec2::<f32>().unwrap();
        assert!((out[1][0] - want[0]).abs() < 1e-6 && (out[1][1] - want[1]).abs() < 1e-6);
    }

    #[test]
    fn mask_with_offset() {
        let m = causal_mask(2, 4, 2, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0][..3], [0.0, 0.0, 0.0]);
        assert_eq!(m[0][3], f32::NEG_INFINITY);
        assert_eq!(m[1], vec![0.0; 4]);
    }
}
