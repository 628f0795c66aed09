//! Where the model's weights come from: freshly initialised from the run's seed, or taken from
//! a checkpoint's tensors. Layers ask for their weights by name (`h.0.attn.w_q.weight`), so the
//! nesting of the constructors *is* the checkpoint's naming scheme, and a loaded file is checked
//! name by name, shape by shape.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// How a fresh weight is initialised.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Normal(0, std): GPT-2 uses 0.02, scaled down for residual projections.
    Normal(f64),
    /// All ones (LayerNorm gains).
    Ones,
    /// All zeros (biases).
    Zeros,
}

enum Source {
    Fresh(Box<Rng>),
    Loaded(HashMap<String, Tensor>),
}

/// The trainable parameters of a model, by name, in a stable (sorted) order.
pub struct Params {
    vars: BTreeMap<String, Var>,
    source: Source,
    device: Device,
}

impl Params {
    /// Parameters initialised from `rng` as the layers ask for them.
    pub fn fresh(rng: Rng, device: &Device) -> Params {
        Params {
            vars: BTreeMap::new(),
            source: Source::Fresh(Box::new(rng)),
            device: device.clone(),
        }
    }

    /// Parameters taken from `tensors` (e.g. a checkpoint's); call [`Params::finish`] after
    /// building the model to reject leftovers.
    pub fn loaded(tensors: HashMap<String, Tensor>, device: &Device) -> Params {
        Params {
            vars: BTreeMap::new(),
            source: Source::Loaded(tensors),
            device: device.clone(),
        }
    }

    /// The weight `name` of shape `shape`: created with `init`, or checked and taken from the
    /// loaded tensors.
    pub fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let tensor = match &mut self.source {
            Source::Fresh(rng) => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::Normal(std) => {
                        let dist = Normal::new(0.0f32, std as f32)
                            .map_err(|e| Error::Usage(format!("init std {std}: {e}")))?;
                        (0..n).map(|_| dist.sample(rng)).collect()
                    }
                    Init::Ones => vec![1.0; n],
                    Init::Zeros => vec![0.0; n],
                };
                Tensor::from_vec(data, shape, &self.device)?
            }
            Source::Loaded(map) => {
                let t = map.remove(name).ok_or_else(|| {
                    Error::Usage(format!(
                        "tensor `{name}` is missing (expected shape {shape:?})"
                    ))
                })?;
                if t.dims() != shape {
                    return Err(Error::Usage(format!(
                        "tensor `{name}` has shape {:?}, but the config needs {shape:?}",
                        t.dims()
                    )));
                }
                if t.dtype() != DType::F32 {
                    return Err(Error::Usage(format!(
                        "tensor `{name}` has dtype {:?}, expected f32",
                        t.dtype()
                    )));
                }
                t.to_device(&self.device)?
            }
        };
        let var = Var::from_tensor(&tensor)?;
        let t = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(t)
    }

    /// Rejects loaded tensors that no layer asked for.
    pub fn finish(&self) -> Result<()> {
        if let Source::Loaded(map) = &self.source {
            if let Some(name) = map.keys().min() {
                return Err(Error::Usage(format!(
                    "tensor `{name}` does not belong to a model of this config"
                )));
            }
        }
        Ok(())
    }

    /// All parameters by name.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Total number of scalars.
    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }
}
