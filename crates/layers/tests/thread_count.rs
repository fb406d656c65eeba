//! Results are bit-identical whatever the number of threads: the kernels split work into blocks
//! fixed by the shape and add partial sums in block order.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use layers::batch_norm::kernel::PARALLEL_MIN_ELEMENTS;
use layers::{batchnorm_backward, batchnorm_forward};
use ndarray::{Array1, ArrayD, IxDyn};

fn values(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut state = seed;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0 + 3.0
    })
}

#[test]
fn forward_and_backward_are_bit_identical_on_1_2_and_3_threads() {
    // (65536, 40) has more rows than MAX_BLOCKS blocks of minimum size: the block count decides.
    // (256, 2100) has rows wider than a statistics tile (three tiles, the last ragged).
    let shapes = [
        &[8192, 64][..],
        &[16, 8, 64, 64],
        &[3000, 5, 13],
        &[65536, 40],
        &[256, 2100],
    ];
    for shape in shapes {
        let elements: usize = shape.iter().product();
        assert!(
            elements >= PARALLEL_MIN_ELEMENTS,
            "{shape:?} must be big enough to run in parallel"
        );
        let c = shape[1];
        let x = values(shape, 1);
        let dout = values(shape, 2);
        let gamma = Array1::from_shape_fn(c, |i| 0.5 + i as f32 * 0.1);
        let beta = Array1::from_shape_fn(c, |i| i as f32 * -0.2);
        let run = || {
            let (out, cache) = batchnorm_forward(&x, &gamma, &beta, 1e-5).unwrap();
            let (dx, dgamma, dbeta) = batchnorm_backward(&dout, &cache).unwrap();
            (
                out,
                dx,
                dgamma,
                dbeta,
                cache.mean().to_vec(),
                cache.var().to_vec(),
            )
        };
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(run)
        };
        // The calling thread as one of the pool's threads (as `examples/bench.rs` runs): parallel
        // loops start on it instead of on a worker. A thread of its own, since a thread joins
        // at most one pool.
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
