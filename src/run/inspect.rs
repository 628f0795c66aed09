//! What is in a checkpoint: config, sizes, losses and per-tensor statistics.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::run::checkpoint::Checkpoint;
use crate::run::config::Config;

/// Statistics of one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorStats {
    pub name: String,
    pub shape: Vec<usize>,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub nan: usize,
    pub inf: usize,
}

/// The tokenizer in a report.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizerInfo {
    pub kind: String,
    pub vocab_size: usize,
}

/// Everything `tinygpt inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checkpoint: String,
    pub config: Config,
    pub tokenizer: TokenizerInfo,
    /// Total trainable scalars (the LM head shares the token embedding and is counted once).
    pub parameters: usize,
    /// Scalars per module (`wte`, `wpe`, `h.0`, …, `ln_f`).
    pub modules: BTreeMap<String, usize>,
    pub step: Option<usize>,
    pub best_val_loss: Option<f64>,
    pub last_train_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub tensors: Vec<TensorStats>,
}

fn module_of(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    if parts[0] == "h" && parts.len() > 1 {
        format!("h.{}", parts[1])
    } else {
        parts[0].to_string()
    }
}

fn stats(name: &str, t: &candle_core::Tensor) -> Result<TensorStats> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    let finite: Vec<f64> = v
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| x as f64)
        .collect();
    let n = finite.len().max(1) as f64;
    let mean = finite.iter().sum::<f64>() / n;
    let var = finite.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Ok(TensorStats {
        name: name.to_string(),
        shape: t.dims().to_vec(),
        mean,
        std: var.sqrt(),
        min: finite.iter().copied().fold(f64::INFINITY, f64::min),
        max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        nan: v.iter().filter(|x| x.is_nan()).count(),
        inf: v.iter().filter(|x| x.is_infinite()).count(),
    })
}

impl Report {
    /// Builds the report of a loaded checkpoint.
    pub fn new(ck: &Checkpoint) -> Result<Report> {
        let mut modules = BTreeMap::new();
        let mut tensors = Vec::new();
        for (name, var) in ck.params.vars() {
            *modules.entry(module_of(name)).or_insert(0) += var.elem_count();
            tensors.push(stats(name, var.as_tensor())?);
        }
        let last = ck.state.as_ref().and_then(|s| s.history.last());
        Ok(Report {
            checkpoint: ck.dir.display().to_string(),
            config: ck.config.clone(),
            tokenizer: TokenizerInfo {
                kind: ck.tokenizer.kind().name().to_string(),
                vocab_size: ck.tokenizer.vocab_size(),
            },
            parameters: ck.params.count(),
            modules,
            step: ck.state.as_ref().map(|s| s.step),
            best_val_loss: ck.state.as_ref().and_then(|s| s.best_val_loss),
            last_train_loss: last.map(|p| p.train_loss),
            last_val_loss: last.map(|p| p.val_loss),
            tensors,
        })
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The report as text for a terminal.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let m = &self.config.model;
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        let _ = writeln!(s, "checkpoint   {}", self.checkpoint);
        let _ = writeln!(
            s,
            "model        {} layers, {} heads, n_embd {}, block_size {}, dropout {}, bias {}, activation {:?}, norm {:?}, qk_norm {}",
            m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias, m.activation, m.norm, m.qk_norm
        );
        let _ = writeln!(
            s,
            "             positions {:?}, tied head {}, zero init {}, logit softcap {}, bigram buckets {}",
            m.position, m.tie_embeddings, m.zero_init, m.logit_softcap, m.bigram_buckets
        );
        let t = &self.config.training;
        let _ = writeln!(
            s,
            "training     optimizer {:?}, schedule {:?}",
            t.optimizer, t.lr_schedule
        );
        let _ = writeln!(
            s,
            "tokenizer    {} ({} tokens)",
            self.tokenizer.kind, self.tokenizer.vocab_size
        );
        let _ = writeln!(
            s,
            "parameters   {} ({:.2}M)",
            self.parameters,
            self.parameters as f64 / 1e6
        );
        for (module, n) in &self.modules {
            let _ = writeln!(s, "  {module:<10} {n:>10}");
        }
        let _ = writeln!(
            s,
            "step         {}",
            self.step.map_or("-".into(), |v| v.to_string())
        );
        let _ = writeln!(s, "best val     {}", opt(self.best_val_loss));
        let _ = writeln!(s, "last train   {}", opt(self.last_train_loss));
        let _ = writeln!(s, "last val     {}", opt(self.last_val_loss));
        let _ = writeln!(s, "data         {}", self.config.data.path.display());
        let _ = writeln!(
            s,
            "\n{:<28} {:<14} {:>9} {:>9} {:>9} {:>9} {:>4} {:>4}",
            "tensor", "shape", "mean", "std", "min", "max", "nan", "inf"
        );
        for t in &self.tensors {
            let shape = format!("{:?}", t.shape);
            let _ = writeln!(
                s,
                "{:<28} {:<14} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>4} {:>4}",
                t.name, shape, t.mean, t.std, t.min, t.max, t.nan, t.inf
            );
        }
        s
    }
}

/// A token near another in embedding space.
#[derive(Debug, Clone, Serialize)]
pub struct Neighbour {
    pub id: u32,
    pub token: String,
    /// Cosine similarity of the two embedding rows.
    pub similarity: f32,
}

/// Reads a token as typed on a command line: `\n`, `\t` and `␣` stand for newline, tab, space.
fn typed_token(s: &str) -> String {
    match s {
        "\\n" => "\n".into(),
        "\\t" => "\t".into(),
        _ => s.replace('␣', " "),
    }
}

/// The `k` tokens whose embedding rows (`wte`) are closest to `token`'s by cosine similarity.
pub fn neighbours(ck: &Checkpoint, token: &str, k: usize) -> Result<(u32, Vec<Neighbour>)> {
    let text = typed_token(token);
    let ids = ck
        .tokenizer
        .encode(&text)
        .map_err(|e| Error::Usage(format!("--neighbours {token:?}: {e}")))?;
    let id = match ids.as_slice() {
        [id] => *id,
        [] => return Err(Error::Usage("--neighbours needs a token, got empty text".into())),
        more => {
            return Err(Error::Usage(format!(
                "--neighbours {token:?} is {} tokens, not one (see `tinygpt tokenize`); pass a single token",
                more.len()
            )))
        }
    };
    let w = &ck.model.wte; // (V, C)
    let norms = w.sqr()?.sum_keepdim(1)?.sqrt()?;
    let unit = w.broadcast_div(&(norms + 1e-12)?)?;
    let sims = unit
        .matmul(&unit.get(id as usize)?.unsqueeze(1)?)?
        .squeeze(1)?
        .to_vec1::<f32>()?;
    let mut order: Vec<usize> = (0..sims.len()).filter(|&i| i != id as usize).collect();
    order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
    let out = order
        .into_iter()
        .take(k)
        .map(|i| Neighbour {
            id: i as u32,
            token: ck.tokenizer.token_text(i as u32),
            similarity: sims[i],
        })
        .collect();
    Ok((id, out))
}
