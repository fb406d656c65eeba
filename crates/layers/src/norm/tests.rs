//! The fused nodes against the gradient checker, the rules of the module docs, the errors and
//! the layers. (Fused against composed over random shapes: `tests/norm_properties.rs`.)

use ndarray::{Array1, ArrayD, array};
use tape::{GradCheck, Tape, check_gradients};

use super::*;
use crate::batch_norm::testing::{channel, normal, on_1_2_3_threads};
use crate::module::{Mode, Module};

#[test]
fn fused_and_composed_pass_the_gradient_checker() {
    // LayerNorm over one and over two trailing axes.
    for (shape, normalized) in [(&[5, 4][..], &[4][..]), (&[2, 3, 4], &[3, 4])] {
        let inputs = [
            normal(shape, 0.5, 2.0, 1),
            normal(normalized, 1.0, 0.5, 2),
            normal(normalized, 0.0, 1.0, 3),
        ];
        for composed in [false, true] {
            let f = if composed { layer_norm_composed } else { layer_norm };
            let report = check_gradients(
                |_, v| Ok(f(v[0], normalized, Some(v[1]), Some(v[2]), 1e-5)?),
                &inputs,
            );
            assert!(report.is_ok(), "{shape:?} composed {composed}: {report:?}");
        }
    }
    // GroupNorm: two groups, InstanceNorm (a group per channel) and one group.
    for (shape, groups) in [(&[2, 4, 3][..], 2), (&[2, 3, 2, 2], 3), (&[3, 2, 5], 1)] {
        let c = shape[1];
        let inputs = [
            normal(shape, 0.5, 2.0, 4),
            channel(c, 1.0, 5).into_dyn(),
            channel(c, 0.0, 6).into_dyn(),
        ];
        for composed in [false, true] {
            let f = if composed { group_norm_composed } else { group_norm };
            let report = check_gradients(|_, v| Ok(f(v[0], groups, Some(v[1]), Some(v[2]), 1e-5)?), &inputs);
            assert!(report.is_ok(), "{shape:?} composed {composed}: {report:?}");
        }
    }
    // Without parameters, the node has x alone as input.
    let x = [normal(&[3, 6], 0.0, 1.0, 7)];
    check_gradients(|_, v| Ok(layer_norm(v[0], &[6], None, None, 1e-5)?), &x).unwrap();
    check_gradients(|_, v| Ok(group_norm(v[0], 3, None, None, 1e-5)?), &x).unwrap();
}

#[test]
fn a_wrong_backward_fails_the_gradient_checker() {
    // The node's backward with its inverse standard deviations 1% off: the checker must see it.
    let x = normal(&[4, 6], 0.0, 1.5, 8);
    let tape = Tape::<f64>::new();
    let right = tape.var(x.clone());
    let y = layer_norm(right, &[6], None, None, 1e-5).unwrap();
    let node_of = |x: &ArrayD<f64>| {
        let groups = super::layer_groups(x.shape(), &[6], 1e-5).unwrap();
        GroupNormNode::new("layer_norm", x.as_slice().unwrap(), groups, (None, None), 1e-5)
    };
    let skewed = |x: &ArrayD<f64>| {
        let mut node = node_of(x);
        node.inv_std.iter_mut().for_each(|r| *r *= 1.01);
        node
    };
    assert_eq!(tape.apply(node_of(&x), &[right]).unwrap().value(), y.value());
    let run = |make: &dyn Fn(&ArrayD<f64>) -> GroupNormNode<f64>| {
        GradCheck::default().run(
            |t, v| {
                let value = v[0].value();
                t.apply(make(&value), v)
            },
            std::slice::from_ref(&x),
        )
    };
    assert!(run(&node_of).is_ok());
    assert!(run(&skewed).is_err());
}

#[test]
fn a_constant_group_normalizes_to_exactly_its_bias() {
    let tape = Tape::<f32>::new();
    // Row 0 constant at 1e30, row 1 at -3.25; in GroupNorm, group 1 of sample 0 constant.
    let x = tape.var(array![[1e30f32, 1e30, 1e30], [-3.25, -3.25, -3.25]]);
    let (w, b) = (
        tape.var(array![2.0f32, -1.0, 0.5]),
        tape.var(array![0.125f32, -7.0, 3.0]),
    );
    let y = layer_norm(x, &[3], Some(w), Some(b), 1e-5).unwrap();
    assert_eq!(
        y.value().as_ref(),
        &array![[0.125f32, -7.0, 3.0], [0.125, -7.0, 3.0]].into_dyn()
    );
    let x = tape.var(array![[[1.0f32, 2.0], [5.5, 5.5]]]);
    let (w, b) = (tape.var(array![3.0f32, 4.0]), tape.var(array![0.5f32, -0.25]));
    let y = group_norm(x, 2, Some(w), Some(b), 0.0).unwrap();
    assert_eq!(y.value()[[0, 1, 0]], -0.25);
    assert_eq!(y.value()[[0, 1, 1]], -0.25);
    assert!(y.value().iter().all(|v| v.is_finite()));
}

#[test]
fn f32_agrees_with_f64_to_f32_precision() {
    // Data far from 0 (mean 1e3, spread 1e-2): statistics in f32 would lose most digits.
    let x = normal(&[16, 64], 1e3, 1e-2, 9);
    let dout = normal(&[16, 64], 0.0, 1.0, 10);
    let run64 = {
        let tape = Tape::<f64>::new();
        let v = tape.var(x.clone());
        let y = layer_norm(v, &[64], None, None, 1e-5).unwrap();
        let g = y.backward_with(dout.clone()).unwrap();
        (y.value().as_ref().clone(), g.wrt(v).unwrap().clone())
    };
    let tape = Tape::<f32>::new();
    let v = tape.var(x.mapv(|v| v as f32));
    let y = layer_norm(v, &[64], None, None, 1e-5).unwrap();
    let g = y.backward_with(dout.mapv(|v| v as f32)).unwrap();
    // The f32 input is x rounded: compare with f64 on those same values.
    let rounded = x.mapv(|v| f64::from(v as f32));
    let tape64 = Tape::<f64>::new();
    let v64 = tape64.var(rounded);
    let y64 = layer_norm(v64, &[64], None, None, 1e-5).unwrap();
    let g64 = y64.backward_with(dout.clone()).unwrap();
    let close = |a: &ArrayD<f32>, b: &ArrayD<f64>, scale: f64| {
        a.iter()
            .zip(b)
            .all(|(&a, &b)| (f64::from(a) - b).abs() <= 1e-5 * scale)
    };
    assert!(close(&y.value(), &y64.value(), 2.0));
    assert!(close(g.wrt(v).unwrap(), g64.wrt(v64).unwrap(), 100.0));
    drop(run64);
}

#[test]
fn results_are_bit_identical_on_any_thread_count() {
    let x = normal(&[8, 16, 32, 32], 0.5, 2.0, 11);
    let dout = normal(&[8, 16, 32, 32], 0.0, 1.0, 12);
    let (w, b) = (channel(16, 1.0, 13), channel(16, 0.0, 14));
    let runs = on_1_2_3_threads(|| {
        let tape = Tape::<f64>::new();
        let (xv, wv, bv) = (tape.var(x.clone()), tape.var(w.clone()), tape.var(b.clone()));
        let y = group_norm(xv, 4, Some(wv), Some(bv), 1e-5).unwrap();
        let g = y.backward_with(dout.clone()).unwrap();
        let z = layer_norm(xv, &[32, 32], None, None, 1e-5).unwrap();
        let gz = z.backward_with(dout.clone()).unwrap();
        [
            y.value().as_ref().clone(),
            g.wrt(xv).unwrap().clone(),
            g.wrt(wv).unwrap().clone(),
            z.value().as_ref().clone(),
            gz.wrt(xv).unwrap().clone(),
        ]
    });
    assert_eq!(runs[0], runs[1]);
    assert_eq!(runs[0], runs[2]);
}

#[test]
fn double_backwards_are_bit_identical_on_any_number_of_threads() {
    let x = normal(&[8, 16, 32, 32], 0.5, 2.0, 21);
    let (dout, v) = (
        normal(&[8, 16, 32, 32], 0.0, 1.0, 22),
        normal(&[8, 16, 32, 32], 0.0, 1.0, 23),
    );
    let w = channel(16, 1.0, 24);
    let recorded = || tape::GradOptions {
        create_graph: true,
        upstream: None,
    };
    let runs = on_1_2_3_threads(|| {
        let tape = Tape::<f64>::new();
        let (xv, wv) = (tape.var(x.clone()), tape.var(w.clone()));
        let y = group_norm(xv, 4, Some(wv), None, 1e-5).unwrap();
        let z = layer_norm(y, &[32, 32], None, None, 1e-5).unwrap();
        let loss = z.try_mul(tape.constant(dout.clone())).unwrap().sum();
        let grads = tape.grad(loss, &[xv, wv], recorded()).unwrap();
        let s = grads[0].unwrap().try_mul(tape.constant(v.clone())).unwrap().sum();
        let second = s.backward().unwrap();
        [second.wrt(xv).unwrap().clone(), second.wrt(wv).unwrap().clone()]
    });
    assert_eq!(runs[0], runs[1]);
    assert_eq!(runs[0], runs[2]);
}

#[test]
fn the_fused_node_saves_two_values_per_group() {
    let tape = Tape::<f32>::new();
    let x = tape.var(ArrayD::<f32>::zeros(ndarray::IxDyn(&[4, 6, 8, 8])));
    let before = tape.saved_bytes();
    group_norm(x, 3, None, None, 1e-5).unwrap();
    // The output (which the tape keeps for any node) and mean and inv_std per group in f64.
    assert_eq!(tape.saved_bytes() - before, 4 * 6 * 64 * 4 + 2 * 12 * 8);
    let before = tape.saved_bytes();
    group_norm_composed(x, 3, None, None, 1e-5).unwrap();
    assert!(tape.saved_bytes() - before >= 4 * 4 * 6 * 64 * 4);
}

#[test]
fn errors_say_what_was_expected() {
    let tape = Tape::<f64>::new();
    let x = tape.var(normal(&[2, 3, 4], 0.0, 1.0, 1));
    let w4 = tape.var(Array1::<f64>::ones(4));
    let w3 = tape.var(Array1::<f64>::ones(3));
    let message = |r: crate::Result<tape::Var<'_, f64>>| r.unwrap_err().to_string();
    assert_eq!(
        message(layer_norm(x, &[3], None, None, 1e-5)),
        "x has shape [2, 3, 4], expected [..., 3] (ending in normalized_shape)"
    );
    assert_eq!(
        message(layer_norm(x, &[4], Some(w3), None, 1e-5)),
        "weight has shape [3], expected [4] (normalized_shape)"
    );
    assert_eq!(
        message(layer_norm_composed(x, &[4], None, Some(w3), 1e-5)),
        "bias has shape [3], expected [4] (normalized_shape)"
    );
    assert_eq!(
        message(layer_norm(x, &[], None, None, 1e-5)),
        "normalized_shape has shape [], expected one or more axes, each of size 1 or more"
    );
    assert_eq!(
        message(group_norm(x, 2, None, None, 1e-5)),
        "groups = 2 does not divide the 3 channels of x"
    );
    assert_eq!(
        message(group_norm(x, 0, None, None, 1e-5)),
        "num_groups must be at least 1, got 0"
    );
    assert_eq!(
        message(group_norm(x, 3, Some(w4), None, 1e-5)),
        "weight has shape [4], expected [3] (one value per channel of x)"
    );
    assert_eq!(
        message(group_norm_composed(x, 3, Some(w4), None, 1e-5)),
        "weight has shape [4], expected [3] (one value per channel of x)"
    );
    assert_eq!(
        message(group_norm(x, 3, None, None, -1.0)),
        "eps must be a finite number >= 0, got -1"
    );
    let row = tape.var(Array1::<f64>::ones(3));
    assert_eq!(
        message(group_norm(row, 1, None, None, 1e-5)),
        "x has shape [3], expected rank 2 or more for GroupNorm: (N, C, *)"
    );
    let empty = tape.var(ArrayD::<f64>::zeros(ndarray::IxDyn(&[2, 0, 3])));
    assert_eq!(
        message(group_norm(empty, 1, None, None, 1e-5)),
        "x has shape [2, 0, 3], expected at least one value per normalized group"
    );
    // A batch of no samples is fine: an empty output.
    let none = tape.var(ArrayD::<f64>::zeros(ndarray::IxDyn(&[0, 4])));
    assert_eq!(
        layer_norm(none, &[4], None, None, 1e-5).unwrap().shape(),
        vec![0, 4]
    );
}

#[test]
fn layers_hold_parameters_under_pytorch_names() {
    let mut ln = LayerNorm::<f64>::new(&[3, 4]).unwrap();
    assert_eq!(ln.describe(), "LayerNorm([3, 4])");
    let state = ln.state_dict();
    assert_eq!(state.keys().collect::<Vec<_>>(), ["bias", "weight"]);
    assert_eq!(state["weight"].shape(), &[3, 4]);
    let mut loaded = state.clone();
    loaded.insert("bias".into(), ArrayD::from_elem(ndarray::IxDyn(&[3, 4]), 0.5));
    ln.load_state_dict(&loaded, true).unwrap();
    assert_eq!(ln.bias().unwrap().value[[1, 2]], 0.5);
    let tape = Tape::new();
    let y = ln
        .forward(
            tape.constant(ArrayD::zeros(ndarray::IxDyn(&[2, 3, 4]))),
            Mode::Eval,
        )
        .unwrap();
    assert!(y.value().iter().all(|&v| v == 0.5));

    let plain = LayerNorm::<f64>::with_options(&[4], 1e-5, false).unwrap();
    assert!(plain.parameters().is_empty() && plain.state_dict().is_empty());
    assert_eq!(plain.describe(), "LayerNorm([4], no affine)");
    assert_eq!(
        LayerNorm::<f64>::new(&[4, 0]).unwrap_err().to_string(),
        "normalized_shape has shape [4, 0], expected one or more axes, each of size 1 or more"
    );

    let mut gn = GroupNorm::<f64>::new(2, 4).unwrap();
    assert_eq!(gn.parameters().len(), 2);
    assert_eq!(gn.state_dict()["weight"].shape(), &[4]);
    assert_eq!(
        GroupNorm::<f64>::new(3, 4).unwrap_err().to_string(),
        "groups = 3 does not divide the 4 channels of x"
    );
    let x = tape.constant(ArrayD::zeros(ndarray::IxDyn(&[2, 6, 3])));
    assert_eq!(
        gn.forward(x, Mode::Train).unwrap_err().to_string(),
        "x has shape [2, 6, 3], expected (N, 4, *) for GroupNorm(2 groups, 4 channels)"
    );
    // A failed load changes nothing.
    let mut bad = gn.state_dict();
    bad.insert("bias".into(), ArrayD::zeros(ndarray::IxDyn(&[5])));
    bad.insert("weight".into(), ArrayD::from_elem(ndarray::IxDyn(&[4]), 9.0));
    assert!(gn.load_state_dict(&bad, true).is_err());
    assert_eq!(
        gn.weight().unwrap().value,
        ArrayD::from_elem(ndarray::IxDyn(&[4]), 1.0)
    );
}

#[test]
fn backward_without_dx_still_gives_parameter_gradients() {
    // x a constant: the node is asked for the parameters' gradients only.
    let tape = Tape::<f64>::new();
    let x = tape.constant(normal(&[3, 4, 5], 0.0, 1.0, 15));
    let (w, b) = (tape.var(channel(4, 1.0, 16)), tape.var(channel(4, 0.0, 17)));
    let y = group_norm(x, 2, Some(w), Some(b), 1e-5).unwrap();
    let dout = normal(&[3, 4, 5], 0.0, 1.0, 18);
    let grads = y.backward_with(dout.clone()).unwrap();
    let tape2 = Tape::<f64>::new();
    let x2 = tape2.var(x.value().as_ref().clone());
    let (w2, b2) = (tape2.var(channel(4, 1.0, 16)), tape2.var(channel(4, 0.0, 17)));
    let y2 = group_norm(x2, 2, Some(w2), Some(b2), 1e-5).unwrap();
    let grads2 = y2.backward_with(dout).unwrap();
    assert_eq!(grads.wrt(w).unwrap(), grads2.wrt(w2).unwrap());
    assert_eq!(grads.wrt(b).unwrap(), grads2.wrt(b2).unwrap());
}
