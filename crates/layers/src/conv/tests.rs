use ndarray::ArrayD;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tape::{GradCheck, Tape, check_gradients};

use super::*;
use crate::batch_norm::testing::{normal, on_1_2_3_threads};
use crate::{Mode, Module};

/// Fused and composed results (output, dx, dweight, dbias) for one case, in f64.
fn both(
    x: &ArrayD<f64>,
    weight: &ArrayD<f64>,
    bias: Option<&ArrayD<f64>>,
    dout_seed: u64,
    options: Conv2dOptions,
) -> [Vec<ArrayD<f64>>; 2] {
    [false, true].map(|composed| {
        let tape = Tape::new();
        let (xv, wv) = (tape.var(x.clone()), tape.var(weight.clone()));
        let bv = bias.map(|b| tape.var(b.clone()));
        let y = if composed {
            conv2d_composed(xv, wv, bv, options)
        } else {
            conv2d(xv, wv, bv, options)
        }
        .unwrap();
        let dout = normal(&y.shape(), 0.0, 1.0, dout_seed);
        let grads = y.backward_with(dout).unwrap();
        let mut results = vec![y.value().as_ref().clone(), grads.wrt(xv).unwrap().clone()];
        results.push(grads.wrt(wv).unwrap().clone());
        if let Some(bv) = bv {
            results.push(grads.wrt(bv).unwrap().clone());
        }
        results
    })
}

fn max_relative(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

const CASES: [([usize; 4], [usize; 4], Conv2dOptions); 5] = [
    (
        [2, 3, 5, 5],
        [4, 3, 3, 3],
        Conv2dOptions {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        },
    ),
    (
        [2, 2, 7, 6],
        [3, 2, 3, 3],
        Conv2dOptions {
            stride: [2, 2],
            padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
        },
    ),
    (
        [1, 2, 9, 9],
        [2, 2, 3, 3],
        Conv2dOptions {
            stride: [1, 1],
            padding: [2, 2],
            dilation: [2, 2],
            groups: 1,
        },
    ),
    (
        [2, 4, 6, 6],
        [6, 2, 3, 3],
        Conv2dOptions {
            stride: [1, 1],
            padding: [1, 1],
            dilation: [1, 1],
            groups: 2,
        },
    ),
    (
        [2, 1, 8, 8],
        [3, 1, 2, 4],
        Conv2dOptions {
            stride: [1, 2],
            padding: [1, 0],
            dilation: [1, 1],
            groups: 1,
        },
    ),
];

#[test]
fn fused_and_composed_agree_with_and_without_bias() {
    for (i, (x_shape, w_shape, options)) in CASES.into_iter().enumerate() {
        let seed = 10 * i as u64;
        let (x, weight) = (
            normal(&x_shape, 0.0, 1.0, seed),
            normal(&w_shape, 0.0, 0.5, seed + 1),
        );
        let bias = normal(&[w_shape[0]], 0.0, 1.0, seed + 2);
        for bias in [Some(&bias), None] {
            let [fused, composed] = both(&x, &weight, bias, seed + 3, options);
            assert_eq!(fused.len(), composed.len());
            for (name, (f, c)) in ["out", "dx", "dweight", "dbias"]
                .iter()
                .zip(fused.iter().zip(&composed))
            {
                assert_eq!(f.shape(), c.shape(), "case {i} {name}");
                let error = max_relative(f, c);
                assert!(error <= 1e-12, "case {i} {name}: {error:e}");
            }
        }
    }
}

#[test]
fn fused_and_composed_pass_the_gradient_checker() {
    for (i, (x_shape, w_shape, options)) in CASES.into_iter().enumerate().take(4) {
        let seed = 100 + 10 * i as u64;
        let inputs = [
            normal(&x_shape, 0.0, 1.0, seed),
            normal(&w_shape, 0.0, 0.5, seed + 1),
            normal(&[w_shape[0]], 0.0, 1.0, seed + 2),
        ];
        check_gradients(|_, v| Ok(conv2d(v[0], v[1], Some(v[2]), options)?), &inputs).unwrap();
        check_gradients(
            |_, v| Ok(conv2d_composed(v[0], v[1], Some(v[2]), options)?),
            &inputs,
        )
        .unwrap();
    }
}

/// The fused node with its weight gradient off by 1% at one element (beyond the checker's `rtol` of 0.1%).
struct Skewed(node::Conv2dNode);

impl tape::Function<f64> for Skewed {
    fn name(&self) -> &str {
        "skewed"
    }
    fn forward(&mut self, inputs: &[ndarray::ArrayViewD<'_, f64>]) -> tape::Result<ArrayD<f64>> {
        self.0.forward(inputs)
    }
    fn backward(&self, args: &tape::BackwardArgs<'_, f64>) -> tape::Result<Vec<Option<ArrayD<f64>>>> {
        let mut grads = self.0.backward(args)?;
        if let Some(dweight) = grads[1].as_mut() {
            dweight[[0, 0, 1, 1]] *= 1.01;
        }
        Ok(grads)
    }
}

#[test]
fn the_gradient_checker_catches_a_slightly_wrong_backward() {
    let options = Conv2dOptions::default().with_padding([1, 1]);
    let inputs = [
        normal(&[2, 2, 5, 5], 0.0, 1.0, 1),
        normal(&[3, 2, 3, 3], 0.0, 1.0, 2),
    ];
    let geometry = check::<f64>(&[2, 2, 5, 5], &[3, 2, 3, 3], None, &options).unwrap();
    let run = |skew: bool| {
        GradCheck::default().run(
            |tape, v| {
                let node = node::Conv2dNode::new(geometry);
                if skew {
                    tape.apply(Skewed(node), v)
                } else {
                    tape.apply(node, v)
                }
            },
            &inputs,
        )
    };
    assert!(run(false).is_ok());
    assert!(run(true).is_err());
}

#[test]
fn only_the_gradients_needed_are_computed() {
    let tape = Tape::<f64>::new();
    let x = tape.constant(normal(&[2, 2, 4, 4], 0.0, 1.0, 1));
    let weight = tape.var(normal(&[3, 2, 3, 3], 0.0, 1.0, 2));
    let bias = tape.constant(normal(&[3], 0.0, 1.0, 3));
    let y = conv2d(x, weight, Some(bias), Conv2dOptions::default()).unwrap();
    let grads = y.backward_with(normal(&[2, 3, 2, 2], 0.0, 1.0, 4)).unwrap();
    assert!(grads.get(x).is_none() && grads.get(bias).is_none());
    assert_eq!(grads.wrt(weight).unwrap().shape(), &[3, 2, 3, 3]);
}

#[test]
fn results_are_bit_identical_on_any_number_of_threads() {
    // Large enough for the blocks to run in parallel.
    let x = normal(&[16, 8, 12, 12], 0.0, 1.0, 1).mapv(|v| v as f32);
    let weight = normal(&[16, 4, 3, 3], 0.0, 0.3, 2).mapv(|v| v as f32);
    let bias = normal(&[16], 0.0, 1.0, 3).mapv(|v| v as f32);
    let dout = normal(&[16, 16, 12, 12], 0.0, 1.0, 4).mapv(|v| v as f32);
    let options = Conv2dOptions::default().with_padding([1, 1]).with_groups(2);
    let run = || {
        let tape = Tape::<f32>::new();
        let (xv, wv, bv) = (
            tape.var(x.clone()),
            tape.var(weight.clone()),
            tape.var(bias.clone()),
        );
        let y = conv2d(xv, wv, Some(bv), options).unwrap();
        let grads = y.backward_with(dout.clone()).unwrap();
        [
            y.value().as_ref().clone(),
            grads.wrt(xv).unwrap().clone(),
            grads.wrt(wv).unwrap().clone(),
            grads.wrt(bv).unwrap().clone(),
        ]
    };
    let results = on_1_2_3_threads(run);
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}

#[test]
fn the_fused_node_keeps_less_than_the_composed_graph() {
    let tape = Tape::<f32>::new();
    let x = tape.var(ndarray::Array4::<f32>::ones((8, 4, 16, 16)));
    let weight = tape.var(ndarray::Array4::<f32>::ones((8, 4, 3, 3)));
    let options = Conv2dOptions::default().with_padding([1, 1]);
    let before = tape.saved_bytes();
    conv2d(x, weight, None, options).unwrap();
    let fused = tape.saved_bytes() - before;
    assert_eq!(fused, 8 * 8 * 16 * 16 * 4, "the output only");
    let before = tape.saved_bytes();
    conv2d_composed(x, weight, None, options).unwrap();
    let composed = tape.saved_bytes() - before;
    assert!(
        composed > 5 * fused,
        "composed keeps the columns: {composed} vs {fused}"
    );
}

#[test]
fn bad_inputs_are_errors_naming_the_argument() {
    let tape = Tape::<f64>::new();
    let x = tape.var(normal(&[2, 4, 5, 5], 0.0, 1.0, 1));
    let weight = tape.var(normal(&[6, 2, 3, 3], 0.0, 1.0, 2));
    let error = |x, weight, bias, options| conv2d(x, weight, bias, options).unwrap_err().to_string();
    let grouped = Conv2dOptions::default().with_groups(2);
    assert!(conv2d(x, weight, None, grouped).is_ok());
    assert_eq!(
        error(x, weight, None, Conv2dOptions::default()),
        "weight has shape [6, 2, 3, 3], expected [6, 4, 3, 3] (axis 1 is C_in / groups = 4 / 1)"
    );
    assert_eq!(
        error(x, weight, None, grouped.with_groups(3)),
        "groups = 3 does not divide the 4 input channels of x"
    );
    let five = tape.var(normal(&[5, 2, 3, 3], 0.0, 1.0, 3));
    assert_eq!(
        error(x, five, None, grouped),
        "groups = 2 does not divide the 5 output channels of weight (its axis 0)"
    );
    assert_eq!(
        error(x, weight, None, grouped.with_groups(0)),
        "groups must be at least 1, got 0"
    );
    let bias = tape.var(normal(&[4], 0.0, 1.0, 4));
    assert_eq!(
        error(x, weight, Some(bias), grouped),
        "bias has shape [4], expected [6] (one value per output channel, axis 0 of the weight)"
    );
    assert_eq!(
        error(x, weight, None, grouped.with_stride([0, 1])),
        "conv2d: the stride must be at least 1 in each dimension, got [0, 1]"
    );
    let big = tape.var(normal(&[6, 2, 7, 7], 0.0, 1.0, 5));
    assert_eq!(
        error(x, big, None, grouped),
        "conv2d: the input has shape [2, 4, 5, 5], expected a height and width of at least the \
         kernel's span 7x7 once padded by [0, 0] on each side (kernel [7, 7], dilation [1, 1])"
    );
    assert!(conv2d(x, big, None, grouped.with_padding([1, 1])).is_ok());
    let flat = tape.var(normal(&[2, 4, 5], 0.0, 1.0, 6));
    assert_eq!(
        error(flat, weight, None, grouped),
        "x has shape [2, 4, 5], expected rank 4, (N, C_in, H, W)"
    );
}

#[test]
fn the_layer_is_initialised_as_pytorch_and_describes_itself() {
    let mut rng = StdRng::seed_from_u64(3);
    let conv = Conv2d::<f64>::with_options(
        4,
        6,
        [3, 3],
        Conv2dOptions::default().with_groups(2),
        true,
        &mut rng,
    )
    .unwrap();
    // fan_in = 4 / 2 · 3 · 3 = 18.
    let bound = 1.0 / 18f64.sqrt();
    assert_eq!(conv.weight.value.shape(), &[6, 2, 3, 3]);
    assert!(conv.weight.value.iter().all(|w| w.abs() < bound));
    assert!(conv.weight.value.iter().any(|w| w.abs() > 0.9 * bound));
    assert_eq!(conv.parameters().len(), 2);
    assert_eq!((conv.in_channels(), conv.out_channels()), (4, 6));
    assert_eq!(conv.describe(), "Conv2d(4 -> 6, 3x3, groups 2)");
    let again = Conv2d::<f64>::with_options(
        4,
        6,
        [3, 3],
        Conv2dOptions::default().with_groups(2),
        true,
        &mut StdRng::seed_from_u64(3),
    )
    .unwrap();
    assert_eq!(conv.weight.value, again.weight.value);
    assert_eq!(
        Conv2d::<f64>::with_options(
            4,
            6,
            [3, 3],
            Conv2dOptions::default().with_groups(4),
            true,
            &mut rng
        )
        .unwrap_err()
        .to_string(),
        "groups = 4 does not divide the 6 output channels"
    );
    let mut plain =
        Conv2d::<f64>::with_options(2, 2, [1, 1], Conv2dOptions::default(), false, &mut rng).unwrap();
    assert_eq!(plain.describe(), "Conv2d(2 -> 2, 1x1, no bias)");
    let tape = Tape::new();
    let y = plain
        .forward(tape.constant(normal(&[1, 2, 3, 3], 0.0, 1.0, 1)), Mode::Eval)
        .unwrap();
    assert_eq!(y.shape(), vec![1, 2, 3, 3]);
}

#[test]
fn empty_inputs_give_empty_or_bias_only_results() {
    // No input rows, no output channels, and an image of height 0 padded to one row of windows.
    let options = Conv2dOptions::default().with_padding([1, 1]);
    for (x_shape, w_shape) in [
        ([0, 2, 4, 4], [3, 2, 3, 3]),
        ([2, 2, 4, 4], [0, 2, 3, 3]),
        ([2, 2, 0, 3], [3, 2, 2, 2]),
    ] {
        let x = normal(&x_shape, 0.0, 1.0, 1);
        let weight = normal(&w_shape, 0.0, 1.0, 2);
        let bias = normal(&[w_shape[0]], 0.0, 1.0, 3);
        let [fused, composed] = both(&x, &weight, Some(&bias), 4, options);
        for (f, c) in fused.iter().zip(&composed) {
            assert_eq!(f.shape(), c.shape());
            assert!(max_relative(f, c) <= 1e-12);
        }
    }
}

#[test]
fn a_layer_too_large_to_exist_is_an_error() {
    let mut rng = StdRng::seed_from_u64(0);
    let options = Conv2dOptions::default();
    // No channels, but kernel sizes whose product overflows: ndarray would panic.
    let error = Conv2d::<f32>::with_options(0, 1, [usize::MAX, 2], options, false, &mut rng).unwrap_err();
    assert_eq!(
        error.to_string(),
        "Conv2d: shape [1, 0, 18446744073709551615, 2] is larger than an array can be"
    );
    assert!(Conv2d::<f32>::with_options(0, 1, [3, 3], options, false, &mut rng).is_ok());
}
