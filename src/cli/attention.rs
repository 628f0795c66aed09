//! `tinygpt attention`: the attention of a trained model on a prompt, as a table, a Graphviz
//! graph, a heatmap image or JSON.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::error::{Error, Result};
use crate::viz::dot::to_dot;
use crate::viz::heatmap::write_heatmap;
use crate::viz::maps::{AttentionMaps, HeadSel, LayerSel};
use crate::viz::table::to_table;
use crate::viz::ImageFormat;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Dot,
    Svg,
    Png,
    Json,
}

#[derive(Debug, Args)]
pub struct AttentionArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text whose attention to show (at most block_size tokens).
    #[arg(long)]
    prompt: String,
    /// Layer index, or `all`.
    #[arg(long, default_value = "all")]
    layer: String,
    /// Head index, `all`, or `mean` (the average of the heads).
    #[arg(long, default_value = "all")]
    head: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// DOT: draw an edge for every weight at or above this.
    #[arg(long, default_value_t = 0.05)]
    threshold: f32,
    /// Write here instead of stdout (required for png and svg).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    engine: super::EngineArg,
}

pub fn run(args: AttentionArgs) -> Result<()> {
    let layer: LayerSel = args.layer.parse()?;
    let head: HeadSel = args.head.parse()?;
    if !(0.0..=1.0).contains(&args.threshold) {
        return Err(Error::Usage(format!(
            "--threshold {} must be in [0, 1]",
            args.threshold
        )));
    }
    if matches!(args.format, Format::Png | Format::Svg) && args.out.is_none() {
        return Err(Error::Usage(
            "--format png/svg writes an image: pass --out FILE".into(),
        ));
    }
    let (ck, engine) = super::load_with_engine(&args.checkpoint, args.engine)?;
    let maps = AttentionMaps::compute(engine.model(), &ck.tokenizer, &args.prompt, layer, head)?;
    let text = match args.format {
        Format::Table => {
            let to_terminal = args.out.is_none() && std::io::stdout().is_terminal();
            let width = std::env::var("COLUMNS")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(120);
            to_table(&maps, width, to_terminal)
        }
        Format::Dot => to_dot(&maps, args.threshold),
        Format::Json => maps.to_json() + "\n",
        Format::Png | Format::Svg => {
            let out = args
                .out
                .as_deref()
                .unwrap_or(std::path::Path::new("attention.png"));
            let fmt = if matches!(args.format, Format::Png) {
                ImageFormat::Png
            } else {
                ImageFormat::Svg
            };
            let (w, h) = write_heatmap(&maps, out, fmt)?;
            eprintln!("wrote {} ({w}×{h})", out.display());
            return Ok(());
        }
    };
    match &args.out {
        Some(p) => std::fs::write(p, text).map_err(|e| Error::io(p, e)),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}
