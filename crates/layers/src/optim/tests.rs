use ndarray::array;
use tape::Tape;

use super::*;

/// Minimises `sum((w - target)²)` and returns the final `w`.
fn minimise(optimizer: &mut dyn Optimizer<f64>, steps: usize) -> ArrayD<f64> {
    let target = array![3.0, -1.0].into_dyn();
    let mut w = Parameter::new(array![0.0, 0.0]);
    for _ in 0..steps {
        let tape = Tape::new();
        let v = w.bind(&tape);
        let diff = v - tape.constant(target.clone());
        let grads = (diff * diff).sum().backward().unwrap();
        optimizer.step(vec![&mut w], &grads).unwrap();
    }
    w.value
}

#[test]
fn sgd_takes_the_textbook_step_and_converges() {
    // One step from 0 with lr 0.1: gradient 2(w - t) = (-6, 2), so w = (0.6, -0.2).
    assert!(minimise(&mut Sgd::new(0.1, 0.0).unwrap(), 1).abs_diff_eq(&array![0.6, -0.2].into_dyn(), 1e-15));
    // Momentum: the second step is -lr·(μ·g₁ + g₂).
    let two = minimise(&mut Sgd::new(0.1, 0.9).unwrap(), 2);
    let g2 = array![2.0 * (0.6 - 3.0), 2.0 * (-0.2 + 1.0)];
    let expected = array![0.6, -0.2] - (array![-6.0, 2.0] * 0.9 + g2) * 0.1;
    assert!(two.abs_diff_eq(&expected.into_dyn(), 1e-15));
    // Heavy-ball momentum contracts by √μ ≈ 0.95 per step here: 500 steps reach 1e-6.
    assert!(minimise(&mut Sgd::new(0.1, 0.9).unwrap(), 500).abs_diff_eq(&array![3.0, -1.0].into_dyn(), 1e-6));
}

#[test]
fn adam_first_step_is_lr_times_the_sign_and_converges() {
    let one = minimise(&mut Adam::new(0.01).unwrap(), 1);
    assert!(one.abs_diff_eq(&array![0.01, -0.01].into_dyn(), 1e-9));
    assert!(minimise(&mut Adam::new(0.1).unwrap(), 500).abs_diff_eq(&array![3.0, -1.0].into_dyn(), 1e-3));
}

#[test]
fn a_changed_parameter_set_is_an_error() {
    let mut sgd = Sgd::<f64>::new(0.1, 0.0).unwrap();
    let tape = Tape::new();
    let (mut a, mut b) = (Parameter::new(array![1.0]), Parameter::new(array![2.0]));
    let grads = (a.bind(&tape) * b.bind(&tape)).sum().backward().unwrap();
    sgd.step(vec![&mut a, &mut b], &grads).unwrap();
    assert_eq!((a.value[0], b.value[0]), (0.8, 1.9));
    let error = sgd.step(vec![&mut a], &grads).unwrap_err();
    assert_eq!(
        error.to_string(),
        "optimizer state holds 2 parameters, got 1; use one optimizer per set of parameters"
    );
}

/// Two parameters of shapes [2] and [3], bound to a new tape, with their gradients.
fn two_parameters(a: &Parameter<f64>, b: &Parameter<f64>) -> Gradients<f64> {
    let tape = Tape::new();
    let loss = a.bind(&tape).sum() * b.bind(&tape).sum();
    loss.backward().unwrap()
}

#[test]
fn parameters_that_change_shape_or_order_are_errors_and_change_nothing() {
    // They panicked inside ndarray.
    let optimizers: [Box<dyn Optimizer<f64>>; 2] = [
        Box::new(Sgd::new(0.1, 0.9).unwrap()),
        Box::new(Adam::new(0.1).unwrap()),
    ];
    for mut opt in optimizers {
        let (mut a, mut b) = (
            Parameter::new(array![1.0, 2.0]),
            Parameter::new(array![3.0, 4.0, 5.0]),
        );
        let grads = two_parameters(&a, &b);
        opt.step(vec![&mut a, &mut b], &grads).unwrap();
        let grads = two_parameters(&a, &b);
        let before = (a.value.clone(), b.value.clone());
        let error = opt.step(vec![&mut b, &mut a], &grads).unwrap_err();
        assert_eq!(
            error.to_string(),
            "parameter 0 has shape [3], expected [2] (its shape at the optimizer's first step); \
             give the optimizer the same parameters in the same order every step"
        );
        a.value = array![1.0, 2.0, 3.0, 4.0].into_dyn();
        assert!(matches!(
            opt.step(vec![&mut a, &mut b], &grads),
            Err(Error::ParameterShape { index: 0, .. })
        ));
        a.value = before.0.clone();
        assert_eq!(
            (a.value.clone(), b.value.clone()),
            before,
            "a failed step changes nothing"
        );
        // The state is as it was: the next step in the right order works.
        opt.step(vec![&mut a, &mut b], &grads).unwrap();
    }
}

#[test]
fn gradients_of_a_tape_that_never_saw_the_parameters_are_an_error() {
    // The step silently did nothing.
    let mut sgd = Sgd::<f64>::new(0.1, 0.0).unwrap();
    let mut w = Parameter::new(array![1.0, 2.0]);
    let other = Tape::new();
    let unrelated = (other.var(array![3.0]) * 2.0).sum().backward().unwrap();
    let error = sgd.step(vec![&mut w], &unrelated).unwrap_err();
    assert_eq!(
        error.to_string(),
        "none of the 1 parameter was used on the tape these gradients come from; run the \
         forward pass (which binds them) on that tape before backward"
    );
    assert_eq!(w.value, array![1.0, 2.0].into_dyn());
    // A parameter bound to the tape but unused by the loss is left as it is (PyTorch's None
    // gradient), beside one that is used.
    let (mut used, mut unused) = (Parameter::new(array![1.0]), Parameter::new(array![5.0]));
    let tape = Tape::new();
    let _ = unused.bind(&tape);
    let grads = (used.bind(&tape) * 3.0).sum().backward().unwrap();
    sgd.step(vec![&mut used, &mut unused], &grads).unwrap();
    assert_eq!((used.value[0], unused.value[0]), (1.0 - 0.1 * 3.0, 5.0));
}

#[test]
fn settings_are_checked() {
    for (made, message) in [
        (
            Sgd::<f64>::new(f64::NAN, 0.9).map(|_| ()),
            "lr must be a finite number >= 0, got NaN",
        ),
        (
            Sgd::<f64>::new(-0.1, 0.9).map(|_| ()),
            "lr must be a finite number >= 0, got -0.1",
        ),
        (
            Sgd::<f64>::new(0.1, f64::INFINITY).map(|_| ()),
            "momentum must be a finite number >= 0, got inf",
        ),
        (
            Adam::<f64>::new(f64::INFINITY).map(|_| ()),
            "lr must be a finite number >= 0, got inf",
        ),
        (
            Adam::<f64>::with_options(0.1, 1.0, 0.999, 1e-8).map(|_| ()),
            "beta1 must be in [0, 1), got 1",
        ),
        (
            Adam::<f64>::with_options(0.1, 0.9, 1.0, 1e-8).map(|_| ()),
            "beta2 must be in [0, 1), got 1",
        ),
        (
            Adam::<f64>::with_options(0.1, 0.9, 0.999, -1.0).map(|_| ()),
            "eps must be a finite number >= 0, got -1",
        ),
    ] {
        assert_eq!(made.unwrap_err().to_string(), message);
    }
    let mut adam = Adam::<f64>::new(0.1).unwrap();
    assert!(adam.set_lr(f64::NAN).is_err());
    assert_eq!(adam.lr(), 0.1, "a failed set_lr changes nothing");
    adam.set_lr(0.01).unwrap();
    assert_eq!((adam.lr(), adam.betas(), adam.eps()), (0.01, (0.9, 0.999), 1e-8));
}

/// `w` from 2.0 under a constant gradient of 3 (the loss `3·w`), after each of `steps` steps.
fn constant_gradient(optimizer: &mut dyn Optimizer<f64>, steps: usize) -> Vec<f64> {
    let mut w = Parameter::new(array![2.0]);
    (0..steps)
        .map(|_| {
            let tape = Tape::new();
            let grads = (w.bind(&tape) * 3.0).sum().backward().unwrap();
            optimizer.step(vec![&mut w], &grads).unwrap();
            w.value[0]
        })
        .collect()
}

#[test]
fn sgd_weight_decay_adds_lambda_w_to_the_gradient() {
    // By hand, lr 0.1, μ 0.9, λ 0.01: g₁ = 3 + 0.01·2 = 3.02, v₁ = 3.02, w₁ = 2 - 0.302 = 1.698;
    // g₂ = 3 + 0.01·1.698, v₂ = 0.9·3.02 + g₂ = 5.73498, w₂ = 1.698 - 0.573498 = 1.124502.
    // PyTorch's SGD(lr=0.1, momentum=0.9, weight_decay=0.01) gives the same.
    let mut sgd = Sgd::new(0.1, 0.9).unwrap().with_weight_decay(0.01).unwrap();
    let w = constant_gradient(&mut sgd, 2);
    assert!(
        (w[0] - 1.698).abs() < 1e-15 && (w[1] - 1.124502).abs() < 1e-15,
        "{w:?}"
    );
    assert_eq!(sgd.weight_decay(), 0.01);
    assert!(
        Sgd::<f64>::new(0.1, 0.9)
            .unwrap()
            .with_weight_decay(-1.0)
            .is_err()
    );
}

#[test]
fn adamw_shrinks_the_weights_then_takes_adams_step() {
    // By hand, lr 0.1, λ 0.1: each step shrinks w by 1 - 0.01; under a constant gradient Adam's
    // bias-corrected step is lr · 3 / (3 + ε) every time. PyTorch's AdamW(lr=0.1,
    // weight_decay=0.1) gives 1.8800000003333333, 1.761200000663334, 1.6435880009900339.
    let adam_step = 0.1 * 3.0 / (3.0 + 1e-8);
    let mut expected = vec![];
    let mut w = 2.0f64;
    for _ in 0..3 {
        w = w * (1.0 - 0.1 * 0.1) - adam_step;
        expected.push(w);
    }
    let mut adamw = AdamW::new(0.1, 0.1).unwrap();
    let got = constant_gradient(&mut adamw, 3);
    for (got, expected) in got.iter().zip(&expected) {
        assert!((got - expected).abs() < 1e-15, "{got} vs {expected}");
    }
    assert!((got[2] - 1.6435880009900339).abs() < 1e-14);
    // Without decay AdamW is Adam.
    let plain = constant_gradient(&mut AdamW::new(0.1, 0.0).unwrap(), 3);
    assert_eq!(plain, constant_gradient(&mut Adam::new(0.1).unwrap(), 3));
    assert!(AdamW::<f64>::new(0.1, f64::NAN).is_err());
}

/// Parameters `a = (1, 1)` and `b = (1)` with gradients `(3, 4)` and `(12)`: global norm 13.
fn clipped_setup() -> (Parameter<f64>, Parameter<f64>, Gradients<f64>) {
    let (a, b) = (Parameter::new(array![1.0, 1.0]), Parameter::new(array![1.0]));
    let tape = Tape::new();
    let loss = (a.bind(&tape) * tape.constant(array![3.0, 4.0])).sum() + (b.bind(&tape) * 12.0).sum();
    let grads = loss.backward().unwrap();
    (a, b, grads)
}

#[test]
fn clip_grad_norm_scales_all_gradients_together_as_pytorch() {
    let (a, b, mut grads) = clipped_setup();
    // PyTorch: clip_grad_norm_([a, b], 6.5) returns 13 and scales by 6.5 / (13 + 1e-6).
    let norm = clip_grad_norm(&[&a, &b], &mut grads, 6.5).unwrap();
    assert_eq!(norm, 13.0);
    let factor = 6.5 / (13.0 + 1e-6);
    assert_eq!(
        *a.grad(&grads).unwrap(),
        array![3.0 * factor, 4.0 * factor].into_dyn()
    );
    assert_eq!(*b.grad(&grads).unwrap(), array![12.0 * factor].into_dyn());
    // A norm already within the bound is left as it is.
    let (a, b, mut grads) = clipped_setup();
    assert_eq!(clip_grad_norm(&[&a, &b], &mut grads, 13.5).unwrap(), 13.0);
    assert_eq!(*b.grad(&grads).unwrap(), array![12.0].into_dyn());
    let error = clip_grad_norm(&[&a, &b], &mut grads, -1.0).unwrap_err();
    assert_eq!(error.to_string(), "max_norm must be a finite number >= 0, got -1");
}

#[test]
fn clip_grad_value_clamps_each_value() {
    let (a, b, mut grads) = clipped_setup();
    clip_grad_value(&[&a, &b], &mut grads, 3.5).unwrap();
    assert_eq!(*a.grad(&grads).unwrap(), array![3.0, 3.5].into_dyn());
    assert_eq!(*b.grad(&grads).unwrap(), array![3.5].into_dyn());
    assert!(clip_grad_value(&[&a], &mut grads, f64::NAN).is_err());
}

#[test]
fn optimizer_states_round_trip_and_bad_ones_change_nothing() {
    let mut adam = Adam::new(0.1).unwrap();
    constant_gradient(&mut adam, 2);
    let state = adam.state_dict();
    let keys: Vec<&String> = state.keys().collect();
    assert_eq!(keys, ["state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"]);
    let mut fresh = Adam::<f64>::new(0.1).unwrap();
    fresh.load_state_dict(&state).unwrap();
    assert_eq!(fresh.state_dict(), state);

    let mut missing = state.clone();
    missing.remove("state.0.exp_avg_sq");
    let error = fresh.load_state_dict(&missing).unwrap_err().to_string();
    assert!(
        error.starts_with("state dict has no \"state.0.exp_avg_sq\""),
        "{error}"
    );
    let mut fractional = state.clone();
    fractional.insert("state.0.step".into(), ndarray::arr0(2.5).into_dyn());
    let error = fresh.load_state_dict(&fractional).unwrap_err().to_string();
    assert!(
        error.starts_with("the step count (state.{i}.step) must be a whole number"),
        "{error}"
    );
    assert_eq!(fresh.state_dict(), state, "failed loads changed nothing");
    assert!(
        Sgd::<f64>::new(0.1, 0.9)
            .unwrap()
            .load_state_dict(&state)
            .is_err()
    );
}
