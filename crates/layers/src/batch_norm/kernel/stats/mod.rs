//! Per-channel batch statistics: mean and biased variance in `f64`, reading `x` once.
//!
//! Every value is taken relative to `x₀`, the channel's first value: a constant channel then
//! sums exact zeros, so its mean is exactly its value and its variance exactly 0, whatever the
//! value (a plain sum of 1e30 repeated is not exact in f64). Partial results are merged with
//! Chan et al.'s pairwise formula, in a fixed order.
//!
//! - Row-major ([`stats_row_major`]), for `(N, C)` data: each piece (a run of rows of a block) is
//!   summed in one pass as `d` and `d²`, with `d` the value minus the piece's first row, which
//!   gives the piece's mean and its sum of squared deviations `Σd² - (Σd)²/n`. That subtraction
//!   cancels digits only where the shift is far from the piece's mean in standard deviations (an
//!   outlier as the first row); where it would cost more than 4 bits (see
//!   [`CANCELLATION_LIMIT`]) that channel's piece is summed again in two passes. So outliers cost
//!   no accuracy, and typical data is read once. `(N, C, S)` data: each lane of `S` values is
//!   contiguous and short, and gets two passes (the second from L1).
//! - Channel-major ([`channel_stats`]): one channel's lanes, each in two passes.

use multiversion::multiversion;
use tape::Element;

use super::{Dims, channel_lanes, channel_values, lane_sum, quarter_steps, tiles_of};
use crate::schedule::fold_blocks;

/// Channels per tile: the four per-channel f64 arrays the statistics loop touches stay in L1
/// however wide the layer is.
const STATS_TILE: usize = 1024;

/// Target elements per piece (`(N, C)` data): each piece costs a merge per channel, so pieces
/// are long; a channel whose one-pass sums cancel reads its column of the piece again, so they
/// are not longer.
const STATS_PIECE_ELEMENTS: usize = 1 << 17;

/// How much larger than the result `m2` the sum of squares `s2` it is computed from may be: the
/// rounding error of `s2 - s1²/count` is that many times the error of `s2` relative to `m2`, so
/// 16 costs at most 4 of f64's 53 bits. With the piece's first row as the shift the ratio is
/// `1 + z²`, `z` that row's distance from the piece's mean in standard deviations: it exceeds 16
/// for an outlier beyond ~3.9 (about one channel-piece in 10 000 for normal data), and then that
/// channel's piece is summed again in two passes. (A running mean as the shift would cancel on
/// every piece of a batch sorted along `N`.)
const CANCELLATION_LIMIT: f64 = 16.0;

/// Per-channel batch statistics.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stats {
    /// Mean of each channel.
    pub mean: Vec<f64>,
    /// Biased variance (divided by `M`) of each channel.
    pub var: Vec<f64>,
    /// Channels whose variance overflows or underflows f64 (data beyond about 1e154, or spreads
    /// below about 1e-154), kept scaled.
    scaled: Vec<(usize, Scaled)>,
}

impl Stats {
    /// `1 / sqrt(var + eps)` per channel, from the scaled variance where `var` over- or
    /// underflows, and 0 where `var + eps == 0` (a constant channel with `eps = 0`, whose
    /// normalized value is then defined as 0, so the output is `beta`, not NaN).
    pub fn inv_std(&self, eps: f64) -> Vec<f64> {
        let mut inv_std = inv_std(&self.var, eps);
        for (channel, scaled) in &self.scaled {
            inv_std[*channel] = scaled.inv_std(eps);
        }
        inv_std
    }

    /// The statistics of each channel, gathered.
    pub fn from_channels(channels: impl IntoIterator<Item = ChannelStats>) -> Stats {
        let channels = channels.into_iter();
        let c = channels.size_hint().0;
        let mut stats = Stats {
            mean: Vec::with_capacity(c),
            var: Vec::with_capacity(c),
            scaled: Vec::new(),
        };
        for (channel, ChannelStats { mean, var, scaled }) in channels.into_iter().enumerate() {
            stats.mean.push(mean);
            stats.var.push(var);
            if let Some(scaled) = scaled {
                stats.scaled.push((channel, scaled));
            }
        }
        stats
    }
}

/// A variance kept as `var / scale²` with its `scale` (the channel's largest magnitude): for
/// data whose squared deviations overflow or underflow f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scaled {
    scale: f64,
    var_scaled: f64,
}

impl Scaled {
    /// `1 / sqrt(var + eps) = 1 / (scale · sqrt(var / scale² + eps / scale²))`, and 0 where
    /// `var + eps` is 0. Where `eps / scale²` overflows, `eps` is so much larger than `var`
    /// (which is at most `scale²`) that `1 / sqrt(var + eps)` is exact enough computed as it is.
    fn inv_std(&self, eps: f64) -> f64 {
        let Scaled { scale, var_scaled } = *self;
        let eps_scaled = eps / scale / scale;
        if !eps_scaled.is_finite() {
            return 1.0 / (var_scaled * scale * scale + eps).sqrt();
        }
        let sum = var_scaled + eps_scaled;
        if sum == 0.0 {
            0.0
        } else {
            1.0 / (scale * sum.sqrt())
        }
    }
}

/// One channel's statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ChannelStats {
    /// The channel's mean.
    pub mean: f64,
    /// Its biased variance.
    pub var: f64,
    scaled: Option<Scaled>,
}

impl ChannelStats {
    /// `1 / sqrt(var + eps)`, as [`Stats::inv_std`].
    pub fn inv_std(&self, eps: f64) -> f64 {
        match self.scaled {
            Some(scaled) => scaled.inv_std(eps),
            None => channel_inv_std(self.var, eps),
        }
    }
}

/// `1 / sqrt(var + eps)`, and 0 where `var + eps == 0` (see [`Stats::inv_std`]).
pub(crate) fn inv_std(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter().map(|&v| channel_inv_std(v, eps)).collect()
}

fn channel_inv_std(var: f64, eps: f64) -> f64 {
    if var + eps == 0.0 {
        0.0
    } else {
        1.0 / (var + eps).sqrt()
    }
}

/// Per-channel mean and biased variance of row-major `x`, block by block (see the module docs).
pub(crate) fn stats_row_major<T: Element>(x: &[T], dims: Dims) -> Stats {
    let x0: Vec<f64> = (0..dims.c)
        .map(|channel| x.get(channel * dims.s).map_or(0.0, |v| v.as_f64()))
        .collect();
    let total = fold_blocks(
        dims.rows(),
        |range| block_moments(&x[range], dims, &x0),
        |total, block| total.merge(block.count, &block.offset, &block.m2),
    );
    // In place: the offsets become the means, the sums of squared deviations the variances.
    let Moments {
        count,
        mut offset,
        mut m2,
    } = total.unwrap_or_else(|| Moments::new(dims.c));
    for (mean, x0) in offset.iter_mut().zip(&x0) {
        *mean += x0;
    }
    for var in &mut m2 {
        *var /= count;
    }
    let mut stats = Stats {
        mean: offset,
        var: m2,
        scaled: Vec::new(),
    };
    rescue_extremes(x, dims, &mut stats);
    stats
}

/// One channel's statistics from its lanes, each in two passes around the channel's first
/// value, merged lane by lane: the same arithmetic as [`stats_row_major`] for `(N, C, S)` data.
#[multiversion(targets("x86_64+avx2+fma"))]
pub(crate) fn channel_stats<T: Element>(x: &[T], dims: Dims, channel: usize) -> ChannelStats {
    let x0 = x[channel * dims.s].as_f64();
    let (mut offset, mut m2) = (0.0, 0.0);
    for (i, lane) in channel_lanes(x, dims, channel).enumerate() {
        let weights = chan_weights((i * dims.s) as f64, dims.s as f64);
        chan_update((&mut offset, &mut m2), lane_moments(lane, x0), weights);
    }
    let stats = ChannelStats {
        mean: x0 + offset,
        var: m2 / dims.per_channel() as f64,
        scaled: None,
    };
    if !needs_rescue(stats.mean, stats.var) {
        return stats;
    }
    rescue_channel(x, dims, channel).unwrap_or(stats)
}

/// Running per-channel count, mean offset (mean minus `x₀`) and sum of squared deviations.
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
    fn merge(&mut self, count: f64, offset: &[f64], m2: &[f64]) {
        chan_merge(self.count, count, (&mut self.offset, &mut self.m2), (offset, m2));
        self.count += count;
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

/// [`chan_update`] of every channel: merges a piece of `count` values per channel into running
/// moments over `seen` values.
#[inline(always)]
fn chan_merge(seen: f64, count: f64, (offsets, m2s): (&mut [f64], &mut [f64]), piece: (&[f64], &[f64])) {
    if seen + count == 0.0 {
        return;
    }
    let weights = chan_weights(seen, count);
    for ((o, m), (&offset, &m2)) in offsets.iter_mut().zip(m2s).zip(piece.0.iter().zip(piece.1)) {
        chan_update((o, m), (offset, m2), weights);
    }
}

/// The moments of one block of rows.
#[multiversion(targets("x86_64+avx2+fma"))]
fn block_moments<T: Element>(block: &[T], dims: Dims, x0: &[f64]) -> Moments {
    let c = dims.c;
    let mut moments = Moments::new(c);
    moments.count = (block.len() / dims.row().max(1) * dims.s) as f64;
    if dims.s > 1 {
        let count = dims.s as f64;
        for (row_index, row) in block.chunks_exact(dims.row()).enumerate() {
            let seen = (row_index * dims.s) as f64;
            for (channel, (lane, &x0)) in row.chunks_exact(dims.s).zip(x0).enumerate() {
                let (o, m) = (&mut moments.offset[channel], &mut moments.m2[channel]);
                chan_update((o, m), lane_moments(lane, x0), chan_weights(seen, count));
            }
        }
        return moments;
    }
    let (mut s1, mut s2, mut shift) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
    for tile in tiles_of(c, STATS_TILE) {
        let w = tile.len();
        let rows_per_piece = (STATS_PIECE_ELEMENTS / w).max(1);
        // Slices cut to one width: the index loops carry no bounds checks and vectorise.
        let x0 = &x0[tile.clone()][..w];
        let (s1, s2) = (&mut s1[tile.clone()][..w], &mut s2[tile.clone()][..w]);
        let shift = &mut shift[tile.clone()][..w];
        let mut seen = 0.0;
        for piece in block.chunks(rows_per_piece * c) {
            let count = (piece.len() / c) as f64;
            // The piece's first row is its shift: a value of the piece's own data, near its mean
            // even where the batch drifts or is sorted.
            for (h, v) in shift.iter_mut().zip(&piece[tile.clone()]) {
                *h = v.as_f64();
            }
            s1.fill(0.0);
            s2.fill(0.0);
            add_shifted_rows(piece, c, &tile, shift, (&mut *s1, &mut *s2));
            // In place: s1 becomes each channel's piece mean minus its shift, s2 its sum of
            // squared deviations; a cancelled channel is summed again.
            for j in 0..w {
                let (mean, m2) = from_shifted_sums(count, s1[j], s2[j]);
                (s1[j], s2[j]) = if cancelled(count, mean, m2) {
                    let column = piece[tile.start + j..].iter().step_by(c);
                    two_pass(column.map(|v| v.as_f64()), shift[j])
                } else {
                    (mean, m2)
                };
            }
            // The piece's mean offsets from x₀, merged into the block's.
            for ((m, h), x0) in s1.iter_mut().zip(&*shift).zip(x0) {
                *m += h - x0;
            }
            let offset = &mut moments.offset[tile.clone()][..w];
            let m2 = &mut moments.m2[tile.clone()][..w];
            chan_merge(seen, count, (offset, m2), (s1, s2));
            seen += count;
        }
    }
    moments
}

/// The sums of `v - shift[j]` and its square per column `j` of the tile, over every row of
/// `rows` (rows of width `c`), four rows per step (see [`quarter_steps`]). Each column adds its
/// rows in the same order whatever the tile.
#[inline(always)]
fn add_shifted_rows<T: Element>(
    rows: &[T],
    c: usize,
    tile: &std::ops::Range<usize>,
    shift: &[f64],
    (s1, s2): (&mut [f64], &mut [f64]),
) {
    let w = tile.len();
    let (shift, s1, s2) = (&shift[..w], &mut s1[..w], &mut s2[..w]);
    let centred = |v: T, j: usize| v.as_f64() - shift[j];
    let (steps, left) = quarter_steps(rows, c);
    for [q0, q1, q2, q3] in steps {
        let t = tile.clone();
        let (q0, q1, q2, q3) = (
            &q0[t.clone()][..w],
            &q1[t.clone()][..w],
            &q2[t.clone()][..w],
            &q3[t][..w],
        );
        for j in 0..w {
            let (a, b, e, f) = (
                centred(q0[j], j),
                centred(q1[j], j),
                centred(q2[j], j),
                centred(q3[j], j),
            );
            s1[j] += (a + b) + (e + f);
            s2[j] += (a * a + b * b) + (e * e + f * f);
        }
    }
    for row in left.chunks_exact(c) {
        let v = &row[tile.clone()][..w];
        for j in 0..w {
            let a = centred(v[j], j);
            s1[j] += a;
            s2[j] += a * a;
        }
    }
}

/// A lane's mean offset from `x0` and its sum of squared deviations from that mean: two passes
/// over a short contiguous lane (the second from L1), an exact two-pass result.
#[multiversion(targets("x86_64+avx2+fma"))]
fn lane_moments<T: Element>(lane: &[T], x0: f64) -> (f64, f64) {
    let offset = lane_sum(lane, |v| v.as_f64() - x0) / lane.len() as f64;
    let m2 = lane_sum(lane, |v| {
        let deviation = (v.as_f64() - x0) - offset;
        deviation * deviation
    });
    (offset, m2)
}

/// A piece's mean and sum of squared deviations from its `count` values' sums `s1` of `v -
/// shift` and `s2` of its square: the mean of `v - shift`, and `s2 - s1²/count`. Check the result
/// with [`cancelled`].
#[inline(always)]
fn from_shifted_sums(count: f64, s1: f64, s2: f64) -> (f64, f64) {
    let mean = s1 / count;
    (mean, s2 - s1 * mean)
}

/// Whether [`from_shifted_sums`]' subtraction cancelled more digits than [`CANCELLATION_LIMIT`]
/// allows, judged from its result: `s2 / m2 = 1 + count · mean² / m2`. Also true for NaN, and
/// for a negative `m2` (rounding) unless every value equalled the shift.
#[inline(always)]
fn cancelled(count: f64, mean: f64, m2: f64) -> bool {
    let (spread, allowed) = (count * mean * mean, (CANCELLATION_LIMIT - 1.0) * m2);
    spread > allowed || spread.is_nan() || allowed.is_nan()
}

/// The fallback for a [`cancelled`] piece: the mean of `v - shift` over `values` and the sum of
/// squared deviations from it, by the corrected two-pass algorithm (Chan, Golub and LeVeque): a
/// first mean, then the deviations from it, whose sum corrects the mean for the rounding of the
/// first pass.
#[cold]
fn two_pass(values: impl Iterator<Item = f64> + Clone, shift: f64) -> (f64, f64) {
    let (mut count, mut sum) = (0.0, 0.0);
    for v in values.clone() {
        count += 1.0;
        sum += v - shift;
    }
    let first = sum / count;
    let (mut sum_e, mut sum_e2) = (0.0, 0.0);
    for v in values {
        let e = (v - shift) - first;
        sum_e += e;
        sum_e2 += e * e;
    }
    (first + sum_e / count, sum_e2 - sum_e * sum_e / count)
}

/// Whether a channel's statistics must be computed again, scaled: where they overflowed (f64
/// data beyond about 1e154 in magnitude, whose squares overflow), or where the variance is 0 or
/// subnormal (a constant channel, or deviations below about 1e-154, whose squares underflow).
fn needs_rescue(mean: f64, var: f64) -> bool {
    !(mean.is_finite() && var.is_finite()) || var < f64::MIN_POSITIVE
}

/// Computes again, scaled by each channel's largest magnitude, the channels [`needs_rescue`]
/// picks.
fn rescue_extremes<T: Element>(x: &[T], dims: Dims, stats: &mut Stats) {
    for channel in 0..dims.c {
        if !needs_rescue(stats.mean[channel], stats.var[channel]) {
            continue;
        }
        if let Some(rescued) = rescue_channel(x, dims, channel) {
            stats.mean[channel] = rescued.mean;
            stats.var[channel] = rescued.var;
            if let Some(scaled) = rescued.scaled {
                stats.scaled.push((channel, scaled));
            }
        }
    }
}

/// A channel's statistics computed with its values scaled by its largest magnitude (see
/// [`needs_rescue`]); `None` where that cannot help (all zero, or not finite). The variance is
/// kept scaled too, since `var_scaled · scale²` may over- or underflow again.
#[cold]
fn rescue_channel<T: Element>(x: &[T], dims: Dims, channel: usize) -> Option<ChannelStats> {
    let m = dims.per_channel() as f64;
    let values = || channel_values(x, dims, channel);
    let scale = values().fold(0.0f64, |a, v| a.max(v.abs()));
    if scale == 0.0 || !scale.is_finite() {
        return None;
    }
    let mean = scale * (values().map(|v| v / scale).sum::<f64>() / m);
    let var_scaled = values().map(|v| (v / scale - mean / scale).powi(2)).sum::<f64>() / m;
    Some(ChannelStats {
        mean,
        var: var_scaled * scale * scale, // may over- or underflow
        scaled: Some(Scaled { scale, var_scaled }),
    })
}

#[cfg(test)]
mod tests;
