//! `tinygpt generate`.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::rng::seeded;
use crate::sample::{generate, SampleOptions, StopAt, MAX_NEW_TOKENS_CAP};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (or a run directory: its best/ is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue. Without --prompt or --prompt-file, a piped stdin is read.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// File whose text to continue.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Tokens to generate per sample.
    #[arg(long, default_value_t = SampleOptions::default().max_new_tokens)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = SampleOptions::default().temperature, allow_hyphen_values = true)]
    temperature: f64,
    /// Sample only from the k most likely tokens [default: 200; a k at least the vocabulary
    /// size keeps every token].
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only from the smallest set of tokens with total probability ≥ p.
    #[arg(long, allow_hyphen_values = true)]
    top_p: Option<f64>,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = SampleOptions::default().seed)]
    seed: u64,
    /// Number of samples.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Recompute the whole context for every token instead of using the KV cache.
    #[arg(long)]
    no_kv_cache: bool,
    /// Lower the scores of tokens already in the text: positive logits are divided by it,
    /// negative ones multiplied (transformers' and llama.cpp's rule); 1 = off.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    repetition_penalty: f64,
    /// End a sample just before the first occurrence of this text in what it generates
    /// (repeatable: the first of them to appear).
    #[arg(long = "stop", value_name = "STRING")]
    stop: Vec<String>,
    #[command(flatten)]
    engine: super::EngineArg,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut max_new = args.max_new_tokens;
    if max_new > MAX_NEW_TOKENS_CAP {
        eprintln!("note: --max-new-tokens {max_new} capped at {MAX_NEW_TOKENS_CAP}");
        max_new = MAX_NEW_TOKENS_CAP;
    }
    let opts = SampleOptions {
        max_new_tokens: max_new,
        temperature: args.temperature,
        top_k: args.top_k.or(SampleOptions::default().top_k),
        top_p: args.top_p,
        use_cache: !args.no_kv_cache,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    opts.validate()?;
    StopAt::check(&args.stop)?;
    if args.num_samples == 0 {
        return Err(Error::Usage(
            "--num-samples 0 generates nothing; use M ≥ 1".into(),
        ));
    }
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => super::read_text_file(f, "prompt file")?,
        (None, None) if !std::io::stdin().is_terminal() => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Error::Usage(format!("reading the prompt from stdin: {e}")))?;
            String::from_utf8(buf)
                .map_err(|_| Error::Usage("the prompt on stdin is not valid UTF-8".into()))?
        }
        (None, None) => String::new(),
    };
    let (ck, engine) = super::load_with_engine(&args.checkpoint, args.engine)?;
    let tok = &ck.tokenizer;
    let block = ck.config.model.block_size;
    let mut ids = tok
        .encode(&prompt)
        .map_err(|e| Error::Usage(format!("prompt: {e}")))?;
    if ids.is_empty() {
        let start = tok.newline_id().unwrap_or(0);
        eprintln!("note: empty prompt; starting from a newline token");
        ids.push(start);
    }
    if ids.len() > block {
        eprintln!(
            "note: the prompt is {} tokens; the model sees only its last {block} (block_size)",
            ids.len()
        );
    }
    let mut rng = seeded(args.seed);
    let stdout = std::io::stdout();
    let mut closed = false;
    for n in 0..args.num_samples {
        let mut out = stdout.lock();
        let _ = write!(out, "{prompt}");
        let mut stream = tok.stream();
        let mut stop = StopAt::new(args.stop.clone());
        let mut show = |text: &str, out: &mut std::io::StdoutLock| {
            if out
                .write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .is_err()
            {
                closed = true;
                return Err(Error::Usage("stdout closed".into()));
            }
            Ok(())
        };
        let result = generate(&engine, &ids, &opts, &mut rng, |id| {
            let Some(text) = stream.step(id)? else {
                return Ok(true);
            };
            let (shown, stopped) = stop.push(&text);
            show(&shown, &mut out)?;
            Ok(!stopped)
        });
        if result.is_ok() {
            let rest = stop.finish();
            let _ = show(&rest, &mut out);
        }
        // A closed pipe (e.g. `| head`) ends generation quietly.
        if closed {
            return Ok(());
        }
        result?;
        let _ = writeln!(out);
        if n + 1 < args.num_samples {
            let _ = writeln!(out, "---------------");
        }
    }
    Ok(())
}
