//! A whole small net (Linear → BatchNorm → sigmoid → Linear → tanh → Linear, then the fused
//! softmax cross-entropy) checked end to end: the gradient of every parameter, as collected by
//! the layers, against central differences of the loss; and the input gradient through the
//! gradient checker. Then a small conv net of fused nodes (conv2d → BatchNorm2d → ReLU →
//! max_pool2d → strided grouped conv2d → avg_pool2d → flatten → matmul), every input and
//! parameter through the gradient checker; and a net with GroupNorm and LayerNorm the same way.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use layers::{
    Activation, BatchNorm, Conv2dOptions, Linear, Mode, Module, Sequential, Window2d, avg_pool2d, batch_norm,
    conv2d, group_norm, layer_norm, max_pool2d, softmax_cross_entropy,
};
use ndarray::{Array2, ArrayD};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tape::{Tape, check_gradients};

const LABELS: [usize; 6] = [0, 2, 1, 1, 0, 2];

fn net() -> Sequential<f64> {
    let mut rng = StdRng::seed_from_u64(11);
    Sequential::new()
        .push(Linear::new(4, 5, &mut rng))
        .push(BatchNorm::new(5))
        .push(Activation::Sigmoid)
        .push(Linear::new(5, 4, &mut rng))
        .push(Activation::Tanh)
        .push(Linear::new(4, 3, &mut rng))
}

fn input() -> Array2<f64> {
    Array2::from_shape_fn((6, 4), |(i, j)| ((i * 7 + j * 3) % 11) as f64 / 5.0 - 1.0)
}

/// The loss of `net` on the fixed batch, in training mode (batch statistics). Running
/// statistics change with each call but do not enter a training-mode loss.
fn loss(net: &mut Sequential<f64>) -> f64 {
    let tape = Tape::new();
    let logits = net.forward(tape.constant(input()), Mode::Train).unwrap();
    softmax_cross_entropy(logits, &LABELS).unwrap().scalar()
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    let mut model = net();
    let tape = Tape::new();
    let logits = model.forward(tape.constant(input()), Mode::Train).unwrap();
    let grads = softmax_cross_entropy(logits, &LABELS)
        .unwrap()
        .backward()
        .unwrap();
    let analytic: Vec<ArrayD<f64>> = model
        .parameters()
        .iter()
        .map(|p| p.grad(&grads).unwrap().clone())
        .collect();
    assert_eq!(
        analytic.len(),
        3 * 2 + 2,
        "three linear layers and BatchNorm's gamma and beta"
    );

    let h = 1e-6;
    let mut checked = 0;
    for (p, expected) in analytic.iter().enumerate() {
        for index in 0..expected.len() {
            let shifted = |delta: f64| {
                let mut perturbed = model.clone_for_test();
                let value = &mut perturbed.parameters_mut()[p].value;
                let slot = value.iter_mut().nth(index).unwrap();
                *slot += delta;
                loss(&mut perturbed)
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
            let analytic = expected.iter().nth(index).copied().unwrap();
            assert!(
                (analytic - numeric).abs() <= 1e-7 + 1e-5 * numeric.abs(),
                "parameter {p} element {index}: analytic {analytic:e}, numeric {numeric:e}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, (4 * 5 + 5) + (5 + 5) + (5 * 4 + 4) + (4 * 3 + 3));
}

#[test]
fn the_input_gradient_passes_the_gradient_checker() {
    // The checker calls the closure one call after the other, so it can borrow the net mutably:
    // training-mode outputs do not depend on the running statistics each call updates.
    let mut model = net();
    check_gradients(
        |_, v| {
            let logits = model.forward(v[0], Mode::Train)?;
            Ok(softmax_cross_entropy(logits, &LABELS)?)
        },
        &[input().into_dyn()],
    )
    .unwrap();
}

#[test]
fn a_conv_net_of_fused_nodes_passes_the_gradient_checker() {
    let value = |seed: usize| move |i: usize| (((i * 7919 + seed * 104_729) % 1009) as f64 / 504.5) - 1.0;
    let array = |shape: &[usize], seed: usize| {
        let values = value(seed);
        let mut i = 0;
        ArrayD::from_shape_simple_fn(shape.to_vec(), || {
            i += 1;
            values(i)
        })
    };
    let inputs = [
        array(&[3, 2, 8, 8], 1),                // x
        array(&[4, 2, 3, 3], 2),                // conv 1 weight
        array(&[4], 3),                         // conv 1 bias
        array(&[4], 4).mapv(|g| 1.0 + 0.5 * g), // BatchNorm gamma
        array(&[4], 5),                         // BatchNorm beta
        array(&[6, 2, 2, 2], 6),                // conv 2 weight, 2 groups
        array(&[6, 3], 7),                      // classifier
    ];
    let report = check_gradients(
        |_, v| {
            let same = Conv2dOptions::default().with_padding([1, 1]);
            let y = conv2d(v[0], v[1], Some(v[2]), same)?;
            let y = batch_norm(y, v[3], v[4], 1e-5)?.relu();
            let y = max_pool2d(y, Window2d::new([2, 2]).with_stride([2, 2]))?;
            let strided = Conv2dOptions::default().with_stride([2, 2]).with_groups(2);
            let y = conv2d(y, v[5], None, strided)?.tanh();
            // (N, 6, 2, 2) to (N, 6, 1, 1), the padding counted.
            let y = avg_pool2d(y, Window2d::new([3, 3]).with_stride([2, 2]).with_padding([1, 1]))?;
            y.flatten()?.matmul(v[6])
        },
        &inputs,
    )
    .unwrap();
    // Every element of every input was checked, well within the tolerance.
    assert_eq!(report.checked, inputs.iter().map(ArrayD::len).sum::<usize>());
    assert!(
        report.inputs.iter().all(|input| input.worst_ratio < 0.5),
        "{report}"
    );
}

#[test]
fn a_net_with_group_norm_and_layer_norm_passes_the_gradient_checker() {
    let array = |shape: &[usize], seed: usize| {
        let mut i = seed * 1000;
        ArrayD::from_shape_simple_fn(shape.to_vec(), || {
            i += 1;
            ((i * 7919 % 1009) as f64 / 504.5) - 1.0
        })
    };
    let inputs = [
        array(&[3, 2, 5, 5], 1),                // x
        array(&[4, 2, 3, 3], 2),                // conv weight
        array(&[4], 3).mapv(|w| 1.0 + 0.5 * w), // GroupNorm weight
        array(&[4], 4),                         // GroupNorm bias
        array(&[4 * 9, 6], 5),                  // linear
        array(&[6], 6).mapv(|w| 1.0 + 0.5 * w), // LayerNorm weight
        array(&[6], 7),                         // LayerNorm bias
        array(&[6, 3], 8),                      // classifier
    ];
    let report = check_gradients(
        |_, v| {
            let y = conv2d(v[0], v[1], None, Conv2dOptions::default())?;
            let y = group_norm(y, 2, Some(v[2]), Some(v[3]), 1e-5)?.tanh();
            let y = y.flatten()?.matmul(v[4])?;
            let y = layer_norm(y, &[6], Some(v[5]), Some(v[6]), 1e-5)?.sigmoid();
            y.matmul(v[7])
        },
        &inputs,
    )
    .unwrap();
    assert_eq!(report.checked, inputs.iter().map(ArrayD::len).sum::<usize>());
}

/// `Sequential` holds boxed layers and is not `Clone`; rebuild the same net and copy the
/// parameter values across.
trait CloneForTest {
    fn clone_for_test(&self) -> Sequential<f64>;
}

impl CloneForTest for Sequential<f64> {
    fn clone_for_test(&self) -> Sequential<f64> {
        let mut copy = net();
        for (target, source) in copy.parameters_mut().into_iter().zip(self.parameters()) {
            target.value = source.value.clone();
        }
        copy
    }
}

#[test]
fn a_gradient_penalty_through_batchnorm_passes_the_gradient_checker() {
    // L + λ ‖∂L/∂x‖², L the loss of Linear → BatchNorm → sigmoid → Linear → softmax CE: the
    // penalty's own gradient goes through the recorded backward, so through the fused double
    // backwards of BatchNorm and of the loss. Every input and parameter is checked.
    let mut rng = StdRng::seed_from_u64(5);
    let normal = |shape: &[usize], rng: &mut StdRng| {
        use rand_distr::{Distribution, StandardNormal};
        ArrayD::from_shape_simple_fn(ndarray::IxDyn(shape), || StandardNormal.sample(&mut *rng))
    };
    let inputs = [
        normal(&[6, 4], &mut rng),
        normal(&[4, 5], &mut rng),
        normal(&[5], &mut rng).mapv(|v: f64| 1.0 + 0.3 * v),
        normal(&[5], &mut rng),
        normal(&[5, 3], &mut rng),
    ];
    let report = check_gradients(
        |tape, v| {
            let h = batch_norm(v[0].matmul(v[1])?, v[2], v[3], 1e-5)?.sigmoid();
            let loss = softmax_cross_entropy(h.matmul(v[4])?, &LABELS)?;
            let recorded = tape::GradOptions {
                create_graph: true,
                upstream: None,
            };
            let dx = tape.grad(loss, &[v[0]], recorded)?[0].unwrap();
            loss.try_add(dx.powi(2).sum().mul_scalar(30.0))
        },
        &inputs,
    )
    .unwrap();
    assert_eq!(report.checked, 24 + 20 + 5 + 5 + 15);
}
