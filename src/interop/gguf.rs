//! llama.cpp's GGUF file for the `gpt2` architecture, written with candle's `gguf_file::write`.
//!
//! Tensors keep tinygpt's `(out, in)` layout (GGUF lists dimensions innermost first, so the
//! file says `[in, out]`, as llama.cpp expects), with Q, K and V fused in `attn_qkv` and every
//! bias present. The tokenizer is GPT-2's kind (`tokenizer.ggml.model = "gpt2"`): tokens are
//! written in GPT-2's byte-to-character alphabet and llama.cpp splits text into bytes before
//! merging. A char vocabulary becomes such a vocabulary too: each character is the token of its
//! UTF-8 bytes, and a multi-byte character gets the chain of merges that joins its bytes.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use serde_json::Value as Json;

use super::{check_exportable, check_output, Gpt2Weights};
use crate::data::tokenizer::{byte_chars, Tokenizer, TokenizerKind};
use crate::error::{Error, Result};
use crate::run::checkpoint::Checkpoint;

/// The element type of the 2-D weights (norms and biases stay f32, as llama.cpp's own
/// converter writes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufDtype {
    F32,
    F16,
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;

/// The vocabulary as llama.cpp's `gpt2` tokenizer reads it: tokens, their types, and merges
/// as "left right" strings.
fn vocabulary(tok: &Tokenizer) -> Result<(Vec<String>, Vec<i32>, Vec<String>)> {
    let n = tok.vocab_size() as u32;
    let token = |id: u32| {
        tok.id_to_token(id)
            .ok_or_else(|| Error::Tokenizer(format!("the vocabulary has no token with id {id}")))
    };
    let special = tok.special_ids();
    let types = (0..n)
        .map(|id| match special.contains(&id) {
            true => CONTROL,
            false => NORMAL,
        })
        .collect();
    let (tokens, mut merges): (Vec<String>, Vec<String>) = match tok.kind() {
        TokenizerKind::Bpe => {
            let tokens = (0..n).map(token).collect::<Result<Vec<_>>>()?;
            let json: Json = serde_json::from_str(&tok.to_json()?)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let merges = json["model"]["merges"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(|m| match m {
                            Json::String(s) => Some(s.clone()),
                            Json::Array(pair) => Some(format!(
                                "{} {}",
                                pair.first()?.as_str()?,
                                pair.get(1)?.as_str()?
                            )),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            (tokens, merges)
        }
        TokenizerKind::Char => {
            let bytes = byte_chars();
            let mut tokens = Vec::with_capacity(n as usize);
            let mut merges = Vec::new();
            for id in 0..n {
                let t = token(id)?;
                let pieces: Vec<String> =
                    t.bytes().map(|b| bytes[b as usize].to_string()).collect();
                // Join the bytes of a multi-byte character left to right.
                let mut joined = pieces[0].clone();
                for p in &pieces[1..] {
                    merges.push(format!("{joined} {p}"));
                    joined.push_str(p);
                }
                tokens.push(joined);
            }
            (tokens, merges)
        }
    };
    if merges.is_empty() {
        // llama.cpp refuses a file without merges. This one never applies: 'ÿ' stands for the
        // byte 0xFF, which UTF-8 text never contains.
        merges.push("ÿ ÿ".into());
    }
    Ok((tokens, types, merges))
}

/// Writes `ck` as a GGUF file `out` (through a temporary file renamed into place; an existing
/// `out` only with `force`).
pub fn export(ck: &Checkpoint, out: &Path, dtype: GgufDtype, force: bool) -> Result<()> {
    let cfg = &ck.config.model;
    check_exportable(cfg, "GGUF")?;
    check_output(out, force)?;
    if out.is_dir() {
        return Err(Error::Usage(format!(
            "{} is a folder; --format gguf writes one file",
            out.display()
        )));
    }
    let w = Gpt2Weights::from_model(&ck.model)?;
    let tensors = tensor_list(&w, dtype)?;
    let meta = metadata(ck, dtype)?;
    write_atomically(out, &meta, &tensors)
}

/// The file's tensors in llama.cpp's `gpt2` names: 2-D weights as `dtype`, norms and biases f32.
fn tensor_list(w: &Gpt2Weights, dtype: GgufDtype) -> Result<Vec<(String, QTensor)>> {
    let matrix = |t: &Tensor| -> Result<QTensor> {
        let d = match dtype {
            GgufDtype::F32 => GgmlDType::F32,
            GgufDtype::F16 => GgmlDType::F16,
        };
        Ok(QTensor::quantize(t, d)?)
    };
    let vector = |t: &Tensor| -> Result<QTensor> { Ok(QTensor::quantize(t, GgmlDType::F32)?) };
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), matrix(&w.wte)?),
        ("position_embd.weight".into(), matrix(&w.wpe)?),
        ("output_norm.weight".into(), vector(&w.ln_f.0)?),
        ("output_norm.bias".into(), vector(&w.ln_f.1)?),
    ];
    if let Some(head) = &w.lm_head {
        // Without it, llama.cpp's gpt2 reads the token embedding: the tied head.
        tensors.push(("output.weight".into(), matrix(head)?));
    }
    for (i, b) in w.blocks.iter().enumerate() {
        for (name, (weight, bias), is_norm) in [
            ("attn_norm", &b.ln_1, true),
            ("attn_qkv", &b.qkv, false),
            ("attn_output", &b.attn_proj, false),
            ("ffn_norm", &b.ln_2, true),
            ("ffn_up", &b.fc, false),
            ("ffn_down", &b.mlp_proj, false),
        ] {
            let weight = if is_norm {
                vector(weight)?
            } else {
                matrix(weight)?
            };
            tensors.push((format!("blk.{i}.{name}.weight"), weight));
            tensors.push((format!("blk.{i}.{name}.bias"), vector(bias)?));
        }
    }
    Ok(tensors)
}

/// The file's key-value metadata: architecture, hyperparameters and the tokenizer.
fn metadata(ck: &Checkpoint, dtype: GgufDtype) -> Result<Vec<(&'static str, Value)>> {
    let cfg = &ck.config.model;
    let (tokens, types, merges) = vocabulary(&ck.tokenizer)?;
    let special = ck.tokenizer.special_ids().first().copied();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let u32v = |n: usize| Value::U32(n as u32);
    let name = ck
        .dir
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tinygpt".into());
    let mut meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("gpt2".into())),
        ("general.name", Value::String(name)),
        (
            "general.file_type",
            Value::U32(match dtype {
                GgufDtype::F32 => 0,
                GgufDtype::F16 => 1,
            }),
        ),
        ("gpt2.context_length", u32v(cfg.block_size)),
        ("gpt2.embedding_length", u32v(cfg.n_embd)),
        ("gpt2.feed_forward_length", u32v(4 * cfg.n_embd)),
        ("gpt2.block_count", u32v(cfg.n_layer)),
        ("gpt2.attention.head_count", u32v(cfg.n_head)),
        ("gpt2.attention.layer_norm_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges", strings(merges)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    if let Some(id) = special {
        meta.push(("tokenizer.ggml.bos_token_id", Value::U32(id)));
        meta.push(("tokenizer.ggml.eos_token_id", Value::U32(id)));
    }
    Ok(meta)
}

/// Writes `meta` and `tensors` to a temporary file beside `out`, then renames it into place
/// (the temporary file is removed on failure).
fn write_atomically(
    out: &Path,
    meta: &[(&str, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let tmp = out.with_file_name(format!(
        ".{}.tmp",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
