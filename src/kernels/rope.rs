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
//! The model (`model::rope`), the block op and the decoder all read the one table built here,
//! so the three rotate by the same f32 numbers.

/// The rotations of positions `0..positions` for heads of `head_size` entries: cos and sin,
/// `(positions, head_size / 2)` each, rounded once from f64.
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

/// The table of [`rope_table`] for a block: the rotations of every position.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// Half the head size: the pairs per head.
    pub half: usize,
}

impl RopeTable {
    /// Rotations for positions `0..positions` of heads of `head_size` (even) entries.
    pub fn new(positions: usize, head_size: usize) -> RopeTable {
        let (cos, sin) = rope_table(positions, head_size);
        RopeTable {
            cos,
            sin,
            half: head_size / 2,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_length_and_inverts() {
        let table = RopeTable::new(8, 4);
        let x = [0.3f32, -1.2, 0.7, 2.0];
        let mut y = x;
        let (cos, sin) = table.at(5);
        rotate(&mut y, cos, sin);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&y)).abs() < 1e-5);
        assert!(x.iter().zip(&y).any(|(a, b)| (a - b).abs() > 0.1));
        rotate_back(&mut y, cos, sin);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Position 0 is the identity; pair 0 at position 1 turns by 1 radian.
        assert_eq!(table.at(0).0, [1.0, 1.0]);
        assert_eq!(table.at(1).0[0], 1f64.cos() as f32);
        assert_eq!(table.at(1).1[1], (0.01f64).sin() as f32);
    }

    #[test]
    fn scores_depend_on_distance_only() {
        let table = RopeTable::new(16, 4);
        let (q, k) = ([1.0f32, 0.5, -0.25, 2.0], [0.75f32, -1.0, 1.5, 0.5]);
        let score = |pq: usize, pk: usize| {
            let (mut a, mut b) = (q, k);
            let (c, s) = table.at(pq);
            rotate(&mut a, c, s);
            let (c, s) = table.at(pk);
            rotate(&mut b, c, s);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((score(3, 1) - score(12, 10)).abs() < 1e-5);
        assert!((score(3, 1) - score(3, 2)).abs() > 1e-3);
    }
}
