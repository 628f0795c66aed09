//! What `tinygpt prepare` reads: the input files named by `--data` (files, folders searched
//! recursively, globs), and the documents in each: a text file is one document, a JSON Lines
//! file one per line (the string field `--jsonl-field`); either may be gzip-compressed (`.gz`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::error::{Error, Result};

/// Extensions a folder is searched for by default (each also with `.gz`).
pub const DEFAULT_EXTENSIONS: [&str; 6] = ["txt", "md", "markdown", "rst", "text", "jsonl"];

/// Documents up to this size are read whole (and refused or skipped whole); longer text files
/// are streamed in blocks of this size (the default of `PrepareOptions::block_bytes`).
pub const WHOLE_DOCUMENT_BYTES: usize = 64 << 20;

/// One input file.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub path: PathBuf,
    pub bytes: u64,
    /// Seconds since the epoch.
    pub modified: u64,
    pub jsonl: bool,
    pub gzip: bool,
}

/// What to do with a document that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBad {
    /// Stop, naming the file and the byte offset (or line).
    Fail,
    /// Leave the document out, say so on stderr, and record it in the manifest.
    Skip,
}

/// The input files `args` name, each once, in order (a folder's files and a glob's matches
/// sorted by path). A folder is searched for `extensions` (and their `.gz`), skipping hidden
/// entries; a file named directly is taken whatever its extension.
pub fn collect(args: &[PathBuf], extensions: &[String]) -> Result<Vec<Source>> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for arg in args {
        let text = arg.to_string_lossy();
        if text.contains(['*', '?', '[']) && !arg.exists() {
            let mut found: Vec<PathBuf> = glob::glob(&text)
                .map_err(|e| Error::Usage(format!("--data {text}: not a valid pattern ({e})")))?
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .collect();
            found.sort();
            paths.extend(found);
        } else if arg.is_dir() {
            let mut found = Vec::new();
            let walk = walkdir::WalkDir::new(arg)
                .follow_links(true)
                .into_iter()
                .filter_entry(|e| {
                    e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.')
                });
            for entry in walk {
                let entry = entry.map_err(|e| {
                    let p = e.path().unwrap_or(arg).to_path_buf();
                    Error::data(p, format!("cannot be searched: {e}"))
                })?;
                if entry.file_type().is_file() && has_extension(entry.path(), extensions) {
                    found.push(entry.into_path());
                }
            }
            found.sort();
            paths.extend(found);
        } else if arg.is_file() {
            paths.push(arg.clone());
        } else {
            return Err(Error::data(
                arg,
                "not found; pass files, folders or quoted globs to --data",
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    paths.retain(|p| seen.insert(p.canonicalize().unwrap_or_else(|_| p.clone())));
    if paths.is_empty() {
        let searched: Vec<String> = args.iter().map(|a| a.display().to_string()).collect();
        return Err(Error::Usage(format!(
            "no input files: searched {} for *.{{{}}} (and .gz); pass other paths or --extensions",
            searched.join(", "),
            extensions.join(",")
        )));
    }
    paths
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_lowercase();
            let gzip = name.ends_with(".gz");
            let base = name.strip_suffix(".gz").unwrap_or(&name);
            Ok(Source {
                jsonl: base.ends_with(".jsonl") || base.ends_with(".ndjson"),
                gzip,
                bytes: meta.len(),
                modified,
                path,
            })
        })
        .collect()
}

fn has_extension(path: &Path, extensions: &[String]) -> bool {
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_lowercase();
    let base = name.strip_suffix(".gz").unwrap_or(&name);
    extensions
        .iter()
        .any(|e| base.ends_with(&format!(".{}", e.trim_start_matches('.').to_lowercase())))
}

/// A reader that hashes and counts the raw bytes (before decompression) as they pass.
struct Hashing<R> {
    inner: R,
    hasher: sha2::Sha256,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// What reading a source yields, in order.
pub enum Event {
    /// Text of the current document; `last` ends it.
    Text { text: String, last: bool },
    /// A document was left out (`--on-bad skip`): why.
    Skipped(String),
}

/// Reads the documents of `source`, calling `emit` with their text in pieces (`Text`), and
/// returns the sha256 of the file's bytes. `raw_bytes` counts the file's bytes read so far
/// (for progress). `cut` gives the end of the longest prefix of a streamed block that can be
/// encoded on its own ([`crate::data::tokenizer::Tokenizer::safe_cut`]); text files longer than
/// `block` bytes are read `block` bytes at a time.
#[allow(clippy::too_many_arguments)]
pub fn read_documents(
    source: &Source,
    jsonl_field: &str,
    on_bad: OnBad,
    block: usize,
    raw_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cut: &dyn Fn(&str) -> usize,
    emit: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<String> {
    let path = &source.path;
    let file = File::open(path).map_err(|e| Error::data(path, format!("cannot be read: {e}")))?;
    let mut hashing = Hashing {
        inner: file,
        hasher: sha2::Sha256::new(),
        bytes: raw_bytes,
    };
    {
        let reader: Box<dyn Read + '_> = match source.gzip {
            true => Box::new(flate2::read::MultiGzDecoder::new(&mut hashing)),
            false => Box::new(&mut hashing),
        };
        let mut reader = BufReader::with_capacity(1 << 20, reader);
        match source.jsonl {
            true => read_jsonl(&mut reader, path, jsonl_field, on_bad, emit)?,
            false => read_text(&mut reader, path, on_bad, block, cut, emit)?,
        }
    }
    // Hash whatever of the file the reader left unread (a gzip trailer, say).
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| Error::io(path, e))?;
    Ok(crate::data::shards::hex(&hashing.hasher.finalize()))
}

fn bad(
    path: &Path,
    on_bad: OnBad,
    msg: String,
    emit: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<()> {
    match on_bad {
        OnBad::Fail => Err(Error::data(
            path,
            format!("{msg}; fix or remove it, or pass --on-bad skip"),
        )),
        OnBad::Skip => emit(Event::Skipped(msg)),
    }
}

fn read_jsonl(
    reader: &mut dyn BufRead,
    path: &Path,
    field: &str,
    on_bad: OnBad,
    emit: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<()> {
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::data(path, format!("cannot be read after line {number}: {e}")))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) => {
                bad(
                    path,
                    on_bad,
                    format!("line {number} is not JSON ({e})"),
                    emit,
                )?;
                continue;
            }
        };
        match value.get(field).and_then(|v| v.as_str()) {
            Some(text) => emit(Event::Text {
                text: text.to_string(),
                last: true,
            })?,
            None => bad(
                path,
                on_bad,
                format!("line {number} has no string field \"{field}\" (pass --jsonl-field NAME)"),
                emit,
            )?,
        }
    }
}

fn read_text(
    reader: &mut dyn Read,
    path: &Path,
    on_bad: OnBad,
    block: usize,
    cut: &dyn Fn(&str) -> usize,
    emit: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    let mut offset = 0u64; // bytes of the document emitted before `pending`
    let mut eof = false;
    let mut first = true;
    while !eof {
        // Up to `block` bytes more, in a buffer that grows only as far as the text goes.
        let before = pending.len();
        let want = block.saturating_sub(before).max(1) as u64;
        let n = Read::take(&mut *reader, want)
            .read_to_end(&mut pending)
            .map_err(|e| {
                Error::data(
                    path,
                    format!("cannot be read at byte {}: {e}", offset + before as u64),
                )
            })?;
        if (n as u64) < want {
            eof = true;
        }
        let valid = match std::str::from_utf8(&pending) {
            Ok(_) => pending.len(),
            // An incomplete character at the end of a block: it completes in the next.
            Err(e) if e.error_len().is_none() && !eof => e.valid_up_to(),
            Err(e) => {
                let at = offset + e.valid_up_to() as u64;
                let msg = match first && eof {
                    true => format!("is not valid UTF-8 (first bad byte at offset {at})"),
                    false => format!(
                        "is not valid UTF-8 at byte offset {at}; the text before it was kept"
                    ),
                };
                bad(path, on_bad, msg, emit)?;
                if !first {
                    emit(Event::Text {
                        text: String::new(),
                        last: true,
                    })?;
                }
                return Ok(());
            }
        };
        // SAFETY-free: checked just above.
        let text = std::str::from_utf8(&pending[..valid]).expect("validated UTF-8");
        let end = match eof && valid == pending.len() {
            true => text.len(),
            false => cut(text),
        };
        let end = if end == 0 && text.len() >= block {
            // No boundary in a whole block: cut anyway, at the last character boundary.
            text.len()
        } else {
            end
        };
        let last = eof && end == pending.len();
        if end > 0 || last {
            emit(Event::Text {
                text: text[..end].to_string(),
                last,
            })?;
            first = false;
        }
        offset += end as u64;
        pending.drain(..end);
        if last {
            return Ok(());
        }
    }
    if !pending.is_empty() || !first {
        let text = String::from_utf8(pending).map_err(|e| Error::data(path, e.to_string()))?;
        emit(Event::Text { text, last: true })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    fn read(path: &Path, on_bad: OnBad) -> Result<Vec<String>> {
        let src = &collect(&[path.to_path_buf()], &[])?[0];
        let mut docs = vec![String::new()];
        let mut emit = |e: Event| {
            match e {
                Event::Text { text, last } => {
                    docs.last_mut().unwrap().push_str(&text);
                    if last {
                        docs.push(String::new());
                    }
                }
                Event::Skipped(why) => docs.push(format!("skipped: {why}")),
            }
            Ok(())
        };
        read_documents(
            src,
            "text",
            on_bad,
            WHOLE_DOCUMENT_BYTES,
            Arc::new(AtomicU64::new(0)),
            &|t: &str| t.len(),
            &mut emit,
        )?;
        docs.retain(|d| !d.is_empty());
        Ok(docs)
    }

    #[test]
    fn folders_globs_and_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("notes/sub")).unwrap();
        std::fs::create_dir_all(d.join("notes/.git")).unwrap();
        for f in [
            "notes/a.md",
            "notes/sub/b.MD",
            "notes/c.png",
            "notes/.git/x.md",
            "notes/d.jsonl.gz",
        ] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        let ext: Vec<String> = DEFAULT_EXTENSIONS.iter().map(|s| s.to_string()).collect();
        let got: Vec<String> = collect(&[d.join("notes")], &ext)
            .unwrap()
            .iter()
            .map(|s| s.path.strip_prefix(d).unwrap().display().to_string())
            .collect();
        assert_eq!(got, ["notes/a.md", "notes/d.jsonl.gz", "notes/sub/b.MD"]);
        let src = collect(&[d.join("notes/d.jsonl.gz")], &ext).unwrap();
        assert!(src[0].jsonl && src[0].gzip);
        let got = collect(&[d.join("notes/*.md"), d.join("notes/a.md")], &ext).unwrap();
        assert_eq!(got.len(), 1, "a file named twice is read once");
        let e = collect(&[d.join("notes")], &["rs".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no input files") && e.contains("notes") && e.contains("rs"),
            "{e}"
        );
        let e = collect(&[d.join("missing.txt")], &ext)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.txt") && e.contains("not found"), "{e}");
    }

    #[test]
    fn jsonl_gz_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl.gz");
        let body = "{\"text\": \"one\"}\n\n{\"text\": \"two\\nlines\"}\n{\"other\": 1}\nnot json\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, body.as_bytes()).unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        let e = read(&p, OnBad::Fail).unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl.gz") && e.contains("line 4 has no string field \"text\""),
            "{e}"
        );
        let docs = read(&p, OnBad::Skip).unwrap();
        assert_eq!(docs[..2], ["one", "two\nlines"]);
        assert!(
            docs[2].contains("line 4") && docs[3].contains("line 5 is not JSON"),
            "{docs:?}"
        );
    }

    #[test]
    fn bad_utf8_names_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.txt");
        std::fs::write(&p, b"hello \xff world").unwrap();
        let e = read(&p, OnBad::Fail).unwrap_err().to_string();
        assert!(
            e.contains("bad.txt") && e.contains("offset 6") && e.contains("--on-bad skip"),
            "{e}"
        );
        let docs = read(&p, OnBad::Skip).unwrap();
        assert_eq!(docs.len(), 1);
        assert!(
            docs[0].starts_with("skipped: is not valid UTF-8"),
            "{docs:?}"
        );
    }
}
