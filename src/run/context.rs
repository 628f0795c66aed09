//! How and where a command runs, resolved once: the device, the engine and the precision of
//! its products, the threads, and for training the run directory (held by its lock) and the
//! checkpoint it resumes from. Commands resolve a [`RunContext`] at start-up and pass it down;
//! training, eval, bench and serve take it instead of resolving anything again.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::dist::Comm;
use crate::engine::{configure_threads, EngineChoice, EngineOptions};
use crate::error::{Error, Result};
use crate::model::{ModelConfig, Precision};
use crate::run::checkpoint;
use crate::run::config::Config;
use crate::run::lock::{RunLock, LOCK_FILE};

/// A command's resolved run options (see the module docs).
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Where the model's tensors live.
    pub device: Device,
    /// Which engine runs the model, and the dtype of its products.
    pub engine: EngineOptions,
    /// Threads of rayon's pool: the fused kernels' and the matrix products'.
    pub threads: usize,
    /// Why `--engine auto` passed over the fused kernels, when the user may not expect it.
    pub note: Option<String>,
    /// This process's rank and the world's size (one rank outside `mpirun`).
    pub comm: Comm,
}

impl RunContext {
    /// The context for a model of `model` on `device` with `choice` of engine and products in
    /// `precision`; nothing printed or set ([`RunContext::start`] does that).
    pub fn resolve(
        device: &Device,
        choice: EngineChoice,
        model: &ModelConfig,
        precision: Precision,
    ) -> Result<RunContext> {
        let (kind, note) = choice.resolve(model, device, precision)?;
        Ok(RunContext {
            device: device.clone(),
            engine: EngineOptions {
                precision,
                ..EngineOptions::new(kind)
            },
            threads: rayon::current_num_threads(),
            note,
            comm: Comm::single(),
        })
    }

    /// The context a training run of `config` on `device` takes: its `training.engine` and
    /// `training.dtype`.
    pub fn for_training(config: &Config, device: &Device) -> Result<RunContext> {
        let t = &config.training;
        RunContext::resolve(device, t.engine, &config.model, t.dtype)
    }

    /// [`RunContext::resolve`], then what the context asks of the process, once per command
    /// and before its first tensor op: the note on stderr, candle's thread count for the
    /// engine ([`configure_threads`]) and candle's TF32 switch.
    pub fn start(
        device: &Device,
        choice: EngineChoice,
        model: &ModelConfig,
        precision: Precision,
    ) -> Result<RunContext> {
        let ctx = RunContext::resolve(device, choice, model, precision)?;
        if let Some(note) = &ctx.note {
            eprintln!("{note}");
        }
        configure_threads(ctx.engine.kind);
        crate::model::precision::set_tf32(precision == Precision::Tf32);
        Ok(ctx)
    }
}

/// A training run's directory, held by its lock for as long as this value lives, and the
/// checkpoint the run resumes from (none for a fresh run).
#[derive(Debug)]
pub struct RunDir {
    pub path: PathBuf,
    pub resume: Option<PathBuf>,
    /// Whether opening the run created the directory (a failed start removes it again).
    created: bool,
    /// Held by rank 0 alone: the other ranks of a data-parallel run write nothing.
    _lock: Option<RunLock>,
}

impl RunDir {
    /// The directory a resumed run of `arg` (a run directory or a checkpoint in one) writes
    /// to, `out` when given; locked, and checked to be writable.
    pub fn resume(arg: &Path, out: Option<PathBuf>) -> Result<RunDir> {
        let (ck_dir, run_dir) = resume_paths(arg);
        // A mistyped path must not leave a lock file in whatever directory holds it.
        checkpoint::check_is_dir(&ck_dir)?;
        let path = out.unwrap_or(run_dir);
        let lock = RunLock::acquire(&path)?;
        probe_writable(&path)?;
        Ok(RunDir {
            path,
            resume: Some(ck_dir),
            created: false,
            _lock: Some(lock),
        })
    }

    /// [`RunDir::resume`]'s directory and checkpoint as a rank other than 0 sees them: no
    /// lock taken and nothing checked or created; rank 0 holds the directory.
    pub fn resume_follower(arg: &Path, out: Option<PathBuf>) -> RunDir {
        let (ck_dir, run_dir) = resume_paths(arg);
        RunDir::follower(out.unwrap_or(run_dir), Some(ck_dir))
    }

    /// [`RunDir::fresh`]'s directory as a rank other than 0 sees it (see above).
    pub fn fresh_follower(path: PathBuf) -> RunDir {
        RunDir::follower(path, None)
    }

    fn follower(path: PathBuf, resume: Option<PathBuf>) -> RunDir {
        RunDir {
            path,
            resume,
            created: false,
            _lock: None,
        }
    }

    /// A fresh run's directory `path`, locked; one that holds checkpoints already is refused
    /// unless `force`.
    pub fn fresh(path: PathBuf, force: bool) -> Result<RunDir> {
        let existed = path.exists();
        let lock = RunLock::acquire(&path)?;
        let dir = RunDir {
            path,
            resume: None,
            created: !existed,
            _lock: Some(lock),
        };
        if !force && has_checkpoints(&dir.path) {
            let p = dir.path.display();
            let e = Error::Usage(format!(
                "{p} already holds checkpoints; pass --resume {p} to continue that run, --force to overwrite it, or another --out"
            ));
            return Err(dir.discard(e));
        }
        match probe_writable(&dir.path) {
            Ok(()) => Ok(dir),
            Err(e) => Err(dir.discard(e)),
        }
    }

    /// Gives up a fresh run that failed to start: the directory goes again if this run created
    /// it (no empty run directory is left behind); `e` is passed through.
    pub fn discard(self, e: Error) -> Error {
        if self.created {
            let _ = std::fs::remove_file(self.path.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&self.path);
        }
        e
    }
}

/// Whether `dir` holds checkpoints of a run (or the remains of one being replaced).
fn has_checkpoints(dir: &Path) -> bool {
    ["last", "best", ".last.old", ".best.old"]
        .iter()
        .any(|n| dir.join(n).exists())
}

/// Checks early that checkpoints can be written into `dir`.
fn probe_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Usage(format!(
            "cannot create the run directory {}: {e}; pass another --out",
            dir.display()
        ))
    })?;
    let probe = dir.join(".write-probe");
    let res = std::fs::write(&probe, vec![0u8; 4096]);
    let _ = std::fs::remove_file(&probe);
    res.map_err(|e| {
        Error::Usage(format!(
            "cannot write checkpoints into {}: {e}; pass another --out",
            dir.display()
        ))
    })
}

/// Where to resume from: `dir/last` when `dir` is a run directory, else `dir/best` (a run
/// stopped between its first evaluation, which saves `best/`, and its first `last/`), else
/// `dir` itself; and the run directory the resumed run writes to.
pub fn resume_paths(dir: &Path) -> (PathBuf, PathBuf) {
    if let Some(ck) = ["last", "best"]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|ck| checkpoint::resolve(ck).is_dir())
    {
        (ck, dir.to_path_buf())
    } else {
        let run = dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        (dir.to_path_buf(), run)
    }
}
