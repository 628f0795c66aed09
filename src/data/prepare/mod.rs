//! `tinygpt prepare`: any pile of text (files, folders, globs, `.gz`, JSON Lines) tokenized once
//! into token shards ([`crate::data::shards`]) that `train --data DIR` reads without holding the
//! corpus in memory.
//!
//! The corpus streams through: a reader thread reads and decompresses documents into pieces of
//! about 1 MB (cut where the tokenizer would not merge across, so the ids are those of the whole
//! document), the pieces are encoded in parallel on every core, and the ids are appended to the
//! shards in order, each document ending with the tokenizer's end-of-document token
//! (`<|endoftext|>` for BPE, a newline for char). Documents are assigned to the validation split
//! whole, by their position: the k-th of every ⌈1/val_fraction⌉ (see [`is_val`]); a corpus of
//! too few documents to give one is split by tokens instead (its tail validates).
//!
//! A char vocabulary needs every character of the corpus, so char preparation reads the corpus
//! twice; a BPE tokenizer is trained on evenly spaced pieces of it (`--tokenizer-sample-bytes`).
//! The shards are written into a folder of their own and the manifest is renamed into place
//! last: an interrupted preparation leaves the previous one whole, and nothing half-written is
//! ever listed. A re-run over unchanged inputs with the same options does nothing.

pub mod inputs;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use crate::data::shards::{
    sha256_hex, truncate_shard, InputRecord, Manifest, Shard, ShardRecord, ShardWriter,
    TokenizerRecord, FORMAT_VERSION, MANIFEST,
};
use crate::data::tokenizer::TokenizerConfig;
use crate::data::tokenizer::{Tokenizer, TokenizerKind};
use crate::error::{Error, Result};
use crate::progress::{Progress, ProgressMode};
pub use inputs::{OnBad, Source, DEFAULT_EXTENSIONS, WHOLE_DOCUMENT_BYTES};

/// The reader thread's error when this side stopped listening.
const STOPPED: &str = "stopped";

/// Pieces of a document are about this long.
const PIECE_BYTES: usize = 1 << 20;

/// Where the tokenizer comes from.
#[derive(Clone)]
pub enum TokenizerSource {
    /// Trained on the corpus, as the config's `[tokenizer]` says.
    Train(TokenizerConfig),
    /// Given (a checkpoint's).
    Given(Box<Tokenizer>),
}

/// What `tinygpt prepare` does.
#[derive(Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub tokenizer: TokenizerSource,
    pub val_fraction: f64,
    pub extensions: Vec<String>,
    pub jsonl_field: String,
    pub on_bad: OnBad,
    /// Bytes of the corpus a BPE tokenizer is trained on.
    pub sample_bytes: u64,
    /// Most tokens in one shard file.
    pub shard_tokens: u64,
    /// Text files longer than this are streamed in blocks of this size
    /// ([`inputs::WHOLE_DOCUMENT_BYTES`] unless a test wants small ones).
    pub block_bytes: usize,
    pub progress: ProgressMode,
}

/// What a preparation did.
pub struct PrepareReport {
    pub manifest: Manifest,
    /// Nothing to do: the folder already held these inputs prepared with these options.
    pub unchanged: bool,
    pub seconds: f64,
    /// Bytes of input read in the tokenizing pass.
    pub bytes: u64,
}

/// Whether document `i` (0-based, in input order) validates: the one at which the running
/// count i·f passes an integer, so that ⌊n·f⌋ of the first n documents do, spread evenly.
pub fn is_val(i: u64, fraction: f64) -> bool {
    ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor()
}

/// One piece of a document on its way to the tokenizer.
struct Piece {
    doc: u64,
    text: String,
    last: bool,
}

/// Runs `tinygpt prepare`. A failed run leaves no `--out` folder behind that was not there
/// before it.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    let existed = opts.out.exists();
    let report = prepare_into(opts);
    if report.is_err() && !existed {
        let _ = std::fs::remove_dir_all(&opts.out);
    }
    report
}

/// The preparation itself; [`prepare`] only cleans up after a failure.
fn prepare_into(opts: &PrepareOptions) -> Result<PrepareReport> {
    let started = Instant::now();
    if !(opts.val_fraction > 0.0 && opts.val_fraction < 1.0) {
        return Err(Error::Usage(format!(
            "--val-fraction {} must be between 0 and 1",
            opts.val_fraction
        )));
    }
    let sources = inputs::collect(&opts.inputs, &opts.extensions)?;
    let options = options_json(opts);
    let old = check_out_dir(&opts.out)?;
    if let Some(old) = &old {
        if is_unchanged(old, &sources, &options) {
            return Ok(PrepareReport {
                manifest: old.clone(),
                unchanged: true,
                seconds: started.elapsed().as_secs_f64(),
                bytes: 0,
            });
        }
    }
    let total: u64 = sources.iter().map(|s| s.bytes).sum();
    let (tokenizer, trained_on, eot) = load_tokenizer(opts, &sources, total)?;
    let vocab = tokenizer.vocab_size();

    remove_partials(&opts.out)?;
    let id = format!(
        "data-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let written = write_data_dir(opts, &sources, &tokenizer, eot, &id, total)?;

    let tok_json = save_tokenizer(&tokenizer, &opts.out)?;
    let record = tokenizer_record(&tokenizer, vocab, &tok_json, trained_on);
    let manifest = manifest_for(opts, record, written, &id, options);
    manifest.save(&opts.out)?;
    remove_old_data_dirs(&opts.out, &id)?;
    Ok(PrepareReport {
        manifest,
        unchanged: false,
        seconds: started.elapsed().as_secs_f64(),
        bytes: total,
    })
}

/// Whether `old` already holds these very inputs (path, size, time) prepared with `options`.
fn is_unchanged(old: &Manifest, sources: &[Source], options: &serde_json::Value) -> bool {
    let same_inputs = old.inputs.len() == sources.len()
        && old
            .inputs
            .iter()
            .zip(sources)
            .all(|(a, b)| a.path == b.path && a.bytes == b.bytes && a.modified == b.modified);
    same_inputs && old.options == *options
}

/// The tokenizer (given, or trained on the corpus), the bytes it was trained on, and its
/// end-of-document token.
fn load_tokenizer(
    opts: &PrepareOptions,
    sources: &[Source],
    total: u64,
) -> Result<(Tokenizer, u64, u32)> {
    let (tokenizer, trained_on) = match &opts.tokenizer {
        TokenizerSource::Given(t) => ((**t).clone(), 0),
        TokenizerSource::Train(cfg) => train_tokenizer(cfg, sources, opts, total)?,
    };
    let eot = tokenizer.end_of_document().ok_or_else(|| {
        Error::Tokenizer(
            "the tokenizer has no end-of-document token (<|endoftext|> or a newline)".into(),
        )
    })?;
    Ok((tokenizer, trained_on, eot))
}

/// Removes the leftovers of interrupted runs: never listed by a manifest, so never read.
fn remove_partials(out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .flatten()
    {
        if entry.file_name().to_string_lossy().ends_with(".partial") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// Writes the shards into `{id}.partial` under `--out`, renamed to `id` once whole (removed
/// on failure, so nothing half-written stays).
fn write_data_dir(
    opts: &PrepareOptions,
    sources: &[Source],
    tokenizer: &Tokenizer,
    eot: u32,
    id: &str,
    total: u64,
) -> Result<Written> {
    let partial = opts.out.join(format!("{id}.partial"));
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    let result = write_shards(opts, sources, tokenizer, eot, &partial, total);
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    let final_dir = opts.out.join(id);
    std::fs::rename(&partial, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    Ok(written)
}

/// Writes `tokenizer.json` into `out` (through a temporary file, renamed into place) and
/// returns the JSON written.
fn save_tokenizer(tokenizer: &Tokenizer, out: &Path) -> Result<String> {
    let tok_json = tokenizer.to_json()?;
    let tok_path = out.join("tokenizer.json");
    let tmp = out.join(".tokenizer.json.tmp");
    std::fs::write(&tmp, &tok_json).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &tok_path).map_err(|e| Error::io(&tok_path, e))?;
    Ok(tok_json)
}

/// The manifest's record of the tokenizer saved as `tok_json`.
fn tokenizer_record(
    tokenizer: &Tokenizer,
    vocab: usize,
    tok_json: &str,
    trained_on: u64,
) -> TokenizerRecord {
    TokenizerRecord {
        kind: tokenizer.kind(),
        vocab_size: vocab,
        sha256: sha256_hex(tok_json.as_bytes()),
        trained_on_bytes: trained_on,
        end_of_document: match tokenizer.kind() {
            TokenizerKind::Bpe => "<|endoftext|>".into(),
            TokenizerKind::Char => "\n".into(),
        },
    }
}

/// The manifest of what was written into the data folder `id`.
fn manifest_for(
    opts: &PrepareOptions,
    tokenizer: TokenizerRecord,
    written: Written,
    id: &str,
    options: serde_json::Value,
) -> Manifest {
    let vocab = tokenizer.vocab_size;
    let val_documents: u64 = written.inputs.iter().map(|i| i.val_documents).sum();
    let tokens_in = |split: &str| -> u64 {
        let shards = written.shards.iter().filter(|s| s.split == split);
        shards.map(|s| s.tokens).sum()
    };
    Manifest {
        format_version: FORMAT_VERSION,
        writer: format!("tinygpt {}", env!("CARGO_PKG_VERSION")),
        tokenizer,
        token_bytes: crate::data::shards::token_width(vocab),
        val_fraction: opts.val_fraction,
        split_rule: written.split_rule.clone(),
        documents: written.inputs.iter().map(|i| i.documents).sum(),
        val_documents,
        val_document_ids: (written.val_ids.len() <= 100_000).then(|| written.val_ids.clone()),
        train_tokens: tokens_in("train"),
        val_tokens: tokens_in("val"),
        shards: written
            .shards
            .iter()
            .map(|s| ShardRecord {
                file: Path::new(id).join(&s.file),
                ..s.clone()
            })
            .collect(),
        inputs: written.inputs,
        options,
    }
}

/// Removes the previous preparation's data folders, now listed by no manifest.
fn remove_old_data_dirs(out: &Path, id: &str) -> Result<()> {
    for entry in std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("data-") && name != id && entry.path().is_dir() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// The options that decide the output, for the manifest and the no-op check.
fn options_json(opts: &PrepareOptions) -> serde_json::Value {
    let tokenizer = match &opts.tokenizer {
        TokenizerSource::Train(cfg) => serde_json::json!({"train": cfg}),
        TokenizerSource::Given(t) => {
            serde_json::json!({"given_sha256": t.to_json().map(|j| sha256_hex(j.as_bytes())).unwrap_or_default()})
        }
    };
    serde_json::json!({
        "tokenizer": tokenizer,
        "val_fraction": opts.val_fraction,
        "extensions": opts.extensions,
        "jsonl_field": opts.jsonl_field,
        "on_bad": opts.on_bad,
        "tokenizer_sample_bytes": opts.sample_bytes,
        "shard_tokens": opts.shard_tokens,
    })
}

/// Makes `out` if needed; its manifest when it is a prepared folder already. A folder that
/// holds anything else is refused: prepare never overwrites what it did not write.
fn check_out_dir(out: &Path) -> Result<Option<Manifest>> {
    if out.join(MANIFEST).is_file() {
        return Manifest::load(out).map(Some).or(Ok(None));
    }
    if out.exists() {
        let foreign = std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .flatten()
            .any(|e| !e.file_name().to_string_lossy().ends_with(".partial"));
        if foreign {
            return Err(Error::Usage(format!(
                "--out {} is a folder with other files in it; pass a new or empty folder (or one tinygpt prepare wrote)",
                out.display()
            )));
        }
    }
    std::fs::create_dir_all(out)
        .map_err(|e| Error::Usage(format!("cannot create --out {}: {e}", out.display())))
        .map(|_| None)
}

/// Reads every document piece of every source, in order, on a reader thread, passing the
/// pieces to `sink` in batches on this thread until it says to stop. Returns each source's
/// sha256 and counts (none when the sink stopped early).
fn stream_pieces(
    sources: &[Source],
    opts: &PrepareOptions,
    cut: impl Fn(&str) -> usize + Sync,
    raw_bytes: Arc<AtomicU64>,
    mut sink: impl FnMut(Vec<Piece>) -> Result<ControlFlow<()>>,
) -> Result<Vec<(String, u64, Option<String>)>> {
    let batch_bytes = PIECE_BYTES * rayon::current_num_threads().max(1) * 2;
    let cut = &cut;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Piece>>>(2);
        let reader = scope.spawn(move || -> Result<Vec<(String, u64, Option<String>)>> {
            let mut doc = 0u64;
            let mut batch: Vec<Piece> = Vec::new();
            let mut size = 0usize;
            let mut out = Vec::new();
            for src in sources {
                let mut docs = 0u64;
                let mut skipped: Option<String> = None;
                let mut emit = |e: inputs::Event| -> Result<()> {
                    match e {
                        inputs::Event::Text { text, last } => {
                            size += text.len();
                            batch.push(Piece { doc, text, last });
                            if last {
                                docs += 1;
                                doc += 1;
                            }
                            if size >= batch_bytes {
                                size = 0;
                                let full = std::mem::take(&mut batch);
                                tx.send(Ok(full))
                                    .map_err(|_| Error::Usage(STOPPED.into()))?;
                            }
                        }
                        inputs::Event::Skipped(why) => {
                            eprintln!(
                                "warning: skipped a document of {}: {why}",
                                src.path.display()
                            );
                            skipped.get_or_insert(why);
                        }
                    }
                    Ok(())
                };
                let res = inputs::read_documents(
                    src,
                    &opts.jsonl_field,
                    opts.on_bad,
                    opts.block_bytes,
                    raw_bytes.clone(),
                    cut,
                    &mut emit,
                );
                match res {
                    Ok(sha) => out.push((sha, docs, skipped)),
                    Err(e) => {
                        let _ = tx.send(Err(Error::Usage(e.to_string())));
                        return Err(e);
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(Ok(batch));
            }
            Ok(out)
        });
        let mut failed = None;
        for batch in rx {
            match batch.and_then(&mut sink) {
                Ok(ControlFlow::Continue(())) => {}
                Ok(ControlFlow::Break(())) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let read = reader
            .join()
            .map_err(|_| Error::Usage("the reader thread panicked".into()))?;
        let stopped = |e: &Error| matches!(e, Error::Usage(m) if m == STOPPED);
        match (failed, read) {
            // The reader's own error, not its noticing that this side stopped.
            (_, Err(re)) if !stopped(&re) => Err(re),
            (Some(e), _) => Err(e),
            // The sink had what it wanted: the reader stopped before the end.
            (None, Err(_)) => Ok(Vec::new()),
            (None, Ok(r)) => Ok(r),
        }
    })
}

/// The tokenizer trained on the corpus, and the bytes it was trained on.
fn train_tokenizer(
    cfg: &TokenizerConfig,
    sources: &[Source],
    opts: &PrepareOptions,
    total: u64,
) -> Result<(Tokenizer, u64)> {
    let raw = Arc::new(AtomicU64::new(0));
    match cfg.kind {
        TokenizerKind::Char => {
            // Every character of the corpus (and a newline, which ends documents).
            let bar = Progress::new(opts.progress, "characters", total, 0);
            let mut chars = std::collections::BTreeSet::from(['\n']);
            stream_pieces(
                sources,
                opts,
                |t| t.len(),
                raw.clone(),
                |batch| {
                    let found: Vec<std::collections::BTreeSet<char>> =
                        batch.par_iter().map(|p| char_set(&p.text)).collect();
                    found.into_iter().for_each(|s| chars.extend(s));
                    let done = raw.load(Ordering::Relaxed);
                    bar.update(done, &format!("{} characters", chars.len()), false);
                    Ok(ControlFlow::Continue(()))
                },
            )?;
            bar.finish();
            let alphabet: String = chars.into_iter().collect();
            Ok((Tokenizer::train_char(&alphabet)?, 0))
        }
        TokenizerKind::Bpe => {
            // Evenly spaced pieces: every k-th megabyte, up to the sample size.
            let stride = (total / opts.sample_bytes.max(1)).max(1);
            let mut sample = String::new();
            let mut seen = 0u64;
            let bar = Progress::new(opts.progress, "sample", opts.sample_bytes.min(total), 0);
            stream_pieces(
                sources,
                opts,
                |t| t.len(),
                raw.clone(),
                |batch| {
                    for p in batch {
                        if seen.is_multiple_of(stride) && (sample.len() as u64) < opts.sample_bytes
                        {
                            sample.push_str(&p.text);
                            if p.last {
                                sample.push('\n');
                            }
                        }
                        seen += 1;
                    }
                    bar.update(sample.len() as u64, "bytes sampled", false);
                    Ok(match sample.len() as u64 >= opts.sample_bytes {
                        true => ControlFlow::Break(()),
                        false => ControlFlow::Continue(()),
                    })
                },
            )?;
            bar.finish();
            if sample.is_empty() {
                return Err(Error::Usage(
                    "the inputs hold no text to train a tokenizer on".into(),
                ));
            }
            let n = sample.len() as u64;
            Ok((Tokenizer::train_bpe(&sample, cfg.vocab_size)?, n))
        }
    }
}

/// The characters of `text` (ASCII through a table: most text is mostly ASCII).
fn char_set(text: &str) -> std::collections::BTreeSet<char> {
    let mut ascii = [false; 128];
    let mut set = std::collections::BTreeSet::new();
    for c in text.chars() {
        match c.is_ascii() {
            true => ascii[c as usize] = true,
            false => {
                set.insert(c);
            }
        }
    }
    set.extend((0u8..128).filter(|&b| ascii[b as usize]).map(char::from));
    set
}

/// What the tokenizing pass wrote.
struct Written {
    inputs: Vec<InputRecord>,
    shards: Vec<ShardRecord>,
    val_ids: Vec<u64>,
    split_rule: String,
}

/// The shards of one split, rolled over at `shard_tokens`.
struct SplitWriter {
    dir: PathBuf,
    split: &'static str,
    vocab: usize,
    limit: u64,
    current: Option<ShardWriter>,
    done: Vec<ShardRecord>,
}

impl SplitWriter {
    fn write(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            if self.current.as_ref().is_none_or(|w| w.len() >= self.limit) {
                self.close()?;
                let file = format!("{}-{:03}.bin", self.split, self.done.len());
                self.current = Some(ShardWriter::create(&self.dir.join(&file), self.vocab)?);
            }
            let w = self.current.as_mut().expect("opened above");
            let room = (self.limit - w.len()) as usize;
            let (now, rest) = ids.split_at(room.min(ids.len()));
            w.write(now)?;
            ids = rest;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            let file = format!("{}-{:03}.bin", self.split, self.done.len());
            let tokens = w.finish(self.vocab)?;
            self.done.push(ShardRecord {
                file: PathBuf::from(file),
                split: self.split.to_string(),
                tokens,
            });
        }
        Ok(())
    }
}

/// What the tokenizing pass read: each source's sha256, document count and first skip reason,
/// and the ids of the documents that went to validation.
struct Encoded {
    per_source: Vec<(String, u64, Option<String>)>,
    val_ids: Vec<u64>,
}

/// The tokenizing pass: the corpus encoded into train and val shards under `dir`.
fn write_shards(
    opts: &PrepareOptions,
    sources: &[Source],
    tokenizer: &Tokenizer,
    eot: u32,
    dir: &Path,
    total: u64,
) -> Result<Written> {
    let vocab = tokenizer.vocab_size();
    let mut writers = ["train", "val"].map(|split| SplitWriter {
        dir: dir.to_path_buf(),
        split,
        vocab,
        limit: opts.shard_tokens.max(1),
        current: None,
        done: Vec::new(),
    });
    let Encoded {
        per_source,
        val_ids,
    } = encode_corpus(opts, sources, tokenizer, eot, total, &mut writers)?;
    for w in &mut writers {
        w.close()?;
    }
    let [mut train, mut val] = writers;
    let documents: u64 = per_source.iter().map(|(_, d, _)| d).sum();
    let split_rule = split_rule(opts, documents, &val_ids, &mut train, &mut val)?;
    let inputs = input_records(sources, per_source, &val_ids);
    let mut shards = train.done;
    shards.append(&mut val.done);
    Ok(Written {
        inputs,
        shards,
        val_ids,
        split_rule,
    })
}

/// Streams the corpus through the tokenizer into `writers` (train, val), each document to
/// the split [`is_val`] gives it, showing progress.
fn encode_corpus(
    opts: &PrepareOptions,
    sources: &[Source],
    tokenizer: &Tokenizer,
    eot: u32,
    total: u64,
    writers: &mut [SplitWriter; 2],
) -> Result<Encoded> {
    let raw = Arc::new(AtomicU64::new(0));
    let bar = Progress::new(opts.progress, "prepare", total, 0);
    let started = Instant::now();
    let mut val_ids = Vec::new();
    let mut tokens = 0u64;
    let mut last_log = Instant::now();
    let per_source = stream_pieces(
        sources,
        opts,
        |t| tokenizer.safe_cut(t),
        raw.clone(),
        |batch| {
            let ids: Vec<Vec<u32>> = batch
                .par_iter()
                .map(|p| encode_piece(tokenizer, p, eot))
                .collect::<Result<_>>()?;
            for (p, ids) in batch.iter().zip(&ids) {
                let val = is_val(p.doc, opts.val_fraction);
                if val && p.last {
                    val_ids.push(p.doc);
                }
                writers[val as usize].write(ids)?;
                tokens += ids.len() as u64;
            }
            let done = raw.load(Ordering::Relaxed);
            let mb_s = done as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-9);
            let log = last_log.elapsed().as_secs_f64() > 10.0;
            if log {
                last_log = Instant::now();
            }
            bar.update(done, &format!("{mb_s:.1} MB/s, {tokens} tokens"), log);
            Ok(ControlFlow::Continue(()))
        },
    )?;
    bar.finish();
    Ok(Encoded {
        per_source,
        val_ids,
    })
}

/// The ids of one piece, in chunks the tokenizer encodes alike, and the end-of-document token
/// after a document's last piece.
fn encode_piece(tokenizer: &Tokenizer, p: &Piece, eot: u32) -> Result<Vec<u32>> {
    let mut v = Vec::with_capacity(p.text.len() / 2 + 1);
    for chunk in tokenizer.corpus_chunks(&p.text, PIECE_BYTES) {
        v.extend(tokenizer.encode(chunk)?);
    }
    if p.last {
        v.push(eot);
    }
    Ok(v)
}

/// How the corpus was split, for the manifest. With no document in validation (too few of
/// them), the tail of the train tokens is moved into validation first.
fn split_rule(
    opts: &PrepareOptions,
    documents: u64,
    val_ids: &[u64],
    train: &mut SplitWriter,
    val: &mut SplitWriter,
) -> Result<String> {
    let mut split_rule = format!(
        "by document, in input order: document i (from 0) validates when ⌊(i+1)·{f}⌋ > ⌊i·{f}⌋, one in every {:.0}",
        1.0 / opts.val_fraction,
        f = opts.val_fraction
    );
    if val_ids.is_empty() {
        // Too few documents to give one to validation: split the tokens instead.
        let n_train: u64 = train.done.iter().map(|s| s.tokens).sum();
        let n_val = ((n_train as f64) * opts.val_fraction).round() as u64;
        move_tail(train, val, n_val)?;
        split_rule = format!(
            "by tokens: {documents} document(s) are too few to split by document at {}, so the last {n_val} tokens validate",
            opts.val_fraction
        );
    }
    Ok(split_rule)
}

/// Per-input document counts, and how many of each went to validation.
fn input_records(
    sources: &[Source],
    per_source: Vec<(String, u64, Option<String>)>,
    val_ids: &[u64],
) -> Vec<InputRecord> {
    let mut first = 0u64;
    let val_set: std::collections::HashSet<u64> = val_ids.iter().copied().collect();
    sources
        .iter()
        .zip(per_source)
        .map(|(s, (sha256, documents, skipped))| {
            let range = first..first + documents;
            first += documents;
            InputRecord {
                path: s.path.clone(),
                bytes: s.bytes,
                modified: s.modified,
                sha256,
                documents,
                val_documents: range.filter(|d| val_set.contains(d)).count() as u64,
                skipped,
            }
        })
        .collect()
}

/// Moves the last `n` tokens of `train`'s shards into a new shard of `val`: read, then cut
/// off the train shards they came from.
fn move_tail(train: &mut SplitWriter, val: &mut SplitWriter, n: u64) -> Result<()> {
    let mut left = n;
    let mut tail: Vec<Vec<u32>> = Vec::new();
    while left > 0 {
        let Some(rec) = train.done.last_mut() else {
            break;
        };
        let path = train.dir.join(&rec.file);
        let take = left.min(rec.tokens);
        let keep = rec.tokens - take;
        let mut ids = Vec::with_capacity(take as usize);
        Shard::open(&path, train.vocab, rec.tokens)?.read(keep..rec.tokens, &mut ids)?;
        tail.push(ids);
        if keep == 0 {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            train.done.pop();
        } else {
            truncate_shard(&path, train.vocab, keep)?;
            rec.tokens = keep;
        }
        left -= take;
    }
    for ids in tail.iter().rev() {
        val.write(ids)?;
    }
    val.close()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_document_in_every_ten_validates_evenly() {
        let val: Vec<u64> = (0..30).filter(|&i| is_val(i, 0.1)).collect();
        assert_eq!(val, [9, 19, 29]);
        let n = (0..1000).filter(|&i| is_val(i, 0.25)).count();
        assert_eq!(n, 250);
    }
}
