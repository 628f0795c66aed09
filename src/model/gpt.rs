//! The whole model: token + position embeddings → n_layer blocks → final LayerNorm → LM head,
//! by default tied to the token embedding (the same matrix reads tokens in and scores them out).
//!
//! Options of `[model]` change parts of this: rotary embeddings instead of the learned
//! positions (`position = "rope"`), an LM head of its own (`tie_embeddings = false`), output
//! projections that start at zero (`zero_init`), logits capped by cap·tanh(x / cap)
//! (`logit_softcap`), RMSNorm for every LayerNorm (`norm = "rms"`) and normalised queries and
//! keys (`qk_norm`, in [`super::attention`]).

use candle_core::{DType, Tensor};

use super::attention::causal_mask;
use super::block::Block;
use super::config::ModelConfig;
use super::config::Position;
use super::config::INIT_STD;
use super::hooks::{Hooks, Trace};
use super::kv_cache::KvCache;
use super::layers::{dropout, Norm};
use super::params::{Init, VarBuilder};
use super::rope::Rope;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// A GPT-style decoder-only language model.
#[derive(Debug, Clone)]
pub struct Gpt {
    pub cfg: ModelConfig,
    pub vocab_size: usize,
    /// Token embedding `(V, C)`, and the LM head's matrix too when tied.
    pub wte: Tensor,
    /// Learned position embedding: `(block_size, C)`; none with rotary embeddings.
    pub wpe: Option<Tensor>,
    pub blocks: Vec<Block>,
    pub ln_f: Norm,
    /// The LM head's own `(V, C)` matrix when it is not tied to `wte`.
    pub lm_head: Option<Tensor>,
    /// Bigram features `(bigram_buckets, C)` ([`bigram_ids`]), when on.
    pub bigram: Option<Tensor>,
}

impl Gpt {
    /// Builds the model, taking (or initialising) every weight from `vb`
    /// ([`super::Params::build`]).
    pub fn new(cfg: &ModelConfig, vocab_size: usize, vb: VarBuilder) -> Result<Gpt> {
        let c = cfg.n_embd;
        let normal = Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        };
        let wte = vb
            .pp("wte")
            .get_with_hints((vocab_size, c), "weight", normal)?;
        let (wpe, rope) = match cfg.position {
            Position::Learned => {
                let wpe = vb.pp("wpe");
                (
                    Some(wpe.get_with_hints((cfg.block_size, c), "weight", normal)?),
                    None,
                )
            }
            Position::Rope => {
                let hs = c / cfg.n_head;
                (None, Some(Rope::new(cfg.block_size, hs, vb.device())?))
            }
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(vb.pp("h").pp(i), cfg, rope.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = Norm::new(vb.pp("ln_f"), c, cfg.bias, cfg.norm)?;
        let head_init = match cfg.zero_init {
            true => Init::Const(0.0),
            false => normal,
        };
        let lm_head = match cfg.tie_embeddings {
            true => None,
            false => Some(
                vb.pp("lm_head")
                    .get_with_hints((vocab_size, c), "weight", head_init)?,
            ),
        };
        // Zeros: the features start as no change to the embedding.
        let bigram = match cfg.bigram_buckets {
            0 => None,
            n => Some(
                vb.pp("bigram")
                    .get_with_hints((n, c), "weight", Init::Const(0.0))?,
            ),
        };
        Ok(Gpt {
            cfg: cfg.clone(),
            vocab_size,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            bigram,
        })
    }

    /// Logits `(B, T, V)` of a full pass over `idx` `(B, T)` (u32 token ids); dropout is on
    /// when `rng` is given.
    pub fn forward(&self, idx: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        Ok(self.run(idx, rng, None, &Hooks::none(), false)?.logits)
    }

    /// Logits and every layer's attention weights `(B, n_head, T, T)` (dropout off).
    pub fn forward_with_attention(&self, idx: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let trace = self.trace(idx, &Hooks::none())?;
        let attention = trace.layers.into_iter().map(|l| l.attention).collect();
        Ok((trace.logits, attention))
    }

    /// A full pass over `idx` `(B, T)` (dropout off) with the heads `hooks` names replaced,
    /// recording every layer's attention, head outputs, attention and MLP outputs and the
    /// residual stream ([`super::hooks`]). With no hooks its logits are [`Gpt::forward`]'s,
    /// bit for bit.
    pub fn trace(&self, idx: &Tensor, hooks: &Hooks) -> Result<Trace> {
        hooks.check(self.cfg.n_layer, self.cfg.n_head)?;
        self.run(idx, None, None, hooks, true)
    }

    /// The residual stream of a full pass over `idx` `(B, T)` (dropout off): the embeddings
    /// entering the first block, then each block's output, n_layer + 1 tensors `(B, T, C)`.
    /// The logit lens reads each through [`Gpt::lm_head`]; the last gives [`Gpt::forward`]'s
    /// logits.
    pub fn residual_stream(&self, idx: &Tensor) -> Result<Vec<Tensor>> {
        Ok(self.trace(idx, &Hooks::none())?.residual)
    }

    /// Incremental pass: `idx` `(B, T_new)` continues the tokens already in `cache`.
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self
            .run(idx, None, Some(cache), &Hooks::none(), false)?
            .logits)
    }

    /// Mean cross-entropy of predicting `targets` `(B, T)` from `idx` `(B, T)`.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        cross_entropy(&self.forward(idx, rng)?, targets)
    }

    /// A fresh cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg)
    }

    /// The forward pass at positions `offset..offset + T` (`offset`: the tokens in `cache`)
    /// with `hooks`' heads replaced; with `record`, the trace keeps every layer's tensors (else
    /// only the logits).
    fn run(
        &self,
        idx: &Tensor,
        mut rng: Option<&mut Rng>,
        mut cache: Option<&mut KvCache>,
        hooks: &Hooks,
        record: bool,
    ) -> Result<Trace> {
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let prev = cache.as_ref().and_then(|c| c.last.clone());
        let mut x = self.embed(idx, offset, prev.as_deref(), rng.as_deref_mut())?; // (B, T, C)
        let t = x.dim(1)?;
        let mask = causal_mask(t, offset + t, offset, idx.device())?; // (T, offset + T)
        let mut residual = Vec::new();
        let mut layers = Vec::new();
        residual.extend(record.then(|| x.clone()));
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let patches = hooks.layer(i);
            let (y, layer) =
                block.forward_hooked(&x, &mask, rng.as_deref_mut(), layer_cache, &patches)?;
            x = y;
            if record {
                residual.push(x.clone());
                layers.push(layer);
            }
        }
        if let Some(c) = cache {
            c.len += t;
            if self.bigram.is_some() {
                let ids = idx.to_dtype(DType::U32)?.to_vec2::<u32>()?;
                c.last = Some(ids.iter().map(|row| row[t - 1]).collect());
            }
        }
        Ok(Trace {
            logits: self.lm_head(&x)?,
            residual,
            layers,
        })
    }

    /// Token + position embeddings of `idx` `(B, T)` at positions `offset..offset + T` (plus
    /// the bigram features, `prev` holding each sequence's token before `idx` when there is
    /// one), with dropout when `rng` is given: `(B, T, C)`.
    pub fn embed(
        &self,
        idx: &Tensor,
        offset: usize,
        prev: Option<&[u32]>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let parts = self.embedding_parts(idx, offset, prev)?;
        let x = match &parts.positions {
            Some(pos) => parts.tokens.broadcast_add(pos)?, // + (T, C)
            None => parts.tokens,
        };
        let x = match parts.bigram {
            Some(rows) => (x + rows)?,
            None => x,
        };
        dropout(&x, self.cfg.dropout, rng)
    }

    /// The rows [`Gpt::embed`] adds up, before dropout (an engine may add them its own way).
    pub fn embedding_parts(
        &self,
        idx: &Tensor,
        offset: usize,
        prev: Option<&[u32]>,
    ) -> Result<Embedding> {
        let (b, t) = idx.dims2()?;
        check_positions(offset, t, self.cfg.block_size)?;
        let c = self.cfg.n_embd;
        let tokens = self.wte.index_select(&idx.flatten_all()?, 0)?; // (B·T, C)
        let tokens = tokens.reshape((b, t, c))?;
        let positions = match &self.wpe {
            Some(wpe) => Some(wpe.narrow(0, offset, t)?),
            None => None,
        };
        let bigram = match &self.bigram {
            Some(table) => {
                let ids = bigram_ids(idx, prev, self.vocab_size, table.dim(0)?)?;
                Some(table.index_select(&ids, 0)?.reshape((b, t, c))?)
            }
            None => None,
        };
        Ok(Embedding {
            tokens,
            positions,
            bigram,
        })
    }

    /// The LM head's matrix `(V, C)`: its own, or the token embedding when tied.
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// The final LayerNorm and the LM head: `(B, T, C)` → logits `(B, T, V)`, soft-capped when
    /// `logit_softcap` is set.
    pub fn lm_head(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let x = x.apply(&self.ln_f)?.reshape((b * t, c))?;
        let logits = super::precision::matmul(&x, &self.head_weight().t()?)?;
        softcap(&logits, self.cfg.logit_softcap)?
            .reshape((b, t, self.vocab_size))
            .map_err(Into::into)
    }
}

/// What the input embedding of `(B, T)` token ids is made of ([`Gpt::embedding_parts`]).
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The tokens' rows of `wte`: `(B, T, C)`.
    pub tokens: Tensor,
    /// The positions' rows of `wpe`, `(T, C)`; none with rotary embeddings.
    pub positions: Option<Tensor>,
    /// Each position's bigram feature row, `(B, T, C)`, when the model has them.
    pub bigram: Option<Tensor>,
}

/// The bigram feature rows of `idx` `(B, T)`, flattened `(B·T)` ([`bigram_row`]): position t
/// of a sequence pairs idx[t] with idx[t − 1], or at t = 0 with that sequence's entry of `prev`
/// (none without one).
pub fn bigram_ids(
    idx: &Tensor,
    prev: Option<&[u32]>,
    vocab: usize,
    buckets: usize,
) -> Result<Tensor> {
    let rows = idx.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let ids: Vec<u32> = rows
        .iter()
        .enumerate()
        .flat_map(|(b, row)| {
            let first = prev.and_then(|p| p.get(b).copied());
            row.iter().enumerate().map(move |(t, &cur)| {
                let p = if t == 0 { first } else { Some(row[t - 1]) };
                bigram_row(p, cur as usize, vocab, buckets) as u32
            })
        })
        .collect();
    let n = ids.len();
    Ok(Tensor::from_vec(ids, n, idx.device())?)
}

/// The row of the pair (`prev`, `cur`) in a table of `buckets` bigram features:
/// (p·V + cur) mod buckets, with p = V ("no previous token") at a sequence's start.
pub fn bigram_row(prev: Option<u32>, cur: usize, vocab: usize, buckets: usize) -> usize {
    let p = prev.map_or(vocab, |p| p as usize);
    (p * vocab + cur) % buckets
}

/// cap·tanh(logits / cap), or `logits` unchanged when `cap` is 0.
pub fn softcap(logits: &Tensor, cap: f64) -> Result<Tensor> {
    if cap == 0.0 {
        return Ok(logits.clone());
    }
    Ok(((logits / cap)?.tanh()? * cap)?)
}

/// Mean cross-entropy of `logits` `(B, T, V)` against `targets` `(B, T)` (candle-nn's).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let targets = targets.reshape(b * t)?.to_dtype(DType::U32)?;
    Ok(candle_nn::loss::cross_entropy(
        &logits.reshape((b * t, v))?,
        &targets,
    )?)
}

/// Refuses a pass over no tokens, or one past the model's context: `t` tokens at positions
/// `offset..offset + t` of a model with `block_size` positions.
pub fn check_positions(offset: usize, t: usize, block_size: usize) -> Result<()> {
    if t == 0 {
        return Err(Error::Usage("cannot run the model on zero tokens".into()));
    }
    if offset + t > block_size {
        return Err(Error::Usage(format!(
            "{} positions exceed the model's block_size of {block_size}",
            offset + t
        )));
    }
    Ok(())
}
