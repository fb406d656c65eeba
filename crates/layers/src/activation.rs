//! Elementwise activations as layers (the tape ops themselves live in `tape`).

use tape::{Element, Var};

use crate::error::Result;
use crate::module::{Mode, Module};
use crate::param::Parameter;

/// An elementwise nonlinearity with no parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + e⁻ˣ)`.
    Sigmoid,
    /// `tanh x`.
    Tanh,
}

impl<T: Element> Module<T> for Activation {
    fn forward<'t>(&mut self, x: Var<'t, T>, _mode: Mode) -> Result<Var<'t, T>> {
        Ok(match self {
            Activation::Relu => x.relu(),
            Activation::Sigmoid => x.sigmoid(),
            Activation::Tanh => x.tanh(),
        })
    }
    fn parameters(&self) -> Vec<&Parameter<T>> {
        Vec::new()
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        Vec::new()
    }
    fn describe(&self) -> String {
        format!("{self:?}")
    }
}

#[cfg(test)]
mod tests {
    use ndarray::array;
    use tape::{Tape, check_gradients};

    use super::*;

    #[test]
    fn activations_apply_their_function_and_pass_the_gradient_checker() {
        let x = array![[-1.5, 0.3], [2.0, -0.2]].into_dyn();
        for mut activation in [Activation::Relu, Activation::Sigmoid, Activation::Tanh] {
            let tape = Tape::new();
            let y = Module::<f64>::forward(&mut activation, tape.constant(x.clone()), Mode::Train).unwrap();
            let expected = x.mapv(|v: f64| match activation {
                Activation::Relu => v.max(0.0),
                Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
                Activation::Tanh => v.tanh(),
            });
            assert!(y.value().abs_diff_eq(&expected, 1e-15));
            check_gradients(
                |_, v| Ok(Module::<f64>::forward(&mut activation, v[0], Mode::Train)?),
                std::slice::from_ref(&x),
            )
            .unwrap();
        }
    }
}
