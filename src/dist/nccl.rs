//! The gradient all-reduce between GPUs on NCCL (feature `nccl`, with `cuda` and `mpi`), as
//! llm.c does it: rank 0 makes NCCL's unique id, MPI broadcasts it, and every rank joins one
//! NCCL communicator on its own GPU's stream, so the sum is ordered after the backward pass
//! that wrote the gradients without waiting on the host.
//!
//! NCCL fixes no order of addition across more than two ranks: a run on 2 GPUs adds each
//! element once (a + b, the same bits as one process); on more it is within float rounding.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{CpuStorage, CudaStorage, Device, InplaceOp1, Layout, Tensor};
use cudarc::nccl::safe::{Comm as NcclComm, Id, ReduceOp};

use super::Comm;
use crate::error::{Error, Result};

thread_local! {
    /// This process's communicator, once [`init`] ran (NCCL's handle stays on the thread
    /// that made it, the one that trains).
    static NCCL: RefCell<Option<Arc<NcclComm>>> = const { RefCell::new(None) };
}

/// Joins the NCCL communicator of `comm`'s ranks on `device` (this rank's GPU). On the CPU, or
/// with one rank, does nothing: the host path sums instead.
pub fn init(comm: &Comm, device: &Device) -> Result<()> {
    let Device::Cuda(gpu) = device else {
        return Ok(());
    };
    if comm.size() == 1 {
        return Ok(());
    }
    let nccl_err = |what: &str, e: cudarc::nccl::result::NcclError| {
        Error::Usage(format!(
            "NCCL {what} failed on rank {} ({e:?}); every rank needs a GPU of its own and libnccl.so.2 on its library path (docs/distributed.md)",
            comm.rank()
        ))
    };
    let mut bytes = [0u8; 128];
    if comm.is_root() {
        let id = Id::new().map_err(|e| nccl_err("making the unique id", e))?;
        for (b, c) in bytes.iter_mut().zip(id.internal()) {
            *b = *c as u8;
        }
    }
    comm.broadcast(&mut bytes)?;
    let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
    let nccl = NcclComm::from_rank(gpu.cuda_stream(), comm.rank(), comm.size(), id)
        .map_err(|e| nccl_err("joining the communicator", e))?;
    NCCL.with(|n| *n.borrow_mut() = Some(Arc::new(nccl)));
    Ok(())
}

/// Whether [`init`] joined this process to a communicator.
pub fn active() -> bool {
    NCCL.with(|n| n.borrow().is_some())
}

/// `flat` summed over the ranks on their GPUs, or `None` when [`init`] has not run (the CPU,
/// or one rank).
pub fn sum(flat: &Tensor) -> Result<Option<Tensor>> {
    let Some(nccl) = NCCL.with(|n| n.borrow().clone()) else {
        return Ok(None);
    };
    // A copy of its own: the op sums in place.
    let out = flat.contiguous()?.copy()?;
    out.inplace_op1(&AllReduce(nccl))?;
    Ok(Some(out))
}

/// NCCL's in-place sum as a candle op, enqueued on the tensor's stream.
struct AllReduce(Arc<NcclComm>);

impl InplaceOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL sums tensors on GPUs only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        if layout.start_offset() != 0 || !layout.is_contiguous() {
            candle_core::bail!("the NCCL sum takes a whole contiguous buffer");
        }
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        self.0
            .all_reduce_in_place(slice, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok(())
    }
}
