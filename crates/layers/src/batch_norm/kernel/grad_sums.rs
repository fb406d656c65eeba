//! The backward pass's per-channel sums, from one pass reading `dout` and `x`: `Σ dout` (which
//! is `dbeta`) and `Σ dout · x̂` (which is `dgamma`), accumulated in f64, with `x̂ = (x - mean) ·
//! inv_std` formed for each value: `dout · (x - mean)` could overflow where `dout · x̂` does not.
//!
//! - Row-major ([`grad_sums_row_major`]): block by block, the blocks' sums added in block
//!   order; `(N, C)` rows four at a time (see [`quarter_steps`]), in tiles of channels.
//! - Channel-major ([`channel_grad_sums`]): one channel's lanes, one after the other.

use multiversion::multiversion;
use tape::Element;

use super::{Dims, channel_lanes, lane_sum, lane_sum_of_pairs, quarter_steps, tiles_of};
use crate::schedule::fold_blocks;

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

impl GradSums {
    fn zeros(c: usize) -> Self {
        GradSums {
            sum_dout: vec![0.0; c],
            sum_dout_xhat: vec![0.0; c],
        }
    }

    fn add(&mut self, other: &GradSums) {
        for (total, value) in self.sum_dout.iter_mut().zip(&other.sum_dout) {
            *total += value;
        }
        for (total, value) in self.sum_dout_xhat.iter_mut().zip(&other.sum_dout_xhat) {
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
        |range| block_grad_sums(&dout[range.clone()], &x[range], dims, (mean, inv_std)),
        |total, block| total.add(&block),
    );
    sums.unwrap_or_else(|| GradSums::zeros(dims.c))
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
    let (mut sum_dout, mut sum_dout_xhat) = (0.0, 0.0);
    for (g, v) in channel_lanes(dout, dims, channel).zip(channel_lanes(x, dims, channel)) {
        let (lane_dout, lane_dout_xhat) = lane_grad_sums(g, v, (mean, inv_std));
        sum_dout += lane_dout;
        sum_dout_xhat += lane_dout_xhat;
    }
    (sum_dout, sum_dout_xhat)
}

/// [`grad_sums_row_major`] over one block.
#[multiversion(targets("x86_64+avx2+fma"))]
fn block_grad_sums<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    (mean, inv_std): (&[f64], &[f64]),
) -> GradSums {
    let c = dims.c;
    let mut sums = GradSums::zeros(c);
    if dims.s > 1 {
        for (g_row, x_row) in dout.chunks_exact(dims.row()).zip(x.chunks_exact(dims.row())) {
            let lanes = g_row.chunks_exact(dims.s).zip(x_row.chunks_exact(dims.s));
            for (channel, (g, v)) in lanes.enumerate() {
                let (lane_dout, lane_dout_xhat) = lane_grad_sums(g, v, (mean[channel], inv_std[channel]));
                sums.sum_dout[channel] += lane_dout;
                sums.sum_dout_xhat[channel] += lane_dout_xhat;
            }
        }
        return sums;
    }
    for tile in tiles_of(c, CHANNEL_TILE) {
        // Slices cut to one width: the index loops carry no bounds checks and vectorise.
        let w = tile.len();
        let sum_dout = &mut sums.sum_dout[tile.clone()][..w];
        let sum_dout_xhat = &mut sums.sum_dout_xhat[tile.clone()][..w];
        let (mean, inv_std) = (&mean[tile.clone()][..w], &inv_std[tile.clone()][..w]);
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
                let (mu, r) = (mean[j], inv_std[j]);
                let (xa, xb, xe, xf) = (
                    (v0[j].as_f64() - mu) * r,
                    (v1[j].as_f64() - mu) * r,
                    (v2[j].as_f64() - mu) * r,
                    (v3[j].as_f64() - mu) * r,
                );
                sum_dout[j] += (a + b) + (e + f);
                sum_dout_xhat[j] += (a * xa + b * xb) + (e * xe + f * xf);
            }
        }
        for (g_row, x_row) in g_left.chunks_exact(c).zip(x_left.chunks_exact(c)) {
            let (g, v) = (&g_row[tile.clone()][..w], &x_row[tile.clone()][..w]);
            for j in 0..w {
                let g = g[j].as_f64();
                sum_dout[j] += g;
                sum_dout_xhat[j] += g * ((v[j].as_f64() - mean[j]) * inv_std[j]);
            }
        }
    }
    sums
}

/// A lane's `Σ dout` and `Σ dout · x̂` from its `dout` values `g` and its `x` values `v`, each
/// in [`LANES`](super::LANES) interleaved partial sums. Two loops, one sum each (the second reads the lane
/// from L1): the compiler vectorises a loop of one sum reliably, and a loop of two not always.
#[inline(always)]
fn lane_grad_sums<T: Element>(g: &[T], v: &[T], (mean, inv_std): (f64, f64)) -> (f64, f64) {
    let sum_dout = lane_sum(g, |g| g.as_f64());
    let sum_dout_xhat = lane_sum_of_pairs(g, v, |g, v| g.as_f64() * ((v.as_f64() - mean) * inv_std));
    (sum_dout, sum_dout_xhat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sums_add_every_term_as_lane_sum_does() {
        for len in 0..20 {
            let g: Vec<f32> = (0..len).map(|i| 0.5 - i as f32 * 0.375).collect();
            let v: Vec<f32> = (0..len).map(|i| 1e4 + i as f32 * 0.25).collect();
            let (mean, inv_std) = (1e4 + 0.125, 0.75);
            let xhat = |v: f32| (f64::from(v) - mean) * inv_std;
            let (sum_g, sum_gx) = lane_grad_sums(&g, &v, (mean, inv_std));
            let direct_g: f64 = g.iter().map(|&g| f64::from(g)).sum();
            let direct_gx: f64 = g.iter().zip(&v).map(|(&g, &v)| f64::from(g) * xhat(v)).sum();
            approx::assert_abs_diff_eq!(sum_g, direct_g, epsilon = 1e-9);
            approx::assert_abs_diff_eq!(sum_gx, direct_gx, epsilon = 1e-9);
            // Bit for bit the two sums `lane_sum` makes.
            let pairs: Vec<(f32, f32)> = g.iter().copied().zip(v.iter().copied()).collect();
            assert_eq!(sum_g, lane_sum(&g, f64::from));
            assert_eq!(sum_gx, lane_sum(&pairs, |(g, v)| f64::from(g) * xhat(v)));
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
