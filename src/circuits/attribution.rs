//! Direct logit attribution: how much each part of the model writes the chosen token's logit
//! straight into the residual stream.
//!
//! The residual stream entering the final norm is a sum: embeddings, then per block each head's
//! z_h·W_O,hᵀ, the attention's output bias and the MLP's output. The norm is linear but for its
//! scale s = 1/√(var + ε) (RMSNorm: 1/√(mean x² + ε)); with s frozen at its value at the
//! position, each part c adds s·(c − mean c)·(g ⊙ W_U[token]) to the logit (RMSNorm: no mean),
//! and the norm's bias adds b·W_U[token]. These add up to the logit exactly (before any soft
//! cap): what is direct is exact, what flows through later layers is not counted here.

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::config::NormKind;
use crate::model::{Gpt, Hooks, Trace};

/// One part's contribution to the logit.
#[derive(Debug, Clone, Serialize)]
pub struct Contribution {
    /// `token embedding`, `position embedding`, `bigram features`, `head L.H`, `attn bias L`,
    /// `mlp L` or `final norm bias`.
    pub component: String,
    pub layer: Option<usize>,
    pub head: Option<usize>,
    pub value: f64,
}

/// The logit of `token` at `position`, taken apart.
#[derive(Debug, Clone, Serialize)]
pub struct Attribution {
    pub position: usize,
    pub token: u32,
    /// The logit before any soft cap: the sum of the contributions.
    pub logit: f64,
    /// The final norm's scale at the position.
    pub scale: f64,
    pub contributions: Vec<Contribution>,
}

fn vec1(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Direct logit attribution of `token`'s logit (None: the most likely token's) at `position`
/// of the prompt `ids`.
pub fn direct_logit_attribution(
    model: &Gpt,
    ids: &[u32],
    position: usize,
    token: Option<u32>,
) -> Result<Attribution> {
    if position >= ids.len() {
        return Err(Error::Usage(format!(
            "position {position} is past the prompt's {} tokens",
            ids.len()
        )));
    }
    let device = model.wte.device();
    let idx = Tensor::from_vec(ids.to_vec(), (1, ids.len()), device)?;
    let trace = model.trace(&idx, &Hooks::none())?;
    let token = chosen_token(model, &trace, position, token)?;
    let x = at(
        trace.residual.last().expect("the embeddings at least"),
        position,
    )?;
    let norm = FrozenNorm::new(model, &x, token)?;

    let mut out = Vec::new();
    embedding_contributions(model, &idx, position, &norm, &mut out)?;
    layer_contributions(model, &trace, position, &norm, &mut out)?;
    if let Some(b) = &model.ln_f.bias {
        push(
            &mut out,
            "final norm bias".into(),
            None,
            None,
            dot(&vec1(b)?, &norm.unembed),
        );
    }
    let logit = out.iter().map(|c| c.value).sum();
    Ok(Attribution {
        position,
        token,
        logit,
        scale: norm.scale,
        contributions: out,
    })
}

/// `token` checked against the vocabulary, or (None) the most likely token at `position`.
fn chosen_token(model: &Gpt, trace: &Trace, position: usize, token: Option<u32>) -> Result<u32> {
    match token {
        Some(t) if t as usize >= model.vocab_size => Err(Error::Usage(format!(
            "token id {t} is outside the vocabulary of {}",
            model.vocab_size
        ))),
        Some(t) => Ok(t),
        None => Ok(trace
            .logits
            .get(0)?
            .get(position)?
            .argmax(candle_core::D::Minus1)?
            .to_scalar::<u32>()?),
    }
}

/// The row of `t` `(1, T, C)` at `position`, as `(C)` numbers.
fn at(t: &Tensor, position: usize) -> Result<Vec<f64>> {
    vec1(&t.get(0)?.get(position)?)
}

/// Appends one contribution to `out`.
fn push(
    out: &mut Vec<Contribution>,
    component: String,
    layer: Option<usize>,
    head: Option<usize>,
    value: f64,
) {
    out.push(Contribution {
        component,
        layer,
        head,
        value,
    })
}

/// The mean of `v`'s entries, divided by `c` (the residual width).
fn mean(v: &[f64], c: f64) -> f64 {
    v.iter().sum::<f64>() / c
}

/// The final norm with its scale frozen at the position: a linear map from a residual part to
/// its direct share of the token's logit.
struct FrozenNorm {
    /// C, the residual width, as the mean's divisor.
    c: f64,
    /// LayerNorm (subtracts the mean) rather than RMSNorm.
    centred: bool,
    /// The frozen scale s = 1/√(var + ε).
    scale: f64,
    /// The token's unembedding row W_U[token].
    unembed: Vec<f64>,
    /// g ⊙ W_U[token].
    u: Vec<f64>,
    /// The sum of `u`'s entries.
    u_sum: f64,
}

impl FrozenNorm {
    /// Freezes the final norm's scale at the residual `x` `(C)` entering it, for `token`.
    fn new(model: &Gpt, x: &[f64], token: u32) -> Result<FrozenNorm> {
        let c = x.len() as f64;
        let ln = &model.ln_f;
        let centred = ln.kind == NormKind::LayerNorm;
        let spread = match centred {
            true => {
                let m = mean(x, c);
                x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / c
            }
            false => x.iter().map(|v| v * v).sum::<f64>() / c,
        };
        let scale = 1.0 / (spread + ln.eps).sqrt();
        let gain = vec1(&ln.weight)?;
        let unembed = vec1(&model.head_weight().get(token as usize)?)?;
        let u: Vec<f64> = gain.iter().zip(&unembed).map(|(g, w)| g * w).collect();
        let u_sum: f64 = u.iter().sum();
        Ok(FrozenNorm {
            c,
            centred,
            scale,
            unembed,
            u,
            u_sum,
        })
    }

    /// The direct contribution of the residual part `v` `(C)` to the logit.
    fn direct(&self, v: &[f64]) -> f64 {
        let shift = if self.centred {
            mean(v, self.c) * self.u_sum
        } else {
            0.0
        };
        self.scale * (dot(v, &self.u) - shift)
    }
}

/// The token, position and bigram embeddings' contributions.
fn embedding_contributions(
    model: &Gpt,
    idx: &Tensor,
    position: usize,
    norm: &FrozenNorm,
    out: &mut Vec<Contribution>,
) -> Result<()> {
    let parts = model.embedding_parts(idx, 0, None)?;
    push(
        out,
        "token embedding".into(),
        None,
        None,
        norm.direct(&at(&parts.tokens, position)?),
    );
    if let Some(p) = &parts.positions {
        push(
            out,
            "position embedding".into(),
            None,
            None,
            norm.direct(&vec1(&p.get(position)?)?),
        );
    }
    if let Some(b) = &parts.bigram {
        push(
            out,
            "bigram features".into(),
            None,
            None,
            norm.direct(&at(b, position)?),
        );
    }
    Ok(())
}

/// Each block's contributions: every head's, the attention's output bias and the MLP's.
fn layer_contributions(
    model: &Gpt,
    trace: &Trace,
    position: usize,
    norm: &FrozenNorm,
    out: &mut Vec<Contribution>,
) -> Result<()> {
    for (l, (block, layer)) in model.blocks.iter().zip(&trace.layers).enumerate() {
        let proj = block.attn.output();
        let (_, nh, _, hs) = layer.heads.dims4()?;
        for h in 0..nh {
            let z = layer.heads.get(0)?.get(h)?.get(position)?; // (hs)
            let w_o = proj.weight.narrow(1, h * hs, hs)?; // (C, hs)
            let written = w_o.matmul(&z.unsqueeze(1)?)?; // (C, 1)
            push(
                out,
                format!("head {l}.{h}"),
                Some(l),
                Some(h),
                norm.direct(&vec1(&written)?),
            );
        }
        if let Some(b) = &proj.bias {
            push(
                out,
                format!("attn bias {l}"),
                Some(l),
                None,
                norm.direct(&vec1(b)?),
            );
        }
        push(
            out,
            format!("mlp {l}"),
            Some(l),
            None,
            norm.direct(&at(&layer.mlp_out, position)?),
        );
    }
    Ok(())
}
