//! The checkpoint: a directory other tools can read.
//!
//! ```text
//! model.safetensors      weights by name (metadata: format_version)
//! config.toml            the config as run
//! tokenizer.json         Hugging Face tokenizer
//! optimizer.safetensors  AdamW moments `m.NAME`, `v.NAME` (metadata: step)
//! state.json             step, best val loss, RNG state, elapsed seconds, loss history
//! ```
//!
//! A checkpoint is written into a hidden sibling directory, flushed to disk, and renamed into
//! place; the previous one is moved aside first and deleted last. A crash at any instant leaves
//! either the new or the old checkpoint complete, and [`resolve`] finds whichever it is.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::model::{Gpt, Params};
use crate::run::config::Config;

/// The checkpoint format this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// The `state.json` format this build writes, and the newest it reads. Version 2 draws each
/// micro-batch from a stream of its own ([`crate::rng::micro_batch`]); version 1 kept one
/// stream for the whole run, drawn in sequence, and its position (`rng`).
pub const STATE_VERSION: u32 = 2;

/// One evaluation: mean losses over `eval_iters` batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    pub step: usize,
    pub train_loss: f64,
    pub val_loss: f64,
}

/// Where a run stands: everything beyond the weights that resuming needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// Optimizer steps taken.
    pub step: usize,
    pub best_val_loss: Option<f64>,
    /// Wall-clock seconds spent training so far (over all resumes).
    pub elapsed_s: f64,
    /// Every evaluation so far.
    pub history: Vec<LossPoint>,
}

impl TrainState {
    /// What changes when this state was written by a tinygpt that drew its batches from one
    /// stream in sequence (state version 1): the run goes on, from the same weights and
    /// optimizer, with batches drawn per micro-batch, so not the ones the older build would
    /// have drawn.
    pub fn legacy_note(&self) -> Option<String> {
        (self.format_version < 2).then(|| {
            format!(
                "note: this checkpoint (step {}) was written by an older tinygpt that drew batches and dropout from one stream in sequence; it resumes with this build's per-micro-batch streams, so the run continues with other (equally random) batches than the older build would have drawn",
                self.step
            )
        })
    }
}

/// AdamW's state: first and second moments by parameter name, and its step count.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub step: u64,
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
}

/// Everything in a checkpoint directory, ready to use.
pub struct Checkpoint {
    /// The directory it was read from (after [`resolve`]).
    pub dir: PathBuf,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub model: Gpt,
    pub params: Params,
    /// Absent only in checkpoints written without training state.
    pub state: Option<TrainState>,
}

fn hidden_sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!(".{name}.{suffix}"))
}

/// The directory that holds the checkpoint `dir`: `dir` itself, or, if a crash struck between
/// the two renames of a save, the previous checkpoint that was moved aside.
pub fn resolve(dir: &Path) -> PathBuf {
    let old = hidden_sibling(dir, "old");
    if !dir.exists() && old.is_dir() {
        old
    } else {
        dir.to_path_buf()
    }
}

/// Writes `bytes` to `path` and flushes them to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the renames durable; not every filesystem supports it.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Replaces directory `target` by one that `fill` writes, atomically as seen by [`resolve`].
pub fn write_dir_atomically(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let old = hidden_sibling(target, "old");
    let tmp = hidden_sibling(target, "tmp");
    if let Some(parent) = target.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
    }
    // A crash between the renames of an earlier save: put the old checkpoint back first.
    if !target.exists() && old.is_dir() {
        std::fs::rename(&old, target).map_err(|e| Error::io(&old, e))?;
    }
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&tmp);
    if target.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
    }
    std::fs::rename(&tmp, target).map_err(|e| Error::io(target, e))?;
    if let Some(parent) = target.parent() {
        sync_dir(parent);
    }
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

fn serialize_tensors(
    tensors: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    safetensors::tensor::serialize(tensors, Some(metadata))
        .map_err(|e| Error::Usage(format!("serialising tensors: {e}")))
}

/// Writes a complete checkpoint to `dir`, atomically.
pub fn save(
    dir: &Path,
    config: &Config,
    tokenizer: &Tokenizer,
    params: &Params,
    optimizer: Option<&OptimizerState>,
    state: Option<&TrainState>,
) -> Result<()> {
    let mut tensors = Vec::new();
    for (name, var) in params.vars() {
        tensors.push((name.clone(), var.as_tensor().clone()));
    }
    let meta = HashMap::from([
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        (
            "writer".to_string(),
            format!("tinygpt {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    let model_bytes = serialize_tensors(tensors, meta)?;
    let opt_bytes = match optimizer {
        Some(opt) => {
            let mut t = Vec::new();
            for (n, m) in &opt.m {
                t.push((format!("m.{n}"), m.clone()));
            }
            for (n, v) in &opt.v {
                t.push((format!("v.{n}"), v.clone()));
            }
            let meta = HashMap::from([
                ("format_version".to_string(), FORMAT_VERSION.to_string()),
                ("step".to_string(), opt.step.to_string()),
            ]);
            Some(serialize_tensors(t, meta)?)
        }
        None => None,
    };
    let config_text = config.to_toml()?;
    let tok_json = tokenizer.to_json()?;
    let state_json = match state {
        Some(s) => Some(
            serde_json::to_string_pretty(s)
                .map_err(|e| Error::Usage(format!("state.json: {e}")))?,
        ),
        None => None,
    };
    write_dir_atomically(dir, |tmp| {
        write_synced(&tmp.join("model.safetensors"), &model_bytes)?;
        write_synced(&tmp.join("config.toml"), config_text.as_bytes())?;
        write_synced(&tmp.join("tokenizer.json"), tok_json.as_bytes())?;
        if let Some(b) = &opt_bytes {
            write_synced(&tmp.join("optimizer.safetensors"), b)?;
        }
        if let Some(s) = &state_json {
            write_synced(&tmp.join("state.json"), s.as_bytes())?;
        }
        Ok(())
    })
}

fn read_file(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::checkpoint(dir, format!("{name} is missing; is this a tinygpt checkpoint directory (it holds model.safetensors, config.toml, tokenizer.json)?"))
        } else {
            Error::checkpoint(dir, format!("{name}: {e}"))
        }
    })
}

/// Reads a safetensors file: tensors and `__metadata__`, refusing newer formats.
fn read_safetensors(
    dir: &Path,
    name: &str,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = read_file(dir, name)?;
    let bad = |e: &dyn std::fmt::Display| {
        Error::checkpoint(
            dir,
            format!("{name} is corrupt or truncated ({e}); restore it from a backup or retrain"),
        )
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(&e))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let version: u32 = meta
        .get("format_version")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::checkpoint(dir, format!("{name} has no tinygpt format_version in its metadata; it was not written by tinygpt"))
        })?;
    if version > FORMAT_VERSION {
        return Err(Error::checkpoint(
            dir,
            format!("{name} has format version {version}, newer than this tinygpt reads ({FORMAT_VERSION}); upgrade tinygpt"),
        ));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(&e))?;
    Ok((tensors, meta))
}

/// What identifies one written checkpoint directory: a save renames a new directory into
/// place, so its inode and change time differ from the one it replaces.
fn identity(dir: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).ok()?;
    Some((m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Loads the checkpoint in `dir` (see [`resolve`]), checking that its parts agree.
///
/// A run that is training may replace the checkpoint while it is read (a reader takes no
/// lock). The parts are then from two saves, or one went missing: when the directory read from
/// is not the one in place after reading, the read is done again, so a reader always gets one
/// whole checkpoint.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let mut tries = 0;
    loop {
        let before = identity(&resolve(dir));
        let result = load_once(dir, device);
        if before == identity(&resolve(dir)) || tries == 200 {
            return result;
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Refuses a checkpoint path that names no directory, before anything is read (or locked).
pub fn check_is_dir(requested: &Path) -> Result<()> {
    let dir = resolve(requested);
    if !dir.exists() {
        return Err(Error::checkpoint(
            requested,
            "does not exist; pass a checkpoint directory such as checkpoints/shakespeare-char/best",
        ));
    }
    if !dir.is_dir() {
        return Err(Error::checkpoint(
            requested,
            "is not a directory; pass the checkpoint directory, not a file in it",
        ));
    }
    Ok(())
}

/// One read of the checkpoint in `dir`, which may race a save ([`load`] checks).
fn load_once(dir: &Path, device: &Device) -> Result<Checkpoint> {
    check_is_dir(dir)?;
    let dir = resolve(dir);
    let config_bytes = read_file(&dir, "config.toml")?;
    let config_text = String::from_utf8(config_bytes)
        .map_err(|_| Error::checkpoint(&dir, "config.toml is not UTF-8 text"))?;
    let config = Config::parse(&config_text, &[])
        .map_err(|e| Error::checkpoint(&dir, format!("config.toml: {e}")))?;
    let tok_bytes = read_file(&dir, "tokenizer.json")?;
    let tok_text = String::from_utf8(tok_bytes)
        .map_err(|_| Error::checkpoint(&dir, "tokenizer.json is not UTF-8 text"))?;
    let tokenizer = Tokenizer::from_json(&tok_text)
        .map_err(|e| Error::checkpoint(&dir, format!("tokenizer.json: {e}")))?;
    if tokenizer.kind() != config.tokenizer.kind {
        return Err(Error::checkpoint(
            &dir,
            format!(
                "tokenizer.json is a {:?} tokenizer but config.toml says tokenizer.kind = {:?}",
                tokenizer.kind(),
                config.tokenizer.kind
            ),
        ));
    }
    let (tensors, _) = read_safetensors(&dir, "model.safetensors", device)?;
    if let Some(wte) = tensors.get("wte.weight") {
        let rows = wte.dims().first().copied().unwrap_or(0);
        if rows != tokenizer.vocab_size() {
            return Err(Error::checkpoint(
                &dir,
                format!(
                    "tokenizer.json has {} tokens but model.safetensors' wte.weight has {rows} rows: they come from different runs",
                    tokenizer.vocab_size()
                ),
            ));
        }
    }
    let mut params = Params::loaded(tensors, device);
    let vocab = tokenizer.vocab_size();
    let model = params
        .build(|vb| Gpt::new(&config.model, vocab, vb))
        .map_err(|e| {
            Error::checkpoint(
                &dir,
                format!("model.safetensors does not match config.toml: {e}"),
            )
        })?;
    let state = match std::fs::read(dir.join("state.json")) {
        Ok(bytes) => Some(
            serde_json::from_slice::<TrainState>(&bytes)
                .map_err(|e| Error::checkpoint(&dir, format!("state.json is corrupt: {e}")))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::checkpoint(&dir, format!("state.json: {e}"))),
    };
    if let Some(s) = &state {
        if s.format_version > STATE_VERSION {
            return Err(Error::checkpoint(&dir, format!("state.json has format version {}, newer than this tinygpt reads ({STATE_VERSION}); upgrade tinygpt", s.format_version)));
        }
    }
    Ok(Checkpoint {
        dir,
        config,
        tokenizer,
        model,
        params,
        state,
    })
}

/// Loads `optimizer.safetensors`, checking it has both moments of every parameter.
pub fn load_optimizer(dir: &Path, params: &Params, device: &Device) -> Result<OptimizerState> {
    let (mut tensors, meta) = read_safetensors(dir, "optimizer.safetensors", device)?;
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Error::checkpoint(dir, "optimizer.safetensors has no step in its metadata")
        })?;
    let mut m = HashMap::new();
    let mut v = HashMap::new();
    for (name, var) in params.vars() {
        for (prefix, map) in [("m", &mut m), ("v", &mut v)] {
            let key = format!("{prefix}.{name}");
            let t = tensors.remove(&key).ok_or_else(|| {
                Error::checkpoint(dir, format!("optimizer.safetensors lacks `{key}`"))
            })?;
            if t.dims() != var.dims() {
                return Err(Error::checkpoint(
                    dir,
                    format!(
                        "optimizer.safetensors: `{key}` has shape {:?}, the weight has {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            map.insert(name.clone(), t);
        }
    }
    Ok(OptimizerState { step, m, v })
}
