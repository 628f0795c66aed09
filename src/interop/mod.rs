//! The ecosystem's formats: a checkpoint out to a transformers `GPT2LMHeadModel` folder
//! ([`hf::export`]) or a llama.cpp GGUF file ([`gguf::export`]), and a `GPT2LMHeadModel` folder
//! in ([`hf::import`]).
//!
//! Both targets are GPT-2: learned positions, pre-LayerNorm blocks with biases everywhere
//! (Q, K and V included), an MLP of width 4C, and an LM head tied to the token embedding
//! (transformers also takes an untied one). [`Gpt2Weights`] is a model in that arrangement;
//! options GPT-2 has no equivalent for are refused by [`check_exportable`], which names them.

pub mod gguf;
pub mod hf;

use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::layout::{Activation, Affine, BlockParams};
use crate::model::config::{NormKind, Position};
use crate::model::{Gpt, ModelConfig};

/// A weight `(out, in)` or gain `(C)` and its bias, zeros where the model has none.
pub type Dense = (Tensor, Tensor);

/// One block in GPT-2's arrangement, each weight in PyTorch's `(out, in)` layout.
pub struct Gpt2Block {
    pub ln_1: Dense,
    /// [W_Q; W_K; W_V] stacked `(3C, C)`, and their biases `(3C)`.
    pub qkv: Dense,
    pub attn_proj: Dense,
    pub ln_2: Dense,
    /// `(4C, C)`.
    pub fc: Dense,
    /// `(C, 4C)`.
    pub mlp_proj: Dense,
}

/// A whole model in GPT-2's arrangement.
pub struct Gpt2Weights {
    /// `(V, C)`.
    pub wte: Tensor,
    /// `(block_size, C)`.
    pub wpe: Tensor,
    pub blocks: Vec<Gpt2Block>,
    pub ln_f: Dense,
    /// `(V, C)` when the head is not tied to `wte`.
    pub lm_head: Option<Tensor>,
}

/// A model's tensors by tinygpt's checkpoint names, and the bias settings they imply.
pub struct CheckpointTensors {
    pub tensors: Vec<(String, Tensor)>,
    /// `model.bias`: the LayerNorms and linear layers have biases.
    pub bias: bool,
    /// `model.qkv_bias`: W_Q, W_K and W_V have biases.
    pub qkv_bias: bool,
}

/// Refuses a model with a part GPT-2 lacks, naming the `[model]` key; `target` names the format.
pub fn check_exportable(cfg: &ModelConfig, target: &str) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::Usage(format!(
            "{what} has no equivalent in GPT-2, so the model cannot be exported to {target}; export a model trained without it"
        )))
    };
    if cfg.position == Position::Rope {
        return refuse("model.position = \"rope\" (rotary embeddings)".into());
    }
    if cfg.activation == Activation::Relu2 {
        return refuse("model.activation = \"relu2\"".into());
    }
    if cfg.bigram_buckets > 0 {
        return refuse(format!("model.bigram_buckets = {}", cfg.bigram_buckets));
    }
    if cfg.logit_softcap != 0.0 {
        return refuse(format!("model.logit_softcap = {}", cfg.logit_softcap));
    }
    if cfg.norm == NormKind::Rms {
        return refuse("model.norm = \"rms\" (RMSNorm)".into());
    }
    if cfg.qk_norm {
        return refuse("model.qk_norm = true".into());
    }
    Ok(())
}

impl Gpt2Weights {
    /// `model`'s weights in GPT-2's arrangement ([`check_exportable`] first).
    pub fn from_model(model: &Gpt) -> Result<Gpt2Weights> {
        let dense = |a: &Affine<Tensor>| -> Result<Dense> {
            let bias = match &a.bias {
                Some(b) => b.clone(),
                None => Tensor::zeros(a.weight.dim(0)?, a.weight.dtype(), a.weight.device())?,
            };
            Ok((a.weight.clone(), bias))
        };
        let blocks = model
            .blocks
            .iter()
            .map(|b| {
                let p = b.params();
                let (q, k, v) = (dense(&p.w_q)?, dense(&p.w_k)?, dense(&p.w_v)?);
                Ok(Gpt2Block {
                    ln_1: dense(&p.ln_1)?,
                    qkv: (
                        Tensor::cat(&[&q.0, &k.0, &v.0], 0)?,
                        Tensor::cat(&[&q.1, &k.1, &v.1], 0)?,
                    ),
                    attn_proj: dense(&p.attn_proj)?,
                    ln_2: dense(&p.ln_2)?,
                    fc: dense(&p.fc)?,
                    mlp_proj: dense(&p.mlp_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = dense(&Affine {
            weight: model.ln_f.weight.clone(),
            bias: model.ln_f.bias.clone(),
        })?;
        let wpe = model.wpe.clone().ok_or_else(|| {
            Error::Usage("the model has no learned positions (model.position)".into())
        })?;
        Ok(Gpt2Weights {
            wte: model.wte.clone(),
            wpe,
            blocks,
            ln_f,
            lm_head: model.lm_head.clone(),
        })
    }

    /// The tinygpt checkpoint tensors of these weights (`wte.weight`, `h.0.attn.w_q.weight`,
    /// …), leaving out a group of biases that is all zeros: the LayerNorms' and linear
    /// layers' (`model.bias`), or W_Q's, W_K's and W_V's (`model.qkv_bias`).
    pub fn to_checkpoint_tensors(&self) -> Result<CheckpointTensors> {
        let c = self.wte.dim(1)?;
        let zero =
            |t: &Tensor| -> Result<bool> { Ok(t.abs()?.max_all()?.to_scalar::<f32>()? == 0.0) };
        let mut bias = false;
        let mut qkv_bias = false;
        for b in &self.blocks {
            for d in [&b.ln_1, &b.attn_proj, &b.ln_2, &b.fc, &b.mlp_proj] {
                bias |= !zero(&d.1)?;
            }
            qkv_bias |= !zero(&b.qkv.1)?;
        }
        bias |= !zero(&self.ln_f.1)?;
        let affine = |d: &Dense, keep: bool| Affine {
            weight: d.0.clone(),
            bias: keep.then(|| d.1.clone()),
        };
        let mut out = vec![("wte.weight".to_string(), self.wte.clone())];
        out.push(("wpe.weight".to_string(), self.wpe.clone()));
        for (i, b) in self.blocks.iter().enumerate() {
            let part = |t: &Tensor, n: usize| t.narrow(0, n * c, c);
            let qkv = |n: usize| -> Result<Affine<Tensor>> {
                Ok(Affine {
                    weight: part(&b.qkv.0, n)?,
                    bias: match qkv_bias {
                        true => Some(part(&b.qkv.1, n)?),
                        false => None,
                    },
                })
            };
            let p = BlockParams {
                ln_1: affine(&b.ln_1, bias),
                w_q: qkv(0)?,
                w_k: qkv(1)?,
                w_v: qkv(2)?,
                attn_proj: affine(&b.attn_proj, bias),
                ln_2: affine(&b.ln_2, bias),
                fc: affine(&b.fc, bias),
                mlp_proj: affine(&b.mlp_proj, bias),
            };
            for (name, t) in p.named() {
                out.push((format!("h.{i}.{name}"), t.contiguous()?));
            }
        }
        out.push(("ln_f.weight".to_string(), self.ln_f.0.clone()));
        if bias {
            out.push(("ln_f.bias".to_string(), self.ln_f.1.clone()));
        }
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        Ok(CheckpointTensors {
            tensors: out,
            bias,
            qkv_bias,
        })
    }
}

/// Refuses to replace `out` unless `force`: one line naming it and the flag.
pub fn check_output(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        return Err(Error::Usage(format!(
            "{} already exists; pass --force to replace it, or choose another --out",
            out.display()
        )));
    }
    Ok(())
}
