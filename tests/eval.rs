//! `tinygpt eval`: the whole-split loss against a brute-force sum over the same windows, its
//! derived numbers, determinism across engines, and the command end to end.

mod common;

use candle_core::{Device, Tensor};
use tinygpt::data::corpus::Split;
use tinygpt::dist::Comm;
use tinygpt::engine::Engine;
use tinygpt::engine::{EngineKind, EngineOptions};
use tinygpt::run::config::Config;
use tinygpt::train::eval::evaluate;
use tinygpt::train::{ProgressMode, Trainer};

use common::{fails_with, stderr, stdout, tinygpt, train_tiny, Workspace};

fn trained(ws: &Workspace) -> Trainer {
    let cfg = Config::load(&ws.path("tiny.toml"), &[]).unwrap();
    let mut t = Trainer::on_device(cfg, &Device::Cpu, ProgressMode::Quiet).unwrap();
    for _ in 0..5 {
        t.train_step().unwrap();
    }
    t
}

#[test]
fn whole_split_loss_is_the_mean_over_every_token_once() {
    let ws = Workspace::new(5000);
    let t = trained(&ws);
    let block = t.config.model.block_size;
    for split in [Split::Val, Split::Train] {
        let n = t.dataset.len(split);
        let e = evaluate(
            &t.engine,
            &t.tokenizer,
            &t.dataset,
            split,
            block,
            ProgressMode::Quiet,
            &Comm::single(),
        )
        .unwrap();
        assert_eq!(
            e.tokens,
            n - 1,
            "every token after the first is predicted once"
        );
        // The same windows one at a time through the reference model's own loss.
        let mut nats = 0.0f64;
        for s in (0..n - 1).step_by(block) {
            let len = block.min(n - 1 - s);
            let (mut x, mut y) = (Vec::new(), Vec::new());
            t.dataset.tokens(split, s..s + len, &mut x).unwrap();
            t.dataset.tokens(split, s + 1..s + len + 1, &mut y).unwrap();
            let x = Tensor::from_vec(x, (1, len), &Device::Cpu).unwrap();
            let y = Tensor::from_vec(y, (1, len), &Device::Cpu).unwrap();
            let l = t
                .model
                .loss(&x, &y, None)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            nats += l as f64 * len as f64;
        }
        let want = nats / (n - 1) as f64;
        assert!(
            (e.loss - want).abs() < 1e-5,
            "{split:?}: {} vs {want}",
            e.loss
        );
        assert!((e.perplexity - e.loss.exp()).abs() < 1e-9);
        // The corpus is ASCII: one byte per character token.
        assert_eq!(e.bytes, e.tokens);
        let bpb = e.loss * e.tokens as f64 / std::f64::consts::LN_2 / e.bytes as f64;
        assert!((e.bits_per_byte - bpb).abs() < 1e-9);
        assert!(e.loss > 0.5 && e.loss < 4.0, "a 5-step model: {}", e.loss);
    }
}

#[test]
fn both_engines_give_the_same_number_every_time() {
    let ws = Workspace::new(5000);
    let t = trained(&ws);
    let block = t.config.model.block_size;
    let run = |kernels| {
        let engine = Engine::new(&t.model, &EngineOptions::new(kernels), false).unwrap();
        evaluate(
            &engine,
            &t.tokenizer,
            &t.dataset,
            Split::Val,
            block,
            ProgressMode::Quiet,
            &Comm::single(),
        )
        .unwrap()
    };
    let (r, f) = (run(EngineKind::Reference), run(EngineKind::Fused));
    assert_eq!(r, run(EngineKind::Reference), "deterministic");
    assert_eq!(f, run(EngineKind::Fused), "deterministic");
    assert!(
        (r.loss - f.loss).abs() < 1e-5 * r.loss,
        "{} vs {}",
        r.loss,
        f.loss
    );
    assert_eq!((r.tokens, r.bytes), (f.tokens, f.bytes));
}

#[test]
fn eval_command_reports_json_and_names_bad_inputs() {
    let ws = Workspace::new(5000);
    let (out, _) = train_tiny(&ws, "run", 6);
    let run = |extra: &[&str]| {
        let mut args = vec!["eval", "--checkpoint", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        tinygpt(&args, ws.dir.path())
    };
    let o = run(&["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    for key in [
        "loss",
        "perplexity",
        "bits_per_byte",
        "tokens",
        "bytes",
        "split",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["split"], "val");
    let loss = v["loss"].as_f64().unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    // The default is the run's own corpus and split; naming them gives the same numbers.
    let same = run(&["--json", "--data", "corpus.txt", "--split", "val"]);
    let same: serde_json::Value = serde_json::from_str(stdout(&same).trim()).unwrap();
    for key in ["loss", "tokens", "bytes", "split"] {
        assert_eq!(same[key], v[key], "{key}");
    }
    let train = run(&["--json", "--split", "train"]);
    let tv: serde_json::Value = serde_json::from_str(stdout(&train).trim()).unwrap();
    assert_eq!(tv["split"], "train");
    assert!(tv["tokens"].as_u64().unwrap() > 8 * v["tokens"].as_u64().unwrap());
    let text = run(&[]);
    assert!(stdout(&text).contains("bits/byte"), "{}", stdout(&text));
    fails_with(&run(&["--split", "test"]), "--split");
    fails_with(&run(&["--data", "missing.txt"]), "missing.txt");
    fails_with(
        &tinygpt(&["eval", "--checkpoint", "nowhere"], ws.dir.path()),
        "nowhere",
    );
}
