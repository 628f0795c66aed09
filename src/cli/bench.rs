//! `tinygpt bench`.

use std::path::PathBuf;

use clap::Args;

use crate::dist::Comm;
use crate::engine::device::DeviceChoice;
use crate::engine::EngineChoice;
use crate::error::{Error, Result};
use crate::model::Precision;
use crate::run::config::Config;
use crate::run::context::RunContext;
use crate::train::bench::{self, BenchOptions};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Config to measure.
    #[arg(long, default_value = "configs/shakespeare-char.toml")]
    config: PathBuf,
    /// Train on this corpus instead of random tokens.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Timed training steps (the median is reported).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Untimed training steps before timing.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Tokens generated per sampling measurement.
    #[arg(long, default_value_t = 500)]
    gen_tokens: usize,
    /// Override a config key, e.g. --set model.n_embd=256 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// What runs the model: `fused`, `reference` or `auto` (default: the config's
    /// training.engine, itself `auto` unless set).
    #[arg(long, value_enum)]
    engine: Option<EngineChoice>,
    /// Where to measure: `cpu`, `cuda`, `cuda:N` or `auto` (a GPU when there is one).
    #[arg(long, default_value_t = DeviceChoice::Auto, value_name = "DEVICE")]
    device: DeviceChoice,
    /// The matrix products' dtype (default: the config's training.dtype, `f32` unless set).
    #[arg(long, value_enum)]
    dtype: Option<Precision>,
}

/// Measures; under `mpirun` every rank trains its share of each step and rank 0 reports.
pub fn run(args: BenchArgs, comm: &Comm) -> Result<()> {
    let mut config = Config::load(&args.config, &args.set)?;
    if let Some(e) = args.engine {
        config.training.engine = e;
    }
    if let Some(d) = args.dtype {
        config.training.dtype = d;
    }
    let device = comm.agree(args.device.for_local_rank(comm.local_rank()).resolve())?;
    let t = &config.training;
    let ctx = RunContext::start(&device, t.engine, &config.model, t.dtype)?;
    let ctx = RunContext {
        comm: comm.clone(),
        ..ctx
    };
    comm.join_device(&device)?;
    let opts = BenchOptions {
        iters: args.iters,
        warmup: args.warmup,
        gen_tokens: args.gen_tokens,
        ctx,
    };
    let quiet = args.json || !comm.is_root();
    let report = bench::run(config, args.data.as_deref(), &opts, |s| {
        if !quiet {
            eprintln!("bench: {s}");
        }
    })?;
    if !comm.is_root() {
        return Ok(());
    }
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Usage(format!("writing JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
