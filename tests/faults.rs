//! Faults injected on purpose: signals during training.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::{checkpoint_weights, limit_file_size, wait_for_checkpoint, Workspace};

/// `tinygpt train --config tiny.toml EXTRA…` in the workspace.
fn tiny_cmd(ws: &Workspace, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tinygpt"));
    c.args(["train", "--config", "tiny.toml"])
        .args(extra)
        .current_dir(ws.dir.path())
        .stdin(Stdio::null());
    c
}

/// `tinygpt train --resume RUN EXTRA…` in the workspace.
fn resume_cmd(ws: &Workspace, run: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tinygpt"));
    c.args(["train", "--resume", run.to_str().unwrap()])
        .args(extra)
        .current_dir(ws.dir.path())
        .stdin(Stdio::null());
    c
}

/// Starts a long tiny run, waits until it has trained a while, sends `signal`, and checks the
/// exit code, the message, and that the saved checkpoint resumes.
fn interrupt_with(signal: &str, code: i32) {
    let ws = Workspace::new(4000);
    let out = ws.path("run");
    let child = tiny_cmd(&ws, &["--out", out.to_str().unwrap(), "--quiet"])
        .args(["--set", "training.max_iters=1000000"])
        .args(["--set", "training.lr_decay_iters=1000000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait for the first checkpoint (step 5) and a few more steps
    wait_for_checkpoint(&out, Duration::from_secs(60));
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
    let ck = tinygpt::run::checkpoint::load(&out.join("last"), &Device::Cpu).unwrap();
    assert_eq!(ck.state.unwrap().step, step);
    // and it resumes
    let max_iters = format!("training.max_iters={}", step + 3);
    let o = resume_cmd(&ws, &out, &["--set", &max_iters, "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = tinygpt::run::checkpoint::load(&out.join("last"), &Device::Cpu).unwrap();
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

/// Trains `name` in the workspace with `sets` to the end, uninterrupted; its run directory.
fn train_to_end(ws: &Workspace, name: &str, sets: &[&str]) -> std::path::PathBuf {
    let out = ws.path(name);
    let o = tiny_cmd(ws, &["--out", out.to_str().unwrap()])
        .args(sets)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// Resumes run `run` with `sets` to the end and checks that its last/ weights equal those of
/// the uninterrupted run `whole`, bit for bit (`when` says what the run went through).
fn resume_matches(
    ws: &Workspace,
    run: &std::path::Path,
    sets: &[&str],
    whole: &std::path::Path,
    when: &str,
) {
    let o = resume_cmd(ws, run, sets).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (
        checkpoint_weights(&whole.join("last")),
        checkpoint_weights(&run.join("last")),
    );
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{n} differs from the uninterrupted run {when}");
    }
}

#[test]
fn a_run_with_only_best_resumes_from_it() {
    // A kill between the first evaluation and the first last/ leaves best/ alone; here a
    // finished run loses its last/ instead, and best/ (from some evaluation) must carry on.
    let ws = Workspace::new(6000);
    let sets = [
        "--set",
        "training.max_iters=20",
        "--set",
        "training.lr_decay_iters=20",
        "--quiet",
    ];
    let whole = train_to_end(&ws, "whole", &sets);
    let run = train_to_end(&ws, "cut", &sets);
    std::fs::remove_dir_all(run.join("last")).unwrap();
    assert!(run.join("best").is_dir());
    // Starting over is refused (best/ is a checkpoint), and the advice it gives works.
    let o = tiny_cmd(&ws, &["--out", run.to_str().unwrap()])
        .args(sets)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    resume_matches(&ws, &run, &sets, &whole, "resumed from best/ alone");
}

#[test]
fn kill_9_at_random_instants_never_loses_the_run() {
    let ws = Workspace::new(6000);
    let sets = [
        "--set",
        "training.max_iters=400",
        "--set",
        "training.lr_decay_iters=400",
        "--set",
        "training.checkpoint_interval=1",
        "--set",
        "training.eval_interval=50",
        "--quiet",
    ];
    // the reference: one uninterrupted run
    let whole = train_to_end(&ws, "whole", &sets);

    // the same run, killed with SIGKILL at pseudo-random instants (checkpoints are written every
    // step, so many kills land inside a save), each time resumed from what is on disk
    let out = ws.path("killed");
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut kills = 0;
    let mut last_step = 0;
    for round in 0..40 {
        // A kill between the first evaluation (which saves best/) and the first last/ leaves
        // best/ alone: the run must then be resumed too, from best/.
        let has_checkpoint = ["last", "best"]
            .iter()
            .any(|n| tinygpt::run::checkpoint::resolve(&out.join(n)).is_dir());
        let mut cmd = if has_checkpoint {
            resume_cmd(&ws, &out, &[])
        } else {
            tiny_cmd(&ws, &["--out", out.to_str().unwrap()])
        };
        let mut child = cmd
            .args(sets)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(20 + x % 180));
        if child.try_wait().unwrap().is_some() {
            let o = child.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            break; // finished before the kill
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        // whatever instant it died at, the newest complete checkpoint loads
        let dir = tinygpt::run::checkpoint::resolve(&out.join("last"));
        if dir.is_dir() {
            let ck = tinygpt::run::checkpoint::load(&out.join("last"), &Device::Cpu)
                .unwrap_or_else(|e| {
                    panic!("round {round}: checkpoint unreadable after kill -9: {e}")
                });
            let step = ck.state.unwrap().step;
            assert!(
                step >= last_step,
                "round {round}: went back from {last_step} to {step}"
            );
            last_step = step;
        }
    }
    assert!(kills >= 10, "only {kills} kills landed");
    // finish the run and compare with the uninterrupted one
    resume_matches(&ws, &out, &sets, &whole, &format!("after {kills} kills"));
}

fn all_finite(dir: &std::path::Path) -> bool {
    checkpoint_weights(dir)
        .iter()
        .all(|(_, w)| w.iter().all(|x| x.is_finite()))
}

#[test]
fn a_diverging_run_stops_with_the_step_and_keeps_good_weights() {
    let ws = Workspace::new(4000);
    let out = ws.path("run");
    let o = tiny_cmd(&ws, &["--out", out.to_str().unwrap(), "--quiet"])
        .args([
            "--set",
            "training.learning_rate=1e30",
            "--set",
            "training.min_lr=0",
            "--set",
            "training.warmup_iters=0",
        ])
        .args([
            "--set",
            "training.checkpoint_interval=1",
            "--set",
            "training.grad_clip=0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("training diverged at step") && err.contains("learning rate"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    // whatever was saved is finite: NaN never overwrites a checkpoint
    for d in ["last", "best"] {
        if out.join(d).exists() {
            assert!(all_finite(&out.join(d)), "{d} holds non-finite weights");
        }
    }
}

#[test]
fn an_unusable_output_directory_is_found_before_training() {
    let ws = Workspace::new(4000);
    let o = tiny_cmd(&ws, &["--out", "corpus.txt/run", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cannot create the run directory corpus.txt/run"),
        "{err}"
    );
    assert!(!ws.path("corpus.txt/run").exists());
}

#[test]
fn a_full_disk_at_save_time_keeps_the_previous_checkpoint() {
    let ws = Workspace::new(4000);
    let out = ws.path("run");
    let o = tiny_cmd(
        &ws,
        &[
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--set",
            "training.max_iters=10",
        ],
    )
    .output()
    .unwrap();
    assert!(o.status.success());
    let before = std::fs::read(out.join("last/model.safetensors")).unwrap();
    // Resume with files capped at 16 KiB: the probe fits, the first checkpoint does not
    // (the file-size limit stands in for a full disk: writes fail with an I/O error).
    let mut cmd = resume_cmd(&ws, &out, &["--set", "training.max_iters=20", "--quiet"]);
    limit_file_size(&mut cmd, 16 * 1024);
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("saving the checkpoint")
            && err.contains("previous checkpoint there is intact"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    assert_eq!(
        std::fs::read(out.join("last/model.safetensors")).unwrap(),
        before
    );
    let ck = tinygpt::run::checkpoint::load(&out.join("last"), &Device::Cpu).unwrap();
    assert_eq!(ck.state.unwrap().step, 10);
    // and once there is room again, the run resumes
    let o = resume_cmd(&ws, &out, &["--set", "training.max_iters=12", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_second_ctrl_c_exits_at_once_and_the_checkpoint_survives() {
    let ws = Workspace::new(200_000);
    let out = ws.path("run");
    // a model slow enough (hundreds of ms a step) that the second signal lands mid-step
    let child = tiny_cmd(&ws, &["--out", out.to_str().unwrap(), "--quiet"])
        .args([
            "--set",
            "model.n_embd=256",
            "--set",
            "model.n_layer=4",
            "--set",
            "model.block_size=128",
            "--set",
            "training.batch_size=32",
        ])
        .args([
            "--set",
            "training.max_iters=100000",
            "--set",
            "training.lr_decay_iters=100000",
        ])
        .args([
            "--set",
            "training.checkpoint_interval=1",
            "--set",
            "training.eval_iters=1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&out, Duration::from_secs(120));
    let pid = child.id().to_string();
    for _ in 0..2 {
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        std::thread::sleep(Duration::from_millis(30));
    }
    let t = Instant::now();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the second Ctrl-C did not exit at once"
    );
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    // the newest complete checkpoint loads and resumes
    let ck = tinygpt::run::checkpoint::load(&out.join("last"), &Device::Cpu).unwrap();
    assert!(ck.state.unwrap().step >= 1);
}

#[test]
fn a_disk_that_cannot_take_a_write_is_found_before_training() {
    let ws = Workspace::new(4000);
    let mut cmd = tiny_cmd(&ws, &["--out", "run", "--quiet"]);
    limit_file_size(&mut cmd, 1024);
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("cannot write checkpoints into run"), "{err}");
    assert!(
        !ws.path("run/metrics.csv").exists(),
        "training must not have started"
    );
}

#[test]
fn force_overwrites_only_when_asked() {
    let ws = Workspace::new(4000);
    let run = |extra: &[&str]| {
        tiny_cmd(
            &ws,
            &[
                "--out",
                "run",
                "--quiet",
                "--set",
                "training.max_iters=5",
                "--set",
                "training.warmup_iters=1",
            ],
        )
        .args(extra)
        .output()
        .unwrap()
    };
    assert!(run(&[]).status.success());
    let again = run(&[]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = run(&["--force", "--set", "training.seed=99"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    let ck = tinygpt::run::checkpoint::load(&ws.path("run/last"), &Device::Cpu).unwrap();
    assert_eq!(ck.config.training.seed, 99);
}
