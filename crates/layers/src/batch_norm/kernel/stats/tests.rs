//! The statistics against compensated sums, on data that makes one-pass sums cancel.

use super::*;

fn dims(n: usize, c: usize, s: usize) -> Dims {
    Dims { n, c, s }
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
fn stats_are_per_channel_and_biased() {
    // (N=2, C=2, S=2): channel 0 holds 1,2,5,6; channel 1 holds 3,4,7,8.
    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
    let stats = stats_row_major(&x, dims(2, 2, 2));
    assert_eq!(stats.mean, vec![3.5, 5.5]);
    assert_eq!(stats.var, vec![4.25, 4.25]);
    for channel in 0..2 {
        let one = channel_stats(&x, dims(2, 2, 2), channel);
        assert_eq!((one.mean, one.var), (stats.mean[channel], stats.var[channel]));
    }
}

#[test]
fn outliers_do_not_cost_accuracy() {
    // A huge value starts every lane and the channel (x₀), the rest is small noise around 3.
    for d in [dims(40_000, 2, 1), dims(6, 2, 5_000)] {
        let x: Vec<f64> = (0..d.rows().len())
            .map(|i| {
                if i % 997 == 0 || i % d.s.max(1) == 0 && d.s > 1 {
                    1e8
                } else {
                    3.0 + ((i * 7919) % 101) as f64 * 1e-3
                }
            })
            .collect();
        let st = stats_row_major(&x, d);
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
    let st = stats_row_major(&x, dims(4, 1, 1));
    assert_eq!(st.mean, vec![0.0]);
    assert!(st.var[0].is_infinite());
    let r = st.inv_std(1e-5)[0];
    let expected_std = 1e300 * ((2.0f64 * 1.0 + 2.0 * 0.09) / 4.0).sqrt();
    approx::assert_relative_eq!(1.0 / r, expected_std, max_relative = 1e-12);
    // The channel-major statistics rescue the same channel the same way.
    let one = channel_stats(&x, dims(4, 1, 1), 0);
    assert_eq!((one.mean, one.inv_std(1e-5)), (st.mean[0], r));
}

#[test]
fn wide_rows_tiled_statistics_match_a_direct_computation() {
    // 1100 channels: a full tile of 1024 and a ragged one of 76; blocks of 160 rows, so each
    // tile of a block is two pieces (128 rows, then 32) merged with Chan's update.
    let d = dims(16 * 160, 1100, 1);
    assert_eq!(d.rows().block_rows(), 160);
    assert_eq!(STATS_PIECE_ELEMENTS / STATS_TILE, 128);
    let x: Vec<f64> = (0..d.rows().len())
        .map(|i| ((i * 7919) % 1013) as f64 * 0.37 + 1e3 * (i % 1100 % 7) as f64)
        .collect();
    let st = stats_row_major(&x, d);
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
    // variance was off by 1.3e-10 (1 channel) and 9.7e-12 (3 channels) relative.
    for c in [1, 3] {
        let d = dims(50_000, c, 1);
        let x: Vec<f64> = (0..d.rows().len())
            .map(|i| {
                if (i / c) % d.rows().block_rows() == 0 {
                    1e8 + (i % 7) as f64
                } else {
                    3.0 + ((i * 7919) % 101) as f64 * 1e-3
                }
            })
            .collect();
        let st = stats_row_major(&x, d);
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
    let x: Vec<f64> = (0..d.rows().len())
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
    // Many blocks of rows of 3 × 5 values: the merges must be exact enough.
    let d = dims(5000, 3, 5);
    let x: Vec<f64> = (0..d.rows().len())
        .map(|i| ((i * 7919) % 1013) as f64 * 0.37 + 1e3 * (i % 3) as f64)
        .collect();
    let st = stats_row_major(&x, d);
    for c in 0..3 {
        let (mean, var) = exact_moments(&x, d, c);
        approx::assert_relative_eq!(st.mean[c], mean, max_relative = 1e-13);
        approx::assert_relative_eq!(st.var[c], var, max_relative = 1e-12);
        let one = channel_stats(&x, d, c);
        approx::assert_relative_eq!(one.mean, mean, max_relative = 1e-13);
        approx::assert_relative_eq!(one.var, var, max_relative = 1e-12);
    }
}
