//! A whole small net (Linear → BatchNorm → sigmoid → Linear → tanh → Linear, then the fused
//! softmax cross-entropy) checked end to end: the gradient of every parameter, as collected by
//! the layers, against central differences of the loss; and the input gradient through the
//! gradient checker.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use layers::{Activation, BatchNorm, Linear, Mode, Module, Sequential, softmax_cross_entropy};
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
