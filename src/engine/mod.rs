//! What runs a model: the reference [`Gpt`] itself (candle's composed ops and autograd), or
//! its fused copy on tinygpt's CPU kernels ([`FusedGpt`]). An engine is a run option, not a
//! property of the model: `--engine auto|reference|fused` ([`EngineChoice`]) is resolved once
//! per run, for the model's config, into the [`EngineOptions`] of a run's context (`run::context`). The
//! fused path is an accelerator that may lag behind the model: it declares what it supports
//! ([`FusedGpt::supports`]), and `auto` runs anything else on the reference engine.
//!
//! Both engines compute the same function of the same weights. Training asks for
//! [`Engine::loss_and_grads`], which returns every parameter's gradient in one store, the ones
//! computed inside block ops included.

pub mod decoder;
pub mod device;
pub mod fused;
pub mod recompute;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

pub use decoder::Decoder;
pub use fused::{FusedGpt, Unsupported};

use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::block::GradSlot;
use crate::layout::BlockParams;
use crate::model::attention::causal_mask;
use crate::model::gpt::cross_entropy;
use crate::model::{autocast, Gpt, KvCache, ModelConfig, Precision};
use crate::rng::Rng;
use recompute::RecomputedBlock;

/// Which engine a run asks for (`--engine`, `training.engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// The fused kernels when they support every option of the model, else the reference.
    #[default]
    Auto,
    /// candle's composed ops: the readable version, and the oracle for tests.
    Reference,
    /// tinygpt's fused CPU kernels; a model with an option they lack is refused.
    Fused,
}

/// The engine a run resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Reference,
    Fused,
}

impl EngineKind {
    /// `reference` or `fused`, as `--engine` spells it.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Reference => "reference",
            EngineKind::Fused => "fused",
        }
    }
}

impl EngineChoice {
    /// The engine that runs a model of `cfg` on `device` with matrix products in `precision`,
    /// and, when `auto` passed over the fused kernels for a reason the user may not expect,
    /// the one line that says why. The fused kernels run on the CPU in f32 only: `auto` on a
    /// GPU is the reference engine without a note; `fused` on what they do not support is
    /// refused, naming it.
    pub fn resolve(
        self,
        cfg: &ModelConfig,
        device: &Device,
        precision: Precision,
    ) -> Result<(EngineKind, Option<String>)> {
        if !device.is_cpu() {
            return match self {
                EngineChoice::Fused => Err(Error::Usage(format!(
                    "--engine fused runs on the CPU only; use --engine reference (or auto) with --device {}, or --device cpu",
                    crate::engine::device::name(device)
                ))),
                _ => Ok((EngineKind::Reference, None)),
            };
        }
        let unsupported = match (precision, FusedGpt::supports(cfg)) {
            (Precision::Bf16, _) => Some("training.dtype = \"bf16\"".to_string()),
            // TF32 is a GPU's; on the CPU it is f32.
            (Precision::F32 | Precision::Tf32, Err(u)) => Some(u.to_string()),
            (Precision::F32 | Precision::Tf32, Ok(())) => None,
        };
        match (self, unsupported) {
            (EngineChoice::Reference, _) => Ok((EngineKind::Reference, None)),
            (EngineChoice::Auto | EngineChoice::Fused, None) => Ok((EngineKind::Fused, None)),
            (EngineChoice::Auto, Some(u)) => Ok((
                EngineKind::Reference,
                Some(format!(
                    "note: the fused engine does not support {u}; running on the reference engine (slower)"
                )),
            )),
            (EngineChoice::Fused, Some(u)) => Err(Error::Usage(format!(
                "--engine fused does not support {u}; use --engine reference (or auto)"
            ))),
        }
    }
}

/// How a run's models are run, chosen once per run and passed down to whatever builds an
/// [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    pub kind: EngineKind,
    /// The dtype of the reference engine's matrix products ([`crate::model::precision`]).
    pub precision: Precision,
    /// Whether a fused decoder of a small model may keep a partner thread ([`Decoder`]). A
    /// server decoding for many requests at once turns them off: each request then keeps to
    /// one core. The bits are the same either way.
    pub partner_threads: bool,
}

impl EngineOptions {
    /// Options for `kind` in f32 with partner threads allowed.
    pub fn new(kind: EngineKind) -> EngineOptions {
        EngineOptions {
            kind,
            precision: Precision::F32,
            partner_threads: true,
        }
    }

    /// The engine for `model`; `recompute`: training passes keep only each block's input and
    /// recompute the rest in backward (less memory, about a third more compute).
    pub fn engine(&self, model: &Gpt, recompute: bool) -> Result<Engine> {
        Engine::new(model, self, recompute)
    }
}

/// Picks candle's thread count for the engine. candle runs its own elementwise ops on a thread
/// pool of its own whose idle workers spin; rayon's workers (the fused kernels and every
/// matmul) spin too, and on a 2-core machine the two pools take cores from each other, halving
/// throughput. With fused kernels the few elementwise ops left to candle are small, so they run
/// on the calling thread. Call it before the first tensor op (candle's pool starts on first
/// use); a `CANDLE_NUM_THREADS` set by the user wins.
pub fn configure_threads(kind: EngineKind) {
    if kind == EngineKind::Fused && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// One block run as a single op (fused, or recomputed): its parameters, and what takes the
/// gradients its backward pass left, in [`BlockParams::named`] order.
pub struct BlockRun {
    pub params: BlockParams<Tensor>,
    pub grads: Box<dyn FnOnce() -> Option<Vec<Tensor>>>,
}

/// A model and the implementation that runs it.
#[derive(Debug, Clone)]
pub struct Engine {
    runner: Runner,
    precision: Precision,
    partner_threads: bool,
}

/// The implementation behind an [`Engine`].
#[derive(Debug, Clone)]
pub enum Runner {
    /// The reference model on candle's composed ops. With `recompute`, training passes run
    /// each block as a [`RecomputedBlock`].
    Reference { model: Gpt, recompute: bool },
    /// The fused kernels.
    Fused(FusedGpt),
}

/// Generation's view of an engine: feed tokens at the next positions, get the logits `(V)`
/// after the last one; the positions seen so far are cached.
pub trait Decode {
    /// Feeds `tokens` and returns the logits after the last one.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    /// Positions cached so far: the next token's position.
    fn len(&self) -> usize;
    /// True before the first token.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets the sequence (e.g. when the context window slides).
    fn clear(&mut self);
}

/// The reference model with candle-nn's KV cache.
struct CachedDecoder {
    model: Gpt,
    cache: KvCache,
    precision: Precision,
}

impl Decode for CachedDecoder {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let idx = Tensor::from_slice(tokens, (1, tokens.len()), self.model.wte.device())?;
        let logits = autocast(self.precision, || {
            self.model.forward_cached(&idx, &mut self.cache)
        })?;
        last_row(&logits)
    }

    fn len(&self) -> usize {
        self.cache.len()
    }

    fn clear(&mut self) {
        self.cache.clear()
    }
}

/// The last position's logits of `(1, T, V)`.
pub fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    let t = logits.dim(1)?;
    Ok(logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .squeeze(0)?
        .to_vec1::<f32>()?)
}

impl Engine {
    /// Runs `model` as `opts` say; `recompute`: training passes keep only each block's input
    /// and recompute the rest in backward. A model the fused kernels do not support is refused
    /// on them, naming the key.
    pub fn new(model: &Gpt, opts: &EngineOptions, recompute: bool) -> Result<Engine> {
        if recompute && !model.wte.device().is_cpu() {
            return Err(Error::Usage(format!(
                "training.recompute_activations runs on the CPU only; set it to false for --device {}",
                crate::engine::device::name(model.wte.device())
            )));
        }
        let runner = match opts.kind {
            EngineKind::Reference => Runner::Reference {
                model: model.clone(),
                recompute,
            },
            EngineKind::Fused => {
                // The refusal `--engine fused` gives, for options built by hand.
                EngineChoice::Fused.resolve(&model.cfg, model.wte.device(), opts.precision)?;
                Runner::Fused(FusedGpt::new(model, recompute))
            }
        };
        Ok(Engine {
            runner,
            precision: opts.precision,
            partner_threads: opts.partner_threads,
        })
    }

    /// The implementation running the model.
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// Which engine this is.
    pub fn kind(&self) -> EngineKind {
        match self.runner {
            Runner::Reference { .. } => EngineKind::Reference,
            Runner::Fused(_) => EngineKind::Fused,
        }
    }

    /// The model it runs (the same weight tensors either way).
    pub fn model(&self) -> &Gpt {
        match &self.runner {
            Runner::Reference { model, .. } => model,
            Runner::Fused(f) => &f.model,
        }
    }

    /// The device the model's weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.model().wte.device()
    }

    /// The dtype of the reference engine's matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Logits `(B, T, V)` of `idx` `(B, T)`, dropout off.
    pub fn forward(&self, idx: &Tensor) -> Result<Tensor> {
        match &self.runner {
            Runner::Reference { model, .. } => {
                autocast(self.precision, || model.forward(idx, None))
            }
            Runner::Fused(f) => Ok(f.forward(idx, None)?.0),
        }
    }

    /// Mean cross-entropy of predicting `targets` `(B, T)` from `idx` `(B, T)`, dropout off:
    /// an evaluation.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<f64> {
        kernels::in_pool(idx.elem_count(), || {
            let loss = match &self.runner {
                Runner::Reference { model, .. } => {
                    autocast(self.precision, || model.loss(idx, targets, None))?
                }
                Runner::Fused(f) => f.loss(idx, targets, None)?.0,
            };
            Ok(loss.to_scalar::<f32>()? as f64)
        })
    }

    /// A training pass: the loss of `idx` → `targets` with dropout drawn from `rng`, and the
    /// gradient of loss / `divisor` with respect to every parameter.
    pub fn loss_and_grads(
        &self,
        idx: &Tensor,
        targets: &Tensor,
        rng: &mut Rng,
        divisor: usize,
    ) -> Result<(f64, GradStore)> {
        kernels::in_pool(idx.elem_count(), || {
            let (loss, runs) = match &self.runner {
                Runner::Reference { model, recompute } => {
                    autocast(self.precision, || match recompute {
                        true => recomputed_loss(model, idx, targets, rng, self.precision),
                        false => Ok((model.loss(idx, targets, Some(rng))?, Vec::new())),
                    })?
                }
                Runner::Fused(f) => f.loss(idx, targets, Some(rng))?,
            };
            let value = loss.to_scalar::<f32>()? as f64;
            let loss = if divisor > 1 {
                (loss / divisor as f64)?
            } else {
                loss
            };
            let mut grads = loss.backward()?;
            for run in runs {
                let g = (run.grads)().ok_or_else(|| {
                    candle_core::Error::Msg("a block's backward pass left no gradients".into())
                })?;
                for ((_, w), g) in run.params.named().into_iter().zip(g) {
                    let g = match grads.remove(&w) {
                        Some(direct) => (direct + g)?,
                        None => g,
                    };
                    grads.insert(&w, g);
                }
            }
            Ok((value, grads))
        })
    }

    /// A decoder that caches the positions it has seen: the fused one, or the reference model
    /// with candle-nn's KV cache.
    pub fn decoder(&self) -> Result<Box<dyn Decode + Send>> {
        Ok(match &self.runner {
            Runner::Reference { model, .. } => Box::new(CachedDecoder {
                model: model.clone(),
                cache: model.new_cache(),
                precision: self.precision,
            }),
            Runner::Fused(f) => Box::new(Decoder::new(f, self.partner_threads)?),
        })
    }
}

/// The reference model's training loss with every block run as a [`RecomputedBlock`].
fn recomputed_loss(
    model: &Gpt,
    idx: &Tensor,
    targets: &Tensor,
    rng: &mut Rng,
    precision: Precision,
) -> Result<(Tensor, Vec<BlockRun>)> {
    let mut x = model.embed(idx, 0, None, Some(&mut *rng))?;
    let t = x.dim(1)?;
    let mask = causal_mask(t, t, 0, idx.device())?;
    let mut runs = Vec::with_capacity(model.blocks.len());
    for block in &model.blocks {
        let grads = GradSlot::default();
        let op = RecomputedBlock {
            block: block.clone(),
            mask: mask.clone(),
            dropout_seed: (model.cfg.dropout > 0.0).then(|| rng.random()),
            grads: grads.clone(),
            precision,
        };
        x = x.contiguous()?.apply_op1(op)?;
        runs.push(BlockRun {
            params: block.params(),
            grads: Box::new(move || grads.take()),
        });
    }
    Ok((cross_entropy(&model.lm_head(&x)?, targets)?, runs))
}
