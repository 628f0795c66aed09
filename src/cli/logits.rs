//! `tinygpt logits`.

use std::path::PathBuf;

use candle_core::Tensor;
use clap::Args;

use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text whose next-token logits to show, at every position (at most block_size tokens).
    #[arg(long)]
    prompt: String,
    /// Tokens shown per position (text output).
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print one JSON object with the ids and every logit: {"ids": [...], "logits": [[...], ...]}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: super::EngineArg,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let (ck, engine) = super::load_with_engine(&args.checkpoint, args.engine)?;
    let ids = ck
        .tokenizer
        .encode(&args.prompt)
        .map_err(|e| Error::Usage(format!("--prompt: {e}")))?;
    if ids.is_empty() {
        return Err(Error::Usage("--prompt is empty; give some text".into()));
    }
    let block = ck.config.model.block_size;
    if ids.len() > block {
        return Err(Error::Usage(format!(
            "--prompt is {} tokens, more than the model's block_size of {block}; shorten it",
            ids.len()
        )));
    }
    let idx = Tensor::from_slice(&ids, (1, ids.len()), engine.device())?;
    let logits = engine.forward(&idx)?.squeeze(0)?.to_vec2::<f32>()?;
    let mut out = String::new();
    if args.json {
        out = serde_json::json!({"ids": ids, "logits": logits}).to_string() + "\n";
    } else {
        table(&mut out, &ck.tokenizer, &ids, &logits, args.top);
    }
    // A closed pipe (`| head`) is not an error.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
    Ok(())
}

/// One line per position: the token and the `top` most likely next tokens with their logits.
fn table(out: &mut String, tok: &Tokenizer, ids: &[u32], logits: &[Vec<f32>], top: usize) {
    use std::fmt::Write;
    let _ = writeln!(out, "{:>5}  {:<12}  next tokens (logit)", "pos", "token");
    for (i, row) in logits.iter().enumerate() {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let top: Vec<String> = order
            .iter()
            .take(top.max(1))
            .map(|&j| format!("{:?} {:.3}", tok.token_text(j as u32), row[j]))
            .collect();
        let _ = writeln!(
            out,
            "{i:>5}  {:<12}  {}",
            format!("{:?}", tok.token_text(ids[i])),
            top.join(", ")
        );
    }
}
