//! The fused LayerNorm and GroupNorm nodes against the same computations composed from tape
//! primitives, over random shapes, groups and affine settings, with random upstream gradients
//! (proptest).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use layers::{group_norm, group_norm_composed, layer_norm, layer_norm_composed};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use tape::{Tape, Var};

fn normal(shape: &[usize], mean: f64, std: f64, rng: &mut StdRng) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let z: f64 = StandardNormal.sample(&mut *rng);
        mean + std * z
    })
}

/// Max abs difference over the largest magnitude of `b` (at least 1).
fn error(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The output and every input's gradient, for the fused (`false`) and the composed form.
fn compare(
    inputs: &[ArrayD<f64>],
    run: impl for<'t> Fn(&[Var<'t, f64>], bool) -> Var<'t, f64>,
    seed: u64,
) -> Result<(), TestCaseError> {
    let results = [false, true].map(|composed| {
        let tape = Tape::new();
        let vars: Vec<_> = inputs.iter().map(|x| tape.var(x.clone())).collect();
        let y = run(&vars, composed);
        let dout = normal(&y.shape(), 0.0, 1.0, &mut StdRng::seed_from_u64(seed));
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

/// `x`, then the weight and the bias of `parameter_shape` where asked for.
fn inputs(
    x: &[usize],
    parameter_shape: &[usize],
    (weight, bias): (bool, bool),
    seed: u64,
) -> Vec<ArrayD<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut all = vec![normal(x, 1.5, 2.0, &mut rng)];
    if weight {
        all.push(normal(parameter_shape, 1.0, 0.5, &mut rng));
    }
    if bias {
        all.push(normal(parameter_shape, 0.0, 1.0, &mut rng));
    }
    all
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn layer_norm_fused_and_composed_agree(
        leading in prop::collection::vec(1usize..=4, 0..=2),
        normalized in prop::collection::vec(1usize..=7, 1..=2),
        affine in (any::<bool>(), any::<bool>()),
        seed in any::<u64>(),
    ) {
        let shape: Vec<usize> = leading.iter().chain(&normalized).copied().collect();
        let inputs = inputs(&shape, &normalized, affine, seed);
        compare(&inputs, |v, composed| {
            let (weight, bias) = match affine {
                (true, true) => (Some(v[1]), Some(v[2])),
                (true, false) => (Some(v[1]), None),
                (false, true) => (None, Some(v[1])),
                (false, false) => (None, None),
            };
            let f = if composed { layer_norm_composed } else { layer_norm };
            f(v[0], &normalized, weight, bias, 1e-5).unwrap()
        }, seed ^ 1)?;
    }

    #[test]
    fn group_norm_fused_and_composed_agree(
        n in 1usize..=3,
        (groups, per_group) in (1usize..=4, 1usize..=3),
        spatial in prop::collection::vec(1usize..=4, 0..=2),
        affine in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let c = groups * per_group;
        let shape: Vec<usize> = [n, c].iter().chain(&spatial).copied().collect();
        let inputs = inputs(&shape, &[c], (affine, affine), seed);
        compare(&inputs, |v, composed| {
            let (weight, bias) = if affine { (Some(v[1]), Some(v[2])) } else { (None, None) };
            let f = if composed { group_norm_composed } else { group_norm };
            f(v[0], groups, weight, bias, 1e-5).unwrap()
        }, seed ^ 1)?;
    }
}
