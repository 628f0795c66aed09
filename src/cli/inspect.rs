//! `tinygpt inspect`.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;
use crate::run::inspect::Report;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Instead of the report: the tokens whose embeddings are closest to TOKEN (cosine).
    #[arg(long, value_name = "TOKEN")]
    neighbours: Option<String>,
    /// How many neighbours.
    #[arg(long, default_value_t = 10)]
    k: usize,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let ck = super::load_checkpoint(&args.dir)?;
    if let Some(token) = &args.neighbours {
        let (id, near) = crate::run::inspect::neighbours(&ck, token, args.k)?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "token": token, "id": id, "neighbours": near })
            );
        } else {
            println!(
                "nearest tokens to {:?} (id {id}) by cosine similarity of embeddings:",
                ck.tokenizer.token_text(id)
            );
            for n in near {
                println!("  {:>8.4}  {:>6}  {:?}", n.similarity, n.id, n.token);
            }
        }
        return Ok(());
    }
    let report = Report::new(&ck)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
