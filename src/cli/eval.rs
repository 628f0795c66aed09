//! `tinygpt eval`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::data::{load_for, Split};
use crate::error::{Error, Result};
use crate::eval::evaluate;
use crate::progress::ProgressMode;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SplitArg {
    Train,
    Val,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Corpus to evaluate on, instead of the run's own (its config's data.path).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which part of the corpus: the run's held-out tail (val) or the rest (train).
    #[arg(long, value_enum, default_value = "val")]
    split: SplitArg,
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
    let cfg = &ck.config;
    let path = args.data.clone().unwrap_or_else(|| cfg.data.path.clone());
    let progress = ProgressMode::detect(args.quiet || args.json);
    let block = cfg.model.block_size;
    let val_fraction = cfg.training.val_fraction;
    let data = load_for(&ck.tokenizer, &path, val_fraction, block, progress)?;
    let split = match args.split {
        SplitArg::Train => Split::Train,
        SplitArg::Val => Split::Val,
    };
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
