//! The array math of BatchNorm on contiguous data viewed as `(N, C, S)`: `N` batch rows, `C`
//! channels, `S` positions per channel (the product of the spatial axes, 1 for `(N, C)` input).
//! Everything above (the functional API, the fused tape node, the layer) calls these.
//!
//! Numerics: every sum is accumulated in `f64`, whatever `T` is (f32 sums over 1e6 rows lose 3
//! digits). The input gradient is evaluated in `f64` and rounded once (its terms nearly cancel).
//! The output is evaluated in `T` with the mean split in two `T` parts, so `x - mean` loses
//! nothing to the mean's rounding (see [`normalize`]); it is the one place f32 arithmetic pays:
//! 8 lanes per instruction instead of 4, and no conversions.
//!
//! Work is split into at most [`MAX_BLOCKS`] blocks of whole rows, whose size depends only on
//! the shape, never on the number of threads; per-block partial results are combined in block
//! order. So the result is bit-identical on 1 thread or many, and rayon is used only above
//! [`PARALLEL_MIN_ELEMENTS`]. Few blocks keep the partials small (each is `C` values) even
//! when `C` is large; inside a block, statistics go through long pieces of rows.
//!
//! `(N, C, S)` data with long lanes (feature maps with lanes of 4 KiB or more, 8 channels or
//! more) goes channel by channel instead ([`by_channel`]): each channel's values are read a
//! second time right after the first, from cache where they fit. Each channel is one worker's,
//! so the results are just as independent of the thread count.

use std::mem::MaybeUninit;
use std::ops::Range;

use multiversion::multiversion;
use rayon::prelude::*;
use tape::Element;

pub mod by_channel;

/// Below this many elements everything runs on the calling thread (threads cost more than
/// they save on small inputs).
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 17;

/// The most blocks the rows are split into: enough to share among threads (8 per core here),
/// few enough that the per-block costs stay small beside the data: each block allocates,
/// fills and merges per-channel partials (`C` values each), and for wide rows that is the
/// work of several rows. With 64 blocks the statistics of `1024 x 16384` f32 (16 rows a block)
/// took 8.2 ms here, with 16 blocks 5.4 ms; `4096 x 4096` 6.3 against 5.1 ms.
pub const MAX_BLOCKS: usize = 16;

/// Channels per tile when the backward sums walk `(N, C)` rows (the statistics have their own,
/// [`STATS_TILE`]): the per-channel f64 arrays a loop touches
/// (three of at most 64 KiB each) stay in L2 however wide the layer is. Each channel still adds
/// its rows in order, so tiling changes no result. Not smaller: each tile walks the block again
/// in runs of a tile's width, and L1-sized tiles (512) made the backward sums of `4096 x 4096`
/// f32 slower (4.9 ms against 3.9 ms here).
const CHANNEL_TILE: usize = 8192;

/// The channel ranges of [`CHANNEL_TILE`] channels.
fn channel_tiles(c: usize) -> impl Iterator<Item = Range<usize>> {
    tiles_of(c, CHANNEL_TILE)
}

/// The channel ranges of `width` channels.
fn tiles_of(c: usize, width: usize) -> impl Iterator<Item = Range<usize>> {
    (0..c)
        .step_by(width)
        .map(move |start| start..(start + width).min(c))
}

/// Channels per tile for the statistics: the four per-channel f64 arrays their loop touches
/// take 32 KiB (the size of L1) however wide the layer is. Tiles of 2048 or 4096 channels were
/// no faster here (`4096 x 4096` f32, within the machine's drift).
const STATS_TILE: usize = 1024;

/// Target elements per piece for the statistics (`(N, C)` data): each piece costs a merge per
/// channel, so pieces are long (512 rows of 256 channels); a channel whose one-pass sums
/// cancel reads its column of the piece again, so they are not longer.
const STATS_PIECE_ELEMENTS: usize = 1 << 17;

/// The fewest elements in a block (unless the whole input is smaller): smaller blocks cost
/// more in per-block partials than they share.
const MIN_BLOCK_ELEMENTS: usize = 1 << 15;

/// The `(N, C, S)` view of an input of shape `(N, C, *spatial)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Batch size.
    pub n: usize,
    /// Channels (axis 1).
    pub c: usize,
    /// Positions per channel and row: the product of the axes after the channel (1 if none).
    pub s: usize,
}

impl Dims {
    /// `(N, C, S)` of a shape of rank 2 or more (the caller checks the rank).
    pub fn of(shape: &[usize]) -> Dims {
        Dims {
            n: shape[0],
            c: shape[1],
            s: shape[2..].iter().product(),
        }
    }

    /// Values per channel: the `M` the statistics average over.
    pub fn per_channel(&self) -> usize {
        self.n * self.s
    }

    fn row(&self) -> usize {
        self.c * self.s
    }

    fn len(&self) -> usize {
        self.n * self.row()
    }

    /// Rows per block: a fixed function of the shape. At most [`MAX_BLOCKS`] blocks, each of at
    /// least [`MIN_BLOCK_ELEMENTS`] (in whole rows).
    fn block_rows(&self) -> usize {
        let by_count = self.n.div_ceil(MAX_BLOCKS);
        let by_size = MIN_BLOCK_ELEMENTS.div_ceil(self.row().max(1));
        by_count.max(by_size).max(1)
    }

    fn parallel(&self) -> bool {
        self.len() >= PARALLEL_MIN_ELEMENTS
    }
}

/// Runs `work` on each block of rows (as an element range), on several threads for large
/// inputs, and folds the results in block order: the first block's result is the running total,
/// and `merge(total, next)` adds each next one. `None` when there are no blocks (zero channels,
/// say: rows of width 0 cannot be walked).
#[inline(always)]
fn per_block<R: Send>(
    dims: Dims,
    work: impl Fn(Range<usize>) -> R + Sync + Send,
    merge: impl FnMut(&mut R, R),
) -> Option<R> {
    if dims.len() == 0 {
        return None;
    }
    let rows = dims.block_rows();
    let blocks = dims.n.div_ceil(rows);
    let range = |i: usize| i * rows * dims.row()..((i + 1) * rows).min(dims.n) * dims.row();
    if dims.parallel() {
        let results: Vec<R> = (0..blocks).into_par_iter().map(|i| work(range(i))).collect();
        fold_in_order(results.into_iter(), merge)
    } else {
        // One block after the other, merged as they come: no list of results.
        fold_in_order((0..blocks).map(|i| work(range(i))), merge)
    }
}

/// The first of `results` with each next one merged into it, in order.
#[inline(always)]
fn fold_in_order<R>(mut results: impl Iterator<Item = R>, mut merge: impl FnMut(&mut R, R)) -> Option<R> {
    let mut total = results.next()?;
    for result in results {
        merge(&mut total, result);
    }
    Some(total)
}

/// Runs `f`, which calls several of the functions here one after the other, as one job on
/// rayon's pool for large inputs (else right here), so that their parallel loops start from a
/// pool thread.
///
/// Each parallel loop started from outside the pool wakes the workers and then puts the caller
/// to sleep until they are done; on a busy 2-core VM that costs tens of µs per loop. A training
/// pass has two loops forward and two backward: for `256 x 1024` f32, running the whole pass
/// inside the pool took the median from 250–315 µs to 206–235 µs here.
pub fn on_pool<R: Send>(dims: Dims, f: impl FnOnce() -> R + Send) -> R {
    if dims.parallel() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// Running per-channel count, mean offset (mean minus `x₀`) and sum of squared deviations,
/// merged piece by piece with Chan et al.'s pairwise update.
#[derive(Debug, Clone)]
struct Moments {
    count: f64,
    offset: Vec<f64>,
    m2: Vec<f64>,
}

impl Moments {
    fn new(c: usize) -> Self {
        Moments {
            count: 0.0,
            offset: vec![0.0; c],
            m2: vec![0.0; c],
        }
    }

    /// Merges a piece of `count` values per channel (all channels alike) into these moments.
    #[inline(always)]
    fn merge(&mut self, count: f64, offset: &[f64], m2: &[f64]) {
        chan_merge(self.count, count, &mut self.offset, &mut self.m2, offset, m2);
        self.count += count;
    }

    /// Merges one channel's piece (for lanes of `(N, C, S)` data).
    #[inline(always)]
    fn merge_channel(&mut self, channel: usize, count: f64, offset: f64, m2: f64, seen: f64) {
        let (o, m) = (&mut self.offset[channel], &mut self.m2[channel]);
        chan_update((o, m), (offset, m2), chan_weights(seen, count));
    }
}

/// The weights of [`chan_update`] for a piece of `count` values merged into running moments
/// over `seen` values: `count / total` and `seen · count / total`.
#[inline(always)]
fn chan_weights(seen: f64, count: f64) -> (f64, f64) {
    let total = seen + count;
    (count / total, seen * count / total)
}

/// Chan et al.'s pairwise update of one running mean offset `o` and sum of squared deviations
/// `m` by a piece's own, `(offset, m2)`, with the piece's [`chan_weights`].
#[inline(always)]
fn chan_update((o, m): (&mut f64, &mut f64), (offset, m2): (f64, f64), (weight, spread): (f64, f64)) {
    let delta = offset - *o;
    *o += delta * weight;
    *m += m2 + delta * delta * spread;
}

/// Chan et al.'s pairwise update: merges a piece of `count` values per channel, with mean
/// offsets `offset` and sums of squared deviations `m2`, into running ones over `seen` values.
#[inline(always)]
fn chan_merge(seen: f64, count: f64, acc_offset: &mut [f64], acc_m2: &mut [f64], offset: &[f64], m2: &[f64]) {
    if seen + count == 0.0 {
        return;
    }
    let weights = chan_weights(seen, count);
    for (((o, m), &po), &pm) in acc_offset.iter_mut().zip(acc_m2.iter_mut()).zip(offset).zip(m2) {
        chan_update((o, m), (po, pm), weights);
    }
}

/// The rows of `rows` (rows of width `c > 0`) four at a time, one from each quarter of them;
/// and the rows left over (fewer than four).
///
/// Taking the four rows of a step from the four quarters, not four adjacent rows, makes four
/// long sequential streams, which the hardware prefetchers follow. With adjacent rows the
/// streams interleave in short runs (four rows of `256` f32 share one 4 KiB page), and the
/// backward sums of `65536 x 256` f32 took 6.4 ms here instead of 3.4 ms, about half the copy
/// bandwidth. The order in which a channel adds its rows is still a fixed function of the shape.
#[inline(always)]
fn quarter_steps<T>(rows: &[T], c: usize) -> (impl Iterator<Item = [&[T]; 4]>, &[T]) {
    let quarter = rows.len() / c / 4 * c;
    let (a, rest) = rows.split_at(quarter);
    let (b, rest) = rest.split_at(quarter);
    let (d, rest) = rest.split_at(quarter);
    let (e, left) = rest.split_at(quarter);
    let steps = a
        .chunks_exact(c)
        .zip(b.chunks_exact(c))
        .zip(d.chunks_exact(c))
        .zip(e.chunks_exact(c))
        .map(|(((a, b), d), e)| [a, b, d, e]);
    (steps, left)
}

/// The sums of `d` and `d²` per column `j` of the tile, over every row of `rows` (rows of width
/// `c`), where `d = x - shift[j]`; four rows per step (see [`quarter_steps`]): a
/// quarter of the loads and stores of the sums. Each column adds its rows in the same order
/// whatever the tile.
#[inline(always)]
fn add_shifted_rows<T: Element>(
    rows: &[T],
    c: usize,
    tile: &Range<usize>,
    shift: &[f64],
    (s1, s2): (&mut [f64], &mut [f64]),
) {
    let w = tile.len();
    // Slices cut to one width: the index loops carry no bounds checks and vectorise.
    let (shift, s1, s2) = (&shift[..w], &mut s1[..w], &mut s2[..w]);
    let d = |v: T, j: usize| v.as_f64() - shift[j];
    let (steps, left) = quarter_steps(rows, c);
    for [a, b, e, f] in steps {
        let t = tile.clone();
        let (a, b, e, f) = (
            &a[t.clone()][..w],
            &b[t.clone()][..w],
            &e[t.clone()][..w],
            &f[t][..w],
        );
        for j in 0..w {
            let (da, db, de, df) = (d(a[j], j), d(b[j], j), d(e[j], j), d(f[j], j));
            s1[j] += (da + db) + (de + df);
            s2[j] += (da * da + db * db) + (de * de + df * df);
        }
    }
    for row in left.chunks_exact(c) {
        let v = &row[tile.clone()][..w];
        for j in 0..w {
            let dv = d(v[j], j);
            s1[j] += dv;
            s2[j] += dv * dv;
        }
    }
}

/// Accumulators per lane sum: eight independent partial sums that the compiler keeps in SIMD
/// registers (a single running sum would serialise every addition).
const LANES: usize = 8;

/// Sum of `term(v)` over `values`, in eight interleaved partial sums.
#[inline(always)]
fn lane_sum<T: Copy>(values: &[T], term: impl Fn(T) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut blocks = values.chunks_exact(LANES);
    for block in &mut blocks {
        for (a, &v) in acc.iter_mut().zip(block) {
            *a += term(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(blocks.remainder()) {
        *a += term(v);
    }
    acc.iter().sum()
}

/// A lane's mean offset from `x0` and its sum of squared deviations from that mean: two passes
/// over a short contiguous lane (the second from L1), an exact two-pass result.
#[inline(always)]
fn lane_moments<T: Element>(lane: &[T], x0: f64) -> (f64, f64) {
    let offset = lane_sum(lane, |v| v.as_f64() - x0) / lane.len() as f64;
    let m2 = lane_sum(lane, |v| {
        let d = (v.as_f64() - x0) - offset;
        d * d
    });
    (offset, m2)
}

/// A lane's `[sum(dout), sum(dout · d), sum(d)]` with `d = x - shift` (see [`grad_sums`]), from
/// its `dout` values `g` and its `x` values `v`.
///
/// One loop for the three, each in eight interleaved partial sums as [`lane_sum`] adds them: the
/// same results as three such sums, in a third of the loops (callgrind, `4x8x32x32` f32, the
/// channel-major sums: 26.0M instructions as three loops, 15.5M as one; written with indexing
/// into the blocks instead of zipped iterators, the loop was not vectorised, 49.6M).
#[inline(always)]
fn lane_grad_sums<T: Element>(g: &[T], v: &[T], shift: f64) -> [f64; 3] {
    let (mut sum_g, mut sum_gd, mut sum_d) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
    let mut add = |g: &[T], v: &[T]| {
        let sums = sum_g.iter_mut().zip(sum_gd.iter_mut()).zip(sum_d.iter_mut());
        for (((sg, sgd), sd), (g, v)) in sums.zip(g.iter().zip(v)) {
            let (g, d) = (g.as_f64(), v.as_f64() - shift);
            *sg += g;
            *sgd += g * d;
            if narrower_than_f64::<T>() {
                *sd += d;
            }
        }
    };
    let (mut blocks_g, mut blocks_v) = (g.chunks_exact(LANES), v.chunks_exact(LANES));
    for (block_g, block_v) in (&mut blocks_g).zip(&mut blocks_v) {
        add(block_g, block_v);
    }
    add(blocks_g.remainder(), blocks_v.remainder());
    [sum_g, sum_gd, sum_d].map(|partials| partials.iter().sum())
}

/// Whether backward must recover the batch mean's digits from `x` (see [`centre`]): in training
/// (`batch_stats`) on data narrower than f64, whose node keeps its mean rounded to `T`.
pub const fn recentres<T>(batch_stats: bool) -> bool {
    batch_stats && narrower_than_f64::<T>()
}

/// Whether `T` is narrower than f64 (f32): a value the kernels keep in `T` is then rounded. A
/// constant for each `T`, so the branches on it compile away.
const fn narrower_than_f64<T>() -> bool {
    std::mem::size_of::<T>() < std::mem::size_of::<f64>()
}

/// A piece's mean and sum of squared deviations from its `count` values' sums `s1` of `d` and
/// `s2` of `d²`, where `d` is the value minus a shift: the mean of `d` and `s2 - s1²/count`.
/// Check the result with [`cancelled`].
#[inline(always)]
fn from_shifted_sums(count: f64, s1: f64, s2: f64) -> (f64, f64) {
    let mean = s1 / count;
    (mean, s2 - s1 * mean)
}

/// Whether [`from_shifted_sums`]' subtraction cancelled more digits than
/// [`CANCELLATION_LIMIT`] allows, judged from its result: `s2 / m2 = 1 + count · mean² / m2`.
/// Also true for NaN, and for a negative `m2` (rounding) unless all `d` were 0.
#[inline(always)]
fn cancelled(count: f64, mean: f64, m2: f64) -> bool {
    let (spread, allowed) = (count * mean * mean, (CANCELLATION_LIMIT - 1.0) * m2);
    spread > allowed || spread.is_nan() || allowed.is_nan()
}

/// How much larger than the result `m2` the sum of squares `s2` it is computed from may be:
/// the rounding error of `s2 - s1²/count` is that many times the error of `s2` relative to
/// `m2`, so 16 costs at most 4 of f64's 53 bits (a two-pass sum of squared deviations has
/// ratio 1). With the piece's first row as the shift the ratio is `1 + z²`, `z` that row's
/// distance from the piece's mean in standard deviations: it exceeds 16 for an outlier beyond
/// ~3.9 (about one channel-piece in 10 000 for normal data), and then that channel's piece is
/// summed again in two passes. A running mean as the shift was no better for independent
/// values and far worse for a batch sorted along `N` (every piece cancelled, and the
/// statistics of `65536 x 256` f32 took 55 ms instead of 4).
const CANCELLATION_LIMIT: f64 = 16.0;

/// The fallback for a [`cancelled`] piece: the mean of `d = v - shift` over `values`
/// and the sum of squared deviations from it, with the corrected two-pass algorithm (Chan,
/// Golub and LeVeque): a first mean, then the deviations from it, whose sum corrects the mean
/// for the rounding of the first pass (a shift far from the data makes the partial sums of `d`
/// large).
#[cold]
fn two_pass(values: impl Iterator<Item = f64> + Clone, shift: f64) -> (f64, f64) {
    let d = move |v: f64| v - shift;
    let (mut count, mut sum) = (0.0, 0.0);
    for v in values.clone() {
        count += 1.0;
        sum += d(v);
    }
    let first = sum / count;
    let (mut sum_e, mut sum_e2) = (0.0, 0.0);
    for v in values {
        let e = d(v) - first;
        sum_e += e;
        sum_e2 += e * e;
    }
    (first + sum_e / count, sum_e2 - sum_e * sum_e / count)
}

/// Per-channel batch statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Mean of each channel.
    pub mean: Vec<f64>,
    /// Biased variance (divided by `M`) of each channel.
    pub var: Vec<f64>,
    /// Channels whose variance overflowed f64 (data beyond about 1e154):
    /// `(channel, scale, var / scale²)`, enough to get a finite standard deviation.
    overflowed: Vec<(usize, f64, f64)>,
}

impl Stats {
    /// `1 / sqrt(var + eps)` per channel: finite where `var` overflowed (computed from the
    /// scaled variance), and 0 where `var + eps == 0` (a constant channel with `eps = 0`, whose
    /// normalized value is then defined as 0, so the output is `beta`, not NaN).
    pub fn inv_std(&self, eps: f64) -> Vec<f64> {
        let mut inv_std = inv_std(&self.var, eps);
        for &(channel, scale, var_scaled) in &self.overflowed {
            inv_std[channel] = scaled_inv_std(scale, var_scaled, eps);
        }
        inv_std
    }
}

/// `1 / sqrt(var + eps)` of a variance that overflowed, from `var / scale²`.
fn scaled_inv_std(scale: f64, var_scaled: f64, eps: f64) -> f64 {
    1.0 / (scale * (var_scaled + eps / scale / scale).sqrt())
}

/// `1 / sqrt(var + eps)`, and 0 where `var + eps == 0` (see [`Stats::inv_std`]).
pub fn inv_std(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter().map(|&v| channel_inv_std(v, eps)).collect()
}

/// [`inv_std`] of one channel.
#[inline(always)]
fn channel_inv_std(var: f64, eps: f64) -> f64 {
    if var + eps == 0.0 {
        0.0
    } else {
        1.0 / (var + eps).sqrt()
    }
}

/// Per-channel mean and biased variance of `x`, in `f64`, reading `x` once.
///
/// `(N, C)` data: each piece (a run of rows of a block) is summed in one pass as `d` and `d²`,
/// with `d` the value minus the piece's first row, which gives the piece's mean and its sum of
/// squared deviations `Σd² - (Σd)²/n`. That subtraction cancels digits only where the shift is
/// far from the piece's mean in standard deviations (an outlier as the first row); where it
/// would cost more than 4 bits (see `CANCELLATION_LIMIT`) that channel's piece is summed again
/// in two passes, mean first, then squared deviations from it, which cancels nothing. So
/// outliers cost no accuracy, and typical data is read once: with two passes over every piece
/// (the second from L2) the statistics of `65536 x 256` f32 took 5.4 ms here, this way 3.6 ms.
/// `(N, C, S)` data: each lane of `S` values is contiguous and small, and gets two passes (the
/// second from L1). Pieces and lanes, then blocks, are merged in order with Chan et al.'s
/// pairwise formula.
///
/// Every value is taken relative to `x₀`, the channel's first value: a constant channel then
/// sums exact zeros, so its mean is exactly its value and its variance exactly 0, whatever the
/// value (a plain sum of 1e30 repeated is not exact in f64).
pub fn stats<T: Element>(x: &[T], dims: Dims) -> Stats {
    let c = dims.c;
    // (For rows of channels the first row itself, converted in one vectorised loop.)
    let x0: Vec<f64> = if dims.s == 1 {
        x.get(..c)
            .map_or_else(|| vec![0.0; c], |row| row.iter().map(|v| v.as_f64()).collect())
    } else {
        (0..c)
            .map(|ch| x.get(ch * dims.s).map_or(0.0, |v| v.as_f64()))
            .collect()
    };
    // The first block's moments are the running total (merging them into zeros would copy them
    // exactly), and become the statistics in place.
    let total = per_block(
        dims,
        |range| block_moments(&x[range], dims, &x0),
        |total, block| total.merge(block.count, &block.offset, &block.m2),
    );
    let Moments {
        count,
        offset: mut mean,
        m2: mut var,
    } = total.unwrap_or_else(|| Moments::new(c));
    for (m, x0) in mean.iter_mut().zip(&x0) {
        *m += x0;
    }
    for v in &mut var {
        *v /= count;
    }
    let mut stats = Stats {
        mean,
        var,
        overflowed: Vec::new(),
    };
    rescue_overflow(x, dims, &mut stats);
    stats
}

/// (Compiled for AVX2 + FMA too, chosen at run time: the per-block workers are where the
/// time goes.)
#[multiversion(targets("x86_64+avx2+fma"))]
fn block_moments<T: Element>(data: &[T], dims: Dims, x0: &[f64]) -> Moments {
    let c = dims.c;
    let mut moments = Moments::new(c);
    if dims.s == 1 {
        // The sums and shifts of a piece, one allocation cut in three.
        let mut scratch = vec![0.0; 3 * c];
        let [s1, s2, shift] = parts_mut(&mut scratch, c);
        for tile in tiles_of(c, STATS_TILE) {
            let w = tile.len();
            let rows_per_piece = (STATS_PIECE_ELEMENTS / w).max(1);
            let x0 = &x0[tile.clone()][..w];
            let (s1, s2) = (&mut s1[tile.clone()][..w], &mut s2[tile.clone()][..w]);
            let shift = &mut shift[tile.clone()][..w];
            let mut seen = 0.0;
            for piece in data.chunks(rows_per_piece * c) {
                let count = (piece.len() / c) as f64;
                // The piece's first row is its shift: a value of the piece's own data, near its
                // mean even where the batch drifts or is sorted. (One subtraction per value: for
                // f32 data `v - shift` is exact in f64, and 0 wherever `v` equals the shift.)
                for (h, v) in shift.iter_mut().zip(&piece[tile.clone()]) {
                    *h = v.as_f64();
                }
                s1.fill(0.0);
                s2.fill(0.0);
                add_shifted_rows(piece, c, &tile, shift, (&mut *s1, &mut *s2));
                // In place: s1 becomes each channel's piece mean minus its shift, s2 its sum of
                // squared deviations (a vectorised loop; the rare cancelled channel is redone).
                let mut any_cancelled = false;
                for j in 0..w {
                    let (mean, m2) = from_shifted_sums(count, s1[j], s2[j]);
                    (s1[j], s2[j]) = (mean, m2);
                    any_cancelled |= cancelled(count, mean, m2);
                }
                if any_cancelled {
                    for j in 0..w {
                        if cancelled(count, s1[j], s2[j]) {
                            let column = piece[tile.start + j..].iter().step_by(c);
                            (s1[j], s2[j]) = two_pass(column.map(|v| v.as_f64()), shift[j]);
                        }
                    }
                }
                // The piece's mean offsets (from x₀), merged into the block's.
                for ((m, h), z) in s1.iter_mut().zip(&*shift).zip(x0) {
                    *m += h - z;
                }
                let offset = &mut moments.offset[tile.clone()][..w];
                let m2 = &mut moments.m2[tile.clone()][..w];
                chan_merge(seen, count, offset, m2, s1, s2);
                seen += count;
            }
        }
        moments.count = (data.len() / c) as f64;
    } else {
        let count = dims.s as f64;
        for (row_index, row) in data.chunks_exact(dims.row()).enumerate() {
            let seen = (row_index * dims.s) as f64;
            for (channel, (lane, &z)) in row.chunks_exact(dims.s).zip(x0).enumerate() {
                // (One pass per lane was no faster: `32 x 64 x 56 x 56` f32 is bound by memory
                // either way.)
                let (offset, m2) = lane_moments(lane, z);
                moments.merge_channel(channel, count, offset, m2, seen);
            }
        }
        moments.count = (data.len() / c.max(1)) as f64;
    }
    moments
}

/// Only for f64 data beyond about 1e150 in magnitude, whose squares overflow: recomputes those
/// channels with values scaled by the channel's largest magnitude.
#[cold]
fn rescue_overflow<T: Element>(x: &[T], dims: Dims, stats: &mut Stats) {
    // One vectorised check first: `v · 0` is 0 for a finite value and NaN otherwise, and their
    // sums in independent lanes vectorise (a fold of `is_finite` did not: 600 instructions for 64
    // channels, 300 this way). The loop below is for the rare channel.
    let not_finite = |v: &[f64]| lane_sum(v, |v| v * 0.0) != 0.0;
    if !(not_finite(&stats.mean) | not_finite(&stats.var)) {
        return;
    }
    for channel in 0..dims.c {
        if stats.mean[channel].is_finite() && stats.var[channel].is_finite() {
            continue;
        }
        if let Some(rescued) = rescue_channel(x, dims, channel) {
            stats.mean[channel] = rescued.mean;
            stats.var[channel] = rescued.var;
            stats
                .overflowed
                .push((channel, rescued.scale, rescued.var_scaled));
        }
    }
}

/// A channel's statistics recomputed with its values scaled by its largest magnitude (see
/// [`rescue_overflow`]); `None` where that cannot help (all zero, or not finite).
#[cold]
fn rescue_channel<T: Element>(x: &[T], dims: Dims, channel: usize) -> Option<Rescued> {
    let m = dims.per_channel() as f64;
    let values = || channel_values(x, dims, channel);
    let scale = values().fold(0.0f64, |a, v| a.max(v.abs()));
    if scale == 0.0 || !scale.is_finite() {
        return None;
    }
    let mean = scale * values().map(|v| v / scale).sum::<f64>() / m;
    let var_scaled = values().map(|v| ((v - mean) / scale).powi(2)).sum::<f64>() / m;
    Some(Rescued {
        mean,
        var: var_scaled * scale * scale, // may still be inf
        scale,
        var_scaled,
    })
}

/// What [`rescue_channel`] found: mean and variance, and the scale the variance was computed
/// at (`var = var_scaled · scale²`).
struct Rescued {
    mean: f64,
    var: f64,
    scale: f64,
    var_scaled: f64,
}

/// The `N` lanes of one channel of `values` (row-major `N x C x S`), in row order (only those are
/// visited, not every lane of every row).
fn channel_lanes<T>(values: &[T], dims: Dims, channel: usize) -> impl Iterator<Item = &[T]> {
    values
        .chunks_exact(dims.row().max(1))
        .map(move |row| &row[channel * dims.s..][..dims.s])
}

/// The values of one channel, row by row, as f64.
fn channel_values<T: Element>(x: &[T], dims: Dims, channel: usize) -> impl Iterator<Item = f64> + '_ {
    channel_lanes(x, dims, channel).flatten().map(|v| v.as_f64())
}

/// Per-channel affine map `out = (x - mean) · scale + shift`. With `scale = gamma · inv_std`
/// and `shift = beta` it is the BatchNorm output; `x == mean` gives exactly `shift`.
///
/// Evaluated in `T`'s own arithmetic (see `SplitAffine`), or in f64 and rounded once where a
/// coefficient does not fit `T`. Written block by block (in parallel above
/// [`PARALLEL_MIN_ELEMENTS`]) straight into the new array; each element depends only on its own
/// inputs, so the split cannot change a result.
pub fn normalize<T: Element>(x: &[T], dims: Dims, mean: &[f64], scale: &[f64], shift: &[f64]) -> Vec<T> {
    if let Some(k) = SplitAffine::<T>::new(mean, scale, shift) {
        let map = split_affine_value::<T>;
        collect_blocks(dims, |range, out| {
            normalize_block(&x[range], out, dims, k.parts(), map)
        })
    } else {
        let k = [mean, mean, scale, shift];
        let map = |v: T, mu: f64, _: f64, a: f64, b: f64| affine_value(v, mu, a, b);
        collect_blocks(dims, |range, out| normalize_block(&x[range], out, dims, k, map))
    }
}

/// One output value in `T`'s arithmetic from [`SplitAffine`]'s coefficients:
/// `((x - mean_hi) - mean_lo) · scale + shift`.
#[inline(always)]
fn split_affine_value<T: Element>(v: T, mean_hi: T, mean_lo: T, scale: T, shift: T) -> T {
    ((v - mean_hi) - mean_lo) * scale + shift
}

/// One output value evaluated in f64 and rounded once: `(x - mean) · scale + shift`.
#[inline(always)]
fn affine_value<T: Element>(v: T, mean: f64, scale: f64, shift: f64) -> T {
    T::from_f64_lossy((v.as_f64() - mean) * scale + shift)
}

/// The per-channel coefficients of [`normalize`] rounded to `T`, for evaluating it in `T`'s
/// arithmetic (8 lanes of f32 per AVX2 instruction instead of 4 of f64, and no conversions).
/// The mean is split in two, `mean_hi + mean_lo`, so `(x - mean_hi) - mean_lo` keeps the digits
/// a rounded mean would lose (`x - mean` in f32 near mean 1e4 would be off by up to 5e-4), and
/// `x == mean` still gives exactly 0. (f64 data does not need it: see [`SplitAffine::new`].)
struct SplitAffine<T> {
    /// `mean_hi`, `mean_lo`, `scale` and `shift`, `C` values each, in one allocation.
    coefficients: Vec<T>,
}

impl<T: Element> SplitAffine<T> {
    /// `None` when a coefficient overflows `T` (a huge `gamma` in f32, say): [`normalize`] then
    /// evaluates in f64, where `0 · scale` stays 0 instead of `0 · inf = NaN`. Also `None` for a
    /// `T` as wide as f64: evaluating in f64 is then its own arithmetic, the same results
    /// without rounding or splitting coefficients (`64x64` f64: 2 000 instructions a pass, and
    /// a subtraction per value, fewer).
    fn new(mean: &[f64], scale: &[f64], shift: &[f64]) -> Option<Self> {
        if !narrower_than_f64::<T>() {
            return None;
        }
        let mut coefficients = vec![T::zero(); 4 * mean.len()];
        split_coefficients(mean, scale, shift, &mut coefficients).then_some(SplitAffine { coefficients })
    }

    /// `[mean_hi, mean_lo, scale, shift]`.
    fn parts(&self) -> [&[T]; 4] {
        parts(&self.coefficients, self.coefficients.len() / 4)
    }
}

/// [`SplitAffine::new`]'s coefficients written into `coefficients` (`4 · C` values); false
/// where one overflows `T`. (Compiled for AVX2 too: 64 channels cost 1 500 instructions in
/// baseline x86-64.)
#[multiversion(targets("x86_64+avx2+fma"))]
fn split_coefficients<T: Element>(
    mean: &[f64],
    scale: &[f64],
    shift: &[f64],
    coefficients: &mut [T],
) -> bool {
    let c = mean.len();
    let [mean_hi, mean_lo, scale_t, shift_t] = parts_mut(coefficients, c);
    // Rounds `values` into `rounded`; false where a finite value became infinite (a
    // non-finite one stays as it is: f64 evaluation would not help it). The check rides in
    // the rounding loop, with no early exit, and tests finiteness as `v · 0 == 0` (the
    // integer test of `is_finite` kept the loop from vectorising), so the loop vectorises.
    let round = |values: &[f64], rounded: &mut [T]| {
        let mut fits = true;
        for (r, &v) in rounded.iter_mut().zip(values) {
            *r = T::from_f64_lossy(v);
            fits &= (*r * T::zero() == T::zero()) | (v * 0.0 != 0.0);
        }
        fits
    };
    // `&`, not `&&`: all three are rounded either way.
    if !(round(mean, mean_hi) & round(scale, scale_t) & round(shift, shift_t)) {
        return false;
    }
    // The rest is smaller than half a unit of `mean_hi`'s last place: it fits where `mean_hi`
    // does (and is NaN where the mean is not finite).
    for ((lo, hi), &m) in mean_lo.iter_mut().zip(&*mean_hi).zip(mean) {
        *lo = T::from_f64_lossy(m - hi.as_f64());
    }
    true
}

/// [`normalize`] of one block of rows into `out`: `map(x, k₀, k₁, k₂, k₃)` with each channel's
/// four coefficients.
#[multiversion(targets("x86_64+avx2+fma"))]
fn normalize_block<T: Element, K: Copy, F: Fn(T, K, K, K, K) -> T>(
    x: &[T],
    out: &mut [MaybeUninit<T>],
    dims: Dims,
    k: [&[K]; 4],
    map: F,
) {
    if dims.s == 1 {
        // Slices cut to one width: the index loop carries no bounds checks and vectorises.
        let c = dims.c;
        let [k0, k1, k2, k3] = k;
        let (k0, k1, k2, k3) = (&k0[..c], &k1[..c], &k2[..c], &k3[..c]);
        for (o, v) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let (o, v) = (&mut o[..c], &v[..c]);
            for j in 0..c {
                o[j] = MaybeUninit::new(map(v[j], k0[j], k1[j], k2[j], k3[j]));
            }
        }
    } else {
        let (s, row) = (dims.s, dims.row());
        for (o_row, x_row) in out.chunks_exact_mut(row).zip(x.chunks_exact(row)) {
            let lanes = o_row.chunks_exact_mut(s).zip(x_row.chunks_exact(s));
            for (ch, (o_lane, x_lane)) in lanes.enumerate() {
                let [k0, k1, k2, k3] = k.map(|k| k[ch]);
                for (o, &v) in o_lane.iter_mut().zip(x_lane) {
                    *o = MaybeUninit::new(map(v, k0, k1, k2, k3));
                }
            }
        }
    }
}

/// A new array of `dims`' size, written by `fill(range, out)` for each block of rows: `range`
/// is the block's place in the flat data, `out` its part of the new array, which `fill` must
/// write entirely. Blocks run in parallel above [`PARALLEL_MIN_ELEMENTS`].
///
/// The array is never zero-filled first: that would be one more pass over memory, and for
/// large outputs the costliest one (a single-threaded `memset`). The workers below write every
/// element of their block (they walk it in whole rows, and a block is whole rows).
#[inline(always)]
fn collect_blocks<T: Element>(
    dims: Dims,
    fill: impl Fn(Range<usize>, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let block = dims.block_rows() * dims.row();
    let (out, ()) = written(dims.len(), |spare| {
        if block == 0 {
            return;
        }
        let work = |(i, part): (usize, &mut [MaybeUninit<T>])| fill(i * block..i * block + part.len(), part);
        if dims.parallel() {
            spare.par_chunks_mut(block).enumerate().for_each(work);
        } else {
            spare.chunks_mut(block).enumerate().for_each(work);
        }
    });
    out
}

/// A new `Vec` of `len` elements, each written by `write` (which gets them uninitialised and
/// must write every one: its callers, [`collect_blocks`] and the channel-major passes of
/// [`by_channel`], do); and what `write` returned.
#[inline(always)]
fn written<T, R>(len: usize, write: impl FnOnce(&mut [MaybeUninit<T>]) -> R) -> (Vec<T>, R) {
    let mut out = Vec::with_capacity(len);
    let result = write(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is at least `len`, and `write` wrote each of the first `len`
    // elements. For `collect_blocks`: the blocks cover them, and every worker writes its whole
    // block (`normalize_block` and `input_grad_block` write each element of each whole row they
    // are given; blocks are whole rows, `block_rows() · row()` elements, the last one fewer
    // rows). For `by_channel`: every lane of every row goes to exactly one channel, whose worker
    // writes each element of each of its lanes. Tested against a direct computation on shapes
    // with ragged last blocks, and in parallel.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(len);
    }
    (out, result)
}

/// The `K` consecutive parts of `c` values each of `all`: per-channel vectors that share one
/// allocation (`all` holds at least `K · c` values).
#[inline(always)]
pub(crate) fn parts_mut<T, const K: usize>(mut all: &mut [T], c: usize) -> [&mut [T]; K] {
    std::array::from_fn(|_| {
        let (part, rest) = std::mem::take(&mut all).split_at_mut(c);
        all = rest;
        part
    })
}

/// [`parts_mut`] to read.
#[inline(always)]
pub(crate) fn parts<T, const K: usize>(mut all: &[T], c: usize) -> [&[T]; K] {
    std::array::from_fn(|_| {
        let (part, rest) = all.split_at(c);
        all = rest;
        part
    })
}

/// The per-channel sums backward needs, from one pass reading `dout` and `x`, with `d = x - shift`:
/// `sum(dout)`, `sum(dout · d)` and `sum(d)`. The last centres the others on the batch mean when
/// `shift` is that mean rounded to `T` (see [`GradSums::centre_all`]); for f64 data, whose mean is
/// kept exactly, it would be a correction of 0 up to rounding, and is left at 0 (the pass then
/// costs what it did before the node kept its mean in `T`).
pub fn grad_sums<T: Element>(dout: &[T], x: &[T], dims: Dims, shift: &[f64]) -> GradSums {
    // The first block's sums are the running total (adding them to zeros would copy them, up to
    // the sign of a zero).
    let sums = per_block(
        dims,
        |range| block_grad_sums(&dout[range.clone()], &x[range], dims, shift),
        |total, block| {
            for (t, b) in total.0.iter_mut().zip(&block.0) {
                *t += b;
            }
        },
    );
    sums.unwrap_or_else(|| GradSums::zeros(dims.c))
}

/// [`grad_sums`]' three per-channel vectors in one allocation: `[sum(dout) | sum(dout · d) |
/// sum(d)]`, with `d = x - shift`.
#[derive(Debug, Clone, PartialEq)]
pub struct GradSums(Vec<f64>);

impl GradSums {
    fn zeros(c: usize) -> Self {
        GradSums(vec![0.0; 3 * c])
    }

    /// Turns the sums into `[sum(dout) | sum(dout · (x - mean)) | mean]` per channel, in place,
    /// each channel's from [`centre`] (`m` values per channel; `recentre` as there).
    pub fn centre_all(&mut self, shift: &[f64], m: f64, recentre: bool) {
        let c = shift.len();
        let [sum_dout, sum_dout_xmu, mean] = self.parts_mut();
        if recentre {
            // Slices cut to one width: the loop carries no bounds checks.
            let (sum_dout, sum_dout_xmu, mean, shift) = (
                &sum_dout[..c],
                &mut sum_dout_xmu[..c],
                &mut mean[..c],
                &shift[..c],
            );
            for ch in 0..c {
                (mean[ch], sum_dout_xmu[ch]) =
                    centre(true, shift[ch], sum_dout[ch], sum_dout_xmu[ch], mean[ch], m);
            }
        } else {
            // `centre` without recentring: the mean is the shift, the sums stay (no loop).
            mean.copy_from_slice(shift);
        }
    }

    /// The three per-channel vectors, to read or change in place.
    pub fn parts_mut(&mut self) -> [&mut [f64]; 3] {
        let c = self.0.len() / 3;
        parts_mut(&mut self.0, c)
    }

    /// The values, all three vectors one after the other.
    pub fn into_vec(self) -> Vec<f64> {
        self.0
    }
}

/// The gradients of `beta` and `gamma` per channel, in one allocation: `[dbeta | dgamma | ...]`
/// (the backward pass's sums, turned into them in place).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGrads {
    values: Vec<f64>,
    c: usize,
}

impl ParamGrads {
    /// `values` holds `dbeta` then `dgamma`, `c` values each (and possibly more after them).
    pub fn new(values: Vec<f64>, c: usize) -> Self {
        debug_assert!(values.len() >= 2 * c);
        ParamGrads { values, c }
    }

    /// `dbeta = sum(dout)` per channel.
    pub fn dbeta(&self) -> &[f64] {
        &self.values[..self.c]
    }

    /// `dgamma = sum(dout · x̂)` per channel.
    pub fn dgamma(&self) -> &[f64] {
        &self.values[self.c..2 * self.c]
    }
}

/// One channel's mean and `sum(dout · (x - mean))`, from the sums of [`grad_sums`] taken
/// relative to `shift`. With `recentre` (training on data narrower than f64, see [`recentres`])
/// the mean is the batch mean, `mean = shift + offset` with `offset = sum(d) / m`, and
/// `sum(dout · (x - mean)) = sum(dout · d) - offset · sum(dout)`; otherwise the mean is `shift`
/// itself (a running mean, or a batch mean kept exactly) and the sum is `sum(dout · d)`.
///
/// This is how backward gets the mean without the node keeping it in f64: the node keeps it
/// rounded to `T` as `shift` (half the bytes for f32), and this sum, one addition per value in the
/// pass backward makes anyway, restores the digits the rounding lost. The subtraction cancels
/// only as far as `shift` is from the mean in standard deviations: for f32 data the rounding
/// moves it by at most half an f32 ulp of the mean, for f64 data not at all (to rounding).
/// A `sum(d)` that is not finite (only for non-finite input: f32 values cannot overflow an f64
/// sum, and f64 data skips it) leaves `shift` as the mean.
#[inline(always)]
pub fn centre(recentre: bool, shift: f64, sum_dout: f64, sum_dout_d: f64, sum_d: f64, m: f64) -> (f64, f64) {
    if !recentre {
        return (shift, sum_dout_d);
    }
    let offset = sum_d / m;
    // `offset * 0.0 == 0.0` is `is_finite` written so that loops over channels vectorise (the
    // integer test `is_finite` compiles to does not, in baseline x86-64).
    let offset = if offset * 0.0 == 0.0 { offset } else { 0.0 };
    (shift + offset, sum_dout_d - offset * sum_dout)
}

/// [`grad_sums`] over one block.
#[multiversion(targets("x86_64+avx2+fma"))]
fn block_grad_sums<T: Element>(dout: &[T], x: &[T], dims: Dims, shift: &[f64]) -> GradSums {
    let c = dims.c;
    let mut sums = GradSums::zeros(c);
    let [sum_dout, sum_dout_d, sum_d] = sums.parts_mut();
    if dims.s == 1 {
        for tile in channel_tiles(c) {
            // Slices cut to one width: the index loops carry no bounds checks and vectorise.
            let w = tile.len();
            let sum_dout = &mut sum_dout[tile.clone()][..w];
            let sum_dout_d = &mut sum_dout_d[tile.clone()][..w];
            let sum_d = &mut sum_d[tile.clone()][..w];
            let shift = &shift[tile.clone()][..w];
            // Four rows at a time: a quarter of the loads and stores of the sums.
            let (g_steps, g_left) = quarter_steps(dout, c);
            let (x_steps, x_left) = quarter_steps(x, c);
            for ([g0, g1, g2, g3], [v0, v1, v2, v3]) in g_steps.zip(x_steps) {
                let t = tile.clone();
                let (g0, g1, g2, g3) = (
                    &g0[t.clone()][..w],
                    &g1[t.clone()][..w],
                    &g2[t.clone()][..w],
                    &g3[t.clone()][..w],
                );
                let (v0, v1, v2, v3) = (
                    &v0[t.clone()][..w],
                    &v1[t.clone()][..w],
                    &v2[t.clone()][..w],
                    &v3[t][..w],
                );
                for j in 0..w {
                    let (a, b, d, e) = (g0[j].as_f64(), g1[j].as_f64(), g2[j].as_f64(), g3[j].as_f64());
                    let u = shift[j];
                    let (d0, d1, d2, d3) = (
                        v0[j].as_f64() - u,
                        v1[j].as_f64() - u,
                        v2[j].as_f64() - u,
                        v3[j].as_f64() - u,
                    );
                    sum_dout[j] += (a + b) + (d + e);
                    sum_dout_d[j] += (a * d0 + b * d1) + (d * d2 + e * d3);
                    if narrower_than_f64::<T>() {
                        sum_d[j] += (d0 + d1) + (d2 + d3);
                    }
                }
            }
            for (g_row, x_row) in g_left.chunks_exact(c).zip(x_left.chunks_exact(c)) {
                let (g, v) = (&g_row[tile.clone()][..w], &x_row[tile.clone()][..w]);
                for j in 0..w {
                    let (gj, dj) = (g[j].as_f64(), v[j].as_f64() - shift[j]);
                    sum_dout[j] += gj;
                    sum_dout_d[j] += gj * dj;
                    if narrower_than_f64::<T>() {
                        sum_d[j] += dj;
                    }
                }
            }
        }
    } else {
        for (g_row, x_row) in dout.chunks_exact(dims.row()).zip(x.chunks_exact(dims.row())) {
            let lanes = g_row.chunks_exact(dims.s).zip(x_row.chunks_exact(dims.s));
            for (ch, (g, v)) in lanes.enumerate() {
                let [lane_dout, lane_dout_d, lane_d] = lane_grad_sums(g, v, shift[ch]);
                sum_dout[ch] += lane_dout;
                sum_dout_d[ch] += lane_dout_d;
                sum_d[ch] += lane_d;
            }
        }
    }
    sums
}

/// One value of [`input_grad`]: `a · dout + b · (x - mean) + d` from its channel's
/// coefficients `[a, b, d]`, evaluated in f64 and rounded once.
#[inline(always)]
fn input_grad_value<T: Element>(g: T, v: T, mean: f64, [a, b, d]: [f64; 3]) -> T {
    T::from_f64_lossy(a * g.as_f64() + b * (v.as_f64() - mean) + d)
}

/// One channel's coefficients `[grad_scale, xmu_scale, offset]` of [`input_grad`], from its
/// `gamma`, `inv_std`, `sum(dout)`, `dgamma = sum(dout · x̂)` and `m` values; `batch_stats` says
/// whether mean and `inv_std` are the batch's own (training) or constants (evaluation).
///
/// `dx = a · (dout - mean(dout) - x̂ · mean(dout · x̂))` with `a = gamma · inv_std` and
/// `x̂ = (x - mean) · inv_std`: `grad_scale = a`, `xmu_scale = -a · inv_std · dgamma / m`,
/// `offset = -a · sum(dout) / m`; in evaluation mode the last two are 0.
#[inline(always)]
pub fn input_grad_coefficients(
    gamma: f64,
    inv_std: f64,
    sum_dout: f64,
    dgamma: f64,
    m: f64,
    batch_stats: bool,
) -> [f64; 3] {
    let a = gamma * inv_std;
    if batch_stats {
        [a, -a * inv_std * (dgamma / m), -a * (sum_dout / m)]
    } else {
        [a, 0.0, 0.0]
    }
}

/// The input gradient, one pass writing `dx`, an affine map of `dout` and `x - mean` per
/// channel: `dx = grad_scale · dout + xmu_scale · (x - mean) + offset`.
///
/// From the training-mode formula `dx = a · (dout - mean(dout) - x̂ · mean(dout · x̂))` with
/// `a = gamma · inv_std` and `x̂ = (x - mean) · inv_std`: `grad_scale = a`,
/// `xmu_scale = -a · inv_std · mean(dout · x̂)`, `offset = -a · mean(dout)`. In evaluation mode
/// the last two are 0.
pub fn input_grad<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    mean: &[f64],
    grad_scale: &[f64],
    xmu_scale: &[f64],
    offset: &[f64],
) -> Vec<T> {
    let k = [mean, grad_scale, xmu_scale, offset];
    collect_blocks(dims, |range, out| {
        input_grad_block(&dout[range.clone()], &x[range], out, dims, k)
    })
}

/// [`input_grad`] of one block of rows into `out`; `k` holds the per-channel mean,
/// `grad_scale`, `xmu_scale` and `offset`.
///
/// Unlike [`normalize`], evaluated in f64 whatever `T` is: the three terms nearly cancel where
/// `dout` is close to its projection (with two values per channel `dx` is 0 up to `eps`), and in
/// f32 the rounding of each term would be an error of the order of the terms, not of `dx`.
#[multiversion(targets("x86_64+avx2+fma"))]
fn input_grad_block<T: Element>(dout: &[T], x: &[T], out: &mut [MaybeUninit<T>], dims: Dims, k: [&[f64]; 4]) {
    let map =
        |g: T, v: T, mu: f64, a: f64, b: f64, d: f64| MaybeUninit::new(input_grad_value(g, v, mu, [a, b, d]));
    let [mean, grad_scale, xmu_scale, offset] = k;
    if dims.s == 1 {
        // Slices cut to one width: the index loop carries no bounds checks and vectorises.
        let c = dims.c;
        let (mean, a, b, d) = (&mean[..c], &grad_scale[..c], &xmu_scale[..c], &offset[..c]);
        let rows = out
            .chunks_exact_mut(c)
            .zip(dout.chunks_exact(c))
            .zip(x.chunks_exact(c));
        for ((o, g), v) in rows {
            let (o, g, v) = (&mut o[..c], &g[..c], &v[..c]);
            for j in 0..c {
                o[j] = map(g[j], v[j], mean[j], a[j], b[j], d[j]);
            }
        }
    } else {
        let (s, row) = (dims.s, dims.row());
        let rows = out
            .chunks_exact_mut(row)
            .zip(dout.chunks_exact(row))
            .zip(x.chunks_exact(row));
        for ((o_row, g_row), x_row) in rows {
            let lanes = o_row
                .chunks_exact_mut(s)
                .zip(g_row.chunks_exact(s))
                .zip(x_row.chunks_exact(s));
            for (ch, ((o_lane, g_lane), x_lane)) in lanes.enumerate() {
                let (mu, a, b, d) = (mean[ch], grad_scale[ch], xmu_scale[ch], offset[ch]);
                for ((o, &g), &v) in o_lane.iter_mut().zip(g_lane).zip(x_lane) {
                    *o = map(g, v, mu, a, b, d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(n: usize, c: usize, s: usize) -> Dims {
        Dims { n, c, s }
    }

    /// Deterministic values spread over [shift, shift + 375), in a scrambled order.
    fn spread_values(len: usize, shift: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.37 + shift)
            .collect()
    }

    /// Deterministic upstream gradients in [-5, 5), in a scrambled order.
    fn upstream_values(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 104_729) % 997) as f32 * 0.01 - 5.0)
            .collect()
    }

    #[test]
    fn stats_are_per_channel_and_biased() {
        // (N=2, C=2, S=2): channel 0 holds 1,2,5,6; channel 1 holds 3,4,7,8.
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let stats = stats(&x, dims(2, 2, 2));
        assert_eq!(stats.mean, vec![3.5, 5.5]);
        assert_eq!(stats.var, vec![4.25, 4.25]);
    }

    #[test]
    fn chunking_is_independent_of_the_thread_count() {
        // Big enough to run in parallel; rerun on a one-thread pool and compare bits.
        let d = dims(8192, 3, 17);
        let (x, g) = (spread_values(d.len(), -100.0), upstream_values(d.len()));
        assert!(d.parallel());
        let run = || {
            let st = stats(&x, d);
            let sums = grad_sums(&g, &x, d, &st.mean);
            (st, sums)
        };
        let many = run();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(many, one);
    }

    fn compensated_sum(values: impl Iterator<Item = f64>) -> f64 {
        let (mut sum, mut compensation) = (0.0f64, 0.0f64);
        for v in values {
            let t = sum + v;
            compensation += if sum.abs() >= v.abs() {
                (sum - t) + v
            } else {
                (v - t) + sum
            };
            sum = t;
        }
        sum + compensation
    }

    /// Mean and biased variance of one channel of `x`, summed with Neumaier's compensation: the
    /// reference the statistics are checked against.
    fn exact_moments(x: &[f64], d: Dims, channel: usize) -> (f64, f64) {
        let values: Vec<f64> = channel_values(x, d, channel).collect();
        let n = values.len() as f64;
        let mean = compensated_sum(values.iter().copied()) / n;
        let var = compensated_sum(values.iter().map(|v| (v - mean).powi(2))) / n;
        (mean, var)
    }

    #[test]
    fn outliers_do_not_cost_accuracy() {
        // A huge value starts every lane and the channel (x₀), the rest is small noise around 3.
        for d in [dims(40_000, 2, 1), dims(6, 2, 5_000)] {
            let x: Vec<f64> = (0..d.len())
                .map(|i| {
                    if i % 997 == 0 || i % d.s.max(1) == 0 && d.s > 1 {
                        1e8
                    } else {
                        3.0 + ((i * 7919) % 101) as f64 * 1e-3
                    }
                })
                .collect();
            let st = stats(&x, d);
            for c in 0..2 {
                // The reference sums with Neumaier's compensation: a plain sum of these values is
                // itself off by ~1e-12.
                let (mean, var) = exact_moments(&x, d, c);
                // What normalization uses is (x - mean) / std: the mean's error is measured in
                // standard deviations (here the mean is 1e5 but x₀, the shift, is 1e8).
                assert!(
                    (st.mean[c] - mean).abs() <= 1e-12 * var.sqrt(),
                    "{} vs {mean}",
                    st.mean[c]
                );
                approx::assert_relative_eq!(st.var[c], var, max_relative = 1e-12);
            }
        }
    }

    #[test]
    fn inv_std_handles_zero_and_overflowing_variance() {
        assert_eq!(inv_std(&[4.0, 0.0], 0.0), vec![0.5, 0.0]);
        assert_eq!(inv_std(&[0.0], 0.25), vec![2.0]);
        // f64 data of magnitude 1e300: the squared deviations overflow, the rescue does not.
        let x = [1e300f64, -1e300, 3e299, -3e299];
        let st = stats(&x, dims(4, 1, 1));
        assert_eq!(st.mean, vec![0.0]);
        assert!(st.var[0].is_infinite());
        let r = st.inv_std(1e-5)[0];
        let expected_std = 1e300 * ((2.0f64 * 1.0 + 2.0 * 0.09) / 4.0).sqrt();
        approx::assert_relative_eq!(1.0 / r, expected_std, max_relative = 1e-12);
    }

    #[test]
    fn lane_sums_add_every_term() {
        for len in 0..20 {
            let values: Vec<f64> = (1..=len).map(|i| i as f64).collect();
            assert_eq!(lane_sum(&values, |v| v), (len * (len + 1) / 2) as f64);
            // The three gradient sums in one loop: each term reaches its sum, every length
            // (remainders too), and each sum is the one `lane_sum` makes, bit for bit.
            let g: Vec<f32> = (0..len).map(|i| 0.5 - i as f32 * 0.375).collect();
            let v: Vec<f32> = (0..len).map(|i| 1e4 + i as f32 * 0.25).collect();
            let shift = 1e4 + 0.125;
            let sums = lane_grad_sums(&g, &v, shift);
            let d = |i: usize| f64::from(v[i]) - shift;
            let direct = [
                (0..len).map(|i| f64::from(g[i])).sum::<f64>(),
                (0..len).map(|i| f64::from(g[i]) * d(i)).sum(),
                (0..len).map(d).sum(),
            ];
            for (sum, direct) in sums.iter().zip(direct) {
                approx::assert_abs_diff_eq!(*sum, direct, epsilon = 1e-9);
            }
            let pairs: Vec<(f32, f32)> = g.iter().copied().zip(v.iter().copied()).collect();
            assert_eq!(sums[0], lane_sum(&g, f64::from));
            assert_eq!(
                sums[1],
                lane_sum(&pairs, |(g, v)| f64::from(g) * (f64::from(v) - shift))
            );
            assert_eq!(sums[2], lane_sum(&v, |v| f64::from(v) - shift));
            // f64 data keeps its mean exactly: its sum of `d` is not taken (see `grad_sums`).
            assert_eq!(lane_grad_sums(&values, &values, 0.5)[2], 0.0);
        }
    }

    #[test]
    fn f64_output_is_the_formula_in_f64_exactly() {
        // f64 data is evaluated in its own arithmetic: no split mean, no rounded coefficients.
        for d in [dims(37, 5, 1), dims(9, 3, 11)] {
            let x: Vec<f64> = spread_values(d.len(), 1e4)
                .iter()
                .map(|&v| f64::from(v) * 1.1)
                .collect();
            let mean: Vec<f64> = (0..d.c).map(|c| 1e4 + c as f64 / 3.0).collect();
            let scale: Vec<f64> = (0..d.c).map(|c| 0.7 + c as f64).collect();
            let shift: Vec<f64> = (0..d.c).map(|c| -(c as f64) / 7.0).collect();
            let out = normalize(&x, d, &mean, &scale, &shift);
            for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
                let c = i / d.s % d.c;
                assert_eq!(o, (v - mean[c]) * scale[c] + shift[c], "out[{i}]");
            }
        }
    }

    #[test]
    fn outputs_fill_every_element_of_ragged_blocks_in_parallel() {
        // 3001 rows in blocks of 669: four full blocks and a ragged one, on several threads; and
        // (N, C) rows with a ragged last block on one thread.
        for d in [dims(3001, 7, 7), dims(1001, 3, 1)] {
            let (x, g) = (spread_values(d.len(), -50.0), upstream_values(d.len()));
            let mean: Vec<f64> = (0..d.c).map(|c| c as f64 * 0.5 - 1.0).collect();
            let scale: Vec<f64> = (0..d.c).map(|c| 1.0 + c as f64).collect();
            let shift: Vec<f64> = (0..d.c).map(|c| -(c as f64)).collect();
            let out = normalize(&x, d, &mean, &scale, &shift);
            let dx = input_grad(&g, &x, d, &mean, &scale, &shift, &mean);
            assert_eq!((out.len(), dx.len()), (d.len(), d.len()));
            for i in 0..d.len() {
                let c = i / d.s % d.c;
                let (v, gi) = (f64::from(x[i]), f64::from(g[i]));
                let expected = (v - mean[c]) * scale[c] + shift[c];
                assert!(
                    (f64::from(out[i]) - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                    "out[{i}]"
                );
                let expected = scale[c] * gi + shift[c] * (v - mean[c]) + mean[c];
                assert_eq!(dx[i], expected as f32, "dx[{i}]");
            }
        }
    }

    #[test]
    fn normalize_in_f32_keeps_the_digits_of_a_large_mean() {
        // Mean 1e4 + 1/3: rounded to f32 it is off by 1e-4, which (x - mean) · 1e3 would show.
        let mean = 1e4 + 1.0 / 3.0;
        let x: Vec<f32> = (0..64)
            .map(|i| (mean + (i as f64 - 31.5) * 1e-3) as f32)
            .collect();
        let out = normalize(&x, dims(64, 1, 1), &[mean], &[1e3], &[0.0]);
        for (o, v) in out.iter().zip(&x) {
            let expected = (f64::from(*v) - mean) * 1e3;
            assert!(
                (f64::from(*o) - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                "{o} vs {expected}"
            );
        }
    }

    #[test]
    fn a_scale_beyond_f32_falls_back_to_f64_without_nan() {
        // scale 1e39 does not fit f32: in f32, 0 · inf would be NaN for the value at the mean.
        let x = [2.0f32, 2.0, 2.0];
        let out = normalize(&x, dims(3, 1, 1), &[2.0], &[1e39], &[0.5]);
        assert_eq!(out, vec![0.5, 0.5, 0.5]);
        let out = normalize(&[1.0f32, 3.0], dims(2, 1, 1), &[2.0], &[1e39], &[0.5]);
        assert_eq!(out, vec![f32::NEG_INFINITY, f32::INFINITY]);
    }

    #[test]
    fn wide_rows_tiled_statistics_match_a_direct_computation() {
        // 1100 channels: a full tile of 1024 and a ragged one of 76; blocks of 160 rows, so each
        // tile of a block is two pieces (128 rows, then 32) merged with Chan's update.
        let d = dims(16 * 160, 1100, 1);
        assert_eq!(d.block_rows(), 160);
        assert_eq!(STATS_PIECE_ELEMENTS / STATS_TILE, 128);
        let x: Vec<f64> = (0..d.len())
            .map(|i| ((i * 7919) % 1013) as f64 * 0.37 + 1e3 * (i % 1100 % 7) as f64)
            .collect();
        let st = stats(&x, d);
        for c in 0..d.c {
            let (mean, var) = exact_moments(&x, d, c);
            approx::assert_relative_eq!(st.mean[c], mean, max_relative = 1e-14);
            approx::assert_relative_eq!(st.var[c], var, max_relative = 1e-13);
        }
    }

    #[test]
    fn an_outlier_as_the_shift_is_summed_again_in_two_passes() {
        // Each block's first row, the shift of its one-pass sums, is an outlier (1e8 among values
        // near 3): `Σd² - (Σd)²/n` would cancel ~log2(n) bits. Without the two-pass fallback the
        // variance was off by 1.3e-10 (1 channel) and 9.7e-12 (3 channels) relative, here
        // within 2e-14.
        for c in [1, 3] {
            let d = dims(50_000, c, 1);
            let x: Vec<f64> = (0..d.len())
                .map(|i| {
                    if (i / c) % d.block_rows() == 0 {
                        1e8 + (i % 7) as f64
                    } else {
                        3.0 + ((i * 7919) % 101) as f64 * 1e-3
                    }
                })
                .collect();
            let st = stats(&x, d);
            for ch in 0..c {
                let (mean, var) = exact_moments(&x, d, ch);
                let mean_err = (st.mean[ch] - mean).abs() / var.sqrt();
                assert!(mean_err <= 1e-12, "mean off by {mean_err:e} std");
                approx::assert_relative_eq!(st.var[ch], var, max_relative = 1e-12);
            }
        }
    }

    #[test]
    fn a_block_of_several_pieces_sorted_along_the_batch_matches_a_direct_computation() {
        // One block of 1024 channels, 3 pieces of 128 rows (and a fourth of 8), each channel
        // rising along the batch: every piece's mean is far from the mean of the rows before
        // it, and each piece is summed around its own first row.
        let d = dims(3 * 128 + 8, 1024, 1);
        assert_eq!(STATS_PIECE_ELEMENTS / STATS_TILE, 128);
        let x: Vec<f64> = (0..d.len())
            .map(|i| (i / d.c) as f64 * 1e-3 * (1 + i % 7) as f64 + (i % d.c) as f64)
            .collect();
        let x0: Vec<f64> = x[..d.c].to_vec();
        let moments = block_moments(&x, d, &x0);
        assert_eq!(moments.count, d.n as f64);
        for (c, z) in x0.iter().enumerate() {
            let (mean, var) = exact_moments(&x, d, c);
            approx::assert_relative_eq!(z + moments.offset[c], mean, max_relative = 1e-14);
            approx::assert_relative_eq!(moments.m2[c] / d.n as f64, var, max_relative = 1e-13);
        }
    }

    #[test]
    fn chunked_statistics_match_a_direct_computation() {
        // Many chunks (rows of 3 × 5 values, 1092 rows per chunk): the merge must be exact enough.
        let d = dims(5000, 3, 5);
        let x: Vec<f64> = (0..d.len())
            .map(|i| ((i * 7919) % 1013) as f64 * 0.37 + 1e3 * (i % 3) as f64)
            .collect();
        let st = stats(&x, d);
        for c in 0..3 {
            let values: Vec<f64> = channel_values(&x, d, c).collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
            approx::assert_relative_eq!(st.mean[c], mean, max_relative = 1e-13);
            approx::assert_relative_eq!(st.var[c], var, max_relative = 1e-12);
        }
    }
}
