//! Hooks on the reference forward pass, the one place ablation and patching are written: a
//! [`Hooks`] names heads whose output is replaced, and [`super::Gpt::trace`] runs the model
//! with them, recording what each layer computed ([`Trace`]).
//!
//! A head's output here is z = softmax(Q·Kᵀ/√d_k + M)·V, `(B, T, hs)`, before the output
//! projection mixes the heads. The projection is linear, so the block's attention output is
//! Σ_h z_h·W_O,hᵀ (+ bias): replacing z_h removes (or swaps) exactly that head's term, which
//! is what mean ablation, zero ablation and activation patching mean.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// What replaces one head's output z `(B, T, hs)`.
#[derive(Debug, Clone)]
pub enum HeadPatch {
    /// Zeros: zero ablation.
    Zero,
    /// A tensor broadcast to `(B, T, hs)`: a mean over data `(hs)` (mean ablation), or the
    /// same head's output on another prompt, `(T, hs)` or `(B, T, hs)` (activation patching).
    With(Tensor),
}

/// The heads to replace in one pass, by (layer, head). No hooks is the plain forward pass,
/// bit for bit.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    patches: BTreeMap<(usize, usize), HeadPatch>,
}

impl Hooks {
    /// No hooks.
    pub fn none() -> Hooks {
        Hooks::default()
    }

    /// These hooks with head `head` of layer `layer` replaced by `patch`.
    pub fn with(mut self, layer: usize, head: usize, patch: HeadPatch) -> Hooks {
        self.patches.insert((layer, head), patch);
        self
    }

    /// Replaces head `head` of layer `layer` by `patch`.
    pub fn insert(&mut self, layer: usize, head: usize, patch: HeadPatch) {
        self.patches.insert((layer, head), patch);
    }

    /// The patches of layer `layer`, by head.
    pub(crate) fn layer(&self, layer: usize) -> Vec<(usize, &HeadPatch)> {
        self.patches
            .range((layer, 0)..(layer + 1, 0))
            .map(|(&(_, h), p)| (h, p))
            .collect()
    }

    /// Refuses a head the model does not have, naming it.
    pub fn check(&self, n_layer: usize, n_head: usize) -> Result<()> {
        check_heads(self.patches.keys().copied(), n_layer, n_head)
    }
}

/// Refuses any of `heads` ((layer, head) pairs) that a model of `n_layer` layers with `n_head`
/// heads does not have, naming it.
pub fn check_heads(
    heads: impl IntoIterator<Item = (usize, usize)>,
    n_layer: usize,
    n_head: usize,
) -> Result<()> {
    for (l, h) in heads {
        if l >= n_layer || h >= n_head {
            return Err(Error::Usage(format!(
                "head {l}.{h} does not exist: the model has layers 0..={} with heads 0..={}",
                n_layer.saturating_sub(1),
                n_head.saturating_sub(1)
            )));
        }
    }
    Ok(())
}

/// Heads' outputs `z` `(B, n_head, T, hs)` with `patches` applied: the same tensor when there
/// are none, else the untouched heads' slices and the replacements side by side.
pub(crate) fn patch_heads(z: Tensor, patches: &[(usize, &HeadPatch)]) -> Result<Tensor> {
    if patches.is_empty() {
        return Ok(z);
    }
    let (b, nh, t, hs) = z.dims4()?;
    let mut parts = Vec::with_capacity(nh);
    for h in 0..nh {
        let own = z.narrow(1, h, 1)?; // (B, 1, T, hs)
        let part = match patches.iter().find(|(p, _)| *p == h).map(|(_, p)| p) {
            None => own,
            Some(HeadPatch::Zero) => own.zeros_like()?,
            Some(HeadPatch::With(r)) => {
                let shaped = match r.rank() {
                    1 => r.reshape((1, 1, 1, r.dim(0)?)),
                    2 => r.reshape((1, 1, r.dim(0)?, r.dim(1)?)),
                    3 => r.unsqueeze(1),
                    _ => r.reshape(r.dims()),
                }?;
                shaped
                    .to_dtype(z.dtype())?
                    .broadcast_as((b, 1, t, hs))
                    .map_err(|_| {
                        Error::Usage(format!(
                            "a replacement of shape {:?} does not fit head {h}'s output ({b}, {t}, {hs}): \
                             give (hs), (T, hs) or (B, T, hs) with the same T",
                            r.dims()
                        ))
                    })?
                    .contiguous()?
            }
        };
        parts.push(part);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// What one block computed in a traced pass.
#[derive(Debug, Clone)]
pub struct LayerTrace {
    /// Attention weights `(B, n_head, T, T)`.
    pub attention: Tensor,
    /// Each head's output z `(B, n_head, T, hs)`, after any patch, before the output projection.
    pub heads: Tensor,
    /// The attention's output added to the residual stream `(B, T, C)`.
    pub attn_out: Tensor,
    /// The MLP's output added to the residual stream `(B, T, C)`.
    pub mlp_out: Tensor,
}

/// Everything a traced pass ([`super::Gpt::trace`]) recorded.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Logits `(B, T, V)`.
    pub logits: Tensor,
    /// The residual stream: the embeddings entering the first block, then each block's output,
    /// n_layer + 1 tensors `(B, T, C)`. The last is what the final norm reads.
    pub residual: Vec<Tensor>,
    /// One entry per block.
    pub layers: Vec<LayerTrace>,
}
