//! The gradient checker: compares the tape's gradients with central finite differences.
//!
//! For a function `f` of some inputs, the checker computes the analytic gradient of
//! `L = sum(f(inputs) · w)` by one backward pass, then for every element `xᵢ` of every input the
//! numeric estimate `(L(xᵢ + h) - L(xᵢ - h)) / 2h`, and requires
//! `|analytic - numeric| <= atol + rtol · |numeric|` everywhere. `w` is a random normal array
//! (seeded) when the output has more than one element: with `w = 1` many wrong gradients would
//! pass (BatchNorm's input gradient is exactly zero for `w = 1`). For a one-element output
//! `w = 1`, the output itself being the loss.
//!
//! Everything runs in `f64`: finite differences in `f32` are too noisy to tell a wrong
//! gradient from rounding.

use std::fmt;

use ndarray::{ArrayD, Dimension};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Gradients, Tape, TapeError, Var};

/// Settings of a gradient check; [`GradCheck::default`] gives PyTorch's `gradcheck` defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradCheck {
    /// Finite-difference step `h` (default `1e-6`).
    pub step: f64,
    /// Absolute tolerance (default `1e-5`).
    pub atol: f64,
    /// Relative tolerance, against `|numeric|` (default `1e-3`).
    pub rtol: f64,
    /// Seed of the random output weights `w` (default 0).
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            step: 1e-6,
            atol: 1e-5,
            rtol: 1e-3,
            seed: 0,
        }
    }
}

/// Why a gradient check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GradCheckError {
    /// Some analytic gradient differs from its finite-difference estimate. Names the worst
    /// element (largest error relative to its tolerance).
    #[error(
        "gradient check failed: input {input} at index {index:?}: analytic {analytic:.6e}, numeric {numeric:.6e} \
         (|difference| {difference:.3e} > allowed {allowed:.3e} = atol + rtol·|numeric|); \
         {mismatches} of {checked} elements out of tolerance"
    )]
    Mismatch {
        /// Which input (position in the `inputs` slice).
        input: usize,
        /// The element's index in that input.
        index: Vec<usize>,
        /// The tape's gradient.
        analytic: f64,
        /// The central-difference estimate.
        numeric: f64,
        /// `|analytic - numeric|`.
        difference: f64,
        /// `atol + rtol · |numeric|`.
        allowed: f64,
        /// How many elements failed in all.
        mismatches: usize,
        /// How many elements were checked in all.
        checked: usize,
    },
    /// The function itself failed.
    #[error("gradient check: the function failed: {0}")]
    Function(#[from] TapeError),
    /// The function's output changed shape when an input was perturbed.
    #[error("gradient check: the output has shape {got:?} after perturbing an input, expected {expected:?}")]
    OutputShapeChanged {
        /// Shape of the unperturbed output.
        expected: Vec<usize>,
        /// Shape after perturbing.
        got: Vec<usize>,
    },
    /// There was nothing to check.
    #[error("gradient check: no inputs given")]
    NoInputs,
    /// A setting of [`GradCheck`] cannot give a meaningful check.
    #[error("gradient check: {name} must be {expected}, got {got}")]
    InvalidSetting {
        /// `step`, `atol` or `rtol`.
        name: &'static str,
        /// Its valid range, in words.
        expected: &'static str,
        /// The value given.
        got: f64,
    },
    /// The function's output is NaN or infinite, so no difference of it means anything.
    #[error(
        "gradient check: the function's output is {value} at index {index:?}{}",
        perturbed.as_ref().map_or(" at the given inputs".to_string(), |(input, at, by)| {
            format!(" with input {input} at index {at:?} moved by {by:e}")
        })
    )]
    NonFiniteOutput {
        /// The value (NaN or ±inf).
        value: f64,
        /// Its index in the output.
        index: Vec<usize>,
        /// Which input element was moved, and by how much; `None` at the given inputs.
        perturbed: Option<(usize, Vec<usize>, f64)>,
    },
}

/// The worst agreement found for one input.
#[derive(Debug, Clone, PartialEq)]
pub struct InputReport {
    /// The input's shape.
    pub shape: Vec<usize>,
    /// Largest `|analytic - numeric|` over its elements.
    pub max_abs_error: f64,
    /// Largest `|analytic - numeric| / (atol + rtol·|numeric|)`: at most 1 for a pass.
    pub worst_ratio: f64,
}

/// What a passing gradient check measured.
#[derive(Debug, Clone, PartialEq)]
pub struct GradCheckReport {
    /// One entry per input, in order.
    pub inputs: Vec<InputReport>,
    /// Number of elements checked (two function evaluations each).
    pub checked: usize,
    /// The settings used.
    pub config: GradCheck,
}

impl fmt::Display for GradCheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "gradient check passed: {} elements (h = {:e}, atol = {:e}, rtol = {:e})",
            self.checked, self.config.step, self.config.atol, self.config.rtol
        )?;
        for (i, input) in self.inputs.iter().enumerate() {
            writeln!(
                f,
                "  input {i} {:?}: max |analytic - numeric| = {:.3e}, worst error / tolerance = {:.3}",
                input.shape, input.max_abs_error, input.worst_ratio
            )?;
        }
        Ok(())
    }
}

impl GradCheck {
    /// Checks the tape's gradients of `f` at `inputs` against central differences.
    ///
    /// `f` receives a fresh tape and one trainable [`Var`] per input, and returns the output.
    /// It is called once for the analytic gradient and twice per input element, one call after
    /// the other, so it may change what it captures: a layer's `forward`, which takes `&mut
    /// self`, can be called in it as it is. An error of another crate that converts into
    /// [`TapeError`] (the `layers` crate's does) passes through `?`.
    ///
    /// # Errors
    /// [`GradCheckError::Mismatch`] naming the worst element when any is out of tolerance,
    /// the error of `f`, [`GradCheckError::NonFiniteOutput`] when an output is NaN or infinite,
    /// [`GradCheckError::InvalidSetting`] for a `step` that is not finite and positive or
    /// tolerances that are negative, not finite or both 0, [`GradCheckError::OutputShapeChanged`]
    /// or [`GradCheckError::NoInputs`].
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use tape::GradCheck;
    ///
    /// let x = array![[0.3, -1.2], [2.0, 0.7]].into_dyn();
    /// let w = array![[1.5], [-0.5]].into_dyn();
    /// let report = GradCheck { rtol: 1e-4, ..GradCheck::default() }
    ///     .run(|_, v| Ok(v[0].matmul(v[1])?.tanh()), &[x, w])
    ///     .expect("matmul and tanh have correct gradients");
    /// assert_eq!(report.checked, 6);
    /// ```
    pub fn run<F>(&self, mut f: F, inputs: &[ArrayD<f64>]) -> Result<GradCheckReport, GradCheckError>
    where
        F: for<'t> FnMut(&'t Tape<f64>, &[Var<'t, f64>]) -> Result<Var<'t, f64>, TapeError>,
    {
        self.validate()?;
        if inputs.is_empty() {
            return Err(GradCheckError::NoInputs);
        }
        // Analytic gradients: one backward pass with random output weights.
        let tape = Tape::new();
        let vars: Vec<_> = inputs.iter().map(|x| tape.var(x.clone())).collect();
        let output = f(&tape, &vars)?;
        check_finite(&output.value(), None)?;
        let output_shape = output.shape();
        let weights = self.output_weights(&output_shape);
        let grads = output.backward_with(weights.clone())?;
        let analytic = gradients_or_zeros(&grads, &vars, inputs);

        // The loss L = sum(f(inputs) · w) at perturbed inputs.
        let loss = |working: &[ArrayD<f64>], moved: (usize, &[usize], f64)| -> Result<f64, GradCheckError> {
            let tape = Tape::new();
            let vars: Vec<_> = working.iter().map(|x| tape.var(x.clone())).collect();
            let value = f(&tape, &vars)?.value();
            if value.shape() != output_shape.as_slice() {
                return Err(GradCheckError::OutputShapeChanged {
                    expected: output_shape.clone(),
                    got: value.shape().to_vec(),
                });
            }
            check_finite(&value, Some((moved.0, moved.1.to_vec(), moved.2)))?;
            Ok(value.iter().zip(weights.iter()).map(|(y, w)| y * w).sum())
        };
        self.compare(&analytic, inputs, loss)
    }

    /// Each element of `analytic` (the gradient of a scalar loss with respect to each input)
    /// against central differences of `loss` at the inputs moved by `±step`, one element at a
    /// time (`loss` also gets which input, which element and by how much, for its messages).
    fn compare(
        &self,
        analytic: &[ArrayD<f64>],
        inputs: &[ArrayD<f64>],
        mut loss: impl FnMut(&[ArrayD<f64>], (usize, &[usize], f64)) -> Result<f64, GradCheckError>,
    ) -> Result<GradCheckReport, GradCheckError> {
        let mut working: Vec<ArrayD<f64>> = inputs.to_vec();
        let mut reports = Vec::with_capacity(inputs.len());
        let mut worst: Option<(f64, GradCheckError)> = None;
        let (mut checked, mut mismatches) = (0, 0);
        for (input, grad) in analytic.iter().enumerate() {
            let mut report = InputReport {
                shape: grad.shape().to_vec(),
                max_abs_error: 0.0,
                worst_ratio: 0.0,
            };
            for (index, &analytic) in grad.indexed_iter() {
                let original = working[input][&index];
                working[input][&index] = original + self.step;
                let plus = loss(&working, (input, index.slice(), self.step))?;
                working[input][&index] = original - self.step;
                let minus = loss(&working, (input, index.slice(), -self.step))?;
                working[input][&index] = original;

                let numeric = (plus - minus) / (2.0 * self.step);
                let difference = (analytic - numeric).abs();
                let allowed = self.atol + self.rtol * numeric.abs();
                // NaN anywhere makes the ratio NaN: treated as the worst possible.
                let ratio = if (difference / allowed).is_nan() {
                    f64::INFINITY
                } else {
                    difference / allowed
                };
                checked += 1;
                report.max_abs_error = report.max_abs_error.max(difference);
                report.worst_ratio = report.worst_ratio.max(ratio);
                if ratio > 1.0 {
                    mismatches += 1;
                    if worst.as_ref().is_none_or(|(worst_ratio, _)| ratio > *worst_ratio) {
                        let error = GradCheckError::Mismatch {
                            input,
                            index: index.slice().to_vec(),
                            analytic,
                            numeric,
                            difference,
                            allowed,
                            mismatches: 0,
                            checked: 0,
                        };
                        worst = Some((ratio, error));
                    }
                }
            }
            reports.push(report);
        }
        match worst {
            Some((
                _,
                GradCheckError::Mismatch {
                    input,
                    index,
                    analytic,
                    numeric,
                    difference,
                    allowed,
                    ..
                },
            )) => Err(GradCheckError::Mismatch {
                input,
                index,
                analytic,
                numeric,
                difference,
                allowed,
                mismatches,
                checked,
            }),
            Some((_, other)) => Err(other),
            None => Ok(GradCheckReport {
                inputs: reports,
                checked,
                config: *self,
            }),
        }
    }

    /// Checks the settings: a finite `step > 0`, finite `atol, rtol >= 0`, not both 0.
    fn validate(&self) -> Result<(), GradCheckError> {
        let invalid = |name, expected, got| Err(GradCheckError::InvalidSetting { name, expected, got });
        if !(self.step.is_finite() && self.step > 0.0) {
            return invalid("step", "a finite number > 0", self.step);
        }
        for (name, value) in [("atol", self.atol), ("rtol", self.rtol)] {
            if !(value.is_finite() && value >= 0.0) {
                return invalid(name, "a finite number >= 0", value);
            }
        }
        if self.atol == 0.0 && self.rtol == 0.0 {
            return invalid(
                "atol",
                "> 0 when rtol is 0 (central differences are never exact)",
                0.0,
            );
        }
        Ok(())
    }

    /// Random normal weights for a multi-element output, ones for a one-element output.
    fn output_weights(&self, shape: &[usize]) -> ArrayD<f64> {
        if shape.iter().product::<usize>() == 1 {
            return ArrayD::ones(shape);
        }
        let mut rng = StdRng::seed_from_u64(self.seed);
        ArrayD::from_shape_simple_fn(shape, || StandardNormal.sample(&mut rng))
    }
}

/// The gradient of each input (zeros where the output does not depend on it).
fn gradients_or_zeros(
    grads: &Gradients<f64>,
    vars: &[Var<'_, f64>],
    inputs: &[ArrayD<f64>],
) -> Vec<ArrayD<f64>> {
    let gradient = |(&v, x): (&Var<'_, f64>, &ArrayD<f64>)| {
        grads
            .get(v)
            .cloned()
            .unwrap_or_else(|| ArrayD::zeros(x.raw_dim()))
    };
    vars.iter().zip(inputs).map(gradient).collect()
}

/// [`GradCheckError::NonFiniteOutput`] at the first output element that is NaN or infinite.
fn check_finite(
    value: &ArrayD<f64>,
    perturbed: Option<(usize, Vec<usize>, f64)>,
) -> Result<(), GradCheckError> {
    match value.indexed_iter().find(|(_, v)| !v.is_finite()) {
        None => Ok(()),
        Some((index, &value)) => Err(GradCheckError::NonFiniteOutput {
            value,
            index: index.slice().to_vec(),
            perturbed,
        }),
    }
}

/// [`GradCheck::run`] with the default settings.
///
/// # Errors
/// As [`GradCheck::run`].
///
/// # Example
/// ```
/// use ndarray::array;
///
/// let x = array![0.5, -1.0, 2.0].into_dyn();
/// tape::check_gradients(|_, v| Ok(v[0].sigmoid() * v[0]), &[x]).expect("x·σ(x) checks out");
/// ```
///
/// # Example: checking a layer
/// A layer's `forward` usually takes `&mut self` and returns the layer crate's own error. The
/// closure may call it as it is, and pass its error on with `?` wherever that error converts into
/// [`TapeError`] (the `layers` crate's does: there it reads `|_, v| Ok(bn.forward(v[0],
/// Mode::Eval)?)`).
/// ```
/// use ndarray::array;
/// use tape::{TapeError, Var};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("scale: {0}")]
/// struct LayerError(String);
///
/// impl From<LayerError> for TapeError {
///     fn from(error: LayerError) -> Self {
///         TapeError::op("scale", error)
///     }
/// }
///
/// /// `y = factor · tanh(x)`, counting its calls.
/// struct Scale {
///     factor: f64,
///     calls: usize,
/// }
///
/// impl Scale {
///     fn forward<'t>(&mut self, x: Var<'t, f64>) -> Result<Var<'t, f64>, LayerError> {
///         self.calls += 1;
///         if x.shape().len() != 1 {
///             return Err(LayerError(format!("x has shape {:?}, expected rank 1", x.shape())));
///         }
///         Ok(x.tanh() * self.factor)
///     }
/// }
///
/// let mut layer = Scale { factor: 1.5, calls: 0 };
/// let report = tape::check_gradients(|_, v| Ok(layer.forward(v[0])?), &[array![0.3, -0.8].into_dyn()])?;
/// // One call for the analytic gradient, two for each of the two elements.
/// assert_eq!((report.checked, layer.calls), (2, 5));
/// # Ok::<(), tape::GradCheckError>(())
/// ```
pub fn check_gradients<F>(f: F, inputs: &[ArrayD<f64>]) -> Result<GradCheckReport, GradCheckError>
where
    F: for<'t> FnMut(&'t Tape<f64>, &[Var<'t, f64>]) -> Result<Var<'t, f64>, TapeError>,
{
    GradCheck::default().run(f, inputs)
}

mod second_order;

pub use self::second_order::check_second_order;

#[cfg(test)]
mod tests;
