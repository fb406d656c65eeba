//! What the property tests of fused nodes against their compositions share: seeded normal
//! arrays, the error measure, and random pooling/convolution windows.
#![allow(dead_code)] // each test file uses its own part

use layers::Window2d;
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
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
