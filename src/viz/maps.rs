//! Attention maps of a prompt, taken from the model's own forward pass, and the choice of
//! layers and heads to show.

use candle_core::Tensor;
use serde::Serialize;

use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::model::Gpt;

/// Which layers to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSel {
    One(usize),
    All,
}

/// Which heads to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadSel {
    One(usize),
    All,
    /// The average over heads.
    Mean,
}

impl std::str::FromStr for LayerSel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(LayerSel::All),
            n => n
                .parse()
                .map(LayerSel::One)
                .map_err(|_| Error::Usage(format!("--layer {s:?} is not a layer index or `all`"))),
        }
    }
}

impl std::str::FromStr for HeadSel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(HeadSel::All),
            "mean" => Ok(HeadSel::Mean),
            n => n.parse().map(HeadSel::One).map_err(|_| {
                Error::Usage(format!("--head {s:?} is not a head index, `all` or `mean`"))
            }),
        }
    }
}

/// One T×T matrix: row i = query token i, column j = key token j.
pub type Matrix = Vec<Vec<f32>>;

/// The maps of one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerMaps {
    pub layer: usize,
    /// Labels of `heads`: head indices, or `"mean"`.
    pub head_labels: Vec<String>,
    /// One T×T matrix per shown head.
    pub heads: Vec<Matrix>,
}

/// Attention weights of a prompt, ready to draw.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionMaps {
    /// The text of each token position.
    pub tokens: Vec<String>,
    pub layers: Vec<LayerMaps>,
}

impl AttentionMaps {
    /// Runs `model` on `prompt` and keeps the chosen layers and heads.
    pub fn compute(
        model: &Gpt,
        tokenizer: &Tokenizer,
        prompt: &str,
        layer: LayerSel,
        head: HeadSel,
    ) -> Result<AttentionMaps> {
        if prompt.is_empty() {
            return Err(Error::Usage(
                "--prompt is empty; attention needs at least one token".into(),
            ));
        }
        let ids = tokenizer
            .encode(prompt)
            .map_err(|e| Error::Usage(format!("prompt: {e}")))?;
        Self::compute_ids(model, tokenizer, &ids, layer, head)
    }

    /// [`AttentionMaps::compute`] on token ids (at most block_size of them).
    pub fn compute_ids(
        model: &Gpt,
        tokenizer: &Tokenizer,
        ids: &[u32],
        layer: LayerSel,
        head: HeadSel,
    ) -> Result<AttentionMaps> {
        let (n_layer, n_head) = (model.cfg.n_layer, model.cfg.n_head);
        if let LayerSel::One(l) = layer {
            if l >= n_layer {
                return Err(Error::Usage(format!(
                    "--layer {l} does not exist: the model has {n_layer} layers (0..={})",
                    n_layer - 1
                )));
            }
        }
        if let HeadSel::One(h) = head {
            if h >= n_head {
                return Err(Error::Usage(format!(
                    "--head {h} does not exist: the model has {n_head} heads per layer (0..={})",
                    n_head - 1
                )));
            }
        }
        let mut ids = ids.to_vec();
        let block = model.cfg.block_size;
        if ids.len() > block {
            return Err(Error::Usage(format!(
                "the prompt is {} tokens, more than the model's block_size of {block}; shorten it",
                ids.len()
            )));
        }
        if ids.is_empty() {
            ids.push(tokenizer.newline_id().unwrap_or(0));
        }
        let tokens = ids.iter().map(|&i| tokenizer.token_text(i)).collect();
        let x = Tensor::from_slice(&ids, (1, ids.len()), model.wte.device())?;
        let (_, att) = model.forward_with_attention(&x)?;
        let mut layers = Vec::new();
        for (l, w) in att.iter().enumerate() {
            if matches!(layer, LayerSel::One(k) if k != l) {
                continue;
            }
            let w = w.squeeze(0)?; // (n_head, T, T)
            let (head_labels, heads) = match head {
                HeadSel::One(h) => (vec![h.to_string()], vec![w.get(h)?.to_vec2::<f32>()?]),
                HeadSel::All => (
                    (0..n_head).map(|h| h.to_string()).collect(),
                    w.to_vec3::<f32>()?,
                ),
                HeadSel::Mean => (vec!["mean".to_string()], vec![w.mean(0)?.to_vec2::<f32>()?]),
            };
            layers.push(LayerMaps {
                layer: l,
                head_labels,
                heads,
            });
        }
        Ok(AttentionMaps { tokens, layers })
    }

    /// Every (layer, head label, matrix) shown, in order.
    pub fn panels(&self) -> impl Iterator<Item = (usize, &str, &Matrix)> {
        self.layers.iter().flat_map(|l| {
            l.head_labels
                .iter()
                .zip(&l.heads)
                .map(move |(h, m)| (l.layer, h.as_str(), m))
        })
    }

    /// The maps as JSON: `{"tokens": [...], "layers": [{"layer": L, "head_labels": [...], "heads": [[[w…]…]…]}]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// How a token reads in a label: spaces, newlines and tabs made visible.
pub fn visible(token: &str) -> String {
    let mut s = String::new();
    for c in token.chars() {
        match c {
            ' ' => s.push('␣'),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            '\r' => s.push_str("\\r"),
            c if c.is_control() => s.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => s.push(c),
        }
    }
    s
}
