//! Faults injected on purpose: signals during training.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::Workspace;

/// Starts a long tiny run, waits until it has trained a while, sends `signal`, and checks the
/// exit code, the message, and that the saved checkpoint resumes.
fn interrupt_with(signal: &str, code: i32) {
    let ws = Workspace::new(4000);
    let out = ws.path("run");
    let child = Command::new(env!("CARGO_BIN_EXE_tinygpt"))
        .args([
            "train",
            "--config",
            "tiny.toml",
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--set",
            "training.max_iters=1000000",
            "--set",
            "training.lr_decay_iters=1000000",
            "--quiet",
        ])
        .current_dir(ws.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait for the first checkpoint (step 5) and a few more steps
    let start = Instant::now();
    while !out.join("last/state.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training never checkpointed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let ok = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert!(err.contains("Resume with: tinygpt train --resume"), "{err}");
    assert!(!err.contains("panicked"));
    // the message names the step; last/ holds exactly that step
    let step: usize = err
        .split("at step ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ck = tinygpt::checkpoint::load(&out.join("last"), &Device::Cpu).unwrap();
    assert_eq!(ck.state.unwrap().step, step);
    // and it resumes
    let o = Command::new(env!("CARGO_BIN_EXE_tinygpt"))
        .args([
            "train",
            "--resume",
            out.to_str().unwrap(),
            "--set",
            &format!("training.max_iters={}", step + 3),
            "--quiet",
        ])
        .current_dir(ws.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = tinygpt::checkpoint::load(&out.join("last"), &Device::Cpu).unwrap();
    assert_eq!(ck.state.unwrap().step, step + 3);
}

#[test]
fn ctrl_c_saves_and_exits_130() {
    interrupt_with("-INT", 130);
}

#[test]
fn sigterm_saves_and_exits_143() {
    interrupt_with("-TERM", 143);
}
