//! The input gradient: one pass writing `dx`, an affine map of `dout` and `x - mean` per
//! channel.
//!
//! From the training-mode formula `dx = a · (dout - mean(dout) - x̂ · mean(dout · x̂))` with
//! `a = gamma · inv_std` and `x̂ = (x - mean) · inv_std` (derived in the `batch_norm` module
//! docs): `dx = a · dout + xhat_scale · x̂ + offset` with `xhat_scale = -a · mean(dout · x̂)` and
//! `offset = -a · mean(dout)`; in evaluation mode the statistics are constants and the last two
//! are 0. The pass folds `inv_std` into the coefficient of `x - mean`, `xmu_scale = xhat_scale ·
//! inv_std`, one multiplication less per value. For data far from 1 in magnitude (standard
//! deviations beyond about 1e±60) that coefficient over- or underflows where `dx` does not:
//! those channels form `x̂` for each value instead ([`Form::Exact`]).
//!
//! Unlike the output, `dx` is evaluated in f64 whatever `T` is: its three terms nearly cancel
//! where `dout` is close to its projection (with two values per channel `dx` is 0 up to `eps`),
//! and in f32 the rounding of each term would be an error of the order of the terms, not of `dx`.

use std::mem::MaybeUninit;

use multiversion::multiversion;
use tape::Element;

use super::Dims;
use super::grad_sums::SAFE_INV_STD;
use crate::schedule::collect_blocks;

/// How `dx` is formed from `x - mean`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// `xmu_scale · (x - mean)`.
    Folded,
    /// `xhat_scale · ((x - mean) · inv_std)`, for any magnitude.
    Exact,
}

/// One channel's coefficients of `dx`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ChannelCoefficients {
    /// Multiplies `dout`.
    pub dout_scale: f64,
    /// Multiplies `x̂`.
    pub xhat_scale: f64,
    /// Added.
    pub offset: f64,
    /// `inv_std`, which makes `x̂` of `x - mean`.
    pub inv_std: f64,
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
            inv_std,
        }
    }

    /// The coefficient of `x - mean` in the folded form.
    fn xmu_scale(&self) -> f64 {
        self.xhat_scale * self.inv_std
    }

    /// The form this channel can take (see [`folds`]).
    fn form(&self) -> Form {
        if folds(self.inv_std, self.xhat_scale) {
            Form::Folded
        } else {
            Form::Exact
        }
    }
}

/// Whether a channel can take the folded form: unless its `inv_std` is outside
/// [`SAFE_INV_STD`], or the folded coefficient `xhat_scale · inv_std` over- or underflows.
#[inline(always)]
fn folds(inv_std: f64, xhat_scale: f64) -> bool {
    let folded = xhat_scale * inv_std;
    let represented = if xhat_scale == 0.0 {
        folded == 0.0
    } else {
        folded.is_normal()
    };
    SAFE_INV_STD.contains(&inv_std) && represented
}

/// `dx = a · dout + b · centred + c` for one value, in f64 and rounded once.
#[inline(always)]
fn input_grad_value<T: Element>(dout: T, centred: f64, (a, b, c): (f64, f64, f64)) -> T {
    T::from_f64_lossy(a * dout.as_f64() + b * centred + c)
}

/// Every channel's coefficients, one vector each (the row-major loop reads each contiguously),
/// in the form every channel can take.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InputGradCoefficients {
    form: Form,
    dout_scale: Vec<f64>,
    /// `xmu_scale` in the folded form, `xhat_scale` in the exact one.
    centred_scale: Vec<f64>,
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
        let mut all = InputGradCoefficients {
            form: Form::Folded,
            dout_scale: channels().map(|k| k.dout_scale).collect(),
            centred_scale: channels().map(|k| k.xhat_scale).collect(),
            offset: channels().map(|k| k.offset).collect(),
        };
        if !inv_std
            .iter()
            .zip(&all.centred_scale)
            .all(|(&r, &xhat_scale)| folds(r, xhat_scale))
        {
            all.form = Form::Exact;
        } else {
            // In place: `xhat_scale · inv_std = xmu_scale`, as `ChannelCoefficients::xmu_scale`.
            for (scale, r) in all.centred_scale.iter_mut().zip(inv_std) {
                *scale *= r;
            }
        }
        all
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
        let (dout, x) = (&dout[range.clone()], &x[range]);
        match coefficients.form {
            Form::Folded => input_grad_block(dout, x, out, dims, stats, coefficients, |v, mu, _| v - mu),
            Form::Exact => input_grad_block(dout, x, out, dims, stats, coefficients, |v, mu, r| (v - mu) * r),
        }
    })
}

/// One channel's `dx` lanes (`out`, one per row), as [`input_grad_row_major`] computes them.
#[multiversion(targets("x86_64+avx2+fma"))]
pub(crate) fn channel_input_grad<T: Element>(
    (dout, x): (&[T], &[T]),
    dims: Dims,
    channel: usize,
    out: Vec<&mut [MaybeUninit<T>]>,
    mean: f64,
    k: ChannelCoefficients,
) {
    let lanes = super::channel_lanes(dout, dims, channel).zip(super::channel_lanes(x, dims, channel));
    let write = |out: Vec<&mut [MaybeUninit<T>]>, b: f64, centred: &dyn Fn(f64) -> f64| {
        for (o, (g, v)) in out.into_iter().zip(lanes) {
            for ((o, &g), &v) in o.iter_mut().zip(g).zip(v) {
                *o = MaybeUninit::new(input_grad_value(
                    g,
                    centred(v.as_f64()),
                    (k.dout_scale, b, k.offset),
                ));
            }
        }
    };
    match k.form() {
        Form::Folded => write(out, k.xmu_scale(), &|v| v - mean),
        Form::Exact => write(out, k.xhat_scale, &|v| (v - mean) * k.inv_std),
    }
}

/// [`input_grad_row_major`] of one block of rows into `out`, `centred(x, mean, inv_std)` giving
/// what the channel's `centred_scale` multiplies.
#[multiversion(targets("x86_64+avx2+fma"))]
fn input_grad_block<T: Element, F: Fn(f64, f64, f64) -> f64>(
    dout: &[T],
    x: &[T],
    out: &mut [MaybeUninit<T>],
    dims: Dims,
    (mean, inv_std): (&[f64], &[f64]),
    coefficients: &InputGradCoefficients,
    centred: F,
) {
    let InputGradCoefficients {
        dout_scale,
        centred_scale,
        offset,
        ..
    } = coefficients;
    if dims.s == 1 {
        // Slices cut to one width: the index loop carries no bounds checks and vectorises.
        let c = dims.c;
        let (mean, inv_std) = (&mean[..c], &inv_std[..c]);
        let (a, b, d) = (&dout_scale[..c], &centred_scale[..c], &offset[..c]);
        let rows = out
            .chunks_exact_mut(c)
            .zip(dout.chunks_exact(c))
            .zip(x.chunks_exact(c));
        for ((o, g), v) in rows {
            let (o, g, v) = (&mut o[..c], &g[..c], &v[..c]);
            for j in 0..c {
                let centred = centred(v[j].as_f64(), mean[j], inv_std[j]);
                o[j] = MaybeUninit::new(input_grad_value(g[j], centred, (a[j], b[j], d[j])));
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
                let (mu, r) = (mean[channel], inv_std[channel]);
                let k = (dout_scale[channel], centred_scale[channel], offset[channel]);
                for ((o, &g), &v) in o_lane.iter_mut().zip(g_lane).zip(x_lane) {
                    *o = MaybeUninit::new(input_grad_value(g, centred(v.as_f64(), mu, r), k));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `dx` of ragged blocks (3001 rows in blocks of 669, in parallel; `(N, C)` rows on one
    /// thread) is `a · dout + xhat_scale · x̂ + offset` in f64, rounded once.
    fn check_every_element(inv_std: impl Fn(usize) -> f64, form: Form) {
        for dims in [Dims { n: 3001, c: 7, s: 7 }, Dims { n: 1001, c: 3, s: 1 }] {
            let x: Vec<f64> = (0..dims.rows().len())
                .map(|i| ((i * 7919) % 1013) as f64 * 0.37 - 50.0)
                .collect();
            let g: Vec<f64> = (0..dims.rows().len())
                .map(|i| ((i * 104_729) % 997) as f64 * 0.01 - 5.0)
                .collect();
            let mean: Vec<f64> = (0..dims.c).map(|c| c as f64 * 0.5 - 1.0).collect();
            let inv_std: Vec<f64> = (0..dims.c).map(&inv_std).collect();
            let (gamma, sum_dout, dgamma): (Vec<f64>, Vec<f64>, Vec<f64>) = (
                (0..dims.c).map(|c| 1.0 + c as f64).collect(),
                (0..dims.c).map(|c| 3.0 - c as f64).collect(),
                (0..dims.c).map(|c| 0.25 * c as f64 - 0.5).collect(),
            );
            let m = dims.per_channel() as f64;
            let all = InputGradCoefficients::new((&gamma, &inv_std), (&sum_dout, &dgamma), m, true);
            assert_eq!(all.form, form);
            let dx = input_grad_row_major(&g, &x, dims, (&mean, &inv_std), &all);
            assert_eq!(dx.len(), dims.rows().len());
            for i in 0..dims.rows().len() {
                let c = i / dims.s % dims.c;
                let k = ChannelCoefficients::new(gamma[c], inv_std[c], sum_dout[c], dgamma[c], m, true);
                let xhat = (x[i] - mean[c]) * inv_std[c];
                let expected = k.dout_scale * g[i] + k.xhat_scale * xhat + k.offset;
                assert!(
                    (dx[i] - expected).abs() <= 1e-13 * (k.dout_scale * g[i]).abs().max(expected.abs()),
                    "dx[{i}]: {} against {expected}",
                    dx[i]
                );
            }
        }
    }

    #[test]
    fn every_element_of_ragged_blocks_is_the_formula_in_either_form() {
        check_every_element(|c| 0.5 + c as f64, Form::Folded);
        // One channel far from 1 in magnitude: the whole pass takes the exact form.
        check_every_element(|c| if c == 1 { 1e-100 } else { 0.5 + c as f64 }, Form::Exact);
    }

    #[test]
    fn the_folded_form_is_taken_only_where_its_coefficient_is_represented() {
        let k = |inv_std: f64, dgamma: f64| ChannelCoefficients::new(1.0, inv_std, 1.0, dgamma, 4.0, true);
        assert_eq!(k(2.0, 1.5).form(), Form::Folded);
        assert_eq!(k(2.0, 0.0).form(), Form::Folded);
        assert_eq!(k(1e-170, 1e200).form(), Form::Exact); // inv_std² underflows
        assert_eq!(k(1e170, 1e-30).form(), Form::Exact); // inv_std² overflows
        assert_eq!(k(1e30, 1e300).form(), Form::Exact); // safe inv_std, overflowing coefficient
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
