//! BatchNorm's array math on contiguous data viewed as `(N, C, S)`: `N` batch rows, `C`
//! channels, `S` positions per channel (the product of the spatial axes, 1 for `(N, C)` input).
//! The functional API, the fused tape node and the layer all call the three entry points here:
//! [`forward_batch`], [`forward_with`] and [`backward`].
//!
//! One module per pass: [`stats`] (mean and variance), [`affine`] (the output), [`grad_sums`]
//! (backward's per-channel sums) and [`input_grad`] (`dx`). Each has two layouts:
//! - row-major (`*_row_major`): blocks of whole rows, scheduled by [`crate::schedule`], partial
//!   results merged in block order;
//! - channel-major (`channel_*`): one worker per channel, for feature maps with long lanes (see
//!   [`Layout`]). A channel's values are read a second time right after the first (the
//!   output after the statistics, `dx` after the sums), from cache where they fit.
//!
//! Either way the results are bit-identical on any number of threads.
//!
//! Numerics: every sum is accumulated in `f64`, whatever `T` is (f32 sums over 1e6 rows lose 3
//! digits), and `dx` is evaluated in `f64` and rounded once (its terms nearly cancel). The output
//! is evaluated in `T` with the mean split in two `T` parts, so `x - mean` loses nothing to the
//! mean's rounding.
//!
//! The kernels are compiled once for `f32` and once for `f64`, in this crate (see [`Kernels`]),
//! not again in every crate that calls BatchNorm.

mod affine;
mod grad_sums;
mod input_grad;
mod stats;

use std::any::Any;
use std::ops::Range;

use tape::Element;

use self::affine::{normalize_channel, normalize_row_major};
use self::grad_sums::{channel_grad_sums, grad_sums_row_major};
use self::input_grad::{
    ChannelCoefficients, InputGradCoefficients, channel_input_grad, input_grad_row_major,
};
use self::stats::stats_row_major;
pub(crate) use self::stats::{Stats, channel_stats, inv_std};
use crate::schedule::{Rows, collect_by_group, map_groups, on_pool};

/// The `(N, C, S)` view of an input of shape `(N, C, *spatial)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
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

    /// The data as rows for the scheduler.
    fn rows(&self) -> Rows {
        Rows::new(self.n, self.row())
    }
}

/// The shortest lane (`S` values of one channel in one row) the channel-major passes take, in
/// bytes: a page. Shorter lanes are short runs spread over the whole input, and reading one
/// channel at a time from memory then costs more than the second read from cache saves.
const MIN_LANE_BYTES: usize = 4096;

/// The fewest channels the channel-major passes take: they split work by channel, so fewer
/// channels would leave threads idle (the row-major passes split by rows).
const MIN_CHANNELS: usize = 8;

/// How the passes walk the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Blocks of whole rows.
    RowMajor,
    /// One worker per channel, for feature maps with long lanes.
    ChannelMajor,
}

impl Layout {
    /// The layout for `T` data of these dimensions: a function of the shape and element type
    /// only, as every choice of the kernels.
    fn of<T>(dims: Dims) -> Layout {
        if dims.s * std::mem::size_of::<T>() >= MIN_LANE_BYTES && dims.c >= MIN_CHANNELS {
            Layout::ChannelMajor
        } else {
            Layout::RowMajor
        }
    }
}

/// What a backward pass needs besides `dout` and `x`: per-channel `gamma`, the mean and
/// `inv_std` the forward normalized with, and whether those are `x`'s own batch statistics
/// (training: `x` reaches the output through them too) or constants (evaluation).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Saved<'a> {
    pub gamma: &'a [f64],
    pub mean: &'a [f64],
    pub inv_std: &'a [f64],
    pub batch_stats: bool,
}

/// What [`backward`] returns: `dx` (when asked for) and the per-channel `dgamma` and `dbeta`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Grads<T> {
    pub dx: Option<Vec<T>>,
    pub dgamma: Vec<f64>,
    pub dbeta: Vec<f64>,
}

/// Training-mode forward of row-major `x`: the batch statistics, their `inv_std`, and the
/// output `gamma · (x - mean) · inv_std + beta`.
pub(crate) fn forward_batch<T: Element>(
    x: &[T],
    dims: Dims,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (Stats, Vec<f64>, Vec<T>) {
    kernels::<T>().forward_batch(x, dims, (gamma, beta), eps)
}

/// The output with given per-channel statistics (evaluation mode).
pub(crate) fn forward_with<T: Element>(
    x: &[T],
    dims: Dims,
    gamma: &[f64],
    beta: &[f64],
    mean: &[f64],
    inv_std: &[f64],
) -> Vec<T> {
    kernels::<T>().forward_with(x, dims, (gamma, beta), (mean, inv_std))
}

/// The gradients of a normalization given the upstream gradient `dout`: two passes, one for the
/// per-channel sums and one writing `dx` (skipped unless `want_dx`).
pub(crate) fn backward<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    saved: Saved<'_>,
    want_dx: bool,
) -> Grads<T> {
    kernels::<T>().backward((dout, x), dims, saved, want_dx)
}

/// The kernels' entry points for one element type, implemented for `f32` and `f64` by
/// non-generic methods: code that calls them through [`kernels`] links to the copies compiled
/// here instead of compiling its own (generic code is compiled in each crate that uses it, and
/// these are the bulk of this crate's code).
trait Kernels<T>: Sync {
    fn forward_batch(
        &self,
        x: &[T],
        dims: Dims,
        gamma_beta: (&[f64], &[f64]),
        eps: f64,
    ) -> (Stats, Vec<f64>, Vec<T>);
    fn forward_with(
        &self,
        x: &[T],
        dims: Dims,
        gamma_beta: (&[f64], &[f64]),
        stats: (&[f64], &[f64]),
    ) -> Vec<T>;
    fn backward(&self, dout_x: (&[T], &[T]), dims: Dims, saved: Saved<'_>, want_dx: bool) -> Grads<T>;
}

/// The implementation of [`Kernels`] for each element type.
struct Compiled;

macro_rules! compiled_for {
    ($($t:ty),*) => {$(
        impl Kernels<$t> for Compiled {
            #[inline(never)]
            fn forward_batch(
                &self,
                x: &[$t],
                dims: Dims,
                gamma_beta: (&[f64], &[f64]),
                eps: f64,
            ) -> (Stats, Vec<f64>, Vec<$t>) {
                imp::forward_batch(x, dims, gamma_beta, eps, Layout::of::<$t>(dims))
            }

            #[inline(never)]
            fn forward_with(
                &self,
                x: &[$t],
                dims: Dims,
                gamma_beta: (&[f64], &[f64]),
                stats: (&[f64], &[f64]),
            ) -> Vec<$t> {
                imp::forward_with(x, dims, gamma_beta, stats)
            }

            #[inline(never)]
            fn backward(
                &self,
                dout_x: (&[$t], &[$t]),
                dims: Dims,
                saved: Saved<'_>,
                want_dx: bool,
            ) -> Grads<$t> {
                imp::backward(dout_x, dims, saved, want_dx, Layout::of::<$t>(dims))
            }
        }
    )*};
}

compiled_for!(f32, f64);

static F32: &dyn Kernels<f32> = &Compiled;
static F64: &dyn Kernels<f64> = &Compiled;

/// The kernels for `T`.
fn kernels<T: Element>() -> &'static dyn Kernels<T> {
    let (f32s, f64s): (&dyn Any, &dyn Any) = (&F32, &F64);
    f32s.downcast_ref::<&'static dyn Kernels<T>>()
        .or_else(|| f64s.downcast_ref())
        .copied()
        .unwrap_or_else(|| unreachable!("tape::Element is sealed: every element type is f32 or f64"))
}

/// The generic implementations behind [`Kernels`].
mod imp {
    use super::*;

    pub(super) fn forward_batch<T: Element>(
        x: &[T],
        dims: Dims,
        (gamma, beta): (&[f64], &[f64]),
        eps: f64,
        layout: Layout,
    ) -> (Stats, Vec<f64>, Vec<T>) {
        // Statistics, then output: one job on the thread pool (see `on_pool`).
        on_pool(dims.rows().parallel(), || {
            if layout == Layout::ChannelMajor {
                let (out, channels) = collect_by_group(dims.rows(), dims.c, |channel, out| {
                    let stats = channel_stats(x, dims, channel);
                    let inv_std = stats.inv_std(eps);
                    let k = (stats.mean, gamma[channel] * inv_std, beta[channel]);
                    normalize_channel(x, dims, channel, out, k);
                    (stats, inv_std)
                });
                let inv_std = channels.iter().map(|(_, inv_std)| *inv_std).collect();
                let stats = Stats::from_channels(channels.into_iter().map(|(stats, _)| stats));
                return (stats, inv_std, out);
            }
            let stats = stats_row_major(x, dims);
            let inv_std = stats.inv_std(eps);
            let out = forward_with(x, dims, (gamma, beta), (&stats.mean, &inv_std));
            (stats, inv_std, out)
        })
    }

    pub(super) fn forward_with<T: Element>(
        x: &[T],
        dims: Dims,
        (gamma, beta): (&[f64], &[f64]),
        (mean, inv_std): (&[f64], &[f64]),
    ) -> Vec<T> {
        let scale: Vec<f64> = gamma.iter().zip(inv_std).map(|(g, r)| g * r).collect();
        normalize_row_major(x, dims, mean, &scale, beta)
    }

    pub(super) fn backward<T: Element>(
        (dout, x): (&[T], &[T]),
        dims: Dims,
        saved: Saved<'_>,
        want_dx: bool,
        layout: Layout,
    ) -> Grads<T> {
        let Saved {
            gamma,
            mean,
            inv_std,
            batch_stats,
        } = saved;
        let m = dims.per_channel() as f64;
        let coefficients = |channel: usize, sum_dout: f64, dgamma: f64| {
            ChannelCoefficients::new(gamma[channel], inv_std[channel], sum_dout, dgamma, m, batch_stats)
        };
        // The sums, then dx: one job on the thread pool (see `on_pool`).
        on_pool(dims.rows().parallel(), || {
            if layout == Layout::ChannelMajor {
                // A channel's `dbeta = Σ dout` and `dgamma = Σ dout · x̂`.
                let sums = |channel: usize| {
                    channel_grad_sums(dout, x, dims, channel, (mean[channel], inv_std[channel]))
                };
                let (dx, sums) = if want_dx {
                    let (dx, sums) = collect_by_group(dims.rows(), dims.c, |channel, out| {
                        let (dbeta, dgamma) = sums(channel);
                        let k = coefficients(channel, dbeta, dgamma);
                        channel_input_grad((dout, x), dims, channel, out, mean[channel], k);
                        (dbeta, dgamma)
                    });
                    (Some(dx), sums)
                } else {
                    (None, map_groups(dims.rows(), dims.c, sums))
                };
                let (dbeta, dgamma) = sums.into_iter().unzip();
                return Grads { dx, dgamma, dbeta };
            }
            let sums = grad_sums_row_major(dout, x, dims, (mean, inv_std));
            let (dbeta, dgamma) = (sums.sum_dout, sums.sum_dout_xhat);
            let dx = want_dx.then(|| {
                let k = InputGradCoefficients::new((gamma, inv_std), (&dbeta, &dgamma), m, batch_stats);
                input_grad_row_major(dout, x, dims, (mean, inv_std), &k)
            });
            Grads { dx, dgamma, dbeta }
        })
    }
}

/// Channels in tiles of `width`.
fn tiles_of(c: usize, width: usize) -> impl Iterator<Item = Range<usize>> {
    (0..c)
        .step_by(width)
        .map(move |start| start..(start + width).min(c))
}

/// The rows of `rows` (rows of width `c > 0`) four at a time, one from each quarter of them;
/// and the rows left over (fewer than four).
///
/// Four rows a step cut the loads and stores of per-channel sums to a quarter. Taking them from
/// the four quarters, not four adjacent rows, makes four long sequential streams, which the
/// hardware prefetchers follow (adjacent short rows would interleave in short runs). The order
/// in which a channel adds its rows is still a fixed function of the shape.
#[inline(always)]
fn quarter_steps<T>(rows: &[T], c: usize) -> (impl Iterator<Item = [&[T]; 4]>, &[T]) {
    let quarter = rows.len() / c / 4 * c;
    let (q0, rest) = rows.split_at(quarter);
    let (q1, rest) = rest.split_at(quarter);
    let (q2, rest) = rest.split_at(quarter);
    let (q3, left) = rest.split_at(quarter);
    let steps = q0
        .chunks_exact(c)
        .zip(q1.chunks_exact(c))
        .zip(q2.chunks_exact(c))
        .zip(q3.chunks_exact(c))
        .map(|(((a, b), e), f)| [a, b, e, f]);
    (steps, left)
}

/// Partial sums per lane sum: eight independent accumulators that the compiler keeps in SIMD
/// registers (a single running sum would serialise every addition).
const LANES: usize = 8;

/// Sum of `term(v)` over `values`, in [`LANES`] interleaved partial sums.
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

/// The `N` lanes of one channel of `values` (row-major `N x C x S`), in row order.
fn channel_lanes<T>(values: &[T], dims: Dims, channel: usize) -> impl Iterator<Item = &[T]> {
    values
        .chunks_exact(dims.row().max(1))
        .map(move |row| &row[channel * dims.s..][..dims.s])
}

/// The values of one channel, row by row, as f64.
fn channel_values<T: Element>(x: &[T], dims: Dims, channel: usize) -> impl Iterator<Item = f64> + '_ {
    channel_lanes(x, dims, channel).flatten().map(|v| v.as_f64())
}

#[cfg(test)]
mod tests;
