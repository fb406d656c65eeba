//! Property tests: binary ops over random broadcast-compatible shapes, in both directions.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use ndarray::{ArrayD, Dimension, IxDyn};
use proptest::prelude::*;
use tape::{GradCheck, Tape, broadcast_shape};

/// A shape of rank 0..=3 with sizes 1..=3, and a second shape broadcast-compatible with it:
/// a suffix of it (fewer leading axes) with some sizes replaced by 1, in either order.
fn compatible_shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        prop::collection::vec(1usize..=3, 0..=3),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(full, bits, swap)| {
            let dropped = (bits % (full.len() as u64 + 1)) as usize;
            let other: Vec<usize> = full[dropped..]
                .iter()
                .enumerate()
                .map(|(i, &size)| if (bits >> (8 + i)) & 1 == 1 { 1 } else { size })
                .collect();
            if swap { (other, full) } else { (full, other) }
        })
}

/// Deterministic values in `[offset, offset + 1)`, distinct per element.
fn values(shape: &[usize], seed: u64, offset: f64) -> ArrayD<f64> {
    ArrayD::from_shape_fn(IxDyn(shape), |index| {
        let flat = index
            .as_array_view()
            .iter()
            .fold(0u64, |acc, &i| acc * 7 + i as u64 + 1);
        offset + (flat.wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f64 / 1000.0
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn binary_ops_broadcast_like_ndarray_and_their_gradients_check(
        (a, b) in compatible_shapes(),
        seed in any::<u64>(),
    ) {
        let x = values(&a, seed, -0.5);
        let y = values(&b, seed ^ 0xdead_beef, 0.5); // positive: a safe divisor
        let expected_shape = broadcast_shape("test", &a, &b).unwrap();

        let tape = Tape::<f64>::new();
        let (vx, vy) = (tape.var(x.clone()), tape.var(y.clone()));
        let sum = vx.try_add(vy).unwrap();
        prop_assert_eq!(sum.shape(), expected_shape.clone());
        prop_assert_eq!(&*sum.value(), &(&x + &y));
        prop_assert_eq!(&*vx.try_mul(vy).unwrap().value(), &(&x * &y));

        // Gradients have each operand's own shape, whatever the broadcast did.
        let grads = vx.try_div(vy).unwrap().backward_with(ArrayD::ones(expected_shape)).unwrap();
        prop_assert_eq!(grads.wrt(vx).unwrap().shape(), a.as_slice());
        prop_assert_eq!(grads.wrt(vy).unwrap().shape(), b.as_slice());

        let check = GradCheck { seed, ..GradCheck::default() };
        let inputs = [x, y];
        for (name, result) in [
            ("add", check.run(|_, v| v[0].try_add(v[1]), &inputs)),
            ("sub", check.run(|_, v| v[0].try_sub(v[1]), &inputs)),
            ("mul", check.run(|_, v| v[0].try_mul(v[1]), &inputs)),
            ("div", check.run(|_, v| v[0].try_div(v[1]), &inputs)),
        ] {
            prop_assert!(result.is_ok(), "{} {:?} {:?}: {}", name, a, b, result.unwrap_err());
        }
    }

    #[test]
    fn summing_a_gradient_back_preserves_its_total((a, b) in compatible_shapes(), seed in any::<u64>()) {
        let shape = broadcast_shape("test", &a, &b).unwrap();
        let grad = values(&shape, seed, -0.5);
        let reduced = tape::sum_to_shape(grad.clone(), &a).unwrap();
        prop_assert_eq!(reduced.shape(), a.as_slice());
        prop_assert!((reduced.sum() - grad.sum()).abs() <= 1e-9 * (1.0 + grad.sum().abs()));
    }

    #[test]
    fn incompatible_shapes_are_errors_not_panics(a in prop::collection::vec(2usize..=4, 1..=3), extra in 1usize..=3) {
        let mut b = a.clone();
        let last = b.len() - 1;
        b[last] += extra; // the trailing sizes now differ and neither is 1
        let tape = Tape::<f32>::new();
        let x = tape.var(ArrayD::<f32>::zeros(IxDyn(&a)));
        let y = tape.var(ArrayD::<f32>::zeros(IxDyn(&b)));
        prop_assert!(x.try_add(y).is_err());
        prop_assert!(x.try_div(y).is_err());
    }
}
