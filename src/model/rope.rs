//! Rotary position embeddings on tensors: with `model.position = "rope"` each head's queries
//! and keys are turned by an angle proportional to their position (see [`crate::kernels::rope`]
//! for the math and the shared table), instead of adding a learned position embedding to the
//! input.

use candle_core::{Device, Tensor, D};

use crate::error::Result;
use crate::kernels::rope::rope_table;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rope::{rotate, RopeTable};

    #[test]
    fn tensor_rotation_equals_the_kernels_bit_for_bit() {
        let (t, hs, offset) = (5, 6, 3);
        let data: Vec<f32> = (0..2 * t * hs).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(data.clone(), (2, t, hs), &Device::Cpu).unwrap();
        let got = Rope::new(16, hs, &Device::Cpu)
            .unwrap()
            .apply(&x, offset)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let table = RopeTable::new(16, hs);
        let mut want = data;
        for (r, head) in want.chunks_exact_mut(hs).enumerate() {
            let (cos, sin) = table.at(offset + r % t);
            rotate(head, cos, sin);
        }
        assert_eq!(got, want);
    }
}
