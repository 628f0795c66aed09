//! `tinygpt prepare`.

use std::path::PathBuf;

use clap::Args;

use crate::data::prepare::{
    prepare, OnBad, PrepareOptions, TokenizerSource, DEFAULT_EXTENSIONS, WHOLE_DOCUMENT_BYTES,
};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::progress::ProgressMode;
use crate::run::config::{Config, TokenizerConfig};

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Inputs: files, folders (searched recursively for --extensions), quoted globs; `.gz`
    /// files are decompressed, `.jsonl` files hold one document per line (repeatable).
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    data: Vec<PathBuf>,
    /// The prepared folder to write (new, empty, or one prepare wrote before).
    #[arg(long)]
    out: PathBuf,
    /// Take the tokenizer settings ([tokenizer]) and training.val_fraction from this config.
    #[arg(long, conflicts_with = "tokenizer")]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set tokenizer.kind="bpe" --set tokenizer.vocab_size=8192.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Reuse this checkpoint's tokenizer (to fine-tune it on the prepared text).
    #[arg(long, value_name = "CKPT")]
    tokenizer: Option<PathBuf>,
    /// Share of the documents held out for validation (default: the config's
    /// training.val_fraction, else 0.1).
    #[arg(long)]
    val_fraction: Option<f64>,
    /// File extensions searched for in folders (each also with .gz).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_EXTENSIONS.map(String::from))]
    extensions: Vec<String>,
    /// The JSON Lines field that holds a document's text.
    #[arg(long, default_value = "text")]
    jsonl_field: String,
    /// A document that cannot be read (not UTF-8, a JSON line without the field): `fail`
    /// names it and stops; `skip` leaves it out, says so, and records it in the manifest.
    #[arg(long, value_enum, default_value = "fail")]
    on_bad: OnBad,
    /// Bytes of the corpus a BPE tokenizer trains on (evenly spaced pieces).
    #[arg(long, default_value_t = 64 << 20)]
    tokenizer_sample_bytes: u64,
    /// Most tokens per shard file.
    #[arg(long, default_value_t = 1 << 28)]
    shard_tokens: u64,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: PrepareArgs) -> Result<()> {
    let (tokenizer, config_val) = match (&args.tokenizer, &args.config) {
        (Some(ck), _) => {
            if !args.set.is_empty() {
                return Err(Error::Usage(
                    "--set cannot change a checkpoint's tokenizer; leave out --tokenizer to train one".into(),
                ));
            }
            let path = match ck.is_dir() {
                true => super::checkpoint_dir(ck).join("tokenizer.json"),
                false => ck.clone(),
            };
            (
                TokenizerSource::Given(Box::new(Tokenizer::load(&path)?)),
                None,
            )
        }
        (None, Some(cfg)) => {
            let c = Config::load(cfg, &args.set)?;
            (
                TokenizerSource::Train(c.tokenizer),
                Some(c.training.val_fraction),
            )
        }
        (None, None) => (
            TokenizerSource::Train(TokenizerConfig::from_overrides(&args.set)?),
            None,
        ),
    };
    let opts = PrepareOptions {
        inputs: args.data,
        out: args.out.clone(),
        tokenizer,
        val_fraction: args.val_fraction.or(config_val).unwrap_or(0.1),
        extensions: args.extensions,
        jsonl_field: args.jsonl_field,
        on_bad: args.on_bad,
        sample_bytes: args.tokenizer_sample_bytes,
        shard_tokens: args.shard_tokens,
        block_bytes: WHOLE_DOCUMENT_BYTES,
        progress: ProgressMode::detect(args.quiet),
    };
    let r = prepare(&opts)?;
    let m = &r.manifest;
    if r.unchanged {
        println!(
            "{}: already prepared from these {} input(s) with these options; nothing to do",
            args.out.display(),
            m.inputs.len()
        );
        return Ok(());
    }
    if !args.quiet {
        println!(
            "prepared {}: {} input(s), {} documents ({} for validation), {} train / {} val tokens ({} tokenizer, {} tokens), {:.1} MB in {:.1} s ({:.1} MB/s)",
            args.out.display(),
            m.inputs.len(),
            m.documents,
            m.val_documents,
            m.train_tokens,
            m.val_tokens,
            m.tokenizer.kind.name(),
            m.tokenizer.vocab_size,
            r.bytes as f64 / 1e6,
            r.seconds,
            r.bytes as f64 / 1e6 / r.seconds.max(1e-9),
        );
        println!(
            "train on it: tinygpt train --config CONFIG --data {}",
            args.out.display()
        );
    }
    Ok(())
}
