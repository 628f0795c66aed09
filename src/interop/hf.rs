//! transformers' `GPT2LMHeadModel` folder: `config.json`, `model.safetensors` and the
//! tokenizer (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`).
//!
//! GPT-2's linear layers are `Conv1D`s, whose weights are stored `[in, out]`: the transpose of
//! tinygpt's (and PyTorch's `nn.Linear`'s) `(out, in)`. Its `c_attn` is W_Q | W_K | W_V side
//! by side, `[C, 3C]`. Tensor names carry the `transformer.` prefix that `save_pretrained`
//! writes; [`import`] also reads the bare names of the original OpenAI upload.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::{check_exportable, check_output, Dense, Gpt2Block, Gpt2Weights};
use crate::data::tokenizer::{Tokenizer, TokenizerKind};
use crate::error::{Error, Result};
use crate::layout::Activation;
use crate::model::{Gpt, ModelConfig, Params};
use crate::run::checkpoint::{self, Checkpoint};
use crate::run::config::{Config, TokenizerConfig};

/// GPT-2's LayerNorm ε, which tinygpt's LayerNorms use.
const LAYER_NORM_EPS: f64 = 1e-5;

/// transformers' name of an activation.
fn hf_activation(a: Activation) -> Result<&'static str> {
    match a {
        Activation::Gelu => Ok("gelu"),
        Activation::GeluTanh => Ok("gelu_new"),
        Activation::Relu2 => Err(Error::Usage(
            "model.activation = \"relu2\" has no GPT-2 equivalent".into(),
        )),
    }
}

/// The special token's id, when the vocabulary has one (BPE: `<|endoftext|>`).
fn special_id(tok: &Tokenizer) -> Option<u32> {
    tok.special_ids().first().copied()
}

/// `config.json`: every key GPT2Config has, GPT-2 small's values where tinygpt has no
/// counterpart.
fn config_json(cfg: &ModelConfig, vocab: usize, special: Option<u32>) -> Result<Value> {
    Ok(json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": 4 * cfg.n_embd,
        "activation_function": hf_activation(cfg.activation)?,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "summary_type": "cls_index",
        "summary_use_proj": true,
        "summary_activation": null,
        "summary_proj_to_labels": true,
        "summary_first_dropout": 0.1,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "use_cache": true,
        "bos_token_id": special,
        "eos_token_id": special,
        "pad_token_id": null,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }))
}

/// `tokenizer_config.json`: the fast tokenizer over `tokenizer.json` as it is. (Without it,
/// transformers builds a `GPT2Tokenizer`, whose byte-level pre-tokenizer would turn a char
/// vocabulary's spaces and newlines into unknown tokens.)
fn tokenizer_config_json(tok: &Tokenizer, block_size: usize) -> Value {
    let special = special_id(tok).and_then(|id| tok.id_to_token(id));
    let mut v = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": false,
        "add_prefix_space": false,
    });
    if let Some(s) = &special {
        for key in ["bos_token", "eos_token", "unk_token"] {
            v[key] = json!(s);
        }
    }
    v
}

/// GPT-2's tensors by transformers' names, Conv1D weights transposed to `[in, out]`.
fn hf_tensors(w: &Gpt2Weights) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut push = |name: String, t: &Tensor| -> Result<()> {
        out.push((name, t.contiguous()?));
        Ok(())
    };
    push("transformer.wte.weight".into(), &w.wte)?;
    push("transformer.wpe.weight".into(), &w.wpe)?;
    for (i, b) in w.blocks.iter().enumerate() {
        let p = format!("transformer.h.{i}");
        let norm = |d: &Dense| (d.0.clone(), d.1.clone());
        let conv = |d: &Dense| -> Result<Dense> { Ok((d.0.t()?, d.1.clone())) };
        for (name, (weight, bias)) in [
            ("ln_1", norm(&b.ln_1)),
            ("attn.c_attn", conv(&b.qkv)?),
            ("attn.c_proj", conv(&b.attn_proj)?),
            ("ln_2", norm(&b.ln_2)),
            ("mlp.c_fc", conv(&b.fc)?),
            ("mlp.c_proj", conv(&b.mlp_proj)?),
        ] {
            push(format!("{p}.{name}.weight"), &weight)?;
            push(format!("{p}.{name}.bias"), &bias)?;
        }
    }
    push("transformer.ln_f.weight".into(), &w.ln_f.0)?;
    push("transformer.ln_f.bias".into(), &w.ln_f.1)?;
    if let Some(h) = &w.lm_head {
        push("lm_head.weight".into(), h)?;
    }
    Ok(out)
}

/// Writes `ck` as a `GPT2LMHeadModel` folder `out` (atomically; an existing `out` only with
/// `force`).
pub fn export(ck: &Checkpoint, out: &Path, force: bool) -> Result<()> {
    let cfg = &ck.config.model;
    check_exportable(cfg, "transformers")?;
    check_output(out, force)?;
    if out.exists() && !out.is_dir() {
        return Err(Error::Usage(format!(
            "{} is a file; --format hf writes a folder",
            out.display()
        )));
    }
    let vocab = ck.tokenizer.vocab_size();
    let weights = Gpt2Weights::from_model(&ck.model)?;
    let tensors = hf_tensors(&weights)?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let model_bytes = safetensors::tensor::serialize(tensors, Some(meta))
        .map_err(|e| Error::Usage(format!("serialising model.safetensors: {e}")))?;
    let special = special_id(&ck.tokenizer);
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    let config = pretty(&config_json(cfg, vocab, special)?);
    let tok_config = pretty(&tokenizer_config_json(&ck.tokenizer, cfg.block_size));
    let special_map = special
        .and_then(|id| ck.tokenizer.id_to_token(id))
        .map(|s| pretty(&json!({"bos_token": s, "eos_token": s, "unk_token": s})));
    let tok_json = ck.tokenizer.to_json()?;
    checkpoint::write_dir_atomically(out, |dir| {
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
        };
        write("model.safetensors", &model_bytes)?;
        write("config.json", config.as_bytes())?;
        write("tokenizer.json", tok_json.as_bytes())?;
        write("tokenizer_config.json", tok_config.as_bytes())?;
        if let Some(m) = &special_map {
            write("special_tokens_map.json", m.as_bytes())?;
        }
        Ok(())
    })
}

/// Reads `name` of a `GPT2LMHeadModel` folder, naming it when missing.
fn read_part(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => {
                "is missing; a GPT2LMHeadModel folder holds config.json, model.safetensors and tokenizer.json (save_pretrained writes them)".to_string()
            }
            _ => e.to_string(),
        };
        Error::Usage(format!("{}: {name} {why}", dir.display()))
    })
}

/// The model settings of a GPT-2 `config.json`, GPT-2 small's defaults for absent keys.
fn model_config(dir: &Path, v: &Value) -> Result<(ModelConfig, usize)> {
    let bad = |msg: String| Error::Usage(format!("{}: config.json: {msg}", dir.display()));
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "gpt2" {
        return Err(bad(format!(
            "model_type is {model_type:?}, not \"gpt2\"; tinygpt imports GPT2LMHeadModel folders"
        )));
    }
    let int = |key: &str, default: u64| -> Result<usize> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default as usize),
            Some(x) => x
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("{key} is {x}, not a positive integer"))),
        }
    };
    let n_embd = int("n_embd", 768)?;
    let n_head = int("n_head", 12)?;
    if let Some(inner) = v.get("n_inner").and_then(Value::as_u64) {
        if inner as usize != 4 * n_embd {
            return Err(bad(format!(
                "n_inner is {inner}; tinygpt's MLP is 4·n_embd = {} wide",
                4 * n_embd
            )));
        }
    }
    let activation = match v
        .get("activation_function")
        .and_then(Value::as_str)
        .unwrap_or("gelu_new")
    {
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        other => {
            return Err(bad(format!(
                "activation_function {other:?} is not one tinygpt has (gelu, gelu_new, gelu_pytorch_tanh)"
            )))
        }
    };
    let eps = v
        .get("layer_norm_epsilon")
        .and_then(Value::as_f64)
        .unwrap_or(LAYER_NORM_EPS);
    if (eps - LAYER_NORM_EPS).abs() > 1e-12 {
        return Err(bad(format!(
            "layer_norm_epsilon is {eps}; tinygpt's LayerNorms use {LAYER_NORM_EPS}"
        )));
    }
    for (key, want) in [
        ("scale_attn_weights", true),
        ("scale_attn_by_inverse_layer_idx", false),
    ] {
        if let Some(b) = v.get(key).and_then(Value::as_bool) {
            if b != want {
                return Err(bad(format!(
                    "{key} is {b}; tinygpt's attention is softmax(QKᵀ/√d_k) (needs {want})"
                )));
            }
        }
    }
    let cfg = ModelConfig {
        block_size: int("n_positions", 1024)?,
        n_layer: int("n_layer", 12)?,
        n_head,
        n_embd,
        dropout: 0.0,
        bias: true,
        qkv_bias: true,
        activation,
        position: Default::default(),
        tie_embeddings: v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        zero_init: false,
        bigram_buckets: 0,
        logit_softcap: 0.0,
        norm: Default::default(),
        qk_norm: false,
    };
    if n_embd % n_head != 0 {
        return Err(bad(format!(
            "n_embd = {n_embd} is not a multiple of n_head = {n_head}"
        )));
    }
    Ok((cfg, int("vocab_size", 50257)?))
}

/// Reads GPT-2's weights by transformers' names (with or without `transformer.`), checking
/// every shape against `cfg`; Conv1D weights come back `(out, in)`.
fn read_weights(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    cfg: &ModelConfig,
    vocab: usize,
) -> Result<Gpt2Weights> {
    let c = cfg.n_embd;
    let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let t = tensors
            .get(&format!("transformer.{name}"))
            .or_else(|| tensors.get(name))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{}: model.safetensors lacks transformer.{name}; it is not a complete GPT-2 checkpoint",
                    dir.display()
                ))
            })?;
        if t.dims() != shape {
            return Err(Error::Usage(format!(
                "{}: model.safetensors' {name} has shape {:?}, but config.json's sizes (n_embd {c}, n_layer {}, n_positions {}, vocab_size {vocab}) need {shape:?}",
                dir.display(),
                t.dims(),
                cfg.n_layer,
                cfg.block_size
            )));
        }
        Ok(t.to_dtype(DType::F32)?)
    };
    let conv = |name: &str, d_in: usize, d_out: usize| -> Result<Dense> {
        let w = get(&format!("{name}.weight"), &[d_in, d_out])?;
        let b = get(&format!("{name}.bias"), &[d_out])?;
        Ok((w.t()?.contiguous()?, b))
    };
    let norm = |name: &str| -> Result<Dense> {
        Ok((
            get(&format!("{name}.weight"), &[c])?,
            get(&format!("{name}.bias"), &[c])?,
        ))
    };
    let blocks = (0..cfg.n_layer)
        .map(|i| {
            let p = format!("h.{i}");
            Ok(Gpt2Block {
                ln_1: norm(&format!("{p}.ln_1"))?,
                qkv: conv(&format!("{p}.attn.c_attn"), c, 3 * c)?,
                attn_proj: conv(&format!("{p}.attn.c_proj"), c, c)?,
                ln_2: norm(&format!("{p}.ln_2"))?,
                fc: conv(&format!("{p}.mlp.c_fc"), c, 4 * c)?,
                mlp_proj: conv(&format!("{p}.mlp.c_proj"), 4 * c, c)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let lm_head = match cfg.tie_embeddings {
        true => None,
        false => Some(
            tensors
                .get("lm_head.weight")
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "{}: config.json says tie_word_embeddings = false but model.safetensors has no lm_head.weight",
                        dir.display()
                    ))
                })
                .and_then(|t| {
                    if t.dims() != [vocab, c] {
                        return Err(Error::Usage(format!(
                            "{}: lm_head.weight has shape {:?}, expected {:?}",
                            dir.display(),
                            t.dims(),
                            [vocab, c]
                        )));
                    }
                    Ok(t.to_dtype(DType::F32)?)
                })?,
        ),
    };
    Ok(Gpt2Weights {
        wte: get("wte.weight", &[vocab, c])?,
        wpe: get("wpe.weight", &[cfg.block_size, c])?,
        blocks,
        ln_f: norm("ln_f")?,
        lm_head,
    })
}

/// Reads the `GPT2LMHeadModel` folder `dir` and writes it as a tinygpt checkpoint `out`
/// (weights, config, tokenizer; no training state), refusing an existing `out` unless `force`.
/// Groups of biases that are all zeros are left out ([`Gpt2Weights::to_checkpoint_tensors`]),
/// so a model exported without biases comes back as it was.
pub fn import(dir: &Path, out: &Path, force: bool) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(Error::Usage(format!(
            "--from {}: not a folder; pass a GPT2LMHeadModel folder (config.json, model.safetensors, tokenizer.json)",
            dir.display()
        )));
    }
    check_output(out, force)?;
    let config_bytes = read_part(dir, "config.json")?;
    let value: Value = serde_json::from_slice(&config_bytes).map_err(|e| {
        Error::Usage(format!(
            "{}: config.json is not valid JSON: {e}",
            dir.display()
        ))
    })?;
    let (mut cfg, vocab) = model_config(dir, &value)?;
    let tok_text = String::from_utf8(read_part(dir, "tokenizer.json")?)
        .map_err(|_| Error::Usage(format!("{}: tokenizer.json is not UTF-8", dir.display())))?;
    let tokenizer = Tokenizer::from_json(&tok_text)
        .map_err(|e| Error::Usage(format!("{}: tokenizer.json: {e}", dir.display())))?;
    if tokenizer.vocab_size() != vocab {
        return Err(Error::Usage(format!(
            "{}: tokenizer.json has {} tokens but config.json's vocab_size is {vocab}; tinygpt needs one embedding row per token",
            dir.display(),
            tokenizer.vocab_size()
        )));
    }
    let st_path = dir.join("model.safetensors");
    read_part(dir, "model.safetensors").map(drop)?;
    let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu).map_err(|e| {
        Error::Usage(format!(
            "{}: model.safetensors is corrupt or not safetensors ({e})",
            dir.display()
        ))
    })?;
    let weights = read_weights(dir, &tensors, &cfg, vocab)?;
    let named = weights.to_checkpoint_tensors()?;
    cfg.bias = named.bias;
    cfg.qkv_bias = named.qkv_bias;
    let config = imported_config(cfg, &tokenizer)?;
    let mut params = Params::loaded(named.tensors.into_iter().collect(), &Device::Cpu);
    let model = params.build(|vb| Gpt::new(&config.model, vocab, vb))?;
    checkpoint::save(out, &config, &tokenizer, &params, None, None)?;
    Ok(Checkpoint {
        dir: out.to_path_buf(),
        config,
        tokenizer,
        model,
        params,
        state: None,
    })
}

/// A whole config around an imported model: its tokenizer's kind and size, and a fine-tuning
/// recipe (a small constant-ish learning rate) that `train --init-from` replaces with its own
/// `--config`.
fn imported_config(model: ModelConfig, tok: &Tokenizer) -> Result<Config> {
    let training = toml::toml! {
        batch_size = 8
        max_iters = 1000
        learning_rate = 3e-5
        min_lr = 3e-6
        warmup_iters = 50
        lr_decay_iters = 1000
        weight_decay = 0.1
        beta1 = 0.9
        beta2 = 0.95
        grad_clip = 1.0
        grad_accum_steps = 1
        eval_interval = 100
        eval_iters = 20
        val_fraction = 0.1
        seed = 1337
        checkpoint_interval = 100
    };
    let config = Config {
        model,
        tokenizer: TokenizerConfig {
            kind: tok.kind(),
            vocab_size: match tok.kind() {
                TokenizerKind::Bpe => tok.vocab_size(),
                TokenizerKind::Char => 1024,
            },
        },
        training: toml::Value::Table(training)
            .try_into()
            .map_err(|e| Error::Config(e.to_string()))?,
        data: crate::run::config::DataConfig {
            path: "data/shakespeare.txt".into(),
        },
    };
    config.validate()?;
    Ok(config)
}
