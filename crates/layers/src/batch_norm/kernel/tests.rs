//! The kernel's entry points: the two layouts agree, and results do not depend on the thread
//! count.

use super::*;
use crate::batch_norm::testing::normal;
use crate::schedule::PARALLEL_MIN_WORK;

fn raw<T>(array: ndarray::ArrayD<T>) -> Vec<T> {
    array.into_raw_vec_and_offset().0
}

fn assert_close(what: &str, got: &[f64], expected: &[f64], tolerance: f64) {
    assert_eq!(got.len(), expected.len(), "{what}");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= tolerance * e.abs().max(1.0),
            "{what}[{i}]: {g} channel-major against {e} row-major"
        );
    }
}

#[test]
fn the_layout_follows_the_lanes_and_the_channels() {
    assert_eq!(
        Layout::of::<f32>(Dims { n: 2, c: 8, s: 1024 }),
        Layout::ChannelMajor
    );
    assert_eq!(Layout::of::<f32>(Dims { n: 2, c: 8, s: 1023 }), Layout::RowMajor);
    assert_eq!(
        Layout::of::<f64>(Dims { n: 2, c: 8, s: 512 }),
        Layout::ChannelMajor
    );
    assert_eq!(Layout::of::<f64>(Dims { n: 2, c: 7, s: 512 }), Layout::RowMajor);
}

#[test]
fn channel_major_passes_match_the_row_major_ones() {
    // One to five rows, 8 and 9 channels, in training and in evaluation.
    for (n, c, s) in [(1, 8, 512), (3, 9, 600), (5, 8, 512)] {
        let dims = Dims { n, c, s };
        let x = raw(normal(&[n, c, s], 3.0, 2.0, 1));
        let dout = raw(normal(&[n, c, s], 0.5, 1.0, 2));
        let gamma: Vec<f64> = (0..c).map(|i| 0.5 + 0.25 * i as f64).collect();
        let beta: Vec<f64> = (0..c).map(|i| 1.0 - 0.5 * i as f64).collect();
        let forward = |layout| imp::forward_batch(&x, dims, (&gamma, &beta), 1e-5, layout);
        let (stats, inv_std, out) = forward(Layout::RowMajor);
        let (channel_stats, channel_inv_std, channel_out) = forward(Layout::ChannelMajor);
        assert_close("mean", &channel_stats.mean, &stats.mean, 1e-14);
        assert_close("var", &channel_stats.var, &stats.var, 1e-13);
        assert_close("inv_std", &channel_inv_std, &inv_std, 1e-13);
        assert_close("out", &channel_out, &out, 1e-12);

        for batch_stats in [true, false] {
            let saved = Saved {
                gamma: &gamma,
                mean: &stats.mean,
                inv_std: &inv_std,
                batch_stats,
            };
            let backward = |layout, want_dx| imp::backward((&dout, &x), dims, saved, want_dx, layout);
            let rows = backward(Layout::RowMajor, true);
            let channels = backward(Layout::ChannelMajor, true);
            assert_close(
                "dx",
                channels.dx.as_deref().unwrap(),
                rows.dx.as_deref().unwrap(),
                1e-12,
            );
            assert_close("dgamma", &channels.dgamma, &rows.dgamma, 1e-12);
            assert_close("dbeta", &channels.dbeta, &rows.dbeta, 1e-12);
            // Without dx: the same sums, and no dx.
            for layout in [Layout::RowMajor, Layout::ChannelMajor] {
                let sums_only = backward(layout, false);
                let with_dx = backward(layout, true);
                assert!(sums_only.dx.is_none());
                assert_eq!(
                    (sums_only.dgamma, sums_only.dbeta),
                    (with_dx.dgamma, with_dx.dbeta)
                );
            }
        }
    }
}

#[test]
fn evaluation_gradients_scale_dout_only() {
    // Constants for mean and inv_std: dx = gamma · inv_std · dout, in either layout.
    let dims = Dims { n: 2, c: 8, s: 256 };
    let x = raw(normal(&[2, 8, 256], 0.0, 1.0, 3));
    let dout = raw(normal(&[2, 8, 256], 0.0, 1.0, 4));
    let (gamma, mean, inv_std) = (vec![2.0; 8], vec![0.5; 8], vec![0.25; 8]);
    let saved = Saved {
        gamma: &gamma,
        mean: &mean,
        inv_std: &inv_std,
        batch_stats: false,
    };
    for layout in [Layout::RowMajor, Layout::ChannelMajor] {
        let grads = imp::backward((&dout, &x), dims, saved, true, layout);
        for (dx, g) in grads.dx.unwrap().iter().zip(&dout) {
            assert_eq!(*dx, 0.5 * g);
        }
    }
}

#[test]
fn constant_channels_give_exactly_beta_and_huge_values_stay_finite() {
    let dims = Dims { n: 2, c: 8, s: 256 };
    let mut x = raw(normal(&[2, 8, 256], 0.0, 1.0, 5));
    // Channel 1 constant at 1e30; channel 2 around 1e200, whose squares overflow f64.
    for row in x.chunks_mut(8 * 256) {
        row[256..512].fill(1e30);
        for (i, v) in row[512..768].iter_mut().enumerate() {
            *v = 1e200 * (1.0 + (i % 7) as f64);
        }
    }
    let (gamma, beta) = (vec![1.5; 8], vec![-0.25; 8]);
    let row_major = imp::forward_batch(&x, dims, (&gamma, &beta), 1e-5, Layout::RowMajor);
    let (stats, inv_std, out) = imp::forward_batch(&x, dims, (&gamma, &beta), 1e-5, Layout::ChannelMajor);
    assert_eq!((stats.mean[1], stats.var[1]), (1e30, 0.0));
    for row in out.chunks(8 * 256) {
        assert!(row[256..512].iter().all(|&v| v == -0.25));
    }
    assert!(stats.var[2].is_infinite() && inv_std[2] > 0.0 && inv_std[2].is_finite());
    assert!(out.iter().all(|v| v.is_finite()));
    // The row-major passes rescue the same channel the same way.
    assert_eq!(stats.mean[2], row_major.0.mean[2]);
    assert_eq!(inv_std[2], row_major.1[2]);
}

/// Deterministic f32 values from a linear congruential generator, around 3 ± 4.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0 + 3.0
        })
        .collect()
}

#[test]
fn results_are_bit_identical_on_any_number_of_threads() {
    // (65536, 40) has more rows than there are blocks of the smallest size: the block count
    // decides. (256, 2100) has rows wider than a statistics tile. (16, 8, 64, 64) is channel-major.
    let shapes = [
        &[8192, 64][..],
        &[16, 8, 64, 64],
        &[3000, 5, 13],
        &[65536, 40],
        &[256, 2100],
    ];
    for shape in shapes {
        let dims = Dims::of(shape);
        assert!(
            dims.rows().len() >= PARALLEL_MIN_WORK,
            "{shape:?} must be big enough to run in parallel"
        );
        let (x, dout) = (values(dims.rows().len(), 1), values(dims.rows().len(), 2));
        let gamma: Vec<f64> = (0..dims.c).map(|i| 0.5 + i as f64 * 0.1).collect();
        let beta: Vec<f64> = (0..dims.c).map(|i| i as f64 * -0.2).collect();
        let run = || {
            let (stats, inv_std, out) = forward_batch(&x, dims, &gamma, &beta, 1e-5);
            let saved = Saved {
                gamma: &gamma,
                mean: &stats.mean,
                inv_std: &inv_std,
                batch_stats: true,
            };
            (backward(&dout, &x, dims, saved, true), stats, out)
        };
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(run)
        };
        // The calling thread as one of the pool's threads (as `examples/bench` runs): parallel
        // loops start on it instead of on a worker. A thread of its own, since a thread joins at
        // most one pool.
        let caller_in_pool = || {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let _pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(2)
                            .use_current_thread()
                            .build()
                            .unwrap();
                        assert_eq!(rayon::current_thread_index(), Some(0));
                        run()
                    })
                    .join()
                    .unwrap()
            })
        };
        let one = on(1);
        assert_eq!(one, on(2), "{shape:?}: 1 vs 2 threads");
        assert_eq!(one, on(3), "{shape:?}: 1 vs 3 threads");
        assert_eq!(
            one,
            caller_in_pool(),
            "{shape:?}: 1 thread vs the caller in a pool of 2"
        );
    }
}
