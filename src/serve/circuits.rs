//! The page's circuits view: each head's scores on the run's data, a prompt with chosen heads
//! ablated, activation patching between two prompts, and direct logit attribution, all from
//! [`crate::circuits`] on the reference model.

use candle_core::{DType, Tensor};
use serde::Deserialize;
use serde_json::{json, Value};

use super::Served;
use crate::circuits::attribution::direct_logit_attribution;
use crate::circuits::patching::patch_each_head;
use crate::circuits::scores::{
    ablation_hooks, parse_head, sample_windows, score_heads, token_losses, Ablation, HeadReport,
    ScoreOptions, SAMPLE_TOKENS,
};
use crate::circuits::{encode_whole, one_token};
use crate::data::corpus::{load_for, Split};
use crate::error::{Error, Result};
use crate::model::attention::softmax_last_dim;
use crate::model::hooks::check_heads;
use crate::model::Hooks;
use crate::progress::ProgressMode;

/// Next-token rows the ablation view shows.
const TOP_ROWS: usize = 10;

/// The head scores of the served checkpoint on its data, computed on first request.
pub fn scores(s: &Served) -> Result<std::sync::Arc<HeadReport>> {
    let mut cached = s
        .head_scores
        .lock()
        .map_err(|_| Error::Usage("an earlier head-score request failed; restart serve".into()))?;
    if let Some(r) = cached.as_ref() {
        return Ok(r.clone());
    }
    let ck = &s.ck;
    let cfg = &ck.config;
    let path = s.data.clone().unwrap_or_else(|| cfg.data.path.clone());
    if !path.exists() {
        return Err(Error::Usage(format!(
            "the head scores read the run's data, {}, which is not there: start serve with \
             --data FILE",
            path.display()
        )));
    }
    let block = cfg.model.block_size;
    let data = load_for(
        &ck.tokenizer,
        &path,
        cfg.training.val_fraction,
        block,
        ProgressMode::Quiet,
    )?;
    let windows = sample_windows(&data, Split::Val, block, Some(SAMPLE_TOKENS))?;
    let opts = ScoreOptions::defaults(block);
    let report = score_heads(
        &ck.model,
        &windows,
        "val",
        &ck.tokenizer.special_ids(),
        &opts,
        ProgressMode::Quiet,
    )?;
    let report = std::sync::Arc::new(report);
    *cached = Some(report.clone());
    Ok(report)
}

/// A prompt a circuit view runs whole ([`encode_whole`]): its ids, as a `(1, T)` tensor, and
/// each token's text.
fn whole(s: &Served, text: &str, what: &str) -> Result<(Tensor, Vec<String>)> {
    let model = &s.ck.model;
    let ids = encode_whole(&s.ck.tokenizer, text, what, model.cfg.block_size)?;
    let tokens = ids.iter().map(|&i| s.ck.tokenizer.token_text(i)).collect();
    let idx = Tensor::from_vec(ids.clone(), (1, ids.len()), model.wte.device())?;
    Ok((idx, tokens))
}

/// A pass's per-token losses (token i + 1 predicted at i) and its top next tokens.
fn outcome(s: &Served, logits: &Tensor, idx: &Tensor) -> Result<Value> {
    let t = idx.dim(1)?;
    let losses: Vec<f32> = match t {
        1 => Vec::new(),
        _ => {
            let x = logits.narrow(1, 0, t - 1)?;
            let y = idx.narrow(1, 1, t - 1)?.contiguous()?;
            token_losses(&x, &y)?.squeeze(0)?.to_vec1::<f32>()?
        }
    };
    let last = logits.get(0)?.get(t - 1)?.to_dtype(DType::F32)?;
    let probs = softmax_last_dim(&last)?;
    let order = probs.arg_sort_last_dim(false)?.to_vec1::<u32>()?;
    let probs = probs.to_vec1::<f32>()?;
    let next: Vec<Value> = order
        .iter()
        .take(TOP_ROWS)
        .map(|&id| {
            json!({"id": id, "token": s.ck.tokenizer.token_text(id), "prob": probs[id as usize]})
        })
        .collect();
    let mean = match losses.len() {
        0 => None,
        n => Some(losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64),
    };
    Ok(json!({"losses": losses, "loss": mean, "next": next}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblateReq {
    pub prompt: String,
    /// Heads as `LAYER.HEAD`.
    pub heads: Vec<String>,
    #[serde(default = "mean")]
    pub ablation: Ablation,
}

fn mean() -> Ablation {
    Ablation::Mean
}

/// The prompt with `heads` ablated (mean: their means over the run's data) beside the plain
/// pass: each token's loss and the next token's distribution.
pub fn ablate(s: &Served, r: &AblateReq) -> Result<Value> {
    let model = &s.ck.model;
    let (idx, tokens) = whole(s, &r.prompt, "prompt")?;
    let heads = r
        .heads
        .iter()
        .map(|h| parse_head(h))
        .collect::<Result<Vec<_>>>()?;
    check_heads(heads.iter().copied(), model.cfg.n_layer, model.cfg.n_head)?;
    let hooks = match r.ablation {
        Ablation::Zero => ablation_hooks(&[], &heads, Ablation::Zero)?,
        Ablation::Mean if heads.is_empty() => Hooks::none(),
        Ablation::Mean => ablation_hooks(&scores(s)?.means, &heads, Ablation::Mean)?,
    };
    let base = model.trace(&idx, &Hooks::none())?.logits;
    let ablated = model.trace(&idx, &hooks)?.logits;
    Ok(json!({
        "tokens": tokens,
        "heads": r.heads,
        "ablation": r.ablation,
        "base": outcome(s, &base, &idx)?,
        "ablated": outcome(s, &ablated, &idx)?,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchReq {
    pub clean: String,
    pub corrupted: String,
    pub answer: String,
    pub wrong: String,
}

/// Each head patched from the clean prompt into the corrupted one, on the logit difference
/// of the answer and the wrong token.
pub fn patch(s: &Served, r: &PatchReq) -> Result<Value> {
    let (tok, block) = (&s.ck.tokenizer, s.ck.config.model.block_size);
    let clean = encode_whole(tok, &r.clean, "clean prompt", block)?;
    let corrupted = encode_whole(tok, &r.corrupted, "corrupted prompt", block)?;
    let answer = one_token(tok, &r.answer, "answer")?;
    let wrong = one_token(tok, &r.wrong, "wrong")?;
    let p = patch_each_head(&s.ck.model, &clean, &corrupted, answer, wrong)?;
    let mut v = serde_json::to_value(&p).map_err(|e| Error::Usage(e.to_string()))?;
    let texts = |ids: &[u32]| -> Vec<String> { ids.iter().map(|&i| tok.token_text(i)).collect() };
    v["clean_tokens"] = json!(texts(&clean));
    v["corrupted_tokens"] = json!(texts(&corrupted));
    Ok(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlaReq {
    pub prompt: String,
    /// The next token to explain; the model's most likely one when absent or empty.
    #[serde(default)]
    pub token: Option<String>,
    /// The position whose next token to explain; the last when absent.
    #[serde(default)]
    pub position: Option<usize>,
}

/// Direct logit attribution of a next token's logit at a position of the prompt.
pub fn dla(s: &Served, r: &DlaReq) -> Result<Value> {
    let (tok, model) = (&s.ck.tokenizer, &s.ck.model);
    let ids = encode_whole(tok, &r.prompt, "prompt", model.cfg.block_size)?;
    let position = r.position.unwrap_or(ids.len() - 1);
    let token = match r.token.as_deref() {
        Some(t) if !t.is_empty() => Some(one_token(tok, t, "chosen")?),
        _ => None,
    };
    let a = direct_logit_attribution(model, &ids, position, token)?;
    let mut v = serde_json::to_value(&a).map_err(|e| Error::Usage(e.to_string()))?;
    v["token_text"] = json!(tok.token_text(a.token));
    v["tokens"] = json!(ids.iter().map(|&i| tok.token_text(i)).collect::<Vec<_>>());
    Ok(v)
}
