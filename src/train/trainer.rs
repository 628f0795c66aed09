//! The training loop: batches → loss → backward → clip → AdamW, with evaluation, metrics and
//! checkpoints. Every micro-batch draws from a stream addressed by its step and index
//! ([`crate::rng::micro_batch`]), so N steps in one go and N/2 + resume + N/2 give identical
//! weights, and so do the same steps split over ranks ([`crate::dist`]): each rank runs a
//! contiguous block of the step's micro-batches, the gradients are summed in one fixed tree
//! ([`crate::dist::tree`]), and every rank takes the same optimizer step. Rank 0 alone writes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;

use candle_core::{Device, Tensor};

use super::optimizer::{global_norm, Optimizer};
use super::schedule::learning_rate;
use crate::data::corpus::{load_for, read_corpus, Dataset, Split};
use crate::data::shards::Prepared;
use crate::data::tokenizer::Tokenizer;
use crate::data::tokenizer::TokenizerKind;
use crate::dist::tree::tree_sum;
use crate::dist::Comm;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::{Gpt, Params};
use crate::progress::{Progress, ProgressMode};
use crate::rng::{eval_batch, micro_batch, seeded};
use crate::run::checkpoint::{self, Checkpoint, LossPoint, TrainState, STATE_VERSION};
use crate::run::config::Config;
use crate::run::context::RunContext;

/// Header of `metrics.csv`.
pub const METRICS_HEADER: &str = "step,train_loss,val_loss,lr,tokens_per_s,elapsed_s";

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run directory: `last/`, `best/`, `metrics.csv` go here.
    pub out: PathBuf,
    /// Continue from this checkpoint (its config, weights, optimizer and RNG).
    pub resume: Option<PathBuf>,
    pub progress: ProgressMode,
    /// Set (to the signal number) to stop after the current step, save `last/` and return
    /// [`Error::Interrupted`].
    pub stop: Option<Arc<AtomicUsize>>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub out: PathBuf,
    pub steps: usize,
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    /// Median wall time of one optimizer step, in milliseconds.
    pub ms_per_iter: f64,
    pub tokens_per_s: f64,
}

/// Everything a running training job holds.
pub struct Trainer {
    pub config: Config,
    pub tokenizer: Tokenizer,
    /// The reference model, whose weights are the run's parameters.
    pub model: Gpt,
    /// What runs `model` for training and evaluation, chosen once from `training.engine`.
    pub engine: Engine,
    pub params: Params,
    pub optimizer: Optimizer,
    pub state: TrainState,
    pub dataset: Dataset,
    /// This process's place among the ranks (one rank outside `mpirun`).
    pub comm: Comm,
    /// Seconds spent summing gradients across ranks, over the run so far.
    pub reduce_s: f64,
    device: Device,
}

/// One parameter gradient per optimizer name, `None` where the loss does not reach it.
type Grads = Vec<Option<Tensor>>;

/// Bytes free for an unprivileged user on the filesystem holding `dir`, if the OS says.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into the zeroed struct we pass; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (r == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

impl Trainer {
    /// Bytes one checkpoint takes on disk (weights and both AdamW moments), roughly.
    pub fn checkpoint_bytes(&self) -> u64 {
        3 * 4 * self.params.count() as u64 + 1_000_000
    }

    /// Refuses to start when the disk under `out` cannot hold the run's checkpoints
    /// (`last/`, `best/` and the temporary copy written before each swap).
    pub fn check_disk_space(&self, out: &Path) -> Result<()> {
        let need = 3 * self.checkpoint_bytes();
        match free_bytes(out) {
            Some(free) if free < need => Err(Error::Usage(format!(
                "not enough disk space in {}: checkpoints need about {} MB, {} MB are free; free some space or pass another --out",
                out.display(),
                need / 1_000_000 + 1,
                free / 1_000_000
            ))),
            _ => Ok(()),
        }
    }

    /// A fresh run of `config` (tokenizer trained on the corpus, weights from the seed).
    /// A prepared folder (`tinygpt prepare`) brings its own tokenizer, which must be of the
    /// config's kind (and, for BPE, size).
    pub fn new(config: Config, ctx: &RunContext, progress: ProgressMode) -> Result<Trainer> {
        let path = &config.data.path;
        if crate::data::shards::is_prepared(path) {
            let prepared = Prepared::open(path)?;
            let tokenizer = prepared.tokenizer()?;
            let (want, got) = (&config.tokenizer, &prepared.manifest.tokenizer);
            // A BPE vocabulary may come out smaller than asked for: either size matches.
            let asked = prepared.manifest.options["tokenizer"]["train"]["vocab_size"].as_u64();
            let size_ok =
                want.vocab_size == got.vocab_size || Some(want.vocab_size as u64) == asked;
            if want.kind != got.kind || (want.kind == TokenizerKind::Bpe && !size_ok) {
                return Err(Error::Config(format!(
                    "{} was prepared with a {} tokenizer of {} tokens, but the config asks for {}; set tokenizer.kind (and tokenizer.vocab_size) to match, or prepare it again",
                    path.display(),
                    got.kind.name(),
                    got.vocab_size,
                    match want.kind {
                        TokenizerKind::Bpe => format!("bpe of {} tokens", want.vocab_size),
                        TokenizerKind::Char => "char".into(),
                    }
                )));
            }
            let dataset = Dataset::from_prepared(prepared, config.model.block_size)?;
            return Trainer::from_parts(config, tokenizer, dataset, ctx);
        }
        let text = read_corpus(path)?;
        let tokenizer =
            Tokenizer::train(config.tokenizer.kind, &text, config.tokenizer.vocab_size)?;
        let dataset = make_dataset(&config, &tokenizer, &text, progress)?;
        drop(text);
        Trainer::from_parts(config, tokenizer, dataset, ctx)
    }

    /// [`Trainer::new`] on `device`, with the context its config's `training.engine` and
    /// `training.dtype` resolve to ([`RunContext::for_training`]): for library callers and
    /// tests, which set nothing process-wide.
    pub fn on_device(config: Config, device: &Device, progress: ProgressMode) -> Result<Trainer> {
        let ctx = RunContext::for_training(&config, device)?;
        Trainer::new(config, &ctx, progress)
    }

    /// A fresh run of `config` on an already tokenized `dataset`.
    pub fn from_parts(
        config: Config,
        tokenizer: Tokenizer,
        dataset: Dataset,
        ctx: &RunContext,
    ) -> Result<Trainer> {
        let device = &ctx.device;
        let mut params = Params::fresh(seeded(config.training.seed), device);
        let vocab = tokenizer.vocab_size();
        let model = params.build(|vb| Gpt::new(&config.model, vocab, vb))?;
        let engine = ctx
            .engine
            .engine(&model, config.training.recompute_activations)?;
        let optimizer = Optimizer::new(params.vars(), &config.training)?;
        let state = TrainState {
            format_version: STATE_VERSION,
            step: 0,
            best_val_loss: None,
            elapsed_s: 0.0,
            history: Vec::new(),
        };
        Ok(Trainer {
            config,
            tokenizer,
            model,
            engine,
            params,
            optimizer,
            state,
            dataset,
            comm: ctx.comm.clone(),
            reduce_s: 0.0,
            device: device.clone(),
        })
    }

    /// A new run of `config` that starts from the weights of checkpoint `dir` (fine-tuning):
    /// the checkpoint's tokenizer encodes the corpus, the optimizer starts fresh. The config's
    /// `[model]` must describe the checkpoint's model; only `dropout`, `zero_init` (which
    /// changes nothing once weights are given) may differ.
    pub fn init_from(
        mut config: Config,
        dir: &Path,
        ctx: &RunContext,
        progress: ProgressMode,
    ) -> Result<Trainer> {
        let ck = checkpoint::load(dir, &ctx.device)?;
        let mut want = ck.config.model.clone();
        let m = &config.model;
        (want.dropout, want.zero_init) = (m.dropout, m.zero_init);
        if want != config.model {
            let ours = toml::to_string(&config.model).unwrap_or_default();
            let theirs = toml::to_string(&want).unwrap_or_default();
            let diff: Vec<String> = ours
                .lines()
                .zip(theirs.lines())
                .filter(|(a, b)| a != b)
                .map(|(a, b)| format!("model.{a} but the checkpoint has {b}"))
                .collect();
            return Err(Error::Config(format!(
                "--init-from {}: the config's [model] does not match the checkpoint's weights ({}); copy [model] from {}",
                ck.dir.display(),
                diff.join("; "),
                ck.dir.join("config.toml").display()
            )));
        }
        if config.tokenizer.kind != ck.tokenizer.kind() {
            return Err(Error::Config(format!(
                "--init-from {}: the checkpoint's tokenizer is {:?} but the config says tokenizer.kind = {:?}; set it to match",
                ck.dir.display(),
                ck.tokenizer.kind(),
                config.tokenizer.kind
            )));
        }
        config.tokenizer = ck.config.tokenizer.clone();
        let dataset = dataset_for(&config, &ck.tokenizer, progress)?;
        let trainer = Trainer::from_parts(config, ck.tokenizer, dataset, ctx)?;
        for (name, var) in trainer.params.vars() {
            // Same names and shapes: the configs agree and both checkpoints were built by Gpt::new.
            var.set(ck.params.vars()[name].as_tensor())?;
        }
        Ok(trainer)
    }

    /// The config a resumed run of checkpoint `ck` trains with: the checkpoint's own, with
    /// `overrides` (e.g. `training.max_iters` to train longer) and `data` applied; the model and
    /// tokenizer settings may not change.
    pub fn resumed_config(
        ck: &Checkpoint,
        overrides: &[String],
        data: Option<&Path>,
    ) -> Result<Config> {
        let mut config = if overrides.is_empty() {
            ck.config.clone()
        } else {
            let text = ck.config.to_toml()?;
            Config::parse(&text, overrides)?
        };
        if config.model != ck.config.model || config.tokenizer != ck.config.tokenizer {
            return Err(Error::Config(
                "a resumed run keeps its model and tokenizer settings; only [training] and [data] may be overridden".into(),
            ));
        }
        if let Some(p) = data {
            config.data.path = p.to_path_buf();
        }
        Ok(config)
    }

    /// Continues the run saved in checkpoint `ck` (loaded onto `ctx.device`) exactly where it
    /// stopped, with `config` from [`Trainer::resumed_config`].
    pub fn resume(
        ck: Checkpoint,
        config: Config,
        ctx: &RunContext,
        progress: ProgressMode,
    ) -> Result<Trainer> {
        let mut state = ck.state.clone().ok_or_else(|| {
            Error::checkpoint(&ck.dir, "state.json is missing, so this checkpoint cannot be resumed (it can still be used to generate)")
        })?;
        // From here on it is this build's run, drawn as this build draws (an older state's
        // one stream is left behind; `TrainState::legacy_note`).
        state.format_version = STATE_VERSION;
        let dataset = dataset_for(&config, &ck.tokenizer, progress)?;
        let mut optimizer = Optimizer::new(ck.params.vars(), &config.training)?;
        let opt_state = checkpoint::load_optimizer(&ck.dir, &ck.params, &ctx.device)?;
        optimizer.load_state(&opt_state)?;
        let model = ck.model;
        let engine = ctx
            .engine
            .engine(&model, config.training.recompute_activations)?;
        Ok(Trainer {
            config,
            tokenizer: ck.tokenizer,
            model,
            engine,
            params: ck.params,
            optimizer,
            state,
            dataset,
            comm: ctx.comm.clone(),
            reduce_s: 0.0,
            device: ctx.device.clone(),
        })
    }

    /// Mean loss over `eval_iters` batches of each split (dropout off). Batch j draws from a
    /// stream of its own, fixed by seed, step, split and j, so evaluating (or not) never
    /// changes training, and the ranks can share the batches out: each evaluates a
    /// contiguous block, and the losses are added in batch order, the same on any number of
    /// ranks.
    pub fn evaluate(&self) -> Result<(f64, f64)> {
        let t = &self.config.training;
        let n = t.eval_iters;
        let mut losses = vec![0.0f64; 2 * n];
        for (s, split) in [Split::Train, Split::Val].into_iter().enumerate() {
            for j in self.comm.share(n) {
                let mut rng = eval_batch(t.seed, self.state.step, s, j);
                let block = self.config.model.block_size;
                let (x, y) =
                    self.dataset
                        .batch(split, t.batch_size, block, &mut rng, &self.device)?;
                losses[s * n + j] = self.engine.loss(&x, &y)?;
            }
        }
        self.comm.sum_f64(&mut losses)?;
        let mean = |l: &[f64]| l.iter().sum::<f64>() / n as f64;
        Ok((mean(&losses[..n]), mean(&losses[n..])))
    }

    /// The micro-batches of a step this rank runs: its contiguous share of
    /// `grad_accum_steps`, which must divide among the ranks.
    pub fn micro_batches(&self) -> Result<std::ops::Range<usize>> {
        let (a, size) = (self.config.training.grad_accum_steps, self.comm.size());
        if !a.is_multiple_of(size) {
            return Err(Error::Config(format!(
                "training.grad_accum_steps = {a} does not divide among {size} ranks; set it to a multiple of {size} (it counts the micro-batches of a step over all ranks; e.g. --set training.grad_accum_steps={}, with training.batch_size divided to keep the batch)",
                a.div_ceil(size) * size
            )));
        }
        Ok(self.comm.share(a))
    }

    /// One optimizer step over `grad_accum_steps` micro-batches; returns the mean loss.
    pub fn train_step(&mut self) -> Result<f64> {
        let t = self.config.training.clone();
        let a = t.grad_accum_steps;
        let mut losses = vec![0.0f64; a];
        let mine = self.micro_batches()?;
        let grads = tree_sum(
            mine.start,
            mine.end,
            &mut |i| {
                let (loss, grads) = self.micro_batch_grads(i)?;
                losses[i] = loss;
                Ok(grads)
            },
            &add_grads,
        )?;
        self.comm.sum_f64(&mut losses)?;
        if losses.iter().any(|l| !l.is_finite()) {
            return Err(non_finite(self.state.step + 1, "loss", t.learning_rate));
        }
        let grads = self.sum_across_ranks(grads)?;
        let norm = global_norm(&grads)?;
        if !norm.is_finite() {
            return Err(non_finite(
                self.state.step + 1,
                "gradient norm",
                t.learning_rate,
            ));
        }
        let grad_scale = if t.grad_clip > 0.0 && norm > t.grad_clip {
            (t.grad_clip / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        let lr = learning_rate(&t, self.state.step);
        self.optimizer.step(&grads, grad_scale, lr)?;
        self.state.step += 1;
        Ok(losses.iter().sum::<f64>() / a as f64)
    }

    /// The loss of micro-batch `i` of the coming step and its gradients, scaled by
    /// 1 / `grad_accum_steps`.
    fn micro_batch_grads(&self, i: usize) -> Result<(f64, Grads)> {
        let t = &self.config.training;
        let mut rng = micro_batch(t.seed, self.state.step, i);
        let block = self.config.model.block_size;
        let (x, y) =
            self.dataset
                .batch(Split::Train, t.batch_size, block, &mut rng, &self.device)?;
        let (loss, store) = self
            .engine
            .loss_and_grads(&x, &y, &mut rng, t.grad_accum_steps)?;
        let vars = self.params.vars();
        let grads = self
            .optimizer
            .names()
            .map(|name| store.get(vars[name].as_tensor()).cloned())
            .collect();
        Ok((loss, grads))
    }

    /// The ranks' gradients summed, on every rank: one flat buffer, one all-reduce
    /// ([`Comm::sum_tensor`]: NCCL between GPUs, MPI through host memory otherwise).
    fn sum_across_ranks(&mut self, grads: Grads) -> Result<Grads> {
        if self.comm.size() == 1 {
            return Ok(grads);
        }
        let t0 = Instant::now();
        let parts = grads
            .iter()
            .flatten()
            .map(|g| g.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = self.comm.sum_tensor(&Tensor::cat(&parts, 0)?)?;
        let mut at = 0;
        let summed = grads
            .into_iter()
            .map(|g| {
                g.map(|g| {
                    let n = g.elem_count();
                    at += n;
                    flat.narrow(0, at - n, n)?
                        .reshape(g.shape())?
                        .to_dtype(g.dtype())
                })
                .transpose()
            })
            .collect::<candle_core::Result<Grads>>()?;
        self.device.synchronize()?;
        self.reduce_s += t0.elapsed().as_secs_f64();
        Ok(summed)
    }

    /// Saves the run's state to `dir` atomically; on failure the previous checkpoint in `dir`
    /// is left as it was. Only rank 0 writes; on the other ranks this does nothing.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if !self.comm.is_root() {
            return Ok(());
        }
        self.save_inner(dir).map_err(|e| Error::Save {
            dir: dir.to_path_buf(),
            step: self.state.step,
            source: Box::new(e),
        })
    }

    fn save_inner(&self, dir: &Path) -> Result<()> {
        let opt = self.optimizer.state()?;
        checkpoint::save(
            dir,
            &self.config,
            &self.tokenizer,
            &self.params,
            Some(&opt),
            Some(&self.state),
        )
    }

    /// Runs to `max_iters`, evaluating, logging and checkpointing on the way.
    pub fn run(&mut self, opts: &RunOptions) -> Result<RunSummary> {
        let out = opts.out.clone();
        let t = self.config.training.clone();
        let tokens_per_step =
            (t.batch_size * self.config.model.block_size * t.grad_accum_steps) as f64;
        let root = self.comm.is_root();
        let mut metrics = Metrics::open(&out, self.state.step, opts.resume.is_some(), root)?;
        let progress = Progress::new(
            if root {
                opts.progress
            } else {
                ProgressMode::Quiet
            },
            "train",
            t.max_iters as u64,
            self.state.step as u64,
        );
        let log_every = (t.eval_interval / 5).max(1);
        let started = Instant::now();
        let elapsed_before = self.state.elapsed_s;
        let mut step_ms = Vec::new();
        let mut last_train = None;
        let mut last_val = None;
        let mut status = String::new();
        if self.state.step == 0 {
            let (tr, va) = self.evaluate()?;
            self.record_eval(&out, tr, va, &progress)?;
            metrics.append(format!("0,{tr:.6},{va:.6},0,,0"))?;
            last_train = Some(tr);
            last_val = Some(va);
        }
        while self.state.step < t.max_iters {
            let lr = learning_rate(&t, self.state.step);
            let t0 = Instant::now();
            let loss = self.train_step()?;
            let dt = t0.elapsed().as_secs_f64();
            step_ms.push(dt * 1e3);
            let tok_s = tokens_per_step / dt;
            let step = self.state.step;
            self.state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
            last_train = Some(loss);
            let mut val_field = String::new();
            if step.is_multiple_of(t.eval_interval) || step == t.max_iters {
                let (tr, va) = self.evaluate()?;
                self.record_eval(&out, tr, va, &progress)?;
                val_field = format!("{va:.6}");
                last_val = Some(va);
                status = format!("val {va:.4}");
            }
            let row = format!(
                "{step},{loss:.6},{val_field},{lr:.6e},{tok_s:.1},{:.3}",
                self.state.elapsed_s
            );
            metrics.append(row)?;
            if step.is_multiple_of(t.checkpoint_interval) || step == t.max_iters {
                metrics.flush()?;
                self.save(&out.join("last"))?;
            }
            let saved_now = step.is_multiple_of(t.checkpoint_interval) || step == t.max_iters;
            self.stop_if_signalled(opts, &mut metrics, &progress, saved_now)?;
            progress.update(
                step as u64,
                &format!("loss {loss:.4} {status} lr {lr:.2e} {:.0} tok/s", tok_s),
                step.is_multiple_of(log_every) || step == t.max_iters,
            );
        }
        progress.finish();
        metrics.flush()?;
        // A run resumed at its end still leaves a complete last/.
        if root && !out.join("last").exists() {
            self.save(&out.join("last"))?;
        }
        step_ms.sort_by(|a, b| a.total_cmp(b));
        let ms = step_ms.get(step_ms.len() / 2).copied().unwrap_or(0.0);
        Ok(RunSummary {
            out,
            steps: self.state.step,
            final_train_loss: last_train,
            final_val_loss: last_val,
            best_val_loss: self.state.best_val_loss,
            ms_per_iter: ms,
            tokens_per_s: if ms > 0.0 {
                tokens_per_step / (ms / 1e3)
            } else {
                0.0
            },
        })
    }

    /// When a signal asked the run to stop: ends the progress bar, flushes the metrics, saves
    /// `last/` (unless this step's checkpoint just did) and returns [`Error::Interrupted`].
    /// The ranks agree first (one tiny all-reduce a step), so all stop after the same step.
    fn stop_if_signalled(
        &self,
        opts: &RunOptions,
        metrics: &mut Metrics,
        progress: &Progress,
        saved_now: bool,
    ) -> Result<()> {
        let mine = opts.stop.as_ref().map_or(0, |s| s.load(Ordering::SeqCst));
        let mut any = [mine as f64];
        self.comm.sum_f64(&mut any)?;
        if any[0] == 0.0 {
            return Ok(());
        }
        // A rank the signal did not reach stops as if told to terminate.
        let signal = if mine != 0 { mine } else { 15 };
        progress.finish();
        metrics.flush()?;
        let saved = opts.out.join("last");
        if !saved_now {
            self.save(&saved)?;
        }
        Err(Error::Interrupted {
            signal: signal as i32,
            step: self.state.step,
            saved,
            run_dir: opts.out.clone(),
        })
    }

    fn record_eval(&mut self, out: &Path, train: f64, val: f64, progress: &Progress) -> Result<()> {
        let step = self.state.step;
        self.state.history.push(LossPoint {
            step,
            train_loss: train,
            val_loss: val,
        });
        progress.println(&format!(
            "step {step}: train loss {train:.4}, val loss {val:.4}"
        ));
        if self.state.best_val_loss.is_none_or(|b| val < b) {
            self.state.best_val_loss = Some(val);
            self.save(&out.join("best"))?;
        }
        Ok(())
    }
}

/// Two partial sums of gradients, parameter by parameter.
fn add_grads(a: Grads, b: Grads) -> Result<Grads> {
    a.into_iter()
        .zip(b)
        .map(|p| match p {
            (Some(a), Some(b)) => Ok(Some((a + b)?)),
            (a, b) => Ok(a.or(b)),
        })
        .collect()
}

fn non_finite(step: usize, what: &'static str, learning_rate: f64) -> Error {
    Error::Diverged {
        step,
        what,
        learning_rate,
    }
}

/// The run's data for a model whose tokenizer is `tokenizer` ([`load_for`]).
fn dataset_for(config: &Config, tokenizer: &Tokenizer, progress: ProgressMode) -> Result<Dataset> {
    let (t, m) = (&config.training, &config.model);
    load_for(
        tokenizer,
        &config.data.path,
        t.val_fraction,
        m.block_size,
        progress,
    )
}

fn make_dataset(
    config: &Config,
    tokenizer: &Tokenizer,
    text: &str,
    progress: ProgressMode,
) -> Result<Dataset> {
    let (t, m) = (&config.training, &config.model);
    Dataset::from_text(
        tokenizer,
        text,
        &config.data.path,
        t.val_fraction,
        m.block_size,
        progress,
    )
}

/// `metrics.csv`, open for appending on rank 0 (the other ranks write nothing).
struct Metrics {
    file: Option<File>,
    path: PathBuf,
}

impl Metrics {
    fn open(out: &Path, step: usize, resumed: bool, root: bool) -> Result<Metrics> {
        Ok(Metrics {
            file: root.then(|| open_metrics(out, step, resumed)).transpose()?,
            path: out.join("metrics.csv"),
        })
    }

    /// Appends one row in a single write, so that a reader never sees half of one (beyond a
    /// last line still being written, which ends without a newline).
    fn append(&mut self, mut row: String) -> Result<()> {
        let Some(f) = &mut self.file else {
            return Ok(());
        };
        row.push('\n');
        f.write_all(row.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes what has been buffered.
    fn flush(&mut self) -> Result<()> {
        match &mut self.file {
            Some(f) => f.flush().map_err(|e| Error::io(&self.path, e)),
            None => Ok(()),
        }
    }
}

/// Opens `metrics.csv` for appending. A resumed run drops rows past its checkpoint's step
/// (written after that checkpoint, by a run that then stopped).
fn open_metrics(out: &Path, step: usize, resumed: bool) -> Result<std::fs::File> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let path = out.join("metrics.csv");
    let mut keep = vec![METRICS_HEADER.to_string()];
    if resumed {
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines().skip(1) {
                let s: Option<usize> = line.split(',').next().and_then(|s| s.parse().ok());
                if s.is_some_and(|s| s <= step) {
                    keep.push(line.to_string());
                }
            }
        }
    }
    let mut content = keep.join("\n");
    content.push('\n');
    // Written whole and renamed into place: a reader sees the old file or the new one.
    let tmp = out.join(".metrics.csv.tmp");
    std::fs::write(&tmp, content).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))
}
