//! Token shards: the files `tinygpt prepare` writes and `train --data DIR` reads.
//!
//! A prepared folder holds `manifest.json` ([`Manifest`]), `tokenizer.json`, and the shards it
//! lists, in a subfolder of their own (`data-<id>/train-000.bin`, `val-000.bin`, …). A shard is a
//! 32-byte little-endian header, then its tokens:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `TGPTTOKS` |
//! | 8..12 | format version (1) |
//! | 12..16 | bytes per token: 2 (`u16`, when the vocabulary fits) or 4 (`u32`) |
//! | 16..20 | vocabulary size |
//! | 20..24 | reserved (0) |
//! | 24..32 | token count |
//!
//! The manifest is written last, by a rename, and names the shards it belongs to: a folder is
//! either the complete old preparation or the complete new one, never half of either.
//!
//! Tokens are read with positional reads (`pread`) rather than through a memory map: a map's
//! touched pages count towards the process's resident memory and, over a long run of random
//! windows, grow towards the corpus's size; reads keep memory flat whatever the corpus.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::tokenizer::TokenizerKind;
use crate::error::{Error, Result};

/// The shard files' magic bytes.
pub const MAGIC: &[u8; 8] = b"TGPTTOKS";
/// The version of the shard and manifest format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Header bytes before the tokens.
pub const HEADER_BYTES: u64 = 32;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// Whether `path` is a prepared folder (a directory with a manifest).
pub fn is_prepared(path: &Path) -> bool {
    path.join(MANIFEST).is_file()
}

/// One input file of a preparation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputRecord {
    pub path: PathBuf,
    pub bytes: u64,
    /// Modification time, seconds since the epoch (with the size: what a re-run compares).
    pub modified: u64,
    pub sha256: String,
    /// Documents read from it (after skipped ones).
    pub documents: u64,
    /// Of those, the ones that went to the validation split.
    pub val_documents: u64,
    /// Why it was skipped (`--on-bad skip`), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// One shard file of a preparation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Relative to the prepared folder.
    pub file: PathBuf,
    /// `train` or `val`.
    pub split: String,
    pub tokens: u64,
}

/// The tokenizer a preparation used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerRecord {
    pub kind: TokenizerKind,
    pub vocab_size: usize,
    /// sha256 of `tokenizer.json`: two preparations tokenize alike when these agree.
    pub sha256: String,
    /// Bytes of the corpus the BPE tokenizer was trained on (0: given, or char).
    pub trained_on_bytes: u64,
    /// What ends each document: `<|endoftext|>` (BPE) or a newline (char).
    pub end_of_document: String,
}

/// `manifest.json`: what a prepared folder holds and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub writer: String,
    pub tokenizer: TokenizerRecord,
    /// Bytes per token in the shards: 2 or 4.
    pub token_bytes: u32,
    pub val_fraction: f64,
    /// How documents were assigned to the validation split.
    pub split_rule: String,
    pub inputs: Vec<InputRecord>,
    pub documents: u64,
    pub val_documents: u64,
    /// Global indices (in input order) of the validation documents, when at most 100,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_document_ids: Option<Vec<u64>>,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub shards: Vec<ShardRecord>,
    /// The options that decide the output besides the inputs (a re-run with the same inputs
    /// and options is a no-op).
    pub options: serde_json::Value,
}

impl Manifest {
    /// Reads `dir/manifest.json`, refusing another format version.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::data(
                &path,
                format!("is not a manifest ({e}); run tinygpt prepare again"),
            )
        })?;
        let version = value.get("format_version").and_then(|v| v.as_u64());
        if version != Some(FORMAT_VERSION as u64) {
            return Err(Error::data(
                dir,
                format!(
                    "was prepared in format version {}, this tinygpt reads version {FORMAT_VERSION}; run tinygpt prepare again",
                    version.map_or("(none)".into(), |v| v.to_string())
                ),
            ));
        }
        serde_json::from_value(value).map_err(|e| {
            Error::data(
                &path,
                format!("is not a valid manifest ({e}); run tinygpt prepare again"),
            )
        })
    }

    /// Writes the manifest to `dir` atomically (a temporary file renamed into place).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Usage(format!("writing the manifest: {e}")))?;
        let tmp = dir.join(".manifest.json.tmp");
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(|e| Error::io(dir.join(MANIFEST), e))
    }
}

/// Writes one shard: header, then tokens as they come; [`ShardWriter::finish`] fills in the
/// count and syncs.
pub struct ShardWriter {
    file: std::io::BufWriter<File>,
    path: PathBuf,
    width: u32,
    count: u64,
}

impl ShardWriter {
    /// A new shard at `path` for a vocabulary of `vocab_size`.
    pub fn create(path: &Path, vocab_size: usize) -> Result<ShardWriter> {
        let width = token_width(vocab_size);
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = ShardWriter {
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            width,
            count: 0,
        };
        w.file
            .write_all(&header(width, vocab_size, 0))
            .map_err(|e| Error::io(path, e))?;
        Ok(w)
    }

    /// Appends `ids`.
    pub fn write(&mut self, ids: &[u32]) -> Result<()> {
        let mut buf = Vec::with_capacity(ids.len() * self.width as usize);
        match self.width {
            2 => ids
                .iter()
                .for_each(|&i| buf.extend((i as u16).to_le_bytes())),
            _ => ids.iter().for_each(|&i| buf.extend(i.to_le_bytes())),
        }
        self.file
            .write_all(&buf)
            .map_err(|e| Error::io(&self.path, e))?;
        self.count += ids.len() as u64;
        Ok(())
    }

    /// Tokens written so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Writes the final count into the header and syncs the file; returns the count.
    pub fn finish(self, vocab_size: usize) -> Result<u64> {
        let path = self.path.clone();
        let file = self
            .file
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.write_all_at(&header(self.width, vocab_size, self.count), 0)
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        Ok(self.count)
    }
}

/// Bytes per token for a vocabulary of `vocab_size`.
pub fn token_width(vocab_size: usize) -> u32 {
    if vocab_size <= u16::MAX as usize + 1 {
        2
    } else {
        4
    }
}

/// Cuts the shard at `path` (of a vocabulary of `vocab_size`) to its first `count` tokens,
/// header included, and syncs it.
pub fn truncate_shard(path: &Path, vocab_size: usize, count: u64) -> Result<()> {
    let width = token_width(vocab_size);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.set_len(HEADER_BYTES + count * width as u64)
        .and_then(|_| file.write_all_at(&header(width, vocab_size, count), 0))
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn header(width: u32, vocab_size: usize, count: u64) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&width.to_le_bytes());
    h[16..20].copy_from_slice(&(vocab_size as u32).to_le_bytes());
    h[24..32].copy_from_slice(&count.to_le_bytes());
    h
}

/// An open shard, read by position.
#[derive(Debug)]
pub struct Shard {
    file: File,
    path: PathBuf,
    width: u32,
    tokens: u64,
    /// Ids at or above this are a damaged file, caught where a window is read.
    vocab: u32,
}

impl Shard {
    /// Opens `path`, checking its header against the manifest's `vocab_size` and `tokens` and
    /// its length against the header: a shard cut short or from another preparation is refused.
    pub fn open(path: &Path, vocab_size: usize, tokens: u64) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut h = [0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut h, 0).map_err(|_| {
            Error::data(
                path,
                "is not a token shard (shorter than its header); run tinygpt prepare again",
            )
        })?;
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let count = u64::from_le_bytes(h[24..32].try_into().unwrap());
        let bad = |msg: String| {
            Err(Error::data(
                path,
                format!("{msg}; run tinygpt prepare again"),
            ))
        };
        if &h[0..8] != MAGIC {
            return bad("is not a tinygpt token shard (wrong magic bytes)".into());
        }
        if u32_at(8) != FORMAT_VERSION {
            return bad(format!(
                "is a version {} shard, this tinygpt reads version {FORMAT_VERSION}",
                u32_at(8)
            ));
        }
        let width = u32_at(12);
        if width != token_width(vocab_size) || u32_at(16) as usize != vocab_size {
            return bad(format!(
                "holds {width}-byte tokens of a {}-token vocabulary, the manifest says {vocab_size}",
                u32_at(16)
            ));
        }
        if count != tokens {
            return bad(format!("holds {count} tokens, the manifest says {tokens}"));
        }
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len != HEADER_BYTES + count * width as u64 {
            return bad(format!(
                "is {len} bytes, its header promises {}",
                HEADER_BYTES + count * width as u64
            ));
        }
        Ok(Shard {
            file,
            path: path.to_path_buf(),
            width,
            tokens,
            vocab: vocab_size as u32,
        })
    }

    /// Tokens in the shard.
    pub fn len(&self) -> u64 {
        self.tokens
    }

    /// True for a shard without tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Appends tokens `range` to `out`; an id beyond the vocabulary (a damaged shard) is
    /// refused naming the file and the token's offset, instead of failing in the embedding.
    pub fn read(&self, range: std::ops::Range<u64>, out: &mut Vec<u32>) -> Result<()> {
        let first = out.len();
        self.read_ids(range.clone(), out)?;
        match out[first..].iter().position(|&t| t >= self.vocab) {
            None => Ok(()),
            Some(k) => Err(Error::data(
                &self.path,
                format!(
                    "token {} at offset {} (byte {}) is not below the vocabulary size {}: the shard is damaged; run tinygpt prepare again",
                    out[first + k],
                    range.start + k as u64,
                    HEADER_BYTES + (range.start + k as u64) * self.width as u64,
                    self.vocab
                ),
            )),
        }
    }

    fn read_ids(&self, range: std::ops::Range<u64>, out: &mut Vec<u32>) -> Result<()> {
        let w = self.width as u64;
        let mut buf = vec![0u8; ((range.end - range.start) * w) as usize];
        self.file
            .read_exact_at(&mut buf, HEADER_BYTES + range.start * w)
            .map_err(|e| Error::io(&self.path, e))?;
        match self.width {
            2 => out.extend(
                buf.chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32),
            ),
            _ => out.extend(
                buf.chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
        }
        Ok(())
    }
}

/// The shards of one split, read as one sequence.
#[derive(Debug)]
pub struct ShardSet {
    shards: Vec<Shard>,
    /// `starts[i]`: position of shard i's first token in the sequence.
    starts: Vec<u64>,
    len: u64,
}

impl ShardSet {
    /// The shards in order.
    pub fn new(shards: Vec<Shard>) -> ShardSet {
        let mut starts = Vec::with_capacity(shards.len());
        let mut len = 0;
        for s in &shards {
            starts.push(len);
            len += s.len();
        }
        ShardSet {
            shards,
            starts,
            len,
        }
    }

    /// Tokens in all the shards.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True without tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends tokens `range` of the sequence (which may span shards) to `out`.
    pub fn read(&self, range: std::ops::Range<u64>, out: &mut Vec<u32>) -> Result<()> {
        let mut pos = range.start;
        while pos < range.end {
            let i = self.starts.partition_point(|&s| s <= pos) - 1;
            let end = range.end.min(self.starts[i] + self.shards[i].len());
            self.shards[i].read(pos - self.starts[i]..end - self.starts[i], out)?;
            pos = end;
        }
        Ok(())
    }
}

/// A prepared folder opened for reading: its manifest and its two splits.
#[derive(Debug)]
pub struct Prepared {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub train: ShardSet,
    pub val: ShardSet,
}

impl Prepared {
    /// Opens `dir`, checking every shard against the manifest.
    pub fn open(dir: &Path) -> Result<Prepared> {
        let manifest = Manifest::load(dir)?;
        let vocab = manifest.tokenizer.vocab_size;
        let mut train = Vec::new();
        let mut val = Vec::new();
        for s in &manifest.shards {
            let shard = Shard::open(&dir.join(&s.file), vocab, s.tokens)?;
            match s.split.as_str() {
                "train" => train.push(shard),
                "val" => val.push(shard),
                other => {
                    return Err(Error::data(
                        dir,
                        format!(
                            "manifest lists a shard of split `{other}`; run tinygpt prepare again"
                        ),
                    ))
                }
            }
        }
        Ok(Prepared {
            dir: dir.to_path_buf(),
            manifest,
            train: ShardSet::new(train),
            val: ShardSet::new(val),
        })
    }

    /// The folder's tokenizer (`tokenizer.json`), checked against the manifest's hash.
    pub fn tokenizer(&self) -> Result<crate::data::tokenizer::Tokenizer> {
        let path = self.dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        if sha256_hex(text.as_bytes()) != self.manifest.tokenizer.sha256 {
            return Err(Error::data(
                &path,
                "does not match the manifest (changed after preparing); run tinygpt prepare again",
            ));
        }
        crate::data::tokenizer::Tokenizer::from_json(&text)
    }
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        for vocab in [65usize, 70_000] {
            let p = dir.path().join(format!("s{vocab}.bin"));
            let mut w = ShardWriter::create(&p, vocab).unwrap();
            w.write(&[1, 2, 3]).unwrap();
            w.write(&[(vocab - 1) as u32, 0]).unwrap();
            assert_eq!(w.finish(vocab).unwrap(), 5);
            let s = Shard::open(&p, vocab, 5).unwrap();
            let mut out = Vec::new();
            s.read(1..5, &mut out).unwrap();
            assert_eq!(out, [2, 3, (vocab - 1) as u32, 0]);
            let len = std::fs::metadata(&p).unwrap().len();
            assert_eq!(len, HEADER_BYTES + 5 * token_width(vocab) as u64);
            let e = Shard::open(&p, vocab, 6).unwrap_err().to_string();
            assert!(e.contains("holds 5 tokens, the manifest says 6"), "{e}");
            let e = Shard::open(&p, 100, 5).unwrap_err().to_string();
            assert!(e.contains("the manifest says 100"), "{e}");
            // Cut short: refused, naming the file.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len - 1)
                .unwrap();
            let e = Shard::open(&p, vocab, 5).unwrap_err().to_string();
            assert!(
                e.contains(&p.display().to_string()) && e.contains("its header promises"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_shard_set_reads_across_shard_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut shards = Vec::new();
        for (i, ids) in [vec![0u32, 1, 2], vec![], vec![3, 4], vec![5]]
            .iter()
            .enumerate()
        {
            let p = dir.path().join(format!("{i}.bin"));
            let mut w = ShardWriter::create(&p, 10).unwrap();
            w.write(ids).unwrap();
            w.finish(10).unwrap();
            shards.push(Shard::open(&p, 10, ids.len() as u64).unwrap());
        }
        let set = ShardSet::new(shards);
        assert_eq!(set.len(), 6);
        for lo in 0..6u64 {
            for hi in lo..=6 {
                let mut out = Vec::new();
                set.read(lo..hi, &mut out).unwrap();
                assert_eq!(out, (lo as u32..hi as u32).collect::<Vec<_>>());
            }
        }
    }
}
