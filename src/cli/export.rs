//! `tinygpt export`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::error::Result;
use crate::interop::gguf::GgufDtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// A transformers GPT2LMHeadModel folder.
    Hf,
    /// A llama.cpp GGUF file (architecture gpt2).
    Gguf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// What to write.
    #[arg(long, value_enum)]
    format: Format,
    /// The folder (hf) or file (gguf) to write.
    #[arg(long)]
    out: PathBuf,
    /// Element type of the GGUF file's weight matrices (norms and biases stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: GgufDtype,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    if args.format == Format::Hf && args.dtype != GgufDtype::F32 {
        return Err(crate::Error::Usage(
            "--dtype applies to --format gguf; transformers folders are written in f32".into(),
        ));
    }
    // Writing into a run directory takes its lock, as training does.
    let _lock = crate::run::lock::RunLock::for_output(&args.out)?;
    let ck = super::load_checkpoint(&args.checkpoint)?;
    match args.format {
        Format::Hf => crate::interop::hf::export(&ck, &args.out, args.force)?,
        Format::Gguf => crate::interop::gguf::export(&ck, &args.out, args.dtype, args.force)?,
    }
    println!("exported {} to {}", ck.dir.display(), args.out.display());
    Ok(())
}
