//! [`Tape::grad`]: gradients as `Var`s on the same tape, recorded (`create_graph`) so that they
//! can be differentiated again, as `torch.autograd.grad(..., create_graph=True)`.

use std::rc::Rc;

use ndarray::ArrayD;

use super::{NodeKind, Tape, Var};
use crate::{Element, GraphArgs, Result, TapeError};

/// How [`Tape::grad`] runs.
#[derive(Debug, Clone, Default)]
pub struct GradOptions<T> {
    /// Record the backward pass on the tape, so that the gradients can be differentiated again.
    /// Without it the gradients are constants holding the values `backward` computes.
    pub create_graph: bool,
    /// The gradient of some loss with respect to the output, of its shape; `None` for a
    /// one-element output (the gradient 1).
    pub upstream: Option<ArrayD<T>>,
}

impl<T: Element> Tape<T> {
    /// The gradient of `output` with respect to each of `wrt`, as `Var`s on this tape (`None`
    /// where `output` does not depend on it).
    ///
    /// # Errors
    /// As [`Tape::backward_with`]; [`TapeError::NonScalarOutput`] without `upstream` for an
    /// output of more than one element; with `create_graph`, [`TapeError::NoGraphRule`] naming
    /// the first op on the way that cannot record its backward.
    ///
    /// # Example: a second derivative
    /// ```
    /// use ndarray::array;
    /// use tape::{GradOptions, Tape};
    ///
    /// let tape = Tape::new();
    /// let x = tape.var(array![1.0, 2.0]);
    /// let y = x.powi(3).sum(); // Σ x³
    /// let options = GradOptions { create_graph: true, ..GradOptions::default() };
    /// let dy = tape.grad(y, &[x], options)?[0].unwrap(); // 3x²
    /// let d2y = dy.sum().backward()?; // Σ 6x
    /// assert_eq!(d2y.wrt(x)?, &array![6.0, 12.0].into_dyn());
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn grad<'t>(
        &'t self,
        output: Var<'t, T>,
        wrt: &[Var<'t, T>],
        options: GradOptions<T>,
    ) -> Result<Vec<Option<Var<'t, T>>>> {
        let shape = self.shape_of(output, "grad")?;
        if wrt.iter().any(|v| v.tape.id != self.id) {
            return Err(TapeError::ForeignVar { op: "grad".into() });
        }
        let upstream = match options.upstream {
            Some(upstream) => upstream,
            None if shape.iter().product::<usize>() == 1 => ArrayD::from_elem(shape.clone(), T::one()),
            None => return Err(TapeError::NonScalarOutput { shape: shape.clone() }),
        };
        if !options.create_graph {
            let grads = self.backward_with(output, upstream)?;
            return Ok(wrt
                .iter()
                .map(|&v| grads.get(v).map(|g| self.constant(g.clone())))
                .collect());
        }
        if !self.records {
            return Err(TapeError::NotRecorded);
        }
        let first = self.len();
        let upstream = self.constant_checked(upstream, &shape)?;
        let mut grads: Vec<Option<Var<'t, T>>> = vec![None; output.index + 1];
        if self.requires_grad_of(output.index) {
            grads[output.index] = Some(upstream);
        }
        for index in (0..=output.index).rev() {
            let Some(grad) = grads[index] else { continue };
            let (op, inputs, needs_grad) = {
                let nodes = self.nodes.borrow();
                let NodeKind::Op { op, inputs } = &nodes[index].kind else {
                    continue;
                };
                let needs: Vec<bool> = inputs.iter().map(|&i| nodes[i].requires_grad).collect();
                (Rc::clone(op), inputs.clone(), needs)
            };
            let input_vars: Vec<Var<'t, T>> = inputs.iter().map(|&index| Var { tape: self, index }).collect();
            let args = GraphArgs {
                inputs: &input_vars,
                output: Var { tape: self, index },
                grad_output: grad,
                needs_grad: &needs_grad,
            };
            let input_grads = op.backward_graph(&args)?;
            if input_grads.len() != inputs.len() {
                return Err(TapeError::GradientCount {
                    op: op.name().to_string(),
                    expected: inputs.len(),
                    got: input_grads.len(),
                });
            }
            for (position, (input, input_grad)) in input_vars.iter().zip(input_grads).enumerate() {
                let Some(input_grad) = input_grad.filter(|_| needs_grad[position]) else {
                    continue;
                };
                if input_grad.shape() != input.shape() {
                    return Err(TapeError::GradientShape {
                        op: op.name().to_string(),
                        what: format!("input {position}"),
                        expected: input.shape(),
                        got: input_grad.shape(),
                    });
                }
                let slot = &mut grads[input.index];
                *slot = Some(match *slot {
                    Some(existing) => existing.try_add(input_grad)?,
                    None => input_grad,
                });
            }
        }
        self.recorded.borrow_mut().push(first..self.len());
        Ok(wrt
            .iter()
            .map(|v| grads.get(v.index).copied().flatten())
            .collect())
    }

    /// The nodes each recorded backward appended to this tape ([`Tape::grad`] with
    /// `create_graph`), as index ranges in the order they ran: the chain rule's own graph.
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use tape::{GradOptions, Tape};
    ///
    /// let tape = Tape::new();
    /// let x = tape.var(array![1.0, 2.0]);
    /// let y = (x * x).sum();
    /// let options = GradOptions { create_graph: true, ..GradOptions::default() };
    /// tape.grad(y, &[x], options)?;
    /// let backward = &tape.recorded_backwards()[0];
    /// assert_eq!((backward.start, backward.end), (3, tape.len()));
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn recorded_backwards(&self) -> Vec<std::ops::Range<usize>> {
        self.recorded.borrow().clone()
    }

    /// `value` as a constant, checked to have `shape`.
    fn constant_checked(&self, value: ArrayD<T>, shape: &[usize]) -> Result<Var<'_, T>> {
        if value.shape() != shape {
            return Err(TapeError::GradientShape {
                op: "grad".into(),
                what: "the output".into(),
                expected: shape.to_vec(),
                got: value.shape().to_vec(),
            });
        }
        Ok(self.constant(value))
    }
}
