//! `tinygpt serve`'s JSON API, against a server started on a tiny checkpoint trained here:
//! each view's numbers, the errors of bad requests, concurrency and a bounded load test, and
//! a clean stop on Ctrl-C.

mod common;

use std::time::Instant;

use common::server::Server;
use common::{stderr, stdout, tinygpt, train_tiny, Workspace};
use serde_json::{json, Value};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs `body` (raw text) and returns the status and the parsed JSON answer.
fn post_raw(url: &str, body: &str) -> (u16, Value) {
    let mut res = agent()
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"));
    (status, v)
}

fn post(server: &Server, path: &str, body: Value) -> Value {
    let (status, v) = post_raw(&format!("{}{path}", server.url), &body.to_string());
    assert_eq!(status, 200, "{path} {body}: {v}");
    v
}

fn get(server: &Server, path: &str) -> (u16, Value) {
    let mut res = agent()
        .get(&format!("{}{path}", server.url))
        .call()
        .unwrap();
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(a: f32, b: f32, what: &str) {
    assert!(
        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
        "{what}: {a} vs {b}"
    );
}

const PROMPT: &str = "The king shall";

#[test]
fn the_api_answers_what_each_view_shows() {
    let ws = Workspace::new(6000);
    let (run, _) = train_tiny(&ws, "run", 30);
    let server = Server::start(&run, ws.dir.path(), &[]);
    assert!(
        server.url.starts_with("http://127.0.0.1:"),
        "{}",
        server.url
    );
    let (status, info) = get(&server, "/api/model");
    assert_eq!(status, 200);
    assert_eq!(info["n_layer"], 2);
    assert_eq!(info["n_head"], 2);
    assert_eq!(
        info["metrics"], true,
        "a run directory's metrics.csv is found"
    );
    // The page's sampling defaults are the CLI's, from one SampleOptions::default().
    let d = tinygpt::sample::SampleOptions::default();
    assert_eq!(info["sampling"]["temperature"], d.temperature);
    assert_eq!(info["sampling"]["top_k"], d.top_k.unwrap());
    assert_eq!(info["sampling"]["seed"], d.seed);

    // The attention endpoint is exactly `tinygpt attention --format json`.
    let cli = tinygpt(
        &[
            "attention",
            "--checkpoint",
            run.to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--format",
            "json",
        ],
        ws.dir.path(),
    );
    assert!(cli.status.success(), "{}", stderr(&cli));
    let att = post(&server, "/api/attention", json!({"prompt": PROMPT}));
    let cli_json: Value = serde_json::from_str(&stdout(&cli)).unwrap();
    assert_eq!(att, cli_json);
    let t = PROMPT.len();
    for layer in att["layers"].as_array().unwrap() {
        for head in layer["heads"].as_array().unwrap() {
            for (i, row) in head.as_array().unwrap().iter().enumerate() {
                let row = f32s(row);
                close(row.iter().sum(), 1.0, "a row sums to 1");
                assert!(
                    row[i + 1..].iter().all(|&w| w == 0.0),
                    "nothing above the diagonal"
                );
            }
        }
    }

    // The trace: every step recomputes from the ones before, and ends on the heatmap's row.
    for (layer, head, query) in [(0, 0, 0), (1, 1, 7), (1, 0, t - 1)] {
        let tr = post(
            &server,
            "/api/trace",
            json!({"prompt": PROMPT, "layer": layer, "head": head, "query": query}),
        );
        let x = f32s(&tr["x"]);
        let hs = tr["head_size"].as_u64().unwrap() as usize;
        let q = f32s(&tr["q"]);
        for (r, w) in tr["w_q"].as_array().unwrap().iter().enumerate() {
            let dot: f32 = f32s(w).iter().zip(&x).map(|(a, b)| a * b).sum();
            close(dot, q[r], "q = W_Q·x");
        }
        let keys: Vec<Vec<f32>> = tr["k"].as_array().unwrap().iter().map(f32s).collect();
        let vals: Vec<Vec<f32>> = tr["v"].as_array().unwrap().iter().map(f32s).collect();
        let (scores, scaled, weights) = (
            f32s(&tr["scores"]),
            f32s(&tr["scaled"]),
            f32s(&tr["weights"]),
        );
        for j in 0..t {
            let dot: f32 = q.iter().zip(&keys[j]).map(|(a, b)| a * b).sum();
            close(scores[j], dot, "q·k");
            close(scaled[j], scores[j] / (hs as f32).sqrt(), "÷√d_k");
            assert_eq!(tr["masked"][j].is_null(), j > query, "−∞ after the query");
        }
        let m = scaled[..=query].iter().cloned().fold(f32::MIN, f32::max);
        let z: f32 = scaled[..=query].iter().map(|s| (s - m).exp()).sum();
        let heat = f32s(&att["layers"][layer]["heads"][head][query]);
        for j in 0..t {
            let want = if j <= query {
                (scaled[j] - m).exp() / z
            } else {
                0.0
            };
            close(weights[j], want, "softmax");
            close(weights[j], heat[j], "the heatmap's row");
        }
        let out = f32s(&tr["output"]);
        for d in 0..hs {
            let want: f32 = (0..=query).map(|j| weights[j] * vals[j][d]).sum();
            close(out[d], want, "Σ aⱼvⱼ");
        }
    }

    // Next token: a distribution; top-k 1 and temperature 0 leave one token.
    let next = post(&server, "/api/next", json!({"prompt": PROMPT, "top_k": 5}));
    let probs: Vec<f64> = next["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["prob"].as_f64().unwrap())
        .collect();
    assert_eq!(probs.len(), 5);
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    assert!(probs.windows(2).all(|w| w[0] >= w[1]), "most likely first");
    for body in [
        json!({"prompt": PROMPT, "top_k": 1}),
        json!({"prompt": PROMPT, "temperature": 0.0}),
    ] {
        let one = post(&server, "/api/next", body);
        assert_eq!(one["candidates"], 1);
        assert_eq!(one["rows"][0]["prob"], 1.0);
        assert_eq!(
            one["rows"][0]["id"], next["rows"][0]["id"],
            "the most likely token"
        );
    }

    // A sampled token is the CLI's first token with the same seed and settings.
    for seed in [1, 2, 3, 7, 11] {
        let s = post(
            &server,
            "/api/sample",
            json!({"prompt": PROMPT, "seed": seed, "temperature": 1.2, "top_p": 0.95}),
        );
        let seed = seed.to_string();
        let cli = tinygpt(
            &[
                "generate",
                "--checkpoint",
                run.to_str().unwrap(),
                "--prompt",
                PROMPT,
                "--seed",
                &seed,
                "--max-new-tokens",
                "1",
                "--temperature",
                "1.2",
                "--top-p",
                "0.95",
            ],
            ws.dir.path(),
        );
        assert_eq!(
            format!("{}\n", s["text"].as_str().unwrap()),
            stdout(&cli),
            "seed {seed}"
        );
    }

    // The logit lens: one row per layer; the last is the model's own prediction.
    let lens = post(&server, "/api/lens", json!({"prompt": PROMPT}));
    let layers = lens["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let logits = tinygpt(
        &[
            "logits",
            "--checkpoint",
            run.to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--json",
        ],
        ws.dir.path(),
    );
    let logits: Value = serde_json::from_str(&stdout(&logits)).unwrap();
    for (pos, cell) in layers[1]["cells"].as_array().unwrap().iter().enumerate() {
        let row = f32s(&logits["logits"][pos]);
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(cell["id"], best, "position {pos}");
        let p = cell["prob"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0);
    }

    let (status, near) = get(&server, "/api/neighbours?token=e&k=4");
    assert_eq!(status, 200, "{near}");
    assert_eq!(near["neighbours"].as_array().unwrap().len(), 4);
    let (status, curves) = get(&server, "/api/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        curves["train"].as_array().unwrap().len(),
        31,
        "steps 0..=30"
    );

    // Textbook mode: scores = X·Xᵀ, softmax rows, context = weights·X.
    let x = [
        [0.43f32, 0.15, 0.89],
        [0.55, 0.87, 0.66],
        [0.57, 0.85, 0.64],
    ];
    let tb = post(&server, "/api/textbook", json!({"vectors": x}));
    for i in 0..3 {
        let w = f32s(&tb["weights"][i]);
        close(w.iter().sum(), 1.0, "textbook row");
        for j in 0..3 {
            let dot: f32 = (0..3).map(|d| x[i][d] * x[j][d]).sum();
            close(f32s(&tb["scores"][i])[j], dot, "X·Xᵀ");
        }
        for (d, got) in f32s(&tb["context"][i]).into_iter().enumerate() {
            let want: f32 = (0..3).map(|j| w[j] * x[j][d]).sum();
            close(got, want, "weights·X");
        }
    }
    // The first token's weights of the classic example (scores 0.9995, 0.9544, 0.9422).
    close(f32s(&tb["scores"][0])[0], 0.9995, "x0·x0");
}

#[test]
fn bad_requests_get_a_4xx_and_the_server_keeps_serving() {
    let ws = Workspace::new(6000);
    let (run, _) = train_tiny(&ws, "run", 10);
    let server = Server::start(&run, ws.dir.path(), &[]);
    let url = |p: &str| format!("{}{p}", server.url);
    let cases: &[(&str, &str, &str)] = &[
        ("/api/attention", r#"{"prompt": ""}"#, "the prompt is empty"),
        (
            "/api/attention",
            r#"{"prompt": "the ✓"}"#,
            "unknown character '✓'",
        ),
        ("/api/attention", r#"{"prompt": "x""#, "the request's JSON"),
        ("/api/attention", r#"{"text": "x"}"#, "unknown field `text`"),
        ("/api/attention", "not json", "the request's JSON"),
        (
            "/api/trace",
            r#"{"prompt": "the", "layer": 2, "head": 0, "query": 0}"#,
            "layer 2 does not exist",
        ),
        (
            "/api/trace",
            r#"{"prompt": "the", "layer": 0, "head": 5, "query": 0}"#,
            "head 5 does not exist",
        ),
        (
            "/api/trace",
            r#"{"prompt": "the", "layer": 0, "head": 0, "query": 3}"#,
            "query 3 does not exist",
        ),
        (
            "/api/trace",
            r#"{"prompt": "the", "layer": -1, "head": 0, "query": 0}"#,
            "the request's JSON",
        ),
        (
            "/api/next",
            r#"{"prompt": "the", "temperature": -0.5}"#,
            "temperature -0.5 must be ≥ 0",
        ),
        (
            "/api/next",
            r#"{"prompt": "the", "top_p": 1.5}"#,
            "top_p 1.5 must be in (0, 1]",
        ),
        (
            "/api/next",
            r#"{"prompt": "the", "top_k": 0}"#,
            "top_k 0 keeps no token",
        ),
        (
            "/api/sample",
            r#"{"prompt": "the", "seed": "x"}"#,
            "the request's JSON",
        ),
        (
            "/api/textbook",
            r#"{"vectors": [[1, 2], [3]]}"#,
            "token 1 has 1 numbers",
        ),
        ("/api/textbook", r#"{"vectors": []}"#, "give 1 to 64 tokens"),
    ];
    for (path, body, needle) in cases {
        let (status, v) = post_raw(&url(path), body);
        assert_eq!(status, 400, "{path} {body}: {v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} {body}: {v}"));
        assert!(
            msg.contains(needle),
            "{path} {body}: {msg:?} lacks {needle:?}"
        );
    }
    let (status, v) = get(&server, "/api/neighbours");
    assert_eq!(status, 400, "{v}");
    let (status, v) = get(&server, "/api/neighbours?token=the");
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("is 3 tokens, not one"));
    let (status, v) = get(&server, "/nowhere");
    assert_eq!(status, 404, "{v}");
    // A prompt longer than block_size (16) keeps its last 16 tokens, and says so.
    let long = "the king shall speak and we go";
    let p = post(&server, "/api/prompt", json!({"prompt": long}));
    assert_eq!(p["ids"].as_array().unwrap().len(), 16);
    assert!(
        p["note"].as_str().unwrap().contains("only its last 16"),
        "{p}"
    );
    let att = post(&server, "/api/attention", json!({"prompt": long}));
    assert_eq!(att["tokens"].as_array().unwrap().len(), 16);
    // Still serving.
    assert_eq!(get(&server, "/api/model").0, 200);
    let (status, page) = get(&server, "/");
    assert_eq!(status, 200);
    assert!(page
        .as_str()
        .unwrap()
        .contains("data-testid=\"prompt-input\""));
}

#[test]
fn concurrent_clients_get_the_same_answers_without_error() {
    let ws = Workspace::new(6000);
    let (run, _) = train_tiny(&ws, "run", 10);
    let server = Server::start(&run, ws.dir.path(), &[]);
    // 20 clients for a few seconds (TINYGPT_LOAD_SECONDS, default 2), each cycling through
    // the endpoints and checking every answer against the first one.
    let seconds: f64 = std::env::var("TINYGPT_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let requests: Vec<(&str, Value)> = vec![
        ("/api/attention", json!({"prompt": PROMPT})),
        ("/api/next", json!({"prompt": PROMPT, "top_k": 5})),
        ("/api/sample", json!({"prompt": PROMPT, "seed": 9})),
        ("/api/lens", json!({"prompt": PROMPT})),
        (
            "/api/trace",
            json!({"prompt": PROMPT, "layer": 1, "head": 1, "query": 5}),
        ),
    ];
    let want: Vec<Value> = requests
        .iter()
        .map(|(p, b)| post(&server, p, b.clone()))
        .collect();
    let start = Instant::now();
    let (url, requests, want) = (&server.url, &requests, &want);
    let counts: Vec<(usize, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|c| {
                s.spawn(move || {
                    let (mut ok, mut bad) = (0, 0);
                    let mut i = c;
                    while start.elapsed().as_secs_f64() < seconds {
                        let (path, body) = &requests[i % requests.len()];
                        let (status, v) = post_raw(&format!("{url}{path}"), &body.to_string());
                        if status == 200 && v == want[i % requests.len()] {
                            ok += 1;
                        } else {
                            bad += 1;
                        }
                        i += 1;
                    }
                    (ok, bad)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let ok: usize = counts.iter().map(|c| c.0).sum();
    let bad: usize = counts.iter().map(|c| c.1).sum();
    println!(
        "load: 20 clients × {elapsed:.1} s: {ok} requests, {bad} errors, {:.0} requests/s",
        ok as f64 / elapsed
    );
    assert_eq!(bad, 0, "errors under load");
    assert!(ok >= 20, "every client was answered");
}

#[test]
fn it_binds_loopback_refuses_a_taken_port_and_stops_on_ctrl_c() {
    let ws = Workspace::new(6000);
    let (run, _) = train_tiny(&ws, "run", 5);
    let server = Server::start(&run, ws.dir.path(), &[]);
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let o = tinygpt(
        &[
            "serve",
            "--checkpoint",
            run.to_str().unwrap(),
            "--port",
            &port,
        ],
        ws.dir.path(),
    );
    common::fails_with(&o, "cannot listen on 127.0.0.1");
    let o = tinygpt(
        &[
            "serve",
            "--checkpoint",
            run.to_str().unwrap(),
            "--host",
            "no such host!",
        ],
        ws.dir.path(),
    );
    common::fails_with(&o, "--host \"no such host!\" is not an address");
    let o = tinygpt(&["serve", "--checkpoint", "nowhere"], ws.dir.path());
    common::fails_with(&o, "does not exist");
    let (status, out) = server.interrupt();
    assert!(status.success(), "{status:?}");
    assert!(out.contains("stopped"), "{out}");
}

/// OpenAI's completions API: its shapes, sampling that repeats with the seed, `n`, `stop`,
/// `echo`, usage, and errors in OpenAI's shape naming the field.
#[test]
fn the_openai_completions_api_answers_in_openai_shapes() {
    let ws = Workspace::new(8000);
    let (out, _) = train_tiny(&ws, "run", 12);
    let server = Server::start(&out, ws.dir.path(), &[]);
    let (status, models) = get(&server, "/v1/models");
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "run", "the run directory's name");
    let ask = |body: Value| post(&server, "/v1/completions", body);
    let body = json!({"model": "any name", "prompt": ["The king", "My lord"], "n": 2,
                      "max_tokens": 12, "temperature": 0.9, "seed": 4});
    let r = ask(body.clone());
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["model"], "run");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "n for each prompt");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
        assert!(c["logprobs"].is_null());
    }
    // Char tokens: the prompts are 8 and 7 tokens, each choice 12.
    assert_eq!(r["usage"]["prompt_tokens"], 15);
    assert_eq!(r["usage"]["completion_tokens"], 48);
    assert_eq!(r["usage"]["total_tokens"], 63);
    // The same seed and request: the same text; another seed: another text.
    let again = ask(body.clone());
    assert_eq!(again["choices"], r["choices"]);
    let mut other = body.clone();
    other["seed"] = 5.into();
    assert_ne!(ask(other)["choices"], r["choices"]);
    // Greedy is the most likely token each time: a choice of tinygpt generate's.
    let greedy = |p: &str| {
        ask(json!({"prompt": p, "max_tokens": 10, "temperature": 0}))["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let g = greedy("The king");
    let cli = tinygpt(
        &[
            "generate",
            "--checkpoint",
            "run",
            "--prompt",
            "The king",
            "--max-new-tokens",
            "10",
            "--temperature",
            "0",
        ],
        ws.dir.path(),
    );
    assert!(
        stdout(&cli).contains(&format!("The king{g}")),
        "{} vs {g:?}",
        stdout(&cli)
    );
    // A stop string ends the text before it, finish_reason "stop"; echo puts the prompt first.
    let long = ask(json!({"prompt": "The king", "max_tokens": 60, "seed": 1}));
    let text = long["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().skip(3).take(2).collect();
    let cut = ask(
        json!({"prompt": "The king", "max_tokens": 60, "seed": 1, "stop": [stop.clone()], "echo": true}),
    );
    let c = &cut["choices"][0];
    assert_eq!(c["finish_reason"], "stop");
    let want = format!("The king{}", &text[..text.find(&stop).unwrap()]);
    assert_eq!(c["text"], want.as_str());
    // Errors: OpenAI's shape, the field named, 400 or 413, and the server goes on.
    let url = format!("{}/v1/completions", server.url);
    for (body, status, param) in [
        (
            r#"{"prompt": "The king", "temperature": "hot"}"#,
            400,
            "temperature",
        ),
        (
            r#"{"prompt": "The king", "max_tokens": 0}"#,
            400,
            "max_tokens",
        ),
        (r#"{"prompt": "The king", "top_p": 1.5}"#, 400, "top_p"),
        (r#"{"prompt": "The king", "n": 0}"#, 400, "n"),
        (r#"{"prompt": "The king", "stop": 3}"#, 400, "stop"),
        (r#"{"max_tokens": 3}"#, 400, "prompt"),
        (r#"{"prompt": "The king", "stream": "yes"}"#, 400, "stream"),
        (
            r#"{"prompt": "The king", "logprobs": "all"}"#,
            400,
            "logprobs",
        ),
        (r#"not json"#, 400, "body"),
    ] {
        let (s, v) = post_raw(&url, body);
        assert_eq!(s, status, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(param),
            "{v}"
        );
    }
    let (s, v) = post_raw(&url, &json!({"prompt": "the king ".repeat(10)}).to_string());
    assert_eq!(s, 413, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("context is 16"));
    assert_eq!(get(&server, "/v1/models").0, 200);
}

/// `stream: true`: server-sent events whose pieces join to the text the same request gets
/// unstreamed, each choice ending with its finish_reason, then `[DONE]`; a client that leaves
/// mid-stream does not stop the server.
#[test]
fn streamed_completions_join_to_the_unstreamed_text() {
    let ws = Workspace::new(8000);
    let (out, _) = train_tiny(&ws, "run", 12);
    let server = Server::start(&out, ws.dir.path(), &[]);
    let url = format!("{}/v1/completions", server.url);
    for body in [
        json!({"prompt": ["The king", "My lord"], "n": 2, "max_tokens": 20, "seed": 2}),
        json!({"prompt": "The king", "max_tokens": 40, "seed": 1, "stop": ["ng", "d "], "echo": true}),
    ] {
        let whole = post(&server, "/v1/completions", body.clone());
        let mut streamed = body.clone();
        streamed["stream"] = true.into();
        let mut res = agent()
            .post(&url)
            .header("content-type", "application/json")
            .send(streamed.to_string())
            .unwrap();
        assert_eq!(res.status().as_u16(), 200);
        let ctype = res
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(ctype.starts_with("text/event-stream"), "{ctype}");
        let text = res.body_mut().read_to_string().unwrap();
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"));
        let choices = whole["choices"].as_array().unwrap();
        let mut joined = vec![String::new(); choices.len()];
        let mut finish = vec![Value::Null; choices.len()];
        for d in &data[..data.len() - 1] {
            let v: Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["object"], "text_completion");
            let c = &v["choices"][0];
            let i = c["index"].as_u64().unwrap() as usize;
            assert!(finish[i].is_null(), "nothing after a choice's last chunk");
            joined[i].push_str(c["text"].as_str().unwrap());
            finish[i] = c["finish_reason"].clone();
        }
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(joined[i], c["text"].as_str().unwrap(), "{body}");
            assert_eq!(finish[i], c["finish_reason"], "{body}");
        }
    }
    // A client that reads one event and hangs up: the server goes on answering.
    {
        let mut res = agent()
            .post(&url)
            .header("content-type", "application/json")
            .send(json!({"prompt": "The king", "max_tokens": 100000, "stream": true}).to_string())
            .unwrap();
        let mut first = [0u8; 16];
        std::io::Read::read_exact(&mut res.body_mut().as_reader(), &mut first).unwrap();
        assert_eq!(&first[..6], b"data: ");
    }
    let started = Instant::now();
    let r = post(
        &server,
        "/v1/completions",
        json!({"prompt": "The king", "max_tokens": 5}),
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert!(started.elapsed().as_secs() < 30);
}

/// `--api-key`: every `/api` and `/v1` request needs `Authorization: Bearer KEY` (401
/// otherwise, OpenAI's shape under /v1); the page itself loads without it. Binding beyond
/// loopback without a key warns who can reach the model.
#[test]
fn an_api_key_guards_every_api_request_but_not_the_page() {
    let ws = Workspace::new(8000);
    let (out, _) = train_tiny(&ws, "run", 12);
    let server = Server::start(&out, ws.dir.path(), &["--api-key", "s3cret"]);
    let call = |path: &str, key: Option<&str>| {
        let mut req = agent().get(&format!("{}{path}", server.url));
        if let Some(k) = key {
            req = req.header("authorization", &format!("Bearer {k}"));
        }
        let mut res = req.call().unwrap();
        let text = res.body_mut().read_to_string().unwrap();
        (res.status().as_u16(), text)
    };
    for path in ["/api/model", "/v1/models"] {
        let (status, body) = call(path, None);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("needs an API key"), "{body}");
        let (status, body) = call(path, Some("wrong"));
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("the API key is wrong"), "{body}");
        assert_eq!(call(path, Some("s3cret")).0, 200, "{path}");
    }
    let (_, v1) = call("/v1/models", None);
    let v1: Value = serde_json::from_str(&v1).unwrap();
    assert_eq!(v1["error"]["code"], "invalid_api_key");
    assert_eq!(
        call("/", None).0,
        200,
        "the page loads and asks for the key"
    );
    assert_eq!(call("/app.js", None).0, 200);
    // No key on 0.0.0.0: one warning line saying who can reach it.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tinygpt"))
        .args([
            "serve",
            "--checkpoint",
            out.to_str().unwrap(),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ])
        .env_remove("TINYGPT_API_KEY")
        .current_dir(ws.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("serving"), "{line}");
    child.kill().unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("warning: --host 0.0.0.0 without --api-key"))
            .count(),
        1,
        "{err}"
    );
}

/// Chat completions: messages as a transcript the model continues (the same text
/// /v1/completions gives for that transcript, stopped at the next user turn), written as a
/// template file says; bad messages named, and a default transcript that the model's
/// characters cannot spell refused naming `messages`.
#[test]
fn chat_completions_continue_a_transcript_of_the_messages() {
    let ws = Workspace::new(8000);
    let (out, _) = train_tiny(&ws, "run", 12);
    // Labels spelled with the test corpus's characters (it has no 'U' or ':').
    std::fs::write(
        ws.path("chat.toml"),
        "user = \"Say, {content}\\n\"\nassistant = \"Sir, {content}\\n\"\ngeneration = \"Sir,\"\nstop = [\"\\nSay,\"]\n",
    )
    .unwrap();
    let messages = json!([{"role": "system", "content": "The king"},
                          {"role": "user", "content": "my lord"},
                          {"role": "assistant", "content": [{"type": "text", "text": "good sir"}]},
                          {"role": "user", "content": "say"}]);
    let server = Server::start(&out, ws.dir.path(), &["--chat-template", "chat.toml"]);
    let chat = post(
        &server,
        "/v1/chat/completions",
        json!({"model": "x", "messages": messages, "max_tokens": 40, "temperature": 0}),
    );
    assert_eq!(chat["object"], "chat.completion");
    let c = &chat["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let transcript = "The king\n\nSay, my lord\nSir, good sir\nSay, say\nSir,";
    // The model's context is 16 characters: it reads the transcript's last 16.
    assert_eq!(chat["usage"]["prompt_tokens"], transcript.len());
    let tail = &transcript[transcript.len() - 16..];
    let plain = post(
        &server,
        "/v1/completions",
        json!({"prompt": tail, "max_tokens": 40, "temperature": 0, "stop": ["\nSay,"]}),
    );
    let want = plain["choices"][0]["text"].as_str().unwrap().trim_start();
    assert_eq!(c["message"]["content"], want);
    assert_eq!(c["finish_reason"], plain["choices"][0]["finish_reason"]);
    assert_eq!(
        chat["usage"]["completion_tokens"],
        plain["usage"]["completion_tokens"]
    );
    let url = format!("{}/v1/chat/completions", server.url);
    for (body, param) in [
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "king", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": 3}]}),
            "messages[0].content",
        ),
    ] {
        let (s, v) = post_raw(&url, &body.to_string());
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // The default template's "User:" has characters this model never saw.
    let server = Server::start(&out, ws.dir.path(), &[]);
    let url = format!("{}/v1/chat/completions", server.url);
    let (s, v) = post_raw(&url, &json!({"messages": messages}).to_string());
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("--chat-template") && msg.contains("unknown character 'U'"),
        "{msg}"
    );
    std::fs::write(ws.path("bad.toml"), "user = \"Q:\"\n").unwrap();
    let o = tinygpt(
        &[
            "serve",
            "--checkpoint",
            "run",
            "--chat-template",
            "bad.toml",
            "--port",
            "0",
        ],
        ws.dir.path(),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("`user` has no {content}"),
        "{}",
        stderr(&o)
    );
}

/// The load limit: 16 concurrent streamed requests on 2 slots and a queue of 2 each end in a
/// whole answer or a 429 with Retry-After, and the server serves on.
#[test]
fn sixteen_concurrent_streams_end_whole_or_in_a_429() {
    let ws = Workspace::new(8000);
    let (out, _) = train_tiny(&ws, "run", 12);
    let server = Server::start(&out, ws.dir.path(), &["--slots", "2", "--queue", "2"]);
    let url = format!("{}/v1/completions", server.url);
    let body = json!({"prompt": "The king", "max_tokens": 3000, "stream": true}).to_string();
    let outcomes: Vec<(u16, String, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                scope.spawn(|| {
                    let mut res = agent()
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(&body)
                        .unwrap();
                    let retry = res
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    let status = res.status().as_u16();
                    (status, res.body_mut().read_to_string().unwrap(), retry)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut whole, mut refused) = (0, 0);
    for (status, text, retry) in &outcomes {
        match status {
            200 => {
                assert!(text.trim_end().ends_with("data: [DONE]"), "a whole answer");
                assert!(text.contains("\"finish_reason\":\"length\""));
                whole += 1;
            }
            429 => {
                assert_eq!(retry.as_deref(), Some("1"));
                let v: Value = serde_json::from_str(text).unwrap();
                assert_eq!(v["error"]["type"], "rate_limit_error");
                refused += 1;
            }
            s => panic!("status {s}: {text}"),
        }
    }
    assert_eq!(whole + refused, 16);
    assert!(
        whole >= 4,
        "two slots and two waiting are always served: {whole}"
    );
    assert!(refused >= 1, "16 at once overflow 2 slots and a queue of 2");
    let r = post(
        &server,
        "/v1/completions",
        json!({"prompt": "The king", "max_tokens": 3}),
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
}

/// `logprobs: k`: each completion token's log-probability under the model, the k most likely
/// there, and where its text starts; greedy picks the most likely, and the tokens spell the text.
#[test]
fn completion_logprobs_are_the_models_distribution() {
    let ws = Workspace::new(8000);
    let (out, _) = train_tiny(&ws, "run", 12);
    let server = Server::start(&out, ws.dir.path(), &[]);
    let r = post(
        &server,
        "/v1/completions",
        json!({"prompt": "The king", "max_tokens": 12, "temperature": 0, "logprobs": 3}),
    );
    let c = &r["choices"][0];
    let lp = &c["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 12);
    assert_eq!(tokens.concat(), c["text"].as_str().unwrap());
    let mut at = 0;
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(lp["text_offset"][i], at);
        at += t.len();
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() <= 3 && !top.is_empty());
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let mine = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(
            (mine - best).abs() < 1e-9,
            "greedy takes the most likely: {mine} vs {best}"
        );
        let mass: f64 = top.values().map(|v| v.as_f64().unwrap().exp()).sum();
        assert!(mass <= 1.0 + 1e-9 && mine <= 0.0);
    }
    let url = format!("{}/v1/completions", server.url);
    for body in [
        json!({"prompt": "The king", "logprobs": 99}),
        json!({"prompt": "The king", "logprobs": 2, "stream": true}),
    ] {
        let (s, v) = post_raw(&url, &body.to_string());
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["error"]["param"], "logprobs");
    }
}
