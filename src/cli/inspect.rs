//! `tinygpt inspect`.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;
use crate::inspect::Report;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let ck = super::load_checkpoint(&args.dir)?;
    let report = Report::new(&ck)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
