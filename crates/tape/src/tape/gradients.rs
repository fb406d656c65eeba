//! What a backward pass returns: the gradient of every node that needs one, read per [`Var`] or
//! per [`VarId`].

use ndarray::ArrayD;

use super::Var;
use crate::{Element, Result, TapeError};

/// A `Var`'s identity without the borrow of its tape: which tape, which node. Layers keep it to
/// find their parameters' gradients after backward ([`Gradients::get_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VarId {
    pub(crate) tape: u64,
    pub(crate) index: usize,
}

/// The gradients computed by one backward pass, read per [`Var`].
///
/// Every node that the output depends on and that depends on a trainable variable has a
/// gradient: leaves and intermediate results alike. To read the gradient of an intermediate
/// value, keep its `Var` and ask for it (a `Sequential` net hands out every layer's output with
/// `forward_each`); nothing needs marking beforehand, unlike PyTorch's `retain_grad()`.
///
/// # Example: the gradient of a hidden value
/// ```
/// use ndarray::array;
/// use tape::Tape;
///
/// let tape = Tape::new();
/// let x = tape.var(array![1.0, 2.0]);
/// let hidden = x * x; // x²
/// let loss = (hidden * 3.0).sum();
/// let grads = loss.backward()?;
/// assert_eq!(grads.wrt(hidden)?, &array![3.0, 3.0].into_dyn()); // ∂loss/∂hidden
/// assert_eq!(grads.wrt(x)?, &array![6.0, 12.0].into_dyn()); // 3 · 2x
/// # Ok::<(), tape::TapeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Gradients<T: Element> {
    tape_id: u64,
    grads: Vec<Option<ArrayD<T>>>,
}

impl<T: Element> Gradients<T> {
    pub(super) fn new(tape_id: u64, grads: Vec<Option<ArrayD<T>>>) -> Self {
        Gradients { tape_id, grads }
    }

    /// The gradient of the output with respect to `var`, or `None` when it has none (a constant,
    /// a value the output does not depend on, or a `Var` of another tape).
    pub fn get(&self, var: Var<'_, T>) -> Option<&ArrayD<T>> {
        if var.tape.id() != self.tape_id {
            return None;
        }
        self.grads.get(var.index).and_then(Option::as_ref)
    }

    /// The gradient with respect to `var`.
    ///
    /// # Errors
    /// [`TapeError::ForeignVar`] for a `Var` of another tape, [`TapeError::NoGradient`] when
    /// it has none.
    pub fn wrt(&self, var: Var<'_, T>) -> Result<&ArrayD<T>> {
        if var.tape.id() != self.tape_id {
            return Err(TapeError::ForeignVar {
                op: "Gradients::wrt".into(),
            });
        }
        self.get(var).ok_or(TapeError::NoGradient { index: var.index })
    }

    /// Whether the variable with this identity is on the tape these gradients come from.
    pub fn is_from(&self, id: VarId) -> bool {
        id.tape == self.tape_id
    }

    /// The gradient of the variable with this identity; see [`get`](Gradients::get).
    pub fn get_id(&self, id: VarId) -> Option<&ArrayD<T>> {
        if id.tape != self.tape_id {
            return None;
        }
        self.grads.get(id.index).and_then(Option::as_ref)
    }

    /// The gradient of the variable with this identity, to change in place (to clip it, say).
    pub fn get_id_mut(&mut self, id: VarId) -> Option<&mut ArrayD<T>> {
        if id.tape != self.tape_id {
            return None;
        }
        self.grads.get_mut(id.index).and_then(Option::as_mut)
    }

    /// Takes the gradient out (no copy), leaving `None`; for optimizers.
    pub fn take(&mut self, var: Var<'_, T>) -> Option<ArrayD<T>> {
        if var.tape.id() != self.tape_id {
            return None;
        }
        self.grads.get_mut(var.index).and_then(Option::take)
    }
}
