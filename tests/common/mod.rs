//! Helpers shared by the integration tests: small generated corpora and configs.
#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};

/// A deterministic pseudo-English corpus of about `bytes` bytes (no real text is copied).
pub fn corpus(bytes: usize) -> String {
    const WORDS: [&str; 24] = [
        "the", "king", "shall", "speak", "and", "we", "go", "to", "war", "my", "lord", "fair",
        "night", "day", "love", "is", "not", "so", "what", "say", "you", "good", "sir", "now",
    ];
    let mut s = String::with_capacity(bytes + 64);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut line = 0;
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        if line == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
        } else {
            s.push(' ');
            s.push_str(w);
        }
        line += 1;
        if x.is_multiple_of(13) {
            s.push_str(" \"quoth\"");
        } else if x.is_multiple_of(17) {
            s.push_str(" a\\b");
        }
        if x.is_multiple_of(7) {
            s.push_str(".\n");
            line = 0;
        } else if x.is_multiple_of(11) {
            s.push_str(",\n");
            line = 0;
        }
    }
    s.push('\n');
    s
}

/// A small model's config for tests of the model itself: 2 layers of `n_head` heads, 24 wide,
/// block 16, LayerNorm with biases, learned positions, tied head.
pub fn model_cfg(n_head: usize) -> tinygpt::model::ModelConfig {
    tinygpt::model::ModelConfig {
        block_size: 16,
        n_layer: 2,
        n_head,
        n_embd: 24,
        dropout: 0.0,
        bias: true,
        qkv_bias: false,
        activation: Default::default(),
        position: Default::default(),
        tie_embeddings: true,
        zero_init: false,
        logit_softcap: 0.0,
        bigram_buckets: 0,
        norm: Default::default(),
        qk_norm: false,
    }
}

/// The text of a tiny config reading `data`, with extra `[section] key = value` lines applied
/// through overrides by the caller.
pub fn tiny_config(data: &Path) -> String {
    format!(
        r#"
[model]
block_size = 16
n_layer = 2
n_head = 2
n_embd = 32
dropout = 0.0
bias = false

[tokenizer]
kind = "char"

[training]
batch_size = 8
max_iters = 20
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 4
lr_decay_iters = 20
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
grad_accum_steps = 1
eval_interval = 10
eval_iters = 3
val_fraction = 0.1
seed = 7
checkpoint_interval = 5

[data]
path = {:?}
"#,
        data.display().to_string()
    )
}

/// Options for a quiet library run into `out`, continuing the run there when `resume`.
pub fn run_options(out: &Path, resume: bool) -> tinygpt::train::RunOptions {
    tinygpt::train::RunOptions {
        out: out.to_path_buf(),
        resume: resume.then(|| out.to_path_buf()),
        progress: tinygpt::train::ProgressMode::Quiet,
        stop: None,
    }
}

/// The run saved in checkpoint `dir`, continued on the CPU with `overrides`.
pub fn resume_on_cpu(dir: &Path, overrides: &[&str]) -> tinygpt::train::Trainer {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    use tinygpt::train::Trainer;
    let cpu = candle_core::Device::Cpu;
    let ck = tinygpt::run::checkpoint::load(dir, &cpu).unwrap();
    let config = Trainer::resumed_config(&ck, &overrides, None).unwrap();
    let ctx = tinygpt::run::context::RunContext::for_training(&config, &cpu).unwrap();
    Trainer::resume(ck, config, &ctx, tinygpt::train::ProgressMode::Quiet).unwrap()
}

/// A temporary directory holding `corpus.txt` and `tiny.toml`.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(corpus_bytes: usize) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("corpus.txt");
        std::fs::write(&data, corpus(corpus_bytes)).unwrap();
        std::fs::write(dir.path().join("tiny.toml"), tiny_config(&data)).unwrap();
        Workspace { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs the `tinygpt` binary in `cwd` with no stdin.
pub fn tinygpt(args: &[&str], cwd: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tinygpt"))
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: non-zero exit, `needle` on stderr, no panic or backtrace.
pub fn fails_with(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
}

/// Every parameter's values, by name.
pub fn param_values(params: &tinygpt::model::Params) -> Vec<(String, Vec<f32>)> {
    params
        .vars()
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

/// The weights of the checkpoint in `dir`, by name.
pub fn checkpoint_weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = tinygpt::run::checkpoint::load(dir, &candle_core::Device::Cpu).unwrap();
    param_values(&ck.params)
}

/// Copies the checkpoint files of `from` into a new directory `to`.
pub fn copy_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [
        "model.safetensors",
        "config.toml",
        "tokenizer.json",
        "optimizer.safetensors",
        "state.json",
    ] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Waits until a training run into `out` has written its first complete checkpoint.
pub fn wait_for_checkpoint(out: &Path, limit: std::time::Duration) {
    let start = std::time::Instant::now();
    while !out.join("last/state.json").exists() {
        assert!(start.elapsed() < limit, "training never checkpointed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Caps the size of files the command may write (RLIMIT_FSIZE), standing in for a full disk:
/// writes past the cap fail with an I/O error.
pub fn limit_file_size(cmd: &mut std::process::Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Trains the workspace's tiny config for `steps` steps into `ws/name`; returns the run
/// directory and the command's output (it must succeed).
pub fn train_tiny(ws: &Workspace, name: &str, steps: usize) -> (PathBuf, std::process::Output) {
    let out = ws.path(name);
    let iters = format!("training.max_iters={steps}");
    let o = tinygpt(
        &[
            "train",
            "--config",
            "tiny.toml",
            "--out",
            out.to_str().unwrap(),
            "--set",
            &iters,
        ],
        ws.dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    (out, o)
}
