//! Fuzzing on the stable toolchain: proptest feeds the config parser, the tokenizer loader and
//! the checkpoint loader generated and mutated inputs. Each must answer with `Ok` or a clean
//! `Err`, never a panic. The normal suite runs a few hundred cases per target; the ignored
//! `fuzz_for_a_while` runs one target for `FUZZ_SECONDS` (default 600) and reports the count:
//!
//! ```sh
//! FUZZ_TARGET=checkpoint FUZZ_SECONDS=600 cargo test --release --test fuzz -- --ignored --nocapture
//! ```

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use tinygpt::data::tokenizer::Tokenizer;
use tinygpt::run::config::Config;
use tinygpt::train::{ProgressMode, Trainer};

/// A small valid checkpoint (char and BPE tokenizers), read into memory once.
struct Fixture {
    files: Vec<(&'static str, Vec<u8>)>,
    config: String,
    bpe_json: String,
    _dir: tempfile::TempDir,
}

const FILES: [&str; 5] = [
    "model.safetensors",
    "config.toml",
    "tokenizer.json",
    "optimizer.safetensors",
    "state.json",
];

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ws = common::Workspace::new(3000);
        let cfg = Config::load(
            &ws.path("tiny.toml"),
            &["model.n_layer=1".into(), "model.n_embd=8".into()],
        )
        .unwrap();
        let config = std::fs::read_to_string(ws.path("tiny.toml")).unwrap();
        let mut t = Trainer::on_device(cfg, &Device::Cpu, ProgressMode::Quiet).unwrap();
        t.train_step().unwrap();
        let dir = ws.path("ck");
        t.save(&dir).unwrap();
        let files = FILES
            .iter()
            .map(|f| (*f, std::fs::read(dir.join(f)).unwrap()))
            .collect();
        let bpe_json = Tokenizer::train_bpe(&common::corpus(3000), 300)
            .unwrap()
            .to_json()
            .unwrap();
        Fixture {
            files,
            config,
            bpe_json,
            _dir: ws.dir,
        }
    })
}

/// One edit of a byte string; positions wrap around its length.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Changes an ASCII digit: offsets, sizes and numbers in headers and text formats.
    Digit(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), 1usize..16).prop_map(|(p, n)| Mutation::Delete(p, n)),
        (any::<usize>(), b'0'..=b'9').prop_map(|(p, d)| Mutation::Digit(p, d)),
    ]
}

fn mutate(input: &[u8], edits: &[Mutation]) -> Vec<u8> {
    let mut b = input.to_vec();
    for e in edits {
        let n = b.len().max(1);
        match e {
            Mutation::Set(p, v) => {
                if !b.is_empty() {
                    b[p % n] = *v;
                }
            }
            Mutation::Truncate(p) => b.truncate(p % n),
            Mutation::Insert(p, bytes) => {
                let at = p % (b.len() + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete(p, k) => {
                let at = p % n;
                let end = (at + k).min(b.len());
                if at < end {
                    b.drain(at..end);
                }
            }
            Mutation::Digit(p, d) => {
                let digits: Vec<usize> = (0..b.len()).filter(|&i| b[i].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    b[digits[p % digits.len()]] = *d;
                }
            }
        }
    }
    b
}

/// The config parser on mutated config text and arbitrary overrides.
fn config_target(text: &[u8], overrides: &[String]) -> Result<(), TestCaseError> {
    if let Ok(s) = std::str::from_utf8(text) {
        if let Ok(cfg) = Config::parse(s, overrides) {
            // whatever parses is valid
            prop_assert!(cfg.model.n_embd % cfg.model.n_head == 0);
            prop_assert!(cfg.training.learning_rate > 0.0);
        }
    }
    Ok(())
}

/// The tokenizer loader on mutated tokenizer.json; a tokenizer that loads must encode and
/// decode without panicking.
fn tokenizer_target(json: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(s) = std::str::from_utf8(json) {
        if let Ok(t) = Tokenizer::from_json(s) {
            let text = "The king shall speak, \"quoth\" a\\b.\n日本 🎭";
            if let Ok(ids) = t.encode(text) {
                let _ = t.decode(&ids);
                for &id in ids.iter().take(8) {
                    let _ = t.token_text(id);
                }
            }
            let _ = t.decode(&[0, 1, u32::MAX]);
            let mut st = t.stream();
            for id in 0..t.vocab_size().min(40) as u32 {
                let _ = st.step(id);
            }
        }
    }
    Ok(())
}

fn scratch_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = fixture()
        ._dir
        .path()
        .join(format!("fuzz-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The checkpoint loader on a checkpoint with one mutated file; a checkpoint that loads must
/// run and report.
fn checkpoint_target(which: usize, bytes: &[u8]) -> Result<(), TestCaseError> {
    let f = fixture();
    let dir = scratch_dir();
    for (i, (name, content)) in f.files.iter().enumerate() {
        std::fs::write(dir.join(name), if i == which { bytes } else { content }).unwrap();
    }
    if let Ok(ck) = tinygpt::run::checkpoint::load(&dir, &Device::Cpu) {
        let x = Tensor::from_slice(&[0u32, 1, 2], (1, 3), &Device::Cpu).unwrap();
        let _ = ck.model.forward(&x, None);
        let _ = tinygpt::run::inspect::Report::new(&ck);
        let _ = tinygpt::run::checkpoint::load_optimizer(&dir, &ck.params, &Device::Cpu);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    Ok(())
}

fn edits() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..6)
}

/// Runs `target` for `cases` cases, or until `deadline`; returns how many ran.
fn run(name: &str, cases: u32, deadline: Option<Instant>) -> u64 {
    let f = fixture();
    let mut count = 0u64;
    loop {
        let mut runner = TestRunner::new(RunnerConfig {
            cases,
            failure_persistence: None,
            ..RunnerConfig::default()
        });
        let result = match name {
            "config" => runner
                .run(
                    &(
                        edits(),
                        prop::collection::vec("[a-z_.]{0,24}=[ -~]{0,12}", 0..3),
                    ),
                    |(e, ov)| {
                        config_target(&mutate(f.config.as_bytes(), &e), &ov)?;
                        config_target(
                            &e.iter()
                                .flat_map(|m| format!("{m:?}").into_bytes())
                                .collect::<Vec<_>>(),
                            &[],
                        )
                    },
                )
                .map_err(|e| e.to_string()),
            "tokenizer" => {
                let char_json = &f.files[2].1;
                runner
                    .run(&(edits(), any::<bool>()), |(e, bpe)| {
                        let base = if bpe {
                            f.bpe_json.as_bytes()
                        } else {
                            char_json.as_slice()
                        };
                        tokenizer_target(&mutate(base, &e))
                    })
                    .map_err(|e| e.to_string())
            }
            "checkpoint" => runner
                .run(&(0usize..FILES.len(), edits()), |(which, e)| {
                    checkpoint_target(which, &mutate(&f.files[which].1, &e))
                })
                .map_err(|e| e.to_string()),
            other => panic!("unknown FUZZ_TARGET {other}: use config, tokenizer or checkpoint"),
        };
        if let Err(e) = result {
            panic!("fuzz target {name} failed: {e}");
        }
        count += cases as u64;
        match deadline {
            Some(d) if Instant::now() < d => continue,
            _ => return count,
        }
    }
}

#[test]
fn config_parser_never_panics() {
    run("config", 300, None);
}

#[test]
fn tokenizer_loader_never_panics() {
    run("tokenizer", 300, None);
}

#[test]
fn checkpoint_loader_never_panics() {
    run("checkpoint", 200, None);
}

#[test]
#[ignore = "long fuzzing run: FUZZ_TARGET=config|tokenizer|checkpoint FUZZ_SECONDS=600"]
fn fuzz_for_a_while() {
    let target = std::env::var("FUZZ_TARGET").unwrap_or_else(|_| "checkpoint".into());
    let secs: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let start = Instant::now();
    let n = run(&target, 500, Some(start + Duration::from_secs(secs)));
    println!(
        "fuzz target {target}: {n} executions in {:.0} s, no panic",
        start.elapsed().as_secs_f64()
    );
}
