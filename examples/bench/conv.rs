//! The conv-net cases: conv2d and max_pool2d forward + backward with every gradient, the fused
//! node against its composition.

use std::hint::black_box;

use layers::{Conv2dOptions, Window2d, conv2d, conv2d_composed, max_pool2d, max_pool2d_composed};
use ndarray::ArrayD;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tape::{Element, Tape, Var};

use crate::{Budget, medians_us, normal};

/// Convolutions with a 3x3 kernel and padding 1: input shape and output channels.
pub(crate) const CONV: [([usize; 4], usize); 4] = [
    ([64, 1, 8, 8], 16),
    ([60, 16, 8, 8], 32),
    ([32, 16, 28, 28], 32),
    ([8, 64, 56, 56], 64),
];
/// The convolutions timed with `--quick`.
pub(crate) const QUICK_CONV: usize = 2;
/// 2x2 max pooling with stride 2: input shapes.
pub(crate) const POOL: [[usize; 4]; 1] = [[32, 32, 28, 28]];

const KERNEL: [usize; 2] = [3, 3];
const PADDING: [usize; 2] = [1, 1];

/// The bytes kept for backward, and the pass run.
fn record<'t, T: Element>(
    tape: &'t Tape<T>,
    output: Var<'t, T>,
    dout: ArrayD<T>,
    inputs: &[Var<'t, T>],
) -> usize {
    let saved = tape.saved_bytes();
    let grads = output
        .backward_with(dout)
        .unwrap_or_else(|e| panic!("benchmark gradient is valid: {e}"));
    for &input in inputs {
        black_box(grads.get(input).map(|g| g.len()));
    }
    saved
}

/// One forward + backward of a convolution on a fresh tape, all gradients; returns the bytes the
/// tape kept for backward.
fn conv_pass<T: Element>(
    composed: bool,
    (x, weight, bias, dout): (ArrayD<T>, ArrayD<T>, ArrayD<T>, ArrayD<T>),
) -> usize {
    let tape = Tape::new();
    let (x, weight, bias) = (tape.var(x), tape.var(weight), tape.var(bias));
    let options = Conv2dOptions::default().with_padding(PADDING);
    let conv = if composed { conv2d_composed } else { conv2d };
    let y =
        conv(x, weight, Some(bias), options).unwrap_or_else(|e| panic!("benchmark inputs are valid: {e}"));
    record(&tape, y, dout, &[x, weight, bias])
}

fn pool_pass<T: Element>(composed: bool, (x, dout): (ArrayD<T>, ArrayD<T>)) -> usize {
    let tape = Tape::new();
    let x = tape.var(x);
    let pool = if composed { max_pool2d_composed } else { max_pool2d };
    let y = pool(x, Window2d::new([2, 2]).with_stride([2, 2]))
        .unwrap_or_else(|e| panic!("benchmark inputs are valid: {e}"));
    record(&tape, y, dout, &[x])
}

/// Times both forms on `inputs` and formats the JSON line.
#[allow(clippy::too_many_arguments)]
fn line<T: Element, I>(
    op: &str,
    shape: [usize; 4],
    out_channels: usize,
    window: [[usize; 2]; 3],
    budget: Budget,
    inputs: impl Fn() -> I,
    pass: fn(bool, I) -> usize,
) -> String {
    let (fused_saved, composed_saved) = (pass(false, inputs()), pass(true, inputs()));
    let mut composed = |i| {
        pass(true, i);
    };
    let (fused_us, composed_us) = medians_us(
        budget,
        &inputs,
        |i| {
            pass(false, i);
        },
        Some(&mut composed),
    );
    let composed_us = composed_us.unwrap_or(f64::NAN);
    eprintln!(
        "{:>4} {op:<10} {:<18} -> {out_channels:<3} fused {fused_us:>10.1} us   composed {composed_us:>10.1} us \
         ({:.1}x)   saved bytes {fused_saved} vs {composed_saved}",
        T::NAME,
        format!("{shape:?}"),
        composed_us / fused_us,
    );
    let [kernel, stride, padding] = window;
    format!(
        "{{\"op\": \"{op}\", \"dtype\": \"{}\", \"shape\": {shape:?}, \"out_channels\": {out_channels}, \
         \"kernel\": {kernel:?}, \"stride\": {stride:?}, \"padding\": {padding:?}, \"fused_us\": {fused_us:.1}, \
         \"composed_us\": {composed_us:.1}, \"fused_saved_bytes\": {fused_saved}, \"composed_saved_bytes\": \
         {composed_saved}}}",
        T::NAME
    )
}

/// A convolution case: `x` of `shape` to `out_channels`, kernel 3x3, padding 1.
pub(crate) fn conv_case<T: Element>(shape: [usize; 4], out_channels: usize, budget: Budget) -> String {
    let mut rng = StdRng::seed_from_u64(0);
    let x = normal::<T>(&shape, &mut rng);
    let weight = normal::<T>(&[out_channels, shape[1], KERNEL[0], KERNEL[1]], &mut rng);
    let bias = normal::<T>(&[out_channels], &mut rng);
    let dout = normal::<T>(&[shape[0], out_channels, shape[2], shape[3]], &mut rng);
    let inputs = || (x.clone(), weight.clone(), bias.clone(), dout.clone());
    line::<T, _>(
        "conv2d",
        shape,
        out_channels,
        [KERNEL, [1, 1], PADDING],
        budget,
        inputs,
        conv_pass::<T>,
    )
}

/// A max pooling case: 2x2 windows, stride 2, on `x` of `shape`.
pub(crate) fn pool_case<T: Element>(shape: [usize; 4], budget: Budget) -> String {
    let mut rng = StdRng::seed_from_u64(0);
    let x = normal::<T>(&shape, &mut rng);
    let dout = normal::<T>(&[shape[0], shape[1], shape[2] / 2, shape[3] / 2], &mut rng);
    let inputs = || (x.clone(), dout.clone());
    line::<T, _>(
        "max_pool2d",
        shape,
        shape[1],
        [[2, 2], [2, 2], [0, 0]],
        budget,
        inputs,
        pool_pass::<T>,
    )
}
