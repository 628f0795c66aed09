//! What each view of the page shows, computed on the model's own forward pass: the JSON the
//! API returns. Every function checks its inputs and names the bad one in a [`Error::Usage`],
//! which the server answers with a 400.

use std::path::Path;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Served;
use crate::error::{Error, Result};
use crate::model::attention::{simple_self_attention, softmax_last_dim};
use crate::model::block::SelfAttention;
use crate::model::Gpt;
use crate::rng::seeded;
use crate::run::checkpoint::Checkpoint;
use crate::sample::{candidates, generate_with, next_logits_with, SampleOptions};
use crate::viz::loss::Curves;
use crate::viz::maps::{AttentionMaps, HeadSel, LayerSel};

/// Tokens a view shows at most in its next-token table.
const TOP_ROWS: usize = 20;

/// A prompt as the model sees it: its ids (the last block_size tokens when it is longer) and
/// each token's text.
#[derive(Debug, Clone, Serialize)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
    /// Said when the prompt was longer than block_size and lost its head.
    pub note: Option<String>,
}

/// Encodes `text`, refusing empty text and unknown characters, keeping the last block_size
/// tokens of a longer one (and saying so).
pub fn prompt(ck: &Checkpoint, text: &str) -> Result<Prompt> {
    if text.is_empty() {
        return Err(Error::Usage("the prompt is empty; type some text".into()));
    }
    let mut ids = ck
        .tokenizer
        .encode(text)
        .map_err(|e| Error::Usage(format!("prompt: {e}")))?;
    if ids.is_empty() {
        return Err(Error::Usage("the prompt has no tokens".into()));
    }
    let block = ck.config.model.block_size;
    let note = (ids.len() > block).then(|| {
        let n = ids.len();
        ids.drain(..n - block);
        format!("the prompt is {n} tokens; the model sees only its last {block} (block_size)")
    });
    let tokens = ids.iter().map(|&i| ck.tokenizer.token_text(i)).collect();
    Ok(Prompt { ids, tokens, note })
}

/// The model's shape and run: what the page needs to build its pickers.
pub fn model_info(ck: &Checkpoint, metrics: Option<&Path>) -> Value {
    let m = &ck.config.model;
    let defaults = SampleOptions::default();
    // Relative to the working directory when under it: the page shows no path of the machine.
    let cwd = std::env::current_dir().unwrap_or_default();
    let shown = ck.dir.strip_prefix(&cwd).unwrap_or(&ck.dir);
    json!({
        "checkpoint": shown.display().to_string(),
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_embd": m.n_embd,
        "head_size": m.n_embd / m.n_head,
        "block_size": m.block_size,
        "vocab_size": ck.tokenizer.vocab_size(),
        "tokenizer": ck.tokenizer.kind().name(),
        "parameters": ck.params.count(),
        "position": format!("{:?}", m.position).to_lowercase(),
        "step": ck.state.as_ref().map(|s| s.step),
        "best_val_loss": ck.state.as_ref().and_then(|s| s.best_val_loss),
        "metrics": metrics.is_some(),
        "sampling": {
            "temperature": defaults.temperature,
            "top_k": defaults.top_k,
            "top_p": defaults.top_p,
            "seed": defaults.seed,
        },
    })
}

/// Every layer's and head's attention weights: exactly `tinygpt attention --format json`.
pub fn attention(ck: &Checkpoint, p: &Prompt) -> Result<String> {
    let maps = AttentionMaps::compute_ids(
        &ck.model,
        &ck.tokenizer,
        &p.ids,
        LayerSel::All,
        HeadSel::All,
    )?;
    Ok(maps.to_json())
}

/// Checks a layer and a head index against the model, naming the bad one.
fn check_layer_head(model: &Gpt, layer: usize, head: usize) -> Result<()> {
    let (l, h) = (model.cfg.n_layer, model.cfg.n_head);
    if layer >= l {
        return Err(Error::Usage(format!(
            "layer {layer} does not exist: the model has {l} layers (0..={})",
            l - 1
        )));
    }
    if head >= h {
        return Err(Error::Usage(format!(
            "head {head} does not exist: the model has {h} heads per layer (0..={})",
            h - 1
        )));
    }
    Ok(())
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2::<f32>()?)
}

/// One step of a head's attention for one query token, with the real numbers: what the
/// step-by-step view draws. `x` is the block's input after its first LayerNorm (what W_Q, W_K
/// and W_V read); with rotary embeddings `q` and the keys are the turned ones.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    pub layer: usize,
    pub head: usize,
    pub query: usize,
    pub tokens: Vec<String>,
    pub head_size: usize,
    /// LN₁(x) of the query token `(C)`.
    pub x: Vec<f32>,
    /// The head's W_Q `(hs, C)`: q = W_Q·x (+ b_Q).
    pub w_q: Vec<Vec<f32>>,
    pub b_q: Option<Vec<f32>>,
    /// Whether q and k were turned by rotary embeddings after the product.
    pub rotary: bool,
    /// The query `(hs)`.
    pub q: Vec<f32>,
    /// Keys and values of every token `(T, hs)`; those after the query are masked.
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// q·kⱼ for every token j `(T)`.
    pub scores: Vec<f32>,
    /// q·kⱼ / √d_k.
    pub scaled: Vec<f32>,
    /// + M: `null` (−∞) after the query.
    pub masked: Vec<Option<f32>>,
    /// softmax: the attention weights aⱼ (0 after the query).
    pub weights: Vec<f32>,
    /// Σ aⱼ vⱼ `(hs)`: the head's output for the query token.
    pub output: Vec<f32>,
}

/// The attention of `head` in `layer` for the query at position `query`, step by step, from
/// the block's own weights and the residual stream of the model's forward pass.
pub fn trace(
    ck: &Checkpoint,
    p: &Prompt,
    layer: usize,
    head: usize,
    query: usize,
) -> Result<Trace> {
    let model = &ck.model;
    check_layer_head(model, layer, head)?;
    let t = p.ids.len();
    if query >= t {
        return Err(Error::Usage(format!(
            "query {query} does not exist: the prompt has {t} tokens (0..={})",
            t - 1
        )));
    }
    let idx = Tensor::from_slice(&p.ids, (1, t), model.wte.device())?;
    let stream = model.residual_stream(&idx)?;
    let block = &model.blocks[layer];
    let x = stream[layer].apply(&block.ln_1)?; // (1, T, C)
    let (w_q, w_k, w_v, rope, hs, col) = match &block.attn {
        SelfAttention::Single { head: h, .. } => {
            (&h.w_q, &h.w_k, &h.w_v, h.rope.as_ref(), model.cfg.n_embd, 0)
        }
        SelfAttention::Multi(m) => {
            let hs = model.cfg.n_embd / m.n_head;
            (&m.w_q, &m.w_k, &m.w_v, m.rope.as_ref(), hs, head * hs)
        }
    };
    // (1, T, C) → this head's (T, hs), turned by rotary embeddings when the model has them.
    let project = |w: &crate::model::Linear, turn: bool| -> Result<Tensor> {
        let y = x.apply(w)?.narrow(2, col, hs)?.squeeze(0)?;
        match (turn, rope) {
            (true, Some(r)) => r.apply(&y, 0),
            _ => Ok(y),
        }
    };
    let (q_all, k, v) = (
        project(w_q, true)?,
        project(w_k, true)?,
        project(w_v, false)?,
    );
    let q = q_all.get(query)?; // (hs)
    let scores = k.matmul(&q.unsqueeze(1)?)?.squeeze(1)?; // (T)
    let scaled = (&scores * (1.0 / (hs as f64).sqrt()))?;
    let masked: Vec<Option<f32>> = scaled
        .to_vec1::<f32>()?
        .into_iter()
        .enumerate()
        .map(|(j, s)| (j <= query).then_some(s))
        .collect();
    let live = scaled.narrow(0, 0, query + 1)?;
    let weights = softmax_last_dim(&live)?;
    let output = weights
        .unsqueeze(0)?
        .matmul(&v.narrow(0, 0, query + 1)?)?
        .squeeze(0)?;
    let mut all_weights = weights.to_vec1::<f32>()?;
    all_weights.resize(t, 0.0);
    Ok(Trace {
        layer,
        head,
        query,
        tokens: p.tokens.clone(),
        head_size: hs,
        x: x.squeeze(0)?.get(query)?.to_vec1::<f32>()?,
        w_q: rows(&w_q.weight.narrow(0, col, hs)?)?,
        b_q: w_q
            .bias
            .as_ref()
            .map(|b| b.narrow(0, col, hs)?.to_vec1::<f32>())
            .transpose()?,
        rotary: rope.is_some(),
        q: q.to_vec1::<f32>()?,
        k: rows(&k)?,
        v: rows(&v)?,
        scores: scores.to_vec1::<f32>()?,
        scaled: scaled.to_vec1::<f32>()?,
        masked,
        weights: all_weights,
        output: output.to_vec1::<f32>()?,
    })
}

/// Sampling settings as the page sends them.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_top_k")]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_temperature() -> f64 {
    SampleOptions::default().temperature
}

fn default_top_k() -> Option<usize> {
    SampleOptions::default().top_k
}

fn default_seed() -> u64 {
    SampleOptions::default().seed
}

impl Sampling {
    /// The options of `tinygpt generate` for one token, checked; messages name the field.
    fn options(&self) -> Result<SampleOptions> {
        let opts = SampleOptions {
            max_new_tokens: 1,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            ..SampleOptions::default()
        };
        opts.validate_named(|name| name.replace('-', "_"))?;
        Ok(opts)
    }
}

/// The next token's distribution under `s`, most likely first (at most [`TOP_ROWS`] rows),
/// from the logits `tinygpt generate` samples from.
pub fn next_token(served: &Served, p: &Prompt, s: &Sampling) -> Result<Value> {
    let ck = &served.ck;
    let opts = s.options()?;
    let logits = served.with_decoder(|d| next_logits_with(&served.engine, Some(d), &p.ids))?;
    let all = candidates(&logits, &opts);
    let rows: Vec<Value> = all
        .iter()
        .take(TOP_ROWS)
        .map(|&(id, prob)| {
            json!({"id": id, "token": ck.tokenizer.token_text(id), "prob": prob, "logit": logits[id as usize]})
        })
        .collect();
    Ok(json!({"candidates": all.len(), "rows": rows}))
}

/// One token sampled as `tinygpt generate --prompt P --seed S --max-new-tokens 1` (with the
/// same temperature, top-k and top-p) samples it, and the prompt's text with it appended.
pub fn sample(served: &Served, text: &str, p: &Prompt, s: &Sampling) -> Result<Value> {
    let ck = &served.ck;
    let opts = s.options()?;
    let mut rng = seeded(opts.seed);
    let ids = served.with_decoder(|d| {
        generate_with(&served.engine, Some(d), &p.ids, &opts, &mut rng, |_| {
            Ok(true)
        })
    })?;
    let id = ids[0];
    // The text the token adds after this prompt (a byte-level token may only complete a
    // character together with the tokens before it).
    let before = ck.tokenizer.decode(&p.ids)?;
    let after = ck.tokenizer.decode(&[p.ids.as_slice(), &[id]].concat())?;
    let piece = match after.strip_prefix(&before) {
        Some(piece) => piece.to_string(),
        None => ck.tokenizer.decode(&[id])?,
    };
    Ok(json!({"id": id, "token": ck.tokenizer.token_text(id), "text": format!("{text}{piece}")}))
}

/// The logit lens: each block's output read through the final LayerNorm and the LM head, and
/// at each position the most likely next token and its probability.
pub fn lens(ck: &Checkpoint, p: &Prompt) -> Result<Value> {
    let model = &ck.model;
    let idx = Tensor::from_slice(&p.ids, (1, p.ids.len()), model.wte.device())?;
    let stream = model.residual_stream(&idx)?;
    let mut layers = Vec::new();
    for (l, h) in stream.iter().enumerate().skip(1) {
        let probs = softmax_last_dim(&model.lm_head(h)?.squeeze(0)?)?; // (T, V)
        let best = probs.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let top = probs.max(D::Minus1)?.to_vec1::<f32>()?;
        let cells: Vec<Value> = best
            .iter()
            .zip(&top)
            .map(|(&id, &prob)| json!({"id": id, "token": ck.tokenizer.token_text(id), "prob": prob}))
            .collect();
        layers.push(json!({"layer": l - 1, "cells": cells}));
    }
    Ok(json!({"tokens": p.tokens, "layers": layers}))
}

/// The `k` tokens whose embeddings are closest to `token`'s.
pub fn neighbours(ck: &Checkpoint, token: &str, k: usize) -> Result<Value> {
    if k == 0 || k > 1000 {
        return Err(Error::Usage(format!("k {k} must be in 1..=1000")));
    }
    let (id, near) = crate::run::inspect::neighbours(ck, token, k)?;
    Ok(json!({"id": id, "token": ck.tokenizer.token_text(id), "neighbours": near}))
}

/// The run's loss curves, from its metrics.csv.
pub fn metrics(path: Option<&Path>) -> Result<Value> {
    let path = path.ok_or_else(|| {
        Error::Usage("this checkpoint has no metrics.csv beside it (serve a run directory to see its curves)".into())
    })?;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let c = Curves::parse(&text, path)?;
    Ok(json!({"train": c.train, "val": c.val, "best_val": c.best_val()}))
}

/// The textbook's weightless self-attention of `vectors` (one per token): scores = X·Xᵀ,
/// weights = softmax by row, context = weights·X.
pub fn textbook(vectors: &[Vec<f32>]) -> Result<Value> {
    let t = vectors.len();
    let d = vectors.first().map_or(0, Vec::len);
    if t == 0 || d == 0 || t > 64 || d > 64 {
        return Err(Error::Usage(
            "vectors: give 1 to 64 tokens, each a vector of 1 to 64 numbers".into(),
        ));
    }
    if let Some(i) = vectors.iter().position(|v| v.len() != d) {
        return Err(Error::Usage(format!(
            "vectors: token {i} has {} numbers, token 0 has {d}; give every token the same length",
            vectors[i].len()
        )));
    }
    if vectors.iter().flatten().any(|x| !x.is_finite()) {
        return Err(Error::Usage("vectors: every number must be finite".into()));
    }
    let x = Tensor::from_vec(vectors.concat(), (t, d), &candle_core::Device::Cpu)?;
    let scores = x.matmul(&x.t()?)?;
    let (context, weights) = simple_self_attention(&x)?;
    Ok(
        json!({"inputs": vectors, "scores": rows(&scores)?, "weights": rows(&weights)?, "context": rows(&context)?}),
    )
}
