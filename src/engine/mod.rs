//! What runs a model: the reference [`Gpt`] itself (candle's composed ops and autograd), or
//! its fused copy on tinygpt's CPU kernels ([`FusedGpt`]). The choice is made once, when an
//! [`Engine`] is built from a model and `model.kernels`; after that every caller (training,
//! evaluation, generation) asks the engine and never looks at the choice again.
//!
//! Both engines compute the same function of the same weights. Training asks for
//! [`Engine::loss_and_grads`], which returns every parameter's gradient in one store, the ones
//! computed inside block ops included.

pub mod decoder;
pub mod fused;
pub mod recompute;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rand::Rng as _;

pub use decoder::Decoder;
use fused::BlockRun;
pub use fused::FusedGpt;

use crate::error::Result;
use crate::kernels::block::GradSlot;
use crate::kernels::{self, Kernels};
use crate::model::attention::causal_mask;
use crate::model::gpt::cross_entropy;
use crate::model::{Gpt, KvCache};
use crate::rng::Rng;
use recompute::RecomputedBlock;

/// A model and the implementation that runs it.
#[derive(Debug, Clone)]
pub enum Engine {
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
}

impl Decode for CachedDecoder {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let idx = Tensor::from_slice(tokens, (1, tokens.len()), self.model.wte.device())?;
        last_row(&self.model.forward_cached(&idx, &mut self.cache)?)
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
    /// Runs `model` on `kernels`; `recompute`: training passes keep only each block's input and
    /// recompute the rest in backward (less memory, about a third more compute).
    pub fn new(model: &Gpt, kernels: Kernels, recompute: bool) -> Engine {
        match kernels {
            Kernels::Reference => Engine::Reference {
                model: model.clone(),
                recompute,
            },
            Kernels::Fused => Engine::Fused(FusedGpt::new(model, recompute)),
        }
    }

    /// The device the model's weights live on.
    pub fn device(&self) -> &candle_core::Device {
        match self {
            Engine::Reference { model, .. } => model.wte.device(),
            Engine::Fused(f) => f.wte.device(),
        }
    }

    /// Logits `(B, T, V)` of `idx` `(B, T)`, dropout off.
    pub fn forward(&self, idx: &Tensor) -> Result<Tensor> {
        match self {
            Engine::Reference { model, .. } => model.forward(idx, None),
            Engine::Fused(f) => Ok(f.forward(idx, None)?.0),
        }
    }

    /// Mean cross-entropy of predicting `targets` `(B, T)` from `idx` `(B, T)`, dropout off:
    /// an evaluation.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<f64> {
        kernels::in_pool(idx.elem_count(), || {
            let loss = match self {
                Engine::Reference { model, .. } => model.loss(idx, targets, None)?,
                Engine::Fused(f) => f.loss(idx, targets, None)?.0,
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
            let (loss, runs) = match self {
                Engine::Reference { model, recompute } => match recompute {
                    true => recomputed_loss(model, idx, targets, rng)?,
                    false => (model.loss(idx, targets, Some(rng))?, Vec::new()),
                },
                Engine::Fused(f) => f.loss(idx, targets, Some(rng))?,
            };
            let value = loss.to_scalar::<f32>()? as f64;
            let loss = if divisor > 1 {
                (loss / divisor as f64)?
            } else {
                loss
            };
            let mut grads = loss.backward()?;
            for (params, slot) in runs {
                let g = slot.take().ok_or_else(|| {
                    candle_core::Error::Msg("a block's backward pass left no gradients".into())
                })?;
                for ((_, w), (_, g)) in params.named().into_iter().zip(g.named()) {
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
    pub fn decoder(&self) -> Result<Box<dyn Decode>> {
        Ok(match self {
            Engine::Reference { model, .. } => Box::new(CachedDecoder {
                model: model.clone(),
                cache: model.new_cache(),
            }),
            Engine::Fused(f) => Box::new(Decoder::new(f)?),
        })
    }
}

/// The reference model's training loss with every block run as a [`RecomputedBlock`].
fn recomputed_loss(
    model: &Gpt,
    idx: &Tensor,
    targets: &Tensor,
    rng: &mut Rng,
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
        };
        x = x.contiguous()?.apply_op1(op)?;
        runs.push((block.params(), grads));
    }
    Ok((cross_entropy(&model.lm_head(&x)?, targets)?, runs))
}
