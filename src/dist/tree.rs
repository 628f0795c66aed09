//! The one order in which a step's micro-batch gradients are added, and an all-reduce that
//! keeps it.
//!
//! Float addition is not associative, so "the sum of the gradients" names a number only once
//! the order is fixed. tinygpt fixes it as a tree over the step's micro-batches 0 … A−1:
//!
//! ```text
//! sum(lo, hi) = g_lo                              if hi − lo = 1
//!             = sum(lo, mid) + sum(mid, hi)       mid = lo + (hi − lo) / 2
//! ```
//!
//! With N ranks, N a power of two dividing A, rank r runs the contiguous micro-batches
//! [r·A/N, (r+1)·A/N), which is a subtree; [`butterfly`] then adds the ranks' subtrees pairwise
//! at distance 1, 2, 4, … (recursive halving, then doubling to share the result), which builds
//! the rest of the same tree. IEEE addition is commutative, so each pair of ranks computes the
//! same bits, and every rank holds the one-process sum exactly.

use crate::error::Result;

/// `sum(lo, hi)` of the [module docs](self): `leaf(i)` for each micro-batch in order, added
/// by `add` in the tree. Holds at most one partial sum per level.
pub fn tree_sum<T>(
    lo: usize,
    hi: usize,
    leaf: &mut dyn FnMut(usize) -> Result<T>,
    add: &dyn Fn(T, T) -> Result<T>,
) -> Result<T> {
    debug_assert!(hi > lo, "an empty range has no sum");
    if hi - lo == 1 {
        return leaf(lo);
    }
    let mid = lo + (hi - lo) / 2;
    let left = tree_sum(lo, mid, leaf, add)?;
    let right = tree_sum(mid, hi, leaf, add)?;
    add(left, right)
}

/// Sends the first slice to a rank while receiving as many elements from it into the second.
pub type Exchange<'a> = dyn FnMut(usize, &[f32], &mut [f32]) -> Result<()> + 'a;

/// Sums `buf` over `size` ranks (a power of two) in place, every element in the tree of the
/// [module docs](self), each rank ending with the whole sum. `exchange(partner, send, recv)`
/// sends `send` to rank `partner` while receiving as many elements from it into `recv`.
///
/// Reduce-scatter by recursive halving (at distance d, keep one half of the segment, send the
/// other, add what the partner sent for the kept half), then all-gather by recursive doubling:
/// each rank sends and receives 2·(N−1)/N of the buffer in all, as a ring all-reduce does.
pub fn butterfly(rank: usize, size: usize, buf: &mut [f32], exchange: &mut Exchange) -> Result<()> {
    assert!(size.is_power_of_two() && rank < size);
    let mut seg = 0..buf.len();
    let mut parents = Vec::new();
    let mut incoming = vec![0.0f32; buf.len().div_ceil(2)];
    let mut d = 1;
    while d < size {
        let mid = seg.start + seg.len() / 2;
        let (keep, give) = match rank & d {
            0 => (seg.start..mid, mid..seg.end),
            _ => (mid..seg.end, seg.start..mid),
        };
        let recv = &mut incoming[..keep.len()];
        exchange(rank ^ d, &buf[give], recv)?;
        for (a, b) in buf[keep.clone()].iter_mut().zip(recv.iter()) {
            *a += *b;
        }
        parents.push(seg);
        seg = keep;
        d <<= 1;
    }
    while let Some(parent) = parents.pop() {
        d >>= 1;
        // The partner owns the other half of `parent`, reduced; swap halves.
        let (lower, upper) = buf[parent.clone()].split_at_mut(parent.len() / 2);
        let (mine, theirs) = match rank & d {
            0 => (lower, upper),
            _ => (upper, lower),
        };
        exchange(rank ^ d, mine, theirs)?;
        seg = parent;
    }
    debug_assert_eq!(seg, 0..buf.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender};

    /// Runs `butterfly` on `size` threads standing in for ranks, connected by channels.
    fn simulate(bufs: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        let size = bufs.len();
        // links[a][b]: what rank a sends to rank b.
        let mut senders: Vec<Vec<Option<Sender<Vec<f32>>>>> = vec![vec![]; size];
        let mut receivers: Vec<Vec<Option<Receiver<Vec<f32>>>>> = (0..size)
            .map(|_| (0..size).map(|_| None).collect())
            .collect();
        for (a, row) in senders.iter_mut().enumerate() {
            for from_a in receivers.iter_mut() {
                let (s, r) = channel();
                row.push(Some(s));
                from_a[a] = Some(r);
            }
        }
        let handles: Vec<_> = bufs
            .into_iter()
            .enumerate()
            .map(|(rank, mut buf)| {
                let to: Vec<_> = senders[rank].iter_mut().map(|s| s.take()).collect();
                let from: Vec<_> = receivers[rank].iter_mut().map(|r| r.take()).collect();
                std::thread::spawn(move || {
                    let mut exchange = |p: usize, send: &[f32], recv: &mut [f32]| {
                        to[p].as_ref().unwrap().send(send.to_vec()).unwrap();
                        let got = from[p].as_ref().unwrap().recv().unwrap();
                        assert_eq!(got.len(), recv.len(), "partners agree on lengths");
                        recv.copy_from_slice(&got);
                        Ok(())
                    };
                    butterfly(rank, size, &mut buf, &mut exchange).unwrap();
                    buf
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Values whose sums round differently in different orders (a xorshift stream: mantissas
    /// and magnitudes that vary).
    fn values(ranks: usize, len: usize) -> Vec<Vec<f32>> {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..ranks)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        let r = next();
                        let unit = (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                        unit * 10f32.powi((r % 7) as i32 - 3)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn butterfly_is_bitwise_the_tree_sum_for_every_power_of_two() {
        for size in [1, 2, 4, 8] {
            for len in [0, 1, 3, 7, 64, 1001] {
                let bufs = values(size, len);
                let want: Vec<u32> = (0..len)
                    .map(|e| {
                        let v = tree_sum(0, size, &mut |r| Ok(bufs[r][e]), &|a, b| Ok(a + b));
                        v.unwrap().to_bits()
                    })
                    .collect();
                for (rank, got) in simulate(bufs.clone()).into_iter().enumerate() {
                    let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{size} ranks, {len} elements, rank {rank}");
                }
            }
        }
    }

    #[test]
    fn a_left_to_right_sum_differs_so_the_test_above_can_fail() {
        let bufs = values(8, 1001);
        let differs = (0..1001).any(|e| {
            let tree = tree_sum(0, 8, &mut |r| Ok(bufs[r][e]), &|a, b| Ok(a + b)).unwrap();
            let seq = (1..8).fold(bufs[0][e], |s, r| s + bufs[r][e]);
            tree.to_bits() != seq.to_bits()
        });
        assert!(differs);
    }

    #[test]
    fn tree_sum_splits_into_contiguous_halves() {
        let order = std::cell::RefCell::new(Vec::new());
        let s = tree_sum(
            0,
            5,
            &mut |i| {
                order.borrow_mut().push(i);
                Ok(i.to_string())
            },
            &|a, b| Ok(format!("({a}+{b})")),
        )
        .unwrap();
        assert_eq!(s, "((0+1)+(2+(3+4)))");
        assert_eq!(*order.borrow(), vec![0, 1, 2, 3, 4]);
        // Ranks' blocks are subtrees: 8 micro-batches on 4 ranks, 2 each.
        let s = tree_sum(0, 8, &mut |i| Ok(i.to_string()), &|a, b| {
            Ok(format!("({a}+{b})"))
        });
        assert_eq!(s.unwrap(), "(((0+1)+(2+3))+((4+5)+(6+7)))");
    }
}
