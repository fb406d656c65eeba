//! The fully connected layer.

use ndarray::Array;
use rand::Rng;
use tape::{Element, Var};

use crate::error::{Error, Result};
use crate::module::{Mode, Module, StateDict, load_parameters, parameter_state};
use crate::param::Parameter;

/// `y = x · Wᵀ + b`, with `W` of shape `(out_features, in_features)` as in PyTorch.
///
/// # Initialisation
/// [`Linear::new`] draws every weight and bias uniformly from `[-1/√in, 1/√in)` with the given
/// random generator, PyTorch's default for `nn.Linear` (Kaiming-uniform with `a = √5`). Seed
/// the generator for a reproducible net.
///
/// # Shapes
/// `x`: `(N, in_features)`; output `(N, out_features)`.
///
/// # Example
/// ```
/// use layers::{Linear, Mode, Module};
/// use rand::SeedableRng;
///
/// let mut layer = Linear::<f64>::new(3, 2, &mut rand::rngs::StdRng::seed_from_u64(7));
/// let tape = tape::Tape::new();
/// let y = layer.forward(tape.constant(ndarray::Array2::<f64>::ones((4, 3))), Mode::Train)?;
/// assert_eq!(y.shape(), vec![4, 2]);
/// # Ok::<(), layers::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Linear<T: Element> {
    /// `(out_features, in_features)`.
    pub weight: Parameter<T>,
    /// `(out_features,)`.
    pub bias: Parameter<T>,
}

impl<T: Element> Linear<T> {
    /// A layer with PyTorch's default initialisation, drawn from `rng`.
    pub fn new(in_features: usize, out_features: usize, rng: &mut impl Rng) -> Self {
        let bound = 1.0 / (in_features.max(1) as f64).sqrt();
        let mut draw = || T::from_f64_lossy(rng.random_range(-bound..bound));
        Linear {
            weight: Parameter::new(Array::from_shape_simple_fn(
                (out_features, in_features),
                &mut draw,
            )),
            bias: Parameter::new(Array::from_shape_simple_fn(out_features, draw)),
        }
    }

    /// Number of inputs: axis 1 of the weight (0 for a weight of rank below 2, which `forward`
    /// rejects).
    pub fn in_features(&self) -> usize {
        self.weight.value.shape().get(1).copied().unwrap_or(0)
    }

    /// Number of outputs: axis 0 of the weight (0 for a weight of rank 0).
    pub fn out_features(&self) -> usize {
        self.weight.value.shape().first().copied().unwrap_or(0)
    }

    /// Checks that the weight is `(out, in)` and the bias `(out,)`: both are public fields, so
    /// they may have been replaced by arrays of other shapes.
    fn check_parameters(&self) -> Result<()> {
        let (out, weight) = (self.out_features(), self.weight.value.shape());
        if weight.len() != 2 {
            return Err(Error::Shape {
                name: "weight",
                got: weight.to_vec(),
                expected: "rank 2, (out_features, in_features)".into(),
            });
        }
        if self.bias.value.shape() != [out] {
            return Err(Error::Shape {
                name: "bias",
                got: self.bias.value.shape().to_vec(),
                expected: format!("[{out}] (out_features, axis 0 of the weight {weight:?})"),
            });
        }
        Ok(())
    }
}

impl<T: Element> Module<T> for Linear<T> {
    /// # Errors
    /// [`Error::Shape`] when `x` is not `(N, in_features)`, or when the weight is not 2-D or the
    /// bias not `(out_features,)`.
    fn forward<'t>(&mut self, x: Var<'t, T>, _mode: Mode) -> Result<Var<'t, T>> {
        self.check_parameters()?;
        let (shape, in_features) = (x.shape(), self.in_features());
        let expected = match shape.as_slice() {
            [_, width] if *width == in_features => None,
            [rows, _] => Some(format!("[{rows}, {in_features}]")),
            _ => Some("rank 2".to_string()),
        };
        if let Some(expected) = expected {
            return Err(Error::Shape {
                name: "x",
                expected: format!(
                    "{expected} (N rows of in_features = {in_features} for {})",
                    self.describe()
                ),
                got: shape,
            });
        }
        let tape = x.tape();
        let weight = self.weight.bind(tape);
        let bias = self.bias.bind(tape);
        Ok(x.matmul(weight.transpose()?)?.try_add(bias)?)
    }

    fn parameters(&self) -> Vec<&Parameter<T>> {
        vec![&self.weight, &self.bias]
    }

    /// `weight` `(out_features, in_features)` and `bias`, as PyTorch's `nn.Linear`.
    fn state_dict(&self) -> StateDict<T> {
        parameter_state(&[("weight", &self.weight), ("bias", &self.bias)])
    }

    fn load_state_dict(&mut self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        load_parameters(
            vec![("weight", &mut self.weight), ("bias", &mut self.bias)],
            dict,
            strict,
        )
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        vec![&mut self.weight, &mut self.bias]
    }

    fn describe(&self) -> String {
        format!("Linear({} -> {})", self.in_features(), self.out_features())
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, array};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use tape::{Tape, check_gradients};

    use super::*;

    #[test]
    fn initialisation_is_seeded_and_bounded() {
        let a = Linear::<f64>::new(16, 4, &mut StdRng::seed_from_u64(3));
        let b = Linear::<f64>::new(16, 4, &mut StdRng::seed_from_u64(3));
        assert_eq!(a.weight.value, b.weight.value);
        assert!(a.weight.value.iter().chain(&a.bias.value).all(|w| w.abs() < 0.25));
        assert_eq!((a.in_features(), a.out_features()), (16, 4));
    }

    #[test]
    fn forward_is_x_times_w_transposed_plus_b_and_checks_out() {
        let mut layer = Linear::<f64>::new(2, 2, &mut StdRng::seed_from_u64(0));
        layer.weight.value = array![[1.0, 2.0], [3.0, 4.0]].into_dyn();
        layer.bias.value = array![0.5, -0.5].into_dyn();
        let tape = Tape::new();
        let y = layer
            .forward(tape.constant(array![[1.0, 1.0]]), Mode::Eval)
            .unwrap();
        assert_eq!(*y.value(), array![[3.5, 6.5]].into_dyn());
        let (w, b) = (layer.weight.value.clone(), layer.bias.value.clone());
        let x = array![[0.3, -1.2], [0.7, 0.1], [-0.4, 0.9]].into_dyn();
        check_gradients(|_, v| v[0].matmul(v[1].transpose()?)?.try_add(v[2]), &[x, w, b]).unwrap();
    }

    #[test]
    fn a_wrong_input_width_is_an_error() {
        let mut layer = Linear::<f32>::new(3, 2, &mut StdRng::seed_from_u64(0));
        let tape = Tape::new();
        let error = layer
            .forward(tape.constant(Array2::<f32>::zeros((4, 5))), Mode::Train)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "x has shape [4, 5], expected [4, 3] (N rows of in_features = 3 for Linear(3 -> 2))"
        );
        // A vector is not told about a row count it does not have ("expected [3, 3]").
        let error = layer
            .forward(tape.constant(ndarray::Array1::<f32>::zeros(3)), Mode::Train)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "x has shape [3], expected rank 2 (N rows of in_features = 3 for Linear(3 -> 2))"
        );
    }

    #[test]
    fn replaced_parameters_of_the_wrong_shape_are_errors() {
        // The weight and bias are public: a weight that is not 2-D panicked in in_features().
        let mut layer = Linear::<f64>::new(3, 2, &mut StdRng::seed_from_u64(0));
        layer.weight.value = ndarray::Array1::<f64>::zeros(6).into_dyn();
        assert_eq!((layer.in_features(), layer.out_features()), (0, 6));
        let tape = Tape::new();
        let x = tape.constant(Array2::<f64>::zeros((4, 3)));
        assert_eq!(
            layer.forward(x, Mode::Train).unwrap_err().to_string(),
            "weight has shape [6], expected rank 2, (out_features, in_features)"
        );
        layer.weight.value = Array2::<f64>::zeros((2, 3)).into_dyn();
        layer.bias.value = ndarray::Array1::<f64>::zeros(3).into_dyn();
        assert_eq!(
            layer.forward(x, Mode::Train).unwrap_err().to_string(),
            "bias has shape [3], expected [2] (out_features, axis 0 of the weight [2, 3])"
        );
    }
}
