//! Where a run's tensors live: `--device cpu|cuda|cuda:N|auto` ([`DeviceChoice`]), resolved
//! once per run into a candle [`Device`]. CUDA is a cargo feature (`--features cuda`,
//! `scripts/build-cuda.sh`): a default build has no CUDA code at all, and asking it for a GPU
//! is refused with the way to get one.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// The device a run asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU when this binary has CUDA and a GPU answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The GPU of this ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<DeviceChoice, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device; use cpu, cuda, cuda:N or auto")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this binary was built with CUDA.
pub const HAS_CUDA: bool = cfg!(feature = "cuda");

impl DeviceChoice {
    /// [`DeviceChoice::resolve`] for the `local_rank`-th rank on a host: `cuda:N` becomes
    /// GPU N + local_rank and `auto` GPU local_rank, so each rank has a GPU of its own.
    pub fn for_local_rank(self, local_rank: usize) -> DeviceChoice {
        match self {
            DeviceChoice::Cuda(n) => DeviceChoice::Cuda(n + local_rank),
            DeviceChoice::Auto if HAS_CUDA && local_rank > 0 => {
                match Device::new_cuda(local_rank) {
                    Ok(_) => DeviceChoice::Cuda(local_rank),
                    Err(_) => DeviceChoice::Cpu,
                }
            }
            other => other,
        }
    }

    /// The device: `cuda` on a binary without CUDA, or on a machine whose driver or GPU does
    /// not answer, is refused with the cause and the fix.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto if HAS_CUDA => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
            DeviceChoice::Auto => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) if !HAS_CUDA => Err(Error::Usage(format!(
                "--device cuda:{n}: this tinygpt was built without CUDA; build it with scripts/build-cuda.sh (cargo build --release --features cuda), or pass --device cpu"
            ))),
            DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| cuda_error(n, &e)),
        }
    }
}

/// The one line for a GPU that did not answer, from candle's (cudarc's) error.
fn cuda_error(n: usize, e: &candle_core::Error) -> Error {
    let msg = e.to_string();
    let cause = if msg.contains("STUB_LIBRARY") || msg.contains("NO_DEVICE") {
        "no NVIDIA driver or GPU found".to_string()
    } else if msg.contains("INVALID_DEVICE") {
        format!("there is no GPU {n} on this machine")
    } else {
        format!("the GPU did not start ({})", first_line(&msg))
    };
    Error::Usage(format!(
        "--device cuda:{n}: {cause}; run where `nvidia-smi` lists a GPU, or pass --device cpu"
    ))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// `cpu` or `cuda:N`, as `--device` spells it.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The GPU's name (`NVIDIA H200`), or `cpu`.
pub fn describe(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if let Ok(n) = dev.cuda_stream().context().name() {
            return n;
        }
    }
    name(device)
}

/// The most bytes the GPU's memory pool has held at once since it started (CUDA's
/// `CU_MEMPOOL_ATTR_USED_MEM_HIGH`: candle allocates from that pool), or `None` on the CPU.
pub fn peak_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
        let mut high: u64 = 0;
        // SAFETY: both calls write only into the out-pointers given, which outlive them.
        unsafe {
            if sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device())
                != sys::CUresult::CUDA_SUCCESS
            {
                return None;
            }
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
            let out = &mut high as *mut u64 as *mut std::ffi::c_void;
            if sys::cuMemPoolGetAttribute(pool.assume_init(), attr, out)
                != sys::CUresult::CUDA_SUCCESS
            {
                return None;
            }
        }
        return Some(high);
    }
    let _ = device;
    None
}

/// Dense matrix-product peak of the GPU in `device`, in FLOP/s, for products in `precision`
/// (bf16 and TF32 on tensor cores, else plain f32), from NVIDIA's data sheets: the
/// denominator of MFU. `None` for a GPU not in the table, and for the CPU (whose peak
/// `tinygpt bench` measures instead).
pub fn gpu_peak_flops(gpu_name: &str, precision: crate::model::Precision) -> Option<f64> {
    use crate::model::Precision;
    // (name contains, bf16, tf32, f32) in TFLOP/s, dense (no sparsity).
    const TABLE: [(&str, f64, f64, f64); 4] = [
        ("H200", 989.4, 494.7, 66.9),
        ("H100", 989.4, 494.7, 66.9),
        ("A100", 312.0, 156.0, 19.5),
        ("L4", 121.0, 60.0, 30.3),
    ];
    let &(_, bf16, tf32, f32) = TABLE.iter().find(|(n, ..)| gpu_name.contains(n))?;
    Some(
        match precision {
            Precision::Bf16 => bf16,
            Precision::Tf32 => tf32,
            Precision::F32 => f32,
        } * 1e12,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_refuses_the_rest() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains("cpu, cuda, cuda:N or auto"), "{bad}: {e}");
        }
        assert_eq!(DeviceChoice::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn cpu_and_auto_resolve_without_a_gpu() {
        assert!(DeviceChoice::Cpu.resolve().unwrap().is_cpu());
        if !HAS_CUDA {
            assert!(DeviceChoice::Auto.resolve().unwrap().is_cpu());
            let e = DeviceChoice::Cuda(0).resolve().unwrap_err().to_string();
            assert!(
                e.contains("built without CUDA") && e.contains("--features cuda"),
                "{e}"
            );
        }
        assert_eq!(name(&Device::Cpu), "cpu");
    }
}
