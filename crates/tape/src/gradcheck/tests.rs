use ndarray::{ArrayD, ArrayViewD, array};

use super::*;
use crate::testing::uniform;
use crate::{BackwardArgs, Function};

/// `y = x²` with a backward that is right, or off by a chosen factor at one element.
struct Square {
    wrong_factor_at_first: f64,
}

impl Function<f64> for Square {
    fn name(&self) -> &str {
        "square"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, f64>]) -> crate::Result<ArrayD<f64>> {
        Ok(inputs[0].mapv(|x| x * x))
    }
    fn backward(&self, args: &BackwardArgs<'_, f64>) -> crate::Result<Vec<Option<ArrayD<f64>>>> {
        let mut grad = &args.grad_output * &args.inputs[0].mapv(|x| 2.0 * x);
        if let Some(first) = grad.iter_mut().next() {
            *first *= self.wrong_factor_at_first;
        }
        Ok(vec![Some(grad)])
    }
}

#[test]
fn a_correct_custom_op_passes_and_reports_its_error() {
    let x = uniform(&[2, 3], 1);
    let report = check_gradients(
        |t, v| {
            t.apply(
                Square {
                    wrong_factor_at_first: 1.0,
                },
                v,
            )
        },
        &[x],
    )
    .unwrap();
    assert_eq!(report.checked, 6);
    assert_eq!(report.inputs[0].shape, vec![2, 3]);
    assert!(report.inputs[0].worst_ratio <= 1.0);
    assert!(
        report
            .to_string()
            .starts_with("gradient check passed: 6 elements")
    );
}

#[test]
fn a_deliberately_wrong_backward_fails_and_the_error_names_it() {
    let x = array![[0.5, -1.0, 1.5], [2.0, -0.7, 0.9]].into_dyn();
    // A 1% error in one element of the gradient is enough to fail.
    let error = check_gradients(
        |t, v| {
            t.apply(
                Square {
                    wrong_factor_at_first: 1.01,
                },
                v,
            )
        },
        &[x],
    )
    .unwrap_err();
    let GradCheckError::Mismatch {
        input,
        ref index,
        analytic,
        numeric,
        mismatches,
        checked,
        ..
    } = error
    else {
        panic!("expected a mismatch, got {error}");
    };
    assert_eq!(
        (input, index.as_slice(), mismatches, checked),
        (0, &[0, 0][..], 1, 6)
    );
    // The upstream weight w is random, so compare the ratio, not the values.
    approx::assert_relative_eq!(analytic / numeric, 1.01, max_relative = 1e-6);
    let message = error.to_string();
    assert!(
        message.contains("input 0 at index [0, 0]") && message.contains("1 of 6"),
        "{message}"
    );
}

#[test]
fn a_sign_error_is_caught_even_with_the_output_summed_by_random_weights() {
    // The gradient of BatchNorm-like centring, x - mean(x), is zero under w = 1: the checker
    // must use random weights to see that a backward that drops the mean term is wrong.
    struct CentreWithoutMeanTerm;
    impl Function<f64> for CentreWithoutMeanTerm {
        fn name(&self) -> &str {
            "centre"
        }
        fn forward(&mut self, inputs: &[ArrayViewD<'_, f64>]) -> crate::Result<ArrayD<f64>> {
            let mean = inputs[0].mean().unwrap_or(0.0);
            Ok(inputs[0].mapv(|x| x - mean))
        }
        fn backward(&self, args: &BackwardArgs<'_, f64>) -> crate::Result<Vec<Option<ArrayD<f64>>>> {
            Ok(vec![Some(args.grad_output.to_owned())]) // wrong: forgets -mean(g)
        }
    }
    let x = uniform(&[5], 4);
    assert!(matches!(
        check_gradients(|t, v| t.apply(CentreWithoutMeanTerm, v), &[x]),
        Err(GradCheckError::Mismatch { .. })
    ));
}

#[test]
fn errors_of_the_function_and_empty_inputs_are_reported() {
    assert!(matches!(
        check_gradients(|_, v| Ok(v[0]), &[]),
        Err(GradCheckError::NoInputs)
    ));
    let error = check_gradients(|_, v| v[0].reshape(&[7]), &[uniform(&[2, 3], 0)]).unwrap_err();
    assert!(
        matches!(error, GradCheckError::Function(TapeError::Reshape { .. })),
        "{error}"
    );
}

#[test]
fn settings_that_cannot_check_anything_are_errors() {
    let x = [uniform(&[3], 6)];
    for (check, message) in [
        (
            GradCheck {
                step: 0.0,
                ..GradCheck::default()
            },
            "step must be a finite number > 0, got 0",
        ),
        (
            GradCheck {
                step: f64::NAN,
                ..GradCheck::default()
            },
            "step must be a finite number > 0, got NaN",
        ),
        (
            GradCheck {
                atol: -1e-5,
                ..GradCheck::default()
            },
            "atol must be a finite number >= 0, got -0.00001",
        ),
        (
            GradCheck {
                rtol: f64::INFINITY,
                ..GradCheck::default()
            },
            "rtol must be a finite number >= 0, got inf",
        ),
        (
            GradCheck {
                atol: 0.0,
                rtol: 0.0,
                ..GradCheck::default()
            },
            "atol must be > 0 when rtol is 0 (central differences are never exact), got 0",
        ),
    ] {
        let error = check.run(|_, v| Ok(v[0].exp()), &x).unwrap_err();
        assert!(matches!(error, GradCheckError::InvalidSetting { .. }), "{error}");
        assert_eq!(error.to_string(), format!("gradient check: {message}"));
    }
}

#[test]
fn a_nan_output_is_reported_as_such() {
    // ln(x) is NaN for x < 0: at the given inputs, and where a step crosses 0.
    let error = check_gradients(|_, v| Ok(v[0].ln()), &[array![2.0, -1.0].into_dyn()]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "gradient check: the function's output is NaN at index [1] at the given inputs"
    );
    let error = check_gradients(|_, v| Ok(v[0].ln()), &[array![2.0, 5e-7].into_dyn()]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "gradient check: the function's output is NaN at index [1] with input 0 at index [1] moved by -1e-6"
    );
}

#[test]
fn tolerances_are_applied_as_documented() {
    // With a tiny atol and no rtol even a correct gradient fails: the estimate has rounding
    // error.
    let strict = GradCheck {
        atol: 1e-15,
        rtol: 0.0,
        ..GradCheck::default()
    };
    let x = uniform(&[4], 5);
    assert!(
        strict
            .run(|_, v| Ok(v[0].exp()), std::slice::from_ref(&x))
            .is_err()
    );
    assert!(GradCheck::default().run(|_, v| Ok(v[0].exp()), &[x]).is_ok());
}
