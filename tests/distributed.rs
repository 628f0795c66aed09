//! Data-parallel training under `mpirun` (built only with `--features mpi`; the README's test
//! command runs it): the same training as one process, bit for bit on 2 and 4 ranks with
//! dropout on; resume across rank counts; rank 0 alone writes; refusals and faults end every
//! rank with one line.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{checkpoint_weights, fails_with, stderr, stdout, tinygpt, Workspace};

/// `mpirun -np N tinygpt ARGS` in `cwd`, unbound (tests run side by side), as root too (CI),
/// with no stdin.
fn mpirun_cmd(np: usize, args: &[&str], cwd: &Path) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        &np.to_string(),
    ])
    .arg(env!("CARGO_BIN_EXE_tinygpt"))
    .args(args)
    .current_dir(cwd)
    .stdin(Stdio::null())
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

/// A run of the tiny config that trains until it is stopped, with `checkpoints` (a
/// `training.checkpoint_interval=` override).
fn endless(checkpoints: &'static str) -> Vec<&'static str> {
    train_args(
        "run",
        "training.grad_accum_steps=2",
        "training.max_iters=1000000",
        &[
            "--set",
            checkpoints,
            "--set",
            "training.lr_decay_iters=1000000",
        ],
    )
}

fn mpirun(np: usize, args: &[&str], cwd: &Path) -> Output {
    mpirun_cmd(np, args, cwd).output().unwrap()
}

/// The tiny config with dropout on, `accum` micro-batches a step, `steps` steps.
fn train_args<'a>(out: &'a str, accum: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--config",
        "tiny.toml",
        "--out",
        out,
        "--quiet",
        "--set",
        "model.dropout=0.1",
        "--set",
        accum,
        "--set",
        steps,
        "--set",
        "training.lr_decay_iters=40",
        "--set",
        "training.warmup_iters=1",
    ];
    a.extend_from_slice(extra);
    a
}

fn ok(o: &Output) {
    assert!(o.status.success(), "failed: {}\n{}", stdout(o), stderr(o));
}

/// Weights as bit patterns, by name.
fn bits(dir: &Path) -> Vec<(String, Vec<u32>)> {
    checkpoint_weights(dir)
        .into_iter()
        .map(|(n, v)| (n, v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// metrics.csv without its timing columns (tokens/s, elapsed).
fn losses(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
        .collect()
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir) {
        let e = e.unwrap();
        if e.file_type().is_file() {
            let rel = e.path().strip_prefix(dir).unwrap();
            out.push(rel.display().to_string());
        }
    }
    out.sort();
    out
}

#[test]
fn two_and_four_ranks_train_bit_for_bit_as_one_process_with_dropout() {
    let ws = Workspace::new(20_000);
    let cwd = ws.dir.path();
    let accum = "training.grad_accum_steps=4";
    let steps = "training.max_iters=12";
    ok(&tinygpt(&train_args("one", accum, steps, &[]), cwd));
    ok(&mpirun(2, &train_args("two", accum, steps, &[]), cwd));
    ok(&mpirun(4, &train_args("four", accum, steps, &[]), cwd));
    let one = bits(&ws.path("one/last"));
    assert_eq!(bits(&ws.path("two/last")), one, "2 ranks");
    assert_eq!(bits(&ws.path("four/last")), one, "4 ranks");
    assert_eq!(losses(&ws.path("two")), losses(&ws.path("one")));
    assert_eq!(losses(&ws.path("four")), losses(&ws.path("one")));
    // Rank 0 alone writes: the same files as one process, each metrics row once.
    assert_eq!(files(&ws.path("two")), files(&ws.path("one")));
    assert_eq!(files(&ws.path("four")), files(&ws.path("one")));
    // The weights moved: a run that trained nothing would also compare equal.
    let fresh = tinygpt(&train_args("zero", accum, "training.max_iters=1", &[]), cwd);
    ok(&fresh);
    assert_ne!(bits(&ws.path("zero/last")), one);
}

#[test]
fn three_ranks_train_within_float_rounding_of_one_process() {
    let ws = Workspace::new(20_000);
    let cwd = ws.dir.path();
    let accum = "training.grad_accum_steps=6";
    let steps = "training.max_iters=10";
    ok(&tinygpt(&train_args("one", accum, steps, &[]), cwd));
    let o = mpirun(3, &train_args("three", accum, steps, &[]), cwd);
    ok(&o);
    let one = checkpoint_weights(&ws.path("one/last"));
    let three = checkpoint_weights(&ws.path("three/last"));
    let mut worst = 0.0f32;
    for ((n, a), (m, b)) in one.iter().zip(&three) {
        assert_eq!(n, m);
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs() / (x.abs() + 1e-3));
        }
    }
    assert!(worst < 1e-3, "3 ranks drift from one process by {worst}");
}

#[test]
fn a_run_checkpointed_on_four_ranks_resumes_on_one_or_two_on_the_same_trajectory() {
    let ws = Workspace::new(20_000);
    let cwd = ws.dir.path();
    let accum = "training.grad_accum_steps=4";
    ok(&tinygpt(
        &train_args("straight", accum, "training.max_iters=16", &[]),
        cwd,
    ));
    ok(&mpirun(
        4,
        &train_args("four", accum, "training.max_iters=8", &[]),
        cwd,
    ));
    for (np, name) in [(1, "on-one"), (2, "on-two")] {
        let copy = ws.path(name);
        std::fs::create_dir_all(&copy).unwrap();
        common::copy_checkpoint(&ws.path("four/last"), &copy.join("last"));
        std::fs::copy(ws.path("four/metrics.csv"), copy.join("metrics.csv")).unwrap();
        let args = [
            "train",
            "--resume",
            name,
            "--quiet",
            "--set",
            "training.max_iters=16",
        ];
        let o = match np {
            1 => tinygpt(&args, cwd),
            n => mpirun(n, &args, cwd),
        };
        ok(&o);
        assert_eq!(
            bits(&copy.join("last")),
            bits(&ws.path("straight/last")),
            "resumed on {np}"
        );
        // (The 4-rank run evaluated at its last step, 8, and the straight run did not.)
        let train_only = |run: &Path| -> Vec<String> {
            let rows = losses(run);
            rows.iter()
                .map(|r| r.split(',').take(2).collect::<Vec<_>>().join(","))
                .collect()
        };
        assert_eq!(
            train_only(&copy),
            train_only(&ws.path("straight")),
            "resumed on {np}"
        );
    }
}

#[test]
fn an_accumulation_count_that_does_not_divide_is_refused_before_anything_starts() {
    let ws = Workspace::new(5_000);
    let o = mpirun(
        2,
        &train_args(
            "run",
            "training.grad_accum_steps=3",
            "training.max_iters=5",
            &[],
        ),
        ws.dir.path(),
    );
    fails_with(
        &o,
        "training.grad_accum_steps = 3 does not divide among 2 ranks",
    );
    assert_eq!(
        stderr(&o).matches("does not divide").count(),
        1,
        "one line, from rank 0"
    );
    assert!(!ws.path("run").exists(), "nothing left behind");
}

#[test]
fn killing_one_rank_ends_the_job_and_leaves_a_checkpoint_that_resumes() {
    let ws = Workspace::new(20_000);
    let cwd = ws.dir.path();
    let args = endless("training.checkpoint_interval=5");
    let mut job = mpirun_cmd(2, &args, cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for_checkpoint(&ws.path("run"), Duration::from_secs(60));
    let ranks = ranks_of(job.id());
    assert_eq!(ranks.len(), 2, "two ranks running: {ranks:?}");
    let victim = ranks.iter().find(|(_, r)| *r == 1).unwrap().0;
    // SAFETY: kill(2) on a pid we just read.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the job outlived its rank"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("rank 1"), "names the rank: {err}");
    for (pid, rank) in ranks {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
            "rank {rank} survived"
        );
    }
    // The last checkpoint is whole: it resumes (on one process) for a step.
    let step: usize = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(ws.path("run/last/state.json")).unwrap(),
    )
    .unwrap()["step"]
        .as_u64()
        .unwrap() as usize;
    let more = format!("training.max_iters={}", step + 1);
    ok(&tinygpt(
        &["train", "--resume", "run", "--quiet", "--set", &more],
        cwd,
    ));
}

/// The tinygpt processes `mpirun` (pid `job`) started, with their ranks.
fn ranks_of(job: u32) -> Vec<(u32, usize)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid: u32 = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if ppid != job {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = env
            .split(|&b| b == 0)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .find_map(|v| v.strip_prefix("OMPI_COMM_WORLD_RANK="))
            .and_then(|r| r.parse().ok());
        if let Some(r) = rank {
            out.push((pid, r));
        }
    }
    out
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[test]
fn sigterm_to_mpirun_stops_every_rank_at_one_step_and_rank_0_saves_it() {
    let ws = Workspace::new(20_000);
    let cwd = ws.dir.path();
    let args = endless("training.checkpoint_interval=1000000");
    let job = mpirun_cmd(2, &args, cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first evaluation writes best/; then let it train a little.
    let start = Instant::now();
    while !ws.path("run/best/state.json").exists() {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(job.id() as i32, libc::SIGTERM) };
    let o = job.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    let line = err
        .lines()
        .find(|l| l.starts_with("interrupted by SIGTERM"))
        .unwrap_or_else(|| panic!("no interruption line: {err}"));
    assert_eq!(
        err.matches("interrupted by").count(),
        1,
        "rank 0 alone says it"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path("run/last/state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(
        step > 0 && line.contains(&format!("at step {step};")),
        "{line}"
    );
}

#[test]
fn eval_on_two_ranks_gives_the_same_numbers_as_one_process() {
    let ws = Workspace::new(20_000);
    let cwd = ws.dir.path();
    ok(&tinygpt(
        &train_args(
            "run",
            "training.grad_accum_steps=1",
            "training.max_iters=3",
            &[],
        ),
        cwd,
    ));
    let args = ["eval", "--checkpoint", "run", "--json"];
    let one = tinygpt(&args, cwd);
    let two = mpirun(2, &args, cwd);
    ok(&one);
    ok(&two);
    assert_eq!(stdout(&two), stdout(&one), "printed once, the same bits");
    assert!(stdout(&one).contains("\"loss\""));
}

#[test]
fn bench_under_mpirun_reports_the_ranks_and_the_all_reduce_share() {
    let ws = Workspace::new(5_000);
    let o = mpirun(
        2,
        &[
            "bench",
            "--config",
            "tiny.toml",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--gen-tokens",
            "5",
            "--json",
            "--set",
            "training.grad_accum_steps=2",
        ],
        ws.dir.path(),
    );
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["ranks"], 2);
    // Unbound ranks share the host's cores out.
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(v["threads"], (cores / 2).max(1));
    let share = v["allreduce_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{share}");
    assert!(v["train_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_rank_that_cannot_reach_the_others_fails_in_bounded_time_with_one_line() {
    let ws = Workspace::new(5_000);
    // Rank 1 is a program that never joins MPI: rank 0 waits for it in vain.
    let started = Instant::now();
    let args = train_args(
        "run",
        "training.grad_accum_steps=2",
        "training.max_iters=5",
        &[],
    );
    let o = mpirun_cmd(1, &args, ws.dir.path())
        .args([":", "-np", "1", "sleep", "120"])
        .env("TINYGPT_MPI_TIMEOUT", "3")
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(60));
    fails_with(&o, "rank 0: the other ranks did not answer within 3 s");
    assert!(!ws.path("run").exists());
}

#[test]
fn the_mpi_build_without_mpirun_trains_as_one_process() {
    let ws = Workspace::new(5_000);
    let o = tinygpt(
        &train_args(
            "run",
            "training.grad_accum_steps=3",
            "training.max_iters=2",
            &[],
        ),
        ws.dir.path(),
    );
    ok(&o);
    assert!(ws.path("run/last/state.json").exists());
}

#[test]
fn ranks_that_read_different_corpora_are_refused_naming_the_rank() {
    let ws = Workspace::new(5_000);
    std::fs::write(ws.path("other.txt"), common::corpus(6_000)).unwrap();
    let args = train_args(
        "run",
        "training.grad_accum_steps=2",
        "training.max_iters=3",
        &[],
    );
    // Rank 1 trains on another corpus, as a host with other files would.
    let o = mpirun_cmd(1, &args, ws.dir.path())
        .args([":", "-np", "1"])
        .arg(env!("CARGO_BIN_EXE_tinygpt"))
        .args(&args)
        .args(["--data", "other.txt"])
        .output()
        .unwrap();
    fails_with(
        &o,
        "rank 1's config, tokenizer, data or weights differs from rank 0's",
    );
    assert_eq!(stderr(&o).matches("differs from rank 0").count(), 1);
    assert!(!ws.path("run").exists(), "nothing left behind");
}
