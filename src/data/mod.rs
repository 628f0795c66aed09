//! Text in, token ids out: the tokenizers, a corpus as training batches, token shards on
//! disk, and `prepare`, which streams any pile of text into shards.
//!
//! [`tokenizer`] (characters or byte-level BPE) → [`corpus`] (a tokenized text split into
//! train and validation, sampled as `(B, T)` batches) ← [`shards`] (the same ids read from
//! disk by position) ← [`prepare`] (files, folders, `.gz` and JSON Lines tokenized on every
//! core into shards). Nothing here knows of the model.

pub mod corpus;
pub mod prepare;
pub mod shards;
pub mod tokenizer;
