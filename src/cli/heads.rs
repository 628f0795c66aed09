//! `tinygpt heads`: what each head does and whether it matters ([`crate::circuits::scores`]).

use std::path::PathBuf;

use clap::Args;

use crate::circuits::scores::{
    check_induction_len, parse_head, sample_windows, score_heads, Ablation, ScoreOptions,
    INDUCTION_SEQS, SAMPLE_TOKENS,
};
use crate::error::{Error, Result};
use crate::progress::ProgressMode;
use crate::viz::heads::{to_table, write_grid};
use crate::viz::ImageFormat;

#[derive(Debug, Args)]
pub struct HeadsArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    corpus: super::CorpusArg,
    /// Predicted tokens in the sample, in windows spread over the split; `all`: every token of
    /// the split.
    #[arg(long, default_value_t = SAMPLE_TOKENS.to_string(), value_name = "N|all")]
    tokens: String,
    /// What replaces an ablated head's output: its mean over the sample, or zeros.
    #[arg(long, value_enum, default_value_t = Ablation::Mean)]
    ablation: Ablation,
    /// Length L of each random sequence of the induction test (written twice; default: half
    /// the context).
    #[arg(long)]
    induction_len: Option<usize>,
    /// Random sequences in the induction test.
    #[arg(long, default_value_t = INDUCTION_SEQS)]
    induction_seqs: usize,
    /// Seed of the induction test's sequences and of the randomly initialised comparison.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also ablate these heads together (`LAYER.HEAD`, comma-separated, e.g. `1.0,1.2`) and
    /// report the losses without them.
    #[arg(long, value_delimiter = ',', value_name = "L.H,...")]
    ablate: Vec<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also draw the scores as a grid image (.png or .svg).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: HeadsArgs) -> Result<()> {
    let max_tokens = match args.tokens.as_str() {
        "all" => None,
        n => match n.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return Err(Error::Usage(format!(
                    "--tokens {n:?}: give a positive number of tokens, or `all` for the whole split"
                )))
            }
        },
    };
    if args.induction_seqs == 0 {
        return Err(Error::Usage(
            "--induction-seqs 0: the induction test needs at least one sequence".into(),
        ));
    }
    let format = args
        .plot
        .as_deref()
        .map(ImageFormat::from_path)
        .transpose()?;
    let ck = super::load_checkpoint(&args.checkpoint)?;
    let block = ck.config.model.block_size;
    let defaults = ScoreOptions::defaults(block);
    let opts = ScoreOptions {
        ablation: args.ablation,
        induction_len: args.induction_len.unwrap_or(defaults.induction_len),
        induction_seqs: args.induction_seqs,
        seed: args.seed,
        ablate: args
            .ablate
            .iter()
            .map(|s| parse_head(s))
            .collect::<Result<_>>()?,
    };
    // Before the corpus is read: a bad length fails at once.
    check_induction_len(opts.induction_len, block)?;
    let progress = ProgressMode::detect(args.quiet || args.json);
    let (data, path) = args.corpus.load(&ck, progress)?;
    let (split, name) = args.corpus.split();
    let windows = sample_windows(&data, split, block, max_tokens)?;
    let report = score_heads(
        &ck.model,
        &windows,
        name,
        &ck.tokenizer.special_ids(),
        &opts,
        progress,
    )?;
    if args.json {
        let mut v = serde_json::to_value(&report).map_err(|e| Error::Usage(e.to_string()))?;
        v["checkpoint"] = ck.dir.display().to_string().into();
        v["data"] = path.display().to_string().into();
        println!("{v}");
    } else {
        println!(
            "heads of {} on {} ({} split)",
            ck.dir.display(),
            path.display(),
            name
        );
        print!("{}", to_table(&report));
    }
    if let (Some(out), Some(format)) = (&args.plot, format) {
        let (w, h) = write_grid(&report, out, format)?;
        eprintln!("wrote {} ({w}×{h})", out.display());
    }
    Ok(())
}
