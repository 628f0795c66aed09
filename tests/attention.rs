//! `tinygpt attention`, `plot` and `inspect --neighbours` on a tiny trained checkpoint.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use common::{tinygpt, train_tiny, Workspace};

/// One tiny run shared by the tests of this file.
fn run_dir() -> &'static (Workspace, PathBuf) {
    static RUN: OnceLock<(Workspace, PathBuf)> = OnceLock::new();
    RUN.get_or_init(|| {
        let ws = Workspace::new(4000);
        let (out, _) = train_tiny(&ws, "run", 15);
        (ws, out)
    })
}

fn attention(args: &[&str]) -> Output {
    let (ws, out) = run_dir();
    let mut a = vec!["attention", "--checkpoint", out.to_str().unwrap()];
    a.extend_from_slice(args);
    tinygpt(&a, ws.dir.path())
}

const PROMPT: &str = "k \"my\" l\\\nsay";

#[test]
fn json_weights_are_the_models_own() {
    let o = attention(&["--prompt", PROMPT, "--format", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tokens = v["tokens"].as_array().unwrap();
    let t = PROMPT.chars().count();
    assert_eq!(tokens.len(), t);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);

    let (_, out) = run_dir();
    let ck = tinygpt::run::checkpoint::load(&out.join("best"), &Device::Cpu).unwrap();
    let ids = ck.tokenizer.encode(PROMPT).unwrap();
    let x = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    let (_, att) = ck.model.forward_with_attention(&x).unwrap();
    for (l, layer) in layers.iter().enumerate() {
        assert_eq!(layer["layer"].as_u64(), Some(l as u64));
        let want = att[l].squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        let heads = layer["heads"].as_array().unwrap();
        assert_eq!(heads.len(), 2);
        for (h, m) in heads.iter().enumerate() {
            for (i, row) in m.as_array().unwrap().iter().enumerate() {
                let row: Vec<f64> = row
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                let sum: f64 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "row {i} sums to {sum}");
                for (j, &w) in row.iter().enumerate() {
                    assert!((w - want[h][i][j] as f64).abs() < 1e-6);
                    if j > i {
                        assert_eq!(w, 0.0);
                    }
                }
            }
        }
    }
    // --head mean is the mean of the heads
    let o = attention(&[
        "--prompt", PROMPT, "--format", "json", "--layer", "1", "--head", "mean",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let m = &v["layers"][0]["heads"][0];
    let want = att[1]
        .squeeze(0)
        .unwrap()
        .mean(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!((m[3][1].as_f64().unwrap() - want[3][1] as f64).abs() < 1e-6);
    assert_eq!(v["layers"][0]["layer"].as_u64(), Some(1));
}

#[test]
fn dot_graph_has_one_node_per_token_and_causal_edges() {
    let threshold = 0.1;
    let o = attention(&[
        "--prompt",
        PROMPT,
        "--format",
        "dot",
        "--layer",
        "0",
        "--head",
        "1",
        "--threshold",
        "0.1",
    ]);
    assert!(o.status.success());
    let dot = String::from_utf8(o.stdout).unwrap();
    assert_eq!(dot.matches("digraph ").count(), 1);
    assert!(dot.trim_end().ends_with('}'));
    let t = PROMPT.chars().count();
    let nodes: Vec<&str> = dot
        .lines()
        .filter(|l| l.trim_start().starts_with('t') && l.contains("[label=") && !l.contains("->"))
        .collect();
    assert_eq!(nodes.len(), t);
    // labels escape quotes and backslashes and show newlines and spaces
    assert!(dot.contains(r#"[label="2: \"""#), "{dot}");
    assert!(dot.contains(r#"\\n"#) && dot.contains('␣'), "{dot}");
    let mut edges = 0;
    for l in dot
        .lines()
        .filter(|l| l.contains("->") && !l.contains("invis"))
    {
        let (lhs, rest) = l.trim().split_once(" -> ").unwrap();
        let q: usize = lhs.trim_start_matches('t').parse().unwrap();
        let k: usize = rest
            .split_whitespace()
            .next()
            .unwrap()
            .trim_start_matches('t')
            .parse()
            .unwrap();
        assert!(k <= q, "edge {q} -> {k} points to the future");
        let w: f32 = rest
            .split("label=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(w >= threshold - 0.005, "{l}");
        edges += 1;
    }
    assert!(
        edges >= t,
        "every query keeps at least one edge ≥ 1/T: {edges}"
    );
    // the first token attends only to itself
    assert!(dot.contains("t0 -> t0 [label=\"1.00\""));
}

fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&b[12..16], b"IHDR");
    let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn heatmaps_are_valid_images_of_the_expected_size() {
    let (ws, _) = run_dir();
    let png = ws.path("att.png");
    let o = attention(&[
        "--prompt",
        "the king",
        "--format",
        "png",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 2 layers × 2 heads of 8 tokens
    assert_eq!(png_size(&png), tinygpt::viz::heatmap::heatmap_size(8, 2, 2));
    let svg = ws.path("att.svg");
    let o = attention(&[
        "--prompt",
        "the king",
        "--format",
        "svg",
        "--layer",
        "1",
        "--head",
        "mean",
        "--out",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let text = std::fs::read_to_string(&svg).unwrap();
    let (w, h) = tinygpt::viz::heatmap::heatmap_size(8, 1, 1);
    assert!(
        text.starts_with("<svg")
            && text.contains(&format!("width=\"{w}\""))
            && text.contains(&format!("height=\"{h}\""))
    );
    assert!(text.trim_end().ends_with("</svg>"));
    assert!(
        text.matches("<rect").count() >= 64,
        "one rectangle per cell"
    );
}

#[test]
fn table_shows_tokens_and_weights() {
    let o = attention(&["--prompt", "the king", "--layer", "0", "--head", "0"]);
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("layer 0, head 0"));
    let first = s
        .lines()
        .find(|l| l.trim_start().starts_with("0 "))
        .unwrap();
    assert!(first.contains("1.00"), "{first}");
    assert_eq!(
        s.lines().filter(|l| l.contains('·')).count(),
        7,
        "rows 0..6 have masked cells"
    );
}

#[test]
fn bad_attention_requests_are_named() {
    for (args, needle) in [
        (
            vec!["--prompt", "the", "--layer", "2"],
            "--layer 2 does not exist",
        ),
        (
            vec!["--prompt", "the", "--head", "5"],
            "--head 5 does not exist",
        ),
        (vec!["--prompt", "the", "--head", "x"], "--head \"x\""),
        (vec!["--prompt", ""], "--prompt is empty"),
        (vec!["--prompt", "the", "--format", "png"], "--out"),
        (vec!["--prompt", &"the ".repeat(10)], "block_size"),
    ] {
        let o = attention(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn loss_plot_and_neighbours() {
    let (ws, out) = run_dir();
    // training drew loss.png at the end
    let (w, h) = png_size(&out.join("loss.png"));
    assert_eq!((w, h), (800, 500));
    let svg = ws.path("loss.svg");
    let o = tinygpt(
        &[
            "plot",
            out.to_str().unwrap(),
            "--out",
            svg.to_str().unwrap(),
        ],
        ws.dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read_to_string(&svg).unwrap().contains("best val"));
    let o = tinygpt(&["plot", ws.dir.path().to_str().unwrap()], ws.dir.path());
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no metrics.csv"));

    let o = tinygpt(
        &[
            "inspect",
            out.to_str().unwrap(),
            "--neighbours",
            "k",
            "--k",
            "3",
            "--json",
        ],
        ws.dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let near = v["neighbours"].as_array().unwrap();
    assert_eq!(near.len(), 3);
    let sims: Vec<f64> = near
        .iter()
        .map(|n| n["similarity"].as_f64().unwrap())
        .collect();
    assert!(sims.windows(2).all(|w| w[0] >= w[1]) && sims.iter().all(|s| (-1.0..=1.0).contains(s)));
    assert!(near.iter().all(|n| n["token"] != "k"));
    for (tok, needle) in [("Q", "unknown character"), ("ki", "2 tokens")] {
        let o = tinygpt(
            &["inspect", out.to_str().unwrap(), "--neighbours", tok],
            ws.dir.path(),
        );
        assert!(
            !o.status.success() && String::from_utf8_lossy(&o.stderr).contains(needle),
            "{tok}"
        );
    }
}
