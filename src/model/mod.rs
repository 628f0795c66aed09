//! The reference model, written to be read: it maps token ids to logits (and, on request,
//! attention weights) with candle's composed ops, and knows nothing of training, files, the
//! terminal or the fused kernels. [`crate::engine`] runs it, or a fused copy of it.

pub mod attention;
pub mod block;
pub mod config;
pub mod gpt;
pub mod hooks;
pub mod kv_cache;
pub mod layers;
pub mod params;
pub mod precision;
pub mod rope;

pub use attention::{Head, MultiHeadAttention};
pub use config::ModelConfig;
pub use gpt::Gpt;
pub use hooks::{HeadPatch, Hooks, Trace};
pub use kv_cache::KvCache;
pub use layers::{Linear, Norm};
pub use params::{Init, Params, VarBuilder};
pub use precision::{autocast, Precision};
