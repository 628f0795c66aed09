//! Activation recomputation ("gradient checkpointing") for whole blocks of the reference model.
//!
//! candle's autograd keeps every intermediate tensor of the forward pass alive until the
//! backward pass has used it: for the 10M-parameter config that is about 21 tensors of
//! `(B, T, C)` per block, 3.7 GB in all. Run through [`RecomputedBlock`], a block is one custom
//! op: its forward pass runs the block without recording anything and keeps only the input;
//! its backward pass runs the block again on that input, recorded this time, and backpropagates
//! through it at once. So only one block's intermediates exist at a time, for the price of a
//! second forward pass through every block.
//!
//! The op's backward can return the gradient of its input only, so the gradients of the
//! block's own weights go to a [`GradSlot`] that the engine adds to the rest. Dropout draws
//! from an RNG seeded once per block and pass, so the recomputation drops the same units as
//! the first run.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor, Var};

use crate::kernels::block::GradSlot;
use crate::kernels::f32_slice;
use crate::model::block::Block;
use crate::model::{autocast, Precision};
use crate::rng::seeded;

/// One block run as a single op whose intermediates are recomputed in backward.
pub struct RecomputedBlock {
    pub block: Block,
    /// The causal mask `(T, T)`.
    pub mask: Tensor,
    /// Seeds the block's dropout; `None` when the block runs without dropout.
    pub dropout_seed: Option<u64>,
    /// Where backward leaves the gradients of the block's parameters, in
    /// [`crate::layout::BlockParams::named`] order.
    pub grads: GradSlot<Vec<Tensor>>,
    /// The matrix products' dtype, the same in the recomputation as in the first run.
    pub precision: Precision,
}

impl RecomputedBlock {
    fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut rng = self.dropout_seed.map(seeded);
        autocast(self.precision, || {
            self.block.forward(x, &self.mask, rng.as_mut(), None)
        })
        .map(|(y, _)| y)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl CustomOp1 for RecomputedBlock {
    fn name(&self) -> &'static str {
        "tinygpt-recomputed-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Tensor::from_slice(
            f32_slice(s, l, "recomputed block")?,
            l.shape(),
            &candle_core::Device::Cpu,
        )?;
        let y = self.run(&x)?.detach();
        let data = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(data), y.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&x.detach())?;
        let y = self.run(x.as_tensor())?;
        let grads = (y * dy.detach())?.sum_all()?.backward()?;
        let weights = (self.block.params().named().into_iter())
            .map(|(name, w)| match grads.get(&w) {
                Some(g) => Ok(g.clone()),
                None => bail!("recomputed block: no gradient for {name}"),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.grads.put(weights);
        Ok(grads.get(x.as_tensor()).cloned())
    }
}
