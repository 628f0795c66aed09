//! `tinygpt serve`: one page that shows a checkpoint's attention (heatmap and graph, every
//! head, the formula step by step), its next-token distribution, the logit lens, embedding
//! neighbours, training curves and what each head does (scores, ablation, patching, direct
//! logit attribution), beside a JSON API that returns what the views show.
//!
//! The page (HTML, JS and CSS in `page/`) is compiled into the binary and loads nothing from
//! another host. The model is loaded once and shared by every request; each computation runs
//! on tokio's blocking pool, so a slow one never stalls the server. axum serves: a well-kept
//! HTTP stack whose router and extractors leave only the views to write.

pub mod chat;
pub mod circuits;
pub mod openai;
pub mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{Decode, Engine};
use crate::error::{Error, Result};
use crate::run::checkpoint::Checkpoint;

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const STYLE_CSS: &str = include_str!("page/style.css");

/// What every request reads: the checkpoint and its engine (loaded once), the run's
/// metrics.csv, and decoders kept between requests.
pub struct Served {
    pub ck: Checkpoint,
    pub engine: Engine,
    pub metrics: Option<PathBuf>,
    /// Decoders of finished requests, each taken by one request at a time: building one copies
    /// and packs every weight, which for a large model costs more than the request itself.
    decoders: Mutex<Vec<Box<dyn Decode + Send>>>,
    /// The corpus the head scores read, instead of the run's own (`--data`).
    pub data: Option<PathBuf>,
    /// The head scores, computed on first request ([`circuits::scores`]).
    head_scores: Mutex<Option<Arc<crate::circuits::scores::HeadReport>>>,
    /// With a key, every `/api` and `/v1` request must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// How `/v1/chat/completions` turns messages into text ([`openai::ChatTemplate`]).
    pub chat_template: openai::ChatTemplate,
    /// How many `/v1` generations run at once, and wait ([`openai::Limit`]).
    pub limit: openai::Limit,
}

impl Served {
    /// Serves `ck` on `engine` (made for `ck.model`).
    pub fn new(ck: Checkpoint, engine: Engine, metrics: Option<PathBuf>) -> Served {
        Served {
            ck,
            engine,
            metrics,
            decoders: Mutex::new(Vec::new()),
            data: None,
            head_scores: Mutex::new(None),
            api_key: None,
            chat_template: openai::ChatTemplate::default(),
            // One generation a core, four waiting a core.
            limit: openai::Limit::new(cores(), 4 * cores()),
        }
    }

    /// At most `slots` generations at once and `queue` waiting.
    pub fn with_limit(mut self, slots: usize, queue: usize) -> Served {
        self.limit = openai::Limit::new(slots, queue);
        self
    }

    /// Writes chat messages as `template` says.
    pub fn with_chat_template(mut self, template: openai::ChatTemplate) -> Served {
        self.chat_template = template;
        self
    }

    /// Requires `key` of every `/api` and `/v1` request (the page itself loads without it).
    pub fn with_api_key(mut self, key: Option<String>) -> Served {
        self.api_key = key.filter(|k| !k.is_empty());
        self
    }

    /// Scores heads on `data` instead of the run's own corpus.
    pub fn with_data(mut self, data: Option<PathBuf>) -> Served {
        self.data = data;
        self
    }

    /// Runs `f` with a decoder of the model: one kept from an earlier request, or a new one
    /// (concurrent requests each get their own); it is kept afterwards.
    pub fn with_decoder<R>(&self, f: impl FnOnce(&mut dyn Decode) -> Result<R>) -> Result<R> {
        let kept = self.decoders.lock().ok().and_then(|mut d| d.pop());
        let mut decoder = match kept {
            Some(d) => d,
            None => self.engine.decoder()?,
        };
        let result = f(decoder.as_mut());
        if let Ok(mut pool) = self.decoders.lock() {
            pool.push(decoder);
        }
        result
    }
}

type Shared = Arc<Served>;

/// This machine's cores (as the process may use them).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A JSON answer, or a 4xx/5xx with `{"error": "..."}`.
struct Answer(Result<String>);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self.0 {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => {
                let status = match e {
                    Error::Usage(_) | Error::Tokenizer(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                let body = json!({"error": e.to_string()}).to_string();
                (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
        }
    }
}

/// Parses a request body, naming what is wrong with it.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Usage(format!("the request's JSON: {e}")))
}

/// Runs `f` on the blocking pool (the model's work is CPU-bound) and answers with its JSON.
async fn compute(s: Shared, f: impl FnOnce(&Served) -> Result<String> + Send + 'static) -> Answer {
    match tokio::task::spawn_blocking(move || f(&s)).await {
        Ok(r) => Answer(r),
        Err(e) => Answer(Err(Error::Usage(format!("the computation failed: {e}")))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptReq {
    prompt: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceReq {
    prompt: String,
    layer: usize,
    head: usize,
    query: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleReq {
    prompt: String,
    #[serde(flatten)]
    sampling: views::Sampling,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextbookReq {
    vectors: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct NeighboursQuery {
    token: String,
    #[serde(default = "ten")]
    k: usize,
}

fn ten() -> usize {
    10
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Usage(e.to_string()))
}

/// A POST route: the body parsed as `R`, then `f` on the blocking pool, answered as JSON.
fn post_json<R>(f: fn(&Served, R) -> Result<String>) -> MethodRouter<Shared>
where
    R: serde::de::DeserializeOwned + Send + 'static,
{
    post(move |State(s): State<Shared>, body: Bytes| async move {
        compute(s, move |s| f(s, parse(&body)?)).await
    })
}

/// The routes: the page, its two assets, and the API (behind the key when there is one).
pub fn router(served: Served) -> Router {
    let shared = Arc::new(served);
    let api = Router::new()
        .merge(model_routes())
        .merge(circuit_routes())
        .merge(extra_routes())
        .merge(openai::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_key,
        ));
    Router::new()
        .merge(page_routes())
        .merge(api)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "application/json")],
                json!({"error": "no such page or API endpoint; the page is at /"}).to_string(),
            )
        })
        .with_state(shared)
}

/// Lets a request through when the server has no key or the request carries it
/// (`Authorization: Bearer KEY`); otherwise a 401, in OpenAI's error shape under `/v1`.
async fn require_key(
    State(s): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(key) = &s.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    let message = match given {
        None => "this server needs an API key: send the header `Authorization: Bearer KEY` (the key tinygpt serve was started with)",
        Some(_) => "the API key is wrong: send the key tinygpt serve was started with (--api-key or TINYGPT_API_KEY)",
    };
    let body = match req.uri().path().starts_with("/v1/") {
        true => json!({"error": {"message": message, "type": "invalid_request_error",
                                  "param": Value::Null, "code": "invalid_api_key"}}),
        false => json!({"error": message}),
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Compares two secrets in time that depends on their lengths only, not on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The page and its two assets, each with a policy that lets it load nothing from elsewhere.
fn page_routes() -> Router<Shared> {
    let page = |body: &'static str, kind: &'static str| {
        move || async move {
            (
                [
                    (header::CONTENT_TYPE, kind),
                    // Nothing but this server: the page works offline and leaks nothing.
                    (
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'",
                    ),
                ],
                body,
            )
        }
    };
    Router::new()
        .route("/", get(page(INDEX_HTML, "text/html; charset=utf-8")))
        .route(
            "/app.js",
            get(page(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/style.css",
            get(page(STYLE_CSS, "text/css; charset=utf-8")),
        )
}

/// The model's views of a prompt: its info, tokens, attention, trace, next token, samples, lens.
fn model_routes() -> Router<Shared> {
    Router::new()
        .route(
            "/api/model",
            get(|State(s): State<Shared>| async move {
                Answer(Ok(
                    views::model_info(&s.ck, s.metrics.as_deref()).to_string()
                ))
            }),
        )
        .route(
            "/api/prompt",
            post_json(|s, r: PromptReq| to_json(&views::prompt(&s.ck, &r.prompt)?)),
        )
        .route(
            "/api/attention",
            post_json(|s, r: PromptReq| views::attention(&s.ck, &views::prompt(&s.ck, &r.prompt)?)),
        )
        .route(
            "/api/trace",
            post_json(|s, r: TraceReq| {
                let p = views::prompt(&s.ck, &r.prompt)?;
                to_json(&views::trace(&s.ck, &p, r.layer, r.head, r.query)?)
            }),
        )
        .route(
            "/api/next",
            post_json(|s, r: SampleReq| {
                let p = views::prompt(&s.ck, &r.prompt)?;
                Ok(views::next_token(s, &p, &r.sampling)?.to_string())
            }),
        )
        .route(
            "/api/sample",
            post_json(|s, r: SampleReq| {
                let p = views::prompt(&s.ck, &r.prompt)?;
                Ok(views::sample(s, &r.prompt, &p, &r.sampling)?.to_string())
            }),
        )
        .route(
            "/api/lens",
            post_json(|s, r: PromptReq| {
                Ok(views::lens(&s.ck, &views::prompt(&s.ck, &r.prompt)?)?.to_string())
            }),
        )
}

/// What each head does: its scores, ablation, activation patching, direct logit attribution.
fn circuit_routes() -> Router<Shared> {
    Router::new()
        .route(
            "/api/heads",
            get(|State(s): State<Shared>| async move {
                compute(s, |s| to_json(&*circuits::scores(s)?)).await
            }),
        )
        .route(
            "/api/ablate",
            post_json(|s, r: circuits::AblateReq| Ok(circuits::ablate(s, &r)?.to_string())),
        )
        .route(
            "/api/patch",
            post_json(|s, r: circuits::PatchReq| Ok(circuits::patch(s, &r)?.to_string())),
        )
        .route(
            "/api/dla",
            post_json(|s, r: circuits::DlaReq| Ok(circuits::dla(s, &r)?.to_string())),
        )
}

/// The rest of the API: embedding neighbours, the run's training curves, textbook attention.
fn extra_routes() -> Router<Shared> {
    Router::new()
        .route(
            "/api/neighbours",
            get(
                |State(s): State<Shared>,
                 q: std::result::Result<Query<NeighboursQuery>, QueryRejection>| async move {
                    compute(s, move |s| {
                        let Query(q) = q.map_err(|e| {
                            Error::Usage(format!("give ?token=TEXT (and optionally &k=N): {e}"))
                        })?;
                        Ok(views::neighbours(&s.ck, &q.token, q.k)?.to_string())
                    })
                    .await
                },
            ),
        )
        .route(
            "/api/metrics",
            get(|State(s): State<Shared>| async move {
                compute(s, |s| Ok(views::metrics(s.metrics.as_deref())?.to_string())).await
            }),
        )
        .route(
            "/api/textbook",
            post(|body: Bytes| async move {
                Answer(
                    parse::<TextbookReq>(&body)
                        .and_then(|r| Ok(views::textbook(&r.vectors)?.to_string())),
                )
            }),
        )
}

/// Serves `served` on `host:port` (port 0: any free one) until Ctrl-C or SIGTERM, printing the
/// URL first.
pub fn run(served: Served, host: &str, port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Usage(format!("starting the server: {e}")))?;
    runtime.block_on(async move {
        let addr: SocketAddr = format!("{host}:{port}")
            .parse()
            .or_else(|_| {
                std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or(())
            })
            .map_err(|_| Error::Usage(format!("--host {host:?} is not an address to listen on")))?;
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Error::Usage(format!(
                "cannot listen on {addr}: {e}; pick another --port (or --port 0 for any free one)"
            ))
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Usage(format!("the server's address: {e}")))?;
        let shown = match local {
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
            SocketAddr::V4(a) => a.to_string(),
        };
        println!(
            "serving {} at http://{shown}/ (Ctrl-C stops)",
            served.ck.dir.display()
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, router(served))
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(|e| Error::Usage(format!("the server stopped: {e}")))?;
        println!("stopped");
        Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
