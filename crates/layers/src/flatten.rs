//! The flattening layer.

use tape::{Element, Var};

use crate::error::Result;
use crate::module::{Mode, Module};
use crate::param::Parameter;

/// Flattens all axes after the first, as PyTorch's `nn.Flatten()`: `(N, C, H, W)` becomes
/// `(N, C·H·W)`, in row-major order. See [`Var::flatten`]. No parameters.
///
/// # Example
/// ```
/// use layers::{Flatten, Mode, Module};
///
/// let tape = tape::Tape::<f32>::new();
/// let x = tape.constant(ndarray::Array4::<f32>::zeros((60, 32, 4, 4)));
/// assert_eq!(Flatten.forward(x, Mode::Train)?.shape(), vec![60, 512]);
/// # Ok::<(), layers::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flatten;

impl<T: Element> Module<T> for Flatten {
    /// # Errors
    /// [`Error::Tape`](crate::Error::Tape) for an input of rank below 2.
    fn forward<'t>(&mut self, x: Var<'t, T>, _mode: Mode) -> Result<Var<'t, T>> {
        Ok(x.flatten()?)
    }

    fn parameters(&self) -> Vec<&Parameter<T>> {
        Vec::new()
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        Vec::new()
    }

    fn describe(&self) -> String {
        "Flatten".into()
    }
}
