//! The one source of randomness. candle's CPU random numbers cannot be seeded, so every random
//! draw (initial weights, batches, dropout masks, sampling) comes from a seeded ChaCha stream:
//! same seed ⇒ same numbers.
//!
//! Training draws each micro-batch (its windows and its dropout masks) from a stream of its
//! own, addressed by step and index, and each evaluation batch likewise: any rank can draw
//! any micro-batch, so a run split over ranks, or stopped and resumed, is the same training.
//!
//! ```text
//! stream 0                               initial weights
//! 2⁶³ | step·2²⁰ | i                     micro-batch i of step `step` (training)
//! 2⁶² | step·2²¹ | split·2²⁰ | j         evaluation batch j of `split` after `step` steps
//! ```

use rand::SeedableRng;

/// The project's random number generator.
pub type Rng = rand_chacha::ChaCha8Rng;

/// Micro-batches and evaluation batches a step may have: the low 20 bits of their stream.
pub const MAX_BATCHES_PER_STEP: usize = 1 << 20;

/// Steps a run may take: what the streams have left above the batch index.
pub const MAX_STEPS: usize = 1 << 40;

/// A generator seeded with `seed`.
pub fn seeded(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

/// The stream of micro-batch `i` of optimizer step `step` (0-based) of a run seeded `seed`.
pub fn micro_batch(seed: u64, step: usize, i: usize) -> Rng {
    debug_assert!(i < MAX_BATCHES_PER_STEP && step < MAX_STEPS);
    let mut rng = seeded(seed);
    rng.set_stream(1 << 63 | (step as u64) << 20 | i as u64);
    rng
}

/// The stream of evaluation batch `j` of split `split` (0 train, 1 val) after `step` steps.
pub fn eval_batch(seed: u64, step: usize, split: usize, j: usize) -> Rng {
    debug_assert!(j < MAX_BATCHES_PER_STEP && step < MAX_STEPS && split < 2);
    let mut rng = seeded(seed);
    rng.set_stream(1 << 62 | (step as u64) << 21 | (split as u64) << 20 | j as u64);
    rng
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng as _;

    #[test]
    fn streams_are_addressed_not_drawn_in_sequence() {
        let first = |mut r: Rng| r.random::<u64>();
        assert_eq!(first(micro_batch(1, 5, 3)), first(micro_batch(1, 5, 3)));
        let all = [
            first(micro_batch(1, 5, 3)),
            first(micro_batch(1, 5, 4)),
            first(micro_batch(1, 6, 3)),
            first(micro_batch(2, 5, 3)),
            first(eval_batch(1, 5, 0, 3)),
            first(eval_batch(1, 5, 1, 3)),
            first(seeded(1)),
        ];
        for (a, x) in all.iter().enumerate() {
            for y in &all[a + 1..] {
                assert_ne!(x, y);
            }
        }
    }
}
