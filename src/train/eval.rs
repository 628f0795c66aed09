//! Whole-split evaluation: the loss of predicting every token of a split exactly once, from
//! non-overlapping windows of `block_size` tokens, so the number is deterministic and comparable
//! between runs (the trainer's estimate averages random windows instead).
//!
//! For a split of N tokens s₀ … s_{N−1}, window w reads s_{wT} … s_{wT+T−1} and predicts the
//! token after each; the last window is shorter, so s₁ … s_{N−1} are each predicted once, each
//! with the context since its window began.
//!
//! ```text
//! loss = mean over predicted tokens of −ln p(token)          (nats per token)
//! perplexity = exp(loss)
//! bits_per_byte = Σ −log₂ p(token) / Σ UTF-8 bytes of the predicted tokens
//! ```
//! On N ranks (`mpirun`), rank r evaluates the passes r, r + N, r + 2N, …; each pass's loss is
//! summed on its own and the passes' sums added in order, so the numbers are the same bits on
//! any number of ranks, N times sooner.
//!
//! Bits per byte compare models with different tokenizers (a char and a BPE model of the same
//! text): the sum of their token losses is the bits they need to encode the same bytes.

use candle_core::Tensor;
use serde::Serialize;

use crate::data::corpus::{Dataset, Split};
use crate::data::tokenizer::Tokenizer;
use crate::dist::Comm;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::progress::{Progress, ProgressMode};

/// Windows evaluated in one forward pass.
const WINDOWS_PER_PASS: usize = 16;

/// What `tinygpt eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// Mean cross-entropy in nats per predicted token.
    pub loss: f64,
    pub perplexity: f64,
    pub bits_per_byte: f64,
    /// Tokens predicted (the split's length minus one).
    pub tokens: usize,
    /// UTF-8 bytes those tokens stand for.
    pub bytes: usize,
    /// `train` or `val`.
    pub split: String,
}

/// Evaluates `engine` on every token of `split` of `data` ([module docs](self)), sharing the
/// passes among `comm`'s ranks.
pub fn evaluate(
    engine: &Engine,
    tokenizer: &Tokenizer,
    data: &Dataset,
    split: Split,
    block_size: usize,
    progress: ProgressMode,
    comm: &Comm,
) -> Result<Evaluation> {
    let n = data.len(split);
    if n < 2 {
        return Err(Error::Usage(format!(
            "the {} split has {n} token(s); evaluation needs at least two",
            split_name(split)
        )));
    }
    let bytes_of: Vec<usize> = (0..tokenizer.vocab_size() as u32)
        .map(|id| tokenizer.token_bytes(id))
        .collect();
    // Window starts, in passes of equal-length windows: the full ones, then the short last one.
    let predicted = n - 1;
    let full = predicted / block_size;
    let mut passes: Vec<(Vec<usize>, usize)> = (0..full)
        .collect::<Vec<_>>()
        .chunks(WINDOWS_PER_PASS)
        .map(|w| (w.iter().map(|i| i * block_size).collect(), block_size))
        .collect();
    if !predicted.is_multiple_of(block_size) {
        passes.push((vec![full * block_size], predicted % block_size));
    }
    let progress = if comm.is_root() {
        progress
    } else {
        ProgressMode::Quiet
    };
    let bar = Progress::new(progress, "eval", predicted as u64, 0);
    // Per pass: its nats and its bytes (whole numbers, exact in f64).
    let mut sums = vec![0.0f64; 2 * passes.len()];
    let mut done = 0usize;
    let log_every = (passes.len() / 10).max(1);
    let mine = passes
        .iter()
        .enumerate()
        .skip(comm.rank())
        .step_by(comm.size());
    for (k, (starts, t)) in mine {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for &s in starts {
            data.tokens(split, s..s + t, &mut x)?;
            data.tokens(split, s + 1..s + t + 1, &mut y)?;
        }
        let idx = Tensor::from_vec(x, (starts.len(), *t), engine.device())?;
        let logits = engine.forward(&idx)?; // (B, T, V)
        let v = logits.dim(2)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let (mut nats, mut bytes) = (0.0f64, 0usize);
        for (row, &target) in logits.chunks_exact(v).zip(&y) {
            nats += neg_log_prob(row, target as usize);
            bytes += bytes_of[target as usize];
        }
        (sums[2 * k], sums[2 * k + 1]) = (nats, bytes as f64);
        done += y.len() * comm.size();
        bar.update(
            done as u64,
            "tokens predicted",
            k % log_every == 0 || done == predicted,
        );
    }
    bar.finish();
    comm.sum_f64(&mut sums)?;
    let nats: f64 = sums.iter().step_by(2).sum();
    let bytes = sums.iter().skip(1).step_by(2).sum::<f64>() as usize;
    let loss = nats / predicted as f64;
    Ok(Evaluation {
        loss,
        perplexity: loss.exp(),
        bits_per_byte: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens: predicted,
        bytes,
        split: split_name(split).to_string(),
    })
}

/// −ln softmax(row)[target], in f64.
fn neg_log_prob(row: &[f32], target: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - row[target] as f64
}

/// `train` or `val`.
pub fn split_name(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Val => "val",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neg_log_prob_by_hand() {
        // softmax([0, ln 3]) = [1/4, 3/4]
        let row = [0.0f32, 3.0f32.ln()];
        assert!((neg_log_prob(&row, 0) - 4.0f64.ln()).abs() < 1e-6);
        assert!((neg_log_prob(&row, 1) - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        // extreme scores neither overflow nor give NaN
        let row = [1000.0f32, -1000.0];
        assert!(neg_log_prob(&row, 0).abs() < 1e-9);
        assert!((neg_log_prob(&row, 1) - 2000.0).abs() < 1e-3);
    }
}
