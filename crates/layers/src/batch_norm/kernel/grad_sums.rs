//! The backward pass's per-channel sums, from one pass reading `dout` and `x`: `Σ dout` (which
//! is `dbeta`) and `Σ dout · x̂` (which is `dgamma`), accumulated in f64.
//!
//! The pass sums `dout · (x - mean)` and multiplies by `inv_std` once per channel. For data far
//! from 1 in magnitude that product can overflow or underflow where `dout · x̂` does not (data
//! and gradients near 1e200, or deviations near 1e-170): such channels, those whose `inv_std`
//! is outside [`SAFE_INV_STD`] or whose sum is not finite, are summed again with `x̂` formed for
//! each value ([`exact_channel_sums`]).
//!
//! - Row-major ([`grad_sums_row_major`]): block by block, the blocks' sums added in block
//!   order; `(N, C)` rows four at a time (see [`quarter_steps`]), in tiles of channels.
//! - Channel-major ([`channel_grad_sums`]): one channel's lanes, one after the other.

use std::ops::RangeInclusive;

use multiversion::multiversion;
use tape::Element;

use super::{Dims, LANES, channel_lanes, quarter_steps, tiles_of};
use crate::schedule::fold_blocks;

/// The `inv_std` (2⁻²⁰⁰ to 2²⁰⁰: standard deviations within about 1e±60) for which
/// `dout · (x - mean)` neither overflows nor loses digits to underflow unless `dout` itself is
/// beyond about 1e±180.
pub(crate) const SAFE_INV_STD: RangeInclusive<f64> = 6.223015277861142e-61..=1.6069380442589903e60;

/// Channels per tile for `(N, C)` rows: the per-channel f64 arrays a loop touches stay in L2
/// however wide the layer is. Each channel still adds its rows in order, so tiling changes no
/// result. Not smaller: each tile walks the block again in runs of a tile's width.
const CHANNEL_TILE: usize = 8192;

/// `Σ dout` and `Σ dout · x̂` per channel.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GradSums {
    /// `Σ dout`: `dbeta`.
    pub sum_dout: Vec<f64>,
    /// `Σ dout · x̂`: `dgamma`.
    pub sum_dout_xhat: Vec<f64>,
}

/// Per-channel `Σ dout` and `Σ dout · (x - mean)`, as the pass sums them.
struct RawSums {
    sum_dout: Vec<f64>,
    sum_dout_xmu: Vec<f64>,
}

impl RawSums {
    fn zeros(c: usize) -> Self {
        RawSums {
            sum_dout: vec![0.0; c],
            sum_dout_xmu: vec![0.0; c],
        }
    }

    fn add(&mut self, other: &RawSums) {
        for (total, value) in self.sum_dout.iter_mut().zip(&other.sum_dout) {
            *total += value;
        }
        for (total, value) in self.sum_dout_xmu.iter_mut().zip(&other.sum_dout_xmu) {
            *total += value;
        }
    }
}

/// [`GradSums`] of row-major `dout` and `x`, block by block.
pub(crate) fn grad_sums_row_major<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    (mean, inv_std): (&[f64], &[f64]),
) -> GradSums {
    let sums = fold_blocks(
        dims.rows(),
        |range| block_grad_sums(&dout[range.clone()], &x[range], dims, mean),
        |total, block| total.add(&block),
    );
    let RawSums {
        sum_dout,
        sum_dout_xmu,
    } = sums.unwrap_or_else(|| RawSums::zeros(dims.c));
    let mut sums = GradSums {
        sum_dout,
        // In place: Σ dout · (x - mean) · inv_std = Σ dout · x̂.
        sum_dout_xhat: sum_dout_xmu,
    };
    for (dgamma, r) in sums.sum_dout_xhat.iter_mut().zip(inv_std) {
        *dgamma *= r;
    }
    let exact = |(&r, &dgamma): (&f64, &f64)| needs_exact_sums(r, dgamma);
    if inv_std.iter().zip(&sums.sum_dout_xhat).any(exact) {
        for channel in 0..dims.c {
            if needs_exact_sums(inv_std[channel], sums.sum_dout_xhat[channel]) {
                let stats = (mean[channel], inv_std[channel]);
                (sums.sum_dout[channel], sums.sum_dout_xhat[channel]) =
                    exact_channel_sums(dout, x, dims, channel, stats);
            }
        }
    }
    sums
}

/// One channel's `Σ dout` and `Σ dout · x̂`, lane by lane.
#[multiversion(targets("x86_64+avx2+fma"))]
pub(crate) fn channel_grad_sums<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    channel: usize,
    (mean, inv_std): (f64, f64),
) -> (f64, f64) {
    let (mut sum_dout, mut sum_dout_xmu) = (0.0, 0.0);
    for (g, v) in channel_lanes(dout, dims, channel).zip(channel_lanes(x, dims, channel)) {
        let (lane_dout, lane_dout_xmu) = lane_grad_sums(g, v, mean);
        sum_dout += lane_dout;
        sum_dout_xmu += lane_dout_xmu;
    }
    let dgamma = sum_dout_xmu * inv_std;
    if needs_exact_sums(inv_std, dgamma) {
        return exact_channel_sums(dout, x, dims, channel, (mean, inv_std));
    }
    (sum_dout, dgamma)
}

/// Whether a channel's `Σ dout · (x - mean) · inv_std` may have over- or underflowed.
fn needs_exact_sums(inv_std: f64, dgamma: f64) -> bool {
    !SAFE_INV_STD.contains(&inv_std) || !dgamma.is_finite()
}

/// One channel's `Σ dout` and `Σ dout · x̂` with `x̂` formed for each value: right for data of
/// any magnitude, and a multiplication per value dearer (so only for the channels that need it).
#[cold]
fn exact_channel_sums<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    channel: usize,
    (mean, inv_std): (f64, f64),
) -> (f64, f64) {
    let values = channel_lanes(dout, dims, channel)
        .flatten()
        .zip(channel_lanes(x, dims, channel).flatten());
    values.fold((0.0, 0.0), |(sum_dout, sum_dout_xhat), (g, v)| {
        let g = g.as_f64();
        (sum_dout + g, sum_dout_xhat + g * ((v.as_f64() - mean) * inv_std))
    })
}

/// [`grad_sums_row_major`]'s raw sums over one block.
#[multiversion(targets("x86_64+avx2+fma"))]
fn block_grad_sums<T: Element>(dout: &[T], x: &[T], dims: Dims, mean: &[f64]) -> RawSums {
    let c = dims.c;
    let mut sums = RawSums::zeros(c);
    if dims.s > 1 {
        for (g_row, x_row) in dout.chunks_exact(dims.row()).zip(x.chunks_exact(dims.row())) {
            let lanes = g_row.chunks_exact(dims.s).zip(x_row.chunks_exact(dims.s));
            for (channel, (g, v)) in lanes.enumerate() {
                let (lane_dout, lane_dout_xmu) = lane_grad_sums(g, v, mean[channel]);
                sums.sum_dout[channel] += lane_dout;
                sums.sum_dout_xmu[channel] += lane_dout_xmu;
            }
        }
        return sums;
    }
    for tile in tiles_of(c, CHANNEL_TILE) {
        // Slices cut to one width: the index loops carry no bounds checks and vectorise.
        let w = tile.len();
        let sum_dout = &mut sums.sum_dout[tile.clone()][..w];
        let sum_dout_xmu = &mut sums.sum_dout_xmu[tile.clone()][..w];
        let mean = &mean[tile.clone()][..w];
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
                let (a, b, e, f) = (g0[j].as_f64(), g1[j].as_f64(), g2[j].as_f64(), g3[j].as_f64());
                let mu = mean[j];
                let (xa, xb, xe, xf) = (
                    v0[j].as_f64() - mu,
                    v1[j].as_f64() - mu,
                    v2[j].as_f64() - mu,
                    v3[j].as_f64() - mu,
                );
                sum_dout[j] += (a + b) + (e + f);
                sum_dout_xmu[j] += (a * xa + b * xb) + (e * xe + f * xf);
            }
        }
        for (g_row, x_row) in g_left.chunks_exact(c).zip(x_left.chunks_exact(c)) {
            let (g, v) = (&g_row[tile.clone()][..w], &x_row[tile.clone()][..w]);
            for j in 0..w {
                let g = g[j].as_f64();
                sum_dout[j] += g;
                sum_dout_xmu[j] += g * (v[j].as_f64() - mean[j]);
            }
        }
    }
    sums
}

/// A lane's `Σ dout` and `Σ dout · (x - mean)` from its `dout` values `g` and its `x` values
/// `v`: one loop for both, each in [`LANES`] interleaved partial sums.
#[inline(always)]
fn lane_grad_sums<T: Element>(g: &[T], v: &[T], mean: f64) -> (f64, f64) {
    // `sum_xmu` (Σ (x - mean)) is not needed, but with it the compiler vectorises this loop for
    // f32 data (without it, it pairs the two sums instead and converts one f32 at a time);
    // `black_box` keeps it from being optimised away.
    let (mut sum_g, mut sum_gx, mut sum_xmu) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
    let mut add = |g: &[T], v: &[T]| {
        let sums = sum_g.iter_mut().zip(sum_gx.iter_mut()).zip(sum_xmu.iter_mut());
        for (((sg, sgx), sx), (g, v)) in sums.zip(g.iter().zip(v)) {
            let (g, xmu) = (g.as_f64(), v.as_f64() - mean);
            *sg += g;
            *sgx += g * xmu;
            *sx += xmu;
        }
    };
    let (mut blocks_g, mut blocks_v) = (g.chunks_exact(LANES), v.chunks_exact(LANES));
    for (block_g, block_v) in (&mut blocks_g).zip(&mut blocks_v) {
        add(block_g, block_v);
    }
    add(blocks_g.remainder(), blocks_v.remainder());
    std::hint::black_box(sum_xmu);
    (sum_g.iter().sum(), sum_gx.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch_norm::kernel::lane_sum;

    #[test]
    fn lane_sums_add_every_term_as_lane_sum_does() {
        for len in 0..20 {
            let g: Vec<f32> = (0..len).map(|i| 0.5 - i as f32 * 0.375).collect();
            let v: Vec<f32> = (0..len).map(|i| 1e4 + i as f32 * 0.25).collect();
            let mean = 1e4 + 0.125;
            let (sum_g, sum_gx) = lane_grad_sums(&g, &v, mean);
            let direct_g: f64 = g.iter().map(|&g| f64::from(g)).sum();
            let direct_gx: f64 = g
                .iter()
                .zip(&v)
                .map(|(&g, &v)| f64::from(g) * (f64::from(v) - mean))
                .sum();
            approx::assert_abs_diff_eq!(sum_g, direct_g, epsilon = 1e-9);
            approx::assert_abs_diff_eq!(sum_gx, direct_gx, epsilon = 1e-9);
            // Bit for bit the two sums `lane_sum` makes.
            let pairs: Vec<(f32, f32)> = g.iter().copied().zip(v.iter().copied()).collect();
            assert_eq!(sum_g, lane_sum(&g, f64::from));
            assert_eq!(
                sum_gx,
                lane_sum(&pairs, |(g, v)| f64::from(g) * (f64::from(v) - mean))
            );
        }
    }

    #[test]
    fn row_major_and_channel_major_sums_agree_with_a_direct_sum() {
        for dims in [Dims { n: 1001, c: 3, s: 1 }, Dims { n: 37, c: 4, s: 9 }] {
            let x: Vec<f64> = (0..dims.rows().len())
                .map(|i| ((i * 7919) % 1013) as f64 * 0.37)
                .collect();
            let dout: Vec<f64> = (0..dims.rows().len())
                .map(|i| ((i * 104_729) % 997) as f64 * 0.01 - 5.0)
                .collect();
            let mean: Vec<f64> = (0..dims.c).map(|c| 180.0 + c as f64).collect();
            let inv_std: Vec<f64> = (0..dims.c).map(|c| 0.01 * (1 + c) as f64).collect();
            let sums = grad_sums_row_major(&dout, &x, dims, (&mean, &inv_std));
            for (channel, (&mu, &r)) in mean.iter().zip(&inv_std).enumerate() {
                let (g, v) = (
                    channel_lanes(&dout, dims, channel),
                    channel_lanes(&x, dims, channel),
                );
                let pairs: Vec<(f64, f64)> = g.flatten().copied().zip(v.flatten().copied()).collect();
                let direct_g: f64 = pairs.iter().map(|p| p.0).sum();
                let direct_gx: f64 = pairs.iter().map(|(g, v)| g * (v - mu) * r).sum();
                approx::assert_relative_eq!(sums.sum_dout[channel], direct_g, max_relative = 1e-12);
                approx::assert_relative_eq!(sums.sum_dout_xhat[channel], direct_gx, max_relative = 1e-12);
                let (one_g, one_gx) = channel_grad_sums(&dout, &x, dims, channel, (mu, r));
                approx::assert_relative_eq!(one_g, direct_g, max_relative = 1e-12);
                approx::assert_relative_eq!(one_gx, direct_gx, max_relative = 1e-12);
            }
        }
    }

    #[test]
    fn a_sum_that_overflows_with_a_safe_inv_std_is_summed_again_exactly() {
        // inv_std 0.01 is in the safe range, but dout · (x - mean) = 1e307 · 300 overflows.
        let dims = Dims { n: 4, c: 1, s: 1 };
        let (x, dout) = ([300.0, -300.0, 100.0, -100.0], [1e307, -1e307, 5e306, 1e306]);
        let inv_std = 0.01;
        assert!(SAFE_INV_STD.contains(&inv_std));
        let expected: f64 = x.iter().zip(&dout).map(|(x, g)| g * (x * inv_std)).sum();
        let sums = grad_sums_row_major(&dout, &x, dims, (&[0.0], &[inv_std]));
        let one = channel_grad_sums(&dout, &x, Dims { n: 1, c: 1, s: 4 }, 0, (0.0, inv_std));
        approx::assert_relative_eq!(sums.sum_dout_xhat[0], expected, max_relative = 1e-15);
        approx::assert_relative_eq!(one.1, expected, max_relative = 1e-15);
    }

    #[test]
    fn products_that_overflow_before_normalizing_do_not() {
        // dout ~ 1e200 and x - mean ~ 1e200: their product overflows f64, dout · x̂ does not.
        let dims = Dims { n: 4, c: 1, s: 1 };
        let (x, dout) = ([1e200, -1e200, 3e200, -3e200], [2e200, 1e200, -1e200, 5e199]);
        let (mean, inv_std) = (0.0, 1.0 / (5.0f64.sqrt() * 1e200));
        let sums = grad_sums_row_major(&dout, &x, dims, (&[mean], &[inv_std]));
        let one = channel_grad_sums(&dout, &x, Dims { n: 1, c: 1, s: 4 }, 0, (mean, inv_std));
        let expected: f64 = x.iter().zip(&dout).map(|(x, g)| g * (x * inv_std)).sum();
        assert!(expected.is_finite());
        approx::assert_relative_eq!(sums.sum_dout_xhat[0], expected, max_relative = 1e-15);
        approx::assert_relative_eq!(one.1, expected, max_relative = 1e-15);
    }
}
