//! Where the model's weights come from: freshly initialised from the run's seed, or taken from
//! a checkpoint's tensors. Layers ask a candle-nn [`VarBuilder`] for their weights by name
//! (`vb.pp("attn").pp("w_q").get_with_hints(shape, "weight", init)`), so the nesting of the
//! constructors *is* the checkpoint's naming scheme (`h.0.attn.w_q.weight`), and a loaded file is
//! checked name by name, shape by shape. [`Params`] is that VarBuilder's backend (candle-nn's
//! own `VarMap` initialises from candle's RNG, which cannot be seeded) and keeps every weight as
//! a named [`Var`] for the optimizer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
pub use candle_nn::{Init, VarBuilder};
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};
use crate::rng::Rng;

enum Source {
    Fresh(Box<Rng>),
    Loaded(HashMap<String, Tensor>),
}

/// The trainable parameters of a model, by name, in a stable (sorted) order.
pub struct Params {
    vars: BTreeMap<String, Var>,
    source: Source,
    device: Device,
    /// The first weight a layer could not have, with a message for the user.
    refused: Option<Error>,
}

impl Params {
    /// Parameters initialised from `rng` as the layers ask for them.
    pub fn fresh(rng: Rng, device: &Device) -> Params {
        Params::new(Source::Fresh(Box::new(rng)), device)
    }

    /// Parameters taken from `tensors` (e.g. a checkpoint's).
    pub fn loaded(tensors: HashMap<String, Tensor>, device: &Device) -> Params {
        Params::new(Source::Loaded(tensors), device)
    }

    fn new(source: Source, device: &Device) -> Params {
        Params {
            vars: BTreeMap::new(),
            source,
            device: device.clone(),
            refused: None,
        }
    }

    /// Builds a model (or a layer) with `build`, which takes its weights from the VarBuilder it
    /// gets; then rejects loaded tensors that no layer asked for.
    pub fn build<M>(&mut self, build: impl FnOnce(VarBuilder) -> Result<M>) -> Result<M> {
        let device = self.device.clone();
        let backend = Backend(Mutex::new(self));
        let built = build(VarBuilder::from_backend(
            Box::new(backend),
            DType::F32,
            device,
        ));
        if let Some(e) = self.refused.take() {
            return Err(e);
        }
        let built = built?;
        if let Source::Loaded(map) = &self.source {
            if let Some(name) = map.keys().min() {
                return Err(Error::Usage(format!(
                    "tensor `{name}` does not belong to a model of this config"
                )));
            }
        }
        Ok(built)
    }

    /// All parameters by name.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Total number of scalars.
    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// The weight `name` of shape `shape`: created with `init`, or checked and taken from the
    /// loaded tensors.
    fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let tensor = match &mut self.source {
            Source::Fresh(rng) => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::Randn { mean: 0.0, stdev } => {
                        let dist = Normal::new(0.0f32, stdev as f32)
                            .map_err(|e| Error::Usage(format!("init std {stdev}: {e}")))?;
                        (0..n).map(|_| dist.sample(rng)).collect()
                    }
                    Init::Const(v) => vec![v as f32; n],
                    other => {
                        return Err(Error::Usage(format!(
                            "weight `{name}`: initialisation {other:?} is not supported"
                        )))
                    }
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
}

/// The VarBuilder's view of [`Params`] while a model is built. A refused weight is kept as our
/// own error (candle's error type would only keep its text).
struct Backend<'a>(Mutex<&'a mut Params>);

impl candle_nn::var_builder::SimpleBackend for Backend<'_> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut p = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter store poisoned".into()))?;
        p.get(name, shape.dims(), init).map_err(|e| {
            let msg = candle_core::Error::Msg(e.to_string());
            p.refused.get_or_insert(e);
            msg
        })
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("weight `{name}`: every weight is asked for with its shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.lock().is_ok_and(|p| match &p.source {
            Source::Fresh(_) => false,
            Source::Loaded(map) => map.contains_key(name),
        })
    }
}
