//! Corpus → token ids → train/val split → random batches.
//!
//! Token ids are kept once, as `u16` when the vocabulary fits (it does for char-level and small
//! BPE vocabularies) and `u32` otherwise; batches are cut from them on demand.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::Rng as _;

use rayon::prelude::*;

use crate::data::shards::{Prepared, ShardSet};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::progress::{Progress, ProgressMode};
use crate::rng::Rng;

/// Reads a UTF-8 text file, with a message that names the problem and the fix.
pub fn read_corpus(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::data(
                path,
                "file not found (run `bash data/prepare.sh` for the default corpus, or pass --data FILE)",
            )
        } else {
            Error::io(path, e)
        }
    })?;
    if meta.is_dir() {
        return Err(Error::data(path, "is a directory; pass a text file"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() {
        return Err(Error::data(
            path,
            "is empty; the corpus needs text to train on",
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let raw = e.as_bytes();
        let line = raw[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::data(
            path,
            format!("is not valid UTF-8 (first bad byte at offset {at}, line {line}); convert it to UTF-8 first"),
        )
    })
}

/// The dataset at `path` for a model whose tokenizer is `tokenizer`: a prepared folder
/// (`tinygpt prepare`; refused when it was prepared with another tokenizer, naming both), or a
/// text file, read and tokenized now and split at `val_fraction`.
pub fn load_for(
    tokenizer: &Tokenizer,
    path: &Path,
    val_fraction: f64,
    block_size: usize,
    progress: ProgressMode,
) -> Result<Dataset> {
    if !crate::data::shards::is_prepared(path) {
        let text = read_corpus(path)?;
        return Dataset::from_text(tokenizer, &text, path, val_fraction, block_size, progress);
    }
    let prepared = Prepared::open(path)?;
    let theirs = prepared.tokenizer()?;
    if theirs.to_json()? != tokenizer.to_json()? {
        return Err(Error::data(
            path,
            format!(
                "was prepared with another tokenizer ({}) than the model's ({}); prepare it again with --tokenizer CHECKPOINT",
                describe(&theirs),
                describe(tokenizer)
            ),
        ));
    }
    Dataset::from_prepared(prepared, block_size)
}

/// `bpe, 8192 tokens`.
pub fn describe(t: &Tokenizer) -> String {
    format!("{}, {} tokens", t.kind().name(), t.vocab_size())
}

/// Token ids in the narrowest integer type that holds the vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenIds {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl TokenIds {
    /// Packs `ids` (all below `vocab_size`).
    pub fn new(ids: Vec<u32>, vocab_size: usize) -> TokenIds {
        if vocab_size <= u16::MAX as usize + 1 {
            TokenIds::U16(ids.into_iter().map(|i| i as u16).collect())
        } else {
            TokenIds::U32(ids)
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        match self {
            TokenIds::U16(v) => v.len(),
            TokenIds::U32(v) => v.len(),
        }
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty store for a vocabulary of `vocab_size` tokens.
    pub fn with_capacity(capacity: usize, vocab_size: usize) -> TokenIds {
        if vocab_size <= u16::MAX as usize + 1 {
            TokenIds::U16(Vec::with_capacity(capacity))
        } else {
            TokenIds::U32(Vec::with_capacity(capacity))
        }
    }

    /// Appends `ids` (all below the vocabulary size).
    pub fn extend(&mut self, ids: &[u32]) {
        match self {
            TokenIds::U16(v) => v.extend(ids.iter().map(|&i| i as u16)),
            TokenIds::U32(v) => v.extend_from_slice(ids),
        }
    }

    /// Copies tokens `range` into `out` as u32.
    fn extend_into(&self, range: std::ops::Range<usize>, out: &mut Vec<u32>) {
        match self {
            TokenIds::U16(v) => out.extend(v[range].iter().map(|&i| i as u32)),
            TokenIds::U32(v) => out.extend_from_slice(&v[range]),
        }
    }
}

/// Token ids of a whole corpus, kept once in the narrowest type: chunks of the text are encoded
/// in parallel, a few at a time, and appended, so only a few chunks' worth of wide ids exist at
/// any moment. A progress bar follows the bytes done.
pub fn tokenize_corpus(tokenizer: &Tokenizer, text: &str, mode: ProgressMode) -> Result<TokenIds> {
    let chunks = tokenizer.corpus_chunks(text, 1 << 20);
    let estimate = match tokenizer.kind() {
        crate::data::tokenizer::TokenizerKind::Char => text.len(),
        crate::data::tokenizer::TokenizerKind::Bpe => text.len() / 3,
    };
    let mut ids = TokenIds::with_capacity(estimate, tokenizer.vocab_size());
    let show = mode != ProgressMode::Quiet && text.len() > 8 << 20;
    let progress = Progress::new(
        if show { mode } else { ProgressMode::Quiet },
        "tokenize",
        text.len() as u64,
        0,
    );
    let group = rayon::current_num_threads().max(1) * 2;
    let mut done = 0usize;
    for batch in chunks.chunks(group) {
        let parts: Vec<Vec<u32>> = batch
            .par_iter()
            .map(|c| tokenizer.encode(c))
            .collect::<Result<_>>()?;
        for p in &parts {
            ids.extend(p);
        }
        done += batch.iter().map(|c| c.len()).sum::<usize>();
        progress.update(
            done as u64,
            &format!("{} tokens", ids.len()),
            done == text.len(),
        );
    }
    progress.finish();
    Ok(ids)
}

/// Which part of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// The tokenized corpus, split in two: in memory, split by position (the first
/// `1 - val_fraction` trains, the tail validates), or a prepared folder's shards, read from disk
/// as batches need them ([`crate::data::shards`]).
pub struct Dataset {
    store: Store,
}

enum Store {
    Memory { tokens: TokenIds, split_at: usize },
    Shards { train: ShardSet, val: ShardSet },
}

impl Dataset {
    /// Splits `tokens`; both parts must hold at least one window of `block_size + 1` tokens.
    pub fn new(
        tokens: TokenIds,
        val_fraction: f64,
        block_size: usize,
        path: &Path,
    ) -> Result<Dataset> {
        let n = tokens.len();
        let n_val = (n as f64 * val_fraction).round() as usize;
        let split_at = n - n_val;
        let need = block_size + 1;
        if split_at < need || n_val < need {
            // smallest n with both parts ≥ need
            let min_total = ((need as f64 / val_fraction).max(need as f64 / (1.0 - val_fraction)))
                .ceil() as usize
                + 1;
            return Err(Error::data(
                path,
                format!(
                    "is too short: {n} tokens give {split_at} for training and {n_val} for validation, but each needs at least block_size + 1 = {need}; use a corpus of at least ~{min_total} tokens, a smaller model.block_size, or another training.val_fraction"
                ),
            ));
        }
        Ok(Dataset {
            store: Store::Memory { tokens, split_at },
        })
    }

    /// A prepared folder's splits, as `tinygpt prepare` made them; both must hold at least one
    /// window of `block_size + 1` tokens.
    pub fn from_prepared(prepared: Prepared, block_size: usize) -> Result<Dataset> {
        let need = (block_size + 1) as u64;
        let (n_train, n_val) = (prepared.train.len(), prepared.val.len());
        if n_train < need || n_val < need {
            return Err(Error::data(
                &prepared.dir,
                format!(
                    "holds {n_train} training and {n_val} validation tokens, but each split needs at least block_size + 1 = {need}; prepare more text, or use a smaller model.block_size"
                ),
            ));
        }
        Ok(Dataset {
            store: Store::Shards {
                train: prepared.train,
                val: prepared.val,
            },
        })
    }

    /// `text` (the corpus read from `path`) tokenized by `tokenizer` and split: a corpus the
    /// tokenizer cannot encode, or one too short to split, is named by its path.
    pub fn from_text(
        tokenizer: &Tokenizer,
        text: &str,
        path: &Path,
        val_fraction: f64,
        block_size: usize,
        progress: ProgressMode,
    ) -> Result<Dataset> {
        let tokens = tokenize_corpus(tokenizer, text, progress)
            .map_err(|e| Error::data(path, e.to_string()))?;
        Dataset::new(tokens, val_fraction, block_size, path)
    }

    /// Tokens in a split.
    pub fn len(&self, split: Split) -> usize {
        match (&self.store, split) {
            (Store::Memory { split_at, .. }, Split::Train) => *split_at,
            (Store::Memory { tokens, split_at }, Split::Val) => tokens.len() - split_at,
            (Store::Shards { train, .. }, Split::Train) => train.len() as usize,
            (Store::Shards { val, .. }, Split::Val) => val.len() as usize,
        }
    }

    /// Appends tokens `range` of `split` (positions within the split) to `out`.
    pub fn tokens(
        &self,
        split: Split,
        range: std::ops::Range<usize>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        match &self.store {
            Store::Memory { tokens, split_at } => {
                let lo = match split {
                    Split::Train => 0,
                    Split::Val => *split_at,
                };
                tokens.extend_into(lo + range.start..lo + range.end, out);
                Ok(())
            }
            Store::Shards { train, val } => {
                let set = match split {
                    Split::Train => train,
                    Split::Val => val,
                };
                set.read(range.start as u64..range.end as u64, out)
            }
        }
    }

    /// A batch of `batch_size` random windows: inputs `x` and next-token targets `y`, both
    /// `(B, T)` u32 with T = `block_size`.
    pub fn batch(
        &self,
        split: Split,
        batch_size: usize,
        block_size: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let max_start = self.len(split) - block_size - 1;
        let mut x = Vec::with_capacity(batch_size * block_size);
        let mut y = Vec::with_capacity(batch_size * block_size);
        let mut window = Vec::with_capacity(block_size + 1);
        for _ in 0..batch_size {
            let s = rng.random_range(0..=max_start);
            window.clear();
            self.tokens(split, s..s + block_size + 1, &mut window)?;
            x.extend_from_slice(&window[..block_size]);
            y.extend_from_slice(&window[1..]);
        }
        let x = Tensor::from_vec(x, (batch_size, block_size), device)?;
        let y = Tensor::from_vec(y, (batch_size, block_size), device)?;
        Ok((x, y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    #[test]
    fn split_and_batches_are_shifted_windows() {
        let ids: Vec<u32> = (0..1000).collect();
        let ds = Dataset::new(TokenIds::new(ids, 1000), 0.1, 8, Path::new("x")).unwrap();
        assert_eq!(ds.len(Split::Train), 900);
        assert_eq!(ds.len(Split::Val), 100);
        let mut rng = seeded(3);
        let (x, y) = ds.batch(Split::Val, 4, 8, &mut rng, &Device::Cpu).unwrap();
        let x = x.to_vec2::<u32>().unwrap();
        let y = y.to_vec2::<u32>().unwrap();
        for (xr, yr) in x.iter().zip(&y) {
            assert!(xr[0] >= 900 && *yr.last().unwrap() < 1000);
            for t in 0..8 {
                assert_eq!(yr[t], xr[t] + 1);
            }
        }
        // same seed, same batch
        let mut rng2 = seeded(3);
        let (x2, _) = ds.batch(Split::Val, 4, 8, &mut rng2, &Device::Cpu).unwrap();
        assert_eq!(x2.to_vec2::<u32>().unwrap(), x);
    }

    #[test]
    fn too_short_corpus_says_how_long() {
        let e = Dataset::new(
            TokenIds::new((0..50).collect(), 100),
            0.1,
            8,
            Path::new("c.txt"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("too short") && e.contains("block_size + 1 = 9"),
            "{e}"
        );
    }

    #[test]
    fn narrow_ids_when_vocab_fits() {
        assert!(matches!(TokenIds::new(vec![1, 2], 65), TokenIds::U16(_)));
        assert!(matches!(
            TokenIds::new(vec![1, 70000], 70001),
            TokenIds::U32(_)
        ));
    }
}
