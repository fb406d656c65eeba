//! Channel-major passes for `(N, C, S)` data with long lanes (the feature maps of a
//! convolutional net, BatchNorm2d): each worker takes whole channels, and for each one computes
//! its statistics and then its output (forward), or its sums and then its `dx` (backward).
//!
//! The row-major passes of the parent module read the whole input for the statistics, then all
//! of it again for the output: twice from memory when it does not fit in cache. Here a channel's
//! `N` lanes are read a second time right after the first, from cache where one channel's values
//! fit (392 KiB for `32x64x56x56` f32; L2 is 512 KiB here). For that shape, medians of 20 passes
//! of each kernel pair in turn, row-major against channel-major: forward 4.9 → 4.3 ms and
//! backward 7.4 → 6.0 ms in f32, 9.1 → 7.5 and 14.0 → 10.8 ms in f64. Less than a whole read of
//! the input saved: the lanes are short runs (12.5 KiB) spread over the input, and backward's two
//! arrays of a channel (dout and x) do not both fit in L2.
//!
//! Each channel is computed by one worker, in a fixed order (its lanes row by row), so results
//! do not depend on the number of threads. The arithmetic is the parent's: lanes summed in two
//! passes around the channel's first value and merged with Chan's formula, `f64` throughout but
//! for the output, which is evaluated in `T` with the mean split in two.

use std::mem::MaybeUninit;

use multiversion::multiversion;
use rayon::prelude::*;
use tape::Element;

use super::{
    Dims, ParamGrads, SplitAffine, Stats, affine_value, centre, chan_update, chan_weights, channel_inv_std,
    channel_lanes, input_grad_coefficients, input_grad_value, lane_grad_sums, lane_moments, recentres,
    rescue_channel, scaled_inv_std, split_affine_value, written,
};

/// The shortest lane (`S` values of one channel in one row) the channel-major passes take, in
/// bytes: a page. Shorter lanes are short runs spread over the whole input, and reading one
/// channel at a time from memory then costs more than the second read saves. Medians of 10-20
/// passes of each kernel pair in turn, forward + backward, row-major against channel-major:
/// lanes of 1 KiB (`256x64x16x16` f32) 6.4 against 10.0 ms, 3 KiB (`128x64x28x28` f32) 11.3
/// against 12.3 ms; 4 KiB (`256x64x32x32` f32) 28.9 against 27.2 ms, (`128x64x16x32` f64) 13.4
/// against 12.4 ms; 12 KiB (`32x64x56x56` f32) 12.3 against 10.3 ms.
pub const MIN_LANE_BYTES: usize = 4096;

/// The fewest channels the channel-major passes take: the work is split by channel, so fewer
/// channels than this would leave threads idle (the row-major passes split by rows).
pub const MIN_CHANNELS: usize = 8;

/// Whether inputs of these dimensions go through the channel-major passes (a function of the
/// shape and element type only, as every choice of the kernels).
pub fn applies<T>(dims: Dims) -> bool {
    dims.s * std::mem::size_of::<T>() >= MIN_LANE_BYTES && dims.c >= MIN_CHANNELS
}

/// The lanes of each channel in a row-major `N x C x S` buffer: `N` lanes of `S` elements for
/// each of the `C` channels, in row order.
fn lanes_by_channel<E>(buffer: &mut [E], dims: Dims) -> Vec<Vec<&mut [E]>> {
    let mut lanes: Vec<Vec<&mut [E]>> = (0..dims.c).map(|_| Vec::with_capacity(dims.n)).collect();
    for row in buffer.chunks_exact_mut(dims.row()) {
        for (channel, lane) in row.chunks_exact_mut(dims.s).enumerate() {
            lanes[channel].push(lane);
        }
    }
    lanes
}

/// A new array of `dims`' size, each channel's lanes written by `work(channel, lanes)` (which
/// must write each of them entirely), channels in parallel above the size threshold; and the
/// results of `work` in channel order.
fn per_channel<T: Element, R: Send>(
    dims: Dims,
    work: impl Fn(usize, Vec<&mut [MaybeUninit<T>]>) -> R + Sync + Send,
) -> (Vec<T>, Vec<R>) {
    written(dims.len(), |spare| {
        let lanes = lanes_by_channel(spare, dims);
        if dims.parallel() {
            lanes
                .into_par_iter()
                .enumerate()
                .map(|(c, lanes)| work(c, lanes))
                .collect()
        } else {
            lanes
                .into_iter()
                .enumerate()
                .map(|(c, lanes)| work(c, lanes))
                .collect()
        }
    })
}

/// Training-mode forward: the batch statistics, their `inv_std` and the output, as the
/// row-major `stats`, `Stats::inv_std` and `normalize` compute them, one channel at a time.
pub fn normalize_batch<T: Element>(
    x: &[T],
    dims: Dims,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (Stats, Vec<f64>, Vec<T>) {
    let (out, channels) = per_channel(dims, |channel, lanes| {
        forward_channel(x, dims, channel, lanes, (gamma[channel], beta[channel]), eps)
    });
    let mut stats = Stats {
        mean: Vec::with_capacity(dims.c),
        var: Vec::with_capacity(dims.c),
        overflowed: Vec::new(),
    };
    let mut inv_std = Vec::with_capacity(dims.c);
    for (channel, (mean, var, r, rescued)) in channels.into_iter().enumerate() {
        stats.mean.push(mean);
        stats.var.push(var);
        inv_std.push(r);
        if let Some((scale, var_scaled)) = rescued {
            stats.overflowed.push((channel, scale, var_scaled));
        }
    }
    (stats, inv_std, out)
}

/// One channel of [`normalize_batch`]: its mean, variance, `inv_std` and (where the variance
/// overflowed and was recomputed scaled) `(scale, var / scale²)`; its output lanes written.
#[multiversion(targets("x86_64+avx2+fma"))]
fn forward_channel<T: Element>(
    x: &[T],
    dims: Dims,
    channel: usize,
    out: Vec<&mut [MaybeUninit<T>]>,
    (gamma, beta): (f64, f64),
    eps: f64,
) -> (f64, f64, f64, Option<(f64, f64)>) {
    // Statistics: each lane in two passes around the channel's first value (exact zeros for a
    // constant channel), merged lane by lane.
    let x0 = x[channel * dims.s].as_f64();
    let (mut offset, mut m2) = (0.0, 0.0);
    for (i, lane) in channel_lanes(x, dims, channel).enumerate() {
        let weights = chan_weights((i * dims.s) as f64, dims.s as f64);
        chan_update((&mut offset, &mut m2), lane_moments_apart(lane, x0), weights);
    }
    let (mut mean, mut var) = (x0 + offset, m2 / dims.per_channel() as f64);
    let mut inv_std = channel_inv_std(var, eps);
    let mut rescued = None;
    if !(mean.is_finite() && var.is_finite()) {
        if let Some(r) = rescue_channel(x, dims, channel) {
            (mean, var) = (r.mean, r.var);
            inv_std = scaled_inv_std(r.scale, r.var_scaled, eps);
            rescued = Some((r.scale, r.var_scaled));
        }
    }
    // Output, the lanes read again while in cache.
    let scale = gamma * inv_std;
    let lanes = out.into_iter().zip(channel_lanes(x, dims, channel));
    if let Some(k) = SplitAffine::<T>::new(&[mean], &[scale], &[beta]) {
        let [hi, lo, a, b] = k.parts().map(|k| k[0]);
        for (o, v) in lanes {
            for (o, &v) in o.iter_mut().zip(v) {
                *o = MaybeUninit::new(split_affine_value(v, hi, lo, a, b));
            }
        }
    } else {
        for (o, v) in lanes {
            for (o, &v) in o.iter_mut().zip(v) {
                *o = MaybeUninit::new(affine_value(v, mean, scale, beta));
            }
        }
    }
    (mean, var, inv_std, rescued)
}

/// [`lane_moments`] as a function of its own, compiled for AVX2 too: inlined into
/// [`forward_channel`], its f32 sums were not vectorised (forward 7.1 ms instead of 4.3 for
/// `32x64x56x56`).
#[multiversion(targets("x86_64+avx2+fma"))]
fn lane_moments_apart<T: Element>(lane: &[T], x0: f64) -> (f64, f64) {
    lane_moments(lane, x0)
}

/// Gradients `(dx, [dbeta | dgamma])` as the row-major `grad_sums` and `input_grad` compute them
/// (see `batch_norm::gradients`), one channel at a time: its sums, then its `dx` lanes.
pub fn gradients<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    (gamma, mean, inv_std): (&[f64], &[f64], &[f64]),
    batch_stats: bool,
    want_dx: bool,
) -> (Option<Vec<T>>, ParamGrads) {
    let m = dims.per_channel() as f64;
    // A channel's sum(dout), sum(dout · x̂) and the mean its dx is centred on.
    let sums = |channel: usize| {
        let [sum_dout, sum_dout_d, sum_d] = channel_sums(dout, x, dims, channel, mean[channel]);
        let recentre = recentres::<T>(batch_stats);
        let (mean, sum_dout_xmu) = centre(recentre, mean[channel], sum_dout, sum_dout_d, sum_d, m);
        (sum_dout, sum_dout_xmu * inv_std[channel], mean)
    };
    let (dx, sums): (Option<Vec<T>>, Vec<(f64, f64)>) = if want_dx {
        let (dx, sums) = per_channel(dims, |channel, out| {
            let (sum_dout, dgamma, mean) = sums(channel);
            let (g, r) = (gamma[channel], inv_std[channel]);
            let k = input_grad_coefficients(g, r, sum_dout, dgamma, m, batch_stats);
            channel_input_grad(dout, x, dims, channel, out, mean, k);
            (sum_dout, dgamma)
        });
        (Some(dx), sums)
    } else {
        let sums_only = |channel| {
            let (sum_dout, dgamma, _) = sums(channel);
            (sum_dout, dgamma)
        };
        if dims.parallel() {
            (None, (0..dims.c).into_par_iter().map(sums_only).collect())
        } else {
            (None, (0..dims.c).map(sums_only).collect())
        }
    };
    let c = dims.c;
    let mut values = vec![0.0; 2 * c];
    let (dbeta, dgamma) = values.split_at_mut(c);
    for ((b, g), (sum_dout, sum_dout_xhat)) in dbeta.iter_mut().zip(dgamma).zip(sums) {
        (*b, *g) = (sum_dout, sum_dout_xhat);
    }
    (dx, ParamGrads::new(values, c))
}

/// One channel's `[sum(dout), sum(dout · d), sum(d)]` with `d = x - shift` (see `grad_sums`),
/// lane by lane.
#[multiversion(targets("x86_64+avx2+fma"))]
fn channel_sums<T: Element>(dout: &[T], x: &[T], dims: Dims, channel: usize, shift: f64) -> [f64; 3] {
    let mut sums = [0.0; 3];
    for (g, v) in channel_lanes(dout, dims, channel).zip(channel_lanes(x, dims, channel)) {
        for (s, lane) in sums.iter_mut().zip(lane_grad_sums(g, v, shift)) {
            *s += lane;
        }
    }
    sums
}

/// One channel's `dx` lanes, `dx = a · dout + b · (x - mean) + d` with `[a, b, d]` from
/// [`input_grad_coefficients`], in f64 and rounded once (as `input_grad`).
#[multiversion(targets("x86_64+avx2+fma"))]
fn channel_input_grad<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    channel: usize,
    out: Vec<&mut [MaybeUninit<T>]>,
    mean: f64,
    k: [f64; 3],
) {
    let lanes = channel_lanes(dout, dims, channel).zip(channel_lanes(x, dims, channel));
    for (o, (g, v)) in out.into_iter().zip(lanes) {
        for ((o, &g), &v) in o.iter_mut().zip(g).zip(v) {
            *o = MaybeUninit::new(input_grad_value(g, v, mean, k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{self as row_major_passes, grad_sums, input_grad, normalize};
    use super::*;
    use crate::batch_norm::testing::normal;

    /// The row-major passes' results: statistics, `inv_std`, output, and `(dx, dgamma, dbeta)`.
    #[allow(clippy::type_complexity)] // the tuple is what the two paths return
    fn row_major<T: Element>(
        x: &[T],
        dout: &[T],
        dims: Dims,
        (gamma, beta): (&[f64], &[f64]),
    ) -> (Stats, Vec<f64>, Vec<T>, (Vec<T>, Vec<f64>, Vec<f64>)) {
        let stats = row_major_passes::stats(x, dims);
        let inv_std = stats.inv_std(1e-5);
        let scale: Vec<f64> = gamma.iter().zip(&inv_std).map(|(g, r)| g * r).collect();
        let out = normalize(x, dims, &stats.mean, &scale, beta);
        let m = dims.per_channel() as f64;
        let mut sums = grad_sums(dout, x, dims, &stats.mean);
        sums.centre_all(&stats.mean, m, true);
        let [sum_dout, sum_dout_xmu, _] = sums.parts_mut().map(|part| part.to_vec());
        let dgamma: Vec<f64> = sum_dout_xmu.iter().zip(&inv_std).map(|(s, r)| s * r).collect();
        let k: Vec<[f64; 3]> = (0..dims.c)
            .map(|c| input_grad_coefficients(gamma[c], inv_std[c], sum_dout[c], dgamma[c], m, true))
            .collect();
        let [a, b, d] = [0, 1, 2].map(|i| k.iter().map(|k| k[i]).collect::<Vec<f64>>());
        let dx = input_grad(dout, x, dims, &stats.mean, &a, &b, &d);
        (stats, inv_std, out, (dx, dgamma, sum_dout))
    }

    fn assert_close(what: &str, got: &[f64], expected: &[f64], tolerance: f64) {
        assert_eq!(got.len(), expected.len(), "{what}");
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!(
                (g - e).abs() <= tolerance * e.abs().max(1.0),
                "{what}[{i}]: {g} against {e} (row-major)"
            );
        }
    }

    #[test]
    fn channel_major_passes_match_the_row_major_ones() {
        // Lanes of 512 f64 (the shortest taken) and 600, channels 8 and 9, one to five rows.
        for (n, c, s) in [(1, 8, 512), (3, 9, 600), (5, 8, 512)] {
            let dims = Dims { n, c, s };
            assert!(applies::<f64>(dims));
            let x = normal(&[n, c, s], 3.0, 2.0, 1).into_raw_vec_and_offset().0;
            let dout = normal(&[n, c, s], 0.5, 1.0, 2).into_raw_vec_and_offset().0;
            let gamma: Vec<f64> = (0..c).map(|i| 0.5 + 0.25 * i as f64).collect();
            let beta: Vec<f64> = (0..c).map(|i| 1.0 - 0.5 * i as f64).collect();
            let (stats, inv_std, out, (dx, dgamma, dbeta)) = row_major(&x, &dout, dims, (&gamma, &beta));

            let (channel_stats, channel_inv_std, channel_out) =
                normalize_batch(&x, dims, &gamma, &beta, 1e-5);
            assert_close("mean", &channel_stats.mean, &stats.mean, 1e-14);
            assert_close("var", &channel_stats.var, &stats.var, 1e-13);
            assert_close("inv_std", &channel_inv_std, &inv_std, 1e-13);
            assert_close("out", &channel_out, &out, 1e-12);

            let args = (&gamma[..], &stats.mean[..], &inv_std[..]);
            let (channel_dx, channel_params) = gradients(&dout, &x, dims, args, true, true);
            assert_close("dx", &channel_dx.unwrap(), &dx, 1e-12);
            assert_close("dgamma", channel_params.dgamma(), &dgamma, 1e-12);
            assert_close("dbeta", channel_params.dbeta(), &dbeta, 1e-12);
            // Without dx: the same sums, and no dx.
            let (none, params_only) = gradients(&dout, &x, dims, args, true, false);
            assert!(none.is_none());
            assert_eq!(params_only, channel_params);
        }
    }

    #[test]
    fn evaluation_gradients_scale_dout_only() {
        // Constants for mean and inv_std: dx = gamma · inv_std · dout.
        let dims = Dims { n: 2, c: 8, s: 256 };
        let x = normal(&[2, 8, 256], 0.0, 1.0, 3).into_raw_vec_and_offset().0;
        let dout = normal(&[2, 8, 256], 0.0, 1.0, 4).into_raw_vec_and_offset().0;
        let (gamma, mean, inv_std) = (vec![2.0; 8], vec![0.5; 8], vec![0.25; 8]);
        let (dx, _) = gradients(&dout, &x, dims, (&gamma, &mean, &inv_std), false, true);
        for (dx, g) in dx.unwrap().iter().zip(&dout) {
            assert_eq!(*dx, 0.5 * g);
        }
    }

    #[test]
    fn each_element_belongs_to_one_lane_of_its_own_channel() {
        let dims = Dims { n: 3, c: 4, s: 5 };
        let mut buffer = vec![usize::MAX; 60];
        for (channel, lanes) in lanes_by_channel(&mut buffer, dims).into_iter().enumerate() {
            assert_eq!(lanes.len(), 3);
            for lane in lanes {
                assert_eq!(lane.len(), 5);
                lane.iter_mut().for_each(|v| *v = channel);
            }
        }
        for (i, v) in buffer.iter().enumerate() {
            assert_eq!(*v, i / 5 % 4, "element {i}");
        }
    }

    #[test]
    fn constant_channels_give_exactly_beta_and_huge_values_stay_finite() {
        let dims = Dims { n: 2, c: 8, s: 256 };
        let mut x = normal(&[2, 8, 256], 0.0, 1.0, 5).into_raw_vec_and_offset().0;
        // Channel 1 constant at 1e30; channel 2 around 1e200, whose squares overflow f64.
        for row in x.chunks_mut(8 * 256) {
            row[256..512].fill(1e30);
            for (i, v) in row[512..768].iter_mut().enumerate() {
                *v = 1e200 * (1.0 + (i % 7) as f64);
            }
        }
        let (gamma, beta) = (vec![1.5; 8], vec![-0.25; 8]);
        let (stats, inv_std, out) = normalize_batch(&x, dims, &gamma, &beta, 1e-5);
        assert_eq!((stats.mean[1], stats.var[1]), (1e30, 0.0));
        for row in out.chunks(8 * 256) {
            assert!(row[256..512].iter().all(|&v| v == -0.25));
        }
        assert!(stats.var[2].is_infinite() && inv_std[2] > 0.0 && inv_std[2].is_finite());
        assert!(out.iter().all(|v| v.is_finite()));
        // The row-major passes rescue the same channel the same way.
        let row_stats = row_major_passes::stats(&x, dims);
        assert_eq!(stats.mean[2], row_stats.mean[2]);
        assert_eq!(inv_std[2], row_stats.inv_std(1e-5)[2]);
    }

    #[test]
    fn f32_output_keeps_the_digits_of_a_large_mean() {
        // Mean 1e4, standard deviation 1: `x - mean` with the mean rounded to f32 would be off
        // by up to 5e-4 standard deviations; split in two it is exact to f32's rounding of x̂.
        let dims = Dims { n: 4, c: 8, s: 1024 };
        assert!(applies::<f32>(dims));
        let x64 = normal(&[4, 8, 1024], 1e4, 1.0, 6).into_raw_vec_and_offset().0;
        let x: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
        let (gamma, beta) = (vec![1.0; 8], vec![0.0; 8]);
        let (stats, inv_std, out) = normalize_batch(&x, dims, &gamma, &beta, 1e-5);
        for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
            let channel = i / 1024 % 8;
            let expected = (f64::from(v) - stats.mean[channel]) * inv_std[channel];
            assert!((f64::from(o) - expected).abs() < 1e-6, "{o} against {expected}");
        }
    }
}
