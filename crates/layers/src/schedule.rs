//! Deterministic parallel scheduling: work over rows of equal width is split into blocks fixed
//! by the shape alone, and per-block results are combined in block order. Results are therefore
//! bit-identical on one thread or many. Every kernel of this crate schedules its work here.
//!
//! Two ways to split:
//! - [`Rows`]: blocks of whole rows ([`fold_blocks`] for reductions, [`collect_blocks`] for a
//!   new array written block by block);
//! - [`collect_by_group`] and [`map_groups`]: one worker per group (a channel, say), for passes
//!   that read a group's values twice in a row and want the second read from cache.
//!
//! Small inputs run on the calling thread: handing work to other threads costs more than it
//! saves below [`PARALLEL_MIN_WORK`]. Work is counted in passes over an element: a row of
//! `width` elements costs `width · work` ([`Rows::work`] is 1 for a memory-bound pass, and the
//! multiply-adds per output value for a convolution).

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

/// Below this much work (elements times [`Rows::work`]) everything runs on the calling thread.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 17;

/// The most blocks the rows are split into: enough to share among threads, few enough that the
/// per-block partial results (one value per column each, merged one after the other) stay
/// small beside the data even for wide rows.
const MAX_BLOCKS: usize = 16;

/// The least work in a block (unless the whole input is smaller): smaller blocks cost more in
/// per-block partials than they share.
const MIN_BLOCK_WORK: usize = 1 << 15;

/// `count` rows of `width` elements each, row-major: the unit of work of [`fold_blocks`] and
/// [`collect_blocks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rows {
    /// Number of rows.
    pub count: usize,
    /// Elements per row.
    pub width: usize,
    /// The work of one element, in passes over an element: 1 for a memory-bound pass.
    pub work: usize,
}

impl Rows {
    /// `count` rows of `width` elements, each element one memory-bound pass of work.
    pub fn new(count: usize, width: usize) -> Self {
        Rows {
            count,
            width,
            work: 1,
        }
    }

    /// Elements in all.
    pub fn len(&self) -> usize {
        self.count * self.width
    }

    /// Whether the work is large enough for several threads.
    pub fn parallel(&self) -> bool {
        self.len().saturating_mul(self.work) >= PARALLEL_MIN_WORK
    }

    /// Rows per block: a function of the shape only. At most [`MAX_BLOCKS`] blocks, each of at
    /// least [`MIN_BLOCK_WORK`] (in whole rows).
    pub fn block_rows(&self) -> usize {
        let by_count = self.count.div_ceil(MAX_BLOCKS);
        let by_size = MIN_BLOCK_WORK.div_ceil(self.width.saturating_mul(self.work).max(1));
        by_count.max(by_size).max(1)
    }

    /// The element range of each block, in order (none for rows of width 0).
    fn blocks(&self) -> impl Iterator<Item = Range<usize>> + Clone + Send + use<> {
        let (rows, count, width) = (self.block_rows(), self.count, self.width);
        let blocks = if width == 0 { 0 } else { count.div_ceil(rows) };
        (0..blocks).map(move |i| i * rows * width..((i + 1) * rows).min(count) * width)
    }
}

/// `work` on each block of rows (given as its element range), on several threads for large
/// inputs, folded in block order: the first block's result is the running total and
/// `merge(total, next)` adds each next one. `None` when there are no blocks (rows of width 0).
#[inline(always)]
pub(crate) fn fold_blocks<R: Send>(
    rows: Rows,
    work: impl Fn(Range<usize>) -> R + Sync + Send,
    merge: impl FnMut(&mut R, R),
) -> Option<R> {
    if rows.parallel() {
        let ranges: Vec<Range<usize>> = rows.blocks().collect();
        let results: Vec<R> = ranges.into_par_iter().map(work).collect();
        fold_in_order(results.into_iter(), merge)
    } else {
        // One block after the other, merged as they come.
        fold_in_order(rows.blocks().map(work), merge)
    }
}

/// The first of `results` with each next one merged into it, in order.
fn fold_in_order<R>(mut results: impl Iterator<Item = R>, mut merge: impl FnMut(&mut R, R)) -> Option<R> {
    let mut total = results.next()?;
    for result in results {
        merge(&mut total, result);
    }
    Some(total)
}

/// A new array of `rows.len()` elements, written block by block by `fill(range, out)`: `range`
/// is the block's place in the flat data and `out` its part of the new array, which `fill` must
/// write entirely. Blocks run in parallel for large inputs; each element is written by exactly
/// one call, so the split cannot change a result.
///
/// The array is not zero-filled first: for large outputs that would be one more pass over
/// memory, on one thread.
#[inline(always)]
pub(crate) fn collect_blocks<T: Send>(
    rows: Rows,
    fill: impl Fn(Range<usize>, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    collect_blocks_with(rows, fill).0
}

/// As [`collect_blocks`], where `fill` also returns a result for its block (a partial sum, say):
/// the results come back in block order.
#[inline(always)]
pub(crate) fn collect_blocks_with<T: Send, R: Send>(
    rows: Rows,
    fill: impl Fn(Range<usize>, &mut [MaybeUninit<T>]) -> R + Sync + Send,
) -> (Vec<T>, Vec<R>) {
    let block = rows.block_rows() * rows.width;
    written(rows.len(), |spare| {
        if block == 0 {
            return Vec::new();
        }
        let work = |(i, part): (usize, &mut [MaybeUninit<T>])| fill(i * block..i * block + part.len(), part);
        if rows.parallel() {
            spare.par_chunks_mut(block).enumerate().map(work).collect()
        } else {
            spare.chunks_mut(block).enumerate().map(work).collect()
        }
    })
}

/// A new array of `rows.len()` elements whose rows are made of `groups` lanes each (`rows.width
/// / groups` elements a lane): `work(group, lanes)` writes every element of the group's lanes
/// (one per row, in row order) and returns a result. One worker per group, groups in parallel
/// for large inputs; the results come back in group order.
pub(crate) fn collect_by_group<T: Send, R: Send>(
    rows: Rows,
    groups: usize,
    work: impl Fn(usize, Vec<&mut [MaybeUninit<T>]>) -> R + Sync + Send,
) -> (Vec<T>, Vec<R>) {
    written(rows.len(), |spare| {
        let lanes = lanes_by_group(spare, rows, groups);
        if rows.parallel() {
            lanes
                .into_par_iter()
                .enumerate()
                .map(|(g, lanes)| work(g, lanes))
                .collect()
        } else {
            lanes
                .into_iter()
                .enumerate()
                .map(|(g, lanes)| work(g, lanes))
                .collect()
        }
    })
}

/// `work(group)` for each of `groups` groups, in parallel for large inputs (`rows`), the
/// results in group order.
pub(crate) fn map_groups<R: Send>(
    rows: Rows,
    groups: usize,
    work: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    if rows.parallel() {
        (0..groups).into_par_iter().map(work).collect()
    } else {
        (0..groups).map(work).collect()
    }
}

/// Runs `f`, which calls several of the functions here one after the other, as one job on
/// rayon's pool when `parallel` (else right here), so that its parallel loops start from a pool
/// thread. A parallel loop started from outside the pool wakes a worker and puts the caller to
/// sleep until it is done, for each loop.
pub(crate) fn on_pool<R: Send>(parallel: bool, f: impl FnOnce() -> R + Send) -> R {
    if parallel { rayon::scope(|_| f()) } else { f() }
}

/// The lanes of each group in a row-major buffer of `rows` whose rows hold `groups` lanes: for
/// each group, its lane of every row, in row order.
fn lanes_by_group<E>(buffer: &mut [E], rows: Rows, groups: usize) -> Vec<Vec<&mut [E]>> {
    let mut lanes: Vec<Vec<&mut [E]>> = (0..groups).map(|_| Vec::with_capacity(rows.count)).collect();
    if groups == 0 || rows.width == 0 {
        return lanes;
    }
    let lane = rows.width / groups;
    for row in buffer.chunks_exact_mut(rows.width) {
        for (group, lane) in row.chunks_exact_mut(lane).enumerate() {
            lanes[group].push(lane);
        }
    }
    lanes
}

/// A new `Vec` of `len` elements, each written by `write` (which gets them uninitialised and must
/// write every one), and what `write` returned.
fn written<T, R>(len: usize, write: impl FnOnce(&mut [MaybeUninit<T>]) -> R) -> (Vec<T>, R) {
    let mut out = Vec::with_capacity(len);
    let result = write(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is at least `len`, and `write` wrote each of the first `len` elements:
    // its two callers hand every element to exactly one worker, which writes all it is given.
    // `collect_blocks`: the blocks cover the array in whole rows, and each `fill` must write its
    // whole block. `collect_by_group`: every lane of every row belongs to one group, whose
    // `work` must write each element of each of its lanes. Both are tested against direct
    // computations, with ragged last blocks and in parallel.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(len);
    }
    (out, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_rows_in_order_and_depend_only_on_the_shape() {
        for rows in [
            Rows::new(3001, 49),
            Rows::new(1, 5),
            Rows::new(65536, 40),
            Rows::new(7, 0),
            Rows::new(0, 3),
        ] {
            let blocks: Vec<Range<usize>> = rows.blocks().collect();
            assert!(blocks.len() <= MAX_BLOCKS, "{rows:?}");
            let mut next = 0;
            for block in &blocks {
                assert_eq!(block.start, next, "{rows:?}");
                assert_eq!(block.len() % rows.width.max(1), 0, "whole rows");
                next = block.end;
            }
            assert_eq!(next, rows.len(), "{rows:?}");
        }
    }

    #[test]
    fn folds_merge_in_block_order_on_any_pool() {
        let rows = Rows::new(5000, 31);
        assert!(rows.parallel());
        let run = || fold_blocks(rows, |range| vec![range.start], |total, next| total.extend(next));
        let expected: Vec<usize> = rows.blocks().map(|block| block.start).collect();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            assert_eq!(pool.install(run), Some(expected.clone()), "{threads} threads");
        }
        assert_eq!(fold_blocks(Rows::new(4, 0), |_| 1, |_, _| ()), None);
    }

    #[test]
    fn collected_arrays_have_every_element_written_once() {
        // Ragged last blocks, on one thread and on several.
        for rows in [Rows::new(3001, 49), Rows::new(1001, 3)] {
            let out = collect_blocks(rows, |range, out: &mut [MaybeUninit<usize>]| {
                for (o, i) in out.iter_mut().zip(range) {
                    *o = MaybeUninit::new(i);
                }
            });
            assert_eq!(out, (0..rows.len()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn each_element_belongs_to_one_lane_of_its_own_group() {
        let rows = Rows::new(3, 20);
        let (buffer, results) = collect_by_group(rows, 4, |group, lanes: Vec<&mut [MaybeUninit<usize>]>| {
            assert_eq!(lanes.len(), 3);
            for lane in lanes {
                assert_eq!(lane.len(), 5);
                lane.iter_mut().for_each(|v| *v = MaybeUninit::new(group));
            }
            group * 10
        });
        assert_eq!(results, vec![0, 10, 20, 30]);
        for (i, v) in buffer.iter().enumerate() {
            assert_eq!(*v, i / 5 % 4, "element {i}");
        }
        assert_eq!(map_groups(rows, 3, |g| g + 1), vec![1, 2, 3]);
    }
}
