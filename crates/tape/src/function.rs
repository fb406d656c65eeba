//! The custom-op API: an op is a forward that may save state, and a hand-written backward that
//! returns one gradient per input. Every primitive of this crate is written against it, and any
//! other crate can implement it (the `layers` crate's fused BatchNorm does).

use ndarray::{ArrayD, ArrayViewD};

use crate::{Element, Result, TapeError, Var};

/// A differentiable operation on the tape, like PyTorch's `torch.autograd.Function`.
///
/// [`Tape::apply`](crate::Tape::apply) calls [`forward`](Function::forward) once with the input
/// values and stores the op with its result; [`Tape::backward`](crate::Tape::backward) later calls
/// [`backward`](Function::backward) with the same inputs, the output and the output's gradient.
/// The tape keeps every input and output value anyway, so an op saves in `self` only what it
/// cannot cheaply recompute from them (an arg-max, a per-channel inverse standard deviation).
///
/// # Example: a custom op `y = x³` with a hand-written backward
/// ```
/// use ndarray::{ArrayD, ArrayViewD, array};
/// use tape::{BackwardArgs, Function, Result, Tape};
///
/// struct Cube;
///
/// impl Function<f64> for Cube {
///     fn name(&self) -> &str {
///         "cube"
///     }
///     fn forward(&mut self, inputs: &[ArrayViewD<'_, f64>]) -> Result<ArrayD<f64>> {
///         Ok(inputs[0].mapv(|x| x * x * x))
///     }
///     fn backward(&self, args: &BackwardArgs<'_, f64>) -> Result<Vec<Option<ArrayD<f64>>>> {
///         // d(x³)/dx = 3x², times the upstream gradient.
///         let x = &args.inputs[0];
///         Ok(vec![Some(&args.grad_output * &x.mapv(|x| 3.0 * x * x))])
///     }
/// }
///
/// let tape = Tape::new();
/// let x = tape.var(array![1.0, 2.0]);
/// let y = tape.apply(Cube, &[x])?;
/// let grads = y.sum().backward()?;
/// assert_eq!(grads.wrt(x)?, &array![3.0, 12.0].into_dyn());
///
/// // The gradient checker confirms the hand-written backward.
/// tape::check_gradients(|t, v| t.apply(Cube, v), &[array![0.5, -1.5].into_dyn()]).unwrap();
/// # Ok::<(), tape::TapeError>(())
/// ```
pub trait Function<T: Element>: 'static {
    /// A short name for errors and graph drawings, such as `"mul"` or `"batch_norm"`.
    fn name(&self) -> &str;

    /// Computes the output from the input values, saving in `self` what backward needs.
    ///
    /// # Errors
    /// Whatever the op finds wrong with its inputs (wrap your own error with
    /// [`TapeError::op`](crate::TapeError::op)).
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>>;

    /// Returns the gradient of the loss with respect to each input, in input order, given the
    /// gradient with respect to the output. Return `None` for an input whose
    /// [`needs_grad`](BackwardArgs::needs_grad) is false (or that is not differentiable);
    /// each `Some` must have its input's shape.
    ///
    /// # Errors
    /// Whatever the op finds wrong; the tape itself checks the count and shapes of the result.
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>>;

    /// The same gradients as [`backward`](Function::backward), recorded on the tape as `Var`s
    /// so that they can be differentiated again ([`Tape::grad`](crate::Tape::grad) with
    /// `create_graph`). The primitives write each derivative rule once, for both. The default
    /// is an error naming the op: an op without it can be differentiated once, not twice.
    ///
    /// # Errors
    /// [`TapeError::NoGraphRule`] by default; otherwise whatever the recorded ops return.
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        let _ = args;
        Err(TapeError::NoGraphRule {
            op: self.name().to_string(),
        })
    }

    /// The derivative rule in one line, for drawings of the backward pass
    /// ([`Tape::to_html`](crate::Tape::to_html)), such as `"cube: ∂/∂x = 3x²·g"`. The default,
    /// empty, leaves the drawing to name the op.
    fn rule(&self) -> &str {
        ""
    }

    /// Bytes this op keeps for its backward beyond the values the tape holds (its saved state).
    /// Used by [`Tape::saved_bytes`](crate::Tape::saved_bytes); the default is 0.
    fn saved_bytes(&self) -> usize {
        0
    }
}

/// What [`Function::backward`] is given. Only the tape makes these, from the values of the op's
/// own call, so an op's backward may rely on what its forward saw: the inputs it was given,
/// the output it returned, and a gradient of that output's shape.
#[derive(Debug)]
#[non_exhaustive]
pub struct BackwardArgs<'a, T: Element> {
    /// The input values, as they were given to `forward`.
    pub inputs: &'a [ArrayViewD<'a, T>],
    /// The value `forward` returned.
    pub output: ArrayViewD<'a, T>,
    /// The gradient of the loss with respect to the output (same shape as `output`).
    pub grad_output: ArrayViewD<'a, T>,
    /// For each input, whether its gradient is needed (false for constants and for values
    /// computed only from constants): the op may skip that work and return `None`.
    pub needs_grad: &'a [bool],
}

/// What [`Function::backward_graph`] is given: the op's inputs, output and output gradient as
/// `Var`s on the tape the gradients are recorded on.
#[derive(Debug)]
#[non_exhaustive]
pub struct GraphArgs<'a, 't, T: Element> {
    /// The inputs, as the op was applied to them.
    pub inputs: &'a [Var<'t, T>],
    /// The op's output.
    pub output: Var<'t, T>,
    /// The gradient of the loss with respect to the output, itself on the tape.
    pub grad_output: Var<'t, T>,
    /// For each input, whether its gradient is needed.
    pub needs_grad: &'a [bool],
}
