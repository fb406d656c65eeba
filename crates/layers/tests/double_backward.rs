//! The fused double backwards of conv2d, the pools, dropout, softmax cross-entropy, LayerNorm and
//! GroupNorm against
//! the tape's second derivative of the same computations composed from primitives, over random
//! shapes and settings, with random upstream gradients and random second-order directions
//! (proptest). Conv2d, the pools and dropout also differentiate a third time, through their
//! recorded double backwards; the others' third order is a clear error. (BatchNorm's proptest sits with
//! its node, in `batch_norm/double/tests.rs`, where evaluation-mode nodes can be built.)
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use layers::{Conv2dOptions, Window2d, avg_pool2d, avg_pool2d_composed, conv2d, conv2d_composed};
use layers::{dropout, dropout_composed, max_pool2d, max_pool2d_composed};
use layers::{group_norm, group_norm_composed, layer_norm, layer_norm_composed};
use layers::{softmax_cross_entropy, softmax_cross_entropy_composed};
use ndarray::ArrayD;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use support::{conv_case, error, normal, window};
use tape::{GradOptions, Tape, TapeError, Var};

fn recorded() -> GradOptions<f64> {
    GradOptions {
        create_graph: true,
        upstream: None,
    }
}

/// `Σᵢ ⟨gᵢ, vᵢ⟩` for gradients `g` (absent ones are zero) and directions `v`.
fn along<'t>(
    tape: &'t Tape<f64>,
    grads: &[Option<Var<'t, f64>>],
    directions: &[ArrayD<f64>],
) -> Var<'t, f64> {
    let mut s = tape.scalar(0.0);
    for (g, v) in grads.iter().zip(directions) {
        if let Some(g) = g {
            s = s + g.try_mul(tape.constant(v.clone())).unwrap().sum();
        }
    }
    s
}

/// For `L = ⟨dout, f(inputs)⟩` with `dout` a variable too: the first-order gradients, the
/// gradients of `S = Σ ⟨∂L/∂inputᵢ, vᵢ⟩` with respect to every input and `dout`, and, with
/// `third`, those of `Σ ⟨∂S/∂·, w⟩` (the second derivative recorded in turn).
fn derivatives(
    inputs: &[ArrayD<f64>],
    run: &dyn for<'t> Fn(&[Var<'t, f64>]) -> Var<'t, f64>,
    seed: u64,
    third: bool,
) -> Vec<ArrayD<f64>> {
    let tape = Tape::new();
    let rng = &mut StdRng::seed_from_u64(seed);
    let vars: Vec<_> = inputs.iter().map(|x| tape.var(x.clone())).collect();
    let y = run(&vars);
    let dout = tape.var(normal(&y.shape(), rng));
    let loss = y.try_mul(dout).unwrap().sum();
    let first = tape.grad(loss, &vars, recorded()).unwrap();
    let v: Vec<_> = inputs.iter().map(|x| normal(x.shape(), rng)).collect();
    let s = along(&tape, &first, &v);
    let mut all_vars = vars.clone();
    all_vars.push(dout);
    let zeros = |var: Var<'_, f64>| ArrayD::zeros(var.shape());
    let value = |g: Option<Var<'_, f64>>, var| g.map_or_else(|| zeros(var), |g| g.value().as_ref().clone());
    let mut results: Vec<ArrayD<f64>> = first.iter().zip(&vars).map(|(g, &var)| value(*g, var)).collect();
    let second = tape.grad(
        s,
        &all_vars,
        GradOptions {
            create_graph: third,
            upstream: None,
        },
    );
    let second = second.unwrap();
    results.extend(second.iter().zip(&all_vars).map(|(g, &var)| value(*g, var)));
    if third {
        let w: Vec<_> = all_vars.iter().map(|x| normal(&x.shape(), rng)).collect();
        let t = along(&tape, &second, &w);
        let grads = tape.grad(t, &all_vars, GradOptions::default()).unwrap();
        results.extend(grads.iter().zip(&all_vars).map(|(g, &var)| value(*g, var)));
    }
    results
}

/// The fused form's derivatives against the composed form's, to 1e-10.
fn compare(
    inputs: &[ArrayD<f64>],
    run: impl for<'t> Fn(&[Var<'t, f64>], bool) -> Var<'t, f64>,
    seed: u64,
    third: bool,
) -> Result<(), TestCaseError> {
    let fused = derivatives(inputs, &|v| run(v, false), seed, third);
    let composed = derivatives(inputs, &|v| run(v, true), seed, third);
    prop_assert_eq!(fused.len(), composed.len());
    for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
        prop_assert_eq!(f.shape(), c.shape());
        let e = error(f, c);
        prop_assert!(
            e <= 1e-10,
            "result {} (first, second, then third order): {:e}",
            i,
            e
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    #[test]
    fn conv2d_double_and_third_backward_match_the_composition(
        (window, input) in window(),
        n in 0usize..=2,
        groups in 1usize..=2,
        c_in_per_group in 1usize..=2,
        c_out_per_group in 1usize..=2,
        bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let groups = (groups, c_in_per_group, c_out_per_group);
        let (options, inputs) = conv_case((window, input), n, groups, bias, seed);
        compare(&inputs, |v, composed| {
            let f = if composed { conv2d_composed } else { conv2d };
            f(v[0], v[1], v.get(2).copied(), options).unwrap()
        }, seed ^ 1, true)?;
    }

    #[test]
    fn pools_double_and_third_backward_match_the_composition(
        (window, input) in window(),
        n in 0usize..=2,
        c in 1usize..=2,
        seed in any::<u64>(),
    ) {
        let x = normal(&[n, c, input[0], input[1]], &mut StdRng::seed_from_u64(seed));
        // tanh after the pool: a loss whose second derivative is not zero.
        compare(std::slice::from_ref(&x), |v, composed| {
            let f = if composed { max_pool2d_composed } else { max_pool2d };
            f(v[0], window).unwrap().tanh()
        }, seed ^ 1, true)?;
        compare(&[x], |v, composed| {
            let f = if composed { avg_pool2d_composed } else { avg_pool2d };
            f(v[0], window).unwrap().tanh()
        }, seed ^ 2, true)?;
    }

    #[test]
    fn dropout_double_and_third_backward_match_the_composition(
        shape in prop::collection::vec(1usize..5, 1..4),
        p in 0.0f64..0.9,
        seed in any::<u64>(),
    ) {
        let x = normal(&shape, &mut StdRng::seed_from_u64(seed));
        compare(&[x], |v, composed| {
            // The same seed, so the same mask in both forms.
            let rng = &mut StdRng::seed_from_u64(seed ^ 7);
            let f = if composed { dropout_composed } else { dropout };
            f(v[0].sigmoid(), p, rng).unwrap().powi(2)
        }, seed ^ 1, true)?;
    }

    #[test]
    fn softmax_cross_entropy_double_backward_matches_the_composition(
        rows in 1usize..6,
        classes in 1usize..6,
        scale in 0.1f64..5.0,
        seed in any::<u64>(),
    ) {
        let rng = &mut StdRng::seed_from_u64(seed);
        let logits = normal(&[rows, classes], rng) * scale;
        let labels: Vec<usize> = (0..rows).map(|i| (seed as usize ^ i.wrapping_mul(7)) % classes).collect();
        compare(&[logits], |v, composed| {
            let f = if composed { softmax_cross_entropy_composed } else { softmax_cross_entropy };
            f(v[0], &labels).unwrap()
        }, seed ^ 1, false)?;
    }
}

/// `(weight, bias)` among `v[1..]`, for those present.
fn parameters<'t>(
    v: &[Var<'t, f64>],
    (weight, bias): (bool, bool),
) -> (Option<Var<'t, f64>>, Option<Var<'t, f64>>) {
    let mut rest = v[1..].iter().copied();
    (
        weight.then(|| rest.next().unwrap()),
        bias.then(|| rest.next().unwrap()),
    )
}

/// `x`, then the weight (near 1) and the bias of `parameter_shape` where asked for.
fn norm_inputs(
    x: &[usize],
    parameter_shape: &[usize],
    (weight, bias): (bool, bool),
    seed: u64,
) -> Vec<ArrayD<f64>> {
    let rng = &mut StdRng::seed_from_u64(seed);
    let mut all = vec![normal(x, rng) * 2.0 + 1.5];
    if weight {
        all.push(normal(parameter_shape, rng) * 0.5 + 1.0);
    }
    if bias {
        all.push(normal(parameter_shape, rng));
    }
    all
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    #[test]
    fn layer_norm_double_backward_matches_the_composition(
        leading in prop::collection::vec(1usize..=3, 0..=2),
        normalized in prop::collection::vec(1usize..=5, 1..=2),
        affine in (any::<bool>(), any::<bool>()),
        seed in any::<u64>(),
    ) {
        let shape: Vec<usize> = leading.iter().chain(&normalized).copied().collect();
        let inputs = norm_inputs(&shape, &normalized, affine, seed);
        compare(&inputs, |v, composed| {
            let (weight, bias) = parameters(v, affine);
            let f = if composed { layer_norm_composed } else { layer_norm };
            f(v[0], &normalized, weight, bias, 1e-5).unwrap()
        }, seed ^ 1, false)?;
    }

    #[test]
    fn group_norm_double_backward_matches_the_composition(
        n in 1usize..=3,
        (groups, per_group) in (1usize..=3, 1usize..=3),
        spatial in prop::collection::vec(1usize..=3, 0..=2),
        affine in (any::<bool>(), any::<bool>()),
        seed in any::<u64>(),
    ) {
        let c = groups * per_group;
        let shape: Vec<usize> = [n, c].iter().chain(&spatial).copied().collect();
        let inputs = norm_inputs(&shape, &[c], affine, seed);
        compare(&inputs, |v, composed| {
            let (weight, bias) = parameters(v, affine);
            let f = if composed { group_norm_composed } else { group_norm };
            f(v[0], groups, weight, bias, 1e-5).unwrap()
        }, seed ^ 1, false)?;
    }
}

#[test]
fn a_third_order_through_the_norms_names_their_double_backwards() {
    let tape = Tape::<f64>::new();
    let rng = &mut StdRng::seed_from_u64(3);
    let x = tape.var(normal(&[2, 4, 3], rng));
    let w = tape.var(normal(&[4], rng));
    for (name, y) in [
        (
            "layer_norm_backward",
            layer_norm(x, &[3], None, None, 1e-5).unwrap(),
        ),
        (
            "group_norm_backward",
            group_norm(x, 2, Some(w), None, 1e-5).unwrap(),
        ),
    ] {
        let loss = y.powi(3).sum();
        let dx = tape.grad(loss, &[x], recorded()).unwrap()[0].unwrap();
        let s = dx.powi(2).sum();
        let error = tape.grad(s, &[x], recorded()).unwrap_err();
        assert!(
            matches!(&error, TapeError::NoGraphRule { op } if op == name),
            "{error}"
        );
        assert!(s.backward().unwrap().get(x).is_some());
    }
}

#[test]
fn a_third_order_through_the_softmax_names_its_double_backward() {
    let tape = Tape::<f64>::new();
    let z = tape.var(normal(&[3, 4], &mut StdRng::seed_from_u64(1)));
    let loss = softmax_cross_entropy(z, &[0, 3, 1]).unwrap();
    let dz = tape.grad(loss, &[z], recorded()).unwrap()[0].unwrap();
    let names: Vec<String> = tape.vars().iter().map(|v| v.op_name()).collect();
    assert!(
        names.contains(&"softmax_cross_entropy_backward".to_string()),
        "{names:?}"
    );
    let s = dz.try_mul(dz).unwrap().sum();
    let error = tape.grad(s, &[z], recorded()).unwrap_err();
    assert!(matches!(&error, TapeError::NoGraphRule { op } if op == "softmax_cross_entropy_backward"));
    // The second derivative itself is there.
    assert!(s.backward().unwrap().get(z).is_some());
}

#[test]
fn recorded_backwards_of_conv_pool_and_dropout_are_one_node_each() {
    let tape = Tape::<f64>::new();
    let rng = &mut StdRng::seed_from_u64(2);
    let x = tape.var(normal(&[2, 2, 6, 6], rng));
    let w = tape.var(normal(&[3, 2, 3, 3], rng));
    let conv = conv2d(x, w, None, Conv2dOptions::default()).unwrap();
    let pooled = max_pool2d(conv, Window2d::new([2, 2])).unwrap();
    let y = dropout(pooled, 0.5, rng).unwrap();
    let loss = y.powi(2).sum();
    let before = tape.len();
    tape.grad(loss, &[x, w], recorded()).unwrap();
    let fused: Vec<String> = tape.vars()[before..]
        .iter()
        .map(|v| v.op_name())
        .filter(|name| ["conv", "pool", "dropout"].iter().any(|op| name.contains(op)))
        .collect();
    assert_eq!(fused, ["dropout", "max_pool2d_backward", "conv2d_backward"]);
}
