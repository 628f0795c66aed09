//! Two processes, one run directory: the writer's lock, and readers that read a live run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{checkpoint_weights, fails_with, stderr, tinygpt, wait_for_checkpoint, Workspace};

/// `tinygpt train` of the workspace's tiny config into `out`, started and not waited for.
fn spawn_train(ws: &Workspace, out: &Path, sets: &[&str]) -> Child {
    let mut args = vec![
        "train".to_string(),
        "--config".into(),
        "tiny.toml".into(),
        "--out".into(),
        out.to_str().unwrap().into(),
        "--sample-tokens".into(),
        "0".into(),
    ];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    Command::new(env!("CARGO_BIN_EXE_tinygpt"))
        .args(&args)
        .current_dir(ws.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The columns of metrics.csv that a run determines (step, losses, lr), row by row.
fn metric_rows(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
        .collect()
}

const LONG: [&str; 3] = [
    "training.max_iters=400",
    "training.lr_decay_iters=400",
    "training.checkpoint_interval=10",
];

#[test]
fn of_two_writers_started_together_one_runs_and_one_is_refused() {
    let ws = Workspace::new(20_000);
    let alone = ws.path("alone");
    let o = spawn_train(&ws, &alone, &LONG).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let dup = ws.path("dup");
    let (a, b) = (spawn_train(&ws, &dup, &LONG), spawn_train(&ws, &dup, &LONG));
    let (pa, pb) = (a.id(), b.id());
    let (oa, ob): (Output, Output) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (won, lost, winner) = match (oa.status.success(), ob.status.success()) {
        (true, false) => (oa, ob, pa),
        (false, true) => (ob, oa, pb),
        _ => panic!(
            "exactly one must run: {:?} {} / {:?} {}",
            oa.status,
            stderr(&oa),
            ob.status,
            stderr(&ob)
        ),
    };
    assert!(won.status.success());
    fails_with(
        &lost,
        &format!(
            "run directory {} is in use: another tinygpt (pid {winner}) is writing it",
            dup.display()
        ),
    );
    assert_eq!(
        stderr(&lost).lines().count(),
        1,
        "one line: {}",
        stderr(&lost)
    );
    // The survivor's run is the run made alone, bit for bit, and its metrics are one run's.
    assert_eq!(
        checkpoint_weights(&dup.join("last")),
        checkpoint_weights(&alone.join("last"))
    );
    assert_eq!(
        checkpoint_weights(&dup.join("best")),
        checkpoint_weights(&alone.join("best"))
    );
    assert_eq!(metric_rows(&dup), metric_rows(&alone));
    assert_eq!(
        metric_rows(&dup).len(),
        1 + 401,
        "a header, step 0 and 400 steps"
    );
}

#[test]
fn a_live_run_refuses_a_resume_and_kill_9_frees_it_at_once() {
    let ws = Workspace::new(20_000);
    let run = ws.path("run");
    let mut child = spawn_train(
        &ws,
        &run,
        &[
            "training.max_iters=1000000",
            "training.checkpoint_interval=20",
        ],
    );
    wait_for_checkpoint(&run, Duration::from_secs(60));
    let r = run.to_str().unwrap();
    let holder = format!("another tinygpt (pid {}) is writing it", child.id());
    let o = tinygpt(&["train", "--resume", r], ws.dir.path());
    fails_with(&o, &holder);
    let o = tinygpt(
        &["train", "--config", "tiny.toml", "--out", r, "--force"],
        ws.dir.path(),
    );
    fails_with(&o, &holder);
    // Writing an export into the run waits its turn too; reading it does not.
    let hf = run.join("hf");
    let o = tinygpt(
        &[
            "export",
            "--checkpoint",
            r,
            "--format",
            "hf",
            "--out",
            hf.to_str().unwrap(),
        ],
        ws.dir.path(),
    );
    fails_with(&o, &holder);
    assert!(!hf.exists());
    let o = tinygpt(&["inspect", r], ws.dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    // kill -9: the kernel drops the lock with the process; a resume takes it at once.
    child.kill().unwrap();
    child.wait().unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("last/state.json")).unwrap()).unwrap();
    let step = state["step"].as_u64().unwrap();
    let more = format!("training.max_iters={}", step + 10);
    let o = tinygpt(&["train", "--resume", r, "--set", &more], ws.dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = tinygpt::run::checkpoint::load(&run.join("last"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(ck.state.unwrap().step as u64, step + 10);
}

#[test]
fn readers_read_a_run_that_saves_every_step() {
    let ws = Workspace::new(20_000);
    let run = ws.path("run");
    let mut child = spawn_train(
        &ws,
        &run,
        &[
            "training.max_iters=300",
            "training.lr_decay_iters=300",
            "training.checkpoint_interval=1",
            "training.eval_interval=3",
        ],
    );
    wait_for_checkpoint(&run, Duration::from_secs(60));
    let r = run.to_str().unwrap().to_string();
    let last: PathBuf = run.join("last");
    let l = last.to_str().unwrap().to_string();
    let plot = ws.path("loss.svg");
    let p = plot.to_str().unwrap().to_string();
    let readers: Vec<Vec<&str>> = vec![
        vec![
            "generate",
            "--checkpoint",
            &r,
            "--prompt",
            "The",
            "--max-new-tokens",
            "20",
        ],
        vec![
            "generate",
            "--checkpoint",
            &l,
            "--prompt",
            "The",
            "--max-new-tokens",
            "20",
        ],
        vec!["inspect", &l, "--json"],
        vec!["inspect", &r],
        vec!["plot", &r, "--out", &p],
        vec!["plot", &r],
        vec!["tokenize", "--checkpoint", &l, "the king"],
    ];
    let mut rounds = 0;
    let mut steps_seen = std::collections::BTreeSet::new();
    while child.try_wait().unwrap().is_none() {
        for args in &readers {
            let o = tinygpt(args, ws.dir.path());
            assert!(
                o.status.success(),
                "{args:?} during the run: {}",
                stderr(&o)
            );
            if args[0] == "inspect" && args.len() == 3 {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                steps_seen.insert(v["step"].as_u64().unwrap());
            }
        }
        rounds += 1;
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        rounds >= 3,
        "the readers ran {rounds} rounds during the run"
    );
    assert!(
        steps_seen.len() >= 2,
        "they saw the run move: {steps_seen:?}"
    );
}
