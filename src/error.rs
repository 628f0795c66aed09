//! One error type for the library. Every variant carries a message written for the user:
//! it names the thing that is wrong and, where there is one, the fix.

use std::path::{Path, PathBuf};

/// The library's error. The binary prints it as one line on stderr and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file or `--set` override is malformed or out of range.
    #[error("config: {0}")]
    Config(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The training corpus cannot be used as it is.
    #[error("corpus {}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },
    /// Text that the tokenizer cannot encode, or a broken tokenizer file.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A checkpoint directory that is missing, corrupt or does not match itself.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    /// A bad argument to a command (sampling settings, layer indices, …).
    #[error("{0}")]
    Usage(String),
    /// Training produced a loss or gradient norm that is not finite.
    #[error("training diverged at step {step}: the {what} is not finite (NaN or infinity). The learning rate ({learning_rate:e}) is likely too high; lower training.learning_rate or set training.grad_clip. The last checkpoint was kept.")]
    Diverged {
        step: usize,
        /// What went non-finite: "loss" or "gradient norm".
        what: &'static str,
        learning_rate: f64,
    },
    /// Writing a checkpoint failed; the previous checkpoint in that directory is intact.
    #[error("saving the checkpoint {} at step {step} failed: {source}. The previous checkpoint there is intact; free disk space (or pass another --out) and resume", dir.display())]
    Save {
        dir: PathBuf,
        step: usize,
        source: Box<Error>,
    },
    /// Training stopped on a signal after saving its state.
    #[error("interrupted by {} at step {step}; saved {}. Resume with: tinygpt train --resume {}", signal_name(*signal), saved.display(), run_dir.display())]
    Interrupted {
        signal: i32,
        step: usize,
        saved: PathBuf,
        run_dir: PathBuf,
    },
    /// Another rank of a data-parallel job failed to start; it printed its own message.
    #[error("rank {rank} failed; its message is above")]
    OtherRank { rank: usize, code: u8 },
    /// An error every rank of a data-parallel job knows of (they agreed on it), so none is
    /// left waiting and the job need not be aborted.
    #[error(transparent)]
    Agreed(Box<Error>),
    /// A tensor operation failed; this is a bug or a shape mismatch inside tinygpt.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn signal_name(signal: i32) -> &'static str {
    match signal {
        2 => "SIGINT (Ctrl-C)",
        15 => "SIGTERM",
        _ => "a signal",
    }
}

impl Error {
    /// The process exit code for this error: 128 + signal for interrupts, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Interrupted { signal, .. } => (128 + signal).clamp(0, 255) as u8,
            Error::OtherRank { code, .. } => *code,
            Error::Agreed(e) => e.exit_code(),
            _ => 1,
        }
    }

    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A checkpoint error about `path`.
    pub fn checkpoint(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// A corpus error about `path`.
    pub fn data(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}
