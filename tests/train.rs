//! Training, checkpoints and sampling end to end through the library.

mod common;

use candle_core::{Device, Tensor};
use common::Workspace;
use tinygpt::rng::seeded;
use tinygpt::run::checkpoint;
use tinygpt::run::config::Config;
use tinygpt::sample::{generate, SampleOptions};
use tinygpt::train::{ProgressMode, Trainer};

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    common::param_values(&t.params)
}

#[test]
fn tiny_model_overfits_a_tiny_corpus() {
    let ws = Workspace::new(400);
    let cfg = Config::load(
        &ws.path("tiny.toml"),
        &[
            "training.max_iters=300".into(),
            "training.lr_decay_iters=300".into(),
            "training.eval_interval=300".into(),
            "training.checkpoint_interval=300".into(),
            "training.val_fraction=0.2".into(),
        ],
    )
    .unwrap();
    let mut t = Trainer::on_device(cfg, &Device::Cpu, ProgressMode::Quiet).unwrap();
    let out = ws.path("run");
    let s = t.run(&common::run_options(&out, false)).unwrap();
    let first = t.state.history[0].train_loss;
    let last = t.state.history.last().unwrap().train_loss;
    assert!(first > 2.0, "initial loss {first}");
    assert!(
        last < 0.5 * first && last < 1.3,
        "loss went from {first} to {last}"
    );
    assert_eq!(s.steps, 300);
    // the run directory has what the README promises
    for f in [
        "metrics.csv",
        "last/model.safetensors",
        "last/state.json",
        "best/tokenizer.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("step,train_loss,val_loss,lr,tokens_per_s,elapsed_s")
    );
    assert_eq!(lines.count(), 301); // step 0 (initial eval) + 300 steps
}

#[test]
fn save_then_load_gives_identical_logits() {
    let ws = Workspace::new(3000);
    let cfg = Config::load(&ws.path("tiny.toml"), &["training.max_iters=5".into()]).unwrap();
    let mut t = Trainer::on_device(cfg, &Device::Cpu, ProgressMode::Quiet).unwrap();
    t.train_step().unwrap();
    let dir = ws.path("ck");
    t.save(&dir).unwrap();
    let ck = checkpoint::load(&dir, &Device::Cpu).unwrap();
    let x = Tensor::from_slice(&[1u32, 2, 3, 4, 5, 0, 1], (1, 7), &Device::Cpu).unwrap();
    let logits = |m: &tinygpt::model::Gpt| {
        let l = m.forward(&x, None).unwrap();
        l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b) = (logits(&t.model), logits(&ck.model));
    assert_eq!(a, b);
    assert_eq!(ck.state.unwrap().step, 1);
    assert_eq!(ck.config, t.config);
    assert_eq!(
        ck.tokenizer.encode("the king").unwrap(),
        t.tokenizer.encode("the king").unwrap()
    );
}

#[test]
fn resume_continues_exactly() {
    // On the fused kernels, training runs each block as one op (its own backward, weight
    // gradients through a side store): resume must be exact there too.
    for kernels in ["reference", "fused"] {
        resume_continues_exactly_on(kernels, &[], kernels);
    }
    // Muon keeps its momentum in the checkpoint; the WSD schedule is a function of the step.
    let muon = [
        "training.optimizer=\"muon\"",
        "training.lr_schedule=\"wsd\"",
        "training.cooldown_iters=8",
        "training.muon_momentum_warmup=15",
        "model.activation=\"relu2\"",
    ];
    resume_continues_exactly_on("fused", &muon, "fused");
    // The architecture options: rotary positions (no wpe), an untied, zero-initialised head
    // (its own tensor in the checkpoint) and capped logits, on both engines.
    let arch = [
        "model.position=\"rope\"",
        "model.tie_embeddings=false",
        "model.zero_init=true",
        "model.logit_softcap=10.0",
        "model.bigram_buckets=64",
        "training.optimizer=\"muon\"",
    ];
    for kernels in ["reference", "fused"] {
        resume_continues_exactly_on(kernels, &arch, kernels);
    }
    // Options written in the model only: `auto` runs them on the reference engine.
    let norms = [
        "model.norm=\"rms\"",
        "model.qk_norm=true",
        "model.position=\"rope\"",
        "training.optimizer=\"muon\"",
    ];
    resume_continues_exactly_on("auto", &norms, "reference");
    resume_continues_exactly_on("auto", &norms[1..2], "reference");
}

/// Trains 20 steps on `engine` (which `auto` must resolve to `runs_on`), and 10 + 10 with a
/// resume between: the weights must be the same bits.
fn resume_continues_exactly_on(kernels: &str, extra: &[&str], runs_on: &str) {
    let ws = Workspace::new(5000);
    let over = |n: usize| {
        vec![
            format!("training.max_iters={n}"),
            "training.lr_decay_iters=20".into(),
            "training.eval_interval=4".into(),
            "training.checkpoint_interval=5".into(),
            "model.dropout=0.1".into(),
            "training.grad_accum_steps=2".into(),
            format!("training.engine=\"{kernels}\""),
        ]
        .into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        .collect::<Vec<_>>()
    };
    let cfg = Config::load(&ws.path("tiny.toml"), &over(20)).unwrap();
    let mut whole = Trainer::on_device(cfg, &Device::Cpu, ProgressMode::Quiet).unwrap();
    assert_eq!(whole.engine.kind().name(), runs_on);
    whole
        .run(&common::run_options(&ws.path("whole"), false))
        .unwrap();

    let cfg = Config::load(&ws.path("tiny.toml"), &over(10)).unwrap();
    let mut first = Trainer::on_device(cfg, &Device::Cpu, ProgressMode::Quiet).unwrap();
    let half = ws.path("half");
    first.run(&common::run_options(&half, false)).unwrap();
    let mut second = common::resume_on_cpu(&half.join("last"), &["training.max_iters=20"]);
    assert_eq!(second.state.step, 10);
    second.run(&common::run_options(&half, true)).unwrap();

    let (a, b) = (weights(&whole), weights(&second));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{kernels}: {name} differs after resume");
    }
    // The split run also evaluated at its first end (step 10); every other evaluation agrees.
    let split_history: Vec<_> = second
        .state
        .history
        .iter()
        .filter(|p| p.step != 10)
        .cloned()
        .collect();
    assert_eq!(whole.state.history, split_history);
    // metrics rows agree in step, train loss and lr
    let cols = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                format!("{},{},{}", f[0], f[1], f[3])
            })
            .collect()
    };
    assert_eq!(cols(&ws.path("whole")), cols(&half));
}

#[test]
fn same_seed_same_generation_and_cache_agrees_within_block() {
    let ws = Workspace::new(3000);
    let cfg = Config::load(&ws.path("tiny.toml"), &[]).unwrap();
    let mut t = Trainer::on_device(cfg, &Device::Cpu, ProgressMode::Quiet).unwrap();
    for _ in 0..5 {
        t.train_step().unwrap();
    }
    let prompt = t.tokenizer.encode("The king").unwrap();
    let run = |seed: u64, use_cache: bool, n: usize| {
        let o = SampleOptions {
            max_new_tokens: n,
            temperature: 0.9,
            top_k: Some(10),
            top_p: Some(0.95),
            use_cache,
            ..SampleOptions::default()
        };
        generate(&t.engine, &prompt, &o, &mut seeded(seed), |_| Ok(true)).unwrap()
    };
    assert_eq!(run(1, true, 40), run(1, true, 40));
    assert_ne!(run(1, true, 40), run(2, true, 40));
    // Within the block (16 tokens), cached and uncached sampling see the same logits.
    let room = 16 - prompt.len();
    assert_eq!(run(3, true, room), run(3, false, room));
    let text = t.tokenizer.decode(&run(1, false, 40)).unwrap();
    assert!(!text.is_empty());
}
