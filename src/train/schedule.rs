//! Learning-rate schedules: linear warm-up, then cosine decay to `min_lr` (as nanoGPT), or
//! warm-up, stable, decay (the peak held, then a linear cooldown to `min_lr`).

use crate::run::config::{LrSchedule, TrainingConfig};

/// The learning rate for optimizer step `it` (0-based).
pub fn learning_rate(cfg: &TrainingConfig, it: usize) -> f64 {
    if it < cfg.warmup_iters {
        return cfg.learning_rate * (it + 1) as f64 / (cfg.warmup_iters + 1) as f64;
    }
    if it >= cfg.lr_decay_iters || cfg.lr_decay_iters == cfg.warmup_iters {
        return cfg.min_lr;
    }
    if cfg.lr_schedule == LrSchedule::Wsd {
        let start = cfg.lr_decay_iters - cfg.cooldown_iters;
        if it < start {
            return cfg.learning_rate;
        }
        let done = (it - start) as f64 / cfg.cooldown_iters as f64;
        return cfg.learning_rate + done * (cfg.min_lr - cfg.learning_rate);
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
        let cfg = crate::run::config::Config::parse(
            include_str!("../../configs/shakespeare-char.toml"),
            &[],
        )
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

    #[test]
    fn warmup_stable_decay() {
        let over = [
            "training.lr_schedule=\"wsd\"".to_string(),
            "training.cooldown_iters=400".to_string(),
        ];
        let cfg = crate::run::config::Config::parse(
            include_str!("../../configs/shakespeare-char.toml"),
            &over,
        )
        .unwrap()
        .training;
        assert!((learning_rate(&cfg, 0) - 1e-3 / 101.0).abs() < 1e-12);
        assert_eq!(learning_rate(&cfg, 100), 1e-3);
        assert_eq!(learning_rate(&cfg, 1599), 1e-3);
        assert_eq!(learning_rate(&cfg, 1600), 1e-3);
        assert!((learning_rate(&cfg, 1800) - (1e-3 - 0.5 * 9e-4)).abs() < 1e-12);
        assert!((learning_rate(&cfg, 1999) - (1e-4 + 9e-4 / 400.0)).abs() < 1e-12);
        assert_eq!(learning_rate(&cfg, 2000), 1e-4);
        let bad = [over[0].clone(), "training.cooldown_iters=1901".to_string()];
        let err = crate::run::config::Config::parse(
            include_str!("../../configs/shakespeare-char.toml"),
            &bad,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("training.cooldown_iters = 1901") && err.contains("1900"),
            "{err}"
        );
    }
}
