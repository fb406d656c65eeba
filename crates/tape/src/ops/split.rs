//! `split`: a value's elements, in row-major order, cut into consecutive parts of given shapes
//! (PyTorch's `x.flatten().split(sizes)` with each part viewed in its own shape).
//!
//! This is how an op with several results lives on a tape of single-output nodes: it returns
//! them concatenated, flat, and `split` hands them out. A fused backward recorded with
//! `create_graph` does this (BatchNorm's gives `dx`, `dgamma` and `dbeta` from one node).
//!
//! The backward of a part places its gradient into zeros of the whole (`embed`); the backward of
//! `embed` takes the part again. Parts that receive no gradient cost nothing.

use ndarray::{ArrayD, ArrayViewD, IxDyn};

use super::arity;
use crate::rule::{Rule, Tensor};
use crate::{BackwardArgs, Element, Function, GraphArgs, Result, TapeError, Var};

/// The elements `start .. start + len` (row-major) of the input, in `shape` (of `len`
/// elements). Backward: [`Embed`] the gradient at `start`.
pub struct Part {
    start: usize,
    shape: Vec<usize>,
}

/// The input's elements written at `start` (row-major) into zeros of shape `whole`.
/// Backward: the [`Part`] at `start`.
pub struct Embed {
    start: usize,
    whole: Vec<usize>,
}

/// The row-major elements of `x`, without a copy when they are contiguous.
fn flat<'a, T: Element>(x: &'a ArrayViewD<'_, T>) -> std::borrow::Cow<'a, [T]> {
    match x.as_slice() {
        Some(slice) => std::borrow::Cow::Borrowed(slice),
        None => std::borrow::Cow::Owned(x.iter().copied().collect()),
    }
}

pub(crate) fn part_array<T: Element>(
    x: &ArrayViewD<'_, T>,
    start: usize,
    shape: &[usize],
) -> Result<ArrayD<T>> {
    let len: usize = shape.iter().product();
    if start.checked_add(len).is_none_or(|end| end > x.len()) {
        return Err(TapeError::Shape {
            op: "split",
            what: "a part",
            expected: format!(
                "elements {start}..{} within the input's {}",
                start.saturating_add(len),
                x.len()
            ),
            got: shape.to_vec(),
        });
    }
    let values = flat(x)[start..start + len].to_vec();
    Ok(ArrayD::from_shape_vec(IxDyn(shape), values).unwrap_or_else(|_| unreachable!("lengths match")))
}

pub(crate) fn embed_array<T: Element>(
    x: &ArrayViewD<'_, T>,
    start: usize,
    whole: &[usize],
) -> Result<ArrayD<T>> {
    let total: usize = whole.iter().product();
    if start.checked_add(x.len()).is_none_or(|end| end > total) {
        return Err(TapeError::Shape {
            op: "embed",
            what: "the input",
            expected: format!(
                "at most {} elements after element {start} of {whole:?}",
                total.saturating_sub(start)
            ),
            got: x.shape().to_vec(),
        });
    }
    let mut out = ArrayD::zeros(IxDyn(whole));
    let slice = out
        .as_slice_mut()
        .unwrap_or_else(|| unreachable!("a new array is contiguous"));
    slice[start..start + x.len()].copy_from_slice(&flat(x));
    Ok(out)
}

impl<T: Element> Function<T> for Part {
    fn name(&self) -> &str {
        "split"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("split", inputs, 1)?;
        part_array(&inputs[0], self.start, &self.shape)
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Part {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let whole = inputs[0].dims();
        needs[0]
            .then(|| g.clone().embedded(self.start, &whole))
            .transpose()
            .map(|g| vec![g])
    }
}

impl<T: Element> Function<T> for Embed {
    fn name(&self) -> &str {
        "embed"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("embed", inputs, 1)?;
        embed_array(&inputs[0], self.start, &self.whole)
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Embed {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let shape = inputs[0].dims();
        needs[0]
            .then(|| g.clone().part(self.start, &shape))
            .transpose()
            .map(|g| vec![g])
    }
}

impl<'t, T: Element> Var<'t, T> {
    /// The elements, in row-major order, cut into consecutive parts of `shapes`, which must
    /// hold exactly as many elements in all. Each part is its own node: a gradient reaching a
    /// part flows back into its place in the whole.
    ///
    /// # Errors
    /// [`TapeError::Op`] when the parts do not hold exactly this value's elements.
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    ///
    /// let tape = tape::Tape::<f64>::new();
    /// let x = tape.var(array![1.0, 2.0, 3.0, 4.0, 5.0]);
    /// let parts = x.split(&[vec![2, 2], vec![1]])?;
    /// assert_eq!(parts[0].value().as_ref(), &array![[1.0, 2.0], [3.0, 4.0]].into_dyn());
    /// let grads = parts[1].sum().backward()?;
    /// assert_eq!(grads.wrt(x)?, &array![0.0, 0.0, 0.0, 0.0, 1.0].into_dyn());
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn split(self, shapes: &[Vec<usize>]) -> Result<Vec<Var<'t, T>>> {
        let sizes: Vec<usize> = shapes.iter().map(|shape| shape.iter().product()).collect();
        let total = self.value().len();
        if sizes.iter().try_fold(0usize, |sum, &size| sum.checked_add(size)) != Some(total) {
            let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
            return Err(TapeError::op(
                "split",
                format!(
                    "parts of {} elements, expected {total} in all (the input's)",
                    sizes.join(" + ")
                ),
            ));
        }
        let mut start = 0;
        let mut parts = Vec::with_capacity(shapes.len());
        for (shape, size) in shapes.iter().zip(sizes) {
            let part = Part {
                start,
                shape: shape.clone(),
            };
            parts.push(self.tape.apply(part, &[self])?);
            start += size;
        }
        Ok(parts)
    }

    /// This value's elements written at `start` (row-major) into zeros of shape `whole`: the
    /// backward of [`split`](Var::split), on the tape.
    pub(crate) fn embed(self, start: usize, whole: &[usize]) -> Result<Var<'t, T>> {
        let embed = Embed {
            start,
            whole: whole.to_vec(),
        };
        self.tape.apply(embed, &[self])
    }

    /// Elements `start ..` (row-major) in `shape`: one part of [`split`](Var::split).
    pub(crate) fn part(self, start: usize, shape: &[usize]) -> Result<Var<'t, T>> {
        let part = Part {
            start,
            shape: shape.to_vec(),
        };
        self.tape.apply(part, &[self])
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::uniform;
    use crate::{Tape, TapeError, check_gradients, check_second_order};

    #[test]
    fn parts_pass_both_gradient_checkers() {
        let x = uniform(&[2, 5], 1);
        // Every part used, each differently, so every element's gradient is distinct.
        fn f<'t>(v: &[crate::Var<'t, f64>]) -> crate::Result<crate::Var<'t, f64>> {
            let parts = v[0].split(&[vec![3], vec![2, 2], vec![3]])?;
            let a = parts[0].powi(2).sum();
            let b = parts[1].matmul(parts[1])?.sum();
            Ok(a + b + parts[2].exp().sum())
        }
        check_gradients(|_, v| f(v), std::slice::from_ref(&x)).unwrap();
        check_second_order(|_, v| f(v), &[x]).unwrap();
    }

    #[test]
    fn sizes_must_add_up() {
        let tape = Tape::<f64>::new();
        let x = tape.var(uniform(&[2, 3], 1));
        let error = x.split(&[vec![2], vec![2, 1]]).unwrap_err();
        assert!(matches!(&error, TapeError::Op { op, .. } if op == "split"));
        assert_eq!(
            error.to_string(),
            "split: parts of 2 + 2 elements, expected 6 in all (the input's)"
        );
        assert!(x.split(&[vec![6], vec![1]]).is_err());
        assert_eq!(x.split(&[vec![3, 2], vec![0]]).unwrap()[1].shape(), vec![0]);
    }
}
