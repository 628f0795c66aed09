//! `tinygpt serve`.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;
use crate::serve::{run, Served};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Checkpoint directory (or a run directory: its best/ is used, and its metrics.csv
    /// gives the training curves).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Port to listen on (0: any free port; the URL is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Address to listen on. Only this machine can reach the default; 0.0.0.0 opens the page
    /// (and the model) to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Corpus the circuits view scores heads on, instead of the run's own (its config's
    /// data.path).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Require this key of every API request (`Authorization: Bearer KEY`); the page asks for
    /// it once. Also read from TINYGPT_API_KEY.
    #[arg(long, env = "TINYGPT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// How /v1/chat/completions writes messages as text (TOML: system, user, assistant with
    /// {content}, generation, stop); default `User:` / `Assistant:` lines.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// /v1 generations that run at once (default: the cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    slots: Option<u64>,
    /// /v1 requests that may wait for a slot; any beyond get a 429 (default: 4 a core).
    #[arg(long)]
    queue: Option<usize>,
    #[command(flatten)]
    engine: super::EngineArg,
}

/// Whether `host` is this machine only (127.0.0.0/8, ::1, localhost).
fn is_loopback(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host == "localhost",
    }
}

pub fn run_serve(args: ServeArgs) -> Result<()> {
    let template = match &args.chat_template {
        Some(p) => crate::serve::openai::ChatTemplate::load(p)?,
        None => Default::default(),
    };
    let dir = super::checkpoint_dir(&args.checkpoint);
    let (ck, mut ctx) = super::load_with_context(&args.checkpoint, args.engine)?;
    // Requests decode side by side: one core each, no partner threads spinning for a second.
    ctx.engine.partner_threads = false;
    let engine = ctx.engine.engine(&ck.model, false)?;
    // The run's metrics.csv: beside best/ and last/, or in the directory given.
    let metrics = [Some(args.checkpoint.as_path()), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("metrics.csv"))
        .find(|p| p.is_file());
    let served = Served::new(ck, engine, metrics)
        .with_data(args.data)
        .with_api_key(args.api_key)
        .with_chat_template(template)
        .with_limit(
            args.slots.map_or(crate::serve::cores(), |n| n as usize),
            args.queue.unwrap_or(4 * crate::serve::cores()),
        );
    if served.api_key.is_none() && !is_loopback(&args.host) {
        eprintln!(
            "warning: --host {} without --api-key: anyone who can reach this machine on port {} can use the model and read its insides; pass --api-key KEY (or set TINYGPT_API_KEY)",
            args.host, args.port
        );
    }
    run(served, &args.host, args.port)
}
