use ndarray::{ArrayD, ArrayViewD, array};

use crate::{BackwardArgs, Function, Result, Tape, TapeError};

/// `y = x`, recording a constant on its own tape in forward and in backward.
struct RecordsOnItsTape {
    tape: std::rc::Rc<Tape<f64>>,
}

impl Function<f64> for RecordsOnItsTape {
    fn name(&self) -> &str {
        "records"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, f64>]) -> Result<ArrayD<f64>> {
        let _ = self.tape.constant(array![1.0]);
        Ok(inputs[0].to_owned())
    }
    fn backward(&self, args: &BackwardArgs<'_, f64>) -> Result<Vec<Option<ArrayD<f64>>>> {
        let _ = self.tape.constant(array![2.0]);
        Ok(vec![Some(args.grad_output.to_owned())])
    }
}

#[test]
fn scalar_takes_a_one_element_value_only() {
    let tape = Tape::<f64>::new();
    assert_eq!(tape.var(array![[2.5]]).scalar(), 2.5);
    let error = tape.var(array![1.0, 2.0]).try_scalar().unwrap_err();
    assert_eq!(
        error.to_string(),
        "scalar: the Var has shape [2], expected one element (value() gives every element)"
    );
    assert!(tape.var(ndarray::Array1::<f64>::zeros(0)).try_scalar().is_err());
    let panic = std::panic::catch_unwind(|| Tape::<f64>::new().var(array![1.0, 2.0]).scalar());
    assert!(panic.is_err());
}

#[test]
fn an_op_may_record_on_its_tape_in_forward_and_backward() {
    let tape = std::rc::Rc::new(Tape::<f64>::new());
    let x = tape.var(array![1.0, 2.0]);
    let op = RecordsOnItsTape {
        tape: std::rc::Rc::clone(&tape),
    };
    let y = tape.apply(op, &[x]).unwrap();
    let grads = (y * y).sum().backward().unwrap();
    assert_eq!(grads.wrt(x).unwrap(), &array![2.0, 4.0].into_dyn());
    // x, the forward's constant, y, y·y, the sum, and the backward's constant.
    assert_eq!(tape.len(), 6);
}

#[test]
fn backward_needs_a_scalar_or_an_upstream_gradient() {
    let tape = Tape::<f64>::new();
    let x = tape.var(array![1.0, 2.0]);
    let y = x * x;
    assert_eq!(
        y.backward().unwrap_err().to_string(),
        "backward() needs a scalar (one-element) output, got shape [2]; use backward_with(grad) to give an upstream gradient"
    );
    let grads = y.backward_with(array![3.0, -1.0]).unwrap();
    assert_eq!(grads.wrt(x).unwrap(), &array![6.0, -4.0].into_dyn());
    assert!(matches!(
        y.backward_with(array![1.0, 2.0, 3.0]),
        Err(TapeError::GradientShape { expected, got, .. }) if expected == vec![2] && got == vec![3]
    ));
}

#[test]
fn intermediate_nodes_keep_their_gradients_and_unused_vars_have_none() {
    let tape = Tape::<f64>::new();
    let x = tape.var(array![1.0, -2.0]);
    let unused = tape.var(array![5.0]);
    let c = tape.constant(array![2.0, 2.0]);
    let h = x * c;
    let loss = h.sum();
    let grads = loss.backward().unwrap();
    assert_eq!(grads.wrt(h).unwrap(), &array![1.0, 1.0].into_dyn());
    assert_eq!(grads.wrt(x).unwrap(), &array![2.0, 2.0].into_dyn());
    assert!(matches!(grads.wrt(unused), Err(TapeError::NoGradient { .. })));
    assert!(grads.get(c).is_none());
    assert!(!c.requires_grad() && h.requires_grad());
    assert_eq!(grads.get_id(x.id()), grads.get(x));
    assert_eq!(tape.get(x.id()).map(|v| v.index()), Some(x.index()));
    assert!(
        Tape::<f64>::new().get(x.id()).is_none(),
        "an id only resolves on its own tape"
    );
}

#[test]
fn saved_bytes_counts_op_values_not_leaves() {
    let tape = Tape::<f32>::new();
    let x = tape.var(ArrayD::<f32>::zeros(vec![10, 4]));
    assert_eq!(tape.saved_bytes(), 0);
    let _ = (x * x).sum();
    assert_eq!(tape.saved_bytes(), 40 * 4 + 4);
}

/// A custom op whose backward breaks the contract in a chosen way.
struct Broken {
    gradients: usize,
    shape: Vec<usize>,
}

impl Function<f64> for Broken {
    fn name(&self) -> &str {
        "broken"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, f64>]) -> Result<ArrayD<f64>> {
        Ok(inputs[0].to_owned())
    }
    fn backward(&self, _: &BackwardArgs<'_, f64>) -> Result<Vec<Option<ArrayD<f64>>>> {
        Ok(vec![Some(ArrayD::zeros(self.shape.clone())); self.gradients])
    }
}

#[test]
fn a_custom_op_returning_bad_gradients_is_caught() {
    let tape = Tape::<f64>::new();
    let x = tape.var(array![1.0, 2.0]);
    let y = tape
        .apply(
            Broken {
                gradients: 2,
                shape: vec![2],
            },
            &[x],
        )
        .unwrap();
    assert_eq!(
        y.sum().backward().unwrap_err().to_string(),
        "broken: backward returned 2 gradients, expected 1 (one per input, None where not needed)"
    );
    let y = tape
        .apply(
            Broken {
                gradients: 1,
                shape: vec![3],
            },
            &[x],
        )
        .unwrap();
    assert_eq!(
        y.sum().backward().unwrap_err().to_string(),
        "broken: gradient for input 0 has shape [3], expected [2]"
    );
}

#[test]
fn nodes_can_be_listed_with_their_ops_and_inputs() {
    let tape = Tape::<f64>::new();
    let x = tape.var(array![1.0, 2.0]);
    let c = tape.constant(array![3.0, 4.0]);
    let _ = (x * c).sum();
    let listing: Vec<(String, Vec<usize>)> = tape.vars().iter().map(|v| (v.op_name(), v.inputs())).collect();
    assert_eq!(
        listing,
        vec![
            ("var".into(), vec![]),
            ("const".into(), vec![]),
            ("mul".into(), vec![0, 1]),
            ("sum".into(), vec![2])
        ]
    );
}

#[test]
fn the_graph_draws_in_dot() {
    let tape = Tape::<f64>::new();
    let x = tape.var(array![1.0, 2.0]);
    let c = tape.constant(array![3.0, 4.0]);
    let _ = (x * c).sum();
    let dot = tape.to_dot();
    for needle in [
        "#0 var\\n[2]",
        "#1 const",
        "#2 mul\\n[2]",
        "#3 sum\\n[]",
        "n0 -> n2",
        "n1 -> n2",
        "n2 -> n3",
    ] {
        assert!(dot.contains(needle), "{needle} missing from\n{dot}");
    }
    assert!(!dot.contains("cluster"));
    // A recorded backward: its nodes in a box of their own, reading the forward's.
    let y = (x * x).sum();
    let options = crate::GradOptions {
        create_graph: true,
        ..Default::default()
    };
    let before = tape.len();
    tape.grad(y, &[x], options).unwrap();
    assert_eq!(tape.recorded_backwards(), vec![(before..tape.len())]);
    let dot = tape.to_dot();
    let cluster = &dot[dot.find("subgraph cluster_backward_0").unwrap()..];
    let cluster = &cluster[..cluster.find("  }").unwrap()];
    assert!(cluster.contains("recorded backward 1"), "{dot}");
    for index in before..tape.len() {
        assert!(
            cluster.contains(&format!("  n{index} [")),
            "n{index} outside the box:\n{dot}"
        );
    }
    assert!(!cluster.contains(&format!("  n{} [", before - 1)));
}

#[test]
fn a_no_grad_tape_computes_the_same_values_and_keeps_nothing_for_backward() {
    let run = |tape: &Tape<f64>| {
        let w = tape.var(array![[0.5, -1.0], [2.0, 0.25]]);
        let x = tape.constant(array![[1.0, 2.0], [3.0, -4.0]]);
        let y = x.matmul(w).unwrap().tanh() * w;
        (
            y.value().as_ref().clone(),
            tape.saved_bytes(),
            y.requires_grad(),
            y.sum().backward(),
        )
    };
    let (recorded, saved, requires_grad, grads) = run(&Tape::new());
    assert!(saved > 0 && requires_grad && grads.is_ok());
    let tape = Tape::no_grad();
    assert!(!tape.records());
    let (value, saved, requires_grad, grads) = run(&tape);
    assert_eq!(value, recorded);
    assert_eq!(saved, 0);
    assert!(!requires_grad);
    assert!(matches!(grads, Err(TapeError::NotRecorded)));
    assert_eq!(
        TapeError::NotRecorded.to_string(),
        "backward on a tape made with Tape::no_grad(), which records no graph; use Tape::new() to compute gradients"
    );
}
