//! A 200 MB corpus: tokenized once, in the narrowest id type, in bounded memory.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::Workspace;

/// Runs the command and returns (exit code, peak resident memory in bytes).
// wait4 below reaps the child, which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> (i32, u64) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, usage.ru_maxrss as u64 * 1024)
}

#[test]
fn a_200_mb_corpus_tokenizes_in_bounded_memory() {
    let ws = Workspace::new(1000);
    let path = ws.path("big.txt");
    let block = common::corpus(1 << 20);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut written = 0;
    while written < 200_000_000 {
        f.write_all(block.as_bytes()).unwrap();
        written += block.len();
    }
    f.flush().unwrap();
    drop(f);
    let (code, peak) = run_measured(
        Command::new(env!("CARGO_BIN_EXE_tinygpt"))
            .args([
                "train",
                "--config",
                "tiny.toml",
                "--data",
                path.to_str().unwrap(),
                "--out",
                "big",
            ])
            .args([
                "--set",
                "training.max_iters=5",
                "--set",
                "training.warmup_iters=1",
                "--set",
                "training.eval_iters=1",
                "--quiet",
            ])
            .current_dir(ws.dir.path()),
    );
    assert_eq!(code, 0);
    // The text (200 MB) plus one copy of the ids as u16 (2 bytes per character, 400 MB) plus
    // slack: a second copy of the ids, or ids as u32/i64, would not fit.
    let mb = peak / 1_000_000;
    assert!(mb < 900, "peak memory {mb} MB");
    assert!(
        mb > 550,
        "peak memory {mb} MB is below text + ids: was the corpus read?"
    );
}
