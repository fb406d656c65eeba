//! The fused BatchNorm node against the same computation composed from tape primitives, and
//! BatchNorm's invariants, over random shapes (proptest).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use layers::{batch_norm, batch_norm_composed, batchnorm_backward, batchnorm_forward};
use ndarray::{Array1, ArrayD, Axis, IxDyn};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use tape::Tape;

fn normal(shape: &[usize], mean: f64, std: f64, rng: &mut StdRng) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let z: f64 = StandardNormal.sample(&mut *rng);
        mean + std * z
    })
}

/// Max abs difference over max abs value.
fn relative(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    let scale = b
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Max abs difference over `scale`.
fn error_over(a: &ArrayD<f64>, b: &ArrayD<f64>, scale: f64) -> f64 {
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale.max(f64::MIN_POSITIVE)
}

/// The size of the terms each result is a sum of, as `[out, dx, dgamma, dbeta]`; and the
/// condition of `x`, the largest `max|x| / std` of a channel (how far rounding `x` or its mean
/// to f64 moves `x̂`).
///
/// A result that nearly cancels (with three values per channel, dx often does) is only as
/// accurate as its terms, so its error is measured against them, not against its own small
/// value: for `out`, the largest `|gamma · x̂| + |beta|`; for `dx`, the largest
/// `|gamma| · inv_std · |dout|`; for `dgamma`, the largest per-channel `sum |dout · x̂|`; for
/// `dbeta`, the largest per-channel `sum |dout|`. Over 100 000 cases of the strategy below the
/// two implementations differed by at most 1.2e-15 times the condition, in those units.
fn term_scales(
    x: &ArrayD<f64>,
    gamma: &ArrayD<f64>,
    beta: &ArrayD<f64>,
    dout: &ArrayD<f64>,
    eps: f64,
) -> ([f64; 4], f64) {
    let (mut scales, mut condition) = ([0.0f64; 4], 1.0f64);
    let largest = |values: &mut dyn Iterator<Item = f64>| values.fold(0.0f64, |m, v| m.max(v.abs()));
    for ch in 0..x.shape()[1] {
        let (xs, gs) = (x.index_axis(Axis(1), ch), dout.index_axis(Axis(1), ch));
        let mean = xs.mean().unwrap();
        let inv_std = 1.0 / (xs.var(0.0) + eps).sqrt();
        let largest_xhat = largest(&mut xs.iter().map(|v| (v - mean) * inv_std));
        let dout_xhat: f64 = gs
            .iter()
            .zip(&xs)
            .map(|(g, v)| (g * (v - mean) * inv_std).abs())
            .sum();
        let dout_sum: f64 = gs.iter().map(|g| g.abs()).sum();
        let terms = [
            gamma[ch].abs() * largest_xhat + beta[ch].abs(),
            gamma[ch].abs() * inv_std * largest(&mut gs.iter().copied()),
            dout_xhat,
            dout_sum,
        ];
        for (scale, term) in scales.iter_mut().zip(terms) {
            *scale = scale.max(term);
        }
        condition = condition.max(largest(&mut xs.iter().copied()) * inv_std);
    }
    (scales, condition)
}

/// Shapes `(N, C, *)` of a rank in `ranks`, with at least three values per channel (with two,
/// the normalized output is ±1 whatever x is, and dx is identically 0).
fn shapes(ranks: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<usize>> {
    ranks
        .prop_flat_map(|rank| prop::collection::vec(1usize..=5, rank))
        .prop_filter("three or more values per channel", |s| {
            s[0] * s[2..].iter().product::<usize>() >= 3
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// out, dx, dgamma and dbeta agree in f64, with a random upstream gradient, to 1e-14 times
    /// the condition of `x`, relative to the terms each sums (see `term_scales`; against their
    /// own values the composed dx is off by up to 5e-12 where it nearly cancels, as in the
    /// saved regression case). A wrong term would be off by about 1 in those units.
    #[test]
    fn fused_and_composed_agree(
        shape in shapes(2..=4),
        seed in any::<u64>(),
        offset in -50.0f64..50.0,
        spread in 0.1f64..10.0,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let c = shape[1];
        let x = normal(&shape, offset, spread, &mut rng);
        let gamma = normal(&[c], 1.0, 0.5, &mut rng);
        let beta = normal(&[c], 0.0, 1.0, &mut rng);
        let dout = normal(&shape, 0.0, 1.0, &mut rng);

        let run = |composed: bool| {
            let tape = Tape::<f64>::new();
            let (vx, vg, vb) = (tape.var(x.clone()), tape.var(gamma.clone()), tape.var(beta.clone()));
            let y = if composed {
                batch_norm_composed(vx, vg, vb, 1e-5)
            } else {
                batch_norm(vx, vg, vb, 1e-5)
            }
            .unwrap();
            let grads = y.backward_with(dout.clone()).unwrap();
            [
                y.value().as_ref().clone(),
                grads.wrt(vx).unwrap().clone(),
                grads.wrt(vg).unwrap().clone(),
                grads.wrt(vb).unwrap().clone(),
            ]
        };
        let (fused, composed) = (run(false), run(true));
        let (scales, condition) = term_scales(&x, &gamma, &beta, &dout, 1e-5);
        let results = fused.iter().zip(&composed).zip(scales);
        for (name, ((f, c), scale)) in ["out", "dx", "dgamma", "dbeta"].iter().zip(results) {
            let error = error_over(f, c, scale);
            prop_assert!(
                error <= 1e-14 * condition,
                "{} differs by {:e} of its terms (condition {:.1}) for shape {:?}", name, error, condition, shape
            );
        }
    }

    /// Normalized channels have mean 0 and variance 1 (eps = 0); dx sums to 0 per channel;
    /// shifting and scaling x (by a > 0) leaves the output, and dx times a, unchanged.
    #[test]
    fn invariants_hold(
        shape in shapes(2..=5),
        seed in any::<u64>(),
        shift in -100.0f64..100.0,
        scale in 0.01f64..100.0,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let c = shape[1];
        let x = normal(&shape, 0.0, 1.0, &mut rng);
        let dout = normal(&shape, 0.0, 1.0, &mut rng);
        let (ones, zeros) = (Array1::<f64>::ones(c), Array1::<f64>::zeros(c));

        let (out, cache) = batchnorm_forward(&x, &ones, &zeros, 0.0).unwrap();
        let (dx, _, _) = batchnorm_backward(&dout, &cache).unwrap();
        prop_assert_eq!(out.shape(), shape.as_slice());
        for ch in 0..c {
            let channel = out.index_axis(Axis(1), ch);
            prop_assert!(channel.mean().unwrap().abs() <= 1e-12);
            prop_assert!((channel.var(0.0) - 1.0).abs() <= 1e-9);
            prop_assert!(dx.index_axis(Axis(1), ch).sum().abs() <= 1e-9);
        }

        let moved = x.mapv(|v| v * scale + shift);
        let (out_moved, cache_moved) = batchnorm_forward(&moved, &ones, &zeros, 0.0).unwrap();
        let (dx_moved, _, _) = batchnorm_backward(&dout, &cache_moved).unwrap();
        prop_assert!(relative(&out_moved, &out) <= 1e-9, "output changed under shift and scale");
        prop_assert!(relative(&(dx_moved * scale), &dx) <= 1e-7, "dx times scale changed under shift and scale");
    }
}
