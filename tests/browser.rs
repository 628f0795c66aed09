//! `tinygpt serve`'s page in a real headless Chromium (Debian's `chromium` with `chromedriver`,
//! driven over WebDriver by fantoccini): every view is clicked through and its numbers are
//! checked, the URL restores the state, and no request leaves 127.0.0.1.
//!
//! Needs `chromium` and `chromedriver` on the PATH; the README's test command installs them.
//! `TINYGPT_SCREENSHOTS=DIR` also saves a screenshot of each view there; the README's come from
//! `TINYGPT_SCREENSHOTS=docs cargo test --release --test browser -- --ignored` after the
//! README's first command has trained `checkpoints/shakespeare-char`.

mod common;

use std::io::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{stdout, tinygpt, train_tiny, Workspace};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use common::server::Server;

/// A chromedriver child on a free port.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                // One line and a failed run, not a panic's trace: the fix is the same every time.
                // (Written to stderr itself: the test harness captures eprintln!.)
                let _ = writeln!(std::io::stderr(), "browser test: cannot start chromedriver ({e}); run the tests with the README's test command, which installs Debian's chromium and chromium-driver when they are missing");
                std::process::exit(1)
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("chromium");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": binary,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                // Any other host fails to resolve: the page must need none.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("chromedriver runs a headless Chromium")
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

/// Waits until the page has drawn the current view (`body[data-ready=true]`).
async fn ready(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = js(c, "return document.body.getAttribute('data-ready');").await;
        if v == "true" {
            return;
        }
        assert!(Instant::now() < deadline, "the page never became ready");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

async fn click(c: &Client, testid: &str) {
    click_css(c, &format!("[data-testid='{testid}']")).await;
}

/// Clicks the element `css` selects and waits until the page has redrawn.
async fn click_css(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
    ready(c).await;
}

/// Sets a form element's value and fires its `change` event.
async fn set(c: &Client, testid: &str, value: &str) {
    let script = format!(
        "const e = document.querySelector(\"[data-testid='{testid}']\"); e.value = {}; e.dispatchEvent(new Event('change'));",
        json!(value)
    );
    js(c, &script).await;
    ready(c).await;
}

/// The head view's heatmap as a T×T matrix, from the cells' data attributes.
async fn heatmap(c: &Client) -> Vec<Vec<f64>> {
    let cells = js(
        c,
        "return [...document.querySelectorAll(\"[data-testid='attention-cell']\")].map(e => [+e.dataset.row, +e.dataset.col, +e.dataset.value]);",
    )
    .await;
    let cells = cells.as_array().unwrap();
    let t = (cells.len() as f64).sqrt() as usize;
    assert_eq!(t * t, cells.len(), "a square of cells");
    let mut m = vec![vec![f64::NAN; t]; t];
    for cell in cells {
        let (i, j) = (
            cell[0].as_u64().unwrap() as usize,
            cell[1].as_u64().unwrap() as usize,
        );
        m[i][j] = cell[2].as_f64().unwrap();
    }
    m
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

async fn screenshot(c: &Client, name: &str) {
    if let Ok(dir) = std::env::var("TINYGPT_SCREENSHOTS") {
        let png = c.screenshot().await.unwrap();
        std::fs::write(Path::new(&dir).join(format!("serve-{name}.png")), png).unwrap();
    }
}

async fn api(server: &Server, path: &str, body: Value) -> Value {
    let url = format!("{}{path}", server.url);
    tokio::task::spawn_blocking(move || {
        let mut res = ureq::post(&url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        serde_json::from_str(&res.body_mut().read_to_string().unwrap()).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_view_in_chromium() {
    let ws = Workspace::new(6000);
    let (run, _) = train_tiny(&ws, "run", 30);
    let checkpoint = run.clone();
    let server = Server::start(&checkpoint, ws.dir.path(), &[]);
    let driver = Driver::start();
    let c = browser(&driver).await;
    let prompt = "The king shall";
    let page = format!("{}/?prompt={}", server.url, prompt.replace(' ', "%20"));
    c.goto(&page).await.unwrap();
    ready(&c).await;

    // Head view: rows are distributions over the past.
    let m = heatmap(&c).await;
    assert_eq!(m.len(), prompt.len());
    for (i, row) in m.iter().enumerate() {
        assert!(
            (row.iter().sum::<f64>() - 1.0).abs() < 1e-5,
            "row {i} sums to 1"
        );
        assert!(
            row[i + 1..].iter().all(|&w| w == 0.0),
            "row {i}: 0 above the diagonal"
        );
    }
    let att = api(&server, "/api/attention", json!({"prompt": prompt})).await;
    screenshot(&c, "head").await;
    // Layer and head pickers show that head's weights; "mean" their average.
    set(&c, "layer-select", "1").await;
    set(&c, "head-select", "1").await;
    let m = heatmap(&c).await;
    let want = &att["layers"][1]["heads"][1];
    for (i, row) in m.iter().enumerate() {
        for (j, &w) in row.iter().enumerate() {
            assert!(
                (w - want[i][j].as_f64().unwrap()).abs() < 1e-6,
                "layer 1 head 1 ({i}, {j})"
            );
        }
    }
    set(&c, "head-select", "mean").await;
    let m = heatmap(&c).await;
    let h = &att["layers"][1]["heads"];
    let mean = (h[0][5][2].as_f64().unwrap() + h[1][5][2].as_f64().unwrap()) / 2.0;
    assert!((m[5][2] - mean).abs() < 1e-6, "the mean of the heads");
    // Clicking a token locks its row: only its arcs remain, and the URL remembers it.
    c.find(Locator::Css("[data-testid='graph-token'][data-pos='6']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let from = js(&c, "return [...document.querySelectorAll(\"[data-testid='attention-arc']\")].map(e => +e.dataset.from);").await;
    let from = nums(&from);
    assert_eq!(from.len(), 7, "one arc to each token 0..=6");
    assert!(from.iter().all(|&f| f == 6.0));
    assert!(c.current_url().await.unwrap().as_str().contains("locked=6"));

    // All heads: n_layer × n_head thumbnails; one click opens that head.
    click(&c, "tab-heads").await;
    let thumbs = c
        .find_all(Locator::Css("[data-testid='head-thumb']"))
        .await
        .unwrap();
    assert_eq!(thumbs.len(), 4);
    screenshot(&c, "heads").await;
    c.find(Locator::Css(
        "[data-testid='head-thumb'][data-layer='0'][data-head='1']",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    ready(&c).await;
    let picked = js(&c, "return [document.querySelector(\"[data-testid='layer-select']\").value, document.querySelector(\"[data-testid='head-select']\").value, document.querySelector('#view-head').classList.contains('active')];").await;
    assert_eq!(picked, json!(["0", "1", true]));

    // Step by step: the numbers shown recompute from the vectors shown.
    click(&c, "tab-trace").await;
    set(&c, "query-select", "9").await;
    let steps = js(&c, "const o = {}; for (const e of document.querySelectorAll(\"[data-testid='trace-step']\")) o[e.dataset.step] = JSON.parse(e.dataset.values); return o;").await;
    let (x, q) = (nums(&steps["x"]), nums(&steps["q"]));
    for (r, w) in steps["w_q"]["w_q"].as_array().unwrap().iter().enumerate() {
        let dot: f64 = nums(w).iter().zip(&x).map(|(a, b)| a * b).sum();
        assert!((dot - q[r]).abs() < 1e-4, "q = W_Q·x");
    }
    let keys: Vec<Vec<f64>> = steps["k"].as_array().unwrap().iter().map(nums).collect();
    let vals: Vec<Vec<f64>> = steps["v"].as_array().unwrap().iter().map(nums).collect();
    let (scores, scaled, weights) = (
        nums(&steps["scores"]),
        nums(&steps["scaled"]),
        nums(&steps["weights"]),
    );
    let d_k = q.len() as f64;
    let live = &scaled[..=9];
    let max = live.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = live.iter().map(|s| (s - max).exp()).sum();
    for j in 0..prompt.len() {
        let dot: f64 = q.iter().zip(&keys[j]).map(|(a, b)| a * b).sum();
        assert!((scores[j] - dot).abs() < 1e-4, "q·k{j}");
        assert!((scaled[j] - scores[j] / d_k.sqrt()).abs() < 1e-5, "÷√d_k");
        assert_eq!(steps["masked"][j].is_null(), j > 9, "−∞ after the query");
        let want = if j <= 9 {
            (scaled[j] - max).exp() / z
        } else {
            0.0
        };
        assert!((weights[j] - want).abs() < 1e-5, "softmax {j}");
    }
    let out = nums(&steps["output"]);
    for (d, &o) in out.iter().enumerate() {
        let want: f64 = (0..=9).map(|j| weights[j] * vals[j][d]).sum();
        assert!((o - want).abs() < 1e-5, "Σ aⱼvⱼ [{d}]");
    }
    screenshot(&c, "trace").await;
    // Textbook mode on vectors the user types.
    set(&c, "textbook-input", "1 0\n0 1\n1 1").await;
    click(&c, "textbook-run").await;
    let tb = js(&c, "const o = {}; for (const e of document.querySelectorAll(\"[data-testid='textbook-step']\")) o[e.dataset.step] = JSON.parse(e.dataset.values); return o;").await;
    let scores: Vec<Vec<f64>> = tb["scores"].as_array().unwrap().iter().map(nums).collect();
    assert_eq!(scores, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]]);
    let w = nums(&tb["weights"][2]);
    let e = std::f64::consts::E;
    assert!(
        (w[2] - e * e / (2.0 * e + e * e)).abs() < 1e-6,
        "softmax of (1, 1, 2)"
    );

    // Next token: a distribution; top-k 1 and temperature 0 leave one token.
    click(&c, "tab-next").await;
    set(&c, "top-k", "5").await;
    let rows = js(&c, "return [...document.querySelectorAll(\"[data-testid='next-token-row']\")].map(e => [+e.dataset.token, +e.dataset.prob]);").await;
    let probs: Vec<f64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_f64().unwrap())
        .collect();
    assert_eq!(probs.len(), 5);
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    screenshot(&c, "next").await;
    set(&c, "top-k", "1").await;
    assert_eq!(
        c.find_all(Locator::Css("[data-testid='next-token-row']"))
            .await
            .unwrap()
            .len(),
        1
    );
    set(&c, "top-k", "").await;
    set(&c, "temperature", "0").await;
    let greedy = js(&c, "return [...document.querySelectorAll(\"[data-testid='next-token-row']\")].map(e => +e.dataset.prob);").await;
    assert_eq!(nums(&greedy), [1.0]);
    // A sampled token is the CLI's, with the same seed; it is appended and every view redraws.
    set(&c, "temperature", "1.1").await;
    set(&c, "seed", "42").await;
    click(&c, "sample-button").await;
    let cli = tinygpt(
        &[
            "generate",
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--prompt",
            prompt,
            "--seed",
            "42",
            "--max-new-tokens",
            "1",
            "--temperature",
            "1.1",
        ],
        ws.dir.path(),
    );
    let grown = js(
        &c,
        "return document.querySelector(\"[data-testid='prompt-input']\").value;",
    )
    .await;
    assert_eq!(format!("{}\n", grown.as_str().unwrap()), stdout(&cli));
    let rows_now = c
        .find_all(Locator::Css("[data-testid='next-token-row']"))
        .await
        .unwrap();
    assert!(!rows_now.is_empty());

    // Logit lens: a cell per layer and position of the grown prompt.
    click(&c, "tab-lens").await;
    let cells = c
        .find_all(Locator::Css("[data-testid='lens-cell']"))
        .await
        .unwrap();
    assert_eq!(cells.len(), 2 * (prompt.len() + 1));
    screenshot(&c, "lens").await;

    // Embedding neighbours and training curves.
    click(&c, "tab-embed").await;
    set(&c, "embed-token", "k").await;
    click(&c, "embed-run").await;
    assert_eq!(
        c.find_all(Locator::Css("[data-testid='neighbour-row']"))
            .await
            .unwrap()
            .len(),
        15
    );
    click(&c, "tab-curves").await;
    let series = js(
        &c,
        "return [...document.querySelectorAll('#curves polyline')].map(e => e.dataset.series);",
    )
    .await;
    assert_eq!(series, json!(["train", "val"]));
    screenshot(&c, "curves").await;
    // Export: the drawing as one SVG document, the view's data as JSON.
    let svg = js(&c, "return viewSvg();").await;
    assert!(svg.as_str().unwrap().starts_with("<svg"), "{svg}");

    // The URL holds the state: a reload restores prompt, layer, head and view.
    set(&c, "layer-select", "1").await;
    click(&c, "tab-head").await;
    set(&c, "head-select", "0").await;
    let url = c.current_url().await.unwrap().to_string();
    c.goto(&url).await.unwrap();
    ready(&c).await;
    let restored = js(&c, "return [document.querySelector(\"[data-testid='prompt-input']\").value, document.querySelector(\"[data-testid='layer-select']\").value, document.querySelector(\"[data-testid='head-select']\").value, document.querySelector('#view-head').classList.contains('active')];").await;
    assert_eq!(restored, json!([grown, "1", "0", true]));

    // A bad prompt shows its message; the page keeps working after it is fixed.
    set(&c, "prompt-input", "zebra ✓").await;
    click(&c, "run-button").await;
    let error = js(&c, "const e = document.querySelector(\"[data-testid='error']\"); return [e.hidden, e.textContent];").await;
    assert_eq!(error[0], false, "the error is shown");
    assert!(
        error[1].as_str().unwrap().contains("unknown character"),
        "{error}"
    );
    set(&c, "prompt-input", prompt).await;
    click(&c, "run-button").await;
    assert_eq!(
        js(
            &c,
            "return document.querySelector(\"[data-testid='error']\").hidden;"
        )
        .await,
        true
    );
    assert_eq!(heatmap(&c).await.len(), prompt.len());

    // Nothing was asked of any other host, and nothing went wrong in the page.
    let urls = js(
        &c,
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)];",
    )
    .await;
    for u in urls.as_array().unwrap() {
        assert!(
            u.as_str().unwrap().starts_with(&server.url),
            "a request left the server: {u}"
        );
    }
    // The page's own files all loaded (a 404 would be a console error); the API answered 200
    // except for the bad prompt above.
    let statuses = js(
        &c,
        "return performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus]);",
    )
    .await;
    let mut refused = 0;
    for entry in statuses.as_array().unwrap() {
        let (name, status) = (entry[0].as_str().unwrap(), entry[1].as_u64().unwrap());
        match status {
            200 => {}
            400 if name.ends_with("/api/prompt") => refused += 1,
            _ => panic!("{name} answered {status}"),
        }
    }
    assert_eq!(refused, 1, "only the bad prompt was refused");
    let errors = js(&c, "return window.__errors;").await;
    assert_eq!(errors, json!([]), "errors in the page");
    c.close().await.unwrap();
}

/// The circuits view: score grids that are the API's numbers, heads ablated by a click with the
/// losses and next token changing, a patching grid, attribution rows that add up to the logit,
/// and bad requests shown in the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuits_view_in_chromium() {
    let ws = Workspace::new(6000);
    let (run, _) = train_tiny(&ws, "run", 30);
    let server = Server::start(&run, ws.dir.path(), &[]);
    let driver = Driver::start();
    let c = browser(&driver).await;
    let prompt = "The king shall";
    let page = format!(
        "{}/?view=circuits&prompt={}",
        server.url,
        prompt.replace(' ', "%20")
    );
    c.goto(&page).await.unwrap();
    ready(&c).await;

    // Seven score grids of 2 layers × 2 heads, each cell the API's number.
    let scores = tokio::task::spawn_blocking({
        let url = format!("{}/api/heads", server.url);
        move || -> Value {
            serde_json::from_str(
                &ureq::get(&url)
                    .call()
                    .unwrap()
                    .body_mut()
                    .read_to_string()
                    .unwrap(),
            )
            .unwrap()
        }
    })
    .await
    .unwrap();
    let cells = js(&c, "return [...document.querySelectorAll(\"[data-testid='head-score-cell']\")].map(e => [e.dataset.score, +e.dataset.layer, +e.dataset.head, +e.dataset.value]);").await;
    let cells = cells.as_array().unwrap();
    assert_eq!(cells.len(), 7 * 4);
    for cell in cells {
        let (score, l, h) = (
            cell[0].as_str().unwrap(),
            cell[1].as_u64().unwrap(),
            cell[2].as_u64().unwrap(),
        );
        let row = scores["heads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["layer"] == l && r["head"] == h)
            .unwrap();
        assert!(
            (cell[3].as_f64().unwrap() - row[score].as_f64().unwrap()).abs() < 1e-9,
            "{cell}"
        );
    }
    let losses = |c: Client| async move {
        js(&c, "return [...document.querySelectorAll(\"[data-testid='loss-cell']\")].map(e => [+e.dataset.base, +e.dataset.ablated]);").await
    };
    let before = losses(c.clone()).await;
    let before = before.as_array().unwrap();
    assert_eq!(
        before.len(),
        prompt.len() - 1,
        "one loss per predicted token"
    );
    assert!(before.iter().all(|p| p[0] == p[1]), "nothing ablated yet");
    screenshot(&c, "circuits").await;

    // Ablate head 1.0 with its toggle: losses and next token change; the API agrees.
    click_css(
        &c,
        "[data-testid='ablate-toggle'][data-layer='1'][data-head='0']",
    )
    .await;
    assert!(c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains("ablate=1.0"));
    let pressed = js(&c, "return document.querySelector(\"[data-testid='ablate-toggle'][data-layer='1'][data-head='0']\").getAttribute('aria-pressed');").await;
    assert_eq!(pressed, "true");
    let after = losses(c.clone()).await;
    let after = after.as_array().unwrap();
    assert!(
        after.iter().any(|p| p[0] != p[1]),
        "the ablation changed some loss"
    );
    let want = api(
        &server,
        "/api/ablate",
        json!({"prompt": prompt, "heads": ["1.0"], "ablation": "mean"}),
    )
    .await;
    for (i, p) in after.iter().enumerate() {
        assert!(
            (p[1].as_f64().unwrap() - want["ablated"]["losses"][i].as_f64().unwrap()).abs() < 1e-6
        );
    }
    let next = js(&c, "return [...document.querySelectorAll(\"[data-testid='ablate-next-row'][data-which='ablated']\")].map(e => +e.dataset.prob);").await;
    assert!((nums(&next)[0] - want["ablated"]["next"][0]["prob"].as_f64().unwrap()).abs() < 1e-6);
    // Clicking the same head in a score grid frees it again.
    click_css(
        &c,
        "[data-testid='head-score-cell'][data-score='induction'][data-layer='1'][data-head='0']",
    )
    .await;
    let again = losses(c.clone()).await;
    assert!(again.as_array().unwrap().iter().all(|p| p[0] == p[1]));

    // Direct logit attribution: token embedding, positions, 2 × (2 heads + MLP); the rows add
    // up to the logit, which is the model's.
    let rows = js(&c, "return [...document.querySelectorAll(\"[data-testid='dla-row']\")].map(e => +e.dataset.value);").await;
    let rows = nums(&rows);
    assert_eq!(rows.len(), 2 + 2 * 3);
    let logit = js(
        &c,
        "return +document.querySelector(\"[data-testid='dla-summary']\").dataset.logit;",
    )
    .await;
    assert!((rows.iter().sum::<f64>() - logit.as_f64().unwrap()).abs() < 1e-4);
    set(&c, "dla-token", "s").await;
    click(&c, "dla-run").await;
    let dla = api(&server, "/api/dla", json!({"prompt": prompt, "token": "s"})).await;
    let shown = js(
        &c,
        "return +document.querySelector(\"[data-testid='dla-summary']\").dataset.logit;",
    )
    .await;
    assert!((shown.as_f64().unwrap() - dla["logit"].as_f64().unwrap()).abs() < 1e-9);
    let logits = api(
        &server,
        "/api/next",
        json!({"prompt": prompt, "temperature": 1.0, "top_k": null}),
    )
    .await;
    let s_row = logits["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["token"] == "s")
        .unwrap();
    assert!((s_row["logit"].as_f64().unwrap() - dla["logit"].as_f64().unwrap()).abs() < 1e-4);

    // Patching: one cell per head, each the API's number.
    for (id, v) in [
        ("patch-clean", "the king"),
        ("patch-corrupted", "the kong"),
        ("patch-answer", "s"),
        ("patch-wrong", "n"),
    ] {
        set(&c, id, v).await;
    }
    click(&c, "patch-run").await;
    let cells = js(&c, "return [...document.querySelectorAll(\"[data-testid='patch-cell']\")].map(e => [+e.dataset.layer, +e.dataset.head, +e.dataset.diff]);").await;
    let cells = cells.as_array().unwrap();
    assert_eq!(cells.len(), 4);
    let want = api(
        &server,
        "/api/patch",
        json!({"clean": "the king", "corrupted": "the kong", "answer": "s", "wrong": "n"}),
    )
    .await;
    for (cell, w) in cells.iter().zip(want["cells"].as_array().unwrap()) {
        assert_eq!(cell[0], w["layer"]);
        assert!((cell[2].as_f64().unwrap() - w["logit_diff"].as_f64().unwrap()).abs() < 1e-9);
    }
    screenshot(&c, "circuits-patched").await;

    // Bad requests: shown in the page, answered 400.
    let error = |c: Client| async move {
        js(&c, "const e = document.querySelector(\"[data-testid='error']\"); return e.hidden ? null : e.textContent;").await
    };
    set(&c, "patch-corrupted", "the kin").await;
    click(&c, "patch-run").await;
    let e = error(c.clone()).await;
    assert!(e.as_str().unwrap().contains("equal length"), "{e}");
    set(&c, "patch-clean", &"a".repeat(20)).await;
    set(&c, "patch-corrupted", &"a".repeat(20)).await;
    click(&c, "patch-run").await;
    let e = error(c.clone()).await;
    assert!(e.as_str().unwrap().contains("block_size"), "{e}");
    set(&c, "patch-clean", "the king").await;
    set(&c, "patch-corrupted", "the kong").await;
    set(&c, "patch-answer", "sh").await;
    click(&c, "patch-run").await;
    let e = error(c.clone()).await;
    assert!(e.as_str().unwrap().contains("give exactly one"), "{e}");
    c.goto(&format!(
        "{}/?view=circuits&prompt=the&ablate=5.0",
        server.url
    ))
    .await
    .unwrap();
    ready(&c).await;
    let e = error(c.clone()).await;
    assert!(
        e.as_str().unwrap().contains("head 5.0 does not exist"),
        "{e}"
    );
    let statuses = js(&c, "return performance.getEntriesByType('resource').filter(e => e.name.includes('/api/')).map(e => [e.name, e.responseStatus]);").await;
    assert!(
        statuses.as_array().unwrap().iter().any(|s| s[0]
            .as_str()
            .unwrap()
            .ends_with("/api/ablate")
            && s[1] == 400),
        "{statuses}"
    );
    assert_eq!(js(&c, "return window.__errors;").await, json!([]));
    c.close().await.unwrap();
}

/// The README's screenshots: every view of the README's checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the README's trained checkpoint; writes the README's screenshots"]
async fn screenshots_of_the_readme_checkpoint() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let checkpoint = root.join("checkpoints/shakespeare-char");
    assert!(
        checkpoint.join("best").is_dir(),
        "train it first: the README's first command"
    );
    assert!(
        std::env::var("TINYGPT_SCREENSHOTS").is_ok(),
        "set TINYGPT_SCREENSHOTS=DIR"
    );
    let server = Server::start(&checkpoint, root, &[]);
    let driver = Driver::start();
    let c = browser(&driver).await;
    let url = format!(
        "{}/?prompt=ROMEO%3A%20I%20love%20thee&layer=1&head=2&query=12&top_k=10",
        server.url
    );
    c.goto(&url).await.unwrap();
    ready(&c).await;
    screenshot(&c, "head").await;
    for (tab, name) in [
        ("tab-heads", "heads"),
        ("tab-trace", "trace"),
        ("tab-next", "next"),
        ("tab-lens", "lens"),
        ("tab-curves", "curves"),
        ("tab-circuits", "circuits"),
    ] {
        click(&c, tab).await;
        screenshot(&c, name).await;
    }
    assert_eq!(js(&c, "return window.__errors;").await, json!([]));
    c.close().await.unwrap();
}
