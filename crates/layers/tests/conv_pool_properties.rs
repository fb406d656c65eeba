//! The fused conv2d and pooling nodes against the same computations composed from tape
//! primitives, over random shapes, strides, paddings, dilations and groups, with random upstream
//! gradients (proptest).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use layers::{avg_pool2d, avg_pool2d_composed, conv2d, conv2d_composed};
use layers::{max_pool2d, max_pool2d_composed};
use ndarray::ArrayD;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use support::{conv_case, error, normal, window};
use tape::{Tape, Var};

/// Results of the fused and the composed forms on the same inputs and upstream gradient.
fn compare(
    inputs: &[ArrayD<f64>],
    run: impl for<'t> Fn(&[Var<'t, f64>], bool) -> Var<'t, f64>,
    seed: u64,
) -> Result<(), TestCaseError> {
    let results = [false, true].map(|composed| {
        let tape = Tape::new();
        let vars: Vec<_> = inputs.iter().map(|x| tape.var(x.clone())).collect();
        let y = run(&vars, composed);
        let dout = normal(&y.shape(), &mut StdRng::seed_from_u64(seed));
        let grads = y.backward_with(dout).unwrap();
        let mut all = vec![y.value().as_ref().clone()];
        all.extend(vars.iter().map(|&v| grads.wrt(v).unwrap().clone()));
        all
    });
    for (i, (f, c)) in results[0].iter().zip(&results[1]).enumerate() {
        prop_assert_eq!(f.shape(), c.shape());
        let e = error(f, c);
        prop_assert!(
            e <= 1e-12,
            "result {} (0: output, then each input's gradient): {:e}",
            i,
            e
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn conv2d_fused_and_composed_agree(
        (window, input) in window(),
        n in 0usize..=3,
        groups in 1usize..=3,
        c_in_per_group in 1usize..=3,
        c_out_per_group in 1usize..=3,
        bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let groups = (groups, c_in_per_group, c_out_per_group);
        let (options, inputs) = conv_case((window, input), n, groups, bias, seed);
        compare(&inputs, |v, composed| {
            let f = if composed { conv2d_composed } else { conv2d };
            f(v[0], v[1], v.get(2).copied(), options).unwrap()
        }, seed ^ 1)?;
    }

    #[test]
    fn pools_fused_and_composed_agree(
        (window, input) in window(),
        n in 0usize..=3,
        c in 1usize..=3,
        seed in any::<u64>(),
    ) {
        let x = normal(&[n, c, input[0], input[1]], &mut StdRng::seed_from_u64(seed));
        let inputs = [x];
        compare(&inputs, |v, composed| {
            let f = if composed { max_pool2d_composed } else { max_pool2d };
            f(v[0], window).unwrap()
        }, seed ^ 1)?;
        compare(&inputs, |v, composed| {
            let f = if composed { avg_pool2d_composed } else { avg_pool2d };
            f(v[0], window).unwrap()
        }, seed ^ 2)?;
    }

    /// Ties: values from a few integers, so windows often hold equal maxima; both forms pick the
    /// same (first) one.
    #[test]
    fn max_pool_ties_go_to_the_same_tap(
        (window, input) in window(),
        seed in any::<u64>(),
    ) {
        let x = normal(&[2, 2, input[0], input[1]], &mut StdRng::seed_from_u64(seed)).mapv(f64::round);
        compare(&[x], |v, composed| {
            let f = if composed { max_pool2d_composed } else { max_pool2d };
            f(v[0], window).unwrap()
        }, seed ^ 3)?;
    }
}
