//! OpenAI's HTTP API on the served checkpoint, so that the clients every tool uses (the
//! `openai` packages, chat front-ends, evaluation harnesses) can call the model:
//! `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`.
//!
//! A base model has no chat format, so chat messages become a plain transcript that the model
//! continues ([`ChatTemplate`]: by default `User:` / `Assistant:` lines, the model writing
//! after `Assistant:` and stopped at the next `User:`), replaceable by a template file
//! (`serve --chat-template FILE`).
//!
//! Requests are read field by field from JSON, so a bad field is named in the 400 it gets;
//! errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`. Any model
//! name is accepted (there is one model), as llama.cpp's server does. Sampling is `tinygpt
//! generate`'s: the same seed and request give the same text, `temperature: 0` is greedy, and
//! `top_k` and `repetition_penalty` are accepted beside OpenAI's fields. Without `seed`, the
//! seed is `tinygpt generate`'s default, so an unseeded request is repeatable too.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

pub use super::chat::ChatTemplate;
use super::{Served, Shared};
use crate::rng::seeded;
use crate::sample::{generate_with, next_logits_with, SampleOptions};

/// The most new tokens one choice may ask for.
const MAX_TOKENS: usize = 100_000;
/// The most stop strings a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// The most alternatives `logprobs` may ask for at each position.
const MAX_LOGPROBS: usize = 20;
/// The most choices one request may ask for (prompts × n).
const MAX_CHOICES: usize = 128;

/// An error in OpenAI's shape, with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    kind: &'static str,
}

impl ApiError {
    /// A 400 naming the request field `param`.
    pub fn field(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.to_string()),
            kind: "invalid_request_error",
        }
    }

    fn server(message: String) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
            param: None,
            kind: "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": Value::Null,
        }});
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// The `/v1` routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/models",
            get(|State(s): State<Shared>| async move {
                let m = model_entry(&s);
                axum::Json(json!({"object": "list", "data": [m]}))
            }),
        )
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
}

/// The served model's name: its run directory's (or checkpoint directory's) name.
pub fn model_name(s: &Served) -> String {
    let dir = &s.ck.dir;
    let last = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    match last.as_deref() {
        Some("best" | "last") => dir
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tinygpt".into()),
        Some(n) => n.to_string(),
        None => "tinygpt".into(),
    }
}

fn model_entry(s: &Served) -> Value {
    json!({"id": model_name(s), "object": "model", "created": 0, "owned_by": "tinygpt"})
}

/// A completions request, checked.
#[derive(Debug, Clone)]
struct CompletionReq {
    prompts: Vec<String>,
    /// A chat request: chat shapes, the assistant's text without its leading whitespace.
    chat: bool,
    /// How many most likely tokens to list at each position (`logprobs`), if any.
    logprobs: Option<usize>,
    stream: bool,
    n: usize,
    stop: Vec<String>,
    echo: bool,
    sampling: SampleOptions,
}

/// `body[name]` as `T`, `None` when absent or null; a value of another type is a 400 naming it.
fn field<T: serde::de::DeserializeOwned>(
    body: &Value,
    name: &str,
    what: &str,
) -> ApiResult<Option<T>> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| ApiError::field(name, format!("`{name}` must be {what}"))),
    }
}

/// A string or a list of strings (`prompt`, `stop`).
fn strings(body: &Value, name: &str) -> ApiResult<Option<Vec<String>>> {
    let what = "a string or a list of strings";
    Ok(match body.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(v) => Some(field::<Vec<String>>(&json!({ name: v }), name, what)?.unwrap_or_default()),
    })
}

/// The request body as a JSON object.
fn json_body(body: &Bytes) -> ApiResult<Value> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::field("body", format!("the request body is not JSON: {e}")))?;
    match body.is_object() {
        true => Ok(body),
        false => Err(ApiError::field(
            "body",
            "the request body must be a JSON object",
        )),
    }
}

impl CompletionReq {
    /// A `/v1/completions` request.
    fn parse(body: &Bytes) -> ApiResult<CompletionReq> {
        let body = json_body(body)?;
        let prompts = strings(&body, "prompt")?
            .ok_or_else(|| ApiError::field("prompt", "`prompt` is required"))?;
        CompletionReq::with_prompts(&body, prompts, 16, &[])
    }

    /// A `/v1/chat/completions` request: its messages as `template`'s transcript.
    fn parse_chat(body: &Bytes, template: &ChatTemplate) -> ApiResult<CompletionReq> {
        let body = json_body(body)?;
        let transcript = template.transcript(&body)?;
        let mut req = CompletionReq::with_prompts(&body, vec![transcript], 256, &template.stop)?;
        req.chat = true;
        Ok(req)
    }

    /// The fields both endpoints share, for `prompts`; `extra_stops` end the text as `stop`
    /// does (the chat template's).
    fn with_prompts(
        body: &Value,
        prompts: Vec<String>,
        default_max: usize,
        extra_stops: &[String],
    ) -> ApiResult<CompletionReq> {
        for unsupported in ["suffix", "top_logprobs"] {
            let set = !matches!(
                body.get(unsupported),
                None | Some(Value::Null) | Some(Value::Bool(false))
            );
            if set {
                return Err(ApiError::field(
                    unsupported,
                    format!("`{unsupported}` is not supported by this server yet"),
                ));
            }
        }
        // Completions' `logprobs: k` (chat's `logprobs: true` is not served yet).
        let logprobs = match body.get("logprobs") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(v) => match v.as_u64() {
                Some(k) if k <= MAX_LOGPROBS as u64 && extra_stops.is_empty() => Some(k as usize),
                _ => {
                    return Err(ApiError::field(
                        "logprobs",
                        format!("`logprobs` must be an integer in 0..={MAX_LOGPROBS} (completions; not yet on chat)"),
                    ))
                }
            },
        };
        let mut stop = strings(body, "stop")?.unwrap_or_default();
        if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
            return Err(ApiError::field(
                "stop",
                format!("`stop` takes 1 to {MAX_STOPS} non-empty strings"),
            ));
        }
        stop.extend(extra_stops.iter().filter(|s| !s.is_empty()).cloned());
        let n = field::<usize>(body, "n", "a positive integer")?.unwrap_or(1);
        if n == 0 || n * prompts.len().max(1) > MAX_CHOICES {
            return Err(ApiError::field(
                "n",
                format!("`n` must be at least 1, and n × prompts at most {MAX_CHOICES}"),
            ));
        }
        let max_tokens = match field::<usize>(body, "max_completion_tokens", "a positive integer")?
        {
            Some(m) => Some(m),
            None => field::<usize>(body, "max_tokens", "a positive integer")?,
        };
        let max_tokens = max_tokens.unwrap_or(default_max);
        if max_tokens == 0 || max_tokens > MAX_TOKENS {
            return Err(ApiError::field(
                "max_tokens",
                format!("`max_tokens` must be in 1..={MAX_TOKENS}"),
            ));
        }
        let sampling = sampling(body, max_tokens)?;
        let stream = field(body, "stream", "true or false")?.unwrap_or(false);
        if stream && logprobs.is_some() {
            return Err(ApiError::field(
                "logprobs",
                "`logprobs` with `stream` is not supported yet",
            ));
        }
        Ok(CompletionReq {
            prompts,
            chat: false,
            logprobs,
            stream,
            n,
            stop,
            echo: field(body, "echo", "true or false")?.unwrap_or(false),
            sampling,
        })
    }
}

/// The sampler's options from `body`'s fields, checked, for `max_tokens` new tokens.
fn sampling(body: &Value, max_tokens: usize) -> ApiResult<SampleOptions> {
    let sampling = SampleOptions {
        max_new_tokens: max_tokens,
        temperature: field(body, "temperature", "a number")?.unwrap_or(1.0),
        top_k: field(body, "top_k", "a positive integer")?,
        top_p: field(body, "top_p", "a number in (0, 1]")?,
        repetition_penalty: field(body, "repetition_penalty", "a number")?.unwrap_or(1.0),
        seed: field(body, "seed", "an integer")?.unwrap_or(SampleOptions::default().seed),
        use_cache: true,
    };
    sampling
        .validate_named(|name| name.replace('-', "_"))
        .map_err(|e| {
            let msg = e.to_string();
            let param = ["temperature", "top_k", "top_p", "repetition_penalty"]
                .into_iter()
                .find(|p| msg.contains(p))
                .unwrap_or("body");
            ApiError::field(param, msg)
        })?;
    Ok(sampling)
}

/// One generated choice: its text and why it ended.
struct Choice {
    text: String,
    finish: &'static str,
    /// The tokens generated (past the stop string too, when one ended it).
    ids: Vec<u32>,
}

/// Generates one choice for `ids` with seed `seed`, ending at `max_tokens` or before the
/// first stop string. `emit` gets the text as it becomes final: whole characters, held back
/// while their end may still grow into a stop string; `emit` answering false (a client gone)
/// ends the generation.
fn complete(
    s: &Served,
    ids: &[u32],
    req: &CompletionReq,
    seed: u64,
    emit: &mut dyn FnMut(&str) -> bool,
) -> ApiResult<Choice> {
    let tok = &s.ck.tokenizer;
    let mut rng = seeded(seed);
    // The text so far, a whole character at a time (`tinygpt generate`'s streaming decoder).
    let (mut stream, mut text) = (tok.stream(), String::new());
    let (mut stopped_at, mut sent) = (None, 0);
    let hold = req.stop.iter().map(String::len).max().unwrap_or(1) - 1;
    let generated = s.with_decoder(|d| {
        generate_with(&s.engine, Some(d), ids, &req.sampling, &mut rng, |id| {
            if req.stop.is_empty() && !req.stream {
                return Ok(true);
            }
            let Some(piece) = stream.step(id)? else {
                return Ok(true);
            };
            // A stop string not found before must end in the new piece.
            let from = floor_boundary(&text, text.len().saturating_sub(hold));
            text.push_str(&piece);
            stopped_at = req
                .stop
                .iter()
                .filter_map(|st| text[from..].find(st.as_str()).map(|at| from + at))
                .min();
            let end = match stopped_at {
                Some(at) => at,
                None => floor_boundary(&text, text.len().saturating_sub(hold)),
            };
            if end > sent {
                if !emit(&text[sent..end]) {
                    return Ok(false);
                }
                sent = end;
            }
            Ok(stopped_at.is_none())
        })
    });
    let generated = generated.map_err(|e| ApiError::server(e.to_string()))?;
    let mut text = tok
        .decode(&generated)
        .map_err(|e| ApiError::server(e.to_string()))?;
    let finish = match stopped_at {
        Some(at) => {
            text.truncate(at);
            "stop"
        }
        None => {
            if text.len() > sent {
                emit(&text[sent..]);
            }
            "length"
        }
    };
    Ok(Choice {
        text,
        finish,
        ids: generated,
    })
}

/// OpenAI's `logprobs` of a completion: each token of `c` that made it into its text, the
/// model's log-probability of it (temperature 1, before any sampling option), the `top` most
/// likely tokens there, and where each token's text starts (after `base` bytes: an echoed
/// prompt).
fn logprobs(s: &Served, prompt: &[u32], c: &Choice, top: usize, base: usize) -> ApiResult<Value> {
    let (tok, block) = (&s.ck.tokenizer, s.ck.config.model.block_size);
    let server = |e: crate::error::Error| ApiError::server(e.to_string());
    let seq = [prompt, &c.ids].concat();
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    let mut at = 0;
    for (j, &id) in c.ids.iter().enumerate() {
        if at >= c.text.len() && j > 0 {
            break; // past the stop string
        }
        let p = prompt.len() + j;
        let logits = s
            .with_decoder(|d| {
                next_logits_with(&s.engine, Some(d), &seq[p.saturating_sub(block)..p])
            })
            .map_err(server)?;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let lse = max
            + logits
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let text = tok.decode(&[id]).map_err(server)?;
        let best: serde_json::Map<String, Value> = order[..top.min(order.len())]
            .iter()
            .map(|&i| Ok((tok.decode(&[i])?, json!(logits[i as usize] as f64 - lse))))
            .collect::<crate::error::Result<_>>()
            .map_err(server)?;
        tokens.push(json!(text));
        lps.push(json!(logits[id as usize] as f64 - lse));
        tops.push(Value::Object(best));
        offsets.push(json!(base + at));
        at += text.len();
    }
    Ok(
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}),
    )
}

/// The largest character boundary of `text` at or below `at`.
fn floor_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// `POST /v1/completions`.
async fn completions(State(s): State<Shared>, body: Bytes) -> Response {
    match CompletionReq::parse(&body) {
        Ok(req) => respond(s, req).await,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/chat/completions`.
async fn chat_completions(State(s): State<Shared>, body: Bytes) -> Response {
    match CompletionReq::parse_chat(&body, &s.chat_template) {
        Ok(req) => respond(s, req).await,
        Err(e) => e.into_response(),
    }
}

/// Generation's load limit: `slots` requests generate at once, at most `queue` more wait for
/// a slot, and any beyond get a 429 at once, so a burst neither piles up threads and memory
/// nor stalls the page's own requests.
pub struct Limit {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    queue: usize,
}

impl Limit {
    pub fn new(slots: usize, queue: usize) -> Limit {
        Limit {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(slots.max(1))),
            waiting: Default::default(),
            queue,
        }
    }

    /// A slot, after waiting in the queue; a 429 with `Retry-After` when the queue is full.
    async fn acquire(&self) -> std::result::Result<tokio::sync::OwnedSemaphorePermit, Response> {
        use std::sync::atomic::Ordering::SeqCst;
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, SeqCst) >= self.queue {
            self.waiting.fetch_sub(1, SeqCst);
            let mut r = ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "every generation slot is busy and the queue is full; retry in a moment (serve --slots and --queue set the limit)".into(),
                param: None,
                kind: "rate_limit_error",
            }
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return Err(r);
        }
        let permit = self.slots.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, SeqCst);
        permit.map_err(|_| ApiError::server("the server is stopping".into()).into_response())
    }
}

/// The answer to a checked request, streamed or whole, once it has a generation slot (held
/// until its last token).
async fn respond(s: Shared, req: CompletionReq) -> Response {
    let permit = match s.limit.acquire().await {
        Ok(p) => p,
        Err(busy) => return busy,
    };
    if req.stream {
        return stream_completions(s, req, permit);
    }
    let answer = tokio::task::spawn_blocking(move || {
        let _slot = permit;
        answer_completions(&s, &req)
    })
    .await;
    match answer {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::server(format!("the generation failed: {e}")).into_response(),
    }
}

/// Seconds since 1970, OpenAI's `created`.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `prompt`'s token ids: a 400 for an empty prompt or one the tokenizer cannot encode, a 413
/// for one longer than the model's context.
fn encode_prompt(s: &Served, prompt: &str, chat: bool) -> ApiResult<Vec<u32>> {
    let param = if chat { "messages" } else { "prompt" };
    if prompt.is_empty() {
        return Err(ApiError::field(param, "`prompt` is empty"));
    }
    let ids = s.ck.tokenizer.encode(prompt).map_err(|e| {
        let what = match chat {
            true => "the transcript of `messages` (see --chat-template)",
            false => "`prompt`",
        };
        ApiError::field(param, format!("{what}: {e}"))
    })?;
    let block = s.ck.config.model.block_size;
    // A conversation may outgrow the context: the model reads its end, as generation would.
    if ids.len() > block && !chat {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the prompt is {} tokens; the model's context is {block} (block_size): shorten it",
                ids.len()
            ),
            param: Some(param.into()),
            kind: "invalid_request_error",
        });
    }
    Ok(ids)
}

/// `stream: true`: server-sent events, a chunk per piece of text as the tokens come (each
/// choice in turn), each choice's last chunk with its `finish_reason`, then `[DONE]`. A
/// client that disconnects closes the channel, which ends the generation.
fn stream_completions(
    s: Shared,
    req: CompletionReq,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    // Checked before the first byte, so a bad prompt still gets its 400 or 413.
    let prompts = req.prompts.iter().map(|p| encode_prompt(&s, p, req.chat));
    let prompts = match prompts.collect::<ApiResult<Vec<_>>>() {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let (created, model) = (now(), model_name(&s));
        let chunk = |index: usize, text: &str, finish: Option<&str>| {
            let (id, object, choice) = match req.chat {
                false => (
                    "cmpl",
                    "text_completion",
                    json!({"text": text, "index": index,
                          "logprobs": Value::Null, "finish_reason": finish}),
                ),
                true => (
                    "chatcmpl",
                    "chat.completion.chunk",
                    json!({"index": index,
                          "delta": match (text, finish) {
                              ("", Some(_)) => json!({}),
                              _ => json!({"role": "assistant", "content": text}),
                          },
                          "logprobs": Value::Null, "finish_reason": finish}),
                ),
            };
            json!({"id": format!("{id}-{created:x}"), "object": object, "created": created,
                   "model": model, "choices": [choice]})
            .to_string()
        };
        for (p, ids) in prompts.iter().enumerate() {
            for k in 0..req.n {
                let index = p * req.n + k;
                let seed = req.sampling.seed.wrapping_add(index as u64);
                // A chat answer starts at its first visible character (after "Assistant:").
                let mut started = !req.chat;
                let mut emit = |piece: &str| {
                    let piece = match started {
                        true => piece,
                        false => piece.trim_start(),
                    };
                    if piece.is_empty() {
                        return true;
                    }
                    started = true;
                    tx.blocking_send(chunk(index, piece, None)).is_ok()
                };
                if req.echo && !emit(&req.prompts[p]) {
                    return;
                }
                let last = match complete(&s, ids, &req, seed, &mut emit) {
                    Ok(c) => chunk(index, "", Some(c.finish)),
                    Err(e) => json!({"error": {"message": e.message, "type": e.kind,
                                               "param": e.param, "code": Value::Null}})
                    .to_string(),
                };
                if tx.blocking_send(last).is_err() {
                    return;
                }
            }
        }
        let _ = tx.blocking_send("[DONE]".into());
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((
            Ok::<_, std::convert::Infallible>(Event::default().data(data)),
            rx,
        ))
    });
    Sse::new(events).into_response()
}

/// The completions of every prompt, `n` each, in OpenAI's response shape.
fn answer_completions(s: &Served, req: &CompletionReq) -> ApiResult<Value> {
    let (mut choices, mut prompt_tokens, mut completion_tokens) = (Vec::new(), 0, 0);
    for (p, prompt) in req.prompts.iter().enumerate() {
        let ids = encode_prompt(s, prompt, req.chat)?;
        prompt_tokens += ids.len();
        for k in 0..req.n {
            let index = p * req.n + k;
            let seed = req.sampling.seed.wrapping_add(index as u64);
            let c = complete(s, &ids, req, seed, &mut |_| true)?;
            completion_tokens += c.ids.len();
            let lp = match req.logprobs {
                Some(k) => logprobs(s, &ids, &c, k, if req.echo { prompt.len() } else { 0 })?,
                None => Value::Null,
            };
            choices.push(match req.chat {
                false => {
                    let text = match req.echo {
                        true => format!("{prompt}{}", c.text),
                        false => c.text,
                    };
                    json!({"text": text, "index": index, "logprobs": lp,
                           "finish_reason": c.finish})
                }
                true => json!({"index": index, "logprobs": Value::Null, "finish_reason": c.finish,
                               "message": {"role": "assistant", "content": c.text.trim_start()}}),
            });
        }
    }
    let created = now();
    let (id, object) = match req.chat {
        false => ("cmpl", "text_completion"),
        true => ("chatcmpl", "chat.completion"),
    };
    Ok(json!({
        "id": format!("{id}-{created:x}{:x}", choices.len()),
        "object": object,
        "created": created,
        "model": model_name(s),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
}
