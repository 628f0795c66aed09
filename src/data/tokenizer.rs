//! Text ⇄ token ids. Two kinds behind one type, both stored as a Hugging Face `tokenizer.json`
//! that the `tokenizers` library (Rust or Python) loads as is:
//!
//! - **char**: one token per distinct character of the corpus, ids in sorted character order. It is
//!   written as the library's BPE model with the characters as vocabulary, no merges and a `Fuse`
//!   decoder (without a decoder, decode would join tokens with spaces).
//! - **bpe**: byte-level BPE trained on the corpus with the library's trainer; any UTF-8 text
//!   encodes, and decode(encode(s)) == s.
//!
//! The library silently drops characters a char vocabulary does not know, so [`Tokenizer::encode`]
//! checks every character itself and names the first unknown one.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, PreTokenizerWrapper, TokenizerBuilder};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Tokenizer kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per distinct character of the corpus.
    Char,
    /// Byte-level BPE trained on the corpus.
    Bpe,
}

impl TokenizerKind {
    /// `char` or `bpe`, as configs spell it.
    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Char => "char",
            TokenizerKind::Bpe => "bpe",
        }
    }
}

/// Special tokens of the BPE vocabulary. The char tokenizer has none: its vocabulary is exactly
/// the corpus's characters.
pub const SPECIAL_TOKENS: [&str; 1] = ["<|endoftext|>"];

type HfDecodeStream<'a> = tokenizers::DecodeStream<
    'a,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// A trained tokenizer of either kind.
#[derive(Clone)]
pub struct Tokenizer {
    kind: TokenizerKind,
    inner: tokenizers::Tokenizer,
    /// For `char`: the vocabulary as a map, to encode corpora fast and to name unknown characters.
    char_ids: HashMap<char, u32>,
    /// For `char`: ids of ASCII characters by code (`u32::MAX` when absent), the fast path.
    ascii_ids: [u32; 128],
    /// The byte-level BPE encoder without the tokenizers crate's per-word bookkeeping, when the
    /// tokenizer is one it reproduces exactly.
    fast_bpe: Option<std::sync::Arc<FastBpe>>,
}

/// GPT-2's pre-tokenizer pattern, as the tokenizers crate's byte-level pre-tokenizer has it.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Byte-level BPE encoding as the tokenizers crate does it (the same split, the same merges),
/// without its offset bookkeeping, which allocates for every word and takes most of the time
/// on large corpora; each thread keeps the ids of the words it has seen.
struct FastBpe {
    split: fancy_regex::Regex,
    byte_chars: [char; 256],
    /// Tells this tokenizer's cache entries from another's on the same thread.
    id: u64,
}

thread_local! {
    static WORD_IDS: std::cell::RefCell<HashMap<u64, HashMap<String, Vec<u32>>>> =
        std::cell::RefCell::new(HashMap::new());
}

impl FastBpe {
    /// For a tokenizer whose ids it reproduces: a byte-level pre-tokenizer with GPT-2's
    /// split and no prefix space, no normalizer, a plain BPE model.
    fn for_tokenizer(inner: &tokenizers::Tokenizer) -> Option<FastBpe> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let Some(PreTokenizerWrapper::ByteLevel(bl)) = inner.get_pre_tokenizer() else {
            return None;
        };
        let tokenizers::ModelWrapper::BPE(bpe) = inner.get_model() else {
            return None;
        };
        let plain = bpe.dropout.is_none()
            && bpe.continuing_subword_prefix.is_none()
            && bpe.end_of_word_suffix.is_none()
            && !bpe.byte_fallback
            && !bpe.ignore_merges;
        if bl.add_prefix_space || !bl.use_regex || inner.get_normalizer().is_some() || !plain {
            return None;
        }
        Some(FastBpe {
            split: fancy_regex::Regex::new(GPT2_SPLIT).ok()?,
            byte_chars: byte_chars(),
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// The ids of `text`, which holds no special token.
    fn encode(&self, model: &BPE, text: &str) -> Result<Vec<u32>> {
        use tokenizers::Model;
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        WORD_IDS.with(|cell| -> Result<()> {
            let mut caches = cell.borrow_mut();
            let cache = caches.entry(self.id).or_default();
            let mut word = |piece: &str, out: &mut Vec<u32>| -> Result<()> {
                if let Some(ids) = cache.get(piece) {
                    out.extend_from_slice(ids);
                    return Ok(());
                }
                let mapped: String = piece.bytes().map(|b| self.byte_chars[b as usize]).collect();
                let tokens = model.tokenize(&mapped).map_err(tk_err)?;
                let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
                out.extend_from_slice(&ids);
                if cache.len() >= 1 << 20 {
                    cache.clear();
                }
                cache.insert(piece.to_string(), ids);
                Ok(())
            };
            let mut last = 0;
            for m in self.split.find_iter(text) {
                let m = m.map_err(tk_err)?;
                if m.start() > last {
                    word(&text[last..m.start()], &mut out)?;
                }
                word(m.as_str(), &mut out)?;
                last = m.end();
            }
            if last < text.len() {
                word(&text[last..], &mut out)?;
            }
            Ok(())
        })?;
        Ok(out)
    }
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// A char-level tokenizer over the distinct characters of `text`, sorted.
    pub fn train_char(text: &str) -> Result<Tokenizer> {
        let chars: Vec<char> = char_chunks(text, 1 << 22)
            .par_iter()
            .map(|chunk| {
                let mut ascii = [false; 128];
                let mut other = std::collections::BTreeSet::new();
                for c in chunk.chars() {
                    if c.is_ascii() {
                        ascii[c as usize] = true;
                    } else {
                        other.insert(c);
                    }
                }
                (0u8..128)
                    .filter(|&b| ascii[b as usize])
                    .map(char::from)
                    .chain(other)
                    .collect::<std::collections::BTreeSet<char>>()
            })
            .reduce(std::collections::BTreeSet::new, |mut a, b| {
                a.extend(b);
                a
            })
            .into_iter()
            .collect();
        if chars.is_empty() {
            return Err(Error::Tokenizer(
                "cannot build a vocabulary from empty text".into(),
            ));
        }
        let vocab: serde_json::Map<String, serde_json::Value> = chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), serde_json::Value::from(i as u32)))
            .collect();
        // The library's own JSON form: a BPE model over the characters, no merges, Fuse decoder.
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": []
            }
        });
        Self::from_json(&json.to_string())
    }

    /// A byte-level BPE with `vocab_size` tokens (bytes, merges and special tokens) trained on `text`.
    pub fn train_bpe(text: &str, vocab_size: usize) -> Result<Tokenizer> {
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(
                SPECIAL_TOKENS
                    .iter()
                    .map(|t| AddedToken::from(t.to_string(), true))
                    .collect(),
            )
            .build();
        let byte_level = ByteLevel::new(false, false, true);
        let mut tk = TokenizerBuilder::<
            BPE,
            tokenizers::NormalizerWrapper,
            ByteLevel,
            tokenizers::PostProcessorWrapper,
            ByteLevelDecoder,
        >::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(byte_level))
        .build()
        .map_err(tk_err)?;
        tk.train(&mut trainer, text.split_inclusive('\n'))
            .map_err(tk_err)?;
        let json = tk.to_string(false).map_err(tk_err)?;
        Self::from_json(&json)
    }

    /// Trains the tokenizer of the given kind on `text`.
    pub fn train(kind: TokenizerKind, text: &str, vocab_size: usize) -> Result<Tokenizer> {
        match kind {
            TokenizerKind::Char => Self::train_char(text),
            TokenizerKind::Bpe => Self::train_bpe(text, vocab_size),
        }
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Tokenizer> {
        let kind = match inner.get_pre_tokenizer() {
            Some(PreTokenizerWrapper::ByteLevel(_)) => TokenizerKind::Bpe,
            None => TokenizerKind::Char,
            Some(_) => {
                return Err(Error::Tokenizer(
                    "unsupported pre-tokenizer: tinygpt reads its own char and byte-level BPE tokenizers".into(),
                ))
            }
        };
        let char_ids = if kind == TokenizerKind::Char {
            let mut map = HashMap::new();
            for (tok, id) in inner.get_vocab(false) {
                let mut it = tok.chars();
                match (it.next(), it.next()) {
                    (Some(c), None) => {
                        map.insert(c, id);
                    }
                    _ => {
                        return Err(Error::Tokenizer(format!(
                            "char vocabulary entry {tok:?} (id {id}) is not a single character"
                        )))
                    }
                }
            }
            map
        } else {
            HashMap::new()
        };
        let mut ascii_ids = [u32::MAX; 128];
        for (&c, &id) in &char_ids {
            if c.is_ascii() {
                ascii_ids[c as usize] = id;
            }
        }
        let fast_bpe = match kind {
            TokenizerKind::Bpe => FastBpe::for_tokenizer(&inner).map(std::sync::Arc::new),
            TokenizerKind::Char => None,
        };
        Ok(Tokenizer {
            kind,
            inner,
            char_ids,
            ascii_ids,
            fast_bpe,
        })
    }

    /// Reads a `tokenizer.json` from text.
    pub fn from_json(json: &str) -> Result<Tokenizer> {
        // Check the JSON syntax first: the tokenizers library panics (instead of erring) on some
        // malformed documents, e.g. one cut off inside "decoder" (found by tests/fuzz.rs).
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::Tokenizer(format!("not valid JSON: {e}")))?;
        let inner: tokenizers::Tokenizer = serde_json::from_value(value).map_err(tk_err)?;
        Self::from_inner(inner)
    }

    /// Reads a `tokenizer.json` file.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let json = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&json).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// The `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tk_err)
    }

    /// `char` or `bpe`.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Number of token ids, special tokens included: the rows of the embedding table.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`. For `char`, a character outside the vocabulary is an error that names
    /// it and its position.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self.kind {
            TokenizerKind::Char => self.encode_chars(text),
            TokenizerKind::Bpe => match (&self.fast_bpe, self.inner.get_model()) {
                (Some(fast), tokenizers::ModelWrapper::BPE(model))
                    if !SPECIAL_TOKENS.iter().any(|t| text.contains(t)) =>
                {
                    fast.encode(model, text)
                }
                _ => self.encode_slow(text),
            },
        }
    }

    /// The tokenizers crate's own encoding (the fast path's reference).
    pub fn encode_slow(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    fn encode_chars(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len());
        for (pos, c) in text.chars().enumerate() {
            let id = if c.is_ascii() {
                Some(self.ascii_ids[c as usize]).filter(|&i| i != u32::MAX)
            } else {
                self.char_ids.get(&c).copied()
            };
            match id {
                Some(id) => ids.push(id),
                None => {
                    return Err(Error::Tokenizer(format!(
                        "unknown character {c:?} (U+{:04X}) at position {pos}: the char vocabulary was built from the training corpus and does not contain it",
                        c as u32
                    )))
                }
            }
        }
        Ok(ids)
    }

    /// Pieces of `text` of about `target` bytes that encode independently: for `char`, any
    /// character boundary; for byte-level BPE, only where the pre-tokenizer splits anyway (after
    /// a newline that follows a non-space and precedes a letter), so that the ids of the pieces,
    /// concatenated, equal `encode(text)`.
    pub fn corpus_chunks<'t>(&self, text: &'t str, target: usize) -> Vec<&'t str> {
        match self.kind {
            TokenizerKind::Char => char_chunks(text, target),
            TokenizerKind::Bpe => split_for_bpe(text, target),
        }
    }

    /// The end of the longest prefix of `text` that encodes the same alone as followed by the
    /// rest (so a stream can be encoded piece by piece): all of it for `char`; for byte-level
    /// BPE, just after the last newline that follows a non-space and precedes a letter (0 when
    /// there is none).
    pub fn safe_cut(&self, text: &str) -> usize {
        if self.kind == TokenizerKind::Char {
            return text.len();
        }
        let b = text.as_bytes();
        (1..b.len().saturating_sub(1))
            .rev()
            .find(|&i| {
                b[i] == b'\n'
                    && text[..i]
                        .chars()
                        .next_back()
                        .is_some_and(|c| !c.is_whitespace())
                    && text[i + 1..]
                        .chars()
                        .next()
                        .is_some_and(char::is_alphabetic)
            })
            .map_or(0, |i| i + 1)
    }

    /// The token that ends a document in a prepared corpus: `<|endoftext|>` for BPE, a newline
    /// for char (when the vocabulary has one).
    pub fn end_of_document(&self) -> Option<u32> {
        match self.kind {
            TokenizerKind::Char => self.newline_id(),
            TokenizerKind::Bpe => self.inner.token_to_id(SPECIAL_TOKENS[0]),
        }
    }

    /// The text of `ids`; special tokens are left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        self.inner.decode(ids, true).map_err(tk_err)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let n = self.vocab_size() as u32;
        if let Some(&bad) = ids.iter().find(|&&i| i >= n) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {n} tokens"
            )));
        }
        Ok(())
    }

    /// How one token reads on its own (byte-level BPE tokens that are parts of a multi-byte
    /// character show as their bytes, e.g. `<0xE2>`).
    pub fn token_text(&self, id: u32) -> String {
        match self.kind {
            TokenizerKind::Char => self.inner.id_to_token(id).unwrap_or_default(),
            TokenizerKind::Bpe => {
                if let Some(tok) = self.inner.id_to_token(id) {
                    if SPECIAL_TOKENS.contains(&tok.as_str()) {
                        return tok;
                    }
                }
                match self.inner.decode(&[id], false) {
                    Ok(s) if !s.contains('\u{FFFD}') => s,
                    _ => {
                        // Show the raw bytes of a partial character.
                        let tok = self.inner.id_to_token(id).unwrap_or_default();
                        let bytes = byte_level_bytes(&tok);
                        bytes.iter().map(|b| format!("<0x{b:02X}>")).collect()
                    }
                }
            }
        }
    }

    /// The vocabulary's string for `id` (byte-level BPE tokens in [`byte_chars`]' alphabet).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The ids of the special tokens (`<|endoftext|>`), which text never encodes to.
    pub fn special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// A decoder for streaming: feed ids one at a time, get text as soon as it is whole UTF-8.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            inner: self.inner.decode_stream(true),
        }
    }

    /// The token id of a newline, if the vocabulary has one: where an empty prompt starts.
    pub fn newline_id(&self) -> Option<u32> {
        match self.kind {
            TokenizerKind::Char => self.char_ids.get(&'\n').copied(),
            TokenizerKind::Bpe => self
                .encode("\n")
                .ok()
                .and_then(|v| (v.len() == 1).then(|| v[0])),
        }
    }

    /// How many bytes of UTF-8 text token `id` stands for: a char token's character, a
    /// byte-level BPE token's bytes; 0 for a special token. Bits per byte divide by their sum.
    pub fn token_bytes(&self, id: u32) -> usize {
        let tok = self.inner.id_to_token(id).unwrap_or_default();
        match self.kind {
            TokenizerKind::Char => tok.len(),
            TokenizerKind::Bpe if SPECIAL_TOKENS.contains(&tok.as_str()) => 0,
            TokenizerKind::Bpe => byte_level_bytes(&tok).len(),
        }
    }
}

/// Streaming decoder returned by [`Tokenizer::stream`].
pub struct TextStream<'a> {
    inner: HfDecodeStream<'a>,
}

impl TextStream<'_> {
    /// Text that `id` completes, if any (a byte-level token may end mid-character).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).map_err(tk_err)
    }
}

/// GPT-2's byte → printable-character mapping, which byte-level BPE vocabularies are written
/// in: printable Latin-1 bytes stand for themselves, the other 68 for U+0100 onwards in order.
/// (The tokenizers crate keeps its copy private.)
pub fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        *slot = char::from_u32(c).unwrap_or('\0');
    }
    table
}

/// The bytes a byte-level token stands for ([`byte_chars`], inverted).
fn byte_level_bytes(token: &str) -> Vec<u8> {
    let table: HashMap<char, u8> = byte_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    token
        .chars()
        .filter_map(|c| table.get(&c).copied())
        .collect()
}

/// Cuts `text` into chunks of about `target` bytes at character boundaries.
fn char_chunks(text: &str, target: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + target).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(&text[start..end]);
        start = end;
    }
    out
}

/// Cuts `text` into chunks of about `target` bytes at boundaries where the byte-level
/// pre-tokenizer splits anyway, so encoding the chunks separately equals encoding the whole.
fn split_for_bpe(text: &str, target: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        let mut cut = None;
        let from = start + target;
        let bytes = text.as_bytes();
        let mut i = from;
        while i < text.len() {
            if bytes[i] == b'\n' && i > 0 {
                let prev_ok = !text[..i]
                    .chars()
                    .next_back()
                    .map(char::is_whitespace)
                    .unwrap_or(true);
                let next_ok = text[i + 1..]
                    .chars()
                    .next()
                    .map(char::is_alphabetic)
                    .unwrap_or(false);
                if prev_ok && next_ok {
                    cut = Some(i + 1);
                    break;
                }
            }
            i += 1;
        }
        match cut {
            Some(c) => {
                out.push(&text[start..c]);
                start = c;
            }
            None => break,
        }
    }
    out.push(&text[start..]);
    out
}

/// How text becomes token ids: the `[tokenizer]` table of a run's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// `char` or `bpe`.
    pub kind: TokenizerKind,
    /// Target vocabulary size for `bpe` (ignored for `char`).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
}

fn default_vocab_size() -> usize {
    1024
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast byte-level BPE encoder gives the tokenizers crate's own ids, on text and on
    /// random strings from an alphabet of the pattern's corner cases (contractions, runs of
    /// mixed whitespace, digits, marks, emoji, the special token).
    #[test]
    fn the_fast_bpe_encoder_gives_the_tokenizers_crate_ids() {
        use proptest::prelude::*;
        let text: String =
            TEXT.repeat(30) + "It's 2026: we'll've 3.14 words,  \n\n  and  \t\r\n spaces ";
        let tok = Tokenizer::train_bpe(&text, 320).unwrap();
        assert!(tok.fast_bpe.is_some());
        assert_eq!(tok.encode(&text).unwrap(), tok.encode_slow(&text).unwrap());
        let with_special = "a <|endoftext|> b";
        assert_eq!(
            tok.encode(with_special).unwrap(),
            tok.encode_slow(with_special).unwrap()
        );
        let alphabet: Vec<char> =
            "aZeé ü\n\t\r  '’sltmdrvSLT0123٣!?.,—🙂ß\u{0301}\u{00a0}\u{2003}日語"
                .chars()
                .collect();
        let strings = proptest::collection::vec(proptest::sample::select(alphabet), 0..40)
            .prop_map(|v| v.into_iter().collect::<String>());
        proptest!(ProptestConfig::with_cases(2000), |(s in strings)| {
            prop_assert_eq!(tok.encode(&s).unwrap(), tok.encode_slow(&s).unwrap(), "{:?}", s);
        });
    }

    const TEXT: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n  Ünïcödé — “quotes” ✓ 日本語 🎭\n";

    #[test]
    fn char_round_trip_and_sorted_vocab() {
        let tk = Tokenizer::train_char(TEXT).unwrap();
        assert_eq!(tk.kind(), TokenizerKind::Char);
        let ids = tk.encode(TEXT).unwrap();
        assert_eq!(ids.len(), TEXT.chars().count());
        assert_eq!(tk.decode(&ids).unwrap(), TEXT);
        // ids follow sorted character order
        assert_eq!(tk.encode("\n").unwrap(), vec![0]);
        let mut sorted: Vec<char> = TEXT.chars().collect();
        sorted.sort();
        sorted.dedup();
        assert_eq!(tk.vocab_size(), sorted.len());
        assert_eq!(tk.encode("🎭").unwrap(), vec![sorted.len() as u32 - 1]);
        // the saved JSON loads as the same tokenizer
        let again = Tokenizer::from_json(&tk.to_json().unwrap()).unwrap();
        assert_eq!(again.encode(TEXT).unwrap(), ids);
        assert_eq!(again.kind(), TokenizerKind::Char);
        // the library's own encode agrees with the fast path
        let hf = tk.inner.encode(TEXT, false).unwrap().get_ids().to_vec();
        assert_eq!(hf, ids);
    }

    #[test]
    fn truncated_json_is_an_error_not_a_panic() {
        // Regression from tests/fuzz.rs: the library panicked on a document cut off inside
        // "decoder".
        let json = Tokenizer::train_char("abc").unwrap().to_json().unwrap();
        let at = json.find("\"decoder\"").unwrap() + 14;
        let e = Tokenizer::from_json(&json[..at]).err().unwrap().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        for n in 0..json.len() {
            assert!(Tokenizer::from_json(&json[..n]).is_err());
        }
    }

    #[test]
    fn char_unknown_character_is_named() {
        let tk = Tokenizer::train_char("abc").unwrap();
        let e = tk.encode("abz").unwrap_err().to_string();
        assert!(e.contains("'z'") && e.contains("position 2"), "{e}");
    }

    #[test]
    fn bpe_round_trips_any_utf8() {
        let corpus = TEXT.repeat(20);
        let tk = Tokenizer::train_bpe(&corpus, 300).unwrap();
        assert_eq!(tk.kind(), TokenizerKind::Bpe);
        assert!(
            tk.vocab_size() <= 300 && tk.vocab_size() > 257,
            "{}",
            tk.vocab_size()
        );
        let unseen = "Zebra-Ωmega \u{1F600}\t\r\n  x  \n\nçà";
        for s in [TEXT, unseen, ""] {
            let ids = tk.encode(s).unwrap();
            assert_eq!(tk.decode(&ids).unwrap(), s);
        }
        // merges compress the training text
        let n = tk.encode(TEXT).unwrap().len();
        assert!(
            n * 10 < TEXT.len() * 8,
            "{n} tokens for {} bytes",
            TEXT.len()
        );
        let again = Tokenizer::from_json(&tk.to_json().unwrap()).unwrap();
        assert_eq!(again.encode(unseen).unwrap(), tk.encode(unseen).unwrap());
        assert_eq!(again.kind(), TokenizerKind::Bpe);
    }

    #[test]
    fn bpe_chunked_corpus_encoding_equals_whole() {
        let corpus = TEXT.repeat(50);
        let tk = Tokenizer::train_bpe(&corpus, 300).unwrap();
        let chunks = split_for_bpe(&corpus, 300);
        assert!(chunks.len() > 5);
        assert_eq!(chunks.concat(), corpus);
        let whole = tk.encode(&corpus).unwrap();
        let parts: Vec<u32> = chunks.iter().flat_map(|c| tk.encode(c).unwrap()).collect();
        assert_eq!(parts, whole);
    }

    #[test]
    fn stream_decoding_waits_for_whole_characters() {
        let corpus = TEXT.repeat(5);
        let tk = Tokenizer::train_bpe(&corpus, 260).unwrap();
        let s = "日本語 🎭 ok";
        let ids = tk.encode(s).unwrap();
        let mut st = tk.stream();
        let mut out = String::new();
        for id in ids {
            if let Some(t) = st.step(id).unwrap() {
                assert!(!t.contains('\u{FFFD}'));
                out.push_str(&t);
            }
        }
        assert_eq!(out, s);
        let b = tk.encode("日").unwrap();
        assert!(tk.token_text(b[0]).starts_with("<0x"));
    }

    #[test]
    fn token_bytes_add_up_to_the_text() {
        let text = "naïve café — ünïcödé text, twice: naïve café — ünïcödé text\n";
        for tk in [
            Tokenizer::train(TokenizerKind::Char, text, 0).unwrap(),
            Tokenizer::train(TokenizerKind::Bpe, text, 300).unwrap(),
        ] {
            let ids = tk.encode(text).unwrap();
            let bytes: usize = ids.iter().map(|&i| tk.token_bytes(i)).sum();
            assert_eq!(bytes, text.len(), "{:?}", tk.kind());
        }
    }
}
