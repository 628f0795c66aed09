//! What each head does, measured on the model's own forward pass with the hooks of
//! [`crate::model::hooks`]: [`scores`] (ablation, previous-token, induction, sink, entropy per
//! head), [`patching`] (a clean prompt's head outputs patched into a corrupted one) and
//! [`attribution`] (direct logit attribution). The ideas are those of the circuits papers
//! (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Olsson et al.
//! 2022, "In-context learning and induction heads"), asked of your own checkpoint.

pub mod attribution;
pub mod patching;
pub mod scores;

use std::ops::RangeInclusive;

use rand::Rng as _;

use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::rng::seeded;

/// The letters [`induction_corpus`] draws from.
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// `lines` lines, each a random string of letters written twice (`"qWfkZqWfkZ\n"`), its length
/// drawn from `lengths`. The second copy is predictable only by looking back for the current
/// letter and copying the one after it (induction); varied lengths keep a fixed-distance
/// lookup from solving it.
pub fn induction_corpus(lines: usize, lengths: RangeInclusive<usize>, seed: u64) -> String {
    let mut rng = seeded(seed);
    let mut out = String::new();
    for _ in 0..lines {
        let n = rng.random_range(lengths.clone());
        let s: String = (0..n)
            .map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char)
            .collect();
        out.push_str(&s);
        out.push_str(&s);
        out.push('\n');
    }
    out
}

/// The ids of `text`, the `what` of a circuit tool, run whole: not empty and at most
/// `block_size` tokens (no silent cut: the positions of a patch or an attribution must be the
/// ones the user typed).
pub fn encode_whole(
    tok: &Tokenizer,
    text: &str,
    what: &str,
    block_size: usize,
) -> Result<Vec<u32>> {
    let ids = tok
        .encode(text)
        .map_err(|e| Error::Usage(format!("the {what}: {e}")))?;
    if ids.is_empty() {
        return Err(Error::Usage(format!("the {what} is empty; give some text")));
    }
    if ids.len() > block_size {
        return Err(Error::Usage(format!(
            "the {what} is {} tokens, longer than the model's block_size of {block_size}: shorten it",
            ids.len()
        )));
    }
    Ok(ids)
}

/// The id of `text` as one token, refusing text that is not exactly one (`what` names it).
pub fn one_token(tok: &Tokenizer, text: &str, what: &str) -> Result<u32> {
    let ids = tok
        .encode(text)
        .map_err(|e| Error::Usage(format!("the {what} token: {e}")))?;
    match ids.as_slice() {
        [id] => Ok(*id),
        _ => Err(Error::Usage(format!(
            "the {what} token {text:?} is {} tokens; give exactly one",
            ids.len()
        ))),
    }
}
