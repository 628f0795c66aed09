//! Text generation: temperature, top-k and top-p sampling, with or without the KV cache.
//!
//! Without the cache every new token runs the model over the last `block_size` tokens. With it,
//! each new token costs one incremental step; when the window is full, the cache restarts from
//! the last half block (positions are absolute, so a sliding cache cannot simply drop its head).
//! The model runs on the [`Engine`] the caller chose: the fused decoder, or the reference
//! model with candle-nn's KV cache.

use candle_core::Tensor;
use rand::Rng as _;

use crate::engine::{last_row, Decode, Engine};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Largest `max_new_tokens` accepted; larger requests are capped.
pub const MAX_NEW_TOKENS_CAP: usize = 1_000_000;

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy (always the most likely token).
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probabilities add up to p.
    pub top_p: Option<f64>,
    /// Use the KV cache (same distribution, far less work).
    pub use_cache: bool,
    /// Tokens already in the text (prompt or output) score lower: a positive logit is divided
    /// by this, a negative one multiplied (the CTRL paper's rule, as transformers and llama.cpp
    /// apply it); 1 = off.
    pub repetition_penalty: f64,
    /// Seed of the run's sampling RNG: the same seed gives the same text.
    pub seed: u64,
}

impl Default for SampleOptions {
    /// nanoGPT's sampler's settings: temperature 0.8, top-k 200, seed 1337, 500 new tokens.
    fn default() -> SampleOptions {
        SampleOptions {
            max_new_tokens: 500,
            temperature: 0.8,
            top_k: Some(200),
            top_p: None,
            use_cache: true,
            repetition_penalty: 1.0,
            seed: 1337,
        }
    }
}

impl SampleOptions {
    /// Checks the settings; the message names the flag (`--top-k`) and what it may be.
    pub fn validate(&self) -> Result<()> {
        self.validate_named(|name| format!("--{name}"))
    }

    /// [`SampleOptions::validate`] with each setting called `name(setting)`, setting being
    /// `temperature`, `top-k`, `top-p`, `repetition-penalty` or `max-new-tokens` (the server's
    /// JSON fields are `top_k`, …).
    pub fn validate_named(&self, name: impl Fn(&str) -> String) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Usage(format!(
                "{} {} must be ≥ 0 (0 = greedy)",
                name("temperature"),
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Usage(format!(
                "{} 0 keeps no token; use k ≥ 1 or leave it out",
                name("top-k")
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Usage(format!(
                    "{} {p} must be in (0, 1]",
                    name("top-p")
                )));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::Usage(format!(
                "{} {} must be > 0 (1 = off, above 1 discourages repeats)",
                name("repetition-penalty"),
                self.repetition_penalty
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::Usage(format!(
                "{} 0 generates nothing; use N ≥ 1",
                name("max-new-tokens")
            )));
        }
        Ok(())
    }
}

/// The tokens `pick` may choose from one row of logits, most likely first, with their
/// probabilities under `opts` (temperature, then top-k, then top-p; renormalised over what is
/// kept). At temperature 0 it is the most likely token alone.
pub fn candidates(logits: &[f32], opts: &SampleOptions) -> Vec<(u32, f64)> {
    let (idx, probs) = kept(logits, opts);
    let total: f64 = probs.iter().sum();
    idx.iter()
        .zip(&probs)
        .map(|(&i, &p)| (i as u32, p / total))
        .collect()
}

/// The token ids kept by temperature, top-k and top-p, and their weights (normalised before
/// top-p cut the tail, so they sum to at most 1).
fn kept(logits: &[f32], opts: &SampleOptions) -> (Vec<usize>, Vec<f64>) {
    if opts.temperature == 0.0 {
        let best = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        return (vec![best], vec![1.0]);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = opts.top_k {
        idx.truncate(k.max(1));
    }
    let inv_t = 1.0 / opts.temperature;
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) * inv_t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = opts.top_p {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    (idx, probs)
}

/// Picks the next token from one row of logits ([`candidates`]' distribution).
pub fn pick(logits: &[f32], opts: &SampleOptions, rng: &mut Rng) -> u32 {
    let (idx, probs) = kept(logits, opts);
    if opts.temperature == 0.0 {
        return idx[0] as u32;
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (p, &i) in probs.iter().zip(&idx) {
        if r < *p {
            return i as u32;
        }
        r -= p;
    }
    idx[idx.len() - 1] as u32
}

/// `logits` with the tokens marked in `seen` penalised by `penalty` (see
/// [`SampleOptions::repetition_penalty`]).
pub fn penalize_repeats(logits: &mut [f32], seen: &[bool], penalty: f64) {
    let p = penalty as f32;
    for (l, _) in logits.iter_mut().zip(seen).filter(|(_, &s)| s) {
        *l = if *l > 0.0 { *l / p } else { *l * p };
    }
}

/// The logits `(V)` that [`generate`] picks its first token from: the model, on `engine`,
/// after the last `block_size` tokens of `prompt`.
pub fn next_logits(engine: &Engine, prompt: &[u32], use_cache: bool) -> Result<Vec<f32>> {
    let mut decoder = use_cache.then(|| engine.decoder()).transpose()?;
    next_logits_with(
        engine,
        decoder.as_deref_mut().map(|d| d as &mut dyn Decode),
        prompt,
    )
}

/// [`next_logits`] through `decoder` (cleared first) when given: a caller that keeps one,
/// such as the server, builds it once.
pub fn next_logits_with<'a>(
    engine: &'a Engine,
    decoder: Option<&'a mut dyn Decode>,
    prompt: &[u32],
) -> Result<Vec<f32>> {
    if prompt.is_empty() {
        return Err(Error::Usage(
            "generation needs at least one prompt token".into(),
        ));
    }
    let ctx = &prompt[prompt.len().saturating_sub(engine.model().cfg.block_size)..];
    Stepper::new(engine, decoder).feed(ctx)
}

/// Generates up to `opts.max_new_tokens` tokens after `prompt` (its last `block_size` tokens),
/// calling `on_token` with each as soon as it is chosen; generation ends early when `on_token`
/// returns `false`. Returns the new tokens.
pub fn generate(
    engine: &Engine,
    prompt: &[u32],
    opts: &SampleOptions,
    rng: &mut Rng,
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Vec<u32>> {
    let mut decoder = opts.use_cache.then(|| engine.decoder()).transpose()?;
    let decoder = decoder.as_deref_mut().map(|d| d as &mut dyn Decode);
    generate_with(engine, decoder, prompt, opts, rng, on_token)
}

/// [`generate`] through `decoder` (cleared first) when given, else by full passes.
pub fn generate_with<'a>(
    engine: &'a Engine,
    decoder: Option<&'a mut dyn Decode>,
    prompt: &[u32],
    opts: &SampleOptions,
    rng: &mut Rng,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Vec<u32>> {
    opts.validate()?;
    if prompt.is_empty() {
        return Err(Error::Usage(
            "generation needs at least one prompt token".into(),
        ));
    }
    let model = engine.model();
    let block = model.cfg.block_size;
    let mut ctx: Vec<u32> = prompt[prompt.len().saturating_sub(block)..].to_vec();
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    let mut step = Stepper::new(engine, decoder);
    let mut logits = step.feed(&ctx)?;
    // Every token of the whole prompt counts as seen, as in transformers.
    let mut seen = vec![false; model.vocab_size];
    let penalize = opts.repetition_penalty != 1.0;
    if penalize {
        prompt.iter().for_each(|&t| seen[t as usize] = true);
    }
    for n in 0..opts.max_new_tokens {
        if penalize {
            penalize_repeats(&mut logits, &seen, opts.repetition_penalty);
        }
        let next = pick(&logits, opts, rng);
        let go_on = on_token(next)?;
        out.push(next);
        ctx.push(next);
        seen[next as usize] = true;
        if n + 1 == opts.max_new_tokens || !go_on {
            break;
        }
        logits = match step.cached() {
            Some(len) if len < block => step.feed(&[next])?,
            Some(_) => {
                // The cache is full: restart it on the last half block, so the next
                // block/2 tokens are cheap again.
                step.clear();
                let keep = (block / 2).max(1);
                step.feed(&ctx[ctx.len() - keep..])?
            }
            None => step.feed(&ctx[ctx.len().saturating_sub(block)..])?,
        };
    }
    Ok(out)
}

/// Cuts streamed text before the first of some stop strings. Text is held back only while it
/// could still be the start of one.
#[derive(Debug, Clone, Default)]
pub struct StopAt {
    stops: Vec<String>,
    pending: String,
}

impl StopAt {
    /// Stops at any of `stops` (empty strings are refused by [`StopAt::check`]).
    pub fn new(stops: Vec<String>) -> StopAt {
        StopAt {
            stops,
            pending: String::new(),
        }
    }

    /// Refuses an empty stop string, which would stop before the first token.
    pub fn check(stops: &[String]) -> Result<()> {
        if stops.iter().any(|s| s.is_empty()) {
            return Err(Error::Usage(
                "--stop \"\" would stop before any text; give a non-empty string".into(),
            ));
        }
        Ok(())
    }

    /// Takes the next piece of text; returns what may be shown now, and whether a stop string
    /// was reached (the text shown then ends just before it).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let shown = self.pending[..at].to_string();
            self.pending.clear();
            return (shown, true);
        }
        // Keep the longest tail that begins some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                let p = &self.pending;
                (1..s.len().min(p.len() + 1))
                    .filter(|&n| {
                        p.is_char_boundary(p.len() - n) && s.starts_with(&p[p.len() - n..])
                    })
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let shown = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (shown, false)
    }

    /// The text held back at the end of generation (it never became a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// How generation runs the model: a decoder that caches the positions seen so far, or a full
/// forward pass over the window for every token.
enum Stepper<'a> {
    Cached(&'a mut dyn Decode),
    Full(&'a Engine),
}

impl<'a> Stepper<'a> {
    /// Steps through `decoder`, emptied first, or by full passes of `engine` without one.
    fn new(engine: &'a Engine, decoder: Option<&'a mut dyn Decode>) -> Stepper<'a> {
        match decoder {
            Some(d) => {
                d.clear();
                Stepper::Cached(d)
            }
            None => Stepper::Full(engine),
        }
    }

    /// Positions cached, or `None` without a cache.
    fn cached(&self) -> Option<usize> {
        match self {
            Stepper::Cached(d) => Some(d.len()),
            Stepper::Full(_) => None,
        }
    }

    fn clear(&mut self) {
        if let Stepper::Cached(d) = self {
            d.clear()
        }
    }

    /// The logits after `ids` (new tokens for a cache, the whole window without one).
    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        match self {
            Stepper::Cached(d) => d.feed(ids),
            Stepper::Full(engine) => {
                let idx = Tensor::from_slice(ids, (1, ids.len()), engine.device())?;
                last_row(&engine.forward(&idx)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    fn opts(t: f64, k: Option<usize>, p: Option<f64>) -> SampleOptions {
        SampleOptions {
            max_new_tokens: 1,
            temperature: t,
            top_k: k,
            top_p: p,
            ..SampleOptions::default()
        }
    }

    #[test]
    fn greedy_top_k_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = seeded(0);
        assert_eq!(pick(&logits, &opts(0.0, None, None), &mut rng), 1);
        // top-k 1 is greedy whatever the temperature
        for _ in 0..20 {
            assert_eq!(pick(&logits, &opts(5.0, Some(1), None), &mut rng), 1);
        }
        // top-k 2 only ever gives the two best
        for _ in 0..50 {
            let t = pick(&logits, &opts(1.0, Some(2), None), &mut rng);
            assert!(t == 1 || t == 3);
        }
        // a tiny top-p keeps only the best
        for _ in 0..20 {
            assert_eq!(pick(&logits, &opts(1.0, None, Some(0.01)), &mut rng), 1);
        }
    }

    #[test]
    fn candidates_are_a_distribution_over_what_pick_can_choose() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let c = candidates(&logits, &opts(1.0, None, None));
        assert_eq!(c.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3, 2, 0]);
        assert!((c.iter().map(|c| c.1).sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(candidates(&logits, &opts(1.0, Some(1), None)), [(1, 1.0)]);
        assert_eq!(candidates(&logits, &opts(0.0, None, None)), [(1, 1.0)]);
        let two = candidates(&logits, &opts(1.0, Some(2), None));
        let e = (-0.1f64).exp();
        assert!((two[0].1 - 1.0 / (1.0 + e)).abs() < 1e-6 && two[1].0 == 3);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut l = [2.0f32, -1.0, 3.0, 0.5];
        penalize_repeats(&mut l, &[true, true, false, false], 2.0);
        assert_eq!(l, [1.0, -2.0, 3.0, 0.5]);
    }

    #[test]
    fn stop_strings_cut_the_text_before_them() {
        let mut s = StopAt::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(s.push("Hello"), ("Hello".into(), false));
        assert_eq!(s.push(" E"), (" ".into(), false)); // "E" may begin "END"
        assert_eq!(s.push("x\n"), ("Ex".into(), false));
        assert_eq!(s.push("\nmore"), ("".into(), true));
        let mut s = StopAt::new(vec!["EN".into()]);
        assert_eq!(s.push("aE"), ("a".into(), false));
        assert_eq!(s.push("é"), ("Eé".into(), false));
        assert_eq!(s.push("xEN!"), ("x".into(), true));
        let mut s = StopAt::new(vec!["zz".into()]);
        assert_eq!(s.push("az"), ("a".into(), false));
        assert_eq!(s.finish(), "z");
        assert!(StopAt::check(&["".into()]).is_err());
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(opts(-1.0, None, None)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--temperature"));
        assert!(opts(1.0, Some(0), None)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--top-k"));
        assert!(opts(1.0, None, Some(1.5))
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--top-p"));
        let mut o = opts(1.0, None, None);
        o.repetition_penalty = 0.0;
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--repetition-penalty"));
        let mut o = opts(1.0, None, None);
        o.max_new_tokens = 0;
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--max-new-tokens"));
    }
}
