//! The fused double backward against the tape's second derivative of BatchNorm composed from
//! primitives, in training and evaluation mode.

use ndarray::{Array1, ArrayD};
use proptest::prelude::*;
use tape::{GradOptions, Tape, TapeError, Var};

use crate::batch_norm::testing::{channel, normal, on_1_2_3_threads};
use crate::batch_norm::{BatchNormNode, batch_norm, batch_norm_composed};

/// How BatchNorm is taken: the fused node or the composition, with batch statistics or with
/// the given running mean and variance.
#[derive(Debug, Clone, Copy)]
enum Form<'a> {
    Fused,
    Composed,
    FusedEval(&'a Array1<f64>, &'a Array1<f64>),
    ComposedEval(&'a Array1<f64>, &'a Array1<f64>),
}

const EPS: f64 = 1e-5;

fn apply<'t>(form: Form<'_>, x: Var<'t, f64>, gamma: Var<'t, f64>, beta: Var<'t, f64>) -> Var<'t, f64> {
    let tape = x.tape();
    match form {
        Form::Fused => batch_norm(x, gamma, beta, EPS).unwrap(),
        Form::Composed => batch_norm_composed(x, gamma, beta, EPS).unwrap(),
        Form::FusedEval(mean, var) => {
            let node = BatchNormNode::from_running(mean, var, EPS);
            tape.apply(node, &[x, gamma, beta]).unwrap()
        }
        Form::ComposedEval(mean, var) => {
            let mut channel = vec![1; x.shape().len()];
            channel[1] = mean.len();
            let constant = |a: &Array1<f64>| tape.constant(a.clone()).reshape(&channel).unwrap();
            let std = constant(var).add_scalar(EPS).sqrt();
            let x_hat = x.try_sub(constant(mean)).unwrap().try_div(std).unwrap();
            let scaled = x_hat.try_mul(gamma.reshape(&channel).unwrap()).unwrap();
            scaled.try_add(beta.reshape(&channel).unwrap()).unwrap()
        }
    }
}

fn recorded() -> GradOptions<f64> {
    GradOptions {
        create_graph: true,
        upstream: None,
    }
}

/// The first-order gradients `dx, dgamma, dbeta` of `Σ dout · BN(x)`, then the gradients of
/// `Σ v · (dx, dgamma, dbeta)` with respect to `x`, `gamma`, `beta` and `dout`.
fn derivatives(form: Form<'_>, inputs: &[ArrayD<f64>; 4], directions: &[ArrayD<f64>; 3]) -> Vec<ArrayD<f64>> {
    let tape = Tape::new();
    let vars = inputs.each_ref().map(|a| tape.var(a.clone()));
    let [x, gamma, beta, dout] = vars;
    let loss = apply(form, x, gamma, beta).try_mul(dout).unwrap().sum();
    let first = tape.grad(loss, &[x, gamma, beta], recorded()).unwrap();
    let mut results = Vec::new();
    let mut s = tape.scalar(0.0);
    for (g, v) in first.iter().zip(directions) {
        let g = g.unwrap();
        results.push(g.value().as_ref().clone());
        s = s + g.try_mul(tape.constant(v.clone())).unwrap().sum();
    }
    let second = s.backward().unwrap();
    for var in vars {
        let zeros = || ArrayD::zeros(var.shape());
        results.push(second.get(var).cloned().unwrap_or_else(zeros));
    }
    results
}

/// Max abs difference over the largest magnitude of `b` (at least 1).
fn error(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

const NAMES: [&str; 7] = ["dx", "dgamma", "dbeta", "d_x", "d_gamma", "d_beta", "d_dout"];

fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    // Rank 2 to 4: (N, C) and one or two spatial axes; N >= 2 for batch statistics.
    (2usize..5, 1usize..4, prop::collection::vec(1usize..4, 0..3)).prop_map(|(n, c, spatial)| {
        let mut shape = vec![n, c];
        shape.extend(spatial);
        shape
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn fused_double_backward_matches_the_composition(
        shape in shape_strategy(),
        training in any::<bool>(),
        offset in -3.0f64..3.0,
        spread in 0.2f64..4.0,
        seed in 0u64..1_000_000,
    ) {
        let c = shape[1];
        let inputs = [
            normal(&shape, offset, spread, seed),
            channel(c, 1.0, seed + 1).into_dyn(),
            channel(c, 0.0, seed + 2).into_dyn(),
            normal(&shape, 0.0, 1.0, seed + 3),
        ];
        let directions = [
            normal(&shape, 0.0, 1.0, seed + 4),
            channel(c, 0.0, seed + 5).into_dyn(),
            channel(c, 0.0, seed + 6).into_dyn(),
        ];
        let mean = channel(c, offset, seed + 7);
        let var = channel(c, 0.0, seed + 8).mapv(|v| v * v + 0.1);
        let (fused, composed) = if training {
            (Form::Fused, Form::Composed)
        } else {
            (Form::FusedEval(&mean, &var), Form::ComposedEval(&mean, &var))
        };
        let ours = derivatives(fused, &inputs, &directions);
        let reference = derivatives(composed, &inputs, &directions);
        for ((name, a), b) in NAMES.iter().zip(&ours).zip(&reference) {
            prop_assert_eq!(a.shape(), b.shape());
            let e = error(a, b);
            prop_assert!(e <= 1e-10, "{}: {:e} (shape {:?}, training {})", name, e, shape, training);
        }
    }
}

#[test]
fn the_fused_node_passes_the_second_order_checker() {
    let inputs = [
        normal(&[4, 3, 2], 0.5, 2.0, 1),
        channel(3, 1.0, 2).into_dyn(),
        channel(3, 0.0, 3).into_dyn(),
    ];
    let report = tape::check_second_order(|_, v| Ok(batch_norm(v[0], v[1], v[2], EPS)?), &inputs).unwrap();
    assert_eq!(report.checked, 24 + 3 + 3);
    let (mean, var) = (channel(3, 0.2, 4), channel(3, 1.0, 5).mapv(|v| v * v + 0.1));
    let node = BatchNormNode::from_running(&mean, &var, EPS);
    tape::check_second_order(|t, v| t.apply(node.clone(), v), &inputs).unwrap();
}

#[test]
fn recording_the_backward_adds_one_fused_node_and_a_third_order_names_it() {
    let tape = Tape::<f64>::new();
    let x = tape.var(normal(&[6, 3], 0.0, 1.0, 1));
    let (gamma, beta) = (tape.var(channel(3, 1.0, 2)), tape.var(channel(3, 0.0, 3)));
    let dout = tape.constant(normal(&[6, 3], 0.0, 1.0, 4));
    let loss = batch_norm(x, gamma, beta, EPS)
        .unwrap()
        .try_mul(dout)
        .unwrap()
        .sum();
    let before = tape.len();
    let grads = tape.grad(loss, &[x, gamma, beta], recorded()).unwrap();
    let fused: Vec<String> = (before..tape.len())
        .filter_map(|i| tape.vars().get(i).map(|v| v.op_name()))
        .filter(|name| name.starts_with("batch_norm"))
        .collect();
    assert_eq!(fused, ["batch_norm_backward"]);
    // Beyond the values the tape holds anyway, the recorded node keeps the statistics only.
    assert!(grads.iter().all(Option::is_some));

    // Recording the second derivative (for a third) reaches the double backward node, which
    // has no rule of its own: the error names it.
    let dx = grads[0].unwrap();
    let h = dx.try_mul(dx).unwrap().sum();
    let error = tape.grad(h, &[x], recorded()).unwrap_err();
    assert!(matches!(&error, TapeError::NoGraphRule { op } if op == "batch_norm_backward"));
    assert_eq!(
        error.to_string(),
        "batch_norm_backward: its backward cannot be recorded, so it can be differentiated once, not again (create_graph)"
    );
    // The second derivative itself, unrecorded, is there.
    assert!(h.backward().unwrap().get(x).is_some());
}

#[test]
fn the_double_backward_is_bit_identical_on_any_number_of_threads() {
    // Large enough for the parallel schedule, with a ragged last block.
    let shape = [37, 16, 30, 30];
    let inputs = [
        normal(&shape, 0.3, 2.0, 1),
        channel(16, 1.0, 2).into_dyn(),
        channel(16, 0.0, 3).into_dyn(),
        normal(&shape, 0.0, 1.0, 4),
    ];
    let directions = [
        normal(&shape, 0.0, 1.0, 5),
        channel(16, 0.0, 6).into_dyn(),
        channel(16, 0.0, 7).into_dyn(),
    ];
    let runs = on_1_2_3_threads(|| derivatives(Form::Fused, &inputs, &directions));
    assert_eq!(runs[0], runs[1]);
    assert_eq!(runs[0], runs[2]);
}

#[test]
fn f32_double_backward_agrees_with_f64() {
    let shape = [8, 3, 5];
    let inputs = [
        normal(&shape, 100.0, 0.5, 1),
        channel(3, 1.0, 2).into_dyn(),
        channel(3, 0.0, 3).into_dyn(),
        normal(&shape, 0.0, 1.0, 4),
    ];
    let directions = [
        normal(&shape, 0.0, 1.0, 5),
        channel(3, 0.0, 6).into_dyn(),
        channel(3, 0.0, 7).into_dyn(),
    ];
    // The f64 reference on the same (rounded) values: what is left is f32's arithmetic.
    let inputs = inputs.map(|a| a.mapv(|v| f64::from(v as f32)));
    let exact = derivatives(Form::Fused, &inputs, &directions);
    let tape = Tape::<f32>::new();
    let vars = inputs.each_ref().map(|a| tape.var(a.mapv(|v| v as f32)));
    let [x, gamma, beta, dout] = vars;
    let loss = batch_norm(x, gamma, beta, EPS)
        .unwrap()
        .try_mul(dout)
        .unwrap()
        .sum();
    let options = GradOptions {
        create_graph: true,
        upstream: None,
    };
    let first = tape.grad(loss, &[x, gamma, beta], options).unwrap();
    let mut s = tape.scalar(0.0);
    for (g, v) in first.iter().zip(&directions) {
        s = s + g
            .unwrap()
            .try_mul(tape.constant(v.mapv(|v| v as f32)))
            .unwrap()
            .sum();
    }
    let second = s.backward().unwrap();
    let d_x = second.wrt(x).unwrap().mapv(f64::from);
    // Statistics and sums in f64: x near 100 loses nothing to the offset.
    assert!(error(&d_x, &exact[3]) < 1e-5, "{:e}", error(&d_x, &exact[3]));
}
