//! `tinygpt train`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use candle_core::Device;
use clap::{Args, ValueEnum};

use crate::engine::device::DeviceChoice;
use crate::engine::EngineChoice;
use crate::error::{Error, Result};
use crate::rng::seeded;
use crate::run::config::Config;
use crate::run::context::{RunContext, RunDir};
use crate::sample::{generate, SampleOptions};
use crate::train::{ProgressMode, RunOptions, Trainer};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Config file (configs/*.toml). Optional with --resume, which uses the checkpoint's.
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Corpus to train on, instead of the config's data.path.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory (default: checkpoints/<config name>/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this run directory (or checkpoint directory) exactly where it stopped.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start a new run from this checkpoint's weights and tokenizer (fine-tuning, fresh
    /// optimizer), e.g. one written by `tinygpt import`. The config's [model] must match it.
    #[arg(long, conflicts_with = "resume", value_name = "CKPT")]
    init_from: Option<PathBuf>,
    /// Override a config key, e.g. --set training.max_iters=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Overwrite a run directory that already holds checkpoints.
    #[arg(long)]
    force: bool,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
    /// Tokens of sample text to print at the end (0 for none).
    #[arg(long, default_value_t = 200)]
    sample_tokens: usize,
    /// What runs the model: `fused` (tinygpt's CPU kernels), `reference` (candle's composed
    /// ops) or `auto` (fused when it supports every option of the model). Default: the
    /// config's training.engine (`auto` unless set; a resumed run keeps its own).
    #[arg(long, value_enum)]
    engine: Option<EngineChoice>,
    /// Where to train: `cpu`, `cuda` (the first GPU), `cuda:N`, or `auto` (a GPU when this
    /// binary has CUDA and one answers, else the CPU). Checkpoints are the same on either, so
    /// a run may resume on another device.
    #[arg(long, default_value_t = DeviceChoice::Auto, value_name = "DEVICE")]
    device: DeviceChoice,
}

/// `--engine` as a `--set` override of the run's config (spelled as the flag takes it).
fn engine_override(e: EngineChoice) -> String {
    let name = e.to_possible_value().map(|v| v.get_name().to_string());
    format!("training.engine=\"{}\"", name.unwrap_or_default())
}

/// Ctrl-C or SIGTERM: the first sets `stop` (training saves and exits 130/143); a second
/// exits at once (checkpoints are written atomically, so the last one stays intact).
fn install_signal_handlers() -> Result<Arc<AtomicUsize>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicUsize::new(0));
    let pending = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        let err = |e: std::io::Error| Error::Usage(format!("installing the signal handler: {e}"));
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&pending))
            .map_err(err)?;
        signal_hook::flag::register(sig, Arc::clone(&pending)).map_err(err)?;
        signal_hook::flag::register_usize(sig, Arc::clone(&stop), sig as usize).map_err(err)?;
    }
    Ok(stop)
}

/// A run ready to train: its context, its directory (locked) and the trainer.
struct Started {
    ctx: RunContext,
    dir: RunDir,
    trainer: Trainer,
}

/// Resumes the run `resume` names: its checkpoint's config with the overrides, the context
/// that config resolves to, the run directory locked.
fn start_resumed(
    args: &TrainArgs,
    resume: &Path,
    device: &Device,
    progress: ProgressMode,
) -> Result<Started> {
    let dir = RunDir::resume(resume, args.out.clone())?;
    let ck_dir = dir.resume.clone().unwrap_or_default();
    let ck = crate::run::checkpoint::load(&ck_dir, device)?;
    let mut overrides = args.set.clone();
    overrides.extend(args.engine.map(engine_override));
    let config = Trainer::resumed_config(&ck, &overrides, args.data.as_deref())?;
    let ctx = context_for(&config, device)?;
    let trainer = Trainer::resume(ck, config, &ctx, progress)?;
    Ok(Started { ctx, dir, trainer })
}

/// Starts a fresh run of `--config` (or from `--init-from`'s weights) in a new run directory;
/// a start that fails leaves no run directory it created behind.
fn start_fresh(args: &TrainArgs, device: &Device, progress: ProgressMode) -> Result<Started> {
    let path = args
        .config
        .as_ref()
        .ok_or_else(|| Error::Usage("--config is required unless --resume is given".into()))?;
    let mut config = Config::load(path, &args.set)?;
    if let Some(e) = args.engine {
        config.training.engine = e;
    }
    let ctx = context_for(&config, device)?;
    if let Some(d) = &args.data {
        config.data.path = d.clone();
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("checkpoints").join(name));
    let dir = RunDir::fresh(out, args.force)?;
    let trainer = match &args.init_from {
        Some(ck) => Trainer::init_from(config, &super::checkpoint_dir(ck), &ctx, progress),
        None => Trainer::new(config, &ctx, progress),
    };
    match trainer {
        Ok(trainer) => Ok(Started { ctx, dir, trainer }),
        Err(e) => Err(dir.discard(e)),
    }
}

/// The run context of a training run of `config` on `device`, started once.
fn context_for(config: &Config, device: &Device) -> Result<RunContext> {
    let t = &config.training;
    RunContext::start(device, t.engine, &config.model, t.dtype)
}

/// The line that opens a run: the model, the data, the engine and the run directory.
fn opening_line(s: &Started) -> String {
    let (t, c) = (&s.trainer, &s.trainer.config);
    format!(
        "tinygpt: {} parameters, {} tokenizer ({} tokens), {} train / {} val tokens, {} engine on {} ({}), run dir {}{}",
        t.params.count(),
        c.tokenizer.kind.name(),
        t.tokenizer.vocab_size(),
        t.dataset.len(crate::data::corpus::Split::Train),
        t.dataset.len(crate::data::corpus::Split::Val),
        s.ctx.engine.kind.name(),
        crate::engine::device::name(&s.ctx.device),
        c.training.dtype.name(),
        s.dir.path.display(),
        match &s.dir.resume {
            Some(_) => format!(", resuming at step {}", t.state.step),
            None => String::new(),
        }
    )
}

pub fn run(args: TrainArgs) -> Result<()> {
    // First: a GPU that does not answer fails before anything is read or written.
    let device = args.device.resolve()?;
    let stop = install_signal_handlers()?;
    let progress = ProgressMode::detect(args.quiet);
    // The run directory's lock is held to the end (by `started.dir`): a second writer fails.
    let mut started = match &args.resume {
        Some(resume) => start_resumed(&args, resume, &device, progress)?,
        None => start_fresh(&args, &device, progress)?,
    };
    let out = started.dir.path.clone();
    let opts = RunOptions {
        out: out.clone(),
        resume: started.dir.resume.as_ref().map(|_| out.clone()),
        progress,
        stop: Some(stop),
    };
    started.trainer.check_disk_space(&out)?;
    let say = |s: String| {
        if progress != ProgressMode::Quiet {
            println!("{s}");
        }
    };
    say(opening_line(&started));
    let trainer = &mut started.trainer;
    let summary = trainer.run(&opts)?;
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    say(format!(
        "done: {} steps, train loss {}, val loss {}, best val loss {}, {:.1} ms/iter ({:.0} tokens/s); checkpoints in {}",
        summary.steps,
        f(summary.final_train_loss),
        f(summary.final_val_loss),
        f(summary.best_val_loss),
        summary.ms_per_iter,
        summary.tokens_per_s,
        out.display()
    ));
    match super::plot::plot_run(&out, &out.join("loss.png")) {
        Ok(p) => say(format!("loss curves: {}", p.display())),
        Err(e) => eprintln!("warning: could not draw the loss curves: {e}"),
    }
    if args.sample_tokens > 0 && progress != ProgressMode::Quiet {
        print_sample(trainer, args.sample_tokens)?;
    }
    Ok(())
}

/// `n` tokens sampled from the trained model after a newline, printed between rules.
fn print_sample(trainer: &Trainer, n: usize) -> Result<()> {
    let start = trainer.tokenizer.newline_id().unwrap_or(0);
    let opts = SampleOptions {
        max_new_tokens: n,
        ..SampleOptions::default()
    };
    let mut rng = seeded(trainer.config.training.seed);
    let ids = generate(&trainer.engine, &[start], &opts, &mut rng, |_| Ok(true))?;
    println!(
        "--- sample ---\n{}\n--------------",
        trainer.tokenizer.decode(&ids)?
    );
    Ok(())
}
