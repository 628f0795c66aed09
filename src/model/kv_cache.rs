//! The KV cache for incremental decoding: each layer's keys and values of the tokens seen so
//! far, so that a new token costs one row of attention instead of a whole forward pass.

use super::attention::LayerKv;

/// Keys and values per layer, `(B, n_head, T, hs)` each, plus how many positions they cover.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) len: usize,
}

impl KvCache {
    /// An empty cache for a model of `n_layer` blocks.
    pub fn new(n_layer: usize) -> KvCache {
        KvCache {
            layers: vec![None; n_layer],
            len: 0,
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
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}
