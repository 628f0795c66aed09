//! The KV cache for incremental decoding: each layer's keys and values of the tokens seen so
//! far, so that a new token costs one row of attention instead of a whole forward pass.

use super::config::ModelConfig;

/// One candle-nn KV cache per layer, `(B, n_head, T, hs)` (a lone head: `(B, T, hs)`), plus
/// how many positions they cover.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<candle_nn::kv_cache::KvCache>,
    pub(crate) len: usize,
    /// Each sequence's last token, the previous token of the next one (bigram features).
    pub(crate) last: Option<Vec<u32>>,
}

impl KvCache {
    /// An empty cache for a model of shape `cfg`.
    pub fn new(cfg: &ModelConfig) -> KvCache {
        let time_dim = if cfg.n_head == 1 { 1 } else { 2 };
        let layer = candle_nn::kv_cache::KvCache::new(time_dim, cfg.block_size);
        KvCache {
            layers: vec![layer; cfg.n_layer],
            len: 0,
            last: None,
        }
    }

    /// Positions cached so far: the next token's position.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything (e.g. when the context window slides).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| l.reset());
        self.len = 0;
        self.last = None;
    }
}
