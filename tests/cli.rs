//! The real binary, end to end: train → generate → inspect → tokenize, and every bad input
//! ending in one clear line on stderr and a non-zero exit, without a panic.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{copy_checkpoint, fails_with, stderr, stdout, tinygpt, train_tiny, Workspace};

#[test]
fn train_generate_inspect_tokenize() {
    let ws = Workspace::new(4000);
    let (out, o) = train_tiny(&ws, "run", 12);
    let s = stdout(&o);
    assert!(s.contains("done: 12 steps"), "{s}");
    assert!(s.contains("--- sample ---"), "{s}");

    // generate: streams text that starts with the prompt; same seed ⇒ same text
    let gen = |seed: &str| {
        tinygpt(
            &[
                "generate",
                "--checkpoint",
                out.to_str().unwrap(),
                "--prompt",
                "The king",
                "--max-new-tokens",
                "30",
                "--seed",
                seed,
                "--top-k",
                "5",
            ],
            ws.dir.path(),
        )
    };
    let a = gen("1");
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(stdout(&a).starts_with("The king"));
    assert!(stdout(&a).chars().count() >= "The king".len() + 30);
    assert_eq!(stdout(&a), stdout(&gen("1")));
    let two = tinygpt(
        &[
            "generate",
            "--checkpoint",
            out.join("last").to_str().unwrap(),
            "--prompt",
            "the",
            "--max-new-tokens",
            "5",
            "--num-samples",
            "2",
            "--temperature",
            "0",
        ],
        ws.dir.path(),
    );
    assert!(two.status.success());
    // greedy: both samples are the same text
    let text = stdout(&two);
    let parts: Vec<&str> = text.split("---------------\n").map(str::trim_end).collect();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0], parts[1]);

    // inspect: text and JSON
    let i = tinygpt(
        &["inspect", out.join("best").to_str().unwrap()],
        ws.dir.path(),
    );
    assert!(i.status.success(), "{}", stderr(&i));
    let t = stdout(&i);
    assert!(
        t.contains("parameters") && t.contains("wte.weight") && t.contains("h.1.mlp.c_fc.weight"),
        "{t}"
    );
    let j = tinygpt(&["inspect", out.to_str().unwrap(), "--json"], ws.dir.path());
    let v: serde_json::Value = serde_json::from_str(&stdout(&j)).unwrap();
    for key in ["parameters", "step", "best_val_loss", "config", "tensors"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    let n: u64 = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    assert_eq!(v["parameters"].as_u64().unwrap(), n);
    assert_eq!(v["config"]["model"]["n_layer"].as_u64(), Some(2));

    // tokenize: ids of a known text
    let k = tinygpt(
        &["tokenize", "--checkpoint", out.to_str().unwrap(), "king"],
        ws.dir.path(),
    );
    assert!(k.status.success(), "{}", stderr(&k));
    let s = stdout(&k);
    assert!(
        s.contains("4 characters → 4 tokens") && s.contains("\"k\""),
        "{s}"
    );
}

#[test]
fn bad_corpus_inputs() {
    let ws = Workspace::new(4000);
    let cfg = "tiny.toml";
    let run = |data: &str| {
        tinygpt(
            &[
                "train", "--config", cfg, "--data", data, "--out", "o", "--quiet",
            ],
            ws.dir.path(),
        )
    };
    fails_with(&run("missing.txt"), "file not found");
    std::fs::create_dir(ws.path("adir")).unwrap();
    fails_with(&run("adir"), "is a directory");
    std::fs::write(ws.path("empty.txt"), "").unwrap();
    fails_with(&run("empty.txt"), "is empty");
    std::fs::write(ws.path("latin1.txt"), b"hello\nw\xe9rld\n").unwrap();
    fails_with(
        &run("latin1.txt"),
        "not valid UTF-8 (first bad byte at offset 7, line 2)",
    );
    std::fs::write(ws.path("short.txt"), "just a few words\n").unwrap();
    fails_with(&run("short.txt"), "too short");
    assert!(
        !ws.path("o").exists(),
        "a failed start leaves no empty run directory"
    );
}

#[test]
fn bad_config_and_flags() {
    let ws = Workspace::new(4000);
    let t = |args: &[&str]| tinygpt(args, ws.dir.path());
    fails_with(&t(&["train", "--config", "nope.toml"]), "nope.toml");
    fails_with(
        &t(&["train", "--config", "tiny.toml", "--set", "model.n_head=3"]),
        "not a multiple of model.n_head",
    );
    fails_with(
        &t(&[
            "train",
            "--config",
            "tiny.toml",
            "--set",
            "training.bogus=1",
        ]),
        "bogus",
    );
    fails_with(
        &t(&[
            "train",
            "--config",
            "tiny.toml",
            "--set",
            "training.learning_rate=-1",
        ]),
        "training.learning_rate",
    );
    std::fs::write(ws.path("broken.toml"), "[model\nblock_size = ").unwrap();
    fails_with(&t(&["train", "--config", "broken.toml"]), "broken.toml");
    // clap's own errors: exit 2, usage on stderr
    let o = t(&["train", "--no-such-flag"]);
    fails_with(&o, "--no-such-flag");
    assert_eq!(o.status.code(), Some(2));
    fails_with(&t(&["frobnicate"]), "frobnicate");
    // --help works for every subcommand
    for sub in ["train", "generate", "inspect", "tokenize"] {
        let o = t(&[sub, "--help"]);
        assert!(o.status.success() && stdout(&o).contains("Usage"), "{sub}");
    }
}

#[test]
fn bad_generation_inputs_and_checkpoints() {
    let ws = Workspace::new(4000);
    let (out, _) = train_tiny(&ws, "run", 12);
    let o = out.to_str().unwrap();
    let g = |extra: &[&str]| {
        let mut a = vec!["generate", "--checkpoint", o, "--max-new-tokens", "5"];
        a.extend_from_slice(extra);
        tinygpt(&a, ws.dir.path())
    };
    fails_with(
        &g(&["--prompt", "the king\u{1F451}"]),
        "unknown character '\u{1F451}'",
    );
    fails_with(
        &g(&["--prompt", "x", "--temperature", "-1"]),
        "--temperature",
    );
    fails_with(&g(&["--prompt", "the", "--top-p", "0"]), "--top-p");
    fails_with(&g(&["--prompt", "the", "--top-k", "0"]), "--top-k");
    fails_with(
        &g(&["--prompt", "the", "--max-new-tokens", "0"]),
        "--max-new-tokens",
    );
    // an empty prompt starts from a newline, and says so
    let e = g(&["--prompt", ""]);
    assert!(e.status.success(), "{}", stderr(&e));
    assert!(stderr(&e).contains("empty prompt"));
    // a prompt longer than the block is cut, and says so
    let long = "the king ".repeat(10);
    let l = g(&["--prompt", &long]);
    assert!(
        l.status.success() && stderr(&l).contains("last 16"),
        "{}",
        stderr(&l)
    );

    // checkpoints that are missing, corrupt or mismatched
    fails_with(
        &tinygpt(&["inspect", "nowhere"], ws.dir.path()),
        "does not exist",
    );
    let copy = |name: &str| {
        let d = ws.path(name);
        copy_checkpoint(&out.join("last"), &d);
        d
    };
    let d = copy("garbage");
    std::fs::write(
        d.join("model.safetensors"),
        b"not a safetensors file at all",
    )
    .unwrap();
    fails_with(
        &tinygpt(&["inspect", d.to_str().unwrap()], ws.dir.path()),
        "model.safetensors is corrupt or truncated",
    );
    let d = copy("truncated");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &tinygpt(&["inspect", d.to_str().unwrap()], ws.dir.path()),
        "corrupt or truncated",
    );
    let d = copy("noconfig");
    std::fs::remove_file(d.join("config.toml")).unwrap();
    fails_with(
        &tinygpt(&["inspect", d.to_str().unwrap()], ws.dir.path()),
        "config.toml is missing",
    );
    let d = copy("mismatch");
    let cfg = std::fs::read_to_string(d.join("config.toml"))
        .unwrap()
        .replace("n_embd = 32", "n_embd = 64");
    std::fs::write(d.join("config.toml"), cfg).unwrap();
    fails_with(
        &tinygpt(&["inspect", d.to_str().unwrap()], ws.dir.path()),
        "does not match config.toml",
    );
    let d = copy("othertok");
    let tok = tinygpt::data::tokenizer::Tokenizer::train_char("abc")
        .unwrap()
        .to_json()
        .unwrap();
    std::fs::write(d.join("tokenizer.json"), tok).unwrap();
    fails_with(
        &tinygpt(&["inspect", d.to_str().unwrap()], ws.dir.path()),
        "they come from different runs",
    );

    // an existing run directory is not overwritten
    let before = std::fs::read(out.join("last/model.safetensors")).unwrap();
    let again = tinygpt(
        &["train", "--config", "tiny.toml", "--out", o],
        ws.dir.path(),
    );
    fails_with(&again, "already holds checkpoints");
    assert_eq!(
        std::fs::read(out.join("last/model.safetensors")).unwrap(),
        before
    );
}

/// Rewrites `dir/model.safetensors` after `edit` changed its tensors and metadata.
fn rewrite_model(
    dir: &Path,
    edit: impl FnOnce(
        &mut Vec<(String, candle_core::Tensor)>,
        &mut std::collections::HashMap<String, String>,
    ),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap_or_default();
    let map = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = map.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors, &mut meta);
    let out = safetensors::tensor::serialize(tensors, Some(meta)).unwrap();
    std::fs::write(&path, out).unwrap();
}

#[test]
fn checkpoints_that_lie_are_named() {
    let ws = Workspace::new(4000);
    let (out, _) = train_tiny(&ws, "run", 12);
    let copy = |name: &str| {
        let d = ws.path(name);
        copy_checkpoint(&out.join("last"), &d);
        d
    };
    let inspect = |d: &Path| tinygpt(&["inspect", d.to_str().unwrap()], ws.dir.path());

    // a header whose offsets point past the end of the file
    let d = copy("offsets");
    let mut bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let lying = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[9,", 1);
    assert_ne!(lying, header);
    bytes.splice(8..8 + n, lying.into_bytes());
    std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
    fails_with(&inspect(&d), "model.safetensors is corrupt or truncated");

    // a tensor with the wrong name
    let d = copy("names");
    rewrite_model(&d, |t, _| {
        let i = t.iter().position(|(n, _)| n == "ln_f.weight").unwrap();
        t[i].0 = "ln_final.weight".into();
    });
    fails_with(&inspect(&d), "tensor `ln_f.weight` is missing");

    // an extra tensor
    let d = copy("extra");
    rewrite_model(&d, |t, _| {
        let w = t[0].1.clone();
        t.push(("h.9.mlp.c_fc.weight".into(), w));
    });
    fails_with(&inspect(&d), "tensor `h.9.mlp.c_fc.weight` does not belong");

    // the wrong dtype
    let d = copy("dtype");
    rewrite_model(&d, |t, _| {
        for (n, w) in t.iter_mut() {
            if n == "ln_f.weight" {
                *w = w.to_dtype(candle_core::DType::F64).unwrap();
            }
        }
    });
    fails_with(&inspect(&d), "dtype F64, expected f32");

    // the wrong shape
    let d = copy("shape");
    rewrite_model(&d, |t, _| {
        for (n, w) in t.iter_mut() {
            if n == "wpe.weight" {
                *w = w.narrow(0, 0, 8).unwrap();
            }
        }
    });
    fails_with(
        &inspect(&d),
        "tensor `wpe.weight` has shape [8, 32], but the config needs [16, 32]",
    );

    // written by a newer tinygpt
    let d = copy("newer");
    rewrite_model(&d, |_, m| {
        m.insert("format_version".into(), "99".into());
    });
    fails_with(
        &inspect(&d),
        "format version 99, newer than this tinygpt reads",
    );

    // not written by tinygpt at all
    let d = copy("foreign");
    rewrite_model(&d, |_, m| m.clear());
    fails_with(&inspect(&d), "no tinygpt format_version");

    // a corrupt state.json, and a missing optimizer when resuming
    let d = copy("state");
    std::fs::write(d.join("state.json"), "{ not json").unwrap();
    fails_with(&inspect(&d), "state.json is corrupt");
    let d = copy("noopt");
    std::fs::remove_file(d.join("optimizer.safetensors")).unwrap();
    fails_with(
        &tinygpt(
            &["train", "--resume", d.to_str().unwrap(), "--quiet"],
            ws.dir.path(),
        ),
        "optimizer.safetensors is missing",
    );
    // a file passed where a directory is expected
    fails_with(&inspect(&d.join("config.toml")), "is not a directory");
}

#[test]
fn the_shipped_tiny_config_trains_and_prompts_come_from_files_and_stdin() {
    let ws = Workspace::new(6000);
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml");
    let out = ws.path("repo-tiny");
    let o = tinygpt(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--data",
            "corpus.txt",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
        ws.dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = tinygpt::run::checkpoint::load(&out.join("last"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(ck.state.unwrap().step, 60);
    assert_eq!(ck.config.data.path, Path::new("corpus.txt"));

    std::fs::write(ws.path("prompt.txt"), "The lord").unwrap();
    let args = [
        "generate",
        "--checkpoint",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "10",
        "--seed",
        "3",
    ];
    let from_file = tinygpt(
        &[&args[..], &["--prompt-file", "prompt.txt"]].concat(),
        ws.dir.path(),
    );
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tinygpt"))
        .args(args)
        .current_dir(ws.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"The lord").unwrap();
    let from_stdin = child.wait_with_output().unwrap();
    assert!(from_stdin.status.success());
    assert!(stdout(&from_file).starts_with("The lord"));
    assert_eq!(stdout(&from_file), stdout(&from_stdin));
    // a prompt file that is not UTF-8
    std::fs::write(ws.path("bad.txt"), b"\xff\xfe").unwrap();
    fails_with(
        &tinygpt(
            &[&args[..], &["--prompt-file", "bad.txt"]].concat(),
            ws.dir.path(),
        ),
        "not valid UTF-8",
    );
    fails_with(
        &tinygpt(
            &[&args[..], &["--prompt-file", "nope.txt"]].concat(),
            ws.dir.path(),
        ),
        "nope.txt",
    );
}

#[test]
fn every_config_error_is_named_through_the_binary() {
    let ws = Workspace::new(4000);
    let cases = [
        (
            "model.n_layer=\"four\"",
            "invalid type: string \"four\", expected usize in `model.n_layer`",
        ),
        ("model.n_layer=-1", "expected usize in `model.n_layer`"),
        ("model.n_layer=0", "model.n_layer = 0 must be at least 1"),
        ("model.n_embd=0", "model.n_embd = 0 must be at least 1"),
        (
            "model.block_size=0",
            "model.block_size = 0 must be at least 1",
        ),
        (
            "model.n_head=5",
            "model.n_embd = 32 is not a multiple of model.n_head = 5",
        ),
        ("model.dropout=1", "model.dropout = 1 must be in [0, 1)"),
        (
            "model.dropout=-0.1",
            "model.dropout = -0.1 must be in [0, 1)",
        ),
        ("training.engine=\"fast\"", "unknown variant `fast`"),
        ("model.colour=1", "unknown field `colour`"),
        ("tokenizer.kind=\"words\"", "unknown variant `words`"),
        (
            "training.learning_rate=0",
            "training.learning_rate = 0 must be a number > 0",
        ),
        (
            "training.min_lr=1",
            "training.min_lr = 1 must be in [0, learning_rate",
        ),
        (
            "training.batch_size=0",
            "training.batch_size = 0 must be at least 1",
        ),
        (
            "training.max_iters=0",
            "training.max_iters = 0 must be at least 1",
        ),
        (
            "training.warmup_iters=21",
            "training.warmup_iters = 21 is larger than training.max_iters = 20",
        ),
        ("training.beta2=1", "training.beta2 = 1 must be in [0, 1)"),
        (
            "training.weight_decay=-1",
            "training.weight_decay = -1 must be a finite number ≥ 0",
        ),
        (
            "training.grad_clip=-1",
            "training.grad_clip = -1 must be ≥ 0",
        ),
        (
            "training.val_fraction=1.5",
            "training.val_fraction = 1.5 must be in (0, 1)",
        ),
        (
            "training.eval_iters=0",
            "training.eval_iters = 0 must be at least 1",
        ),
        (
            "training.optimizer=\"sgd\"",
            "unknown variant `sgd`, expected `adamw` or `muon`",
        ),
        (
            "training.muon_learning_rate=0",
            "training.muon_learning_rate = 0 must be a number > 0",
        ),
        (
            "training.muon_momentum=1",
            "training.muon_momentum = 1 must be in [0, 1)",
        ),
        (
            "training.muon_momentum_warmup=-5",
            "invalid value: integer `-5`, expected usize",
        ),
        (
            "training.lr_schedule=\"linear\"",
            "unknown variant `linear`, expected `cosine` or `wsd`",
        ),
        (
            "model.position=\"absolute\"",
            "unknown variant `absolute`, expected `learned` or `rope`",
        ),
        (
            "model.logit_softcap=-1",
            "model.logit_softcap = -1 must be 0 (off) or a positive number",
        ),
        (
            "model.tie_embeddings=2",
            "invalid type: integer `2`, expected a boolean",
        ),
        ("data.path=3", "expected path string in `data.path`"),
        ("training", "not of the form section.key=value"),
    ];
    for (set, needle) in cases {
        let o = tinygpt(
            &[
                "train",
                "--config",
                "tiny.toml",
                "--set",
                set,
                "--out",
                "never",
            ],
            ws.dir.path(),
        );
        fails_with(&o, needle);
        assert_eq!(o.status.code(), Some(1), "{set}");
    }
    let o = tinygpt(
        &[
            "train",
            "--config",
            "tiny.toml",
            "--set",
            "tokenizer.kind=\"bpe\"",
            "--set",
            "tokenizer.vocab_size=100",
            "--out",
            "never",
        ],
        ws.dir.path(),
    );
    fails_with(
        &o,
        "tokenizer.vocab_size = 100 is too small for a byte-level BPE: it needs at least 257",
    );
    assert!(
        !ws.path("never").exists(),
        "a bad config must not create the run directory"
    );
}

#[test]
fn huge_max_new_tokens_is_capped_and_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    let ws = Workspace::new(4000);
    let (out, _) = train_tiny(&ws, "run", 12);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tinygpt"))
        .args([
            "generate",
            "--checkpoint",
            out.to_str().unwrap(),
            "--prompt",
            "the",
            "--max-new-tokens",
            "99999999999",
        ])
        .current_dir(ws.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 64];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take()); // like `| head -c 64`
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(
        err.contains("--max-new-tokens 99999999999 capped at 1000000"),
        "{err}"
    );
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("error"), "{err}");
}

#[test]
fn bench_reports_every_key_for_both_kernel_paths() {
    let ws = Workspace::new(4000);
    let dir = ws.path("");
    for kernels in ["fused", "reference"] {
        let o = tinygpt(
            &[
                "bench",
                "--config",
                "tiny.toml",
                "--iters",
                "3",
                "--warmup",
                "1",
                "--gen-tokens",
                "40",
                "--engine",
                kernels,
                "--json",
            ],
            &dir,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["engine"], kernels);
        assert_eq!(v["iters"], 3);
        for key in [
            "train_ms_per_iter",
            "train_tokens_per_s",
            "generate_tokens_per_s",
            "generate_tokens_per_s_no_cache",
            "peak_rss_mb",
            "mfu",
            "sgemm_gflops",
        ] {
            let x = v[key].as_f64().unwrap_or(-1.0);
            assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
        }
        // tokens/s is the batch's tokens over the median step time
        let tps = v["train_tokens_per_s"].as_f64().unwrap();
        let ms = v["train_ms_per_iter"].as_f64().unwrap();
        let tokens = (v["batch_size"].as_u64().unwrap() * v["block_size"].as_u64().unwrap()) as f64;
        assert!((tps - tokens / (ms / 1000.0)).abs() < 1e-6 * tps);
    }
    let table = stdout(&tinygpt(
        &[
            "bench",
            "--config",
            "tiny.toml",
            "--iters",
            "1",
            "--gen-tokens",
            "5",
        ],
        &dir,
    ));
    assert!(
        table.contains("train ms/iter") && table.contains("MFU"),
        "{table}"
    );
    let o = tinygpt(&["bench", "--config", "tiny.toml", "--iters", "0"], &dir);
    fails_with(&o, "--iters and --gen-tokens must be at least 1");
    let o = tinygpt(&["bench", "--config", "missing.toml"], &dir);
    fails_with(&o, "missing.toml");
}

#[test]
fn stop_strings_and_the_repetition_penalty() {
    let ws = Workspace::new(4000);
    let (out, _) = train_tiny(&ws, "run", 30);
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--checkpoint",
            out.to_str().unwrap(),
            "--prompt",
            "The ",
            "--temperature",
            "0",
            "--max-new-tokens",
            "60",
        ];
        args.extend_from_slice(extra);
        let o = tinygpt(&args, ws.dir.path());
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let full = gen(&[]);
    let generated = full.strip_prefix("The ").unwrap().trim_end_matches('\n');
    // A stop string taken from the middle of the output ends it just before its first
    // occurrence in the generated text (the prompt does not count).
    let stop: String = generated.chars().skip(20).take(3).collect();
    let at = generated.find(&stop).unwrap();
    assert_eq!(
        gen(&["--stop", &stop]),
        format!("The {}\n", &generated[..at])
    );
    // Of two stop strings, the first to appear wins; one that never appears changes nothing.
    let early: String = generated.chars().skip(5).take(2).collect();
    let at2 = generated.find(&early).unwrap().min(at);
    assert_eq!(
        gen(&["--stop", &stop, "--stop", &early]),
        format!("The {}\n", &generated[..at2])
    );
    assert_eq!(gen(&["--stop", "\u{1F600}"]), full);
    // A penalty on repeats changes greedy text; 1 is no penalty.
    assert_eq!(gen(&["--repetition-penalty", "1"]), full);
    let penalised = gen(&["--repetition-penalty", "2"]);
    assert_ne!(penalised, full);
    assert_eq!(
        gen(&["--repetition-penalty", "2"]),
        penalised,
        "deterministic"
    );
    for (flag, value, msg) in [
        (
            "--repetition-penalty",
            "0",
            "--repetition-penalty 0 must be > 0",
        ),
        (
            "--repetition-penalty",
            "nan",
            "--repetition-penalty NaN must be > 0",
        ),
        ("--stop", "", "--stop \"\" would stop before any text"),
    ] {
        let o = tinygpt(
            &[
                "generate",
                "--checkpoint",
                out.to_str().unwrap(),
                flag,
                value,
            ],
            ws.dir.path(),
        );
        fails_with(&o, msg);
    }
}

#[test]
fn the_engine_is_a_run_option() {
    let ws = Workspace::new(4000);
    let dir = ws.path("");
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--config",
            "tiny.toml",
            "--out",
            out,
            "--set",
            "training.max_iters=6",
            "--set",
            "model.norm=\"rms\"",
            "--set",
            "model.qk_norm=true",
        ];
        args.extend(extra);
        tinygpt(&args, &dir)
    };
    // An option the fused path lacks: `auto` says so in one line and trains on the reference.
    let o = train("rms", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let notes: Vec<String> = stderr(&o)
        .lines()
        .filter(|l| l.contains("fused engine"))
        .map(String::from)
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("model.norm = \"rms\"") && notes[0].contains("reference engine (slower)")
    );
    // `--engine fused` refuses it, naming the key, before anything is written.
    fails_with(&train("rms-fused", &["--engine", "fused"]), "model.norm");
    assert!(!dir.join("rms-fused").exists());
    // Every command that runs a model takes --engine.
    let ck = "rms";
    for cmd in [
        vec![
            "generate",
            "--checkpoint",
            ck,
            "--prompt",
            "the",
            "--max-new-tokens",
            "5",
        ],
        vec!["eval", "--checkpoint", ck],
        vec!["logits", "--checkpoint", ck, "--prompt", "the"],
        vec!["attention", "--checkpoint", ck, "--prompt", "the"],
    ] {
        let mut fused = cmd.clone();
        fused.extend(["--engine", "fused"]);
        fails_with(
            &tinygpt(&fused, &dir),
            "--engine fused does not support model.norm",
        );
        let mut reference = cmd.clone();
        reference.extend(["--engine", "reference"]);
        let o = tinygpt(&reference, &dir);
        assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("fused engine"),
            "no note when asked for the reference"
        );
    }
    // Export names what GPT-2 cannot express.
    fails_with(
        &tinygpt(
            &[
                "export",
                "--checkpoint",
                ck,
                "--format",
                "hf",
                "--out",
                "hf",
            ],
            &dir,
        ),
        "model.norm = \"rms\"",
    );
    let o = train("qk", &["--set", "model.norm=\"layernorm\""]);
    assert!(o.status.success(), "{}", stderr(&o));
    fails_with(
        &tinygpt(
            &[
                "export",
                "--checkpoint",
                "qk",
                "--format",
                "gguf",
                "--out",
                "qk.gguf",
            ],
            &dir,
        ),
        "model.qk_norm = true",
    );

    // A checkpoint written before the engine was a run option carries `model.kernels`: it
    // loads, and its value is the run's engine (a resumed run stays on it).
    let (old, _) = train_tiny(&ws, "old", 6);
    let cfg_path = old.join("last/config.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(text.contains("engine = \"auto\""), "{text}");
    let text = text
        .replace("engine = \"auto\"\n", "")
        .replace("[model]\n", "[model]\nkernels = \"reference\"\n");
    std::fs::write(&cfg_path, text).unwrap();
    let o = tinygpt(
        &[
            "generate",
            "--checkpoint",
            "old/last",
            "--prompt",
            "the",
            "--max-new-tokens",
            "5",
        ],
        &dir,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = tinygpt(
        &[
            "train",
            "--resume",
            "old",
            "--set",
            "training.max_iters=8",
            "--set",
            "training.lr_decay_iters=8",
        ],
        &dir,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed = std::fs::read_to_string(old.join("last/config.toml")).unwrap();
    assert!(resumed.contains("engine = \"reference\""), "{resumed}");
    assert!(!resumed.contains("kernels"), "{resumed}");
}

#[test]
fn resuming_a_missing_checkpoint_locks_nothing() {
    let ws = Workspace::new(1000);
    let dir = ws.path("");
    let o = tinygpt(&["train", "--resume", "no-such-run/last"], &dir);
    fails_with(&o, "does not exist");
    assert!(
        !dir.join(tinygpt::run::lock::LOCK_FILE).exists() && !dir.join("no-such-run").exists(),
        "a mistyped --resume left a lock file behind"
    );
}

#[test]
fn a_checkpoint_of_the_sequential_stream_resumes_with_a_note() {
    let ws = Workspace::new(5000);
    let (out, _) = train_tiny(&ws, "run", 6);
    // What an older tinygpt wrote: state version 1, with its one stream's position.
    let path = out.join("last/state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    state["format_version"] = 1.into();
    state["rng"] = serde_json::json!({"seed": vec![7; 32], "stream": 1, "word_pos": 4096});
    std::fs::write(&path, state.to_string()).unwrap();
    let o = tinygpt(
        &[
            "train",
            "--resume",
            "run",
            "--quiet",
            "--set",
            "training.max_iters=8",
        ],
        ws.dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("written by an older tinygpt that drew batches and dropout from one stream"),
        "{}",
        stderr(&o)
    );
    let resumed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(resumed["step"], 8);
    assert_eq!(resumed["format_version"], 2);
}

/// A build without MPI, started as one of several ranks, says how to get one that has it
/// (instead of N processes each training alone into the same directory).
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    let ws = Workspace::new(5000);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tinygpt"))
        .args(["train", "--config", "tiny.toml", "--out", "run"])
        .current_dir(ws.dir.path())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "0")
        .output()
        .unwrap();
    fails_with(
        &o,
        "built without MPI; build it with `cargo build --release --features mpi`",
    );
    assert!(!ws.path("run").exists());
}
