//! The run configuration: a TOML file with four tables (`[model]`, `[tokenizer]`, `[training]`,
//! `[data]`). Every tunable number lives here; nothing hides in code. Unknown keys are rejected
//! so that a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::data::tokenizer::{TokenizerConfig, TokenizerKind};
pub use crate::engine::EngineChoice;
use crate::error::{Error, Result};
pub use crate::model::config::Position;
pub use crate::model::ModelConfig;
pub use crate::model::Precision;

/// Optimisation and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Sequences per micro-batch (B).
    pub batch_size: usize,
    /// Optimizer steps in the whole run.
    pub max_iters: usize,
    /// Peak learning rate, reached after warm-up.
    pub learning_rate: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Steps of linear warm-up from 0 to `learning_rate`.
    pub warmup_iters: usize,
    /// Step at which the cosine decay reaches `min_lr`.
    pub lr_decay_iters: usize,
    /// Decoupled (AdamW) weight decay, applied to 2-D weight matrices only.
    pub weight_decay: f64,
    /// AdamW first-moment decay.
    pub beta1: f64,
    /// AdamW second-moment decay.
    pub beta2: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub grad_clip: f64,
    /// Micro-batches whose gradients are summed into one step.
    #[serde(default = "one")]
    pub grad_accum_steps: usize,
    /// Evaluate train and val loss every this many steps.
    pub eval_interval: usize,
    /// Batches per split in each evaluation.
    pub eval_iters: usize,
    /// Share of the corpus (its tail) held out for validation.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Seed of every random number in the run.
    pub seed: u64,
    /// Write `last/` every this many steps (and at the end).
    pub checkpoint_interval: usize,
    /// Keep only each block's input during the forward pass and recompute the block in the
    /// backward pass: activation memory falls from every block's to one block's, for about
    /// a third more compute.
    #[serde(default)]
    pub recompute_activations: bool,
    /// What updates the blocks' 2-D weights: `adamw`, or `muon` (AdamW keeps the embeddings,
    /// the tied LM head, gains and biases).
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Muon's peak learning rate; its schedule has the shape of `learning_rate`'s.
    #[serde(default = "default_muon_learning_rate")]
    pub muon_learning_rate: f64,
    /// Muon's momentum β.
    #[serde(default = "default_muon_momentum")]
    pub muon_momentum: f64,
    /// Muon's momentum rises linearly from 0.85 to `muon_momentum` over this many first steps
    /// (the speedrun's warm-up: less momentum while the gradients turn fastest); 0 = off.
    #[serde(default)]
    pub muon_momentum_warmup: usize,
    /// `cosine` (warm-up, then cosine decay to `min_lr` at `lr_decay_iters`) or `wsd`
    /// (warm-up, stable at the peak, then linear decay over the last `cooldown_iters` steps
    /// before `lr_decay_iters`).
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// `wsd`: steps of the final linear decay.
    #[serde(default)]
    pub cooldown_iters: usize,
    /// What runs the model (`--engine` on the command line wins): `auto` (the fused CPU
    /// kernels when they support every model option, else the reference), `reference` or
    /// `fused`. A run's checkpoints keep it, so a resumed run stays on its engine.
    #[serde(default)]
    pub engine: EngineChoice,
    /// The dtype of the matrix products: `f32`, or `bf16` (bf16 operands, f32 results, f32
    /// weights and optimizer state: PyTorch's autocast), which runs on the reference engine.
    /// Checkpoints stay f32 either way.
    #[serde(default)]
    pub dtype: Precision,
}

/// What updates the blocks' 2-D weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW for every parameter (nanoGPT's recipe).
    #[default]
    Adamw,
    /// Muon for the blocks' 2-D weights, AdamW for the rest.
    Muon,
}

/// The learning rate's shape over a run ([`crate::train::schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Linear warm-up, cosine decay (nanoGPT's).
    #[default]
    Cosine,
    /// Warm-up, stable, decay: linear warm-up, the peak, a linear cooldown.
    Wsd,
}

fn default_muon_learning_rate() -> f64 {
    0.02
}

fn default_muon_momentum() -> f64 {
    0.95
}

fn one() -> usize {
    1
}

fn default_val_fraction() -> f64 {
    0.1
}

/// Where the corpus comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Path of the UTF-8 corpus, relative to the working directory.
    pub path: PathBuf,
}

/// A whole run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub tokenizer: TokenizerConfig,
    pub training: TrainingConfig,
    pub data: DataConfig,
}

/// Smallest BPE vocabulary: the 256 byte symbols plus the special tokens.
pub const MIN_BPE_VOCAB: usize = 256 + crate::data::tokenizer::SPECIAL_TOKENS.len();

impl Config {
    /// Reads and validates a config file, applying `key=value` overrides first.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, overrides).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses config text, applies `key=value` overrides (e.g. `training.max_iters=100`) and
    /// validates the result.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Config> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| Error::Config(one_line(&e.to_string())))?;
        for ov in overrides {
            apply_override(&mut table, ov)?;
        }
        move_legacy_engine_key(&mut table);
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(one_line(&e.to_string())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML text (what `config.toml` in a checkpoint holds).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks every value against what it may be; the message names key, value and range.
    pub fn validate(&self) -> Result<()> {
        validate_model(&self.model)?;
        validate_tokenizer(&self.tokenizer)?;
        validate_training_counts(&self.training)?;
        validate_optimizer(&self.training)?;
        validate_cooldown_and_split(&self.training)
    }
}

/// Checks the `[model]` table: sizes, head split, dropout, RoPE head size and soft cap.
fn validate_model(m: &ModelConfig) -> Result<()> {
    positive("model.block_size", m.block_size)?;
    positive("model.n_layer", m.n_layer)?;
    positive("model.n_head", m.n_head)?;
    positive("model.n_embd", m.n_embd)?;
    if !m.n_embd.is_multiple_of(m.n_head) {
        return Err(Error::Config(format!(
            "model.n_embd = {} is not a multiple of model.n_head = {}: each head gets n_embd / n_head dimensions",
            m.n_embd, m.n_head
        )));
    }
    if !(0.0..1.0).contains(&m.dropout) {
        return Err(Error::Config(format!(
            "model.dropout = {} must be in [0, 1)",
            m.dropout
        )));
    }
    let hs = m.n_embd / m.n_head;
    if m.position == Position::Rope && !hs.is_multiple_of(2) {
        return Err(Error::Config(format!(
            "model.position = \"rope\" turns pairs of a head's entries, but the head size n_embd / n_head = {hs} is odd: choose n_embd and n_head for an even head size"
        )));
    }
    if !(m.logit_softcap == 0.0 || m.logit_softcap.is_finite() && m.logit_softcap > 0.0) {
        return Err(Error::Config(format!(
            "model.logit_softcap = {} must be 0 (off) or a positive number (e.g. 30)",
            m.logit_softcap
        )));
    }
    Ok(())
}

/// Checks that a BPE `[tokenizer]` has room for the bytes and the special tokens.
fn validate_tokenizer(tok: &TokenizerConfig) -> Result<()> {
    if tok.kind == TokenizerKind::Bpe && tok.vocab_size < MIN_BPE_VOCAB {
        return Err(Error::Config(format!(
            "tokenizer.vocab_size = {} is too small for a byte-level BPE: it needs at least {MIN_BPE_VOCAB} (256 bytes + special tokens)",
            tok.vocab_size
        )));
    }
    Ok(())
}

/// Checks the `[training]` counts, learning rates and the warmup / decay lengths.
fn validate_training_counts(t: &TrainingConfig) -> Result<()> {
    positive("training.batch_size", t.batch_size)?;
    positive("training.max_iters", t.max_iters)?;
    positive("training.grad_accum_steps", t.grad_accum_steps)?;
    positive("training.eval_interval", t.eval_interval)?;
    positive("training.eval_iters", t.eval_iters)?;
    positive("training.checkpoint_interval", t.checkpoint_interval)?;
    positive_f("training.learning_rate", t.learning_rate)?;
    let most = crate::rng::MAX_BATCHES_PER_STEP;
    for (key, v) in [
        ("training.grad_accum_steps", t.grad_accum_steps),
        ("training.eval_iters", t.eval_iters),
    ] {
        if v > most {
            return Err(Error::Config(format!(
                "{key} = {v} is more than {most}, the most batches a step draws streams for"
            )));
        }
    }
    if t.max_iters > crate::rng::MAX_STEPS {
        return Err(Error::Config(format!(
            "training.max_iters = {} is more than {}, the most steps a run draws streams for",
            t.max_iters,
            crate::rng::MAX_STEPS
        )));
    }
    if !(t.min_lr >= 0.0 && t.min_lr <= t.learning_rate) {
        return Err(Error::Config(format!(
            "training.min_lr = {} must be in [0, learning_rate = {}]",
            t.min_lr, t.learning_rate
        )));
    }
    if t.warmup_iters > t.max_iters {
        return Err(Error::Config(format!(
            "training.warmup_iters = {} is larger than training.max_iters = {}",
            t.warmup_iters, t.max_iters
        )));
    }
    if t.lr_decay_iters < t.warmup_iters {
        return Err(Error::Config(format!(
            "training.lr_decay_iters = {} must be at least training.warmup_iters = {}",
            t.lr_decay_iters, t.warmup_iters
        )));
    }
    Ok(())
}

/// Checks the `[training]` optimizer settings: betas, weight decay, clipping and Muon's.
fn validate_optimizer(t: &TrainingConfig) -> Result<()> {
    for (key, v) in [("training.beta1", t.beta1), ("training.beta2", t.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::Config(format!("{key} = {v} must be in [0, 1)")));
        }
    }
    if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
        return Err(Error::Config(format!(
            "training.weight_decay = {} must be a finite number ≥ 0",
            t.weight_decay
        )));
    }
    if !(t.grad_clip >= 0.0 && t.grad_clip.is_finite()) {
        return Err(Error::Config(format!(
            "training.grad_clip = {} must be ≥ 0 (0 turns clipping off)",
            t.grad_clip
        )));
    }
    positive_f("training.muon_learning_rate", t.muon_learning_rate)?;
    if !(0.0..1.0).contains(&t.muon_momentum) {
        return Err(Error::Config(format!(
            "training.muon_momentum = {} must be in [0, 1)",
            t.muon_momentum
        )));
    }
    Ok(())
}

/// Checks the WSD cooldown length and the validation fraction.
fn validate_cooldown_and_split(t: &TrainingConfig) -> Result<()> {
    if t.lr_schedule == LrSchedule::Wsd && t.cooldown_iters > t.lr_decay_iters - t.warmup_iters {
        return Err(Error::Config(format!(
            "training.cooldown_iters = {} must be at most lr_decay_iters − warmup_iters = {}",
            t.cooldown_iters,
            t.lr_decay_iters - t.warmup_iters
        )));
    }
    if !(t.val_fraction > 0.0 && t.val_fraction < 1.0) {
        return Err(Error::Config(format!(
            "training.val_fraction = {} must be in (0, 1)",
            t.val_fraction
        )));
    }
    Ok(())
}

/// `model.kernels` ("fused" or "reference"), the engine key of configs and checkpoints written
/// before the engine became a run option, is read as `training.engine` (unless that is set):
/// an old run resumes on the engine it was trained on.
fn move_legacy_engine_key(table: &mut toml::Table) {
    let Some(old) = table
        .get_mut("model")
        .and_then(|m| m.as_table_mut())
        .and_then(|m| m.remove("kernels"))
    else {
        return;
    };
    if let Some(training) = table.get_mut("training").and_then(|t| t.as_table_mut()) {
        training.entry("engine").or_insert(old);
    }
}

fn positive(key: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::Config(format!("{key} = 0 must be at least 1")));
    }
    Ok(())
}

fn positive_f(key: &str, v: f64) -> Result<()> {
    if !(v > 0.0 && v.is_finite()) {
        return Err(Error::Config(format!("{key} = {v} must be a number > 0")));
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Applies one `section.key=value` override to the raw TOML table. The value is read as TOML
/// (`100`, `1e-3`, `true`, `"bpe"`); a bare word that is not valid TOML is taken as a string.
impl TokenizerConfig {
    /// A `[tokenizer]` table from `tokenizer.*` overrides alone (`char` unless they say
    /// otherwise), for commands that take no whole config.
    pub fn from_overrides(overrides: &[String]) -> Result<TokenizerConfig> {
        let mut table: toml::Table = toml::from_str("[tokenizer]\nkind = \"char\"\n")
            .map_err(|e| Error::Config(e.to_string()))?;
        for ov in overrides {
            if !ov.starts_with("tokenizer.") {
                return Err(Error::Config(format!(
                    "override `{ov}`: without --config only tokenizer.* keys apply here"
                )));
            }
            apply_override(&mut table, ov)?;
        }
        let t = table
            .remove("tokenizer")
            .unwrap_or_else(|| toml::Value::Table(Default::default()));
        let tok: TokenizerConfig = t
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(one_line(&e.to_string())))?;
        validate_tokenizer(&tok)?;
        Ok(tok)
    }
}

fn apply_override(table: &mut toml::Table, ov: &str) -> Result<()> {
    let (key, raw) = ov.split_once('=').ok_or_else(|| {
        Error::Config(format!(
            "override `{ov}` is not of the form section.key=value (e.g. training.max_iters=100)"
        ))
    })?;
    let key = key.trim();
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Config(format!(
            "override key `{key}` must be section.key, e.g. training.max_iters"
        )));
    }
    let section = table
        .entry(parts[0].to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match section {
        toml::Value::Table(t) => {
            t.insert(parts[1].to_string(), value);
            Ok(())
        }
        _ => Err(Error::Config(format!("`{}` is not a table", parts[0]))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"
[model]
block_size = 16
n_layer = 2
n_head = 2
n_embd = 32
[tokenizer]
kind = "char"
[training]
batch_size = 4
max_iters = 10
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 2
lr_decay_iters = 10
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
eval_interval = 5
eval_iters = 2
seed = 1
checkpoint_interval = 5
[data]
path = "x.txt"
"#;

    #[test]
    fn parses_with_defaults_and_overrides() {
        let cfg = Config::parse(TINY, &["training.max_iters=20".into()]).unwrap();
        assert_eq!(cfg.training.max_iters, 20);
        assert_eq!(cfg.training.grad_accum_steps, 1);
        assert_eq!(cfg.training.val_fraction, 0.1);
        assert_eq!(cfg.training.engine, EngineChoice::Auto);
        let cfg = Config::parse(TINY, &["tokenizer.kind=bpe".into()]).unwrap();
        assert_eq!(cfg.tokenizer.kind, TokenizerKind::Bpe);
        // round trip through the checkpoint's config.toml
        let again = Config::parse(&cfg.to_toml().unwrap(), &[]).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn the_old_engine_key_is_read_as_training_engine() {
        let old = |v: &str| format!("model.kernels=\"{v}\"");
        let cfg = Config::parse(TINY, &[old("reference")]).unwrap();
        assert_eq!(cfg.training.engine, EngineChoice::Reference);
        assert!(!cfg.to_toml().unwrap().contains("kernels"));
        let set = "training.engine=\"fused\"".to_string();
        let cfg = Config::parse(TINY, &[old("reference"), set]).unwrap();
        assert_eq!(cfg.training.engine, EngineChoice::Fused, "a new key wins");
        let e = Config::parse(TINY, &[old("fast")]).unwrap_err();
        assert!(e.to_string().contains("unknown variant `fast`"), "{e}");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let e = Config::parse(TINY, &["training.max_iter=20".into()]).unwrap_err();
        assert!(e.to_string().contains("max_iter"), "{e}");
        let e = Config::parse(TINY, &["model.n_head=3".into()]).unwrap_err();
        assert!(e.to_string().contains("not a multiple"), "{e}");
        let e = Config::parse(TINY, &["training.learning_rate=0".into()]).unwrap_err();
        assert!(e.to_string().contains("training.learning_rate"), "{e}");
        let e = Config::parse(TINY, &["model.dropout=1.0".into()]).unwrap_err();
        assert!(e.to_string().contains("model.dropout"), "{e}");
        let e = Config::parse(TINY, &["training.val_fraction=0".into()]).unwrap_err();
        assert!(e.to_string().contains("val_fraction"), "{e}");
        let e = Config::parse(TINY, &["training.warmup_iters=11".into()]).unwrap_err();
        assert!(e.to_string().contains("warmup_iters"), "{e}");
        let e = Config::parse(TINY, &["model.n_layer=x".into()]).unwrap_err();
        assert!(e.to_string().contains("n_layer"), "{e}");
        let e = Config::parse(
            TINY,
            &[
                "tokenizer.kind=bpe".into(),
                "tokenizer.vocab_size=100".into(),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("vocab_size = 100"), "{e}");
        let e = Config::parse(TINY, &["nonsense".into()]).unwrap_err();
        assert!(e.to_string().contains("section.key=value"), "{e}");
    }
}
