//! `tinygpt patch`: activation patching of each head ([`crate::circuits::patching`]).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::circuits::patching::{patch_each_head, Patching};
use crate::circuits::{encode_whole, one_token};
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct PatchArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The prompt whose head outputs are patched in.
    #[arg(long)]
    clean: String,
    /// The prompt they are patched into: as many tokens as the clean one.
    #[arg(long)]
    corrupted: String,
    /// The token the clean prompt should lead to (one token).
    #[arg(long)]
    answer: String,
    /// The token the corrupted prompt leads to instead (one token).
    #[arg(long)]
    wrong: String,
    /// Print one JSON object instead of the grid.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PatchArgs) -> Result<()> {
    let ck = super::load_checkpoint(&args.checkpoint)?;
    let (tok, block) = (&ck.tokenizer, ck.config.model.block_size);
    let clean = encode_whole(tok, &args.clean, "clean prompt", block)?;
    let corrupted = encode_whole(tok, &args.corrupted, "corrupted prompt", block)?;
    let answer = one_token(tok, &args.answer, "answer")?;
    let wrong = one_token(tok, &args.wrong, "wrong")?;
    let p = patch_each_head(&ck.model, &clean, &corrupted, answer, wrong)?;
    if args.json {
        let v = serde_json::to_value(&p).map_err(|e| Error::Usage(e.to_string()))?;
        println!("{v}");
    } else {
        print!(
            "{}",
            grid(&p, &args.answer, &args.wrong, ck.config.model.n_head)
        );
    }
    Ok(())
}

/// The logit differences, then the fraction restored by each head as a layers × heads grid.
fn grid(p: &Patching, answer: &str, wrong: &str, n_head: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "logit {answer:?} − logit {wrong:?} at the last position: clean {:.3}, corrupted {:.3}",
        p.clean_logit_diff, p.corrupted_logit_diff
    );
    let _ = writeln!(
        s,
        "fraction of that gap restored by patching each head from the clean run into the corrupted one:"
    );
    let _ = write!(s, "    ");
    for h in 0..n_head {
        let _ = write!(s, "{:>8}", format!("H{h}"));
    }
    for c in &p.cells {
        if c.head == 0 {
            let _ = write!(s, "\nL{:<3}", c.layer);
        }
        let _ = match c.restored {
            Some(r) => write!(s, "{r:>8.3}"),
            None => write!(s, "{:>8}", "-"),
        };
    }
    s.push('\n');
    if p.cells.iter().all(|c| c.restored.is_none()) {
        s.push_str("(the two prompts give the same difference: nothing to restore)\n");
    }
    s
}
