//! The array math of BatchNorm on contiguous data viewed as `(N, C, S)`: `N` batch rows, `C`
//! channels, `S` positions per channel (the product of the spatial axes, 1 for `(N, C)` input).
//! Everything above (the functional API, the fused tape node, the layer) calls these.
//!
//! Numerics: every sum is accumulated in `f64`, whatever `T` is, and every per-element formula
//! is evaluated in `f64` before rounding once to `T` (f32 sums over 1e6 rows lose 3 digits, and
//! `x - mean` in f32 loses what a large mean's rounding hides).
//!
//! Work is split into chunks of whole rows whose size depends only on the shape, never on the
//! number of threads; per-chunk partial sums are added in chunk order. So the result is
//! bit-identical on 1 thread or many, and rayon is used only above [`PARALLEL_MIN_ELEMENTS`].

use std::ops::Range;

use rayon::prelude::*;
use tape::Element;

/// Below this many elements everything runs on the calling thread (threads cost more than
/// they save on small inputs).
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 17;

/// Target elements per work chunk.
const CHUNK_ELEMENTS: usize = 1 << 14;

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

    /// Rows per chunk: a fixed function of the shape.
    fn chunk_rows(&self) -> usize {
        (CHUNK_ELEMENTS / self.row().max(1)).max(1)
    }

    fn parallel(&self) -> bool {
        self.len() >= PARALLEL_MIN_ELEMENTS
    }
}

/// Runs `work` on each chunk of rows (as an element range) and returns the results in order,
/// on several threads for large inputs.
fn per_chunk<R: Send>(dims: Dims, work: impl Fn(Range<usize>) -> R + Sync + Send) -> Vec<R> {
    let rows = dims.chunk_rows();
    let chunks = dims.n.div_ceil(rows);
    let range = |i: usize| i * rows * dims.row()..((i + 1) * rows).min(dims.n) * dims.row();
    if dims.parallel() {
        (0..chunks).into_par_iter().map(|i| work(range(i))).collect()
    } else {
        (0..chunks).map(|i| work(range(i))).collect()
    }
}

/// Per-channel sums: `accumulate(range, acc)` adds a chunk's contributions into `acc`
/// (`K` sums per channel, laid out `acc[k * C + channel]`); chunks are combined in order.
fn channel_sums<const K: usize>(
    dims: Dims,
    accumulate: impl Fn(Range<usize>, &mut [f64]) + Sync,
) -> Vec<f64> {
    let partials = per_chunk(dims, |range| {
        let mut acc = vec![0.0; K * dims.c];
        accumulate(range, &mut acc);
        acc
    });
    let mut total = vec![0.0; K * dims.c];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    total
}

/// Fills `out` chunk by chunk: `fill(range, out_chunk)` writes elements `range` of the output.
fn fill_chunks<T: Element>(dims: Dims, out: &mut [T], fill: impl Fn(Range<usize>, &mut [T]) + Sync) {
    let chunk_len = dims.chunk_rows() * dims.row();
    if chunk_len == 0 {
        return;
    }
    let work = |(i, chunk): (usize, &mut [T])| {
        let start = i * chunk_len;
        fill(start..start + chunk.len(), chunk);
    };
    if dims.parallel() {
        out.par_chunks_mut(chunk_len).enumerate().for_each(work);
    } else {
        out.chunks_mut(chunk_len).enumerate().for_each(work);
    }
}

/// Sum of `term(i)` over a lane, with four independent accumulators so the additions pipeline
/// (and vectorise) instead of waiting on each other.
#[inline]
fn lane_sum(len: usize, term: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let body = len / 4 * 4;
    let mut i = 0;
    while i < body {
        acc[0] += term(i);
        acc[1] += term(i + 1);
        acc[2] += term(i + 2);
        acc[3] += term(i + 3);
        i += 4;
    }
    for j in body..len {
        acc[j - body] += term(j);
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
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
            inv_std[channel] = 1.0 / (scale * (var_scaled + eps / scale / scale).sqrt());
        }
        inv_std
    }
}

/// `1 / sqrt(var + eps)`, and 0 where `var + eps == 0` (see [`Stats::inv_std`]).
pub fn inv_std(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter()
        .map(|&v| {
            if v + eps == 0.0 {
                0.0
            } else {
                1.0 / (v + eps).sqrt()
            }
        })
        .collect()
}

/// Per-channel mean and biased variance of `x`, by two passes in `f64`: the mean first, then
/// the mean squared deviation from it (no cancellation, unlike `E[x²] - E[x]²`).
///
/// The first pass sums `x - x₀`, with `x₀` the channel's first value, and adds `x₀` back: a
/// constant channel then sums exact zeros, so its mean is exactly its value and its variance
/// exactly 0, whatever the value (a plain sum of 1e30 repeated is not exact in f64), and data
/// far from zero lose less to rounding.
pub fn stats<T: Element>(x: &[T], dims: Dims) -> Stats {
    let m = dims.per_channel() as f64;
    let reference: Vec<f64> = (0..dims.c)
        .map(|c| x.get(c * dims.s).map_or(0.0, |v| v.as_f64()))
        .collect();
    let sums = channel_sums::<1>(dims, |range, acc| {
        for_each_lane(&x[range], dims, |channel, lane| {
            let x0 = reference[channel];
            acc[channel] += lane_sum(lane.len(), |i| lane[i].as_f64() - x0);
        });
    });
    let mean: Vec<f64> = sums.iter().zip(&reference).map(|(s, x0)| x0 + s / m).collect();
    let squares = channel_sums::<1>(dims, |range, acc| {
        for_each_lane(&x[range], dims, |channel, lane| {
            let mu = mean[channel];
            acc[channel] += lane_sum(lane.len(), |i| {
                let d = lane[i].as_f64() - mu;
                d * d
            });
        });
    });
    let var = squares.iter().map(|s| s / m).collect();
    let mut stats = Stats {
        mean,
        var,
        overflowed: Vec::new(),
    };
    rescue_overflow(x, dims, &mut stats);
    stats
}

/// Only for f64 data beyond about 1e150 in magnitude, whose squares overflow: recomputes those
/// channels with values scaled by the channel's largest magnitude.
#[cold]
fn rescue_overflow<T: Element>(x: &[T], dims: Dims, stats: &mut Stats) {
    let m = dims.per_channel() as f64;
    for channel in 0..dims.c {
        if stats.mean[channel].is_finite() && stats.var[channel].is_finite() {
            continue;
        }
        let values = || channel_values(x, dims, channel);
        let scale = values().fold(0.0f64, |a, v| a.max(v.abs()));
        if scale == 0.0 || !scale.is_finite() {
            continue;
        }
        let mean = scale * values().map(|v| v / scale).sum::<f64>() / m;
        let var_scaled = values().map(|v| ((v - mean) / scale).powi(2)).sum::<f64>() / m;
        stats.mean[channel] = mean;
        stats.var[channel] = var_scaled * scale * scale; // may still be inf
        stats.overflowed.push((channel, scale, var_scaled));
    }
}

fn channel_values<T: Element>(x: &[T], dims: Dims, channel: usize) -> impl Iterator<Item = f64> + '_ {
    x.chunks_exact(dims.s.max(1))
        .enumerate()
        .filter(move |(i, _)| i % dims.c == channel)
        .flat_map(|(_, lane)| lane.iter().map(|v| v.as_f64()))
}

/// Calls `visit(channel, lane)` for each contiguous run of one channel's values in `data`
/// (whole rows). For `S = 1` the "lanes" are single values.
#[inline]
fn for_each_lane<T>(data: &[T], dims: Dims, mut visit: impl FnMut(usize, &[T])) {
    if dims.s == 1 {
        for row in data.chunks_exact(dims.c) {
            for (channel, value) in row.chunks_exact(1).enumerate() {
                visit(channel, value);
            }
        }
    } else {
        for row in data.chunks_exact(dims.row()) {
            for (channel, lane) in row.chunks_exact(dims.s).enumerate() {
                visit(channel, lane);
            }
        }
    }
}

/// Zips two equally laid-out slices lane by lane; see [`for_each_lane`].
#[inline]
fn for_each_lane_pair<A, B>(a: &[A], b: &[B], dims: Dims, mut visit: impl FnMut(usize, &[A], &[B])) {
    let s = dims.s.max(1);
    for (i, (lane_a, lane_b)) in a.chunks_exact(s).zip(b.chunks_exact(s)).enumerate() {
        visit(i % dims.c, lane_a, lane_b);
    }
}

/// Per-channel affine map `out = (x - mean) · scale + shift`, evaluated in f64 and rounded once.
/// With `scale = gamma · inv_std` and `shift = beta` it is the BatchNorm output; `x == mean`
/// gives exactly `shift`.
pub fn normalize<T: Element>(x: &[T], dims: Dims, mean: &[f64], scale: &[f64], shift: &[f64]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    fill_chunks(dims, &mut out, |range, out| {
        let x = &x[range];
        if dims.s == 1 {
            for (out_row, x_row) in out.chunks_exact_mut(dims.c).zip(x.chunks_exact(dims.c)) {
                for c in 0..dims.c {
                    out_row[c] = T::from_f64_lossy((x_row[c].as_f64() - mean[c]) * scale[c] + shift[c]);
                }
            }
        } else {
            for (i, (out_lane, x_lane)) in out
                .chunks_exact_mut(dims.s)
                .zip(x.chunks_exact(dims.s))
                .enumerate()
            {
                let c = i % dims.c;
                let (mu, a, b) = (mean[c], scale[c], shift[c]);
                for (o, &v) in out_lane.iter_mut().zip(x_lane) {
                    *o = T::from_f64_lossy((v.as_f64() - mu) * a + b);
                }
            }
        }
    });
    out
}

/// The two per-channel sums backward needs, in one pass reading `dout` and `x`:
/// `sum(dout)` and `sum(dout · (x - mean))`.
pub fn grad_sums<T: Element>(dout: &[T], x: &[T], dims: Dims, mean: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let c = dims.c;
    let sums = channel_sums::<2>(dims, |range, acc| {
        let (dout, x) = (&dout[range.clone()], &x[range]);
        if dims.s == 1 {
            for (g_row, x_row) in dout.chunks_exact(c).zip(x.chunks_exact(c)) {
                for ch in 0..c {
                    let g = g_row[ch].as_f64();
                    acc[ch] += g;
                    acc[c + ch] += g * (x_row[ch].as_f64() - mean[ch]);
                }
            }
        } else {
            for_each_lane_pair(dout, x, dims, |ch, g, x| {
                let mu = mean[ch];
                acc[ch] += lane_sum(g.len(), |i| g[i].as_f64());
                acc[c + ch] += lane_sum(g.len(), |i| g[i].as_f64() * (x[i].as_f64() - mu));
            });
        }
    });
    let (sum_dout, sum_dout_xmu) = sums.split_at(c);
    (sum_dout.to_vec(), sum_dout_xmu.to_vec())
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
    let mut dx = vec![T::zero(); x.len()];
    fill_chunks(dims, &mut dx, |range, dx| {
        let (dout, x) = (&dout[range.clone()], &x[range]);
        let s = dims.s.max(1);
        for (i, ((dx_lane, g_lane), x_lane)) in dx
            .chunks_exact_mut(s)
            .zip(dout.chunks_exact(s))
            .zip(x.chunks_exact(s))
            .enumerate()
        {
            let c = i % dims.c;
            let (mu, a, k, b) = (mean[c], grad_scale[c], xmu_scale[c], offset[c]);
            for ((d, &g), &v) in dx_lane.iter_mut().zip(g_lane).zip(x_lane) {
                *d = T::from_f64_lossy(a * g.as_f64() + k * (v.as_f64() - mu) + b);
            }
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(n: usize, c: usize, s: usize) -> Dims {
        Dims { n, c, s }
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
        let d = dims(4096, 3, 17);
        let x: Vec<f32> = (0..d.len())
            .map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 100.0)
            .collect();
        let g: Vec<f32> = (0..d.len())
            .map(|i| ((i * 104_729) % 997) as f32 * 0.01 - 5.0)
            .collect();
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
    fn lane_sum_adds_every_term() {
        for len in 0..11 {
            assert_eq!(lane_sum(len, |i| (i + 1) as f64), (len * (len + 1) / 2) as f64);
        }
    }
}
