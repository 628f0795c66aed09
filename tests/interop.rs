//! Export to transformers and GGUF, import from transformers: round trips, a GPT-2 folder made
//! by the real transformers library (tests/fixtures/gpt2-tiny, with its own logits), the GGUF
//! file read back by candle's reader, and the errors of bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use common::{fails_with, stderr, stdout, tinygpt, Workspace};
use tinygpt::engine::Engine;
use tinygpt::engine::{EngineKind, EngineOptions};
use tinygpt::progress::ProgressMode;
use tinygpt::run::checkpoint;
use tinygpt::run::config::Config;
use tinygpt::train::Trainer;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny")
}

/// Logits `(T, V)` of `ids` on both engines of the checkpoint in `dir`.
fn logits(dir: &Path, ids: &[u32]) -> [Vec<Vec<f32>>; 2] {
    let ck = checkpoint::load(dir, &Device::Cpu).unwrap();
    let idx = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    [EngineKind::Reference, EngineKind::Fused].map(|k| {
        let engine = Engine::new(&ck.model, &EngineOptions::new(k), false).unwrap();
        engine
            .forward(&idx)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    })
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// A fresh model of the workspace's tiny config with `sets`, every bias and gain made random
/// (they start at 0 and 1, where a swapped or missing one would not show), saved to `name`.
fn random_checkpoint(ws: &Workspace, name: &str, sets: &[&str]) -> PathBuf {
    let over: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = Config::load(&ws.path("tiny.toml"), &over).unwrap();
    let t = Trainer::on_device(cfg, &Device::Cpu, ProgressMode::Quiet).unwrap();
    for (name, var) in t.params.vars() {
        if name.ends_with(".bias") || name.contains("ln_") {
            let t = var.as_tensor();
            var.set(&(t + t.randn_like(0.0, 0.3).unwrap()).unwrap())
                .unwrap();
        }
    }
    let dir = ws.path(name);
    t.save(&dir).unwrap();
    dir
}

#[test]
fn export_then_import_gives_the_same_model_and_logits() {
    let ws = Workspace::new(3000);
    let variants: &[&[&str]] = &[
        &[],
        &["model.bias=true", "model.qkv_bias=true", "model.n_head=1"],
        &[
            "model.bias=true",
            "model.tie_embeddings=false",
            "model.activation=\"gelu_tanh\"",
        ],
    ];
    for (i, sets) in variants.iter().enumerate() {
        let ck = random_checkpoint(&ws, &format!("ck{i}"), sets);
        let hf = ws.path(&format!("hf{i}"));
        let back = ws.path(&format!("back{i}"));
        export(&ws, &ck, "hf", &hf, &[]);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(hf.join(f).is_file(), "{sets:?}: {f} written");
        }
        ok(&ws, &["import", "--from", s(&hf), "--out", s(&back)]);
        let (a, b) = (
            checkpoint::load(&ck, &Device::Cpu).unwrap(),
            checkpoint::load(&back, &Device::Cpu).unwrap(),
        );
        let mut want = a.config.model.clone();
        want.dropout = 0.0; // an imported model starts without dropout
        assert_eq!(b.config.model, want, "{sets:?}: the same model settings");
        assert_eq!(
            a.tokenizer.to_json().unwrap(),
            b.tokenizer.to_json().unwrap()
        );
        let ids: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3) % 20).collect();
        let (la, lb) = (logits(&ck, &ids), logits(&back, &ids));
        for k in 0..2 {
            assert_eq!(la[k], lb[k], "{sets:?}: identical logits");
        }
    }
}

#[test]
fn export_writes_gpt2_layout_and_config() {
    let ws = Workspace::new(3000);
    let ck = random_checkpoint(&ws, "ck", &["model.bias=false"]);
    let hf = ws.path("hf");
    export(&ws, &ck, "hf", &hf, &[]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(
        config["activation_function"], "gelu",
        "erf GELU is transformers' gelu"
    );
    assert_eq!(config["n_embd"], 32);
    assert_eq!(config["n_positions"], 16);
    assert_eq!(config["tie_word_embeddings"], true);
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |n: &str| st.tensor(n).unwrap().shape().to_vec();
    assert_eq!(
        shape("transformer.h.0.attn.c_attn.weight"),
        [32, 96],
        "Conv1D: [in, out]"
    );
    assert_eq!(shape("transformer.h.0.attn.c_attn.bias"), [96]);
    assert_eq!(shape("transformer.h.1.mlp.c_fc.weight"), [32, 128]);
    assert_eq!(shape("transformer.h.1.mlp.c_proj.weight"), [128, 32]);
    assert_eq!(
        shape("transformer.ln_f.bias"),
        [32],
        "zeros where the model has no bias"
    );
    assert!(
        st.tensor("lm_head.weight").is_err(),
        "a tied head is not written twice"
    );
    // c_attn's columns are W_Q's rows, then W_K's, then W_V's.
    let ours = checkpoint::load(&ck, &Device::Cpu).unwrap();
    let w_k = ours.params.vars()["h.0.attn.w_k.weight"]
        .as_tensor()
        .clone();
    let all = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let c_attn = &all["transformer.h.0.attn.c_attn.weight"];
    let k_part = c_attn.narrow(1, 32, 32).unwrap().t().unwrap();
    let diff = (k_part - w_k).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn a_gpt2_made_by_transformers_imports_with_its_logits() {
    let ws = Workspace::new(1000);
    let out = ws.path("gpt2-tiny");
    let o = ok(&ws, &["import", "--from", s(&fixture()), "--out", s(&out)]);
    assert!(stdout(&o).contains("2 layers, 4 heads"), "{}", stdout(&o));
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("logits.json")).unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
    let logits: Vec<Vec<f32>> = serde_json::from_value(want["logits"].clone()).unwrap();
    let ck = checkpoint::load(&out, &Device::Cpu).unwrap();
    let m = &ck.config.model;
    assert!(
        m.bias && m.qkv_bias,
        "GPT-2's biases, Q, K and V included, are kept"
    );
    assert_eq!(
        m.activation,
        tinygpt::layout::Activation::GeluTanh,
        "gelu_new"
    );
    // transformers' tokenizer and ours agree on the text (spaces, a newline, non-ASCII).
    let text = want["text"].as_str().unwrap();
    assert_eq!(ck.tokenizer.encode(text).unwrap(), ids);
    assert_eq!(ck.tokenizer.decode(&ids).unwrap(), text);
    for (k, got) in logits_of(&out, &ids).iter().enumerate() {
        let d = max_diff(got, &logits);
        assert!(d <= 1e-4, "engine {k}: max |Δlogit| {d} vs transformers");
    }
    // inspect, generate, eval and attention read it.
    let corpus = ws.path("text.txt");
    std::fs::write(&corpus, "ka lomi ré nü\n".repeat(200)).unwrap();
    for args in [
        vec!["inspect", s(&out)],
        vec![
            "generate",
            "--checkpoint",
            s(&out),
            "--prompt",
            "ka",
            "--max-new-tokens",
            "5",
        ],
        vec!["eval", "--checkpoint", s(&out), "--data", s(&corpus), "-q"],
        vec!["attention", "--checkpoint", s(&out), "--prompt", "ka lomi"],
    ] {
        let o = tinygpt(&args, ws.dir.path());
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
}

fn logits_of(dir: &Path, ids: &[u32]) -> [Vec<Vec<f32>>; 2] {
    logits(dir, ids)
}

#[test]
fn fine_tuning_starts_from_the_imported_weights() {
    let ws = Workspace::new(1000);
    let ck = ws.path("gpt2-tiny");
    ok(&ws, &["import", "--from", s(&fixture()), "--out", s(&ck)]);
    let corpus = ws.path("text.txt");
    std::fs::write(&corpus, "ka lomi ré nü — 日本\n".repeat(300)).unwrap();
    // The imported checkpoint's config, with a short run and this corpus.
    let config = ws.path("ft.toml");
    std::fs::copy(ck.join("config.toml"), &config).unwrap();
    let run = ws.path("ft");
    let sets = [
        "training.max_iters=4",
        "training.warmup_iters=1",
        "training.lr_decay_iters=4",
        "training.eval_interval=2",
        "training.eval_iters=1",
        "training.checkpoint_interval=2",
        "training.batch_size=2",
        "model.block_size=64",
    ];
    let mut args = vec!["train", "--config", s(&config), "--init-from", s(&ck)];
    args.extend(["--data", s(&corpus), "--out", s(&run), "-q"]);
    for set in &sets {
        args.extend(["--set", set]);
    }
    // The weights carried over: a trainer built the same way starts with them.
    let over: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let mut cfg = Config::load(&config, &over).unwrap();
    cfg.data.path = corpus.clone();
    let ctx = tinygpt::run::context::RunContext::for_training(&cfg, &Device::Cpu).unwrap();
    let t = Trainer::init_from(cfg, &ck, &ctx, ProgressMode::Quiet).unwrap();
    assert_eq!(
        common::param_values(&t.params),
        common::checkpoint_weights(&ck),
        "the run starts from the imported weights"
    );
    assert_eq!(t.state.step, 0, "a new run, not a resume");
    let o = tinygpt(&args, ws.dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let tuned = checkpoint::load(&run.join("last"), &Device::Cpu).unwrap();
    assert_eq!(tuned.state.unwrap().step, 4);
    assert_ne!(
        common::checkpoint_weights(&run.join("last")),
        common::checkpoint_weights(&ck),
        "training moved the weights"
    );
    // A config whose [model] differs from the checkpoint's is refused, naming the key.
    let mut bad = args.clone();
    let run2 = ws.path("ft2");
    let at = bad.iter().position(|a| *a == s(&run)).unwrap();
    bad[at] = s(&run2);
    bad.extend(["--set", "model.n_layer=3"]);
    let o = tinygpt(&bad, ws.dir.path());
    fails_with(&o, "n_layer = 3 but the checkpoint has n_layer = 2");
    assert!(!run2.join("last").exists(), "nothing written");
}

#[test]
fn gguf_file_reads_back_with_its_keys_tensors_and_vocabulary() {
    let ws = Workspace::new(3000);
    // A corpus with multi-byte characters: é (2 bytes) and 日 (3 bytes).
    std::fs::write(ws.path("corpus.txt"), common::corpus(3000) + "café 日\n").unwrap();
    let ck = random_checkpoint(&ws, "ck", &["model.bias=false"]);
    let file = ws.path("m.gguf");
    export(&ws, &ck, "gguf", &file, &["--dtype", "f16"]);
    let mut f = std::fs::File::open(&file).unwrap();
    let content = Content::read(&mut f).unwrap();
    let md = &content.metadata;
    let string = |k: &str| match &md[k] {
        Value::String(s) => s.clone(),
        v => panic!("{k}: {v:?} is not a string"),
    };
    let u32_ = |k: &str| match &md[k] {
        Value::U32(v) => *v,
        v => panic!("{k}: {v:?} is not a u32"),
    };
    assert_eq!(string("general.architecture"), "gpt2");
    assert_eq!(string("tokenizer.ggml.model"), "gpt2");
    assert_eq!(string("tokenizer.ggml.pre"), "gpt-2");
    assert_eq!(u32_("gpt2.context_length"), 16);
    assert_eq!(u32_("gpt2.embedding_length"), 32);
    assert_eq!(u32_("gpt2.feed_forward_length"), 128);
    assert_eq!(u32_("gpt2.block_count"), 2);
    assert_eq!(u32_("gpt2.attention.head_count"), 2);
    assert_eq!(u32_("general.file_type"), 1, "mostly f16");
    assert!(matches!(md["gpt2.attention.layer_norm_epsilon"], Value::F32(e) if e == 1e-5));
    let strings = |k: &str| match &md[k] {
        Value::Array(v) => v
            .iter()
            .map(|x| match x {
                Value::String(s) => s.clone(),
                v => panic!("{k}: {v:?} is not a string"),
            })
            .collect::<Vec<_>>(),
        v => panic!("{k}: {v:?} is not an array"),
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let ours = checkpoint::load(&ck, &Device::Cpu).unwrap();
    assert_eq!(tokens.len(), ours.tokenizer.vocab_size());
    let id = |c: char| ours.tokenizer.encode(&c.to_string()).unwrap()[0] as usize;
    // Characters in GPT-2's byte alphabet: space is Ġ, newline Ċ, é's bytes C3 A9 are "Ã©".
    assert_eq!(tokens[id(' ')], "Ġ");
    assert_eq!(tokens[id('\n')], "Ċ");
    assert_eq!(tokens[id('a')], "a");
    assert_eq!(tokens[id('é')], "Ã©");
    assert_eq!(tokens[id('日')], "æĹ¥");
    let merges = strings("tokenizer.ggml.merges");
    assert!(merges.contains(&"Ã ©".to_string()), "{merges:?}");
    assert!(merges.contains(&"æ Ĺ".to_string()) && merges.contains(&"æĹ ¥".to_string()));
    match &md["tokenizer.ggml.token_type"] {
        Value::Array(v) => {
            assert_eq!(v.len(), tokens.len());
            assert!(
                v.iter().all(|t| matches!(t, Value::I32(1))),
                "all normal tokens"
            );
        }
        v => panic!("token_type: {v:?}"),
    }
    // Tensors: names, shapes (candle's order: the weight's (out, in)), types.
    let infos: HashMap<&str, _> = content
        .tensor_infos
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let v = tokens.len();
    let expect: &[(&str, &[usize], &str)] = &[
        ("token_embd.weight", &[v, 32], "F16"),
        ("position_embd.weight", &[16, 32], "F16"),
        ("output_norm.weight", &[32], "F32"),
        ("output_norm.bias", &[32], "F32"),
        ("blk.0.attn_norm.weight", &[32], "F32"),
        ("blk.0.attn_norm.bias", &[32], "F32"),
        ("blk.0.attn_qkv.weight", &[96, 32], "F16"),
        ("blk.0.attn_qkv.bias", &[96], "F32"),
        ("blk.1.attn_output.weight", &[32, 32], "F16"),
        ("blk.1.ffn_up.weight", &[128, 32], "F16"),
        ("blk.1.ffn_up.bias", &[128], "F32"),
        ("blk.1.ffn_down.weight", &[32, 128], "F16"),
        ("blk.1.ffn_norm.bias", &[32], "F32"),
    ];
    for (name, shape, dtype) in expect {
        let info = infos.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(info.shape.dims(), *shape, "{name}");
        assert_eq!(format!("{:?}", info.ggml_dtype), *dtype, "{name}");
    }
    assert_eq!(
        infos.len(),
        4 + 2 * 12,
        "every tensor, no output.weight for a tied head"
    );
    // The f16 embedding holds the model's values, rounded.
    let wte = infos["token_embd.weight"]
        .read(&mut f, content.tensor_data_offset, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    let d = (wte - &ours.model.wte)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-3);
}

#[test]
fn bad_inputs_get_one_line_and_nothing_is_overwritten() {
    let ws = Workspace::new(3000);
    let ck = random_checkpoint(&ws, "ck", &[]);
    let run = |args: &[&str]| tinygpt(args, ws.dir.path());
    // `tinygpt export CK --format F --out OUT EXTRA…`, whatever its outcome.
    let exp = |ck: &str, format: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "export",
            "--checkpoint",
            ck,
            "--format",
            format,
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        tinygpt(&args, ws.dir.path())
    };
    // An output that exists is kept without --force.
    let keep = ws.path("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("mine.txt"), "mine").unwrap();
    let o = exp(s(&ck), "hf", s(&keep), &[]);
    fails_with(&o, "already exists; pass --force");
    let o = run(&["import", "--from", s(&fixture()), "--out", s(&keep)]);
    fails_with(&o, "already exists; pass --force");
    let file = ws.path("m.gguf");
    std::fs::write(&file, "mine").unwrap();
    let o = exp(s(&ck), "gguf", s(&file), &[]);
    fails_with(&o, "already exists; pass --force");
    assert_eq!(
        std::fs::read_to_string(keep.join("mine.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    // --force replaces.
    let o = exp(s(&ck), "gguf", s(&file), &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // An unknown dtype or format.
    let o = exp(s(&ck), "gguf", "x.gguf", &["--dtype", "q4"]);
    fails_with(&o, "invalid value 'q4' for '--dtype");
    let o = exp(s(&ck), "onnx", "x", &[]);
    fails_with(&o, "invalid value 'onnx' for '--format");
    // A model GPT-2 cannot express.
    let rope = random_checkpoint(&ws, "rope", &["model.position=\"rope\""]);
    let o = exp(s(&rope), "hf", "r", &[]);
    fails_with(
        &o,
        "model.position = \"rope\" (rotary embeddings) has no equivalent in GPT-2",
    );
    let o = exp(s(&rope), "gguf", "r.gguf", &[]);
    fails_with(&o, "cannot be exported to GGUF");
    assert!(!ws.path("r").exists() && !ws.path("r.gguf").exists());
    // Folders that are not GPT-2, or not whole.
    let copy = |name: &str| {
        let d = ws.path(name);
        std::fs::create_dir(&d).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(fixture().join(f), d.join(f)).unwrap();
        }
        d
    };
    let llama = copy("llama");
    let text = std::fs::read_to_string(llama.join("config.json")).unwrap();
    std::fs::write(
        llama.join("config.json"),
        text.replace("\"gpt2\"", "\"llama\""),
    )
    .unwrap();
    let o = run(&["import", "--from", s(&llama), "--out", "o1"]);
    fails_with(&o, "model_type is \"llama\", not \"gpt2\"");
    let missing = copy("missing");
    std::fs::remove_file(missing.join("model.safetensors")).unwrap();
    let o = run(&["import", "--from", s(&missing), "--out", "o2"]);
    fails_with(&o, "model.safetensors is missing");
    let wide = copy("wide");
    let text = std::fs::read_to_string(wide.join("config.json")).unwrap();
    std::fs::write(
        wide.join("config.json"),
        text.replace("\"n_embd\": 32", "\"n_embd\": 64"),
    )
    .unwrap();
    let o = run(&["import", "--from", s(&wide), "--out", "o3"]);
    fails_with(
        &o,
        "h.0.ln_1.weight has shape [32], but config.json's sizes (n_embd 64",
    );
    let o = run(&["import", "--from", "nowhere", "--out", "o4"]);
    fails_with(&o, "not a folder");
    for d in ["o1", "o2", "o3", "o4"] {
        assert!(!ws.path(d).exists(), "{d}: nothing written");
    }
    // A corrupt config.json.
    let broken = copy("broken");
    std::fs::write(broken.join("config.json"), "{\"model_type\": ").unwrap();
    let o = run(&["import", "--from", s(&broken), "--out", "o5"]);
    fails_with(&o, "config.json is not valid JSON");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `tinygpt export` of `ck` to `out`; it must succeed.
fn export(ws: &Workspace, ck: &Path, format: &str, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "export",
        "--checkpoint",
        s(ck),
        "--format",
        format,
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    ok(ws, &args);
}

/// Runs tinygpt in the workspace; it must succeed.
fn ok(ws: &Workspace, args: &[&str]) -> std::process::Output {
    let o = tinygpt(args, ws.dir.path());
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}
