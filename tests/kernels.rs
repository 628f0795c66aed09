//! The fused kernels against the reference composition of candle ops: forward values and
//! gradients (through candle's autograd) on random inputs of awkward shapes — T = 1, odd
//! widths, widths that are not multiples of the SIMD width, T past the attention row block.

mod common;

use candle_core::{Device, Tensor, Var, D};
use candle_nn::Module;
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tinygpt::attention::{causal_mask, scaled_dot_product_attention};
use tinygpt::data::corpus::Split;
use tinygpt::engine::Decode;
use tinygpt::engine::{EngineKind as Kernels, Runner};
use tinygpt::kernels::block::GradSlot;
use tinygpt::kernels::{self, attention::AttentionDropout};
use tinygpt::model::config::NormKind;
use tinygpt::model::{Linear, Norm};
use tinygpt::run::config::Config;
use tinygpt::train::{ProgressMode, Trainer};

use common::Workspace;

const TOL: f32 = 1e-4;

fn random(shape: &[usize], scale: f32, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |got − want| ≤ TOL · max |want| (errors measured against the tensor's scale).
fn max_abs(t: &Tensor) -> f32 {
    values(t).iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let (g, w) = (values(got), values(want));
    let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    let err = g
        .iter()
        .zip(&w)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= TOL * scale,
        "{what}: max error {err:e} vs scale {scale:e} (relative {:e})",
        err / scale
    );
}

/// Runs `f` on fresh variables holding `inputs`, backpropagates Σ f(x)·r for a random r, and
/// returns the output and the gradient of each input.
fn run_with_grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = random(y.dims(), 1.0, 99);
    let loss = (&y * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
    (y, g)
}

fn check(
    name: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    let (yf, gf) = run_with_grads(inputs, fused);
    let (yr, gr) = run_with_grads(inputs, reference);
    assert_close(&format!("{name} forward"), &yf, &yr);
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        assert_close(&format!("{name} gradient of input {i}"), a, b);
    }
}

#[test]
fn linear_matches_matmul() {
    for (i, &(b, t, d_in, d_out)) in [
        (1, 1, 1, 1),
        (2, 3, 5, 7),
        (3, 17, 33, 65),
        (1, 70, 128, 384),
    ]
    .iter()
    .enumerate()
    {
        let x = random(&[b, t, d_in], 1.0, i as u64);
        let w = random(&[d_out, d_in], 0.5, 100 + i as u64);
        let reference = |v: &[Tensor]| {
            let l = Linear {
                weight: v[1].clone(),
                bias: None,
            };
            l.forward(&v[0]).unwrap()
        };
        check(
            &format!("linear {b}x{t}x{d_in}→{d_out}"),
            &[x, w],
            |v| kernels::linear::linear(&v[0], &v[1]).unwrap(),
            reference,
        );
    }
}

#[test]
fn add_positions_matches_broadcast_add() {
    for (i, &(b, t, c)) in [(1, 1, 1), (3, 5, 7), (2, 64, 130)].iter().enumerate() {
        let x = random(&[b, t, c], 1.0, 40 + i as u64);
        let pos = random(&[t, c], 1.0, 50 + i as u64);
        check(
            &format!("add_positions {b}x{t}x{c}"),
            &[x, pos],
            |v| kernels::positions::add_positions(&v[0], &v[1]).unwrap(),
            |v| v[0].broadcast_add(&v[1]).unwrap(),
        );
    }
    let x = random(&[2, 3, 4], 1.0, 1);
    let bad = random(&[3, 5], 1.0, 2);
    let err = kernels::positions::add_positions(&x, &bad).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
}

#[test]
fn layer_norm_matches_composition() {
    for (i, &(b, t, c, bias)) in [
        (1, 1, 1, false),
        (2, 3, 7, true),
        (1, 1, 17, false),
        (4, 5, 130, true),
    ]
    .iter()
    .enumerate()
    {
        let mut inputs = vec![
            (random(&[b, t, c], 3.0, i as u64) + 0.7).unwrap(),
            (random(&[c], 0.5, 10 + i as u64) + 1.0).unwrap(),
        ];
        if bias {
            inputs.push(random(&[c], 0.5, 20 + i as u64));
        }
        let reference = |v: &[Tensor]| {
            let l = Norm {
                weight: v[1].clone(),
                bias: v.get(2).cloned(),
                eps: 1e-5,
                kind: NormKind::LayerNorm,
            };
            l.forward(&v[0]).unwrap()
        };
        check(
            &format!("layer_norm {b}x{t}x{c} bias={bias}"),
            &inputs,
            |v| kernels::layer_norm::layer_norm(&v[0], &v[1], v.get(2), 1e-5).unwrap(),
            reference,
        );
    }
}

#[test]
fn gelu_matches_candle_gelu_erf() {
    for (i, shape) in [vec![1], vec![3, 7, 13], vec![2, 64, 515]]
        .into_iter()
        .enumerate()
    {
        let x = random(&shape, 8.0, i as u64);
        check(
            &format!("gelu {shape:?}"),
            &[x],
            |v| kernels::gelu::gelu(&v[0]).unwrap(),
            |v| v[0].gelu_erf().unwrap(),
        );
    }
}

/// The reference: split Q, K, V into heads, the textbook attention, heads side by side again.
fn reference_attention(qkv: &Tensor, n_head: usize, mask_p: Option<(&Tensor, f64)>) -> Tensor {
    let (b, t, c3) = qkv.dims3().unwrap();
    let c = c3 / 3;
    let hs = c / n_head;
    let heads = |i: usize| {
        qkv.narrow(2, i * c, c)
            .unwrap()
            .reshape((b, t, n_head, hs))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (q, k, v) = (heads(0), heads(1), heads(2));
    let mask = causal_mask(t, t, 0, &Device::Cpu).unwrap();
    let y = match mask_p {
        None => {
            scaled_dot_product_attention(&q, &k, &v, Some(&mask))
                .unwrap()
                .0
        }
        Some((keep, _)) => {
            let (_, w) = scaled_dot_product_attention(&q, &k, &v, Some(&mask)).unwrap();
            (w * keep).unwrap().matmul(&v).unwrap()
        }
    };
    y.transpose(1, 2).unwrap().reshape((b, t, c)).unwrap()
}

#[test]
fn causal_attention_matches_textbook_attention() {
    // (B, T, C, heads): T = 1; head size 1 and 2; the triangular products run in row blocks
    // (32 rows up to T = 64, 64 beyond): T = 45 crosses one 32-row block, T = 70 one 64-row
    // block, T = 150 two, with a ragged last block each.
    for (i, &(b, t, c, nh)) in [
        (1, 1, 1, 1),
        (2, 5, 6, 3),
        (1, 9, 5, 1),
        (1, 45, 6, 2),
        (2, 70, 12, 2),
        (1, 150, 4, 1),
    ]
    .iter()
    .enumerate()
    {
        let qkv = random(&[b, t, 3 * c], 2.0, i as u64);
        check(
            &format!("attention B={b} T={t} C={c} heads={nh}"),
            &[qkv],
            move |v| kernels::attention::causal_attention(&v[0], nh, None).unwrap(),
            move |v| reference_attention(&v[0], nh, None),
        );
    }
}

#[test]
fn attention_dropout_uses_the_same_mask_forward_and_backward() {
    // T = 40 crosses a 32-row block of the triangular products.
    let (b, t, c, nh, p, seed) = (2usize, 40usize, 8usize, 2usize, 0.3, 12345u64);
    // The mask the kernel draws, built independently: element (b, h, i, j) of the weights.
    let (thr, scale) = (kernels::dropout::threshold(p), (1.0 / (1.0 - p)) as f32);
    let mut keep = Vec::new();
    for idx in 0..b * nh * t * t {
        keep.push(kernels::dropout::keep_scale(seed, idx as u32, thr, scale));
    }
    let dropped = keep.iter().filter(|&&k| k == 0.0).count() as f64 / keep.len() as f64;
    assert!((dropped - p).abs() < 0.05, "dropped fraction {dropped}");
    let keep = Tensor::from_vec(keep, (b, nh, t, t), &Device::Cpu).unwrap();
    let qkv = random(&[b, t, 3 * c], 2.0, 7);
    let drop = AttentionDropout { p, seed };
    check(
        "attention with dropout",
        &[qkv],
        move |v| kernels::attention::causal_attention(&v[0], nh, Some(drop)).unwrap(),
        |v| reference_attention(&v[0], nh, Some((&keep, p))),
    );
}

#[test]
fn cross_entropy_matches_candle_nn() {
    for (i, &(n, v)) in [(1, 1), (1, 2), (7, 65), (33, 1000)].iter().enumerate() {
        let mut logits = values(&random(&[n, v], 5.0, i as u64));
        logits[0] = 1000.0; // an extreme row: no overflow
        if v > 1 {
            logits[1] = -1000.0;
        }
        let logits = Tensor::from_vec(logits, (n, v), &Device::Cpu).unwrap();
        let targets: Vec<u32> = (0..n).map(|r| ((r * 7 + 3) % v) as u32).collect();
        let targets = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
        let t2 = targets.clone();
        check(
            &format!("cross_entropy {n}x{v}"),
            &[logits],
            move |x| kernels::cross_entropy::cross_entropy(&x[0], &targets).unwrap(),
            move |x| candle_nn::loss::cross_entropy(&x[0], &t2).unwrap(),
        );
    }
    let bad = Tensor::new(&[5u32], &Device::Cpu).unwrap();
    let err = kernels::cross_entropy::cross_entropy(&random(&[1, 3], 1.0, 0), &bad).unwrap_err();
    assert!(err.to_string().contains("target id 5"), "{err}");
}

#[test]
fn dropout_matches_its_mask_and_rate() {
    let (p, seed) = (0.2, 777u64);
    let x = (random(&[3, 1001], 1.0, 5) + 2.0).unwrap(); // no zeros of its own
    let (thr, scale) = (kernels::dropout::threshold(p), 1.25f32);
    let keep: Vec<f32> = (0..3003u32)
        .map(|i| kernels::dropout::keep_scale(seed, i, thr, scale))
        .collect();
    let keep = Tensor::from_vec(keep, (3, 1001), &Device::Cpu).unwrap();
    let k2 = keep.clone();
    check(
        "dropout",
        std::slice::from_ref(&x),
        move |v| kernels::dropout::dropout(&v[0], p, seed).unwrap(),
        move |v| (&v[0] * &k2).unwrap(),
    );
    let y = values(&kernels::dropout::dropout(&x, p, seed).unwrap());
    let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
    assert!((zeros - p).abs() < 0.03, "dropped {zeros}");
    // another seed, another mask
    let y2 = values(&kernels::dropout::dropout(&x, p, seed + 1).unwrap());
    assert_ne!(y, y2);
}

fn trainer(ws: &Workspace, kernels: Kernels, extra: &[&str]) -> Trainer {
    let mut over: Vec<String> = vec![
        format!("training.engine=\"{}\"", kernels.name()),
        "training.max_iters=5".into(),
    ];
    over.extend(extra.iter().map(|s| s.to_string()));
    let cfg = Config::load(&ws.path("tiny.toml"), &over).unwrap();
    Trainer::on_device(cfg, &Device::Cpu, ProgressMode::Quiet).unwrap()
}

#[test]
fn whole_model_loss_and_gradients_match() {
    let ws = Workspace::new(4000);
    let variants: &[&[&str]] = &[
        &["model.n_head=1"],
        &["model.n_head=2"],
        &["model.n_head=2", "model.activation=\"relu2\""],
        &["model.n_head=1", "model.position=\"rope\""],
        &["model.n_head=2", "model.position=\"rope\""],
        &["model.tie_embeddings=false", "model.logit_softcap=2.0"],
        &["model.zero_init=true", "model.tie_embeddings=false"],
        &["model.bigram_buckets=300", "model.position=\"rope\""],
        &[
            "model.n_head=2",
            "model.qkv_bias=true",
            "model.activation=\"gelu_tanh\"",
        ],
        &[
            "model.n_head=1",
            "model.qkv_bias=true",
            "model.position=\"rope\"",
        ],
    ];
    for extra in variants {
        let mut sets = vec!["model.bias=true"];
        sets.extend_from_slice(extra);
        let what = sets.join(" ");
        let r = trainer(&ws, Kernels::Reference, &sets);
        let f = trainer(&ws, Kernels::Fused, &sets);
        let block = r.config.model.block_size;
        let (x, y) = r
            .dataset
            .batch(
                Split::Train,
                4,
                block,
                &mut tinygpt::rng::seeded(1),
                &Device::Cpu,
            )
            .unwrap();
        let rng = || tinygpt::rng::seeded(0);
        let (lr, gr) = r.engine.loss_and_grads(&x, &y, &mut rng(), 1).unwrap();
        let (lf, gf) = f.engine.loss_and_grads(&x, &y, &mut rng(), 1).unwrap();
        let scalar = |l: f64| Tensor::new(l as f32, &Device::Cpu).unwrap();
        assert_close(&format!("{what}: loss"), &scalar(lf), &scalar(lr));
        // The fused engine runs each block as one op; the gradients its ops computed are in the
        // store it returns, beside candle's.
        assert!(
            matches!(f.engine.runner(), Runner::Fused(_)),
            "the fused trainer runs the fused engine"
        );
        for (name, var) in r.params.vars() {
            let w = f.params.vars()[name].as_tensor();
            let a = gf.get(w).unwrap();
            let b = gr.get(var.as_tensor()).unwrap();
            if name.ends_with("attn.w_k.bias") && !what.contains("rope") {
                // A bias on the keys adds q·b to every score of a row, which softmax ignores
                // (unless rotary embeddings turn it): its gradient is zero up to rounding.
                let weight = name.replace(".bias", ".weight");
                let scale = max_abs(gr.get(r.params.vars()[&weight].as_tensor()).unwrap());
                assert!(
                    max_abs(a) <= 1e-4 * scale && max_abs(b) <= 1e-4 * scale,
                    "{what}: {name}"
                );
                continue;
            }
            assert_close(&format!("{what}: gradient of {name}"), a, b);
        }
        // logits with and without the fused attention path agree with the captured weights'
        let (logits, att) = f.model.forward_with_attention(&x).unwrap();
        assert_close("logits", &f.engine.forward(&x).unwrap(), &logits);
        assert_eq!(att.len(), f.config.model.n_layer);
        let rows = att[0].sum(D::Minus1).unwrap();
        assert_close("attention rows", &rows, &rows.ones_like().unwrap());
    }
}

#[test]
fn one_training_step_matches_the_reference_step() {
    let ws = Workspace::new(4000);
    let mut r = trainer(&ws, Kernels::Reference, &["training.grad_clip=0.05"]);
    let mut f = trainer(&ws, Kernels::Fused, &["training.grad_clip=0.05"]);
    let before = common::param_values(&r.params);
    assert_eq!(
        before,
        common::param_values(&f.params),
        "same initial weights"
    );
    let (lr, lf) = (r.train_step().unwrap(), f.train_step().unwrap());
    assert!((lr - lf).abs() < 1e-5 * lr, "loss {lr} vs {lf}");
    let lrate = tinygpt::train::schedule::learning_rate(&r.config.training, 0) as f32;
    let (pr, pf) = (
        common::param_values(&r.params),
        common::param_values(&f.params),
    );
    let mut moved = 0usize;
    for (((name, a), (_, b)), (_, p0)) in pr.iter().zip(&pf).zip(&before) {
        for ((x, y), z) in a.iter().zip(b).zip(p0) {
            // Adam's first step is ±lr wherever the gradient is not tiny: a fused step that
            // got the gradient right lands on the same weight.
            assert!((x - y).abs() <= 1e-3 * lrate + 1e-6, "{name}: {x} vs {y}");
            moved += usize::from((x - z).abs() > 0.5 * lrate);
        }
    }
    assert!(moved > 1000, "only {moved} weights moved");
    // Both paths draw the same random numbers, so later steps see the same batches.
    for _ in 0..2 {
        let (a, b) = (r.train_step().unwrap(), f.train_step().unwrap());
        assert!((a - b).abs() < 1e-3 * a, "loss {a} vs {b}");
    }
}

#[test]
fn fused_decoder_matches_the_full_forward_pass() {
    let ws = Workspace::new(4000);
    // A width of 80 leaves partial groups of output columns (240, 320 and 20 outputs); at 256
    // the MLP's matrices are large enough to split a row's columns over threads.
    // The second and third add rotary positions, an untied head and capped logits.
    for (n_head, bias, act, width, extra) in [
        (
            "1",
            "true",
            "gelu",
            32,
            ["model.position=\"learned\"", "model.zero_init=false"],
        ),
        (
            "2",
            "false",
            "relu2",
            80,
            ["model.position=\"rope\"", "model.zero_init=false"],
        ),
        (
            "4",
            "true",
            "gelu",
            256,
            ["model.tie_embeddings=false", "model.logit_softcap=0.5"],
        ),
        (
            "2",
            "false",
            "gelu",
            32,
            ["model.bigram_buckets=97", "model.zero_init=false"],
        ),
        (
            "2",
            "true",
            "gelu_tanh",
            80,
            ["model.qkv_bias=true", "model.zero_init=false"],
        ),
    ] {
        let t = trainer(
            &ws,
            Kernels::Fused,
            &[
                &format!("model.n_head={n_head}"),
                &format!("model.bias={bias}"),
                &format!("model.activation=\"{act}\""),
                &format!("model.n_embd={width}"),
                extra[0],
                extra[1],
            ],
        );
        for (name, var) in t.params.vars() {
            // Bigram features and biases start at zero: give them values, or a wrong row or a
            // missing bias would not show.
            if name == "bigram.weight" || name.ends_with(".bias") {
                var.set(&var.as_tensor().randn_like(0.0, 0.5).unwrap())
                    .unwrap();
            }
        }
        let ids: Vec<u32> = (0..16u32).map(|i| (i * 5 + 1) % 20).collect();
        let full = t
            .engine
            .forward(&Tensor::from_slice(&ids, (1, 16), &Device::Cpu).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut dec = t.engine.decoder().unwrap();
        // the prompt in one go, then one token at a time
        let mut rows = vec![dec.feed(&ids[..5]).unwrap()];
        for &id in &ids[5..] {
            rows.push(dec.feed(&[id]).unwrap());
        }
        assert_eq!(dec.len(), 16);
        // Rows fed together sum in the same order as rows fed alone: the same bits.
        let mut one_by_one = t.engine.decoder().unwrap();
        let alone: Vec<f32> = ids[..5]
            .iter()
            .map(|&id| one_by_one.feed(&[id]).unwrap())
            .last()
            .unwrap();
        assert_eq!(alone, rows[0], "heads={n_head}: a prompt fed at once");
        // With and without a partner thread sharing the products: the same bits.
        let Runner::Fused(fused) = t.engine.runner() else {
            panic!("the fused trainer runs the fused engine")
        };
        for partner in [false, true] {
            let mut d = tinygpt::engine::Decoder::with_partner(fused, partner).unwrap();
            let mut got = vec![d.feed(&ids[..5]).unwrap()];
            got.extend(ids[5..].iter().map(|&id| d.feed(&[id]).unwrap()));
            assert_eq!(got, rows, "heads={n_head}, partner {partner}");
        }
        for (k, row) in rows.iter().enumerate() {
            let pos = if k == 0 { 4 } else { 4 + k };
            let want = full.get(pos).unwrap();
            let got = Tensor::from_slice(row, row.len(), &Device::Cpu).unwrap();
            assert_close(&format!("heads={n_head} logits at {pos}"), &got, &want);
        }
        let err = dec.feed(&[1]).unwrap_err().to_string();
        assert!(err.contains("exceed the model's block_size of 16"), "{err}");
        dec.clear();
        assert!(dec
            .feed(&[999])
            .unwrap_err()
            .to_string()
            .contains("token id 999"));
    }
}

#[test]
fn fused_training_is_deterministic_and_learns_with_dropout() {
    let ws = Workspace::new(4000);
    let run = || {
        let mut t = trainer(&ws, Kernels::Fused, &["model.dropout=0.2"]);
        let losses: Vec<f64> = (0..5).map(|_| t.train_step().unwrap()).collect();
        (losses, common::param_values(&t.params))
    };
    let (la, pa) = run();
    let (lb, pb) = run();
    assert_eq!(la, lb);
    assert_eq!(pa, pb, "same seed, same weights, bit for bit");
    assert!(la[4] < la[0], "loss went {la:?}");
}

#[test]
fn recomputed_blocks_give_the_same_steps_and_the_same_dropout() {
    let ws = Workspace::new(4000);
    // Without dropout the batches and the math are the same with and without recomputation.
    for kernels in [Kernels::Reference, Kernels::Fused] {
        let mut plain = trainer(&ws, kernels, &[]);
        let mut re = trainer(&ws, kernels, &["training.recompute_activations=true"]);
        for _ in 0..3 {
            let (a, b) = (plain.train_step().unwrap(), re.train_step().unwrap());
            assert!((a - b).abs() <= 1e-6 * a, "{kernels:?}: loss {a} vs {b}");
        }
        for ((name, a), (_, b)) in common::param_values(&plain.params)
            .iter()
            .zip(&common::param_values(&re.params))
        {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5, "{kernels:?} {name}: {x} vs {y}");
            }
        }
    }
    // With dropout, the recomputation must drop what the first pass dropped: the block op's
    // output and gradients equal the block run directly with the same dropout stream.
    let t = trainer(&ws, Kernels::Fused, &["model.dropout=0.3"]);
    let block = t.model.blocks[0].clone();
    let mask = causal_mask(16, 16, 0, &Device::Cpu).unwrap();
    let x = random(&[2, 16, 32], 1.0, 3);
    let seed = 4242u64;
    let direct = |v: &[Tensor]| {
        let mut rng = tinygpt::rng::seeded(seed);
        block.forward(&v[0], &mask, Some(&mut rng), None).unwrap().0
    };
    let grads = GradSlot::default();
    let op = |v: &[Tensor]| {
        v[0].apply_op1(tinygpt::engine::recompute::RecomputedBlock {
            block: block.clone(),
            mask: mask.clone(),
            dropout_seed: Some(seed),
            grads: grads.clone(),
            precision: tinygpt::model::Precision::F32,
        })
        .unwrap()
    };
    check("recomputed block with dropout", &[x], op, direct);
    let w = grads
        .take()
        .expect("the block's backward left its weights' gradients");
    assert_eq!(
        w.len(),
        block.params().named().len(),
        "every weight got its gradient"
    );
}
