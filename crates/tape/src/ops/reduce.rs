//! Reductions: `sum` and `mean` over chosen axes (or everything), `max` over one axis.
//! Their backward spreads the output gradient back over the reduced axes: evenly for `sum`
//! (scaled by `1/count` for `mean`), and only to the arg-max for `max`.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Zip};

use super::{arity, infallible};
use crate::rule::{Rule, Tensor};
use crate::{BackwardArgs, Element, Function, GraphArgs, Result, TapeError, Var};

/// Sorted, de-duplicated axes, each checked against the rank.
fn checked_axes(op: &'static str, axes: &[usize], ndim: usize) -> Result<Vec<usize>> {
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    match sorted.iter().find(|&&axis| axis >= ndim) {
        Some(&axis) => Err(TapeError::Axis { op, axis, ndim }),
        None => Ok(sorted),
    }
}

/// The input shape with each reduced axis set to 1: the shape of a keep-dims result.
fn kept_shape(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    let mut kept = shape.to_vec();
    for &axis in axes {
        kept[axis] = 1;
    }
    kept
}

/// Sums over `axes` (sorted), keeping them as size 1 if `keep_dims`.
fn sum_over<T: Element>(x: &ArrayViewD<'_, T>, axes: &[usize], keep_dims: bool) -> ArrayD<T> {
    let mut total = x.to_owned();
    for &axis in axes.iter().rev() {
        total = total.sum_axis(Axis(axis));
    }
    if keep_dims {
        total
            .into_shape_with_order(IxDyn(&kept_shape(x.shape(), axes)))
            .unwrap_or_else(|_| unreachable!("keep-dims shape has the same element count"))
    } else {
        total
    }
}

/// Sum over `axes`. Backward: every input element receives the gradient of its sum.
pub struct Sum {
    axes: Vec<usize>,
    keep_dims: bool,
}

impl<T: Element> Function<T> for Sum {
    fn name(&self) -> &str {
        "sum"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("sum", inputs, 1)?;
        self.axes = checked_axes("sum", &self.axes, inputs[0].ndim())?;
        Ok(sum_over(&inputs[0], &self.axes, self.keep_dims))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Sum {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let shape = inputs[0].dims();
        let kept = kept_shape(&shape, &self.axes);
        needs[0]
            .then(|| g.clone().spread(&kept, &shape, T::one()))
            .transpose()
            .map(|g| vec![g])
    }
}

/// Mean over `axes`, the sum divided by the count (not multiplied by `1 / count`, which rounds
/// twice). Backward: every input element receives its mean's gradient divided by the count.
pub struct Mean {
    axes: Vec<usize>,
    keep_dims: bool,
}

impl Mean {
    fn count<T: Element>(&self, shape: &[usize]) -> T {
        let count: f64 = self.axes.iter().map(|&axis| shape[axis] as f64).product();
        T::from_f64_lossy(count)
    }
}

impl<T: Element> Function<T> for Mean {
    fn name(&self) -> &str {
        "mean"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("mean", inputs, 1)?;
        self.axes = checked_axes("mean", &self.axes, inputs[0].ndim())?;
        let count: T = self.count(inputs[0].shape());
        Ok(sum_over(&inputs[0], &self.axes, self.keep_dims).mapv(|sum| sum / count))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Mean {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let shape = inputs[0].dims();
        let (kept, count) = (kept_shape(&shape, &self.axes), self.count::<T>(&shape));
        needs[0]
            .then(|| g.clone().spread(&kept, &shape, count))
            .transpose()
            .map(|g| vec![g])
    }
}

/// Maximum over one axis. Backward: the gradient goes to the arg-max of each lane (the first
/// one on ties), zero elsewhere.
pub struct Max {
    axis: usize,
    keep_dims: bool,
    /// Index of the maximum along `axis`, for each lane; saved by forward.
    argmax: ArrayD<usize>,
}

impl<T: Element> Function<T> for Max {
    fn name(&self) -> &str {
        "max"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("max", inputs, 1)?;
        let x = &inputs[0];
        if self.axis >= x.ndim() {
            return Err(TapeError::Axis {
                op: "max",
                axis: self.axis,
                ndim: x.ndim(),
            });
        }
        if x.shape()[self.axis] == 0 {
            return Err(TapeError::Shape {
                op: "max",
                what: "the input",
                expected: format!("a non-empty axis {}", self.axis),
                got: x.shape().to_vec(),
            });
        }
        let lanes = x.lanes(Axis(self.axis));
        self.argmax = Zip::from(lanes).map_collect(|lane| {
            let mut best = 0;
            for (i, &v) in lane.iter().enumerate() {
                if v > lane[best] || (v.is_nan() && !lane[best].is_nan()) {
                    best = i;
                }
            }
            best
        });
        let max = Zip::from(x.lanes(Axis(self.axis)))
            .and(&self.argmax)
            .map_collect(|lane, &i| lane[i]);
        Ok(if self.keep_dims {
            max.insert_axis(Axis(self.axis))
        } else {
            max
        })
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
    fn saved_bytes(&self) -> usize {
        self.argmax.len() * std::mem::size_of::<usize>()
    }
}

impl<T: Element> Rule<T> for Max {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let lanes = Lanes {
            argmax: &self.argmax,
            axis: self.axis,
            keep_dims: self.keep_dims,
        };
        needs[0]
            .then(|| g.clone().scattered(lanes, &inputs[0].dims()))
            .transpose()
            .map(|g| vec![g])
    }
}

impl<'t, T: Element> Var<'t, T> {
    /// Sum of every element, as a rank-0 value.
    pub fn sum(self) -> Var<'t, T> {
        let axes = (0..self.value().ndim()).collect();
        infallible(self.tape.apply(
            Sum {
                axes,
                keep_dims: false,
            },
            &[self],
        ))
    }

    /// Sum over `axes`; with `keep_dims` the reduced axes stay as size 1 (handy for
    /// broadcasting the result back against the input).
    ///
    /// # Errors
    /// [`TapeError::Axis`] if an axis is out of range.
    pub fn sum_axes(self, axes: &[usize], keep_dims: bool) -> Result<Var<'t, T>> {
        self.tape.apply(
            Sum {
                axes: axes.to_vec(),
                keep_dims,
            },
            &[self],
        )
    }

    /// Mean of every element, as a rank-0 value.
    pub fn mean(self) -> Var<'t, T> {
        let axes = (0..self.value().ndim()).collect();
        infallible(self.tape.apply(
            Mean {
                axes,
                keep_dims: false,
            },
            &[self],
        ))
    }

    /// Mean over `axes`, keeping them as size 1 if `keep_dims`.
    ///
    /// # Errors
    /// [`TapeError::Axis`] if an axis is out of range.
    pub fn mean_axes(self, axes: &[usize], keep_dims: bool) -> Result<Var<'t, T>> {
        self.tape.apply(
            Mean {
                axes: axes.to_vec(),
                keep_dims,
            },
            &[self],
        )
    }

    /// Maximum over `axis`; the gradient flows to the (first) arg-max.
    ///
    /// # Errors
    /// [`TapeError::Axis`] if the axis is out of range, [`TapeError::Shape`] if it is empty.
    pub fn max_axis(self, axis: usize, keep_dims: bool) -> Result<Var<'t, T>> {
        let argmax = ArrayD::zeros(IxDyn(&[]));
        self.tape.apply(
            Max {
                axis,
                keep_dims,
                argmax,
            },
            &[self],
        )
    }
}

mod lanes;

pub(crate) use self::lanes::{GatherLanes, Lanes, ScatterLanes};

#[cfg(test)]
mod tests {
    use ndarray::array;

    use crate::testing::uniform;
    use crate::{Tape, TapeError, check_gradients};

    #[test]
    fn sum_and_mean_pass_the_gradient_checker_over_any_axes() {
        let x = uniform(&[2, 3, 4], 5);
        for keep_dims in [false, true] {
            for axes in [&[0][..], &[1], &[2], &[0, 2], &[2, 0, 2], &[0, 1, 2]] {
                check_gradients(|_, v| v[0].sum_axes(axes, keep_dims), std::slice::from_ref(&x)).unwrap();
                check_gradients(|_, v| v[0].mean_axes(axes, keep_dims), std::slice::from_ref(&x)).unwrap();
            }
        }
        check_gradients(|_, v| Ok(v[0].sum()), std::slice::from_ref(&x)).unwrap();
        check_gradients(|_, v| Ok(v[0].mean()), &[x]).unwrap();
    }

    #[test]
    fn keep_dims_keeps_unit_axes() {
        let tape = Tape::<f64>::new();
        let x = tape.var(uniform(&[2, 3, 4], 0));
        assert_eq!(x.sum_axes(&[0, 2], true).unwrap().shape(), vec![1, 3, 1]);
        assert_eq!(x.sum_axes(&[0, 2], false).unwrap().shape(), vec![3]);
        assert_eq!(x.mean().shape(), Vec::<usize>::new());
        assert_eq!(x.max_axis(1, true).unwrap().shape(), vec![2, 1, 4]);
    }

    #[test]
    fn mean_divides_by_the_reduced_count() {
        let tape = Tape::<f32>::new();
        let x = tape.var(array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        assert_eq!(
            *x.mean_axes(&[1], false).unwrap().value(),
            array![2.0f32, 5.0].into_dyn()
        );
        let grads = x.mean_axes(&[0], false).unwrap().sum().backward().unwrap();
        assert_eq!(
            grads.wrt(x).unwrap(),
            &ndarray::ArrayD::from_elem(vec![2, 3], 0.5f32)
        );
    }

    #[test]
    fn max_sends_the_gradient_to_the_argmax() {
        // Distinct values, so the max is a differentiable point.
        let x = uniform(&[3, 4, 2], 9);
        for axis in 0..3 {
            for keep_dims in [false, true] {
                check_gradients(|_, v| v[0].max_axis(axis, keep_dims), std::slice::from_ref(&x)).unwrap();
            }
        }
        let tape = Tape::<f64>::new();
        let x = tape.var(array![[1.0, 5.0, 5.0], [-2.0, -3.0, -1.0]]);
        let max = x.max_axis(1, false).unwrap();
        assert_eq!(*max.value(), array![5.0, -1.0].into_dyn());
        let grads = max.backward_with(array![10.0, 20.0]).unwrap();
        // Ties: the first arg-max takes the gradient.
        assert_eq!(
            grads.wrt(x).unwrap(),
            &array![[0.0, 10.0, 0.0], [0.0, 0.0, 20.0]].into_dyn()
        );
    }

    #[test]
    fn bad_axes_are_errors() {
        let tape = Tape::<f64>::new();
        let x = tape.var(uniform(&[2, 3], 0));
        let error = x.sum_axes(&[0, 2], false).unwrap_err();
        assert!(
            matches!(
                error,
                TapeError::Axis {
                    op: "sum",
                    axis: 2,
                    ndim: 2
                }
            ),
            "{error}"
        );
        assert!(matches!(
            x.mean_axes(&[5], true),
            Err(TapeError::Axis { axis: 5, .. })
        ));
        assert!(matches!(
            x.max_axis(2, true),
            Err(TapeError::Axis { op: "max", .. })
        ));
        let empty = tape.var(ndarray::ArrayD::<f64>::zeros(vec![2, 0]));
        assert!(matches!(
            empty.max_axis(1, false),
            Err(TapeError::Shape { op: "max", .. })
        ));
    }
}
