//! What the property tests of fused nodes against their compositions share: seeded normal
//! arrays, the error measure, and random pooling/convolution windows.
#![allow(dead_code)] // each test file uses its own part

use layers::{Conv2dOptions, Window2d};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// Standard normal values of `shape`.
pub fn normal(shape: &[usize], rng: &mut StdRng) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || StandardNormal.sample(&mut *rng))
}

/// Max abs difference over the largest magnitude of `b` (at least 1: sums of a few products of
/// standard normals are of order 1, so this bounds the rounding of their terms).
pub fn error(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A 2-D window and an input height and width that fit it.
pub fn window() -> impl Strategy<Value = (Window2d, [usize; 2])> {
    let axis = (1usize..=4, 1usize..=3, 1usize..=2, 0usize..=3, 0usize..=6);
    (axis.clone(), axis).prop_map(|(a, b)| {
        let mut window = Window2d::new([a.0, b.0]);
        let mut input = [0; 2];
        for (i, (kernel, stride, dilation, padding, extra)) in [a, b].into_iter().enumerate() {
            let span = dilation * (kernel - 1) + 1;
            window.stride[i] = stride;
            window.dilation[i] = dilation;
            // At most half the span, as pooling requires (conv allows more).
            window.padding[i] = padding.min(span / 2);
            // At least the span once padded, and at least 1.
            input[i] = (span.saturating_sub(2 * window.padding[i]) + extra).max(1);
        }
        (window, input)
    })
}

/// A convolution's options and inputs (`x`, the weight, and the bias when `bias`) for `window`
/// over an input of `input` pixels: `n` samples, `groups` groups of the given channels each.
pub fn conv_case(
    (window, input): (Window2d, [usize; 2]),
    n: usize,
    (groups, c_in_per_group, c_out_per_group): (usize, usize, usize),
    bias: bool,
    seed: u64,
) -> (Conv2dOptions, Vec<ArrayD<f64>>) {
    let rng = &mut StdRng::seed_from_u64(seed);
    let (c_in, c_out) = (groups * c_in_per_group, groups * c_out_per_group);
    let options = Conv2dOptions {
        stride: window.stride,
        padding: window.padding,
        dilation: window.dilation,
        groups,
    };
    let mut inputs = vec![
        normal(&[n, c_in, input[0], input[1]], rng),
        normal(&[c_out, c_in_per_group, window.kernel[0], window.kernel[1]], rng),
    ];
    if bias {
        inputs.push(normal(&[c_out], rng));
    }
    (options, inputs)
}
