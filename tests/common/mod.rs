//! Helpers shared by the integration tests: small generated corpora and configs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A deterministic pseudo-English corpus of about `bytes` bytes (no real text is copied).
pub fn corpus(bytes: usize) -> String {
    const WORDS: [&str; 24] = [
        "the", "king", "shall", "speak", "and", "we", "go", "to", "war", "my", "lord", "fair",
        "night", "day", "love", "is", "not", "so", "what", "say", "you", "good", "sir", "now",
    ];
    let mut s = String::with_capacity(bytes + 64);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut line = 0;
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        if line == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
        } else {
            s.push(' ');
            s.push_str(w);
        }
        line += 1;
        if x.is_multiple_of(13) {
            s.push_str(" \"quoth\"");
        } else if x.is_multiple_of(17) {
            s.push_str(" a\\b");
        }
        if x.is_multiple_of(7) {
            s.push_str(".\n");
            line = 0;
        } else if x.is_multiple_of(11) {
            s.push_str(",\n");
            line = 0;
        }
    }
    s.push('\n');
    s
}

/// The text of a tiny config reading `data`, with extra `[section] key = value` lines applied
/// through overrides by the caller.
pub fn tiny_config(data: &Path) -> String {
    format!(
        r#"
[model]
block_size = 16
n_layer = 2
n_head = 2
n_embd = 32
dropout = 0.0
bias = false

[tokenizer]
kind = "char"

[training]
batch_size = 8
max_iters = 20
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 4
lr_decay_iters = 20
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
grad_accum_steps = 1
eval_interval = 10
eval_iters = 3
val_fraction = 0.1
seed = 7
checkpoint_interval = 5

[data]
path = {:?}
"#,
        data.display().to_string()
    )
}

/// A temporary directory holding `corpus.txt` and `tiny.toml`.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(corpus_bytes: usize) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("corpus.txt");
        std::fs::write(&data, corpus(corpus_bytes)).unwrap();
        std::fs::write(dir.path().join("tiny.toml"), tiny_config(&data)).unwrap();
        Workspace { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
