//! The run directory's lock. Whatever writes a run (`train`, `train --resume`, an export or
//! import into it) first takes an exclusive OS advisory lock (`flock`, through std's
//! `File::try_lock`) on `RUN/.tinygpt.lock`, and holds it until it ends. The kernel drops the
//! lock when the process dies, even by `kill -9`, so a stale lock never outlives its holder;
//! the file itself stays, holding the last holder's pid for the message a second writer gets.
//!
//! Readers (`generate`, `inspect`, `eval`, `attention`, `plot`, `tokenize`, `serve`) never
//! take it: checkpoints are replaced whole by renames ([`crate::run::checkpoint`]), and
//! `metrics.csv` grows by whole rows.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = ".tinygpt.lock";

/// A held lock on a run directory; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of run directory `dir` (created if missing), or fails at once with one
    /// line naming the directory and the process that holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Usage(format!(
                "cannot create the run directory {}: {e}; pass another --out",
                dir.display()
            ))
        })?;
        let path = dir.join(LOCK_FILE);
        // Not truncated on open: the holder's pid must survive a second writer's attempt.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                Error::Usage(format!(
                    "cannot write into the run directory {}: {e}; pass another --out",
                    dir.display()
                ))
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                // The holder writes its pid just after taking the lock: give it a moment.
                let mut holder = String::new();
                for _ in 0..100 {
                    holder.clear();
                    let _ = file.rewind().and_then(|_| file.read_to_string(&mut holder));
                    if !holder.trim().is_empty() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("another tinygpt (pid {pid})"),
                };
                return Err(Error::Usage(format!(
                    "run directory {} is in use: {holder} is writing it; wait for it to finish (or stop it), or pass another --out",
                    dir.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| writeln!(file, "{pid}"))
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(&path, e))?;
        Ok(RunLock { _file: file })
    }

    /// The lock of the run that `out` is written into, when `out` is a run directory or lies
    /// in one (a run directory holds the lock file): an export or import into a run must not
    /// mix with a training that writes it.
    pub fn for_output(out: &Path) -> Result<Option<RunLock>> {
        let run = out
            .ancestors()
            .take(3)
            .find(|d| d.join(LOCK_FILE).is_file());
        run.map(RunLock::acquire).transpose()
    }
}
