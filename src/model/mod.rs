//! The network itself. It knows nothing of training, files or the terminal: it maps token ids
//! to logits (and, on request, attention weights).

pub mod attention;
pub mod block;
pub mod config;
pub mod decoder;
pub mod gpt;
pub mod kv_cache;
pub mod layers;
pub mod params;
pub mod recompute;

pub use attention::{Head, MultiHeadAttention};
pub use config::ModelConfig;
pub use decoder::Decoder;
pub use gpt::Gpt;
pub use kv_cache::KvCache;
pub use layers::{LayerNorm, Linear};
pub use params::{Init, Params};
