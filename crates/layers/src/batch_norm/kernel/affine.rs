//! The output: a per-channel affine map `out = (x - mean) · scale + shift`. With
//! `scale = gamma · inv_std` and `shift = beta` it is BatchNorm's output, and `x == mean` gives
//! exactly `shift`.
//!
//! For data narrower than f64 (f32) the map is evaluated in `T`'s own arithmetic, twice the SIMD
//! lanes of f64 and no conversions, with the mean split in two `T` parts so that `x - mean` loses
//! nothing to the mean's rounding (see [`SplitAffine`]). f64 data, or a coefficient that does
//! not fit `T`, is evaluated in f64 and rounded once.

use std::mem::MaybeUninit;

use multiversion::multiversion;
use tape::Element;

use super::{Dims, channel_lanes};
use crate::schedule::collect_blocks;

/// `(x - mean) · scale + shift` per channel of row-major `x`, block by block, straight into the
/// new array.
pub(crate) fn normalize_row_major<T: Element>(
    x: &[T],
    dims: Dims,
    mean: &[f64],
    scale: &[f64],
    shift: &[f64],
) -> Vec<T> {
    match SplitAffine::<T>::new(mean, scale, shift) {
        Some(k) => {
            let k = [&k.mean_hi[..], &k.mean_lo, &k.scale, &k.shift];
            collect_blocks(dims.rows(), |range, out| {
                normalize_block(&x[range], out, dims, k, split_affine_value)
            })
        }
        None => {
            let k = [mean, mean, scale, shift];
            let map = |v: T, mean: f64, _: f64, scale: f64, shift: f64| affine_value(v, mean, scale, shift);
            collect_blocks(dims.rows(), |range, out| {
                normalize_block(&x[range], out, dims, k, map)
            })
        }
    }
}

/// One channel's output lanes (`out`, one per row) from its lanes of row-major `x`, as
/// [`normalize_row_major`] computes them.
#[multiversion(targets("x86_64+avx2+fma"))]
pub(crate) fn normalize_channel<T: Element>(
    x: &[T],
    dims: Dims,
    channel: usize,
    out: Vec<&mut [MaybeUninit<T>]>,
    (mean, scale, shift): (f64, f64, f64),
) {
    let lanes = out.into_iter().zip(channel_lanes(x, dims, channel));
    if let Some(k) = SplitAffine::<T>::new(&[mean], &[scale], &[shift]) {
        let (hi, lo, a, b) = (k.mean_hi[0], k.mean_lo[0], k.scale[0], k.shift[0]);
        for (o, v) in lanes {
            for (o, &v) in o.iter_mut().zip(v) {
                *o = MaybeUninit::new(split_affine_value(v, hi, lo, a, b));
            }
        }
    } else {
        for (o, v) in lanes {
            for (o, &v) in o.iter_mut().zip(v) {
                *o = MaybeUninit::new(affine_value(v, mean, scale, shift));
            }
        }
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

/// The per-channel coefficients of the map rounded to `T`, for evaluating it in `T`'s
/// arithmetic. The mean is split in two, `mean_hi + mean_lo`, so `(x - mean_hi) - mean_lo` keeps
/// the digits a rounded mean would lose (`x - mean` in f32 near mean 1e4 would be off by up to
/// 5e-4), and `x == mean` still gives exactly 0.
struct SplitAffine<T> {
    mean_hi: Vec<T>,
    mean_lo: Vec<T>,
    scale: Vec<T>,
    shift: Vec<T>,
}

impl<T: Element> SplitAffine<T> {
    /// `None` for a `T` as wide as f64 (evaluating in f64 is then its own arithmetic), and when
    /// a finite coefficient overflows `T` (a huge `gamma` in f32, say): evaluated in f64, where
    /// `0 · scale` stays 0 instead of `0 · inf = NaN`.
    fn new(mean: &[f64], scale: &[f64], shift: &[f64]) -> Option<Self> {
        if std::mem::size_of::<T>() >= std::mem::size_of::<f64>() {
            return None;
        }
        let round = |values: &[f64]| -> Option<Vec<T>> {
            let rounded: Vec<T> = values.iter().map(|&v| T::from_f64_lossy(v)).collect();
            let fits = rounded
                .iter()
                .zip(values)
                .all(|(r, v)| r.is_finite() || !v.is_finite());
            fits.then_some(rounded)
        };
        let mean_hi = round(mean)?;
        // The rest is smaller than half a unit of `mean_hi`'s last place: it fits where `mean_hi`
        // does (and is NaN where the mean is not finite).
        let mean_lo = mean
            .iter()
            .zip(&mean_hi)
            .map(|(&m, hi)| T::from_f64_lossy(m - hi.as_f64()))
            .collect();
        Some(SplitAffine {
            mean_lo,
            mean_hi,
            scale: round(scale)?,
            shift: round(shift)?,
        })
    }
}

/// [`normalize_row_major`] of one block of rows into `out`: `map(x, k₀, k₁, k₂, k₃)` with each
/// channel's four coefficients.
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
            for (channel, (o_lane, x_lane)) in lanes.enumerate() {
                let [k0, k1, k2, k3] = k.map(|k| k[channel]);
                for (o, &v) in o_lane.iter_mut().zip(x_lane) {
                    *o = MaybeUninit::new(map(v, k0, k1, k2, k3));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::collect_by_group;

    fn dims(n: usize, c: usize, s: usize) -> Dims {
        Dims { n, c, s }
    }

    /// Deterministic values spread over [shift, shift + 375), in a scrambled order.
    fn spread_values(len: usize, shift: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.37 + shift)
            .collect()
    }

    #[test]
    fn f64_output_is_the_formula_in_f64_exactly() {
        // f64 data is evaluated in its own arithmetic: no split mean, no rounded coefficients.
        for d in [dims(37, 5, 1), dims(9, 3, 11)] {
            let x: Vec<f64> = spread_values(d.rows().len(), 1e4)
                .iter()
                .map(|&v| f64::from(v) * 1.1)
                .collect();
            let mean: Vec<f64> = (0..d.c).map(|c| 1e4 + c as f64 / 3.0).collect();
            let scale: Vec<f64> = (0..d.c).map(|c| 0.7 + c as f64).collect();
            let shift: Vec<f64> = (0..d.c).map(|c| -(c as f64) / 7.0).collect();
            let out = normalize_row_major(&x, d, &mean, &scale, &shift);
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
            let x = spread_values(d.rows().len(), -50.0);
            let mean: Vec<f64> = (0..d.c).map(|c| c as f64 * 0.5 - 1.0).collect();
            let scale: Vec<f64> = (0..d.c).map(|c| 1.0 + c as f64).collect();
            let shift: Vec<f64> = (0..d.c).map(|c| -(c as f64)).collect();
            let out = normalize_row_major(&x, d, &mean, &scale, &shift);
            assert_eq!(out.len(), d.rows().len());
            for i in 0..d.rows().len() {
                let c = i / d.s % d.c;
                let expected = (f64::from(x[i]) - mean[c]) * scale[c] + shift[c];
                let error = (f64::from(out[i]) - expected).abs();
                assert!(error <= 1e-6 * expected.abs().max(1.0), "out[{i}]");
            }
        }
    }

    #[test]
    fn f32_keeps_the_digits_of_a_large_mean() {
        // Mean 1e4 + 1/3: rounded to f32 it is off by 1e-4, which (x - mean) · 1e3 would show.
        let mean = 1e4 + 1.0 / 3.0;
        let x: Vec<f32> = (0..64)
            .map(|i| (mean + (i as f64 - 31.5) * 1e-3) as f32)
            .collect();
        let d = dims(1, 1, 64);
        let out = normalize_row_major(&x, d, &[mean], &[1e3], &[0.0]);
        for (o, v) in out.iter().zip(&x) {
            let expected = (f64::from(*v) - mean) * 1e3;
            assert!(
                (f64::from(*o) - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                "{o} vs {expected}"
            );
        }
        // The channel-major output is the same, bit for bit.
        let (by_channel, _) = collect_by_group(d.rows(), 1, |_, lanes| {
            normalize_channel(&x, d, 0, lanes, (mean, 1e3, 0.0));
        });
        assert_eq!(by_channel, out);
    }

    #[test]
    fn a_scale_beyond_f32_falls_back_to_f64_without_nan() {
        // scale 1e39 does not fit f32: in f32, 0 · inf would be NaN for the value at the mean.
        let x = [2.0f32, 2.0, 2.0];
        let out = normalize_row_major(&x, dims(3, 1, 1), &[2.0], &[1e39], &[0.5]);
        assert_eq!(out, vec![0.5, 0.5, 0.5]);
        let out = normalize_row_major(&[1.0f32, 3.0], dims(2, 1, 1), &[2.0], &[1e39], &[0.5]);
        assert_eq!(out, vec![f32::NEG_INFINITY, f32::INFINITY]);
    }
}
