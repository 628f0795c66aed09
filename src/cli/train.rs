//! `tinygpt train`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use candle_core::Device;
use clap::{Args, ValueEnum};

use crate::dist::Comm;
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
    comm: &Comm,
    progress: ProgressMode,
) -> Result<Started> {
    let dir = match comm.is_root() {
        true => RunDir::resume(resume, args.out.clone())?,
        false => RunDir::resume_follower(resume, args.out.clone()),
    };
    let ck_dir = dir.resume.clone().unwrap_or_default();
    let ck = crate::run::checkpoint::load(&ck_dir, device)?;
    let mut overrides = args.set.clone();
    overrides.extend(args.engine.map(engine_override));
    let config = Trainer::resumed_config(&ck, &overrides, args.data.as_deref())?;
    if let Some(note) = ck.state.as_ref().and_then(|s| s.legacy_note()) {
        if comm.is_root() {
            eprintln!("{note}");
        }
    }
    let ctx = context_for(&config, device, comm)?;
    let trainer = Trainer::resume(ck, config, &ctx, progress)?;
    Ok(Started { ctx, dir, trainer })
}

/// Starts a fresh run of `--config` (or from `--init-from`'s weights) in a new run directory;
/// a start that fails leaves no run directory it created behind.
fn start_fresh(
    args: &TrainArgs,
    device: &Device,
    comm: &Comm,
    progress: ProgressMode,
) -> Result<Started> {
    let path = args
        .config
        .as_ref()
        .ok_or_else(|| Error::Usage("--config is required unless --resume is given".into()))?;
    let mut config = Config::load(path, &args.set)?;
    if let Some(e) = args.engine {
        config.training.engine = e;
    }
    let ctx = context_for(&config, device, comm)?;
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
    let dir = match comm.is_root() {
        true => RunDir::fresh(out, args.force)?,
        false => RunDir::fresh_follower(out),
    };
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
fn context_for(config: &Config, device: &Device, comm: &Comm) -> Result<RunContext> {
    let t = &config.training;
    let ctx = RunContext::start(device, t.engine, &config.model, t.dtype)?;
    Ok(RunContext {
        comm: comm.clone(),
        ..ctx
    })
}

/// The checks a run makes once it is ready, before its first step: the accumulation steps
/// divide among the ranks, and (rank 0) the disk holds its checkpoints.
fn check_ready(s: &Started) -> Result<()> {
    s.trainer.micro_batches()?;
    if s.ctx.comm.is_root() {
        s.trainer.check_disk_space(&s.dir.path)?;
    }
    Ok(())
}

/// With several ranks: checks that every rank holds the same run ([`digest`]) and joins the
/// GPUs' communicator when there is one.
fn join_ranks(s: &Started, comm: &Comm, device: &Device) -> Result<()> {
    if comm.size() > 1 {
        let d = comm.agree(digest(&s.trainer))?;
        comm.check_same("config, tokenizer, data or weights", d)?;
        comm.join_device(device)?;
    }
    Ok(())
}

/// A digest of what every rank must hold alike: the config, the tokenizer, the data's size,
/// the weights and the step.
fn digest(t: &Trainer) -> Result<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.config.to_toml()?.hash(&mut h);
    // Written in a fixed order: checkpoints hold the same tokenizer.json bytes run after run.
    t.tokenizer.to_json()?.hash(&mut h);
    for split in [
        crate::data::corpus::Split::Train,
        crate::data::corpus::Split::Val,
    ] {
        t.dataset.len(split).hash(&mut h);
    }
    t.state.step.hash(&mut h);
    let vars = t.params.vars();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        name.hash(&mut h);
        let v = vars[name]
            .as_tensor()
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?;
        let bytes: Vec<u8> = v
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        h.write(&bytes);
    }
    Ok(h.finish())
}

/// ", on N ranks × T threads" for a data-parallel run; nothing for one process.
fn ranks(ctx: &RunContext) -> String {
    let (c, exact) = (&ctx.comm, ctx.comm.exact());
    match c.size() {
        1 => String::new(),
        n => format!(
            ", {n} ranks × {} threads (gradients summed {})",
            ctx.threads,
            if exact {
                "bitwise as one process"
            } else {
                "within float rounding of one process"
            }
        ),
    }
}

/// The line that opens a run: the model, the data, the engine and the run directory.
fn opening_line(s: &Started) -> String {
    let (t, c) = (&s.trainer, &s.trainer.config);
    format!(
        "tinygpt: {} parameters, {} tokenizer ({} tokens), {} train / {} val tokens, {} engine on {} ({}), run dir {}{}{}",
        t.params.count(),
        c.tokenizer.kind.name(),
        t.tokenizer.vocab_size(),
        t.dataset.len(crate::data::corpus::Split::Train),
        t.dataset.len(crate::data::corpus::Split::Val),
        s.ctx.engine.kind.name(),
        crate::engine::device::name(&s.ctx.device),
        c.training.dtype.name(),
        s.dir.path.display(),
        ranks(&s.ctx),
        match &s.dir.resume {
            Some(_) => format!(", resuming at step {}", t.state.step),
            None => String::new(),
        }
    )
}

pub fn run(args: TrainArgs, comm: &Comm) -> Result<()> {
    // First: a GPU that does not answer fails before anything is read or written.
    let device = args.device.for_local_rank(comm.local_rank()).resolve();
    let device = comm.agree(device)?;
    let stop = install_signal_handlers()?;
    let progress = ProgressMode::for_rank(args.quiet, comm.rank(), comm.size());
    // The run directory's lock is held to the end (by `started.dir`): a second writer fails.
    let started = match &args.resume {
        Some(resume) => start_resumed(&args, resume, &device, comm, progress),
        None => start_fresh(&args, &device, comm, progress),
    };
    let started = started.and_then(|s| match check_ready(&s) {
        Ok(()) => Ok(s),
        Err(e) => Err(s.dir.discard(e)),
    });
    // Every rank waits here for the others' start: a failure anywhere ends them all, and a
    // run directory rank 0 created for this run goes again.
    let mut started = match started {
        Ok(s) => s,
        Err(e) => return Err(comm.agree::<()>(Err(e)).unwrap_err()),
    };
    if let Err(e) = comm
        .agree(Ok(()))
        .and_then(|_| join_ranks(&started, comm, &device))
    {
        return Err(started.dir.discard(e));
    }
    let out = started.dir.path.clone();
    let opts = RunOptions {
        out: out.clone(),
        resume: started.dir.resume.as_ref().map(|_| out.clone()),
        progress,
        stop: Some(stop),
    };
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
    if !comm.is_root() {
        return Ok(());
    }
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
