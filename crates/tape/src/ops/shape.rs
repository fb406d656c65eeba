//! Ops that move values without changing them: `reshape` (and `flatten`), `broadcast_to`,
//! `transpose`.
//! Their backward moves the gradient back: reshape it back, sum it back, transpose it back.

use ndarray::{ArrayD, ArrayViewD, IxDyn};

use super::arity;
use crate::rule::{Rule, Tensor};
use crate::{BackwardArgs, Element, Function, GraphArgs, Result, TapeError, Var};

/// Row-major reshape to `shape`. Backward: reshape the gradient to the input's shape.
pub struct Reshape {
    shape: Vec<usize>,
}

impl<T: Element> Function<T> for Reshape {
    fn name(&self) -> &str {
        "reshape"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("reshape", inputs, 1)?;
        let x = &inputs[0];
        let count = element_count::<T>(&self.shape);
        if count != Some(x.len()) {
            return Err(TapeError::Reshape {
                from: x.shape().to_vec(),
                to: self.shape.clone(),
                count,
            });
        }
        Ok(reshaped(x, &self.shape))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Reshape {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let shape = inputs[0].dims();
        needs[0]
            .then(|| g.clone().reshaped(&shape))
            .transpose()
            .map(|g| vec![g])
    }
}

/// The number of elements of an array of `shape`, if one can exist: `None` when the product of
/// its non-zero sizes exceeds `isize::MAX` (ndarray's limit, for strides), or its bytes do (the
/// most any allocation can hold).
pub(crate) fn element_count<T>(shape: &[usize]) -> Option<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&size| size != 0)
        .try_fold(1usize, |count, &size| count.checked_mul(size))
        .filter(|&count| count <= isize::MAX as usize)?;
    let count = if shape.contains(&0) { 0 } else { nonzero };
    let bytes = count.checked_mul(std::mem::size_of::<T>())?;
    (bytes <= isize::MAX as usize).then_some(count)
}

fn reshaped<T: Element>(x: &ArrayViewD<'_, T>, shape: &[usize]) -> ArrayD<T> {
    x.to_shape(IxDyn(shape))
        .unwrap_or_else(|_| unreachable!("element counts were checked"))
        .into_owned()
}

/// Broadcast (NumPy rules) to `shape`. Backward: sum the gradient back with [`sum_to_shape`](crate::sum_to_shape).
pub struct BroadcastTo {
    shape: Vec<usize>,
}

impl<T: Element> Function<T> for BroadcastTo {
    fn name(&self) -> &str {
        "broadcast_to"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("broadcast_to", inputs, 1)?;
        let x = &inputs[0];
        if element_count::<T>(&self.shape).is_none() {
            return Err(TapeError::TooLarge {
                op: "broadcast_to",
                shape: self.shape.clone(),
            });
        }
        match x.broadcast(IxDyn(&self.shape)) {
            Some(view) => Ok(view.to_owned()),
            None => Err(TapeError::Shape {
                op: "broadcast_to",
                what: "the input",
                expected: format!("a shape that broadcasts to {:?}", self.shape),
                got: x.shape().to_vec(),
            }),
        }
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for BroadcastTo {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let shape = inputs[0].dims();
        needs[0]
            .then(|| g.clone().summed_to(&shape))
            .transpose()
            .map(|g| vec![g])
    }
}

/// Transpose of a 2-D value. Backward: transpose the gradient.
pub struct Transpose;

impl<T: Element> Function<T> for Transpose {
    fn name(&self) -> &str {
        "transpose"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("transpose", inputs, 1)?;
        let x = &inputs[0];
        if x.ndim() != 2 {
            return Err(TapeError::Shape {
                op: "transpose",
                what: "the input",
                expected: "a 2-D array".into(),
                got: x.shape().to_vec(),
            });
        }
        Ok(swap_last(x))
    }
    // The transpose of a 2-D value is `swap_last_axes`: the same derivative.
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        SwapLastAxes.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        SwapLastAxes.graph(args)
    }
}

/// A copy with the last two axes swapped (`a[..., i, j]` becomes `a[..., j, i]`).
pub(crate) fn swap_last<T: Element>(x: &ArrayViewD<'_, T>) -> ArrayD<T> {
    let mut view = x.view();
    let rank = view.ndim();
    view.swap_axes(rank - 2, rank - 1);
    view.as_standard_layout().into_owned()
}

/// The last two axes swapped, for rank 2 or more: each matrix of a batch transposed (PyTorch's
/// `x.mT`). Backward: swap the gradient's.
pub struct SwapLastAxes;

impl<T: Element> Function<T> for SwapLastAxes {
    fn name(&self) -> &str {
        "swap_last_axes"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("swap_last_axes", inputs, 1)?;
        let x = &inputs[0];
        if x.ndim() < 2 {
            return Err(TapeError::Shape {
                op: "swap_last_axes",
                what: "the input",
                expected: "rank 2 or more".into(),
                got: x.shape().to_vec(),
            });
        }
        Ok(swap_last(x))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for SwapLastAxes {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = (inputs, output);
        needs[0]
            .then(|| g.clone().swapped_last())
            .transpose()
            .map(|g| vec![g])
    }
}

impl<'t, T: Element> Var<'t, T> {
    /// This value summed down to `shape`, a shape it was broadcast from (NumPy's rules): the
    /// backward of a broadcast, on the tape.
    ///
    /// # Errors
    /// [`TapeError::Shape`](crate::TapeError::Shape) when `shape` does not broadcast to this
    /// value's shape.
    pub fn sum_to(self, shape: &[usize]) -> Result<Var<'t, T>> {
        let own = self.shape();
        if own == shape {
            return Ok(self);
        }
        let broadcasts = shape.len() <= own.len()
            && shape
                .iter()
                .rev()
                .zip(own.iter().rev())
                .all(|(&s, &o)| s == o || s == 1);
        if !broadcasts {
            return Err(crate::TapeError::Shape {
                op: "sum_to",
                what: "the target shape",
                expected: format!("a shape that broadcasts to {own:?}"),
                got: shape.to_vec(),
            });
        }
        let leading = own.len() - shape.len();
        let axes: Vec<usize> = (0..own.len())
            .filter(|&axis| axis < leading || (shape[axis - leading] == 1 && own[axis] != 1))
            .collect();
        self.sum_axes(&axes, true)?.reshape(shape)
    }

    /// The same value as a constant on the same tape: no gradient flows back through it, as
    /// PyTorch's `x.detach()`. The value is copied (a constant owns its value).
    ///
    /// # Example
    /// ```
    /// let tape = tape::Tape::<f64>::new();
    /// let x = tape.var(ndarray::array![3.0]);
    /// // d(x · stop(x))/dx = stop(x) = 3, where d(x · x)/dx = 6.
    /// let grads = (x * x.detach()).sum().backward()?;
    /// assert_eq!(grads.wrt(x)?[0], 3.0);
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn detach(self) -> Var<'t, T> {
        self.tape.constant(self.value().as_ref().clone())
    }

    /// Row-major reshape.
    ///
    /// # Errors
    /// [`TapeError::Reshape`] if `shape` does not have the same number of elements.
    pub fn reshape(self, shape: &[usize]) -> Result<Var<'t, T>> {
        self.tape.apply(
            Reshape {
                shape: shape.to_vec(),
            },
            &[self],
        )
    }

    /// Every axis after the first flattened into one: `(N, ...)` to `(N, product of the rest)`,
    /// as PyTorch's `nn.Flatten()` (a reshape, so the gradient is reshaped back).
    ///
    /// # Errors
    /// [`TapeError::Shape`] if the value has rank below 2.
    ///
    /// # Example
    /// ```
    /// let tape = tape::Tape::<f32>::new();
    /// let x = tape.var(ndarray::Array4::<f32>::zeros((60, 32, 4, 4)));
    /// assert_eq!(x.flatten()?.shape(), vec![60, 512]);
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn flatten(self) -> Result<Var<'t, T>> {
        match self.shape().as_slice() {
            [n, rest @ ..] if !rest.is_empty() => {
                let shape = [*n, rest.iter().product()];
                self.reshape(&shape)
            }
            shape => Err(TapeError::Shape {
                op: "flatten",
                what: "the input",
                expected: "rank 2 or more, (N, ...)".into(),
                got: shape.to_vec(),
            }),
        }
    }

    /// The last two axes swapped, for rank 2 or more: each matrix of a batch transposed.
    ///
    /// # Errors
    /// [`TapeError::Shape`] for rank 0 or 1.
    pub fn swap_last_axes(self) -> Result<Var<'t, T>> {
        self.tape.apply(SwapLastAxes, &[self])
    }

    /// Broadcast to `shape` (NumPy rules), copying.
    ///
    /// # Errors
    /// [`TapeError::Shape`] if the value does not broadcast to `shape`, [`TapeError::TooLarge`]
    /// if an array of `shape` could not be allocated.
    pub fn broadcast_to(self, shape: &[usize]) -> Result<Var<'t, T>> {
        self.tape.apply(
            BroadcastTo {
                shape: shape.to_vec(),
            },
            &[self],
        )
    }

    /// Transpose of a 2-D value.
    ///
    /// # Errors
    /// [`TapeError::Shape`] if the value is not 2-D.
    pub fn transpose(self) -> Result<Var<'t, T>> {
        self.tape.apply(Transpose, &[self])
    }
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use crate::testing::uniform;
    use crate::{Tape, TapeError, check_gradients};

    #[test]
    fn shape_ops_pass_the_gradient_checker() {
        let x = uniform(&[2, 6], 1);
        check_gradients(|_, v| v[0].reshape(&[3, 2, 2]), std::slice::from_ref(&x)).unwrap();
        check_gradients(|_, v| v[0].flatten(), &[uniform(&[2, 3, 2, 2], 4)]).unwrap();
        check_gradients(|_, v| v[0].transpose(), std::slice::from_ref(&x)).unwrap();
        check_gradients(|_, v| v[0].broadcast_to(&[4, 2, 6]), &[x]).unwrap();
        check_gradients(|_, v| v[0].broadcast_to(&[3, 5]), &[uniform(&[3, 1], 2)]).unwrap();
        // A transposed value flows on correctly through a reshape (a non-contiguous input).
        check_gradients(|_, v| v[0].transpose()?.reshape(&[12]), &[uniform(&[3, 4], 3)]).unwrap();
    }

    #[test]
    fn values_move_as_numpy_moves_them() {
        let tape = Tape::<f32>::new();
        let x = tape.var(array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        assert_eq!(
            *x.transpose().unwrap().value(),
            array![[1.0f32, 4.0], [2.0, 5.0], [3.0, 6.0]].into_dyn()
        );
        assert_eq!(
            *x.reshape(&[3, 2]).unwrap().value(),
            array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]].into_dyn()
        );
        let row = tape.var(array![1.0f32, 2.0]);
        assert_eq!(
            *row.broadcast_to(&[2, 2]).unwrap().value(),
            array![[1.0f32, 2.0], [1.0, 2.0]].into_dyn()
        );
    }

    #[test]
    fn shape_errors_say_expected_and_got() {
        let tape = Tape::<f64>::new();
        let x = tape.var(uniform(&[2, 3], 0));
        assert_eq!(
            x.reshape(&[4, 2]).unwrap_err().to_string(),
            "reshape: the new shape [4, 2] holds 8 elements, expected 6 elements (the input's shape [2, 3])"
        );
        // Sizes whose product overflows are an error, not a wrapped count (2⁶³ + 3 times 2 wraps
        // to 6, the input's count).
        let huge = [(1usize << 63) + 3, 2];
        assert_eq!(
            x.reshape(&huge).unwrap_err().to_string(),
            format!(
                "reshape: the new shape {huge:?} is larger than an array can be, expected 6 \
                 elements (the input's shape [2, 3])"
            )
        );
        assert!(matches!(
            x.broadcast_to(&[1 << 40, 1 << 30, 3]),
            Err(TapeError::TooLarge {
                op: "broadcast_to",
                ..
            })
        ));
        assert_eq!(
            x.broadcast_to(&[3, 3]).unwrap_err().to_string(),
            "broadcast_to: the input has shape [2, 3], expected a shape that broadcasts to [3, 3]"
        );
        assert_eq!(
            tape.var(uniform(&[3], 0)).flatten().unwrap_err().to_string(),
            "flatten: the input has shape [3], expected rank 2 or more, (N, ...)"
        );
        let cube = tape.var(uniform(&[2, 2, 2], 0));
        assert!(matches!(
            cube.transpose(),
            Err(TapeError::Shape { op: "transpose", .. })
        ));
    }
}
