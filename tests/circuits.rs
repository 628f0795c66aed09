//! The circuit tools: hooks that change nothing when asked for nothing, ablation that removes
//! exactly a head's term, direct logit attribution that adds up, and `tinygpt heads` finding
//! the induction heads of a model trained where the answer is known.

mod common;

use candle_core::{Device, Tensor};
use serde_json::Value;
use tinygpt::circuits::attribution::direct_logit_attribution;
use tinygpt::circuits::induction_corpus;
use tinygpt::circuits::patching::patch_each_head;
use tinygpt::model::block::SelfAttention;
use tinygpt::model::config::NormKind;
use tinygpt::model::{Gpt, HeadPatch, Hooks, Params};
use tinygpt::rng::seeded;
use tinygpt::run::config::{ModelConfig, Position};

use common::{fails_with, model_cfg, stdout, tinygpt, Workspace};

/// Every variant the hooks must see through: one head or several, LayerNorm with biases or
/// RMSNorm without, learned or rotary positions, bigram features, an untied head.
fn variants() -> Vec<ModelConfig> {
    vec![
        model_cfg(1),
        model_cfg(4),
        ModelConfig {
            position: Position::Rope,
            norm: NormKind::Rms,
            qk_norm: true,
            bias: false,
            tie_embeddings: false,
            bigram_buckets: 40,
            ..model_cfg(3)
        },
    ]
}

fn model(c: &ModelConfig, seed: u64) -> Gpt {
    let mut p = Params::fresh(seeded(seed), &Device::Cpu);
    p.build(|vb| Gpt::new(c, 29, vb)).unwrap()
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    Tensor::from_vec(rows.concat(), (rows.len(), t), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

const A: &[u32] = &[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8];
const B: &[u32] = &[2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5];

#[test]
fn no_hooks_is_the_plain_forward_bit_for_bit() {
    for c in variants() {
        let m = model(&c, 1);
        let x = ids(&[A, B]);
        let trace = m.trace(&x, &Hooks::none()).unwrap();
        assert_eq!(values(&trace.logits), values(&m.forward(&x, None).unwrap()));
        assert_eq!(trace.layers.len(), c.n_layer);
        assert_eq!(trace.residual.len(), c.n_layer + 1);
        let hs = c.n_embd / c.n_head;
        assert_eq!(trace.layers[0].heads.dims(), &[2, c.n_head, A.len(), hs]);
        // The stream adds up: embedding + each block's attention and MLP outputs.
        let mut x0 = trace.residual[0].clone();
        for l in &trace.layers {
            x0 = ((x0 + &l.attn_out).unwrap() + &l.mlp_out).unwrap();
        }
        assert_eq!(values(&x0), values(trace.residual.last().unwrap()));
    }
}

#[test]
fn patching_a_head_from_the_same_prompt_changes_nothing() {
    for c in variants() {
        let m = model(&c, 2);
        let x = ids(&[A, B]);
        let clean = m.trace(&x, &Hooks::none()).unwrap();
        for l in 0..c.n_layer {
            for h in 0..c.n_head {
                let z = clean.layers[l]
                    .heads
                    .narrow(1, h, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap();
                let hooks = Hooks::none().with(l, h, HeadPatch::With(z));
                let patched = m.trace(&x, &hooks).unwrap();
                assert_eq!(
                    values(&patched.logits),
                    values(&clean.logits),
                    "head {l}.{h}"
                );
            }
        }
        // And through the patching tool: every cell is the unpatched difference.
        let p = patch_each_head(&m, A, A, 5, 8).unwrap();
        assert_eq!(p.cells.len(), c.n_layer * c.n_head);
        assert!(p
            .cells
            .iter()
            .all(|cell| cell.logit_diff == p.clean_logit_diff));
        assert!(p.cells.iter().all(|cell| cell.restored.is_none()));
    }
}

#[test]
fn zero_ablation_removes_exactly_the_heads_term() {
    // Zeroing head h's output is zeroing its columns of the output projection.
    let c = model_cfg(4);
    let m = model(&c, 3);
    let x = ids(&[A, B]);
    let (layer, head, hs) = (1, 2, c.n_embd / c.n_head);
    let ablated = m
        .trace(&x, &Hooks::none().with(layer, head, HeadPatch::Zero))
        .unwrap();
    assert_eq!(
        values(&ablated.layers[layer].heads.narrow(1, head, 1).unwrap()),
        vec![0.0; 2 * A.len() * hs]
    );
    let mut edited = m.clone();
    let SelfAttention::Multi(mha) = &mut edited.blocks[layer].attn else {
        panic!("4 heads are a MultiHeadAttention")
    };
    let keep: Vec<f32> = (0..c.n_embd)
        .map(|k| if k / hs == head { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::from_vec(keep, c.n_embd, &Device::Cpu).unwrap();
    mha.c_proj.weight = mha.c_proj.weight.broadcast_mul(&keep).unwrap();
    let want = values(&edited.forward(&x, None).unwrap());
    let got = values(&ablated.logits);
    let worst = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst < 1e-5, "max difference {worst}");
    assert_ne!(
        got,
        values(&m.forward(&x, None).unwrap()),
        "the head mattered"
    );
    // A replacement of the wrong shape is refused, naming the fix; so is a missing head.
    let bad = Tensor::zeros((5, hs), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = m
        .trace(&x, &Hooks::none().with(0, 0, HeadPatch::With(bad)))
        .unwrap_err();
    assert!(e.to_string().contains("(T, hs)"), "{e}");
    let e = m
        .trace(&x, &Hooks::none().with(2, 0, HeadPatch::Zero))
        .unwrap_err();
    assert!(e.to_string().contains("head 2.0 does not exist"), "{e}");
}

#[test]
fn direct_logit_attribution_adds_up_to_the_logit() {
    for c in variants() {
        let m = model(&c, 4);
        let logits = m.forward(&ids(&[A]), None).unwrap();
        for (pos, token) in [(A.len() - 1, 5u32), (3, 0), (0, 28)] {
            let a = direct_logit_attribution(&m, A, pos, Some(token)).unwrap();
            let want = logits
                .get(0)
                .unwrap()
                .get(pos)
                .unwrap()
                .get(token as usize)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let sum: f64 = a.contributions.iter().map(|c| c.value).sum();
            assert!((sum - want).abs() < 1e-4, "{c:?}: {sum} vs {want}");
            assert!((a.logit - want).abs() < 1e-4);
            let heads = a.contributions.iter().filter(|c| c.head.is_some()).count();
            assert_eq!(heads, c.n_layer * c.n_head);
            let mlps = a
                .contributions
                .iter()
                .filter(|c| c.component.starts_with("mlp"))
                .count();
            assert_eq!(mlps, c.n_layer);
            let norm_bias = a
                .contributions
                .iter()
                .any(|c| c.component == "final norm bias");
            assert_eq!(norm_bias, c.bias && c.norm == NormKind::LayerNorm);
        }
        assert!(direct_logit_attribution(&m, A, A.len(), Some(0)).is_err());
        assert!(direct_logit_attribution(&m, A, 0, Some(29)).is_err());
        // No token: the most likely one at that position.
        let row = logits.get(0).unwrap().get(4).unwrap();
        let best = row.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(
            direct_logit_attribution(&m, A, 4, None).unwrap().token,
            best
        );
    }
}

#[test]
fn patching_refuses_prompts_of_unequal_length() {
    let m = model(&model_cfg(2), 5);
    let e = patch_each_head(&m, A, &B[..5], 1, 2).unwrap_err();
    assert!(e.to_string().contains("equal length"), "{e}");
    // Different prompts: a later head's patch moves the difference from the corrupted value.
    let p = patch_each_head(&m, A, B, 5, 8).unwrap();
    assert_ne!(p.clean_logit_diff, p.corrupted_logit_diff);
    assert!(p
        .cells
        .iter()
        .any(|c| c.logit_diff != p.corrupted_logit_diff));
}

#[test]
fn the_induction_corpus_is_strings_written_twice() {
    let text = induction_corpus(200, 8..=32, 7);
    assert_eq!(text, induction_corpus(200, 8..=32, 7), "seeded");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 200);
    let mut lengths = std::collections::BTreeSet::new();
    for line in lines {
        let (a, b) = line.split_at(line.len() / 2);
        assert_eq!(a, b);
        assert!((8..=32).contains(&a.len()), "{line}");
        assert!(a.bytes().all(|c| c.is_ascii_alphabetic()));
        lengths.insert(a.len());
    }
    assert!(lengths.len() > 10, "lengths vary: {lengths:?}");
}

fn json(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", common::stderr(o));
    serde_json::from_str(&stdout(o)).unwrap()
}

/// The model where the answer is known: `configs/induction.toml`, shortened, on its corpus.
/// `tinygpt heads` must find a previous-token head in layer 0 and induction heads in layer 1,
/// far above a random model's; ablating the induction heads must undo in-context learning.
#[test]
fn heads_finds_the_induction_heads_of_the_induction_model() {
    let ws = Workspace::new(100);
    std::fs::write(
        ws.path("induction.txt"),
        induction_corpus(20_000, 8..=32, 0),
    )
    .unwrap();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/induction.toml");
    let o = tinygpt(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--data",
            "induction.txt",
            "--out",
            "run",
            "--set",
            "training.max_iters=2000",
            "--set",
            "training.lr_decay_iters=2000",
            "--set",
            "training.cooldown_iters=400",
            "--set",
            "training.eval_interval=2000",
        ],
        ws.dir.path(),
    );
    assert!(o.status.success(), "{}", common::stderr(&o));

    let r = json(&tinygpt(
        &["heads", "--checkpoint", "run", "--json", "--tokens", "2048"],
        ws.dir.path(),
    ));
    let heads = r["heads"].as_array().unwrap();
    assert_eq!(heads.len(), 8);
    let score = |h: &Value, k: &str| h[k].as_f64().unwrap();
    let best = |layer: u64, k: &str| {
        heads
            .iter()
            .filter(|h| h["layer"] == layer)
            .map(|h| score(h, k))
            .fold(0.0, f64::max)
    };
    let random = &r["random_init"];
    let (prev, induction) = (best(0, "prev_token"), best(1, "induction"));
    assert!(
        prev > 0.4 && prev > 5.0 * random["prev_token"].as_f64().unwrap(),
        "a previous-token head in layer 0: {prev} vs random {}",
        random["prev_token"]
    );
    assert!(
        induction > 0.3 && induction > 5.0 * random["induction"].as_f64().unwrap(),
        "an induction head in layer 1: {induction} vs random {}",
        random["induction"]
    );
    assert!(
        best(0, "induction") < 0.1,
        "no fixed-distance shortcut in layer 0"
    );
    let (first, second) = (
        r["induction"]["first_copy_loss"].as_f64().unwrap(),
        r["induction"]["second_copy_loss"].as_f64().unwrap(),
    );
    assert!(
        second < first - 0.8,
        "in-context learning: {first} → {second}"
    );

    // Ablating the induction heads brings the second copy's loss back to the first's.
    let inductive: Vec<String> = heads
        .iter()
        .filter(|h| score(h, "induction") > 0.2)
        .map(|h| format!("{}.{}", h["layer"], h["head"]))
        .collect();
    let r = json(&tinygpt(
        &[
            "heads",
            "--checkpoint",
            "run",
            "--json",
            "--tokens",
            "2048",
            "--ablate",
            &inductive.join(","),
        ],
        ws.dir.path(),
    ));
    let a = &r["ablated"];
    let ablated_second = a["second_copy_loss"].as_f64().unwrap();
    assert!(
        ablated_second > first - 0.3,
        "ablating {inductive:?}: second copy {ablated_second} vs first {first}"
    );
    // One head ablated raises it too, and the table sorts by ablation effect.
    for h in r["heads"].as_array().unwrap() {
        if inductive.contains(&format!("{}.{}", h["layer"], h["head"])) {
            assert!(score(h, "second_copy_ablated") > second, "{h}");
        }
    }
    let o = tinygpt(
        &[
            "heads",
            "--checkpoint",
            "run",
            "--tokens",
            "1024",
            "--plot",
            "grid.svg",
        ],
        ws.dir.path(),
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let table = stdout(&o);
    let effects: Vec<f64> = table
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains('.'))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(effects.len(), 8, "{table}");
    assert!(effects.windows(2).all(|w| w[0] >= w[1]), "{table}");
    let svg = std::fs::read_to_string(ws.path("grid.svg")).unwrap();
    assert!(svg.contains("induction") && svg.contains("previous-token"));

    // Patching and attribution from the command line, on the same model.
    let p = json(&tinygpt(
        &[
            "patch",
            "--checkpoint",
            "run",
            "--clean",
            "qWfkZpLqWfkZ",
            "--corrupted",
            "qWfkZmLqWfkZ",
            "--answer",
            "p",
            "--wrong",
            "m",
            "--json",
        ],
        ws.dir.path(),
    ));
    assert_eq!(p["cells"].as_array().unwrap().len(), 8);
    assert!(p["clean_logit_diff"].as_f64().unwrap() > p["corrupted_logit_diff"].as_f64().unwrap());
    let a = json(&tinygpt(
        &[
            "attribute",
            "--checkpoint",
            "run",
            "--prompt",
            "qWfkZpLqWfkZ",
            "--json",
        ],
        ws.dir.path(),
    ));
    let sum: f64 = a["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_f64().unwrap())
        .sum();
    assert!((sum - a["logit"].as_f64().unwrap()).abs() < 1e-4);
    let l = json(&tinygpt(
        &[
            "logits",
            "--checkpoint",
            "run",
            "--prompt",
            "qWfkZpLqWfkZ",
            "--json",
            "--engine",
            "reference",
        ],
        ws.dir.path(),
    ));
    let last: Vec<f64> = l["logits"][11]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let best = (0..last.len())
        .max_by(|&i, &j| last[i].total_cmp(&last[j]))
        .unwrap();
    assert_eq!(a["token"], best, "the default token is the most likely");
    assert!((last[best] - a["logit"].as_f64().unwrap()).abs() < 1e-4);
    let o = tinygpt(
        &[
            "attribute",
            "--checkpoint",
            "run",
            "--prompt",
            "qWfkZ",
            "--token",
            "p",
            "--position",
            "2",
        ],
        ws.dir.path(),
    );
    assert!(stdout(&o).contains("(position 2)"), "{}", stdout(&o));

    // Bad requests end in one line naming the fix.
    let run = |args: &[&str]| {
        let mut a = vec!["heads", "--checkpoint", "run"];
        a.extend_from_slice(args);
        tinygpt(&a, ws.dir.path())
    };
    fails_with(&run(&["--tokens", "0"]), "positive number of tokens");
    fails_with(
        &run(&["--induction-len", "40"]),
        "must fit the model's context",
    );
    fails_with(&run(&["--ablate", "1.7"]), "head 1.7 does not exist");
    fails_with(&run(&["--ablate", "x"]), "write LAYER.HEAD");
    fails_with(&run(&["--plot", "grid.gif"]), ".png or .svg");
    assert!(!ws.path("grid.gif").exists());
    let patch = |clean: &str, answer: &str| {
        tinygpt(
            &[
                "patch",
                "--checkpoint",
                "run",
                "--clean",
                clean,
                "--corrupted",
                "abcd",
                "--answer",
                answer,
                "--wrong",
                "m",
            ],
            ws.dir.path(),
        )
    };
    fails_with(&patch("abc", "p"), "patching needs prompts of equal length");
    fails_with(&patch("abce", "pq"), "give exactly one");
    fails_with(
        &patch(&"a".repeat(65), "p"),
        "longer than the model's block_size of 64",
    );
    let attribute = |extra: &[&str]| {
        let mut a = vec!["attribute", "--checkpoint", "run", "--prompt", "abc"];
        a.extend_from_slice(extra);
        tinygpt(&a, ws.dir.path())
    };
    fails_with(
        &attribute(&["--position", "3"]),
        "past the prompt's 3 tokens",
    );
    fails_with(&attribute(&["--token", "7"]), "unknown character");
}
