//! The one source of randomness. candle's CPU random numbers cannot be seeded, so every random
//! draw (initial weights, batches, dropout masks, sampling) comes from a ChaCha stream whose
//! state is saved in checkpoints: same seed ⇒ same numbers, and a resumed run continues the
//! stream exactly where it stopped.

use rand::SeedableRng;

/// The project's random number generator.
pub type Rng = rand_chacha::ChaCha8Rng;

/// A generator seeded with `seed`.
pub fn seeded(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}
