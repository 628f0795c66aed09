//! The optimizer: AdamW with decoupled weight decay, written out so its moments can be
//! checkpointed (candle_nn::AdamW keeps them private), and optionally Muon for the blocks'
//! 2-D weights ([`crate::kernels::muon`]).
//!
//! For each parameter p with gradient g, at step t (PyTorch's AdamW):
//! ```text
//! p ← p · (1 − lr·λ)                       (2-D weight matrices only)
//! m ← β₁·m + (1 − β₁)·g      v ← β₂·v + (1 − β₂)·g²
//! p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//! A Muon parameter keeps its momentum buffer where AdamW keeps m (v stays zero), so
//! checkpoints have the same layout either way; its learning rate is `muon_learning_rate`
//! scaled by the schedule as AdamW's is; its weight decay is AdamW's, p ← p·(1 − lr·λ), so that
//! `weight_decay` means the same with either optimizer.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use rayon::prelude::*;

use super::tensor_update;
use crate::error::Result;
use crate::kernels::adamw::{adamw_update_tensor, sum_of_squares, AdamWStep};
use crate::kernels::muon::{muon_update_tensor, MuonStep};
use crate::kernels::with_f32;
use crate::run::checkpoint::OptimizerState;
use crate::run::config::{OptimizerKind, TrainingConfig};

/// The global L2 norm of `grads` (`None` counts as zero), for gradient clipping. Each
/// gradient's Σg² side by side (most are too small to split), added in order.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    if grads.iter().flatten().any(|g| !g.device().is_cpu()) {
        return device_global_norm(grads);
    }
    let sums = grads
        .par_iter()
        .flatten()
        .map(|g| with_f32(g, "gradient norm", sum_of_squares))
        .collect::<candle_core::Result<Vec<f64>>>()?;
    Ok(sums.iter().sum::<f64>().sqrt())
}

/// [`global_norm`] on a GPU: one device scalar per gradient, added there, one number back.
fn device_global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let sums = grads
        .iter()
        .flatten()
        .map(tensor_update::sum_of_squares)
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
    Ok((total as f64).sqrt())
}

/// One parameter's optimizer slot.
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// Updated by Muon (m is its momentum buffer) instead of AdamW.
    muon: bool,
    moments: Moments,
}

/// A parameter's first and second moments: host vectors for the CPU kernels, or tensors on
/// the parameter's device (a GPU), updated there.
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

impl Moments {
    /// Zeros on the host or (`on_device`) beside `var`.
    fn zeros(var: &Var, on_device: bool) -> Result<Moments> {
        Ok(match on_device {
            false => Moments::Host {
                m: vec![0.0; var.elem_count()],
                v: vec![0.0; var.elem_count()],
            },
            true => Moments::Device {
                m: var.zeros_like()?,
                v: var.zeros_like()?,
            },
        })
    }
}

/// The optimizer over a fixed, named set of parameters: AdamW for each, or Muon for the
/// blocks' 2-D weights when `training.optimizer = "muon"`.
pub struct Optimizer {
    slots: Vec<Slot>,
    step: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// The schedule's peak, to scale Muon's rate by the same factor.
    peak_lr: f64,
    muon_lr: f64,
    muon_momentum: f64,
    muon_momentum_warmup: usize,
}

impl Optimizer {
    /// Zero moments for `vars` (name order fixes the update order). With `cfg.optimizer` =
    /// `muon`, the blocks' 2-D weights (`h.*`) go to Muon.
    pub fn new(
        vars: &std::collections::BTreeMap<String, Var>,
        cfg: &TrainingConfig,
    ) -> Result<Optimizer> {
        let on_device = vars.values().any(|v| !v.device().is_cpu());
        Optimizer::with_moments(vars, cfg, on_device)
    }

    /// [`Optimizer::new`] with the moments as host vectors for the CPU kernels, or
    /// (`on_device`) as tensors updated by tensor ops, the GPU's path.
    fn with_moments(
        vars: &std::collections::BTreeMap<String, Var>,
        cfg: &TrainingConfig,
        on_device: bool,
    ) -> Result<Optimizer> {
        let muon = cfg.optimizer == OptimizerKind::Muon;
        let slots = vars
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    decay: var.rank() >= 2,
                    muon: muon && var.rank() == 2 && name.starts_with("h."),
                    moments: Moments::zeros(var, on_device)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Optimizer {
            slots,
            step: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
            peak_lr: cfg.learning_rate,
            muon_lr: cfg.muon_learning_rate,
            muon_momentum: cfg.muon_momentum,
            muon_momentum_warmup: cfg.muon_momentum_warmup,
        })
    }

    /// Muon's momentum at step `t` (from 1): from 0.85 up to `muon_momentum` over the warm-up.
    fn muon_momentum_at(&self, t: u64) -> f64 {
        if self.muon_momentum_warmup == 0 {
            return self.muon_momentum;
        }
        let f = (t as f64 / self.muon_momentum_warmup as f64).min(1.0);
        (1.0 - f) * 0.85 + f * self.muon_momentum
    }

    /// Names of the parameters, in the order `step` expects their gradients.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Applies one update with gradients `grads` (one per parameter, in [`Optimizer::names`] order;
    /// `None` counts as zero) times `grad_scale` (gradient clipping), at learning rate `lr`.
    /// Parameters are updated in place by the vectorised kernel of [`crate::kernels::adamw`].
    pub fn step(&mut self, grads: &[Option<Tensor>], grad_scale: f32, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let (beta1, beta2, eps, weight_decay) =
            (self.beta1, self.beta2, self.eps, self.weight_decay);
        let muon_lr = self.muon_lr * lr / self.peak_lr;
        let muon = MuonStep {
            lr: muon_lr as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            momentum: self.muon_momentum_at(self.step) as f32,
            grad_scale,
        };
        // The parameters side by side: most are too small to split (a LayerNorm's 128 floats,
        // a 128×128 weight is one task), so one at a time they would run on one core.
        self.slots
            .par_iter_mut()
            .zip(grads.par_iter())
            .try_for_each(|(slot, g)| -> Result<()> {
                let step = AdamWStep {
                    step_size: (lr / bc1) as f32,
                    decay: if slot.decay {
                        (1.0 - lr * weight_decay) as f32
                    } else {
                        1.0
                    },
                    beta1: beta1 as f32,
                    beta2: beta2 as f32,
                    eps: eps as f32,
                    inv_bc2: (1.0 / bc2_sqrt) as f32,
                    grad_scale,
                };
                let param = slot.var.as_tensor();
                match &mut slot.moments {
                    Moments::Device { m, v } => {
                        let g = match g {
                            Some(g) => g.clone(),
                            None => param.zeros_like()?,
                        };
                        match slot.muon {
                            true => tensor_update::muon(&slot.var, &g, m, &muon)?,
                            false => tensor_update::adamw(&slot.var, &g, m, v, &step)?,
                        }
                    }
                    Moments::Host { m, v } => {
                        let zeros = || vec![0.0f32; m.len()];
                        match (slot.muon, g) {
                            (true, Some(g)) => {
                                with_f32(g, "muon", |g| muon_update_tensor(param, g, m, &muon))??
                            }
                            (true, None) => muon_update_tensor(param, &zeros(), m, &muon)?,
                            (false, Some(g)) => with_f32(g, "adamw", |g| {
                                adamw_update_tensor(param, g, m, v, &step)
                            })??,
                            (false, None) => adamw_update_tensor(param, &zeros(), m, v, &step)?,
                        }
                    }
                }
                Ok(())
            })
    }

    /// The moments and step, for `optimizer.safetensors` (on the CPU, whatever the device).
    pub fn state(&self) -> Result<OptimizerState> {
        let mut m = HashMap::new();
        let mut v = HashMap::new();
        for s in &self.slots {
            let (sm, sv) = match &s.moments {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, s.var.shape(), &Device::Cpu)?,
                    Tensor::from_slice(v, s.var.shape(), &Device::Cpu)?,
                ),
                Moments::Device { m, v } => {
                    (m.to_device(&Device::Cpu)?, v.to_device(&Device::Cpu)?)
                }
            };
            m.insert(s.name.clone(), sm);
            v.insert(s.name.clone(), sv);
        }
        Ok(OptimizerState {
            step: self.step,
            m,
            v,
        })
    }

    /// Restores moments and step saved by [`Optimizer::state`] (names already checked by the
    /// loader), onto each parameter's device.
    pub fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        self.step = state.step;
        for s in &mut self.slots {
            if let (Some(m), Some(v)) = (state.m.get(&s.name), state.v.get(&s.name)) {
                s.moments = match &s.moments {
                    Moments::Host { .. } => Moments::Host {
                        m: m.flatten_all()?.to_vec1::<f32>()?,
                        v: v.flatten_all()?.to_vec1::<f32>()?,
                    },
                    Moments::Device { .. } => {
                        let dev = s.var.device();
                        Moments::Device {
                            m: m.reshape(s.var.shape())?.to_device(dev)?,
                            v: v.reshape(s.var.shape())?.to_device(dev)?,
                        }
                    }
                };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn matches_hand_computed_adamw() {
        let dev = Device::Cpu;
        let w = Var::from_vec(vec![1.0f32, -2.0, 0.5, 3.0], (2, 2), &dev).unwrap();
        let b = Var::from_vec(vec![1.0f32, 1.0], 2, &dev).unwrap();
        let vars = BTreeMap::from([("b".to_string(), b.clone()), ("w".to_string(), w.clone())]);
        let cfg = TrainingConfig {
            batch_size: 1,
            max_iters: 1,
            learning_rate: 0.1,
            min_lr: 0.0,
            warmup_iters: 0,
            lr_decay_iters: 1,
            weight_decay: 0.5,
            beta1: 0.9,
            beta2: 0.99,
            grad_clip: 0.0,
            grad_accum_steps: 1,
            eval_interval: 1,
            eval_iters: 1,
            val_fraction: 0.1,
            seed: 0,
            checkpoint_interval: 1,
            recompute_activations: false,
            optimizer: OptimizerKind::Adamw,
            muon_learning_rate: 0.02,
            muon_momentum: 0.95,
            muon_momentum_warmup: 0,
            lr_schedule: Default::default(),
            cooldown_iters: 0,
            engine: Default::default(),
            dtype: Default::default(),
        };
        let mut opt = Optimizer::new(&vars, &cfg).unwrap();
        let grads = [
            Some(Tensor::new(&[0.4f32, -0.8], &dev).unwrap()),
            Some(Tensor::new(&[[2.0f32, 0.0], [-2.0, 4.0]], &dev).unwrap()),
        ]; // b, w (twice the gradient: the step scales them by ½)
        opt.step(&grads, 0.5, 0.1).unwrap();
        // Step 1: m̂ = g, v̂ = g², so the Adam step is lr·sign(g) (up to ε) for g ≠ 0.
        let w = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let decay = 1.0 - 0.1 * 0.5;
        let want = [
            1.0 * decay - 0.1,
            -2.0 * decay,
            0.5 * decay + 0.1,
            3.0 * decay - 0.1,
        ];
        for (g, w) in w.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        // the bias is 1-D: no decay
        let b = b.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (b[0] - 0.9).abs() < 1e-6 && (b[1] - 1.1).abs() < 1e-6,
            "{b:?}"
        );
        // state round trip
        let st = opt.state().unwrap();
        let mut opt2 = Optimizer::new(&vars, &cfg).unwrap();
        opt2.load_state(&st).unwrap();
        assert_eq!(opt2.steps(), 1);
        assert_eq!(host(&opt2.slots[1]).1, host(&opt.slots[1]).1);
    }

    #[test]
    fn muon_momentum_warms_up_from_0_85() {
        let mut cfg = crate::run::config::Config::parse(
            include_str!("../../configs/shakespeare-char.toml"),
            &["training.muon_momentum_warmup=10".into()],
        )
        .unwrap()
        .training;
        let opt = Optimizer::new(&BTreeMap::new(), &cfg).unwrap();
        let at = |t| opt.muon_momentum_at(t);
        assert!((at(0) - 0.85).abs() < 1e-12);
        assert!((at(5) - 0.90).abs() < 1e-12);
        assert!((at(10) - 0.95).abs() < 1e-12 && (at(500) - 0.95).abs() < 1e-12);
        cfg.muon_momentum_warmup = 0;
        assert_eq!(
            Optimizer::new(&BTreeMap::new(), &cfg)
                .unwrap()
                .muon_momentum_at(1),
            0.95
        );
    }

    #[test]
    fn muon_takes_the_blocks_matrices_and_adamw_the_rest() {
        let dev = Device::Cpu;
        let var = |v: Vec<f32>, shape: (usize, usize)| Var::from_vec(v, shape, &dev).unwrap();
        let h = var((0..12).map(|i| (i as f32 * 0.4).sin()).collect(), (4, 3));
        let wte = var((0..12).map(|i| (i as f32 * 0.9).cos()).collect(), (4, 3));
        let vars = BTreeMap::from([
            ("h.0.mlp.c_fc.weight".to_string(), h.clone()),
            ("wte.weight".to_string(), wte.clone()),
        ]);
        let mut cfg = crate::run::config::Config::parse(
            include_str!("../../configs/shakespeare-char.toml"),
            &[
                "training.optimizer=\"muon\"".into(),
                "training.weight_decay=0".into(),
            ],
        )
        .unwrap()
        .training;
        cfg.muon_momentum = 0.5;
        let mut opt = Optimizer::new(&vars, &cfg).unwrap();
        let g: Vec<f32> = (0..12).map(|i| (i as f32 * 0.3).cos()).collect();
        let gt = Tensor::from_vec(g.clone(), (4, 3), &dev).unwrap();
        let (h0, w0) = (values(&h), values(&wte));
        // At half the peak learning rate, Muon's rate is halved too.
        opt.step(&[Some(gt.clone()), Some(gt)], 1.0, cfg.learning_rate / 2.0)
            .unwrap();
        let u: Vec<f32> = g.iter().map(|&g| 0.5 * g + 0.5 * (0.5 * g)).collect();
        let o = crate::kernels::muon::orthogonalize(&u, 4, 3);
        let step = 0.01f32 * (4.0f32 / 3.0).sqrt();
        for ((&a, &b), &o) in values(&h).iter().zip(&h0).zip(&o) {
            assert!(
                (a - (b - step * o)).abs() < 1e-6,
                "muon: {a} vs {}",
                b - step * o
            );
        }
        // AdamW's first step is ±lr for the embedding.
        for ((&a, &b), &g) in values(&wte).iter().zip(&w0).zip(&g) {
            let want = b - (cfg.learning_rate / 2.0) as f32 * g.signum();
            assert!((a - want).abs() < 1e-6, "adamw: {a} vs {want}");
        }
    }

    fn host(slot: &Slot) -> (Vec<f32>, Vec<f32>) {
        match &slot.moments {
            Moments::Host { m, v } => (m.clone(), v.clone()),
            Moments::Device { m, v } => (
                m.flatten_all().unwrap().to_vec1().unwrap(),
                v.flatten_all().unwrap().to_vec1().unwrap(),
            ),
        }
    }

    /// The GPU's path (moments as tensors, updates as tensor ops), run here on the CPU, takes
    /// the same steps as the CPU kernels, AdamW and Muon alike, and saves the same state.
    #[test]
    fn the_tensor_path_matches_the_kernels() {
        let dev = Device::Cpu;
        for optimizer in ["adamw", "muon"] {
            let make = || {
                let var = |n: usize, shape: &[usize], k: f32| {
                    let v: Vec<f32> = (0..n).map(|i| ((i as f32 + k) * 0.37).sin()).collect();
                    Var::from_vec(v, shape, &dev).unwrap()
                };
                BTreeMap::from([
                    ("h.0.mlp.c_fc.weight".to_string(), var(24, &[6, 4], 0.0)),
                    ("h.0.ln_1.weight".to_string(), var(4, &[4], 1.0)),
                    ("wte.weight".to_string(), var(12, &[3, 4], 2.0)),
                ])
            };
            let cfg = crate::run::config::Config::parse(
                include_str!("../../configs/shakespeare-char.toml"),
                &[format!("training.optimizer=\"{optimizer}\"")],
            )
            .unwrap()
            .training;
            let (va, vb) = (make(), make());
            let mut a = Optimizer::with_moments(&va, &cfg, false).unwrap();
            let mut b = Optimizer::with_moments(&vb, &cfg, true).unwrap();
            for step in 0..4 {
                let grads: Vec<Option<Tensor>> = va
                    .values()
                    .enumerate()
                    .map(|(i, v)| {
                        let n = v.elem_count();
                        let g: Vec<f32> = (0..n)
                            .map(|j| ((j * 7 + i * 3 + step) as f32 * 0.91).cos())
                            .collect();
                        // One parameter without a gradient at step 2: zeros on both paths.
                        (step != 2 || i != 1).then(|| Tensor::from_vec(g, v.shape(), &dev).unwrap())
                    })
                    .collect();
                let (na, nb) = (
                    global_norm(&grads).unwrap(),
                    device_global_norm(&grads).unwrap(),
                );
                assert!((na - nb).abs() < 1e-5 * na, "{na} vs {nb}");
                a.step(&grads, 0.7, 1e-2).unwrap();
                b.step(&grads, 0.7, 1e-2).unwrap();
            }
            for ((name, x), y) in va.iter().zip(vb.values()) {
                for (p, q) in values(x).iter().zip(values(y)) {
                    assert!((p - q).abs() < 1e-5, "{optimizer} {name}: {p} vs {q}");
                }
            }
            let (sa, sb) = (a.state().unwrap(), b.state().unwrap());
            for name in va.keys() {
                let m =
                    |s: &OptimizerState| s.m[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (p, q) in m(&sa).iter().zip(m(&sb)) {
                    assert!((p - q).abs() < 1e-5, "{optimizer} {name} m: {p} vs {q}");
                }
            }
            // The device path restores its state as tensors.
            let mut c = Optimizer::with_moments(&make(), &cfg, true).unwrap();
            c.load_state(&sb).unwrap();
            assert_eq!(host(&c.slots[0]), host(&b.slots[0]));
            assert_eq!(c.steps(), 4);
        }
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }
}
