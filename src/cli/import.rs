//! `tinygpt import`.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A transformers GPT2LMHeadModel folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    from: PathBuf,
    /// The tinygpt checkpoint directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: ImportArgs) -> Result<()> {
    // Writing into a run directory takes its lock, as training does.
    let _lock = crate::run::lock::RunLock::for_output(&args.out)?;
    let ck = crate::interop::hf::import(&args.from, &args.out, args.force)?;
    let m = &ck.config.model;
    println!(
        "imported {}: {} parameters, {} layers, {} heads, n_embd {}, block_size {}, {} tokens ({:?}); checkpoint in {}",
        args.from.display(),
        ck.params.count(),
        m.n_layer,
        m.n_head,
        m.n_embd,
        m.block_size,
        ck.tokenizer.vocab_size(),
        ck.tokenizer.kind(),
        args.out.display()
    );
    Ok(())
}
