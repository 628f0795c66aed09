//! `tinygpt attribute`: direct logit attribution ([`crate::circuits::attribution`]).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::circuits::attribution::direct_logit_attribution;
use crate::circuits::{encode_whole, one_token};
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct AttributeArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The prompt (at most block_size tokens).
    #[arg(long)]
    prompt: String,
    /// The next token whose logit to take apart (one token; default: the most likely one).
    #[arg(long)]
    token: Option<String>,
    /// The position whose next token to explain (default: the last).
    #[arg(long)]
    position: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: AttributeArgs) -> Result<()> {
    let ck = super::load_checkpoint(&args.checkpoint)?;
    let tok = &ck.tokenizer;
    let ids = encode_whole(tok, &args.prompt, "prompt", ck.config.model.block_size)?;
    let token = args
        .token
        .as_deref()
        .map(|t| one_token(tok, t, "chosen"))
        .transpose()?;
    let position = args.position.unwrap_or(ids.len() - 1);
    let a = direct_logit_attribution(&ck.model, &ids, position, token)?;
    if args.json {
        let v = serde_json::to_value(&a).map_err(|e| Error::Usage(e.to_string()))?;
        println!("{v}");
        return Ok(());
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "logit of {:?} (id {}) after {:?} (position {}): {:.4}, the sum of (final norm scale {:.4}):",
        tok.token_text(a.token),
        a.token,
        tok.token_text(ids[position]),
        position,
        a.logit,
        a.scale
    );
    let top = a
        .contributions
        .iter()
        .map(|c| c.value.abs())
        .fold(1e-12, f64::max);
    for c in &a.contributions {
        let bar = "█".repeat((20.0 * c.value.abs() / top).round() as usize);
        let _ = writeln!(s, "  {:<20} {:>+9.4}  {bar}", c.component, c.value);
    }
    print!("{s}");
    Ok(())
}
