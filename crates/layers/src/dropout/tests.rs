use ndarray::ArrayD;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tape::{Tape, check_gradients};

use super::*;
use crate::batch_norm::testing::normal;

/// Output and `dx` of fused or composed dropout, mask drawn from a generator seeded `seed`.
fn run(composed: bool, x: &ArrayD<f64>, p: f64, seed: u64) -> [ArrayD<f64>; 2] {
    let tape = Tape::new();
    let xv = tape.var(x.clone());
    let rng = &mut StdRng::seed_from_u64(seed);
    let y = if composed {
        dropout_composed(xv, p, rng)
    } else {
        dropout(xv, p, rng)
    }
    .unwrap();
    let grads = y.backward_with(normal(&y.shape(), 0.0, 1.0, seed + 1)).unwrap();
    [y.value().as_ref().clone(), grads.wrt(xv).unwrap().clone()]
}

#[test]
fn fused_and_composed_are_identical() {
    let x = normal(&[3, 4, 5], 0.0, 1.0, 1);
    for p in [0.0, 0.1, 0.5, 0.9] {
        assert_eq!(run(false, &x, p, 7), run(true, &x, p, 7), "p = {p}");
    }
}

#[test]
fn values_are_dropped_at_rate_p_and_the_rest_scaled() {
    let x = ArrayD::from_elem(vec![100, 100], 1.0);
    for p in [0.0, 0.2, 0.5] {
        let [y, dx] = run(false, &x, p, 3);
        let scale = 1.0 / (1.0 - p);
        assert!(y.iter().all(|&v| v == 0.0 || v == scale));
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / 1e4;
        // 10,000 draws: the rate is within 3 standard deviations of p.
        assert!(
            (dropped - p).abs() <= 3.0 * (p * (1.0 - p) / 1e4).sqrt(),
            "p = {p}: {dropped}"
        );
        // The gradient is masked where the output is.
        assert!(y.iter().zip(&dx).all(|(&y, &g)| (y == 0.0) == (g == 0.0)));
    }
}

#[test]
fn both_pass_the_gradient_checker() {
    let x = normal(&[4, 6], 0.0, 1.0, 2);
    for composed in [false, true] {
        // The same mask on every evaluation of the checker.
        let check = check_gradients(
            |_, v| {
                let rng = &mut StdRng::seed_from_u64(5);
                Ok(if composed {
                    dropout_composed(v[0], 0.3, rng)?
                } else {
                    dropout(v[0], 0.3, rng)?
                })
            },
            std::slice::from_ref(&x),
        );
        assert!(check.is_ok(), "{check:?}");
    }
}

#[test]
fn p_outside_zero_to_one_is_an_error_and_draws_nothing() {
    let tape = Tape::<f32>::new();
    let x = tape.var(ndarray::Array1::<f32>::ones(4));
    let mut rng = StdRng::seed_from_u64(0);
    for p in [1.0, -0.1, f64::NAN, f64::INFINITY] {
        let error = dropout(x, p, &mut rng).unwrap_err().to_string();
        assert!(
            error.starts_with("the dropout probability p must be in [0, 1), got"),
            "{error}"
        );
        assert!(Dropout::new(p, 0).is_err());
    }
    assert_eq!(tape.len(), 1, "no node was recorded");
    assert_eq!(
        rand::Rng::random::<u64>(&mut rng),
        rand::Rng::random::<u64>(&mut StdRng::seed_from_u64(0))
    );
}

#[test]
fn the_layer_is_seeded_drops_in_training_only_and_keeps_its_mask() {
    let x = ndarray::Array2::<f32>::ones((8, 16)).into_dyn();
    let outputs = |seed| {
        let mut layer = Dropout::new(0.5, seed).unwrap();
        let tape = Tape::new();
        let xv = tape.constant(x.clone());
        let first = layer.forward(xv, Mode::Train).unwrap().value().as_ref().clone();
        let second = layer.forward(xv, Mode::Train).unwrap().value().as_ref().clone();
        let eval = layer.forward(xv, Mode::Eval).unwrap().value().as_ref().clone();
        (first, second, eval, tape.saved_bytes())
    };
    let (first, second, eval, saved) = outputs(1);
    assert_eq!(outputs(1).0, first, "the same seed, the same masks");
    assert_ne!(first, second, "each call draws a new mask");
    assert_ne!(outputs(2).0, first);
    assert_eq!(eval, x);
    // Two outputs of 128 f32 values, and two masks of 128 bools.
    assert_eq!(saved, 2 * 128 * 4 + 2 * 128);
}
