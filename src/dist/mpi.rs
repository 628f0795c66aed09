//! The collectives on MPI (the `mpi` crate over the system's OpenMPI or MPICH). Only the main
//! thread calls MPI; the world communicator is looked up per call, so [`super::Comm`] stays
//! plain data that any thread may hold.

use mpi::collective::SystemOperation;
use mpi::point_to_point::send_receive_into;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

use super::{tree, Comm};
use crate::error::{Error, Result};

pub use mpi::environment::Universe;

/// MPI's side of [`Comm`]'s collectives.
pub struct Backend;

fn world() -> SimpleCommunicator {
    SimpleCommunicator::world()
}

/// Initialises MPI and says where this process stands; the first collective (the host
/// split) is where every rank must answer.
pub fn init() -> Result<(Universe, Comm)> {
    let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
        .ok_or_else(|| Error::Usage("MPI was already initialised in this process".into()))?;
    let world = universe.world();
    let host = world.split_shared(world.rank());
    let comm = Comm {
        rank: world.rank() as usize,
        size: world.size() as usize,
        local_rank: host.rank() as usize,
        local_size: host.size() as usize,
    };
    world.barrier();
    Ok((universe, comm))
}

/// Ends every rank of the job with `code`.
pub fn abort(code: u8) -> ! {
    world().abort(code as i32)
}

impl Backend {
    pub fn sum_f32(&self, comm: &Comm, buf: &mut [f32]) -> Result<()> {
        let world = world();
        if comm.exact() {
            let mut exchange = |partner: usize, send: &[f32], recv: &mut [f32]| {
                let p = world.process_at_rank(partner as i32);
                send_receive_into(send, &p, recv, &p);
                Ok(())
            };
            return tree::butterfly(comm.rank, comm.size, buf, &mut exchange);
        }
        let send = buf.to_vec();
        world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    pub fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        world().all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    pub fn broadcast(&self, buf: &mut [u8]) -> Result<()> {
        world().process_at_rank(0).broadcast_into(buf);
        Ok(())
    }

    pub fn gather_u64(&self, size: usize, value: u64) -> Result<Vec<u64>> {
        let mut all = vec![0u64; size];
        world().all_gather_into(&value, &mut all[..]);
        Ok(all)
    }
}
