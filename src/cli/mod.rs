//! The command line: one file per subcommand. `main.rs` only calls [`main`].

mod attention;
mod attribute;
mod bench;
mod eval;
mod export;
mod generate;
mod heads;
mod import;
mod inspect;
mod logits;
mod patch;
pub mod plot;
mod prepare;
mod serve;
mod tokenize;
mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::dist::{Comm, Session};
use crate::engine::device::DeviceChoice;
use crate::engine::{Engine, EngineChoice};
use crate::error::{Error, Result};
use crate::model::Precision;
use crate::run::checkpoint::Checkpoint;
use crate::run::context::RunContext;

/// Train, sample and inspect a tiny GPT.
#[derive(Debug, Parser)]
#[command(name = "tinygpt", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tokenize files, folders, globs, .gz and JSON Lines once into token shards to train on.
    Prepare(prepare::PrepareArgs),
    /// Train a model on a text corpus or a prepared folder (or resume a run).
    Train(train::TrainArgs),
    /// Loss, perplexity and bits per byte of a checkpoint on every token of a split.
    Eval(eval::EvalArgs),
    /// Generate text from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Show a checkpoint's config, sizes, losses and weights.
    Inspect(inspect::InspectArgs),
    /// Show the tokens and ids a text becomes.
    Tokenize(tokenize::TokenizeArgs),
    /// Show a model's attention on a prompt: table, Graphviz graph, heatmap or JSON.
    Attention(attention::AttentionArgs),
    /// What each head does: ablation, previous-token, current-token, induction, sink and
    /// entropy scores.
    Heads(heads::HeadsArgs),
    /// Patch each head from a clean prompt into a corrupted one: what restores the answer.
    Patch(patch::PatchArgs),
    /// Take a next token's logit apart: what each head and MLP writes into it directly.
    Attribute(attribute::AttributeArgs),
    /// Draw a run's loss curves from its metrics.csv.
    Plot(plot::PlotArgs),
    /// The model's next-token logits at every position of a prompt.
    Logits(logits::LogitsArgs),
    /// Write a checkpoint as a transformers GPT-2 folder or a llama.cpp GGUF file.
    Export(export::ExportArgs),
    /// Read a transformers GPT-2 folder into a tinygpt checkpoint.
    Import(import::ImportArgs),
    /// Serve a page that shows inside a checkpoint: attention, the formula step by step, the
    /// next token, the logit lens, what each head does.
    Serve(serve::ServeArgs),
    /// Measure training and sampling speed, peak memory and MFU for a config.
    Bench(bench::BenchArgs),
}

/// Keeps freed memory in the process instead of handing it back to the OS after every step.
/// Training allocates and frees the same activation-sized buffers each step; glibc serves
/// those above its (adaptive) mmap threshold with fresh pages, and every page costs a fault
/// and a zeroing, a tenth of a small step's time. A fixed threshold of 1 GiB and no trimming
/// make the heap reuse them.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Parses the arguments, runs the command and turns any error into one line on stderr.
pub fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap formats help, version and usage errors itself.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Training, eval and bench join the ranks an MPI launcher started (one process otherwise);
    // MPI is finalised when `session` is dropped, after the command.
    let session = match &cli.command {
        Command::Train(_) | Command::Eval(_) | Command::Bench(_) => match Session::start() {
            Ok(s) => s,
            Err(e) => return report(Err(e), &Comm::single()),
        },
        _ => Session::single(),
    };
    let comm = session.comm.clone();
    let result = match cli.command {
        Command::Prepare(a) => prepare::run(a),
        Command::Train(a) => train::run(a, &comm),
        Command::Eval(a) => eval::run(a, &comm),
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Attention(a) => attention::run(a),
        Command::Heads(a) => heads::run(a),
        Command::Patch(a) => patch::run(a),
        Command::Attribute(a) => attribute::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Export(a) => export::run(a),
        Command::Import(a) => import::run(a),
        Command::Serve(a) => serve::run_serve(a),
        Command::Bench(a) => bench::run(a, &comm),
    };
    // `session` lives to here: MPI is finalised after the report.
    report(result, &comm)
}

/// The exit code of a command's `result`, its error printed as one line on stderr. Among
/// ranks, an error every rank reached at the same point (a start-up they agreed on, a
/// divergence, a signal) is printed by rank 0 alone; any other error is this rank's own, so
/// it is printed with the rank and ends the whole job, which would otherwise wait for it.
fn report(result: Result<()>, comm: &Comm) -> ExitCode {
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    let code = e.exit_code();
    match e {
        Error::OtherRank { .. } => {}
        _ if comm.size() == 1 => print_error(&e),
        Error::Agreed(e) if comm.is_root() => print_error(&e),
        Error::Agreed(e) => eprintln!("error: rank {}: {e}", comm.rank()),
        Error::Interrupted { .. } | Error::Diverged { .. } if comm.is_root() => print_error(&e),
        Error::Interrupted { .. } | Error::Diverged { .. } => {}
        e => {
            eprintln!("error: rank {}: {e}", comm.rank());
            comm.abort(code);
        }
    }
    ExitCode::from(code)
}

/// `e` as one line: an interruption as it is (it is not a failure), anything else after
/// "error: ".
fn print_error(e: &Error) {
    match e {
        Error::Interrupted { .. } => eprintln!("{e}"),
        e => eprintln!("error: {e}"),
    }
}

/// The checkpoint a user means by `dir`: a checkpoint directory itself, or a run directory's
/// `best/` (else `last/`).
pub(crate) fn checkpoint_dir(dir: &Path) -> PathBuf {
    use crate::run::checkpoint::resolve;
    if resolve(dir).join("model.safetensors").exists() {
        return dir.to_path_buf();
    }
    for sub in ["best", "last"] {
        let d = dir.join(sub);
        if resolve(&d).join("model.safetensors").exists() {
            return d;
        }
    }
    dir.to_path_buf()
}

/// Loads the checkpoint a user named.
pub(crate) fn load_checkpoint(dir: &Path) -> Result<Checkpoint> {
    crate::run::checkpoint::load(&checkpoint_dir(dir), &candle_core::Device::Cpu)
}

/// Which part of a corpus: the run's held-out tail (val) or the rest (train).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum SplitArg {
    Train,
    Val,
}

/// `--data` and `--split`, on the commands that read a checkpoint's corpus.
#[derive(Debug, Clone, Args)]
pub(crate) struct CorpusArg {
    /// Corpus to read instead of the run's own (its config's data.path).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Which part of the corpus: the run's held-out tail (val) or the rest (train).
    #[arg(long, value_enum, default_value = "val")]
    pub split: SplitArg,
}

impl CorpusArg {
    /// The corpus `ck` was trained on (or `--data`), split as its run split it, and its path.
    pub(crate) fn load(
        &self,
        ck: &Checkpoint,
        progress: crate::progress::ProgressMode,
    ) -> Result<(crate::data::corpus::Dataset, PathBuf)> {
        let cfg = &ck.config;
        let path = self.data.clone().unwrap_or_else(|| cfg.data.path.clone());
        let (val, block) = (cfg.training.val_fraction, cfg.model.block_size);
        let data = crate::data::corpus::load_for(&ck.tokenizer, &path, val, block, progress)?;
        Ok((data, path))
    }

    /// The split, and its name as reports spell it.
    pub(crate) fn split(&self) -> (crate::data::corpus::Split, &'static str) {
        match self.split {
            SplitArg::Train => (crate::data::corpus::Split::Train, "train"),
            SplitArg::Val => (crate::data::corpus::Split::Val, "val"),
        }
    }
}

/// `--engine` and `--device`, on every command that runs a model.
#[derive(Debug, Clone, Copy, Args)]
pub(crate) struct EngineArg {
    /// What runs the model: `fused` (tinygpt's CPU kernels), `reference` (candle's composed
    /// ops) or `auto` (fused when it supports every option of the model, else reference).
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    /// Where the model runs: `cpu`, `cuda` (the first GPU), `cuda:N`, or `auto` (a GPU when
    /// this binary has CUDA and one answers, else the CPU).
    #[arg(long, default_value_t = DeviceChoice::Auto, value_name = "DEVICE")]
    pub device: DeviceChoice,
}

impl EngineArg {
    /// The same choice for a rank of a data-parallel job: its own GPU on a host with several.
    pub(crate) fn for_rank(self, comm: &Comm) -> EngineArg {
        EngineArg {
            device: self.device.for_local_rank(comm.local_rank()),
            ..self
        }
    }
}

/// Loads the checkpoint a user named onto the device `arg` asks for, with the engine it
/// resolves to ([`load_with_context`]).
pub(crate) fn load_with_engine(dir: &Path, arg: EngineArg) -> Result<(Checkpoint, Engine)> {
    let (ck, ctx) = load_with_context(dir, arg)?;
    let engine = ctx.engine.engine(&ck.model, false)?;
    Ok((ck, engine))
}

/// The checkpoint a user named and the run context of a command on it, started once (a note
/// when `auto` passes over the fused kernels, the thread counts set). The device is resolved
/// first: a GPU that does not answer fails before any file is read.
pub(crate) fn load_with_context(dir: &Path, arg: EngineArg) -> Result<(Checkpoint, RunContext)> {
    let device = arg.device.resolve()?;
    let ck = crate::run::checkpoint::load(&checkpoint_dir(dir), &device)?;
    let ctx = RunContext::start(&device, arg.engine, &ck.config.model, Precision::F32)?;
    Ok((ck, ctx))
}

/// Reads a prompt file, naming the problem.
pub(crate) fn read_text_file(path: &Path, what: &str) -> Result<String> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::Usage(format!("{what} {}: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::Usage(format!(
            "{what} {} is not valid UTF-8 (first bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}
