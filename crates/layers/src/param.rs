//! Trainable parameters: a value that a layer puts on each step's tape, and whose gradient it
//! can find afterwards.

use std::cell::Cell;

use ndarray::{Array, ArrayD, Dimension};
use tape::{Element, Gradients, Tape, Var, VarId};

/// A trainable array owned by a layer, like PyTorch's `nn.Parameter`.
///
/// Each training step makes a new [`Tape`]; [`bind`](Parameter::bind) puts the parameter on it
/// as a trainable variable (once per tape: a second call returns the same `Var`) and remembers
/// which one, so that after `backward` [`grad`](Parameter::grad) finds its gradient.
///
/// # Example
/// ```
/// use ndarray::array;
/// use layers::Parameter;
///
/// let mut w = Parameter::new(array![1.0, -2.0]);
/// let tape = tape::Tape::new();
/// let v = w.bind(&tape);
/// let grads = (v * v).sum().backward()?;
/// let g = w.grad(&grads).expect("w was used").clone();
/// w.value = &w.value - &(g * 0.1); // one step of gradient descent
/// assert_eq!(w.value, array![0.8, -1.6].into_dyn());
/// # Ok::<(), tape::TapeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Parameter<T: Element> {
    /// The current value.
    pub value: ArrayD<T>,
    binding: Cell<Option<VarId>>,
}

impl<T: Element> Parameter<T> {
    /// A parameter with this initial value.
    pub fn new<D: Dimension>(value: Array<T, D>) -> Self {
        Parameter {
            value: value.into_dyn(),
            binding: Cell::new(None),
        }
    }

    /// This parameter as a trainable variable on `tape` (the same `Var` for repeated calls
    /// with one tape).
    pub fn bind<'t>(&self, tape: &'t Tape<T>) -> Var<'t, T> {
        if let Some(var) = self.binding.get().and_then(|id| tape.get(id)) {
            return var;
        }
        let var = tape.var(self.value.clone());
        self.binding.set(Some(var.id()));
        var
    }

    /// The gradient from the backward pass of the tape this parameter was last bound to, or
    /// `None` when the loss did not depend on it.
    pub fn grad<'g>(&self, grads: &'g Gradients<T>) -> Option<&'g ArrayD<T>> {
        self.binding.get().and_then(|id| grads.get_id(id))
    }

    /// The gradient, as [`grad`](Parameter::grad) finds it, to change in place.
    pub fn grad_mut<'g>(&self, grads: &'g mut Gradients<T>) -> Option<&'g mut ArrayD<T>> {
        self.binding.get().and_then(|id| grads.get_id_mut(id))
    }

    /// Whether this parameter was bound to the tape `grads` come from (it took part in that
    /// tape's forward pass).
    pub fn is_bound_to(&self, grads: &Gradients<T>) -> bool {
        self.binding.get().is_some_and(|id| grads.is_from(id))
    }

    /// Number of scalar values.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// True for an empty parameter.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}
