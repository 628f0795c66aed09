//! `tinygpt plot`: loss curves of a run.

use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::viz::loss::{write_loss_plot, Curves};
use crate::viz::ImageFormat;

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run directory (holds metrics.csv).
    run_dir: PathBuf,
    /// Image to write (.png or .svg); default RUN_DIR/loss.png.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.run_dir.join("loss.png"));
    let written = plot_run(&args.run_dir, &out)?;
    eprintln!("wrote {}", written.display());
    Ok(())
}

/// Draws the loss curves of the run in `run_dir` to `out`.
pub fn plot_run(run_dir: &std::path::Path, out: &std::path::Path) -> Result<PathBuf> {
    let format = ImageFormat::from_path(out)?;
    let csv = run_dir.join("metrics.csv");
    let text = std::fs::read_to_string(&csv).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Usage(format!(
                "{} has no metrics.csv; pass a run directory (e.g. checkpoints/shakespeare-char)",
                run_dir.display()
            ))
        } else {
            Error::io(&csv, e)
        }
    })?;
    let curves = Curves::parse(&text, &csv)?;
    // tokens per step, from the run's config when there is one
    let tokens = ["last", "best"].iter().find_map(|d| {
        let cfg = std::fs::read_to_string(
            crate::run::checkpoint::resolve(&run_dir.join(d)).join("config.toml"),
        )
        .ok()?;
        let c = crate::run::config::Config::parse(&cfg, &[]).ok()?;
        Some((c.training.batch_size * c.model.block_size * c.training.grad_accum_steps) as f64)
    });
    // Drawn beside `out` and renamed over it: a training run and a `plot` may draw the same
    // file at once, and neither leaves the other a torn image.
    let name = out
        .file_name()
        .map_or("loss".into(), |n| n.to_string_lossy().into_owned());
    let ext = out
        .extension()
        .map_or("png".into(), |e| e.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{name}.{}.tmp.{ext}", std::process::id()));
    write_loss_plot(&curves, tokens, &tmp, format).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(out.to_path_buf())
}
