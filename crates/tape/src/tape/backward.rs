//! The reverse walk: each op's backward from the last node to the first, gradients added where a
//! value is used more than once; and the same walk traced step by step, for teaching
//! ([`Tape::backward_trace`]).

use std::rc::Rc;

use ndarray::{ArrayD, ArrayViewD, Dimension, Zip};

use super::{Gradients, NodeKind, Tape, Var};
use crate::{BackwardArgs, Element, Result, TapeError};

/// One step of a backward pass: an op node, the gradient that reached it (the sum of what its
/// consumers sent), and what its backward sends to each input that needs a gradient.
#[derive(Debug, Clone)]
pub struct BackwardStep<T> {
    /// The op's node (its [`Var::index`]).
    pub node: usize,
    /// The gradient of the loss with respect to the node's value.
    pub grad_output: ArrayD<T>,
    /// `(input node, contribution)` for each input that gets one, in input order. Where a
    /// value feeds several ops, its gradient is the sum of their contributions.
    pub contributions: Vec<(usize, ArrayD<T>)>,
}

impl<T: Element> Tape<T> {
    /// As [`backward_with`](Tape::backward_with), and every step of the walk in the order it ran:
    /// for each op node reached, the gradient it received and each input's contribution. Copies
    /// every gradient, so it is for teaching and drawings, not for training.
    ///
    /// # Errors
    /// As [`backward_with`](Tape::backward_with).
    ///
    /// # Example: `x` feeds two ops, so its gradient is the sum of two contributions
    /// ```
    /// use ndarray::array;
    ///
    /// let tape = tape::Tape::new();
    /// let x = tape.var(array![3.0]);
    /// let y = (x * x + x).sum();
    /// let (grads, steps) = tape.backward_trace(y, ndarray::arr0(1.0))?;
    /// let to_x: Vec<f64> = steps
    ///     .iter()
    ///     .flat_map(|s| &s.contributions)
    ///     .filter(|(input, _)| *input == x.index())
    ///     .map(|(_, g)| g[0])
    ///     .collect();
    /// assert_eq!(to_x, [1.0, 3.0, 3.0]); // from the add, then twice from the mul
    /// assert_eq!(grads.wrt(x)?[0], 7.0);
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn backward_trace<D: Dimension>(
        &self,
        output: Var<'_, T>,
        grad_output: ndarray::Array<T, D>,
    ) -> Result<(Gradients<T>, Vec<BackwardStep<T>>)> {
        let mut steps = Vec::new();
        let grads = self.checked_backward(output, grad_output.into_dyn(), |step| steps.push(step()))?;
        Ok((grads, steps))
    }

    /// [`backward_with`](Tape::backward_with)'s checks, then the walk.
    pub(super) fn checked_backward(
        &self,
        output: Var<'_, T>,
        grad_output: ArrayD<T>,
        on_step: impl FnMut(&dyn Fn() -> BackwardStep<T>),
    ) -> Result<Gradients<T>> {
        if output.tape.id != self.id {
            return Err(TapeError::ForeignVar {
                op: "backward_with".into(),
            });
        }
        if !self.records {
            return Err(TapeError::NotRecorded);
        }
        let (shape, output_requires_grad) = {
            let nodes = self.nodes.borrow();
            let node = &nodes[output.index];
            (node.value.shape().to_vec(), node.requires_grad)
        };
        if grad_output.shape() != shape.as_slice() {
            return Err(TapeError::GradientShape {
                op: "backward_with".into(),
                what: "the output".into(),
                expected: shape,
                got: grad_output.shape().to_vec(),
            });
        }
        self.run_backward(output.index, output_requires_grad, grad_output, on_step)
    }

    /// The reverse walk from `output` (checked by the caller) with upstream `grad_output`;
    /// `on_step` is given, at each op, a way to make its [`BackwardStep`] (a no-op closure
    /// costs nothing).
    fn run_backward(
        &self,
        output: usize,
        output_requires_grad: bool,
        grad_output: ArrayD<T>,
        mut on_step: impl FnMut(&dyn Fn() -> BackwardStep<T>),
    ) -> Result<Gradients<T>> {
        let mut grads: Vec<Option<ArrayD<T>>> = vec![None; output + 1];
        if output_requires_grad {
            grads[output] = Some(grad_output);
        }
        // Per op, its inputs, which of them need a gradient and their values: lists refilled at
        // each op.
        let (mut inputs, mut needs_grad, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for index in (0..=output).rev() {
            let Some(grad) = grads[index].take() else {
                continue;
            };
            // Shared handles to the op and its values, and no borrow of the node list while its
            // backward runs: a backward may record on this tape.
            let (op, output_value) = {
                let nodes = self.nodes.borrow();
                let node = &nodes[index];
                let NodeKind::Op {
                    op,
                    inputs: node_inputs,
                } = &node.kind
                else {
                    grads[index] = Some(grad);
                    continue;
                };
                inputs.clear();
                inputs.extend_from_slice(node_inputs);
                needs_grad.clear();
                needs_grad.extend(node_inputs.iter().map(|&i| nodes[i].requires_grad));
                values.clear();
                values.extend(node_inputs.iter().map(|&i| Rc::clone(&nodes[i].value)));
                (Rc::clone(op), Rc::clone(&node.value))
            };
            let input_values: Vec<ArrayViewD<'_, T>> = values.iter().map(|value| value.view()).collect();
            let mut input_grads = op.backward(&BackwardArgs {
                inputs: &input_values,
                output: output_value.view(),
                grad_output: grad.view(),
                needs_grad: &needs_grad,
            })?;
            if input_grads.len() != inputs.len() {
                return Err(TapeError::GradientCount {
                    op: op.name().to_string(),
                    expected: inputs.len(),
                    got: input_grads.len(),
                });
            }
            for (position, input_grad) in input_grads.iter_mut().enumerate() {
                if !needs_grad[position] {
                    *input_grad = None;
                } else if let Some(g) = input_grad
                    .as_ref()
                    .filter(|g| g.shape() != values[position].shape())
                {
                    return Err(TapeError::GradientShape {
                        op: op.name().to_string(),
                        what: format!("input {position}"),
                        expected: values[position].shape().to_vec(),
                        got: g.shape().to_vec(),
                    });
                }
            }
            on_step(&|| BackwardStep {
                node: index,
                grad_output: grad.clone(),
                contributions: inputs
                    .iter()
                    .zip(&input_grads)
                    .filter_map(|(&input, g)| g.clone().map(|g| (input, g)))
                    .collect(),
            });
            grads[index] = Some(grad);
            for (&input, input_grad) in inputs.iter().zip(input_grads) {
                if let Some(input_grad) = input_grad {
                    accumulate(&mut grads[input], input_grad);
                }
            }
        }
        Ok(Gradients::new(self.id, grads))
    }
}

/// Adds `grad` into the slot, taking it as is when the slot is empty.
fn accumulate<T: Element>(slot: &mut Option<ArrayD<T>>, grad: ArrayD<T>) {
    match slot {
        Some(existing) => Zip::from(existing).and(&grad).for_each(|e, &g| *e = *e + g),
        None => *slot = Some(grad),
    }
}
