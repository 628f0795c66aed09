//! Rotary position embeddings (RoPE, Su et al. 2021): with `model.position = "rope"` each head's
//! queries and keys are turned by an angle proportional to their position, instead of adding a
//! learned position embedding to the input. A head's vector of `hs` entries is `hs / 2` pairs
//! (i, i + hs/2) (the "rotate half" layout of GPT-NeoX and Llama), and the pair at position
//! `pos` turns by pos·θᵢ, θᵢ = 10000^(−2i/hs):
//!
//! ```text
//! a' = a·cos − b·sin,   b' = b·cos + a·sin
//! ```
//!
//! so q·k depends on the distance between query and key only. [`rope_table`] is the one
//! definition of the angles; engines that rotate on slices are handed this table.

use candle_core::{Device, Tensor, D};

use crate::error::Result;

/// The rotations of positions `0..positions` for heads of `head_size` entries: cos and sin,
/// `(positions, head_size / 2)` each, row by row, rounded once from f64.
pub fn rope_table(positions: usize, head_size: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_size / 2;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for pos in 0..positions {
        for i in 0..half {
            let theta = 10000f64.powf(-2.0 * i as f64 / head_size as f64);
            let angle = pos as f64 * theta;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// The rotations of every position of a block, `(block_size, hs / 2)` cos and sin.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Rotations for positions `0..block_size` of heads of `head_size` (even) entries.
    pub fn new(block_size: usize, head_size: usize, device: &Device) -> Result<Rope> {
        let (cos, sin) = rope_table(block_size, head_size);
        let shape = (block_size, head_size / 2);
        Ok(Rope {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
        })
    }

    /// `x` `(…, T, hs)` at positions `offset..offset + T`, turned: pairs (i, i + hs/2) become
    /// (a·cos − b·sin, b·cos + a·sin).
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(D::Minus2)?;
        let half = x.dim(D::Minus1)? / 2;
        let cos = self.cos.narrow(0, offset, t)?; // (T, hs/2)
        let sin = self.sin.narrow(0, offset, t)?;
        let a = x.narrow(D::Minus1, 0, half)?;
        let b = x.narrow(D::Minus1, half, half)?;
        let a2 = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let b2 = (b.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[a2, b2], D::Minus1)?)
    }
}
