//! Second-order gradient checking, as PyTorch's `gradgradcheck`: the gradient checker applied to
//! the first-order vector-Jacobian product.
//!
//! For `f` and a random upstream gradient `u` (seeded, of the output's shape), the
//! first-order VJP is `g(x) = ∂ sum(f(x) · u) / ∂x`. The check compares the tape's gradient of
//! `Σᵢ sum(gᵢ(x) · vᵢ)`, random `vᵢ`, with `g` recorded on the tape ([`Tape::grad`] with
//! `create_graph`) so that the gradient goes through each op's recorded backward, against
//! central differences of the same sum with `g` from each op's own first-order
//! [`backward`](crate::Function::backward) (which [`check_gradients`](crate::check_gradients)
//! checks). A wrong recorded backward ([`Function::backward_graph`](crate::Function::backward_graph)),
//! in its values or in its own derivative, shows up as a mismatch.
//!
//! [`Tape::grad`]: crate::Tape::grad

use ndarray::ArrayD;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use super::{GradCheck, GradCheckError, GradCheckReport, gradients_or_zeros};
use crate::{GradOptions, Tape, TapeError, Var};

/// Random normal values of `shape`, from `seed`.
fn normal(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(shape, || StandardNormal.sample(&mut rng))
}

impl GradCheck {
    /// Checks the second derivatives of `f`, as PyTorch's `gradgradcheck`: for a random upstream
    /// gradient `u` the first-order VJP `g(x) = ∂ sum(f(x) · u) / ∂x`, recorded on the tape, is
    /// differentiated along random directions `vᵢ` (the gradient of `Σᵢ sum(gᵢ · vᵢ)`) and
    /// compared with central differences of that sum, `g` taken from each op's own first-order
    /// backward. So a recorded backward that is wrong, in its values or in its own derivative,
    /// fails. Settings as for [`run`](GradCheck::run), `seed` also seeding `u` and the `vᵢ`; the
    /// report counts the elements of the inputs checked.
    ///
    /// # Errors
    /// As [`run`](GradCheck::run); an op on the way without a recorded backward gives
    /// [`GradCheckError::Function`] with [`TapeError::NoGraphRule`] naming it.
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    ///
    /// let x = array![[0.3, -1.2], [2.0, 0.7]].into_dyn();
    /// let report = tape::GradCheck::default()
    ///     .run_second_order(|_, v| Ok(v[0].tanh().powi(2)), &[x])
    ///     .expect("tanh and powi have correct second derivatives");
    /// assert_eq!(report.checked, 4);
    /// ```
    pub fn run_second_order<F>(
        &self,
        mut f: F,
        inputs: &[ArrayD<f64>],
    ) -> Result<GradCheckReport, GradCheckError>
    where
        F: for<'t> FnMut(&'t Tape<f64>, &[Var<'t, f64>]) -> Result<Var<'t, f64>, TapeError>,
    {
        self.validate()?;
        if inputs.is_empty() {
            return Err(GradCheckError::NoInputs);
        }
        let directions: Vec<ArrayD<f64>> = inputs
            .iter()
            .enumerate()
            .map(|(i, x)| normal(x.shape(), self.seed.wrapping_add(2 + i as u64)))
            .collect();
        let upstream = |shape: &[usize]| normal(shape, self.seed.wrapping_add(1));
        // Analytic: through the recorded first-order backward.
        let tape = Tape::new();
        let vars: Vec<_> = inputs.iter().map(|x| tape.var(x.clone())).collect();
        let y = f(&tape, &vars)?;
        let output_shape = y.shape();
        let u = tape.constant(upstream(&output_shape));
        let recorded = GradOptions {
            create_graph: true,
            upstream: None,
        };
        let first = tape.grad(y.try_mul(u)?.sum(), &vars, recorded)?;
        let mut total = tape.scalar(0.0);
        for (g, v) in first.into_iter().zip(&directions) {
            if let Some(g) = g {
                total = total.try_add(g.try_mul(tape.constant(v.clone()))?.sum())?;
            }
        }
        let grads = total.backward()?;
        let analytic = gradients_or_zeros(&grads, &vars, inputs);
        // Numeric: central differences of Σᵢ sum(gᵢ · vᵢ), the first-order gradients gᵢ by the
        // ops' own backward.
        let loss = |working: &[ArrayD<f64>], _: (usize, &[usize], f64)| -> Result<f64, GradCheckError> {
            let tape = Tape::new();
            let vars: Vec<_> = working.iter().map(|x| tape.var(x.clone())).collect();
            let y = f(&tape, &vars)?;
            if y.shape() != output_shape {
                return Err(GradCheckError::OutputShapeChanged {
                    expected: output_shape.clone(),
                    got: y.shape(),
                });
            }
            let grads = y.backward_with(upstream(&output_shape))?;
            let dot = |(x, v): (&Var<'_, f64>, &ArrayD<f64>)| {
                grads
                    .get(*x)
                    .map_or(0.0, |g| g.iter().zip(v).map(|(g, v)| g * v).sum::<f64>())
            };
            Ok(vars.iter().zip(&directions).map(dot).sum())
        };
        self.compare(&analytic, inputs, loss)
    }
}

/// [`GradCheck::run_second_order`] with PyTorch's default settings, as `gradgradcheck`.
///
/// # Errors
/// As [`GradCheck::run_second_order`].
pub fn check_second_order<F>(f: F, inputs: &[ArrayD<f64>]) -> Result<GradCheckReport, GradCheckError>
where
    F: for<'t> FnMut(&'t Tape<f64>, &[Var<'t, f64>]) -> Result<Var<'t, f64>, TapeError>,
{
    GradCheck::default().run_second_order(f, inputs)
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, ArrayViewD, array};

    use super::*;
    use crate::{BackwardArgs, Function, GraphArgs, Result};

    /// `x³` whose recorded backward is `3x²` (right) or `3x` (wrong, to prove the checker
    /// fails); its first-order backward is right either way.
    struct Cube {
        wrong_double: bool,
    }

    impl Function<f64> for Cube {
        fn name(&self) -> &str {
            "cube"
        }
        fn forward(&mut self, inputs: &[ArrayViewD<'_, f64>]) -> Result<ArrayD<f64>> {
            Ok(inputs[0].mapv(|x| x * x * x))
        }
        fn backward(&self, args: &BackwardArgs<'_, f64>) -> Result<Vec<Option<ArrayD<f64>>>> {
            Ok(vec![Some(
                &args.grad_output * &args.inputs[0].mapv(|x| 3.0 * x * x),
            )])
        }
        fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, f64>) -> Result<Vec<Option<Var<'t, f64>>>> {
            let x = args.inputs[0];
            let derivative = if self.wrong_double {
                x * 3.0
            } else {
                x.powi(2) * 3.0
            };
            Ok(vec![Some(args.grad_output.try_mul(derivative)?)])
        }
    }

    #[test]
    fn a_right_double_backward_passes_and_a_wrong_one_fails() {
        let x = array![[0.4, -1.3], [0.9, 2.1]].into_dyn();
        let cube = |wrong_double| Cube { wrong_double };
        let report = check_second_order(|t, v| t.apply(cube(false), v), std::slice::from_ref(&x)).unwrap();
        assert_eq!(report.checked, 4);
        // The first order cannot tell them apart; the second order can.
        crate::check_gradients(|t, v| t.apply(cube(true), v), std::slice::from_ref(&x)).unwrap();
        let error = check_second_order(|t, v| t.apply(cube(true), v), &[x]).unwrap_err();
        assert!(
            matches!(error, GradCheckError::Mismatch { input: 0, .. }),
            "{error}"
        );
    }

    #[test]
    fn primitives_pass_and_an_op_without_a_recorded_backward_is_named() {
        let x = array![[0.5, -0.7, 1.2], [0.1, 0.9, -1.5]].into_dyn();
        let w = array![[0.3], [-1.1], [0.8]].into_dyn();
        check_second_order(
            |_, v| Ok(v[0].matmul(v[1])?.sigmoid() * v[0].sum()),
            &[x.clone(), w],
        )
        .unwrap();
        check_second_order(
            |_, v| v[0].max_axis(1, true)?.exp().try_div(v[0].exp().sum()),
            std::slice::from_ref(&x),
        )
        .unwrap();
        struct Once;
        impl Function<f64> for Once {
            fn name(&self) -> &str {
                "once"
            }
            fn forward(&mut self, inputs: &[ArrayViewD<'_, f64>]) -> Result<ArrayD<f64>> {
                Ok(inputs[0].to_owned())
            }
            fn backward(&self, args: &BackwardArgs<'_, f64>) -> Result<Vec<Option<ArrayD<f64>>>> {
                Ok(vec![Some(args.grad_output.to_owned())])
            }
        }
        let error = check_second_order(|t, v| t.apply(Once, v), &[x]).unwrap_err();
        assert!(
            matches!(&error, GradCheckError::Function(TapeError::NoGraphRule { op }) if op == "once"),
            "{error}"
        );
    }
}
