//! The functional API: its examples, every rank, views, constant channels, extreme values and
//! errors.

use ndarray::{Array2, ArrayD, Axis, array, s};

use super::testing::{channel, normal};
use super::*;
use crate::Mode;

const X3X2: [[f64; 2]; 3] = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]];

#[test]
fn each_column_is_normalized_to_mean_0_and_std_1() {
    let x = Array2::from(X3X2.to_vec());
    let (out, _) = batchnorm_forward(&x, &array![1.0, 1.0], &array![0.0, 0.0], 1e-5).unwrap();
    let expected = array![[-1.2247, -1.2247], [0.0, 0.0], [1.2247, 1.2247]];
    assert!(out.abs_diff_eq(&expected, 1e-4), "{out}");
    // Each column has mean 0 and (biased) standard deviation 1, up to eps.
    assert!(
        out.mean_axis(Axis(0))
            .unwrap()
            .abs_diff_eq(&array![0.0, 0.0], 1e-15)
    );
    assert!(out.std_axis(Axis(0), 0.0).abs_diff_eq(&array![1.0, 1.0], 1e-5));
}

#[test]
fn gamma_scales_and_beta_shifts() {
    let x = Array2::from(X3X2.to_vec());
    let (out, _) = batchnorm_forward(&x, &array![2.0, 0.5], &array![1.0, -1.0], 1e-5).unwrap();
    // The expected values are written to 4 decimals, truncated (-1.44948... as -1.4494).
    let expected = array![[-1.4494, -1.6124], [1.0, -1.0], [3.4494, -0.3876]];
    assert!(out.abs_diff_eq(&expected, 1e-4), "{out}");
}

#[test]
fn a_constant_upstream_gradient_gives_dx_zero() {
    let x = array![[1.0, 2.0], [3.0, 4.0]];
    let (out, cache) = batchnorm_forward(&x, &array![1.0, 1.0], &array![0.0, 0.0], 1e-5).unwrap();
    // An upstream gradient of all ones: then dx is exactly the zero vector per column
    // (a constant upstream gradient cannot change a normalized output), which we assert too.
    let (dx, dgamma, dbeta) = batchnorm_backward(&Array2::ones(out.raw_dim()), &cache).unwrap();
    assert!(dbeta.abs_diff_eq(&array![2.0, 2.0], 1e-12));
    assert!(dgamma.abs_diff_eq(&array![0.0, 0.0], 1e-12));
    assert!(dx.abs_diff_eq(&Array2::zeros((2, 2)), 1e-12));
    // With two rows the normalized output is ±1 whatever x is, so dx is 0 for ANY upstream
    // gradient. With three rows and a random one, dx is not zero, and its
    // columns still sum to 0.
    let x = Array2::from(X3X2.to_vec());
    let (_, cache) = batchnorm_forward(&x, &array![1.0, 1.0], &array![0.0, 0.0], 1e-5).unwrap();
    let dout = normal(&[3, 2], 0.0, 1.0, 3)
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let (dx, _, dbeta) = batchnorm_backward(&dout, &cache).unwrap();
    assert!(dx.iter().any(|v| v.abs() > 1e-3), "{dx}");
    assert!(dx.sum_axis(Axis(0)).abs_diff_eq(&array![0.0, 0.0], 1e-12));
    assert!(dbeta.abs_diff_eq(&dout.sum_axis(Axis(0)), 1e-12));
}

#[test]
fn every_rank_from_2_to_5_normalizes_per_channel() {
    for shape in [&[6, 3][..], &[4, 3, 5], &[2, 3, 4, 5], &[2, 3, 2, 3, 2]] {
        let x = normal(shape, 3.0, 2.0, shape.len() as u64);
        let dout = normal(shape, 0.0, 1.0, 10);
        let (out, cache) =
            batchnorm_forward(&x, &array![1.0, 1.0, 1.0], &array![0.0, 0.0, 0.0], 0.0).unwrap();
        let (dx, _, _) = batchnorm_backward(&dout, &cache).unwrap();
        assert_eq!(out.shape(), shape);
        for c in 0..3 {
            let channel = out.index_axis(Axis(1), c);
            approx::assert_abs_diff_eq!(channel.mean().unwrap(), 0.0, epsilon = 1e-12);
            approx::assert_abs_diff_eq!(channel.var(0.0), 1.0, epsilon = 1e-12);
            approx::assert_abs_diff_eq!(dx.index_axis(Axis(1), c).sum(), 0.0, epsilon = 1e-12);
        }
    }
}

#[test]
fn views_give_the_same_results_as_owned_arrays() {
    let base = normal(&[5, 8], 1.0, 2.0, 4)
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let (gamma, beta) = (channel(5, 1.0, 5), channel(5, 0.0, 6));
    // A transposed (column-major) view of shape (8, 5), and its contiguous copy.
    let view = base.t();
    let owned = view.to_owned();
    let (out_view, cache_view) = batchnorm_forward(view, &gamma, &beta, 1e-5).unwrap();
    let (out_owned, cache_owned) = batchnorm_forward(&owned, &gamma, &beta, 1e-5).unwrap();
    assert_eq!(out_view, out_owned);
    let dout = normal(&[8, 5], 0.0, 1.0, 7)
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let dout_t = dout.t().to_owned();
    let from_view = batchnorm_backward(dout_t.t(), &cache_view).unwrap();
    assert_eq!(from_view, batchnorm_backward(&dout, &cache_owned).unwrap());
    // A strided slice: every other row.
    let rows = base.slice(s![.., ..;2]).t().to_owned();
    let (strided, _) = batchnorm_forward(base.slice(s![.., ..;2]).t(), &gamma, &beta, 1e-5).unwrap();
    assert_eq!(strided, batchnorm_forward(&rows, &gamma, &beta, 1e-5).unwrap().0);
}

#[test]
fn a_constant_channel_normalizes_to_exactly_beta() {
    for value in [0.0, -3.5, 1e7, 1e30] {
        let mut x = normal(&[64, 3], 0.0, 1.0, 8);
        x.index_axis_mut(Axis(1), 1).fill(value);
        let x32 = x.mapv(|v| v as f32);
        let beta = array![0.1f32, -0.75, 2.0];
        let (out, cache) = batchnorm_forward(&x32, &array![1.5f32, 3.0, 0.5], &beta, 1e-5).unwrap();
        assert!(
            out.index_axis(Axis(1), 1).iter().all(|&v| v == -0.75),
            "constant {value}"
        );
        let (dx, dgamma, dbeta) =
            batchnorm_backward(&normal(&[64, 3], 0.0, 1.0, 9).mapv(|v| v as f32), &cache).unwrap();
        assert!(dx.iter().chain(&dgamma).chain(&dbeta).all(|v| v.is_finite()));
        assert_eq!(dgamma[1], 0.0, "x̂ = 0 on a constant channel");
        // The same in f64.
        let (out, _) = batchnorm_forward(&x, &array![1.5, 3.0, 0.5], &array![0.1, -0.75, 2.0], 1e-5).unwrap();
        assert!(out.index_axis(Axis(1), 1).iter().all(|&v| v == -0.75));
    }
}

#[test]
fn eps_zero_on_a_constant_channel_gives_beta_not_nan() {
    let x = array![[2.0f32, 1.0], [2.0, 3.0]];
    let (out, cache) = batchnorm_forward(&x, &array![1.0f32, 1.0], &array![0.5f32, 0.0], 0.0).unwrap();
    assert_eq!(out.column(0).to_vec(), vec![0.5, 0.5]);
    let (dx, _, _) = batchnorm_backward(&array![[1.0f32, -2.0], [0.5, 1.0]], &cache).unwrap();
    assert!(dx.iter().all(|v| v.is_finite()));
}

fn all_finite<T: Element, D: Dimension>(arrays: &[&Array<T, D>], vectors: &[&Array1<T>]) -> bool {
    arrays.iter().all(|a| a.iter().all(|v| v.is_finite()))
        && vectors.iter().all(|a| a.iter().all(|v| v.is_finite()))
}

#[test]
fn finite_extreme_input_never_gives_nan_or_inf() {
    let mut rows = vec![
        [3.0e38f32, 1e-40, -3.0e38],
        [-3.0e38, -1e-40, 3.0e38],
        [1.0e38, 0.0, 0.0],
    ];
    rows.push([-1.0e38, 1e-45, 1.0]);
    let x = Array2::from(rows);
    let gamma = array![2.0f32, 1.0, 0.5];
    let (out, cache) = batchnorm_forward(&x, &gamma, &array![0.0f32, 1.0, -1.0], 1e-5).unwrap();
    let (dx, dgamma, dbeta) = batchnorm_backward(&x.mapv(|v| (v / 1e38).clamp(-3.0, 3.0)), &cache).unwrap();
    assert!(all_finite(&[&out, &dx], &[&dgamma, &dbeta]), "{out} {dx}");
    // f64 data near 1e300: the squared deviations overflow f64, the statistics do not.
    let x: Array2<f64> = array![[1e300, 1.0], [-1e300, 2.0], [5e299, 3.0], [-5e299, 4.0]];
    let (out, cache) = batchnorm_forward(&x, &array![1.0, 1.0], &array![0.0, 0.0], 1e-5).unwrap();
    let (dx, dgamma, dbeta) =
        batchnorm_backward(&array![[1.0, 0.5], [-2.0, 1.0], [0.3, 0.0], [0.1, -1.0]], &cache).unwrap();
    assert!(all_finite(&[&out, &dx], &[&dgamma, &dbeta]), "{out} {dx}");
    approx::assert_abs_diff_eq!(out.column(0).var(0.0), 1.0, epsilon = 1e-12);
}

/// `(out, dx, dgamma, dbeta)` of the functional API in f64 with `eps = 0`.
fn forward_backward(x: &ArrayD<f64>, dout: &ArrayD<f64>) -> [ArrayD<f64>; 4] {
    let c = x.shape()[1];
    let (gamma, beta) = (channel(c, 1.0, 21), channel(c, 0.0, 22));
    let (out, cache) = batchnorm_forward(x, &gamma, &beta, 0.0).unwrap();
    let (dx, dgamma, dbeta) = batchnorm_backward(dout, &cache).unwrap();
    [out, dx, dgamma.into_dyn(), dbeta.into_dyn()]
}

#[test]
fn data_far_from_one_in_magnitude_gives_the_results_of_data_near_one() {
    // With eps = 0, scaling x by s and dout by k scales dx by k / s, dgamma and dbeta by k, and
    // leaves out unchanged: so data near 1e±170 must give the results of data near 1, scaled.
    // Near 1e200 · 1e200, dout · (x - mean) overflowed (dgamma was inf, dx NaN); near 1e-170
    // the variance underflowed to 0 and every value normalized to beta.
    for shape in [&[6, 3][..], &[3, 2, 5]] {
        let (x, dout) = (normal(shape, 0.5, 2.0, 23), normal(shape, 0.0, 1.0, 24));
        let reference = forward_backward(&x, &dout);
        for (s, k) in [(1e200, 1e200), (1e-170, 1.0), (1e-170, 1e-150), (1e150, 1e-100)] {
            let scaled = forward_backward(&x.mapv(|v| v * s), &dout.mapv(|g| g * k));
            let factors = [1.0, k / s, k, k];
            let names = ["out", "dx", "dgamma", "dbeta"];
            for (i, name) in names.iter().enumerate() {
                let (got, expected, factor) = (&scaled[i], &reference[i], factors[i]);
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{name} for x·{s:e}, dout·{k:e}: {got}"
                );
                let error = got
                    .iter()
                    .zip(expected)
                    .map(|(g, e)| (g / factor - e).abs())
                    .fold(0.0, f64::max);
                let scale = expected.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                assert!(
                    error <= 1e-12 * scale,
                    "{name} for x·{s:e}, dout·{k:e}: off by {error:e} (shape {shape:?})"
                );
            }
        }
    }
}

#[test]
fn errors_say_what_was_expected_and_what_was_got() {
    let x = Array2::<f64>::zeros((4, 4));
    let (g4, b4) = (Array1::<f64>::ones(4), Array1::<f64>::zeros(4));
    let message = |r: Result<_>| {
        r.map(|_: (Array2<f64>, BatchNormCache<f64>)| ())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        message(batchnorm_forward(&x, &Array1::ones(3), &b4, 1e-5)),
        "gamma has 3 elements, expected 4 (channels of x)"
    );
    assert_eq!(
        message(batchnorm_forward(&x, &g4, &Array1::zeros(5), 1e-5)),
        "beta has 5 elements, expected 4 (channels of x)"
    );
    assert_eq!(
        message(batchnorm_forward(&Array2::zeros((1, 4)), &g4, &b4, 1e-5)),
        "BatchNorm in training needs more than 1 value per channel, got input of shape [1, 4] (1 value per channel)"
    );
    assert_eq!(
        message(batchnorm_forward(&x, &g4, &b4, -1.0)),
        "eps must be a finite number >= 0, got -1"
    );
    assert_eq!(
        message(batchnorm_forward(&x, &g4, &b4, f64::NAN)),
        "eps must be a finite number >= 0, got NaN"
    );
    let rank1 = batchnorm_forward(&Array1::<f64>::zeros(4), &g4, &b4, 1e-5).unwrap_err();
    assert_eq!(
        rank1.to_string(),
        "x has shape [4], expected rank 2 to 5 for BatchNorm: (N, C) or (N, C, *spatial)"
    );
    let rank6 = ndarray::ArrayD::<f64>::zeros(vec![2, 4, 1, 1, 1, 1]);
    assert!(matches!(
        batchnorm_forward(&rank6, &g4, &b4, 1e-5),
        Err(Error::Shape { name: "x", .. })
    ));

    let (_, cache) = batchnorm_forward(&normal(&[4, 4], 0.0, 1.0, 1), &g4, &b4, 1e-5).unwrap();
    assert_eq!(
        batchnorm_backward(&Array2::<f64>::zeros((3, 4)), &cache)
            .unwrap_err()
            .to_string(),
        "dout has shape [3, 4], expected [4, 4] (the shape of x)"
    );
}

#[test]
fn zero_channels_give_empty_outputs_and_gradients() {
    // As in PyTorch: nothing to normalize is not an error. (It used to panic in the kernel,
    // which cannot walk rows of width 0.)
    let x = Array2::<f32>::zeros((4, 0));
    let none = Array1::<f32>::zeros(0);
    let (out, cache) = batchnorm_forward(&x, &none, &none, 1e-5).unwrap();
    assert_eq!(out.shape(), &[4, 0]);
    let (dx, dgamma, dbeta) = batchnorm_backward(&x, &cache).unwrap();
    assert_eq!((dx.shape(), dgamma.len(), dbeta.len()), (&[4, 0][..], 0, 0));

    let tape = tape::Tape::<f32>::new();
    let x = tape.var(ndarray::ArrayD::<f32>::zeros(vec![2, 0, 3]));
    let (gamma, beta) = (tape.var(none.clone()), tape.var(none.clone()));
    let grads = crate::batch_norm(x, gamma, beta, 1e-5)
        .unwrap()
        .backward_with(ndarray::ArrayD::<f32>::zeros(vec![2, 0, 3]))
        .unwrap();
    assert_eq!(grads.wrt(x).unwrap().shape(), &[2, 0, 3]);
    let mut layer = BatchNorm::<f32>::new(0);
    for mode in [Mode::Train, Mode::Eval] {
        assert_eq!(layer.forward(x, mode).unwrap().shape(), vec![2, 0, 3]);
    }
}

#[test]
fn the_cache_holds_one_input_sized_array() {
    let x = normal(&[16, 3, 4], 0.0, 1.0, 2);
    let (_, cache) = batchnorm_forward(&x, &Array1::ones(3), &Array1::zeros(3), 1e-5).unwrap();
    assert_eq!(cache.x(), &x);
    assert_eq!(
        (cache.mean().len(), cache.var().len(), cache.inv_std().len()),
        (3, 3, 3)
    );
    assert_eq!(cache.eps(), 1e-5);
    for c in 0..3 {
        let channel = x.index_axis(Axis(1), c);
        approx::assert_relative_eq!(cache.mean()[c], channel.mean().unwrap(), max_relative = 1e-14);
        approx::assert_relative_eq!(cache.var()[c], channel.var(0.0), max_relative = 1e-14);
        approx::assert_relative_eq!(
            cache.inv_std()[c],
            1.0 / (channel.var(0.0) + 1e-5).sqrt(),
            max_relative = 1e-14
        );
    }
}
