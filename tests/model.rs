//! The model's defining properties, checked on small random models.

mod common;

use common::model_cfg;

use std::collections::HashMap;

use candle_core::{Device, Tensor, D};
use tinygpt::model::attention::causal_mask;
use tinygpt::model::{Gpt, Head, MultiHeadAttention, Params, Precision};
use tinygpt::rng::seeded;
use tinygpt::run::config::{Config, ModelConfig, Position};

fn model(n_head: usize, vocab: usize, seed: u64) -> (Gpt, Params) {
    model_with(&model_cfg(n_head), vocab, seed)
}

fn model_with(cfg: &ModelConfig, vocab: usize, seed: u64) -> (Gpt, Params) {
    let mut p = Params::fresh(seeded(seed), &Device::Cpu);
    let m = p.build(|vb| Gpt::new(cfg, vocab, vb)).unwrap();
    (m, p)
}

/// `model_cfg(n_head)` with rotary positions, an untied head and capped logits.
fn modern_cfg(n_head: usize) -> ModelConfig {
    ModelConfig {
        position: Position::Rope,
        tie_embeddings: false,
        logit_softcap: 3.0,
        bigram_buckets: 40,
        ..model_cfg(n_head)
    }
}

fn ids(v: &[u32]) -> Tensor {
    Tensor::from_slice(v, (1, v.len()), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn future_tokens_never_change_past_logits() {
    for cfg in [model_cfg(1), model_cfg(3), modern_cfg(3)] {
        let n_head = cfg.n_head;
        let (m, _) = model_with(&cfg, 11, 1);
        let a: Vec<u32> = (0..12).map(|i| (i * 7 % 11) as u32).collect();
        let la = m.forward(&ids(&a), None).unwrap();
        for t in [0usize, 4, 10] {
            let mut b = a.clone();
            for x in b.iter_mut().skip(t + 1) {
                *x = (*x + 3) % 11;
            }
            let lb = m.forward(&ids(&b), None).unwrap();
            let pa = la.narrow(1, 0, t + 1).unwrap();
            let pb = lb.narrow(1, 0, t + 1).unwrap();
            assert_eq!(max_abs_diff(&pa, &pb), 0.0, "n_head {n_head}, t {t}");
            // …while the future positions do change
            if t + 1 < a.len() {
                let fa = la.narrow(1, t + 1, 1).unwrap();
                let fb = lb.narrow(1, t + 1, 1).unwrap();
                assert!(max_abs_diff(&fa, &fb) > 0.0);
            }
        }
    }
}

#[test]
fn head_equals_one_head_multi_head_attention() {
    let c = 8;
    let mut p = Params::fresh(seeded(5), &Device::Cpu);
    let head = p
        .build(|vb| Head::new(vb.pp("attn"), c, c, 0.0, false))
        .unwrap();
    // The same W_Q, W_K, W_V, and an identity output projection.
    let mut tensors: HashMap<String, Tensor> = p
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    tensors.insert(
        "attn.c_proj.weight".into(),
        Tensor::eye(c, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let mut p2 = Params::loaded(tensors, &Device::Cpu);
    // Every loaded tensor is taken (`build` rejects leftovers).
    let mha = p2
        .build(|vb| MultiHeadAttention::new(vb.pp("attn"), c, 1, 0.0, false, false, 0.02))
        .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 5, c), &Device::Cpu).unwrap();
    let mask = causal_mask(5, 5, 0, &Device::Cpu).unwrap();
    let (yh, wh) = head.forward(&x, &mask, None, None).unwrap();
    let (ym, wm) = mha.forward(&x, &mask, None, None).unwrap();
    assert!(max_abs_diff(&yh, &ym) < 1e-6);
    assert!(max_abs_diff(&wh, &wm.squeeze(1).unwrap()) < 1e-6);
}

#[test]
fn attention_rows_are_distributions_over_the_past() {
    let (m, _) = model(3, 13, 2);
    let v: Vec<u32> = (0..10).map(|i| (i * 5 % 13) as u32).collect();
    let (_, att) = m.forward_with_attention(&ids(&v)).unwrap();
    assert_eq!(att.len(), 2);
    for w in att {
        assert_eq!(w.dims(), &[1, 3, 10, 10]);
        let sums = w
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        let w = w.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        for head in &w {
            for (i, row) in head.iter().enumerate() {
                for (j, &x) in row.iter().enumerate() {
                    if j > i {
                        assert_eq!(x, 0.0);
                    } else {
                        assert!(x > 0.0);
                    }
                }
            }
        }
    }
}

#[test]
fn initial_loss_is_about_ln_vocab() {
    let vocab = 65;
    let (m, _) = model(2, vocab, 3);
    let x: Vec<u32> = (0..16).map(|i| (i * 17 % vocab) as u32).collect();
    let y: Vec<u32> = (0..16).map(|i| (i * 29 % vocab) as u32).collect();
    let loss = m
        .loss(&ids(&x), &ids(&y), None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = (vocab as f32).ln();
    assert!((loss - want).abs() < 0.1, "loss {loss}, ln(V) {want}");
}

#[test]
fn kv_cache_logits_equal_full_forward() {
    for cfg in [model_cfg(1), model_cfg(2), modern_cfg(1), modern_cfg(2)] {
        let n_head = cfg.n_head;
        let (m, p) = model_with(&cfg, 9, 4);
        if let Some(table) = p.vars().get("bigram.weight") {
            // Bigram features start at zero: give them values, or a wrong row would not show.
            table
                .set(&table.as_tensor().randn_like(0.0, 1.0).unwrap())
                .unwrap();
        }
        let v: Vec<u32> = (0..16).map(|i| (i * 4 % 9) as u32).collect();
        let full = m.forward(&ids(&v), None).unwrap();
        let mut cache = m.new_cache();
        // a prompt of 5, then one token at a time
        let mut parts = vec![m.forward_cached(&ids(&v[..5]), &mut cache).unwrap()];
        for t in 5..16 {
            parts.push(m.forward_cached(&ids(&v[t..t + 1]), &mut cache).unwrap());
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        assert!(max_abs_diff(&full, &inc) < 1e-5, "n_head {n_head}");
        // the window is full: one more token is an error, not a silent wrong answer
        assert!(m.forward_cached(&ids(&[0]), &mut cache).is_err());
    }
}

#[test]
fn same_config_and_seed_give_same_weights() {
    let (_, a) = model(2, 7, 9);
    let (_, b) = model(2, 7, 9);
    let (_, c) = model(2, 7, 10);
    let flat = |p: &Params| -> Vec<f32> {
        p.vars()
            .values()
            .flat_map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(flat(&a), flat(&b));
    assert_ne!(flat(&a), flat(&c));
}

#[test]
fn config_files_in_the_repo_parse() {
    for f in [
        "shakespeare-char",
        "shakespeare-char-10m",
        "shakespeare-char-10m-h200",
        "shakespeare-bpe",
        "shakespeare-char-speedrun",
        "shakespeare-char-speedrun-15m",
        "tiny",
    ] {
        let cfg = Config::load(std::path::Path::new(&format!("configs/{f}.toml")), &[]).unwrap();
        assert!(cfg.model.n_layer >= 1, "{f}");
    }
    let c = Config::load(
        std::path::Path::new("configs/shakespeare-char-10m.toml"),
        &[],
    )
    .unwrap();
    // nanoGPT's 10.7M config: the parameter count (without position embeddings) is ~10.65M.
    let mut p = Params::fresh(seeded(0), &Device::Cpu);
    p.build(|vb| Gpt::new(&c.model, 65, vb)).unwrap();
    let n = p.count() - 256 * 384;
    assert!((10_600_000..10_700_000).contains(&n), "{n}");
}

#[test]
fn every_parameter_receives_a_gradient() {
    for n_head in [1, 2] {
        let (m, p) = model(n_head, 7, 11);
        let x: Vec<u32> = (0..16).map(|i| (i * 3 % 7) as u32).collect();
        let y: Vec<u32> = (0..16).map(|i| (i * 5 % 7) as u32).collect();
        let grads = m
            .loss(&ids(&x), &ids(&y), None)
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in p.vars() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name} gets no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{name} has a zero gradient");
        }
    }
}

#[test]
fn rotary_positions_need_an_even_head_size() {
    let over = [
        "model.position=\"rope\"".to_string(),
        "model.n_head=128".to_string(),
    ];
    let err = Config::load(std::path::Path::new("configs/shakespeare-char.toml"), &over)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head size n_embd / n_head = 1 is odd"),
        "{err}"
    );
}

/// Central finite differences of `f` (a scalar function of `x`'s entries) at `x`, in f64.
fn finite_differences(x: &Tensor, f: impl Fn(&Tensor) -> f64) -> Vec<f64> {
    let v = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-6;
    (0..v.len())
        .map(|i| {
            let at = |d: f64| {
                let mut w = v.clone();
                w[i] += d;
                f(&Tensor::from_vec(w, x.shape(), x.device()).unwrap())
            };
            (at(h) - at(-h)) / (2.0 * h)
        })
        .collect()
}

/// Asserts candle's gradient `got` of a scalar function equals finite differences `want`.
fn assert_gradient(what: &str, got: &Tensor, want: &[f64]) {
    let got = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
            "{what}: d/dx[{i}] autograd {g} vs finite differences {w}"
        );
    }
}

fn random64(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = seeded(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| rand::Rng::random::<f64>(&mut rng) * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn rms_norm_is_its_formula_and_its_gradient_is_right() {
    use candle_core::Var;
    use candle_nn::Module;
    use tinygpt::model::config::NormKind;
    use tinygpt::model::Norm;
    let (x, w, r) = (
        random64(&[2, 3, 6], 1),
        random64(&[6], 2),
        random64(&[2, 3, 6], 3),
    );
    let norm = |w: &Tensor| Norm {
        weight: w.clone(),
        bias: None,
        eps: 1e-5,
        kind: NormKind::Rms,
    };
    // Values: x / √(mean(x²) + ε) · w, row by row.
    let y = norm(&w).forward(&x).unwrap().to_vec3::<f64>().unwrap();
    let (xs, ws) = (x.to_vec3::<f64>().unwrap(), w.to_vec1::<f64>().unwrap());
    for (yb, xb) in y.iter().zip(&xs) {
        for (yr, xr) in yb.iter().zip(xb) {
            let rms = (xr.iter().map(|a| a * a).sum::<f64>() / 6.0 + 1e-5).sqrt();
            for ((yv, xv), wv) in yr.iter().zip(xr).zip(&ws) {
                assert!(
                    (yv - xv / rms * wv).abs() < 1e-12,
                    "{yv} vs {}",
                    xv / rms * wv
                );
            }
        }
    }
    // Gradients of Σ y·r with respect to the input and the scale.
    let loss = |x: &Tensor, w: &Tensor| {
        (norm(w).forward(x).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
    let g = (norm(wv.as_tensor()).forward(xv.as_tensor()).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx = finite_differences(&x, |x| loss(x, &w));
    assert_gradient("RMSNorm input", g.get(xv.as_tensor()).unwrap(), &dx);
    let dw = finite_differences(&w, |w| loss(&x, w));
    assert_gradient("RMSNorm scale", g.get(wv.as_tensor()).unwrap(), &dw);
}

#[test]
fn qk_norm_attention_is_its_formula_and_its_gradient_is_right() {
    use candle_core::{DType, Var};
    use tinygpt::model::attention::scaled_dot_product_attention;
    use tinygpt::model::Linear;
    let (c, hs, t) = (6, 4, 5);
    let x = random64(&[2, t, c], 4);
    let r = random64(&[2, t, hs], 5);
    let (wq, wk, wv) = (
        random64(&[hs, c], 6),
        random64(&[hs, c], 7),
        random64(&[hs, c], 8),
    );
    let mask = causal_mask(t, t, 0, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let head = |wq: &Tensor| Head {
        w_q: Linear {
            weight: wq.clone(),
            bias: None,
        },
        w_k: Linear {
            weight: wk.clone(),
            bias: None,
        },
        w_v: Linear {
            weight: wv.clone(),
            bias: None,
        },
        dropout: 0.0,
        rope: None,
        qk_norm: true,
    };
    // Values: the textbook formula on q/‖q‖_rms and k/‖k‖_rms.
    let (y, _) = head(&wq).forward(&x, &mask, None, None).unwrap();
    let unit = |m: &Tensor| {
        let p = x.broadcast_matmul(&m.t().unwrap()).unwrap();
        let ms = p.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        p.broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
    };
    let v = x.broadcast_matmul(&wv.t().unwrap()).unwrap();
    let (want, _) = scaled_dot_product_attention(&unit(&wq), &unit(&wk), &v, Some(&mask)).unwrap();
    let diff = (&y - &want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
    // Gradients of Σ y·r with respect to the input and W_Q.
    let loss = |x: &Tensor, wq: &Tensor| {
        let (y, _) = head(wq).forward(x, &mask, None, None).unwrap();
        (y * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (xv, qv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&wq).unwrap(),
    );
    let (y, _) = head(qv.as_tensor())
        .forward(xv.as_tensor(), &mask, None, None)
        .unwrap();
    let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = finite_differences(&x, |x| loss(x, &wq));
    assert_gradient("qk_norm head input", g.get(xv.as_tensor()).unwrap(), &dx);
    let dq = finite_differences(&wq, |w| loss(&x, w));
    assert_gradient("qk_norm head W_Q", g.get(qv.as_tensor()).unwrap(), &dq);
}

#[test]
fn norm_options_are_written_once_and_run_everywhere() {
    // RMSNorm (no biases in its layers) and QK-norm: the KV cache gives the full pass's logits,
    // and the fused path declares them unsupported.
    use tinygpt::engine::{EngineChoice, EngineKind, FusedGpt};
    use tinygpt::model::config::NormKind;
    let cfg = ModelConfig {
        norm: NormKind::Rms,
        qk_norm: true,
        ..modern_cfg(3)
    };
    let (m, p) = model_with(&cfg, 40, 9);
    assert!(!p
        .vars()
        .keys()
        .any(|n| n.starts_with("ln_f.bias") || n.contains("ln_1.bias")));
    let seq = [3u32, 1, 4, 1, 5, 9, 2, 6, 5, 3];
    let full = m.forward(&ids(&seq), None).unwrap();
    let mut cache = m.new_cache();
    let a = m.forward_cached(&ids(&seq[..4]), &mut cache).unwrap();
    let b = m.forward_cached(&ids(&seq[4..]), &mut cache).unwrap();
    let cached = Tensor::cat(&[a, b], 1).unwrap();
    assert!(max_abs_diff(&full, &cached) < 1e-5);
    let e = FusedGpt::supports(&cfg).unwrap_err();
    assert_eq!(e.to_string(), "model.norm = \"rms\"");
    let only_qk = ModelConfig {
        qk_norm: true,
        ..model_cfg(2)
    };
    assert_eq!(
        FusedGpt::supports(&only_qk).unwrap_err().key,
        "model.qk_norm"
    );
    let (kind, note) = EngineChoice::Auto
        .resolve(&cfg, &Device::Cpu, Precision::F32)
        .unwrap();
    assert_eq!(kind, EngineKind::Reference);
    assert!(note.unwrap().contains("model.norm = \"rms\""));
    let e = EngineChoice::Fused
        .resolve(&only_qk, &Device::Cpu, Precision::F32)
        .unwrap_err();
    assert!(e.to_string().contains("model.qk_norm = true"), "{e}");
    assert_eq!(
        EngineChoice::Auto
            .resolve(&model_cfg(2), &Device::Cpu, Precision::F32)
            .unwrap(),
        (EngineKind::Fused, None)
    );
}
