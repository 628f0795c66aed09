//! A partner thread that takes half of each product while a sequence decodes (see
//! [`super::gemv::Dense::apply_shared`]): one token's products are a few microseconds each,
//! shorter than waking a sleeping thread, so the partner spins between jobs.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::gemv::Dense;

/// Half of a product for the [`Partner`]: `dense`'s groups from `g0` for the rows of `x`, into
/// `y` (as raw parts: the poster keeps them alive and untouched until its [`Pending`] drops).
pub(super) struct Job {
    pub(super) dense: *const Dense,
    pub(super) x: (*const f32, usize),
    pub(super) y: (*mut f32, usize),
    pub(super) g0: usize,
}

/// What the decoder and its partner thread share: jobs posted and done, counted, and the slot
/// of the latest one.
struct Shared {
    posted: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
    job: UnsafeCell<Option<Job>>,
}

// SAFETY: `job` is written only by the poster while `done == posted` (the partner is idle) and
// read only by the partner between seeing `posted` rise and raising `done` (Release/Acquire).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// Spins of an idle partner before it sleeps: about a millisecond.
const SPINS: u32 = 1 << 16;

/// A second thread that takes half of each product of a token (or of a feed's rows): one
/// token's products are a few microseconds each, shorter than waking a sleeping thread, so
/// the partner spins between jobs while the decoder is alive. Sharing the work halves what
/// each core reads from memory per token.
pub struct Partner {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Partner {
    pub fn spawn() -> Partner {
        let shared = Arc::new(Shared {
            posted: AtomicU64::new(0),
            done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            job: UnsafeCell::new(None),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = 0;
            loop {
                let mut spins = 0u32;
                while s.posted.load(Ordering::Acquire) == seen {
                    if s.stop.load(Ordering::Acquire) {
                        return;
                    }
                    // Spin through the gaps between a token's products; sleep when the
                    // decoder has been idle for a while (`run` wakes it).
                    spins = spins.saturating_add(1);
                    match spins < SPINS {
                        true => std::hint::spin_loop(),
                        false => std::thread::park(),
                    }
                }
                seen += 1;
                // SAFETY: see `Shared`; the poster keeps the job's data alive until `done`.
                if let Some(job) = unsafe { (*s.job.get()).take() } {
                    let dense = unsafe { &*job.dense };
                    let x = unsafe { std::slice::from_raw_parts(job.x.0, job.x.1) };
                    let y = unsafe { std::slice::from_raw_parts_mut(job.y.0, job.y.1) };
                    let slab = dense.d_in * dense.cols;
                    dense.groups(&dense.packed[job.g0 * slab..], job.g0, x, y, dense.d_out);
                }
                s.done.store(seen, Ordering::Release);
            }
        });
        Partner {
            shared,
            thread: Some(thread),
        }
    }

    /// Posts `job`; the partner starts on it at once. The job is waited for when the returned
    /// guard drops, so its slices outlive the partner's use even if the caller unwinds.
    pub(super) fn run(&self, job: Job) -> Pending<'_> {
        // SAFETY: the partner is idle (every posted job is done), so nothing reads the slot.
        unsafe { *self.shared.job.get() = Some(job) };
        self.shared.posted.fetch_add(1, Ordering::Release);
        if let Some(t) = &self.thread {
            t.thread().unpark(); // one atomic operation unless the partner sleeps
        }
        Pending(self)
    }

    /// Waits until the partner has finished the job posted last.
    fn wait(&self) {
        let posted = self.shared.posted.load(Ordering::Relaxed);
        let mut spins = 0u32;
        while self.shared.done.load(Ordering::Acquire) != posted {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) && self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                panic!("the decoder's partner thread stopped before finishing its work");
            }
        }
    }
}

/// A posted job, waited for on drop.
pub(super) struct Pending<'a>(&'a Partner);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.wait();
    }
}

impl Drop for Partner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
