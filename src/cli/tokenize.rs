//! `tinygpt tokenize`.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// Checkpoint whose tokenizer to use.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text to tokenize.
    text: String,
    /// Print one JSON object: {"ids": [...], "tokens": [...]}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let ck = super::load_checkpoint(&args.checkpoint)?;
    let ids = ck.tokenizer.encode(&args.text)?;
    if args.json {
        let tokens: Vec<String> = ids.iter().map(|&i| ck.tokenizer.token_text(i)).collect();
        println!("{}", serde_json::json!({"ids": ids, "tokens": tokens}));
        return Ok(());
    }
    println!(
        "{} characters → {} tokens ({} tokenizer)",
        args.text.chars().count(),
        ids.len(),
        ck.tokenizer.kind().name()
    );
    println!("{:>5}  {:>6}  token", "pos", "id");
    for (i, &id) in ids.iter().enumerate() {
        println!("{i:>5}  {id:>6}  {:?}", ck.tokenizer.token_text(id));
    }
    println!("ids: {ids:?}");
    Ok(())
}
