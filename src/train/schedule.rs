//! Learning-rate schedule: linear warm-up, then cosine decay to `min_lr` (as nanoGPT).

use crate::config::TrainingConfig;

/// The learning rate for optimizer step `it` (0-based).
pub fn learning_rate(cfg: &TrainingConfig, it: usize) -> f64 {
    if it < cfg.warmup_iters {
        return cfg.learning_rate * (it + 1) as f64 / (cfg.warmup_iters + 1) as f64;
    }
    if it >= cfg.lr_decay_iters || cfg.lr_decay_iters == cfg.warmup_iters {
        return cfg.min_lr;
    }
    let ratio = (it - cfg.warmup_iters) as f64 / (cfg.lr_decay_iters - cfg.warmup_iters) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let cfg =
            crate::config::Config::parse(include_str!("../../configs/shakespeare-char.toml"), &[])
                .unwrap()
                .training;
        assert!((learning_rate(&cfg, 0) - 1e-3 / 101.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 99) - 1e-3 * 100.0 / 101.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 100) - 1e-3).abs() < 1e-12);
        let mid = (100 + 2000) / 2;
        assert!((learning_rate(&cfg, mid) - (1e-4 + 0.5 * 9e-4)).abs() < 1e-12);
        assert_eq!(learning_rate(&cfg, 2000), 1e-4);
        assert_eq!(learning_rate(&cfg, 5000), 1e-4);
    }
}
