//! Data-parallel ranks: which of the processes an MPI launcher (`mpirun`, `srun`) started this
//! one is, and the few collectives training needs. Without the `mpi` feature, or when no
//! launcher started the process, there is one rank and every collective is the identity.
//!
//! Every rank runs the same config on the same data; a step's micro-batches are split among
//! the ranks in contiguous blocks and their gradients summed in one fixed order ([`tree`]), so
//! a run on N ranks is the same training as one process: bitwise when N is a power of two,
//! within float rounding otherwise (MPI's own sum, whose order MPI does not fix).

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tree;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// This process's place among the ranks of a data-parallel job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comm {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
}

impl Default for Comm {
    fn default() -> Self {
        Comm::single()
    }
}

impl Comm {
    /// One process, alone.
    pub fn single() -> Comm {
        Comm {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
        }
    }

    /// This rank, 0 … size − 1.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// This rank among those on the same host (which GPU it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Ranks on this host (which share its cores).
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// This rank's contiguous share of `n` items (micro-batches, evaluation batches): ranks
    /// take them in order, the shares differing by at most one.
    pub fn share(&self, n: usize) -> std::ops::Range<usize> {
        self.rank * n / self.size..(self.rank + 1) * n / self.size
    }

    /// Rank 0, the one that writes: the lock, checkpoints, metrics, progress, samples.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Whether a gradient sum over these ranks is the same bits as one process's: a
    /// power-of-two count on MPI, at most two GPUs on NCCL.
    pub fn exact(&self) -> bool {
        #[cfg(feature = "nccl")]
        if nccl::active() && self.size > 2 {
            return false;
        }
        self.size.is_power_of_two()
    }

    /// Sums `buf` over the ranks in place, in the order of [`tree`] when [`Comm::exact`].
    pub fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        self.backend()?.sum_f32(self, buf)
    }

    /// Sums the flat f32 tensor `flat` over the ranks: between GPUs on NCCL once
    /// [`nccl::init`] has run (feature `nccl`), else through host memory with
    /// [`Comm::sum_f32`].
    pub fn sum_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        if self.size == 1 {
            return Ok(flat.clone());
        }
        #[cfg(feature = "nccl")]
        if let Some(summed) = nccl::sum(flat)? {
            return Ok(summed);
        }
        let mut host = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.sum_f32(&mut host)?;
        Ok(Tensor::from_vec(host, flat.elem_count(), flat.device())?)
    }

    /// Joins the NCCL communicator of the ranks' GPUs when this build has NCCL (feature
    /// `nccl`) and `device` is a GPU; otherwise gradients go through host memory and MPI.
    pub fn join_device(&self, device: &candle_core::Device) -> Result<()> {
        #[cfg(feature = "nccl")]
        nccl::init(self, device)?;
        let _ = device;
        Ok(())
    }

    /// Rank 0's `buf`, on every rank.
    pub fn broadcast(&self, buf: &mut [u8]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        self.backend()?.broadcast(buf)
    }

    /// Sums `buf` over the ranks in place. Exact where each element has one non-zero
    /// contributor (a slot per micro-batch or window, filled by the rank that ran it).
    pub fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        self.backend()?.sum_f64(buf)
    }

    /// Every rank's `value`, in rank order.
    pub fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        if self.size == 1 {
            return Ok(vec![value]);
        }
        self.backend()?.gather_u64(self.size, value)
    }

    /// Fails on every rank, naming the first that differs, unless all ranks hold the same
    /// `value` (a digest of `what`).
    pub fn check_same(&self, what: &str, value: u64) -> Result<()> {
        let all = self.gather_u64(value)?;
        match all.iter().position(|&v| v != all[0]) {
            None => Ok(()),
            // Every rank knows: rank 0 says it, the others end quietly.
            Some(_) if !self.is_root() => Err(Error::OtherRank { rank: 0, code: 1 }),
            Some(r) => Err(Error::Agreed(Box::new(Error::Usage(format!(
                "rank {r}'s {what} differs from rank 0's; every rank must read the same config, corpus and checkpoint (the same files on every host, the same tinygpt)"
            ))))),
        }
    }

    /// Ends a start-up on every rank alike: `Ok` where every rank's `result` is; otherwise
    /// rank 0's error where it has one (else the first failing rank's, on that rank), and
    /// [`Error::OtherRank`] on the others, so the message is printed once and no rank is left
    /// waiting in a collective.
    pub fn agree<T>(&self, result: Result<T>) -> Result<T> {
        if self.size == 1 {
            return result;
        }
        let code = match &result {
            Ok(_) => 0,
            Err(e) => e.exit_code().max(1) as u64,
        };
        let codes = self.gather_u64(code)?;
        let Some(first) = codes.iter().position(|&c| c != 0) else {
            return result;
        };
        match result {
            Err(e) if first == self.rank => Err(Error::Agreed(Box::new(e))),
            _ => Err(Error::OtherRank {
                rank: first,
                code: codes[first] as u8,
            }),
        }
    }

    /// Ends the whole job at once with `code`, from any rank (after an error other ranks do
    /// not share, which would leave them waiting in a collective).
    pub fn abort(&self, code: u8) -> ! {
        #[cfg(feature = "mpi")]
        if self.size > 1 {
            mpi::abort(code);
        }
        std::process::exit(code as i32)
    }

    #[cfg(feature = "mpi")]
    fn backend(&self) -> Result<mpi::Backend> {
        Ok(mpi::Backend)
    }

    #[cfg(not(feature = "mpi"))]
    fn backend(&self) -> Result<NoBackend> {
        Err(Error::Usage(
            "this tinygpt was built without MPI; build it with --features mpi".into(),
        ))
    }
}

/// The collectives of a build without MPI, never reached (there is one rank).
#[cfg(not(feature = "mpi"))]
struct NoBackend;

#[cfg(not(feature = "mpi"))]
impl NoBackend {
    fn sum_f32(&self, _: &Comm, _: &mut [f32]) -> Result<()> {
        unreachable!("one rank has nothing to sum")
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        unreachable!("one rank has nothing to sum")
    }
    fn gather_u64(&self, _: usize, _: u64) -> Result<Vec<u64>> {
        unreachable!("one rank has nothing to gather")
    }
    fn broadcast(&self, _: &mut [u8]) -> Result<()> {
        unreachable!("one rank has nothing to send")
    }
}

/// The ranks an MPI launcher says it started, from the variables OpenMPI, MPICH/Hydra and
/// PMIx (Slurm's `srun --mpi=pmix`) set; `None` when no launcher started this process.
pub fn launched_ranks() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .or_else(|| std::env::var_os("PMIX_RANK").map(|_| 1))
}

/// This rank's number as the launcher set it, for messages before MPI answers.
#[cfg(feature = "mpi")]
fn launched_rank() -> String {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .unwrap_or_else(|| "?".into())
}

/// A command's ranks: MPI initialised when a launcher started the process (finalised when
/// this is dropped), one rank otherwise.
pub struct Session {
    pub comm: Comm,
    #[cfg(feature = "mpi")]
    _mpi: Option<mpi::Universe>,
}

impl Session {
    /// One process, no MPI.
    pub fn single() -> Session {
        Session {
            comm: Comm::single(),
            #[cfg(feature = "mpi")]
            _mpi: None,
        }
    }

    /// Joins the job a launcher started (MPI up, every rank answering within
    /// `TINYGPT_MPI_TIMEOUT` seconds, 60 by default), or one process when none did. Sets each
    /// rank's threads ([`rank_threads`]) before anything starts rayon's pool.
    pub fn start() -> Result<Session> {
        let Some(launched) = launched_ranks() else {
            return Ok(Session::single());
        };
        #[cfg(not(feature = "mpi"))]
        {
            if launched > 1 {
                return Err(Error::Usage(format!(
                    "started as one of {launched} MPI ranks, but this tinygpt was built without MPI; build it with `cargo build --release --features mpi` (docs/distributed.md)"
                )));
            }
            Ok(Session::single())
        }
        #[cfg(feature = "mpi")]
        {
            let timeout = std::env::var("TINYGPT_MPI_TIMEOUT")
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(60.0);
            let watchdog = Watchdog::arm(timeout);
            let (universe, comm) = mpi::init()?;
            watchdog.disarm();
            if comm.size != launched {
                return Err(Error::Usage(format!(
                    "the launcher started {launched} processes but MPI joined {} of them; under Slurm run `srun --mpi=pmix` (or mpirun), and use the MPI this tinygpt was built with on every host",
                    comm.size
                )));
            }
            if comm.size > 1 {
                set_threads(rank_threads(comm.local_size));
            }
            Ok(Session {
                comm,
                _mpi: Some(universe),
            })
        }
    }
}

/// Threads for one of `local_ranks` ranks on this host: the cores the launcher bound it to
/// when it bound it to fewer than the host has, else the host's cores shared out evenly.
/// `RAYON_NUM_THREADS` wins.
pub fn rank_threads(local_ranks: usize) -> usize {
    let mine = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf only reads a system constant.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    if mine < online {
        mine
    } else {
        (online / local_ranks.max(1)).max(1)
    }
}

/// Starts rayon's global pool with `n` threads unless `RAYON_NUM_THREADS` is set.
#[cfg(feature = "mpi")]
fn set_threads(n: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Fails only when the pool already runs; then it keeps its size.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// Ends the process with one line when the ranks have not all answered in time: a host that
/// cannot be reached must not leave the others waiting forever.
#[cfg(feature = "mpi")]
struct Watchdog(std::sync::mpsc::Sender<()>);

#[cfg(feature = "mpi")]
impl Watchdog {
    fn arm(seconds: f64) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rank = launched_rank();
        std::thread::spawn(move || {
            let wait = std::time::Duration::from_secs_f64(seconds.max(0.1));
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(wait) {
                eprintln!(
                    "error: rank {rank}: the other ranks did not answer within {seconds} s; check that every host runs the same tinygpt and MPI and can reach the others (hostfile, firewall), or raise TINYGPT_MPI_TIMEOUT"
                );
                // SAFETY: _exit ends the process at once; nothing here needs unwinding.
                unsafe { libc::_exit(1) };
            }
        });
        Watchdog(tx)
    }

    fn disarm(self) {
        let _ = self.0.send(());
    }
}
