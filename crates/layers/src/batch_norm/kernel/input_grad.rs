//! The input gradient: one pass writing `dx`, an affine map of `dout` and `x̂ = (x - mean) ·
//! inv_std` per channel, `dx = dout_scale · dout + xhat_scale · x̂ + offset`.
//!
//! From the training-mode formula `dx = a · (dout - mean(dout) - x̂ · mean(dout · x̂))` with
//! `a = gamma · inv_std` (derived in the `batch_norm` module docs): `dout_scale = a`,
//! `xhat_scale = -a · mean(dout · x̂)`, `offset = -a · mean(dout)`. In evaluation mode the
//! statistics are constants and the last two are 0. `x̂` is formed for each value, not folded
//! into a coefficient of `x - mean`: that coefficient, `a · inv_std · mean(dout · x̂)`, overflows
//! or underflows for data far from 1 in magnitude (1e±160) where `dx` itself does not.
//!
//! Unlike the output, `dx` is evaluated in f64 whatever `T` is: its three terms nearly cancel
//! where `dout` is close to its projection (with two values per channel `dx` is 0 up to `eps`),
//! and in f32 the rounding of each term would be an error of the order of the terms, not of `dx`.

use std::mem::MaybeUninit;

use multiversion::multiversion;
use tape::Element;

use super::Dims;
use crate::schedule::collect_blocks;

/// One channel's coefficients of `dx`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ChannelCoefficients {
    /// Multiplies `dout`.
    pub dout_scale: f64,
    /// Multiplies `x̂`.
    pub xhat_scale: f64,
    /// Added.
    pub offset: f64,
}

impl ChannelCoefficients {
    /// The coefficients of a channel from its `gamma`, `inv_std`, `Σ dout`, `dgamma = Σ dout ·
    /// x̂` and `m` values; `batch_stats` says whether mean and `inv_std` are the batch's own
    /// (training) or constants (evaluation).
    pub fn new(gamma: f64, inv_std: f64, sum_dout: f64, dgamma: f64, m: f64, batch_stats: bool) -> Self {
        let a = gamma * inv_std;
        let (xhat_scale, offset) = if batch_stats {
            (-a * (dgamma / m), -a * (sum_dout / m))
        } else {
            (0.0, 0.0)
        };
        ChannelCoefficients {
            dout_scale: a,
            xhat_scale,
            offset,
        }
    }

    /// `dx` of one value, evaluated in f64 and rounded once.
    #[inline(always)]
    fn apply<T: Element>(self, dout: T, x: T, (mean, inv_std): (f64, f64)) -> T {
        let xhat = (x.as_f64() - mean) * inv_std;
        T::from_f64_lossy(self.dout_scale * dout.as_f64() + self.xhat_scale * xhat + self.offset)
    }
}

/// Every channel's coefficients, one vector each (the row-major loop reads each contiguously).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InputGradCoefficients {
    dout_scale: Vec<f64>,
    xhat_scale: Vec<f64>,
    offset: Vec<f64>,
}

impl InputGradCoefficients {
    /// Every channel's [`ChannelCoefficients::new`], from per-channel `gamma`, `inv_std`, `Σ dout`
    /// and `dgamma`.
    pub fn new(
        (gamma, inv_std): (&[f64], &[f64]),
        (sum_dout, dgamma): (&[f64], &[f64]),
        m: f64,
        batch_stats: bool,
    ) -> Self {
        let channels = || {
            let inputs = gamma.iter().zip(inv_std).zip(sum_dout.iter().zip(dgamma));
            inputs.map(|((&g, &r), (&s, &dg))| ChannelCoefficients::new(g, r, s, dg, m, batch_stats))
        };
        InputGradCoefficients {
            dout_scale: channels().map(|k| k.dout_scale).collect(),
            xhat_scale: channels().map(|k| k.xhat_scale).collect(),
            offset: channels().map(|k| k.offset).collect(),
        }
    }

    /// The coefficients of one channel.
    fn channel(&self, channel: usize) -> ChannelCoefficients {
        ChannelCoefficients {
            dout_scale: self.dout_scale[channel],
            xhat_scale: self.xhat_scale[channel],
            offset: self.offset[channel],
        }
    }

    /// `dout_scale`, `xhat_scale` and `offset`, each cut to `c` channels.
    fn slices(&self, c: usize) -> (&[f64], &[f64], &[f64]) {
        (&self.dout_scale[..c], &self.xhat_scale[..c], &self.offset[..c])
    }
}

/// `dx` of row-major `dout` and `x`, block by block, straight into the new array; each channel's
/// `mean`, `inv_std` and coefficients.
pub(crate) fn input_grad_row_major<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    stats: (&[f64], &[f64]),
    coefficients: &InputGradCoefficients,
) -> Vec<T> {
    collect_blocks(dims.rows(), |range, out| {
        input_grad_block(&dout[range.clone()], &x[range], out, dims, stats, coefficients)
    })
}

/// One channel's `dx` lanes (`out`, one per row), as [`input_grad_row_major`] computes them.
#[multiversion(targets("x86_64+avx2+fma"))]
pub(crate) fn channel_input_grad<T: Element>(
    (dout, x): (&[T], &[T]),
    dims: Dims,
    channel: usize,
    out: Vec<&mut [MaybeUninit<T>]>,
    stats: (f64, f64),
    k: ChannelCoefficients,
) {
    let lanes = super::channel_lanes(dout, dims, channel).zip(super::channel_lanes(x, dims, channel));
    for (o, (g, v)) in out.into_iter().zip(lanes) {
        for ((o, &g), &v) in o.iter_mut().zip(g).zip(v) {
            *o = MaybeUninit::new(k.apply(g, v, stats));
        }
    }
}

/// [`input_grad_row_major`] of one block of rows into `out`.
#[multiversion(targets("x86_64+avx2+fma"))]
fn input_grad_block<T: Element>(
    dout: &[T],
    x: &[T],
    out: &mut [MaybeUninit<T>],
    dims: Dims,
    (mean, inv_std): (&[f64], &[f64]),
    coefficients: &InputGradCoefficients,
) {
    if dims.s == 1 {
        // Slices cut to one width: the index loop carries no bounds checks and vectorises.
        let c = dims.c;
        let (mean, inv_std) = (&mean[..c], &inv_std[..c]);
        let (dout_scale, xhat_scale, offset) = coefficients.slices(c);
        let rows = out
            .chunks_exact_mut(c)
            .zip(dout.chunks_exact(c))
            .zip(x.chunks_exact(c));
        for ((o, g), v) in rows {
            let (o, g, v) = (&mut o[..c], &g[..c], &v[..c]);
            for j in 0..c {
                let k = ChannelCoefficients {
                    dout_scale: dout_scale[j],
                    xhat_scale: xhat_scale[j],
                    offset: offset[j],
                };
                o[j] = MaybeUninit::new(k.apply(g[j], v[j], (mean[j], inv_std[j])));
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
            for (channel, ((o_lane, g_lane), x_lane)) in lanes.enumerate() {
                let (stats, k) = ((mean[channel], inv_std[channel]), coefficients.channel(channel));
                for ((o, &g), &v) in o_lane.iter_mut().zip(g_lane).zip(x_lane) {
                    *o = MaybeUninit::new(k.apply(g, v, stats));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_of_ragged_blocks_is_the_formula_in_f64_rounded_once() {
        // 3001 rows in blocks of 669 (a ragged last one), in parallel; (N, C) rows on one thread.
        for dims in [Dims { n: 3001, c: 7, s: 7 }, Dims { n: 1001, c: 3, s: 1 }] {
            let x: Vec<f32> = (0..dims.rows().len())
                .map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 50.0)
                .collect();
            let g: Vec<f32> = (0..dims.rows().len())
                .map(|i| ((i * 104_729) % 997) as f32 * 0.01 - 5.0)
                .collect();
            let mean: Vec<f64> = (0..dims.c).map(|c| c as f64 * 0.5 - 1.0).collect();
            let inv_std: Vec<f64> = (0..dims.c).map(|c| 0.5 + c as f64).collect();
            let k: Vec<ChannelCoefficients> = (0..dims.c)
                .map(|c| ChannelCoefficients {
                    dout_scale: 1.0 + c as f64,
                    xhat_scale: -(c as f64),
                    offset: 0.25 * c as f64,
                })
                .collect();
            let all = InputGradCoefficients {
                dout_scale: k.iter().map(|k| k.dout_scale).collect(),
                xhat_scale: k.iter().map(|k| k.xhat_scale).collect(),
                offset: k.iter().map(|k| k.offset).collect(),
            };
            let dx = input_grad_row_major(&g, &x, dims, (&mean, &inv_std), &all);
            assert_eq!(dx.len(), dims.rows().len());
            for i in 0..dims.rows().len() {
                let c = i / dims.s % dims.c;
                let (v, gi) = (f64::from(x[i]), f64::from(g[i]));
                let xhat = (v - mean[c]) * inv_std[c];
                let expected = k[c].dout_scale * gi + k[c].xhat_scale * xhat + k[c].offset;
                assert_eq!(dx[i], expected as f32, "dx[{i}]");
            }
        }
    }

    #[test]
    fn evaluation_coefficients_scale_dout_only() {
        let k = ChannelCoefficients::new(2.0, 0.25, 3.0, -1.5, 8.0, false);
        assert_eq!((k.dout_scale, k.xhat_scale, k.offset), (0.5, 0.0, 0.0));
        let k = ChannelCoefficients::new(2.0, 0.25, 3.0, -1.5, 8.0, true);
        assert_eq!(
            (k.dout_scale, k.xhat_scale, k.offset),
            (0.5, 0.5 * 1.5 / 8.0, -0.5 * 3.0 / 8.0)
        );
    }
}
