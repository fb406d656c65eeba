use ndarray::{ArrayD, array};
use tape::{GradCheck, Tape, check_gradients};

use super::*;
use crate::batch_norm::testing::{normal, on_1_2_3_threads};
use crate::{Mode, Module};

type Pool = for<'t> fn(Var<'t, f64>, Window2d) -> Result<Var<'t, f64>>;

const FUSED: [(&str, Pool, Pool); 2] = [
    ("max", max_pool2d::<f64>, max_pool2d_composed::<f64>),
    ("avg", avg_pool2d::<f64>, avg_pool2d_composed::<f64>),
];

/// Windows over overlapping, strided, padded and dilated taps.
fn cases() -> [([usize; 4], Window2d); 6] {
    [
        ([2, 3, 6, 6], Window2d::new([2, 2]).with_stride([2, 2])),
        ([1, 2, 7, 5], Window2d::new([3, 3])),
        (
            [2, 2, 7, 7],
            Window2d::new([3, 3]).with_stride([2, 2]).with_padding([1, 1]),
        ),
        (
            [1, 3, 9, 8],
            Window2d::new([3, 2]).with_dilation([2, 3]).with_padding([2, 1]),
        ),
        (
            [3, 1, 5, 9],
            Window2d::new([1, 4]).with_stride([1, 3]).with_padding([0, 2]),
        ),
        ([0, 2, 4, 4], Window2d::new([2, 2])),
    ]
}

/// Output and `dx` of `pool` on `x` with a random upstream gradient.
fn run(pool: Pool, x: &ArrayD<f64>, window: Window2d, seed: u64) -> [ArrayD<f64>; 2] {
    let tape = Tape::new();
    let xv = tape.var(x.clone());
    let y = pool(xv, window).unwrap();
    let grads = y.backward_with(normal(&y.shape(), 0.0, 1.0, seed)).unwrap();
    [y.value().as_ref().clone(), grads.wrt(xv).unwrap().clone()]
}

#[test]
fn fused_and_composed_agree() {
    for (i, (shape, window)) in cases().into_iter().enumerate() {
        let x = normal(&shape, 0.0, 1.0, i as u64);
        for (name, fused, composed) in FUSED {
            let [f, c] = [fused, composed].map(|pool| run(pool, &x, window, 100 + i as u64));
            for (what, f, c) in [("out", &f[0], &c[0]), ("dx", &f[1], &c[1])] {
                assert_eq!(f.shape(), c.shape(), "case {i} {name} {what}");
                let error = f.iter().zip(c).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
                assert!(error <= 1e-12, "case {i} {name} {what}: {error:e}");
            }
        }
    }
}

#[test]
fn fused_and_composed_pass_the_gradient_checker() {
    for (i, (shape, window)) in cases().into_iter().enumerate().take(5) {
        // Distinct values, so that no arg-max is a tie within the checker's step.
        let x = normal(&shape, 0.0, 1.0, 20 + i as u64);
        for (_, fused, composed) in FUSED {
            for pool in [fused, composed] {
                check_gradients(|_, v| Ok(pool(v[0], window)?), std::slice::from_ref(&x)).unwrap();
            }
        }
    }
}

#[test]
fn max_pads_with_minus_infinity_and_ties_go_to_the_first() {
    let tape = Tape::<f64>::new();
    // All values negative: a zero padding would win; -∞ never does.
    let x = tape.var(array![[[[-3.0, -1.0, -1.0], [-2.0, -5.0, -4.0]]]].into_dyn());
    let window = Window2d::new([2, 2]).with_stride([2, 2]).with_padding([0, 1]);
    let y = max_pool2d(x, window).unwrap();
    assert_eq!(*y.value(), array![[[[-2.0, -1.0]]]].into_dyn());
    let grads = y.backward_with(array![[[[2.0, 3.0]]]].into_dyn()).unwrap();
    // The second window holds -1.0 twice: the first (row-major) gets the gradient.
    assert_eq!(
        *grads.wrt(x).unwrap(),
        array![[[[0.0, 3.0, 0.0], [2.0, 0.0, 0.0]]]].into_dyn()
    );
}

#[test]
fn max_propagates_nan_and_overlapping_windows_add_up() {
    let tape = Tape::<f64>::new();
    let x = tape.var(array![[[[1.0, f64::NAN, 0.0, 9.0]]]].into_dyn());
    let y = max_pool2d(x, Window2d::new([1, 2])).unwrap();
    let out = y.value();
    assert!(out[[0, 0, 0, 0]].is_nan() && out[[0, 0, 0, 1]].is_nan());
    assert_eq!(out[[0, 0, 0, 2]], 9.0);
    let grads = y.backward_with(array![[[[1.0, 2.0, 4.0]]]].into_dyn()).unwrap();
    assert_eq!(
        *grads.wrt(x).unwrap(),
        array![[[[0.0, 3.0, 0.0, 4.0]]]].into_dyn()
    );
}

#[test]
fn avg_counts_the_padding() {
    let tape = Tape::<f64>::new();
    let x = tape.var(array![[[[1.0, 2.0], [3.0, 6.0]]]].into_dyn());
    let y = avg_pool2d(x, Window2d::new([3, 3]).with_padding([1, 1])).unwrap();
    // Every window holds all four values and five zeros: each output is 12 / 9.
    assert_eq!(*y.value(), ArrayD::from_elem(vec![1, 1, 2, 2], 12.0 / 9.0));
    let grads = y
        .backward_with(array![[[[9.0, 18.0], [27.0, 36.0]]]].into_dyn())
        .unwrap();
    assert_eq!(*grads.wrt(x).unwrap(), ArrayD::from_elem(vec![1, 1, 2, 2], 10.0));
}

/// The fused max pool with one input gradient off by 1%.
struct Skewed(node::PoolNode);

impl tape::Function<f64> for Skewed {
    fn name(&self) -> &str {
        "skewed"
    }
    fn forward(&mut self, inputs: &[ndarray::ArrayViewD<'_, f64>]) -> tape::Result<ArrayD<f64>> {
        self.0.forward(inputs)
    }
    fn backward(&self, args: &tape::BackwardArgs<'_, f64>) -> tape::Result<Vec<Option<ArrayD<f64>>>> {
        let mut grads = self.0.backward(args)?;
        if let Some(dx) = grads[0].as_mut() {
            dx.iter_mut()
                .filter(|g| **g != 0.0)
                .take(1)
                .for_each(|g| *g *= 1.01);
        }
        Ok(grads)
    }
}

#[test]
fn the_gradient_checker_catches_a_slightly_wrong_backward() {
    let x = normal(&[1, 2, 4, 4], 0.0, 1.0, 5);
    let window = Window2d::new([2, 2]);
    for kind in [node::Kind::Max, node::Kind::Avg] {
        let geometry = check("pool", x.shape(), &window).unwrap();
        let run = |skew: bool| {
            GradCheck::default().run(
                |tape, v| {
                    let node = node::PoolNode::new(kind, geometry);
                    if skew {
                        tape.apply(Skewed(node), v)
                    } else {
                        tape.apply(node, v)
                    }
                },
                std::slice::from_ref(&x),
            )
        };
        assert!(run(false).is_ok(), "{kind:?}");
        assert!(run(true).is_err(), "{kind:?}");
    }
}

#[test]
fn results_are_bit_identical_on_any_number_of_threads() {
    // Large enough for the blocks to run in parallel.
    let x = normal(&[8, 16, 30, 30], 0.0, 1.0, 1).mapv(|v| v as f32);
    let window = Window2d::new([3, 3]).with_stride([2, 2]).with_padding([1, 1]);
    let dout = normal(&[8, 16, 15, 15], 0.0, 1.0, 2).mapv(|v| v as f32);
    type Pool32 = for<'t> fn(Var<'t, f32>, Window2d) -> Result<Var<'t, f32>>;
    for pool in [max_pool2d::<f32> as Pool32, avg_pool2d::<f32>] {
        let run = || {
            let tape = Tape::<f32>::new();
            let xv = tape.var(x.clone());
            let y = pool(xv, window).unwrap();
            let grads = y.backward_with(dout.clone()).unwrap();
            [y.value().as_ref().clone(), grads.wrt(xv).unwrap().clone()]
        };
        let results = on_1_2_3_threads(run);
        assert_eq!(results[0], results[1]);
        assert_eq!(results[0], results[2]);
    }
}

#[test]
fn max_keeps_its_arg_max_and_avg_nothing() {
    let tape = Tape::<f32>::new();
    let x = tape.var(ndarray::Array4::<f32>::ones((2, 3, 8, 8)));
    let window = Window2d::new([2, 2]).with_stride([2, 2]);
    let before = tape.saved_bytes();
    max_pool2d(x, window).unwrap();
    let out_bytes = 2 * 3 * 4 * 4 * 4;
    let usize_bytes = std::mem::size_of::<usize>();
    assert_eq!(
        tape.saved_bytes() - before,
        out_bytes + 2 * 3 * 4 * 4 * usize_bytes
    );
    let before = tape.saved_bytes();
    avg_pool2d(x, window).unwrap();
    assert_eq!(tape.saved_bytes() - before, out_bytes);
}

#[test]
fn bad_inputs_are_errors() {
    let tape = Tape::<f64>::new();
    let x = tape.var(normal(&[2, 3, 4, 4], 0.0, 1.0, 1));
    let error = |x, window| max_pool2d(x, window).unwrap_err().to_string();
    assert_eq!(
        error(x, Window2d::new([2, 2]).with_stride([0, 2])),
        "max_pool2d: the stride must be at least 1 in each dimension, got [0, 2]"
    );
    assert_eq!(
        error(x, Window2d::new([5, 2])),
        "max_pool2d: the input has shape [2, 3, 4, 4], expected a height and width of at least \
         the kernel's span 5x2 once padded by [0, 0] on each side (kernel [5, 2], dilation [1, 1])"
    );
    assert_eq!(
        error(x, Window2d::new([2, 2]).with_padding([2, 0])),
        "max_pool2d: the padding must be at most half the kernel's span (dilation·(kernel - 1) + \
         1) on each axis, got padding [2, 0] for kernel [2, 2] and dilation [1, 1]"
    );
    let flat = tape.var(normal(&[2, 3, 4], 0.0, 1.0, 2));
    assert!(error(flat, Window2d::new([2, 2])).contains("expected rank 4"));
    let empty = tape.var(normal(&[2, 3, 0, 4], 0.0, 1.0, 2));
    assert!(
        avg_pool2d(empty, Window2d::new([2, 2]).with_padding([1, 1]))
            .unwrap_err()
            .to_string()
            .contains("a height and width of at least 1")
    );
}

#[test]
fn the_layers_pool_as_pytorchs_defaults() {
    let tape = Tape::<f64>::new();
    let x = tape.constant(normal(&[2, 3, 8, 6], 0.0, 1.0, 3));
    let mut max = MaxPool2d::new([2, 2]);
    let mut avg = AvgPool2d::new([2, 3]);
    assert_eq!(max.forward(x, Mode::Train).unwrap().shape(), vec![2, 3, 4, 3]);
    assert_eq!(avg.forward(x, Mode::Eval).unwrap().shape(), vec![2, 3, 4, 2]);
    assert!(Module::<f64>::parameters(&max).is_empty());
    assert_eq!(Module::<f64>::describe(&avg), "AvgPool2d(2x3)");
    let strided = MaxPool2d::with_window(Window2d::new([3, 3]).with_stride([2, 2]));
    assert_eq!(Module::<f64>::describe(&strided), "MaxPool2d(3x3, stride [2, 2])");
}
