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
use crate::model::{Gpt, Hooks};

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
    let token = match token {
        Some(t) if t as usize >= model.vocab_size => {
            return Err(Error::Usage(format!(
                "token id {t} is outside the vocabulary of {}",
                model.vocab_size
            )))
        }
        Some(t) => t,
        None => trace
            .logits
            .get(0)?
            .get(position)?
            .argmax(candle_core::D::Minus1)?
            .to_scalar::<u32>()?,
    };
    let at = |t: &Tensor| -> Result<Vec<f64>> { vec1(&t.get(0)?.get(position)?) }; // (1, T, C) → (C)

    let x = at(trace.residual.last().expect("the embeddings at least"))?;
    let c = x.len() as f64;
    let ln = &model.ln_f;
    let centred = ln.kind == NormKind::LayerNorm;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / c;
    let spread = match centred {
        true => {
            let m = mean(&x);
            x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / c
        }
        false => x.iter().map(|v| v * v).sum::<f64>() / c,
    };
    let scale = 1.0 / (spread + ln.eps).sqrt();
    let gain = vec1(&ln.weight)?;
    let unembed = vec1(&model.head_weight().get(token as usize)?)?;
    let u: Vec<f64> = gain.iter().zip(&unembed).map(|(g, w)| g * w).collect();
    let u_sum: f64 = u.iter().sum();
    let direct = |v: &[f64]| -> f64 {
        let shift = if centred { mean(v) * u_sum } else { 0.0 };
        scale * (dot(v, &u) - shift)
    };

    let mut out = Vec::new();
    let mut push = |component: String, layer, head, value| {
        out.push(Contribution {
            component,
            layer,
            head,
            value,
        })
    };
    let parts = model.embedding_parts(&idx, 0, None)?;
    push(
        "token embedding".into(),
        None,
        None,
        direct(&at(&parts.tokens)?),
    );
    if let Some(p) = &parts.positions {
        push(
            "position embedding".into(),
            None,
            None,
            direct(&vec1(&p.get(position)?)?),
        );
    }
    if let Some(b) = &parts.bigram {
        push("bigram features".into(), None, None, direct(&at(b)?));
    }
    for (l, (block, layer)) in model.blocks.iter().zip(&trace.layers).enumerate() {
        let proj = block.attn.output();
        let (_, nh, _, hs) = layer.heads.dims4()?;
        for h in 0..nh {
            let z = layer.heads.get(0)?.get(h)?.get(position)?; // (hs)
            let w_o = proj.weight.narrow(1, h * hs, hs)?; // (C, hs)
            let written = w_o.matmul(&z.unsqueeze(1)?)?; // (C, 1)
            push(
                format!("head {l}.{h}"),
                Some(l),
                Some(h),
                direct(&vec1(&written)?),
            );
        }
        if let Some(b) = &proj.bias {
            push(format!("attn bias {l}"), Some(l), None, direct(&vec1(b)?));
        }
        push(
            format!("mlp {l}"),
            Some(l),
            None,
            direct(&at(&layer.mlp_out)?),
        );
    }
    if let Some(b) = &ln.bias {
        push(
            "final norm bias".into(),
            None,
            None,
            dot(&vec1(b)?, &unembed),
        );
    }
    let logit = out.iter().map(|c| c.value).sum();
    Ok(Attribution {
        position,
        token,
        logit,
        scale,
        contributions: out,
    })
}
