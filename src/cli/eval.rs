//! `tinygpt eval`.

use std::path::PathBuf;

use clap::Args;

use crate::dist::Comm;
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

/// Evaluates the checkpoint; under `mpirun` every rank reads it and evaluates its share of
/// the windows, and rank 0 prints.
pub fn run(args: EvalArgs, comm: &Comm) -> Result<()> {
    let loaded = super::load_with_engine(&args.checkpoint, args.engine.for_rank(comm));
    let (ck, engine) = comm.agree(loaded)?;
    let progress = ProgressMode::for_rank(args.quiet || args.json, comm.rank(), comm.size());
    let (data, path) = comm.agree(args.corpus.load(&ck, progress))?;
    let (split, _) = args.corpus.split();
    let block = ck.config.model.block_size;
    let e = evaluate(&engine, &ck.tokenizer, &data, split, block, progress, comm)?;
    if !comm.is_root() {
        return Ok(());
    }
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
