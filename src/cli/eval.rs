//! `tinygpt eval`.

use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::progress::ProgressMode;
use crate::train::eval::evaluate;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    corpus: super::CorpusArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    engine: super::EngineArg,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let (ck, engine) = super::load_with_engine(&args.checkpoint, args.engine)?;
    let progress = ProgressMode::detect(args.quiet || args.json);
    let (data, path) = args.corpus.load(&ck, progress)?;
    let (split, _) = args.corpus.split();
    let block = ck.config.model.block_size;
    let e = evaluate(&engine, &ck.tokenizer, &data, split, block, progress)?;
    if args.json {
        let mut v = serde_json::to_value(&e).map_err(|e| Error::Usage(e.to_string()))?;
        v["checkpoint"] = ck.dir.display().to_string().into();
        v["data"] = path.display().to_string().into();
        println!("{v}");
    } else {
        println!(
            "{} split of {} ({} tokens, {} bytes), checkpoint {}:",
            e.split,
            path.display(),
            e.tokens,
            e.bytes,
            ck.dir.display()
        );
        println!(
            "loss {:.4} nats/token, perplexity {:.3}, {:.4} bits/byte",
            e.loss, e.perplexity, e.bits_per_byte
        );
    }
    Ok(())
}
