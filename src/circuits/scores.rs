//! One row of scores per (layer, head): what the head does and whether it matters.
//!
//! - **ablation**: the loss increase over a data sample when the head's output z is replaced by
//!   its mean over that sample (mean ablation; or by zeros). What the model loses without it.
//! - **previous-token**: mean attention from position i to i − 1; **current-token**: to i
//!   itself.
//! - **induction**: on random tokens r₁ … r_L written twice, the mean attention from the second
//!   copy's token at L + j to position j + 1, the token after its earlier occurrence: the head
//!   that finds "where was this token before, and what came next" (Olsson et al. 2022). The
//!   model's loss on the second copy against the first says whether it learns in context, and
//!   each head's ablation on the second copy says which heads that takes.
//! - **sink**: mean attention to the first token; **entropy**: mean entropy of an attention
//!   row, in nats (0: one token; ln(i + 1): uniform over the past).
//!
//! Attention scores skip position 0, whose row has one choice. A randomly initialised model of
//! the same shape is scored too, so a score reads against chance.

use candle_core::{DType, Device, Tensor, D};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use crate::data::corpus::{Dataset, Split};
use crate::error::{Error, Result};
use crate::model::hooks::{check_heads, Trace};
use crate::model::{Gpt, HeadPatch, Hooks, Params};
use crate::progress::{Progress, ProgressMode};
use crate::rng::seeded;

/// Windows in one forward pass.
const WINDOWS_PER_PASS: usize = 16;

/// Predicted tokens in the data sample unless told otherwise: seconds on a small model.
pub const SAMPLE_TOKENS: usize = 8192;

/// Random sequences in the induction test unless told otherwise.
pub const INDUCTION_SEQS: usize = 32;

/// What replaces an ablated head's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Ablation {
    /// Its mean over the data sample `(hs)`: removes what the head says about this context,
    /// keeps what it says always.
    Mean,
    /// Zeros.
    Zero,
}

/// How [`score_heads`] samples and measures.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    pub ablation: Ablation,
    /// L, the length of each random sequence written twice (2L ≤ block_size).
    pub induction_len: usize,
    /// How many random sequences.
    pub induction_seqs: usize,
    /// Seed of the random sequences and of the randomly initialised baseline.
    pub seed: u64,
    /// Heads to ablate together, for [`HeadReport::ablated`] (none: skipped).
    pub ablate: Vec<(usize, usize)>,
}

/// The model with several heads ablated at once.
#[derive(Debug, Clone, Serialize)]
pub struct Ablated {
    /// The heads, as `layer.head`.
    pub heads: Vec<String>,
    /// Loss on the data sample.
    pub loss: f64,
    pub first_copy_loss: f64,
    pub second_copy_loss: f64,
}

/// Parses `L.H` (layer L, head H), as the CLI and the page name heads.
pub fn parse_head(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .trim()
        .split_once('.')
        .and_then(|(l, h)| Some((l.parse().ok()?, h.parse().ok()?)));
    parsed.ok_or_else(|| {
        Error::Usage(format!(
            "{s:?} is not a head: write LAYER.HEAD, e.g. 1.0 for layer 1's head 0"
        ))
    })
}

impl ScoreOptions {
    /// Mean ablation, no heads ablated together, and the induction test's defaults: sequences of
    /// half the context ([`INDUCTION_SEQS`] of them), seed 0.
    pub fn defaults(block_size: usize) -> ScoreOptions {
        ScoreOptions {
            ablation: Ablation::Mean,
            induction_len: block_size.div_ceil(2),
            induction_seqs: INDUCTION_SEQS,
            seed: 0,
            ablate: Vec::new(),
        }
    }
}

/// One head's scores.
#[derive(Debug, Clone, Serialize)]
pub struct HeadScore {
    pub layer: usize,
    pub head: usize,
    /// Loss increase (nats/token) on the data sample when this head is ablated.
    pub ablation: f64,
    pub prev_token: f64,
    pub current_token: f64,
    pub induction: f64,
    /// Loss on the second copy of the random sequences with this head ablated.
    pub second_copy_ablated: f64,
    pub sink: f64,
    pub entropy: f64,
}

/// The induction test's sequences and the model's loss on each copy.
#[derive(Debug, Clone, Serialize)]
pub struct InductionTest {
    pub length: usize,
    pub sequences: usize,
    /// Mean loss predicting tokens 2 … L of the first copy (nothing to copy yet).
    pub first_copy_loss: f64,
    /// Mean loss predicting tokens 2 … L of the second copy (copyable).
    pub second_copy_loss: f64,
}

/// The largest attention scores of any head of a randomly initialised model of the same shape.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub prev_token: f64,
    pub current_token: f64,
    pub induction: f64,
    pub sink: f64,
}

/// What `tinygpt heads` reports.
#[derive(Debug, Clone, Serialize)]
pub struct HeadReport {
    pub ablation: Ablation,
    pub split: String,
    /// Predicted tokens in the data sample.
    pub tokens: usize,
    /// The model's loss on the sample with no head ablated.
    pub loss: f64,
    pub induction: InductionTest,
    pub random_init: Baseline,
    /// The heads of [`ScoreOptions::ablate`] ablated together.
    pub ablated: Option<Ablated>,
    /// One row per head, in (layer, head) order.
    pub heads: Vec<HeadScore>,
    /// Each layer's head means over the sample, `(n_head, hs)`: what mean ablation puts in.
    #[serde(skip)]
    pub means: Vec<Tensor>,
}

impl HeadReport {
    /// The heads, largest ablation effect first.
    pub fn by_ablation(&self) -> Vec<&HeadScore> {
        let mut rows: Vec<&HeadScore> = self.heads.iter().collect();
        rows.sort_by(|a, b| b.ablation.total_cmp(&a.ablation));
        rows
    }
}

/// Hooks replacing each of `heads` by its mean (a row of `means[layer]`, `(n_head, hs)`) or by
/// zeros.
pub fn ablation_hooks(
    means: &[Tensor],
    heads: &[(usize, usize)],
    ablation: Ablation,
) -> Result<Hooks> {
    let mut hooks = Hooks::none();
    for &(l, h) in heads {
        let patch = match ablation {
            Ablation::Zero => HeadPatch::Zero,
            Ablation::Mean => {
                let n_head = means.first().map_or(Ok(0), |m| m.dim(0))?;
                check_heads([(l, h)], means.len(), n_head)?;
                HeadPatch::With(means[l].get(h)?)
            }
        };
        hooks.insert(l, h, patch);
    }
    Ok(hooks)
}

/// `(T + 1)`-token windows of `split`, evenly spread over it, predicting `max_tokens` tokens
/// at most (None: consecutive windows covering the whole split).
pub fn sample_windows(
    data: &Dataset,
    split: Split,
    block_size: usize,
    max_tokens: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    let n = data.len(split);
    if n < block_size + 1 {
        return Err(Error::Usage(format!(
            "the split has {n} tokens; scoring heads needs at least block_size + 1 = {}",
            block_size + 1
        )));
    }
    let all = (n - 1) / block_size;
    let count = match max_tokens {
        Some(m) => m.div_ceil(block_size).clamp(1, all),
        None => all,
    };
    let span = n - block_size - 1;
    let mut windows = Vec::with_capacity(count);
    for w in 0..count {
        let start = match (max_tokens, count) {
            (None, _) => w * block_size,
            (_, 1) => 0,
            _ => w * span / (count - 1),
        };
        let mut window = Vec::with_capacity(block_size + 1);
        data.tokens(split, start..start + block_size + 1, &mut window)?;
        windows.push(window);
    }
    Ok(windows)
}

/// `(B, T)` inputs and targets of `windows` (each T + 1 tokens).
fn batch(windows: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
    let t = windows[0].len() - 1;
    let x: Vec<u32> = windows.iter().flat_map(|w| w[..t].to_vec()).collect();
    let y: Vec<u32> = windows.iter().flat_map(|w| w[1..].to_vec()).collect();
    let b = windows.len();
    Ok((
        Tensor::from_vec(x, (b, t), device)?,
        Tensor::from_vec(y, (b, t), device)?,
    ))
}

/// −ln p(target) at every position: logits `(B, T, V)`, targets `(B, T)` → `(B, T)`.
pub fn token_losses(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let targets = targets.to_dtype(DType::U32)?.contiguous()?.unsqueeze(2)?;
    let picked = logp.gather(&targets, 2)?;
    Ok(picked.squeeze(2)?.neg()?)
}

/// Where each head looks, averaged over rows: one value per head in (layer, head) order.
#[derive(Debug, Clone, Default)]
struct Looks {
    /// Attention from i to i − 1 (rows i ≥ 1).
    prev: Vec<f64>,
    /// Attention from i to itself (rows i ≥ 1).
    current: Vec<f64>,
    /// Attention from i to 0 (rows i ≥ 1).
    sink: Vec<f64>,
    /// Entropy of the row (every row).
    entropy: Vec<f64>,
}

impl Looks {
    /// Adds one layer's sums over a batch of attention weights `(B, nh, T, T)`.
    fn add(&mut self, att: &Tensor) -> Result<()> {
        let t = att.dim(2)?;
        let device = att.device();
        let pick = |f: &dyn Fn(usize, usize) -> bool| -> Result<Tensor> {
            let m: Vec<f32> = (0..t * t).map(|k| f(k / t, k % t) as u8 as f32).collect();
            Ok(Tensor::from_vec(m, (t, t), device)?)
        };
        let per_head = |x: &Tensor| -> Result<Vec<f64>> {
            let s = x.sum((2, 3))?.sum(0)?; // (nh)
            Ok(s.to_dtype(DType::F64)?.to_vec1::<f64>()?)
        };
        let masked = |f: &dyn Fn(usize, usize) -> bool| per_head(&att.broadcast_mul(&pick(f)?)?);
        self.prev.extend(masked(&|i, j| i >= 1 && j + 1 == i)?);
        self.current.extend(masked(&|i, j| i >= 1 && j == i)?);
        self.sink.extend(masked(&|i, j| i >= 1 && j == 0)?);
        let plogp = (att * att.clamp(1e-30f32, 1f32)?.log()?)?;
        self.entropy.extend(per_head(&plogp.neg()?)?);
        Ok(())
    }

    /// Element-wise sum of two batches' values.
    fn sum(self, other: Looks) -> Looks {
        let add = |a: Vec<f64>, b: Vec<f64>| match a.is_empty() {
            true => b,
            false => a.iter().zip(&b).map(|(x, y)| x + y).collect(),
        };
        Looks {
            prev: add(self.prev, other.prev),
            current: add(self.current, other.current),
            sink: add(self.sink, other.sink),
            entropy: add(self.entropy, other.entropy),
        }
    }
}

/// The mean loss of `model` over `windows` with `hooks`, handing each batch's trace to
/// `on_trace` on the way.
fn mean_loss(
    model: &Gpt,
    windows: &[Vec<u32>],
    hooks: &Hooks,
    mut on_trace: impl FnMut(&Trace) -> Result<()>,
) -> Result<f64> {
    let device = model.wte.device();
    let mut total = 0.0;
    let mut count = 0usize;
    for chunk in windows.chunks(WINDOWS_PER_PASS) {
        let (x, y) = batch(chunk, device)?;
        let trace = model.trace(&x, hooks)?;
        total += token_losses(&trace.logits, &y)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        count += y.elem_count();
        on_trace(&trace)?;
    }
    Ok(total / count as f64)
}

/// The induction test's inputs `(n, 2L)`: `n` sequences of L random tokens (none of them
/// special), each written twice.
pub fn repeated_random_tokens(
    n: usize,
    len: usize,
    vocab: usize,
    exclude: &[u32],
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let allowed: Vec<u32> = (0..vocab as u32).filter(|i| !exclude.contains(i)).collect();
    if allowed.len() < 2 {
        return Err(Error::Usage(
            "the vocabulary has too few ordinary tokens for the induction test".into(),
        ));
    }
    let mut rng = seeded(seed);
    let mut ids = Vec::with_capacity(n * 2 * len);
    for _ in 0..n {
        let seq: Vec<u32> = (0..len)
            .map(|_| allowed[rng.random_range(0..allowed.len())])
            .collect();
        ids.extend_from_slice(&seq);
        ids.extend_from_slice(&seq);
    }
    Ok(Tensor::from_vec(ids, (n, 2 * len), device)?)
}

/// The induction test on `seqs` `(n, 2L)` with `hooks`: (first-copy loss, second-copy loss,
/// each head's induction score `(n_layer × n_head)` in (layer, head) order).
fn induction(model: &Gpt, seqs: &Tensor, hooks: &Hooks) -> Result<(f64, f64, Vec<f64>)> {
    let (n, t2) = seqs.dims2()?;
    let len = t2 / 2;
    let x = seqs.narrow(1, 0, t2 - 1)?.contiguous()?;
    let y = seqs.narrow(1, 1, t2 - 1)?;
    let trace = model.trace(&x, hooks)?;
    let losses = token_losses(&trace.logits, &y)?; // (n, 2L − 1): position p predicts p + 1
    let mean = |from: usize, count: usize| -> Result<f64> {
        Ok(losses
            .narrow(1, from, count)?
            .to_dtype(DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()?)
    };
    // Targets 1..L−1 (first copy), L+1..2L−1 (second copy): both copies' tokens 2 … L.
    let first = mean(0, len - 1)?;
    let second = mean(len, len - 1)?;
    let t = t2 - 1;
    let m: Vec<f32> = (0..t * t)
        .map(|k| {
            let (i, j) = (k / t, k % t);
            (i >= len && j + len == i + 1) as u8 as f32
        })
        .collect();
    let diag = Tensor::from_vec(m, (t, t), seqs.device())?;
    let mut scores = Vec::new();
    for layer in &trace.layers {
        let s = layer.attention.broadcast_mul(&diag)?.sum((2, 3))?.sum(0)?;
        let s = s.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        scores.extend(s.into_iter().map(|v| v / (n * (len - 1)) as f64));
    }
    Ok((first, second, scores))
}

/// Checks the induction test's length against the model's context.
pub fn check_induction_len(len: usize, block_size: usize) -> Result<()> {
    if len < 2 || 2 * len > block_size + 1 {
        return Err(Error::Usage(format!(
            "--induction-len {len}: a sequence and its copy must fit the model's context \
             (2 ≤ L and 2L − 1 ≤ block_size = {block_size}); try {}",
            block_size.div_ceil(2)
        )));
    }
    Ok(())
}

/// The largest attention scores of a randomly initialised model like `model`.
fn baseline(model: &Gpt, windows: &[Vec<u32>], seqs: &Tensor, seed: u64) -> Result<Baseline> {
    let device = model.wte.device();
    let mut params = Params::fresh(seeded(seed), device);
    let fresh = params.build(|vb| Gpt::new(&model.cfg, model.vocab_size, vb))?;
    let looks = plain_pass(&fresh, windows)?.looks;
    let (_, _, induction) = induction(&fresh, seqs, &Hooks::none())?;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    Ok(Baseline {
        prev_token: max(&looks.prev),
        current_token: max(&looks.current),
        induction: max(&induction),
        sink: max(&looks.sink),
    })
}

/// What one hook-free pass over the sample gives.
struct Plain {
    /// The mean loss.
    loss: f64,
    /// Previous-token, current-token, sink and entropy scores of every head.
    looks: Looks,
    /// Each layer's head outputs averaged over every position of the sample, `(n_head, hs)`.
    means: Vec<Tensor>,
}

/// One hook-free pass of `model` over `windows`: the loss, where each head looks, and each
/// head's mean output.
fn plain_pass(model: &Gpt, windows: &[Vec<u32>]) -> Result<Plain> {
    let mut looks = Looks::default();
    let mut sums: Vec<Option<Tensor>> = vec![None; model.cfg.n_layer];
    let mut rows = 0usize;
    let loss = mean_loss(model, windows, &Hooks::none(), |trace| {
        let mut batch = Looks::default();
        for (l, layer) in trace.layers.iter().enumerate() {
            batch.add(&layer.attention)?;
            let s = layer.heads.to_dtype(DType::F32)?.sum(2)?.sum(0)?; // (B, nh, T, hs) → (nh, hs)
            sums[l] = Some(match sums[l].take() {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
        looks = std::mem::take(&mut looks).sum(batch);
        rows += trace.logits.dim(0)? * trace.logits.dim(1)?;
        Ok(())
    })?;
    let means = sums
        .into_iter()
        .map(|s| s.map(|s| s / rows as f64).transpose())
        .collect::<candle_core::Result<Option<Vec<_>>>>()?
        .ok_or_else(|| Error::Usage("no windows to score".into()))?;
    let t = windows[0].len() - 1;
    let attn_rows = (windows.len() * (t - 1)) as f64;
    let scale = |v: &mut Vec<f64>, by: f64| v.iter_mut().for_each(|x| *x /= by);
    scale(&mut looks.prev, attn_rows);
    scale(&mut looks.current, attn_rows);
    scale(&mut looks.sink, attn_rows);
    scale(&mut looks.entropy, rows as f64);
    Ok(Plain { loss, looks, means })
}

/// Scores every head of `model` on `windows` ([`sample_windows`]) and on the induction test
/// ([module docs](self)).
pub fn score_heads(
    model: &Gpt,
    windows: &[Vec<u32>],
    split: &str,
    special: &[u32],
    opts: &ScoreOptions,
    progress: ProgressMode,
) -> Result<HeadReport> {
    let cfg = &model.cfg;
    check_induction_len(opts.induction_len, cfg.block_size)?;
    if windows.is_empty() || windows[0].len() < 3 {
        return Err(Error::Usage(
            "scoring heads needs windows of at least 3 tokens".into(),
        ));
    }
    let device = model.wte.device();
    let (nl, nh) = (cfg.n_layer, cfg.n_head);
    check_heads(opts.ablate.iter().copied(), nl, nh)?;
    let bar = Progress::new(progress, "heads", (nl * nh + 2) as u64, 0);

    let Plain { loss, looks, means } = plain_pass(model, windows)?;
    bar.update(1, "plain pass", false);

    let seqs = repeated_random_tokens(
        opts.induction_seqs,
        opts.induction_len,
        model.vocab_size,
        special,
        opts.seed,
        device,
    )?;
    let (first, second, induction_scores) = induction(model, &seqs, &Hooks::none())?;

    let mut heads = Vec::with_capacity(nl * nh);
    for l in 0..nl {
        for h in 0..nh {
            let hooks = ablation_hooks(&means, &[(l, h)], opts.ablation)?;
            let ablated = mean_loss(model, windows, &hooks, |_| Ok(()))?;
            let (_, second_ablated, _) = induction(model, &seqs, &hooks)?;
            let k = l * nh + h;
            heads.push(HeadScore {
                layer: l,
                head: h,
                ablation: ablated - loss,
                prev_token: looks.prev[k],
                current_token: looks.current[k],
                induction: induction_scores[k],
                second_copy_ablated: second_ablated,
                sink: looks.sink[k],
                entropy: looks.entropy[k],
            });
            bar.update((2 + k) as u64, &format!("ablated {l}.{h}"), false);
        }
    }
    let ablated = match opts.ablate.is_empty() {
        true => None,
        false => {
            let hooks = ablation_hooks(&means, &opts.ablate, opts.ablation)?;
            let loss = mean_loss(model, windows, &hooks, |_| Ok(()))?;
            let (first, second, _) = induction(model, &seqs, &hooks)?;
            Some(Ablated {
                heads: opts
                    .ablate
                    .iter()
                    .map(|(l, h)| format!("{l}.{h}"))
                    .collect(),
                loss,
                first_copy_loss: first,
                second_copy_loss: second,
            })
        }
    };
    let random_init = baseline(model, windows, &seqs, opts.seed)?;
    bar.finish();
    let t = windows[0].len() - 1;
    Ok(HeadReport {
        ablation: opts.ablation,
        split: split.to_string(),
        tokens: windows.len() * t,
        loss,
        induction: InductionTest {
            length: opts.induction_len,
            sequences: opts.induction_seqs,
            first_copy_loss: first,
            second_copy_loss: second,
        },
        random_init,
        ablated,
        heads,
        means,
    })
}
