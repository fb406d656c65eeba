use ndarray::{Array2, ArrayD, Axis, array};
use tape::{Tape, check_gradients};

use super::*;
use crate::batch_norm::testing::normal;

fn train_step(bn: &mut BatchNorm<f64>, x: &ArrayD<f64>) -> ArrayD<f64> {
    let tape = Tape::new();
    bn.forward(tape.constant(x.clone()), Mode::Train)
        .unwrap()
        .value()
        .as_ref()
        .clone()
}

#[test]
fn running_statistics_follow_pytorchs_update() {
    let mut bn = BatchNorm::<f64>::new(3);
    assert_eq!(
        (bn.running_mean.clone(), bn.running_var.clone()),
        (Array1::zeros(3), Array1::ones(3))
    );
    let (x1, x2) = (normal(&[8, 3, 2], 1.0, 2.0, 1), normal(&[8, 3, 2], -1.0, 0.5, 2));
    train_step(&mut bn, &x1);
    train_step(&mut bn, &x2);
    let mut expected_mean = Array1::<f64>::zeros(3);
    let mut expected_var = Array1::<f64>::ones(3);
    for x in [&x1, &x2] {
        for c in 0..3 {
            let channel = x.index_axis(Axis(1), c);
            expected_mean[c] = 0.9 * expected_mean[c] + 0.1 * channel.mean().unwrap();
            expected_var[c] = 0.9 * expected_var[c] + 0.1 * channel.var(1.0); // unbiased
        }
    }
    assert!(bn.running_mean.abs_diff_eq(&expected_mean, 1e-14));
    assert!(bn.running_var.abs_diff_eq(&expected_var, 1e-14));
    assert_eq!(bn.num_batches_tracked, 2);
}

#[test]
fn momentum_none_is_the_cumulative_average() {
    let mut bn = BatchNorm::<f64>::with_options(2, 1e-5, None, true, true).unwrap();
    let batches: Vec<_> = (0..4).map(|i| normal(&[5, 2], i as f64, 1.0, 10 + i)).collect();
    for x in &batches {
        train_step(&mut bn, x);
    }
    let average = batches
        .iter()
        .map(|x| x.mean_axis(Axis(0)).unwrap())
        .fold(ArrayD::zeros(vec![2]), |a, m| a + m)
        / 4.0;
    assert!(bn.running_mean.clone().into_dyn().abs_diff_eq(&average, 1e-14));
}

#[test]
fn evaluation_uses_running_statistics_and_updates_nothing() {
    let mut bn = BatchNorm::<f64>::new(2);
    bn.running_mean = array![1.0, -2.0];
    bn.running_var = array![4.0, 0.25];
    bn.weight.value = array![2.0, 1.0].into_dyn();
    bn.bias.value = array![0.5, 0.0].into_dyn();
    let tape = Tape::new();
    let x = tape.var(array![[3.0, -2.0], [1.0, -1.0]]);
    let y = bn.forward(x, Mode::Eval).unwrap();
    let r = |var: f64| 1.0 / (var + 1e-5f64).sqrt();
    let expected = array![[2.0 * 2.0 * r(4.0) + 0.5, 0.0], [0.5, r(0.25)]].into_dyn();
    assert!(y.value().abs_diff_eq(&expected, 1e-12));
    assert_eq!(
        (bn.num_batches_tracked, bn.running_mean.clone()),
        (0, array![1.0, -2.0])
    );
    // One value per channel is fine in evaluation (no batch statistics).
    let single = tape.var(array![[1.0, 2.0]]);
    assert!(bn.forward(single, Mode::Eval).is_ok());
    // Only x, weight, bias and the node are on the tape: no running statistics.
    assert_eq!(tape.len(), 4 + 2);
}

#[test]
fn evaluation_backward_is_exact() {
    let mut bn = BatchNorm::<f64>::new(3);
    for (i, x) in (0..3).map(|i| normal(&[6, 3, 2], 0.5, 1.5, 20 + i)).enumerate() {
        assert_eq!(train_step(&mut bn, &x).shape(), &[6, 3, 2], "step {i}");
    }
    let x = normal(&[4, 3, 2], 0.0, 1.0, 30);
    check_gradients(|_, v| Ok(bn.forward(v[0], Mode::Eval)?), &[x]).unwrap();
}

#[test]
fn without_tracking_both_modes_use_batch_statistics() {
    let mut bn = BatchNorm::<f64>::with_options(2, 1e-5, Some(0.1), true, false).unwrap();
    let x = normal(&[6, 2], 5.0, 3.0, 3);
    let train = train_step(&mut bn, &x);
    let tape = Tape::new();
    let eval = bn.forward(tape.constant(x), Mode::Eval).unwrap();
    assert_eq!(*eval.value(), train);
    assert_eq!(bn.num_batches_tracked, 0);
    assert!(!bn.state_dict().contains_key("running_mean"));
}

#[test]
fn without_affine_there_is_nothing_to_train() {
    let mut bn = BatchNorm::<f64>::with_options(2, 1e-5, Some(0.1), false, true).unwrap();
    assert!(bn.parameters().is_empty());
    let out = train_step(&mut bn, &array![[1.0, 10.0], [3.0, 30.0]].into_dyn());
    assert!(out.abs_diff_eq(&array![[-1.0, -1.0], [1.0, 1.0]].into_dyn(), 1e-5));
    assert_eq!(
        bn.state_dict().keys().collect::<Vec<_>>(),
        ["num_batches_tracked", "running_mean", "running_var"]
    );
}

#[test]
fn errors_say_what_was_expected_and_what_was_got() {
    let mut bn = BatchNorm::<f64>::new(4);
    let tape = Tape::new();
    let message = |bn: &mut BatchNorm<f64>, x: Array2<f64>, mode| {
        bn.forward(tape.constant(x), mode).unwrap_err().to_string()
    };
    assert_eq!(
        message(&mut bn, Array2::zeros((1, 4)), Mode::Train),
        "BatchNorm in training needs more than 1 value per channel, got input of shape [1, 4] (1 value per channel)"
    );
    assert_eq!(
        message(&mut bn, Array2::zeros((5, 3)), Mode::Train),
        "x has shape [5, 3], expected [5, 4] (axis 1 holds the 4 channels of the layer)"
    );
    bn.running_var = Array1::ones(3);
    assert_eq!(
        message(&mut bn, Array2::zeros((5, 4)), Mode::Eval),
        "running_var has 3 elements, expected 4 (channels of x)"
    );
    assert_eq!(bn.num_batches_tracked, 0, "a failed call changes nothing");
    // Three calls, three x constants: the parameters never went on the tape.
    assert_eq!(tape.len(), 3, "a failed call puts nothing on the tape");
    let setting = |eps, momentum| {
        BatchNorm::<f32>::with_options(4, eps, momentum, true, true)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        setting(f64::NAN, Some(0.1)),
        "eps must be a finite number >= 0, got NaN"
    );
    assert_eq!(
        setting(-1e-5, Some(0.1)),
        "eps must be a finite number >= 0, got -0.00001"
    );
    assert_eq!(
        setting(1e-5, Some(1.5)),
        "momentum must be in [0, 1], or None for a cumulative average, got 1.5"
    );
}

#[test]
fn state_round_trips_under_pytorchs_keys() {
    let mut bn = BatchNorm::<f32>::new(3);
    let tape = Tape::new();
    bn.forward(
        tape.constant(normal(&[4, 3], 1.0, 1.0, 5).mapv(|v| v as f32)),
        Mode::Train,
    )
    .unwrap();
    bn.weight.value = array![1.5f32, 0.5, 2.0].into_dyn();
    let state = bn.state_dict();
    assert_eq!(
        state.keys().collect::<Vec<_>>(),
        [
            "bias",
            "num_batches_tracked",
            "running_mean",
            "running_var",
            "weight"
        ]
    );
    let mut fresh = BatchNorm::<f32>::new(3);
    fresh.load_state_dict(&state, true).unwrap();
    assert_eq!(fresh.state_dict(), state);
    assert_eq!(fresh.num_batches_tracked, 1);

    let mut broken = state.clone();
    broken.remove("running_var");
    let error = fresh.load_state_dict(&broken, false).unwrap_err().to_string();
    assert!(
        error.starts_with("state dict has no \"running_var\"; expected keys"),
        "{error}"
    );
    broken.insert("running_var".into(), ArrayD::ones(vec![4]));
    assert_eq!(
        fresh.load_state_dict(&broken, false).unwrap_err().to_string(),
        "state dict's \"running_var\" has shape [4], expected [3]"
    );
    let mut extra = state.clone();
    extra.insert("momentum".into(), ArrayD::ones(vec![]));
    assert_eq!(
        fresh.load_state_dict(&extra, true).unwrap_err().to_string(),
        "state dict has \"momentum\", which the layer does not have; expected keys [\"bias\", \
         \"num_batches_tracked\", \"running_mean\", \"running_var\", \"weight\"]"
    );
    assert_eq!(fresh.state_dict(), state, "a failed load changes nothing");
    fresh.load_state_dict(&extra, false).unwrap();
}

#[test]
fn a_batch_count_beyond_u64_is_an_error_not_a_saturated_count() {
    // 2⁶⁴ saturated to u64::MAX, and the next training step wrapped the count to 0.
    let mut bn = BatchNorm::<f64>::with_options(2, 1e-5, None, true, true).unwrap();
    let mut state = bn.state_dict();
    for count in [
        18_446_744_073_709_551_616.0,
        1e300,
        f64::INFINITY,
        -1.0,
        2.5,
        f64::NAN,
    ] {
        state.insert("num_batches_tracked".into(), ndarray::arr0(count).into_dyn());
        let error = bn.load_state_dict(&state, true).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("num_batches_tracked must be a whole number in [0, 2^64), got {count}")
        );
    }
    assert_eq!(bn.num_batches_tracked, 0);
    // The largest count saturates instead of wrapping to 0 (cumulative average: 1 / count).
    bn.num_batches_tracked = u64::MAX;
    train_step(&mut bn, &normal(&[4, 2], 0.0, 1.0, 7));
    assert_eq!(bn.num_batches_tracked, u64::MAX);
    assert!(
        bn.running_mean
            .iter()
            .chain(&bn.running_var)
            .all(|v| v.is_finite())
    );
}
