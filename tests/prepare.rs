//! `tinygpt prepare` and training from prepared folders: the three input kinds end to end, the
//! shard contents against a direct encoding, the split by document, streaming, the bad inputs,
//! interrupted preparations, the no-op re-run, and exact resume.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::{corpus, fails_with, stderr, tinygpt, Workspace};
use tinygpt::data::prepare::{prepare, OnBad, PrepareOptions, TokenizerSource, DEFAULT_EXTENSIONS};
use tinygpt::data::shards::{Manifest, Prepared};
use tinygpt::data::tokenizer::TokenizerKind;
use tinygpt::run::config::{Config, TokenizerConfig};
use tinygpt::train::{ProgressMode, Trainer};

fn options(inputs: &[PathBuf], out: &Path, kind: TokenizerKind) -> PrepareOptions {
    PrepareOptions {
        inputs: inputs.to_vec(),
        out: out.to_path_buf(),
        tokenizer: TokenizerSource::Train(TokenizerConfig {
            kind,
            vocab_size: 300,
        }),
        val_fraction: 0.1,
        extensions: DEFAULT_EXTENSIONS.map(String::from).to_vec(),
        jsonl_field: "text".into(),
        on_bad: OnBad::Fail,
        sample_bytes: 1 << 20,
        shard_tokens: 1 << 28,
        block_bytes: 64 << 20,
        progress: ProgressMode::Quiet,
    }
}

/// Twelve documents of different lengths in a folder of Markdown notes (one nested).
fn notes(ws: &Workspace) -> PathBuf {
    let dir = ws.path("notes");
    std::fs::create_dir_all(dir.join("2026")).unwrap();
    let text = corpus(40_000);
    for i in 0..12 {
        let name = match i {
            3 => "2026/march.md".to_string(),
            _ => format!("note-{i:02}.md"),
        };
        let (a, b) = (i * 3000, i * 3000 + 1000 + 150 * i);
        std::fs::write(dir.join(name), &text[a..b]).unwrap();
    }
    std::fs::write(dir.join("picture.png"), [0xffu8, 0xd8, 0xff]).unwrap();
    dir
}

fn all_tokens(p: &Prepared) -> (Vec<u32>, Vec<u32>) {
    let read = |s: &tinygpt::data::shards::ShardSet| {
        let mut v = Vec::new();
        s.read(0..s.len(), &mut v).unwrap();
        v
    };
    (read(&p.train), read(&p.val))
}

/// The shards hold each document's encoding and end-of-document token, in input order, whole
/// documents to one split or the other; the manifest says which, with each input's sha256.
#[test]
fn shards_hold_each_document_encoded_whole_and_split_by_document() {
    let ws = Workspace::new(100);
    let dir = notes(&ws);
    for kind in [TokenizerKind::Char, TokenizerKind::Bpe] {
        let out = ws.path(&format!("prep-{kind:?}"));
        let r = prepare(&options(std::slice::from_ref(&dir), &out, kind)).unwrap();
        let p = Prepared::open(&out).unwrap();
        let tok = p.tokenizer().unwrap();
        let eot = tok.end_of_document().unwrap();
        let m = &r.manifest;
        assert_eq!(m.inputs.len(), 12, "the picture is not a text file");
        assert_eq!((m.documents, m.val_documents), (12, 1));
        assert_eq!(m.val_document_ids.as_deref(), Some(&[9u64][..]));
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (i, input) in m.inputs.iter().enumerate() {
            let bytes = std::fs::read(&input.path).unwrap();
            assert_eq!(input.sha256, tinygpt::data::shards::sha256_hex(&bytes));
            let mut ids = tok.encode(std::str::from_utf8(&bytes).unwrap()).unwrap();
            ids.push(eot);
            match i == 9 {
                true => val.extend(ids),
                false => train.extend(ids),
            }
        }
        assert_eq!(all_tokens(&p), (train, val), "{kind:?}");
        assert_eq!(m.train_tokens + m.val_tokens, p.train.len() + p.val.len());
        assert_eq!(m.tokenizer.kind, kind);
        if kind == TokenizerKind::Bpe {
            assert_eq!(m.tokenizer.end_of_document, "<|endoftext|>");
            assert!(m.tokenizer.trained_on_bytes > 0);
        }
    }
}

/// A long document streamed in small blocks (cut where BPE would not merge across) gives the
/// same ids as encoding it whole; a single document is split by tokens.
#[test]
fn streaming_in_blocks_gives_the_whole_documents_ids() {
    let ws = Workspace::new(60_000);
    let corpus_path = ws.path("corpus.txt");
    for kind in [TokenizerKind::Char, TokenizerKind::Bpe] {
        let whole = ws.path(&format!("whole-{kind:?}"));
        let streamed = ws.path(&format!("streamed-{kind:?}"));
        prepare(&options(std::slice::from_ref(&corpus_path), &whole, kind)).unwrap();
        let tok = Prepared::open(&whole).unwrap().tokenizer().unwrap();
        let mut o = options(std::slice::from_ref(&corpus_path), &streamed, kind);
        o.block_bytes = 777;
        o.tokenizer = TokenizerSource::Given(Box::new(tok.clone()));
        let r = prepare(&o).unwrap();
        let (a, b) = (
            all_tokens(&Prepared::open(&whole).unwrap()),
            all_tokens(&Prepared::open(&streamed).unwrap()),
        );
        assert_eq!(a, b, "{kind:?}");
        let text = std::fs::read_to_string(&corpus_path).unwrap();
        let mut want = tok.encode(&text).unwrap();
        want.push(tok.end_of_document().unwrap());
        let n_val = (want.len() as f64 * 0.1).round() as usize;
        assert_eq!(b.1.len(), n_val);
        assert_eq!([b.0, b.1].concat(), want, "{kind:?}");
        assert!(
            r.manifest.split_rule.starts_with("by tokens"),
            "{}",
            r.manifest.split_rule
        );
    }
}

/// A folder of Markdown notes, a `.jsonl.gz` file and a plain `.txt` each prepare and train
/// through the CLI; eval scores the prepared split.
#[test]
fn notes_jsonl_gz_and_txt_prepare_and_train() {
    let ws = Workspace::new(50_000);
    notes(&ws);
    let text = corpus(80_000);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for para in text.split(".\n") {
        let line = serde_json::json!({"id": 1, "text": para});
        std::io::Write::write_all(&mut gz, format!("{line}\n").as_bytes()).unwrap();
    }
    std::fs::write(ws.path("docs.jsonl.gz"), gz.finish().unwrap()).unwrap();
    for (input, set) in [
        ("notes", "tokenizer.kind=\"char\""),
        ("docs.jsonl.gz", "tokenizer.kind=\"bpe\""),
        ("corpus.txt", "tokenizer.kind=\"char\""),
    ] {
        let out = format!("prep-{input}");
        let o = tinygpt(
            &[
                "prepare",
                "--data",
                input,
                "--out",
                &out,
                "--config",
                "tiny.toml",
                "--set",
                set,
                "--set",
                "tokenizer.vocab_size=300",
                "--quiet",
            ],
            ws.dir.path(),
        );
        assert!(o.status.success(), "{input}: {}", stderr(&o));
        let run = format!("run-{input}");
        let o = tinygpt(
            &[
                "train",
                "--config",
                "tiny.toml",
                "--data",
                &out,
                "--out",
                &run,
                "--set",
                set,
                "--set",
                "tokenizer.vocab_size=300",
                "--set",
                "training.max_iters=20",
                "--quiet",
            ],
            ws.dir.path(),
        );
        assert!(o.status.success(), "{input}: {}", stderr(&o));
        let o = tinygpt(&["eval", "--checkpoint", &run, "--json"], ws.dir.path());
        assert!(o.status.success(), "{input}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let m = Manifest::load(&ws.path(&out)).unwrap();
        assert_eq!(
            v["tokens"].as_u64().unwrap(),
            m.val_tokens - 1,
            "{input}: every val token but the first is predicted"
        );
        assert!(v["loss"].as_f64().unwrap() < 6.0);
    }
    let m = Manifest::load(&ws.path("prep-docs.jsonl.gz")).unwrap();
    assert!(m.documents > 100 && m.val_documents * 10 <= m.documents);
}

/// Training from a prepared folder: N steps straight through equal N/2, resume, N/2.
#[test]
fn a_run_on_prepared_data_resumes_exactly() {
    let ws = Workspace::new(30_000);
    let out = ws.path("prep");
    prepare(&options(
        &[ws.path("corpus.txt")],
        &out,
        TokenizerKind::Char,
    ))
    .unwrap();
    let cfg = |n: usize| {
        Config::load(
            &ws.path("tiny.toml"),
            &[
                format!("training.max_iters={n}"),
                "training.eval_interval=5".into(),
                "training.checkpoint_interval=5".into(),
                "model.dropout=0.1".into(),
                format!("data.path={:?}", out.display().to_string()),
            ],
        )
        .unwrap()
    };
    let mut whole = Trainer::on_device(cfg(10), &Device::Cpu, ProgressMode::Quiet).unwrap();
    whole
        .run(&common::run_options(&ws.path("whole"), false))
        .unwrap();
    let mut first = Trainer::on_device(cfg(5), &Device::Cpu, ProgressMode::Quiet).unwrap();
    first
        .run(&common::run_options(&ws.path("half"), false))
        .unwrap();
    let mut second = common::resume_on_cpu(&ws.path("half/last"), &["training.max_iters=10"]);
    second
        .run(&common::run_options(&ws.path("half"), true))
        .unwrap();
    assert_eq!(
        common::param_values(&whole.params),
        common::param_values(&second.params)
    );
}

#[test]
fn bad_inputs_are_named_and_nothing_half_written_is_read() {
    let ws = Workspace::new(20_000);
    let dir = ws.dir.path();
    std::fs::create_dir_all(ws.path("in")).unwrap();
    std::fs::write(ws.path("in/good.txt"), corpus(5000)).unwrap();
    std::fs::write(ws.path("in/bad.txt"), b"fine text \xc3\x28 then more").unwrap();
    // Refused by default, naming the file and the offset; the folder stays as it was.
    let o = tinygpt(&["prepare", "--data", "in", "--out", "prep"], dir);
    fails_with(&o, "bad.txt");
    assert!(
        stderr(&o).contains("offset 10") && stderr(&o).contains("--on-bad skip"),
        "{}",
        stderr(&o)
    );
    assert!(
        !ws.path("prep").exists(),
        "a failed first run leaves no folder"
    );
    // Skipped on request, and recorded.
    let o = tinygpt(
        &[
            "prepare", "--data", "in", "--out", "prep", "--on-bad", "skip", "--quiet",
        ],
        dir,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skipped a document of") && stderr(&o).contains("bad.txt"));
    let m = Manifest::load(&ws.path("prep")).unwrap();
    let bad = m
        .inputs
        .iter()
        .find(|i| i.path.ends_with("bad.txt"))
        .unwrap();
    assert_eq!(bad.documents, 0);
    assert!(bad.skipped.as_deref().unwrap().contains("not valid UTF-8"));
    // A JSON line without the field names the line.
    std::fs::write(ws.path("d.jsonl"), "{\"text\": \"a\"}\n{\"body\": \"b\"}\n").unwrap();
    let o = tinygpt(&["prepare", "--data", "d.jsonl", "--out", "prep-j"], dir);
    fails_with(&o, "line 2 has no string field \"text\"");
    assert!(!ws.path("prep-j").exists());
    // A BPE vocabulary smaller than its byte symbols is refused, naming the minimum, as train
    // refuses it (it used to make 257 tokens silently).
    let o = tinygpt(
        &[
            "prepare",
            "--data",
            "corpus.txt",
            "--out",
            "prep-v",
            "--set",
            "tokenizer.kind=\"bpe\"",
            "--set",
            "tokenizer.vocab_size=3",
        ],
        dir,
    );
    fails_with(
        &o,
        "tokenizer.vocab_size = 3 is too small for a byte-level BPE: it needs at least 257",
    );
    assert!(!ws.path("prep-v").exists());
    // An empty input set says what was searched.
    std::fs::create_dir_all(ws.path("empty")).unwrap();
    let o = tinygpt(&["prepare", "--data", "empty", "--out", "prep-e"], dir);
    fails_with(&o, "no input files: searched empty");
    // A folder with other files is not written into.
    let o = tinygpt(&["prepare", "--data", "corpus.txt", "--out", "in"], dir);
    fails_with(&o, "is a folder with other files in it");
    let train_on_prep = || {
        let args = [
            "train",
            "--config",
            "tiny.toml",
            "--data",
            "prep",
            "--out",
            "r",
        ];
        tinygpt(&args, dir)
    };
    // Another format version is refused naming both.
    let m_path = ws.path("prep/manifest.json");
    let text = std::fs::read_to_string(&m_path).unwrap();
    std::fs::write(
        &m_path,
        text.replace("\"format_version\": 1", "\"format_version\": 7"),
    )
    .unwrap();
    let o = train_on_prep();
    fails_with(&o, "format version 7, this tinygpt reads version 1");
    std::fs::write(&m_path, text).unwrap();
    // A shard cut short (by hand; prepare itself never lists one) is refused, naming it.
    let shard = ws
        .path("prep")
        .join(&Manifest::load(&ws.path("prep")).unwrap().shards[0].file);
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 2)
        .unwrap();
    let o = train_on_prep();
    fails_with(&o, "train-000.bin");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len)
        .unwrap();
    // An id beyond the vocabulary (a damaged file) names the shard and the offset where the
    // window is read (train and eval both read there), instead of an index error from the
    // embedding.
    use std::os::unix::fs::FileExt;
    let vocab = Manifest::load(&ws.path("prep"))
        .unwrap()
        .tokenizer
        .vocab_size;
    assert!(vocab < 65_000);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    let header = 32;
    for t in 0..(len - header) / 2 {
        f.write_all_at(&65_000u16.to_le_bytes(), header + 2 * t)
            .unwrap();
    }
    let o = train_on_prep();
    fails_with(&o, "train-000.bin: token 65000 at offset");
    assert!(
        stderr(&o).contains(&format!("is not below the vocabulary size {vocab}"))
            && stderr(&o).contains("run tinygpt prepare again"),
        "{}",
        stderr(&o)
    );
}

/// An interrupted preparation (its folder of half-written shards left behind, as a kill -9
/// leaves it) is never read: the previous preparation stays in use, and the next run removes
/// the leftovers. A re-run over unchanged inputs does nothing; a changed input prepares again.
#[test]
fn interrupted_and_repeated_preparations() {
    let ws = Workspace::new(20_000);
    let dir = ws.dir.path();
    let prepare_corpus = || {
        let o = tinygpt(
            &["prepare", "--data", "corpus.txt", "--out", "prep", "-q"],
            dir,
        );
        assert!(o.status.success(), "{}", stderr(&o));
    };
    prepare_corpus();
    let before = std::fs::read_to_string(ws.path("prep/manifest.json")).unwrap();
    let partial = ws.path("prep/data-99.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("train-000.bin"), b"TGPTTOKS half").unwrap();
    let p = Prepared::open(&ws.path("prep")).unwrap();
    assert_eq!(p.manifest, serde_json::from_str(&before).unwrap());
    let o = tinygpt(&["prepare", "--data", "corpus.txt", "--out", "prep"], dir);
    assert!(o.status.success());
    assert!(
        common::stdout(&o).contains("nothing to do"),
        "{}",
        common::stdout(&o)
    );
    std::fs::write(ws.path("corpus.txt"), corpus(25_000)).unwrap();
    prepare_corpus();
    assert!(!partial.exists(), "leftovers removed");
    let after = Manifest::load(&ws.path("prep")).unwrap();
    assert_ne!(serde_json::to_string_pretty(&after).unwrap(), before);
    let data_dirs = std::fs::read_dir(ws.path("prep"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("data-"))
        .count();
    assert_eq!(data_dirs, 1, "the old shards are gone");
    assert!(Prepared::open(&ws.path("prep")).is_ok());
}
