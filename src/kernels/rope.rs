//! Rotary position embeddings (RoPE, Su et al. 2021) on slices, in the "rotate half" layout of
//! GPT-NeoX and Llama: a head's vector of `hs` entries is `hs / 2` pairs (i, i + hs/2), and the
//! pair at position `pos` turns by the angle pos·θᵢ, θᵢ = 10000^(−2i/hs):
//!
//! ```text
//! a' = a·cos − b·sin,   b' = b·cos + a·sin
//! ```
//!
//! Queries and keys turned this way make q·k a function of their distance only, so attention
//! learns relative positions and no position table is added to the input. A rotation's
//! inverse is its transpose, so the backward pass turns the gradient by −pos·θᵢ.
//!
//! The table is the model's (`model::rope::rope_table`): the engine hands it to the block op and
//! the decoder, so the three rotate by the same f32 numbers.

/// Turns one head's vector `x` `(hs)` by its position's `cos` and `sin` `(hs / 2)`.
#[inline]
pub fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (a, b) = x.split_at_mut(cos.len());
    for (((a, b), &c), &s) in a.iter_mut().zip(b).zip(cos).zip(sin) {
        let (x1, x2) = (*a, *b);
        *a = x1 * c - x2 * s;
        *b = x2 * c + x1 * s;
    }
}

/// The inverse of [`rotate`] (the gradient's way back): turns `x` by minus the angle.
#[inline]
pub fn rotate_back(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (a, b) = x.split_at_mut(cos.len());
    for (((a, b), &c), &s) in a.iter_mut().zip(b).zip(cos).zip(sin) {
        let (x1, x2) = (*a, *b);
        *a = x1 * c + x2 * s;
        *b = x2 * c - x1 * s;
    }
}

/// The rotations of every position of a block, cos and sin `(positions, half)` row by row.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// Half the head size: the pairs per head.
    pub half: usize,
}

impl RopeTable {
    /// The table of `cos` and `sin`, `half` entries a position each.
    pub fn new(cos: Vec<f32>, sin: Vec<f32>, half: usize) -> RopeTable {
        RopeTable { cos, sin, half }
    }

    /// Position `pos`'s cos and sin `(hs / 2)`.
    pub fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let r = pos * self.half..(pos + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }

    /// Turns the queries and keys of every head in `qkv` `(rows, 3C)` (Q | K | V side by side),
    /// row r being position `first + r % t` (sequences of `t` rows; a decoder's new rows are
    /// one sequence continuing at `first`); with `back`, the inverse (for their gradients).
    pub fn apply_qkv(&self, qkv: &mut [f32], c: usize, t: usize, first: usize, back: bool) {
        let hs = 2 * self.half;
        for (r, row) in qkv.chunks_exact_mut(3 * c).enumerate() {
            let (cos, sin) = self.at(first + r % t);
            for head in row[..2 * c].chunks_exact_mut(hs) {
                match back {
                    false => rotate(head, cos, sin),
                    true => rotate_back(head, cos, sin),
                }
            }
        }
    }
}
