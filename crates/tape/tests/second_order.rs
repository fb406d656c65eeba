//! Gradients recorded on the tape (`Tape::grad` with `create_graph`) and differentiated again,
//! against central differences of the first derivative.
#![allow(clippy::unwrap_used)]

use ndarray::{ArrayD, IxDyn, array};
use tape::{GradOptions, Tape, TapeError, Var};

fn recorded() -> GradOptions<f64> {
    GradOptions {
        create_graph: true,
        upstream: None,
    }
}

/// `∂/∂x (∂f/∂x · v)` by the tape, and by central differences of `∂f/∂x` along `v`.
fn hvp(
    f: impl for<'t> Fn(Var<'t, f64>) -> Var<'t, f64>,
    x: &ArrayD<f64>,
    v: &ArrayD<f64>,
) -> (ArrayD<f64>, ArrayD<f64>) {
    let tape = Tape::new();
    let xv = tape.var(x.clone());
    let g = tape.grad(f(xv), &[xv], recorded()).unwrap()[0].unwrap();
    let analytic = (g * tape.constant(v.clone()))
        .sum()
        .backward()
        .unwrap()
        .wrt(xv)
        .unwrap()
        .clone();
    let gradient = |x: ArrayD<f64>| {
        let tape = Tape::new();
        let xv = tape.var(x);
        f(xv).backward().unwrap().wrt(xv).unwrap().clone()
    };
    let h = 1e-5;
    let numeric = (gradient(x + &(v * h)) - gradient(x - &(v * h))) / (2.0 * h);
    (analytic, numeric)
}

fn close(a: &ArrayD<f64>, b: &ArrayD<f64>) -> bool {
    a.iter()
        .zip(b)
        .all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs()))
}

#[test]
fn hessian_vector_products_of_primitives_match_finite_differences() {
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.3, 1.2, 0.7, 1.9, 0.5, 1.4]).unwrap();
    let v = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.4, -1.1, 0.9, 0.2, -0.6, 1.3]).unwrap();
    type F = for<'t> fn(Var<'t, f64>) -> Var<'t, f64>;
    let cases: [(&str, F); 17] = [
        ("exp", |x| x.exp().sum()),
        ("ln", |x| x.ln().sum()),
        ("sqrt", |x| x.sqrt().sum()),
        ("powf", |x| x.powf(2.5).sum()),
        ("powi", |x| x.powi(-2).sum()),
        ("sigmoid", |x| x.sigmoid().sum()),
        ("tanh of a product", |x| (x.tanh() * x).sum()),
        ("quotient and mean", |x| (x.exp() / (x + 1.0)).mean()),
        ("matmul", |x| {
            let w = x.tape().constant(array![[0.5, -1.0], [2.0, 0.3], [-0.7, 1.1]]);
            x.matmul(w).unwrap().tanh().powi(2).sum()
        }),
        ("matmul of batches", |x| {
            let batch = x.reshape(&[2, 1, 3]).unwrap().broadcast_to(&[2, 2, 3]).unwrap();
            let product = batch.matmul(x.swap_last_axes().unwrap()).unwrap(); // (2, 2, 2)
            product.sigmoid().sum()
        }),
        ("broadcasting", |x| {
            let row = x.mean_axes(&[0], true).unwrap(); // (1, 3)
            (x * row).tanh().sum() + (x / row.exp()).sum()
        }),
        ("transpose and reshape", |x| {
            let t = x.transpose().unwrap().reshape(&[3, 2]).unwrap();
            t.matmul(x).unwrap().powi(2).mean()
        }),
        ("max over an axis", |x| {
            (x * x).max_axis(1, false).unwrap().exp().sum()
        }),
        ("relu and abs", |x| {
            ((x - 1.0).relu() * x + (x - 0.8).abs() * x).sum()
        }),
        ("scalars", |x| (2.0 / x + x * 3.0 - x / 4.0 + 1.5).powi(2).sum()),
        ("unfold", |x| {
            let image = x.reshape(&[1, 1, 2, 3]).unwrap();
            let cols = image
                .unfold(tape::ops::unfold::Window2d::new([2, 2]).with_padding([1, 1]))
                .unwrap();
            (cols * cols.sigmoid()).sum()
        }),
        ("neg and sub", |x| (-(x.exp()) - x.powi(3)).sum()),
    ];
    for (name, f) in cases {
        let (analytic, numeric) = hvp(f, &x, &v);
        assert!(close(&analytic, &numeric), "{name}: {analytic} vs {numeric}");
    }
}

#[test]
fn an_op_without_a_recorded_backward_is_named() {
    struct Cube;
    impl tape::Function<f64> for Cube {
        fn name(&self) -> &str {
            "cube"
        }
        fn forward(&mut self, inputs: &[ndarray::ArrayViewD<'_, f64>]) -> tape::Result<ArrayD<f64>> {
            Ok(inputs[0].mapv(|x| x * x * x))
        }
        fn backward(&self, args: &tape::BackwardArgs<'_, f64>) -> tape::Result<Vec<Option<ArrayD<f64>>>> {
            Ok(vec![Some(
                &args.grad_output * &args.inputs[0].mapv(|x| 3.0 * x * x),
            )])
        }
    }
    let tape = Tape::new();
    let x = tape.var(array![1.0, 2.0]);
    let y = tape.apply(Cube, &[x]).unwrap().sum();
    assert!(matches!(tape.grad(y, &[x], recorded()), Err(TapeError::NoGraphRule { op }) if op == "cube"));
    // Once, without create_graph, it works.
    let once = tape.grad(y, &[x], GradOptions::default()).unwrap()[0].unwrap();
    assert_eq!(once.value().as_ref(), &array![3.0, 12.0].into_dyn());
}

#[test]
fn a_third_derivative_is_a_gradient_of_a_recorded_gradient() {
    // d/dx x⁴ = 4x³, d² = 12x², d³ = 24x.
    let tape = Tape::new();
    let x = tape.var(array![0.5, -2.0]);
    let first = tape.grad(x.powi(4).sum(), &[x], recorded()).unwrap()[0].unwrap();
    let second = tape.grad(first.sum(), &[x], recorded()).unwrap()[0].unwrap();
    assert_eq!(second.value().as_ref(), &array![3.0, 48.0].into_dyn());
    let third = second.sum().backward().unwrap();
    assert_eq!(third.wrt(x).unwrap(), &array![12.0, -48.0].into_dyn());
}

#[test]
fn without_create_graph_the_gradients_are_constants_with_backwards_values() {
    let tape = Tape::new();
    let x = tape.var(array![[1.0, 2.0], [3.0, 4.0]]);
    let y = (x * x).sum();
    let g = tape.grad(y, &[x], GradOptions::default()).unwrap()[0].unwrap();
    assert_eq!(g.value().as_ref(), &array![[2.0, 4.0], [6.0, 8.0]].into_dyn());
    assert!(!g.requires_grad());
    // An output of more than one element needs its upstream gradient.
    assert!(matches!(
        tape.grad(x * x, &[x], recorded()),
        Err(TapeError::NonScalarOutput { .. })
    ));
    let upstream = GradOptions {
        create_graph: true,
        upstream: Some(array![[1.0, 0.0], [0.5, 2.0]].into_dyn()),
    };
    let g = tape.grad(x * x, &[x], upstream).unwrap()[0].unwrap();
    assert_eq!(g.value().as_ref(), &array![[2.0, 0.0], [3.0, 16.0]].into_dyn());
}
