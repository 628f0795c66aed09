//! Activation patching: run a corrupted prompt with one head's output taken from a clean
//! prompt of the same length, and see how much of the clean answer comes back. The measure is
//! the logit difference of two chosen tokens at the last position (answer − wrong); a head
//! whose patch restores it carries the information the corruption removed.

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{Gpt, HeadPatch, Hooks};

/// One head's patch.
#[derive(Debug, Clone, Serialize)]
pub struct PatchCell {
    pub layer: usize,
    pub head: usize,
    /// The corrupted run's logit difference with this head patched from the clean run.
    pub logit_diff: f64,
    /// (patched − corrupted) / (clean − corrupted): 1 restores the clean answer, 0 does nothing.
    /// None when clean and corrupted differ by less than 1e-6.
    pub restored: Option<f64>,
}

/// Every head's patch from the clean prompt into the corrupted one.
#[derive(Debug, Clone, Serialize)]
pub struct Patching {
    pub answer: u32,
    pub wrong: u32,
    /// The logit difference (answer − wrong) at the last position of each run.
    pub clean_logit_diff: f64,
    pub corrupted_logit_diff: f64,
    pub cells: Vec<PatchCell>,
}

/// The logit difference at the last position of a `(1, T, V)` logits tensor.
fn logit_diff(logits: &Tensor, answer: u32, wrong: u32) -> Result<f64> {
    let t = logits.dim(1)?;
    let last = logits.get(0)?.get(t - 1)?.to_dtype(DType::F64)?;
    let v = last.to_vec1::<f64>()?;
    Ok(v[answer as usize] - v[wrong as usize])
}

/// Patches each head of `model` in turn from `clean` into `corrupted` (token ids, equal
/// lengths) and measures `answer`'s logit minus `wrong`'s at the last position.
pub fn patch_each_head(
    model: &Gpt,
    clean: &[u32],
    corrupted: &[u32],
    answer: u32,
    wrong: u32,
) -> Result<Patching> {
    if clean.len() != corrupted.len() {
        return Err(Error::Usage(format!(
            "the clean prompt is {} tokens and the corrupted one {}: patching needs prompts of \
             equal length",
            clean.len(),
            corrupted.len()
        )));
    }
    for (what, id) in [("answer", answer), ("wrong", wrong)] {
        if id as usize >= model.vocab_size {
            return Err(Error::Usage(format!(
                "the {what} token id {id} is outside the vocabulary of {}",
                model.vocab_size
            )));
        }
    }
    let device = model.wte.device();
    let ids = |v: &[u32]| Tensor::from_vec(v.to_vec(), (1, v.len()), device);
    let (clean_ids, corrupted_ids) = (ids(clean)?, ids(corrupted)?);
    let clean_trace = model.trace(&clean_ids, &Hooks::none())?;
    let corrupted_logits = model.trace(&corrupted_ids, &Hooks::none())?.logits;
    let clean_diff = logit_diff(&clean_trace.logits, answer, wrong)?;
    let corrupted_diff = logit_diff(&corrupted_logits, answer, wrong)?;
    let gap = clean_diff - corrupted_diff;
    let mut cells = Vec::new();
    for (l, layer) in clean_trace.layers.iter().enumerate() {
        for h in 0..layer.heads.dim(1)? {
            let z = layer.heads.narrow(1, h, 1)?.squeeze(1)?; // (1, T, hs)
            let hooks = Hooks::none().with(l, h, HeadPatch::With(z));
            let patched = model.trace(&corrupted_ids, &hooks)?.logits;
            let d = logit_diff(&patched, answer, wrong)?;
            cells.push(PatchCell {
                layer: l,
                head: h,
                logit_diff: d,
                restored: (gap.abs() > 1e-6).then(|| (d - corrupted_diff) / gap),
            });
        }
    }
    Ok(Patching {
        answer,
        wrong,
        clean_logit_diff: clean_diff,
        corrupted_logit_diff: corrupted_diff,
        cells,
    })
}
