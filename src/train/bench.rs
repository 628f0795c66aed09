//! How fast a config trains and samples on this machine: the numbers behind `tinygpt bench`
//! and the README's results table (docs/performance.md has the rest).
//!
//! - training: full optimizer steps (batch, forward, backward, clipping, AdamW), timed one by
//!   one after `warmup` untimed steps; the median is reported, as it shrugs off the odd step
//!   that the OS or the allocator slows down;
//! - generation: tokens per second for `gen_tokens` new tokens at temperature 0.8, top-k 200,
//!   with and without the KV cache;
//! - peak RSS: the process's high-water mark after training (`getrusage`); on a GPU also the
//!   memory pool's high-water mark;
//! - under `mpirun`: every rank trains its share of each step's micro-batches; the report is
//!   rank 0's, with the global tokens/s and the share of the step spent summing gradients
//!   across ranks; generation runs on rank 0 alone, the sgemm peak on every rank at once
//!   (their sum is the peak the ranks share);
//! - MFU: model flops per second over the peak (the sgemm peak measured on the spot on the
//!   CPU, the data sheet's for the dtype on a GPU), with nanoGPT's count of flops per token,
//!   6·N + 12·L·T·C (N: parameters without the position embedding).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::data::corpus::{Dataset, TokenIds};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::kernels::matmul::{matmul, MatMut, MatRef};
use crate::progress::ProgressMode;
use crate::rng::seeded;
use crate::run::config::{Config, TokenizerKind};
use crate::run::context::RunContext;
use crate::sample::{generate, SampleOptions};
use crate::train::Trainer;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Timed training steps.
    pub iters: usize,
    /// Untimed training steps first (allocator, caches, thread pools warm up).
    pub warmup: usize,
    /// New tokens per generation measurement.
    pub gen_tokens: usize,
    /// Where and how to run: the device and the engine the config resolved to.
    pub ctx: RunContext,
}

/// The measurements; `--json` prints this struct.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub engine: String,
    /// `cpu`, or the GPU's name.
    pub device: String,
    /// The matrix products' dtype.
    pub dtype: String,
    pub data: String,
    /// Threads per rank.
    pub threads: usize,
    /// Data-parallel ranks (1 outside `mpirun`).
    pub ranks: usize,
    /// The share of a timed step spent summing gradients across ranks (0 for one rank).
    pub allreduce_share: f64,
    pub parameters: usize,
    pub batch_size: usize,
    pub block_size: usize,
    pub iters: usize,
    pub train_ms_per_iter: f64,
    pub train_ms_min: f64,
    pub train_ms_max: f64,
    pub train_tokens_per_s: f64,
    pub generate_tokens_per_s: f64,
    pub generate_tokens_per_s_no_cache: f64,
    pub peak_rss_mb: f64,
    /// The GPU memory pool's high-water mark (`None` on the CPU).
    pub peak_device_memory_mb: Option<f64>,
    pub flops_per_token: f64,
    /// This machine's CPU sgemm peak, measured on the spot.
    pub sgemm_gflops: f64,
    /// The denominator of MFU in GFLOP/s: the sgemm peak on the CPU, the GPU's data-sheet
    /// peak for the dtype on a GPU (`None` for a GPU not in [`crate::engine::device::gpu_peak_flops`]).
    pub peak_gflops: Option<f64>,
    pub mfu: Option<f64>,
}

/// The process's peak resident set size so far, in MB.
pub fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    ru.ru_maxrss as f64 / 1024.0 // kilobytes on Linux
}

/// The best sgemm speed of this machine in GFLOP/s: a 1024³ product on all threads with the
/// same matmul the kernels use, best of several runs.
pub fn sgemm_peak_gflops() -> f64 {
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::MAX;
    for _ in 0..8 {
        let t = Instant::now();
        // SAFETY: three n×n row-major buffers.
        unsafe {
            matmul(
                n,
                n,
                n,
                MatMut::row_major(&mut c, n),
                false,
                MatRef::row_major(&a, n),
                MatRef::row_major(&b, n),
                1.0,
            )
        };
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// A trainer on random tokens: a vocabulary of 65 (tinyshakespeare's character count) for a
/// char config, `vocab_size` for BPE. Speed does not depend on what the tokens say.
fn synthetic_trainer(config: Config, ctx: &RunContext) -> Result<Trainer> {
    let vocab = match config.tokenizer.kind {
        TokenizerKind::Char => 65,
        TokenizerKind::Bpe => config.tokenizer.vocab_size,
    };
    // `vocab` distinct characters (from U+0100 on: letters, no controls or spaces).
    let alphabet: String = (0..vocab as u32)
        .filter_map(|i| char::from_u32(0x100 + i))
        .collect();
    let tokenizer = Tokenizer::train(TokenizerKind::Char, &alphabet, 0)?;
    let vocab = tokenizer.vocab_size();
    let mut rng = seeded(config.training.seed);
    let n = (config.model.block_size + 1) * 200;
    let ids: Vec<u32> = (0..n)
        .map(|_| rand::Rng::random_range(&mut rng, 0..vocab as u32))
        .collect();
    let dataset = Dataset::new(
        TokenIds::new(ids, vocab),
        0.1,
        config.model.block_size,
        Path::new("(random tokens)"),
    )?;
    Trainer::from_parts(config, tokenizer, dataset, ctx)
}

/// `opts.warmup` untimed training steps, then each of `opts.iters` timed, in milliseconds;
/// and the share of the timed steps spent summing gradients across ranks.
fn time_steps(trainer: &mut Trainer, opts: &BenchOptions) -> Result<(Vec<f64>, f64)> {
    let device = &opts.ctx.device;
    trainer.micro_batches()?;
    for _ in 0..opts.warmup {
        trainer.train_step()?;
    }
    device.synchronize()?;
    trainer.reduce_s = 0.0;
    let mut times = Vec::with_capacity(opts.iters);
    for _ in 0..opts.iters {
        let t = Instant::now();
        trainer.train_step()?;
        // A GPU runs the step's last kernels after train_step returns: wait for them.
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let timed_s = times.iter().sum::<f64>() / 1000.0;
    Ok((times, trainer.reduce_s / timed_s))
}

/// Measures `config` (trained on `data`, or on random tokens when `None`). `say` gets a line
/// per stage as it starts.
pub fn run(
    mut config: Config,
    data: Option<&Path>,
    opts: &BenchOptions,
    mut say: impl FnMut(&str),
) -> Result<BenchReport> {
    if opts.iters == 0 || opts.gen_tokens == 0 {
        return Err(Error::Usage(
            "--iters and --gen-tokens must be at least 1".into(),
        ));
    }
    let device = opts.ctx.device.clone();
    let mut trainer = match data {
        Some(p) => {
            config.data.path = p.to_path_buf();
            Trainer::new(config, &opts.ctx, ProgressMode::Quiet)?
        }
        None => synthetic_trainer(config, &opts.ctx)?,
    };
    let cfg = trainer.config.clone();
    let tokens_per_iter =
        (cfg.training.batch_size * cfg.training.grad_accum_steps * cfg.model.block_size) as f64;
    say(&format!(
        "training: {} warm-up + {} timed steps of {} tokens",
        opts.warmup, opts.iters, tokens_per_iter
    ));
    let (mut times, allreduce_share) = time_steps(&mut trainer, opts)?;
    let peak_device_memory_mb = crate::engine::device::peak_memory(&device).map(|b| b as f64 / 1e6);
    let peak_rss_mb = peak_rss_mb();
    let min = times.iter().cloned().fold(f64::MAX, f64::min);
    let max = times.iter().cloned().fold(0.0, f64::max);
    let ms = median(&mut times);

    let gen = |use_cache: bool| -> Result<f64> {
        let o = SampleOptions {
            max_new_tokens: opts.gen_tokens,
            use_cache,
            ..SampleOptions::default()
        };
        let mut rng = seeded(0);
        let t = Instant::now();
        let out = generate(&trainer.engine, &[0], &o, &mut rng, |_| Ok(true))?;
        Ok(out.len() as f64 / t.elapsed().as_secs_f64())
    };
    say(&format!(
        "generation: {} tokens with the KV cache, then without",
        opts.gen_tokens
    ));
    let comm = &opts.ctx.comm;
    let (generate_tokens_per_s, generate_tokens_per_s_no_cache) = match comm.is_root() {
        true => (gen(true)?, gen(false)?),
        false => (f64::NAN, f64::NAN),
    };
    say("sgemm peak: 1024³ products");
    let mut sgemm = [0.0];
    comm.sum_f64(&mut [0.0])?; // the ranks start the products together
    sgemm[0] = sgemm_peak_gflops();
    comm.sum_f64(&mut sgemm)?;
    let sgemm_gflops = sgemm[0];

    let m = &cfg.model;
    let n_params = trainer.params.count() - m.block_size * m.n_embd;
    let flops_per_token =
        6.0 * n_params as f64 + 12.0 * (m.n_layer * m.block_size * m.n_embd) as f64;
    let train_tokens_per_s = tokens_per_iter / (ms / 1000.0);
    let device_name = crate::engine::device::describe(&device);
    let peak_gflops = match device.is_cpu() {
        true => Some(sgemm_gflops),
        false => {
            crate::engine::device::gpu_peak_flops(&device_name, cfg.training.dtype).map(|f| f / 1e9)
        }
    };
    Ok(BenchReport {
        engine: trainer.engine.kind().name().to_string(),
        device: device_name,
        dtype: cfg.training.dtype.name().to_string(),
        data: data.map_or("random tokens".into(), |p| p.display().to_string()),
        threads: opts.ctx.threads,
        ranks: comm.size(),
        allreduce_share,
        parameters: trainer.params.count(),
        batch_size: cfg.training.batch_size,
        block_size: m.block_size,
        iters: opts.iters,
        train_ms_per_iter: ms,
        train_ms_min: min,
        train_ms_max: max,
        train_tokens_per_s,
        generate_tokens_per_s,
        generate_tokens_per_s_no_cache,
        peak_rss_mb,
        peak_device_memory_mb,
        flops_per_token,
        sgemm_gflops,
        peak_gflops,
        mfu: peak_gflops.map(|p| flops_per_token * train_tokens_per_s / (p * 1e9)),
    })
}

impl BenchReport {
    /// The report as an aligned table.
    pub fn table(&self) -> String {
        let mut rows = vec![
            ("engine", self.engine.clone()),
            ("device", format!("{} ({})", self.device, self.dtype)),
            ("data", self.data.clone()),
            ("threads", self.threads.to_string()),
            (
                "ranks",
                match self.ranks {
                    1 => "1".to_string(),
                    n => format!(
                        "{n} (all-reduce {:.1}% of the step)",
                        self.allreduce_share * 100.0
                    ),
                },
            ),
            ("parameters", self.parameters.to_string()),
            (
                "batch × block",
                format!("{} × {}", self.batch_size, self.block_size),
            ),
            (
                "train ms/iter",
                format!(
                    "{:.1} (median of {}; min {:.1}, max {:.1})",
                    self.train_ms_per_iter, self.iters, self.train_ms_min, self.train_ms_max
                ),
            ),
            ("train tokens/s", format!("{:.0}", self.train_tokens_per_s)),
            (
                "generate tokens/s",
                format!(
                    "{:.0} with KV cache, {:.0} without",
                    self.generate_tokens_per_s, self.generate_tokens_per_s_no_cache
                ),
            ),
        ];
        if let Some(mb) = self.peak_device_memory_mb {
            rows.push(("peak GPU memory", format!("{mb:.0} MB")));
        }
        rows.extend([
            ("peak RSS", format!("{:.0} MB", self.peak_rss_mb)),
            ("sgemm peak", format!("{:.1} GFLOP/s", self.sgemm_gflops)),
            (
                "MFU",
                match (self.mfu, self.peak_gflops) {
                    (Some(mfu), Some(peak)) => format!(
                        "{:.1}% ({:.2} MFLOP/token, peak {:.0} GFLOP/s)",
                        mfu * 100.0,
                        self.flops_per_token / 1e6,
                        peak
                    ),
                    _ => "unknown (a GPU without a data-sheet peak in tinygpt)".into(),
                },
            ),
        ]);
        rows.iter().map(|(k, v)| format!("{k:<18} {v}\n")).collect()
    }
}
