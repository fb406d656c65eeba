//! Softmax cross-entropy: a fused, numerically stable node, and its composition from primitives.
//!
//! For logits `z` of one row and its label `y`, with `K` classes:
//!
//! ```text
//! loss = log Σⱼ exp(zⱼ) - z_y = m + log Σⱼ exp(zⱼ - m) - z_y      (m = maxⱼ zⱼ: no overflow)
//! ∂loss/∂zⱼ = softmax(z)ⱼ - [j = y]
//! ```
//!
//! The batch loss is the mean over rows, so each row's gradient is divided by `N`.
//!
//! # The double backward
//! Recording the backward ([`tape::Tape::grad`] with `create_graph`) adds one fused node,
//! `softmax_cross_entropy_backward`, with inputs `z` and the upstream scalar `g` and result
//! `D = (g/N)(p - onehot)`, where `p = softmax(z)` row by row. Given `A`, the gradient of some
//! `S` with respect to `D`, and since `∂pⱼ/∂zₖ = pⱼ([j = k] - pₖ)`:
//!
//! ```text
//! ∂S/∂zₖ = (g/N) pₖ (Aₖ - Σⱼ Aⱼ pⱼ)          (row by row)
//! ∂S/∂g  = (1/N) Σ A (p - onehot)
//! ```
//!
//! Its own backward cannot be recorded: a third derivative through it is
//! [`TapeError::NoGraphRule`] naming `softmax_cross_entropy_backward`.

use ndarray::{ArrayD, ArrayView2, ArrayViewD, Axis, Ix2};
use tape::{BackwardArgs, Element, Function, GraphArgs, TapeError, Var};

use crate::error::{Error, Result};

/// The logits as `(N, classes)`, with at least one row and one class: the loss is a mean over
/// rows, and a row's prediction is one of its classes.
fn as_matrix<'a, T: Element>(logits: &ArrayViewD<'a, T>) -> Result<ArrayView2<'a, T>> {
    let shape_error = || Error::Shape {
        name: "logits",
        got: logits.shape().to_vec(),
        expected: "rank 2, (N, classes), with at least one row and one class".into(),
    };
    let matrix = logits
        .clone()
        .into_dimensionality::<Ix2>()
        .map_err(|_| shape_error())?;
    if matrix.is_empty() {
        return Err(shape_error());
    }
    Ok(matrix)
}

fn check_labels(labels: &[usize], rows: usize, classes: usize) -> Result<()> {
    if labels.len() != rows {
        return Err(Error::Length {
            name: "labels",
            got: labels.len(),
            expected: rows,
            of: "rows of logits",
        });
    }
    match labels.iter().enumerate().find(|&(_, &label)| label >= classes) {
        Some((row, &label)) => Err(Error::Label { row, label, classes }),
        None => Ok(()),
    }
}

/// Per row: the maximum, and `log Σ exp(z - max)`, in f64.
fn row_log_sum_exp<T: Element>(row: ndarray::ArrayView1<'_, T>) -> (f64, f64) {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z.as_f64()));
    let sum: f64 = row.iter().map(|&z| (z.as_f64() - max).exp()).sum();
    (max, sum.ln())
}

/// The fused node: input the logits, the labels held by the node; saves nothing else (the
/// softmax is recomputed from the logits in backward).
#[derive(Debug, Clone)]
struct SoftmaxCrossEntropy {
    labels: Vec<usize>,
}

impl<T: Element> Function<T> for SoftmaxCrossEntropy {
    fn name(&self) -> &str {
        "softmax_cross_entropy"
    }

    fn rule(&self) -> &str {
        "softmax_cross_entropy (fused): ∂/∂z = (g/N)(softmax(z) - onehot(labels))"
    }

    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        let logits = as_matrix(&inputs[0]).map_err(|e| TapeError::op("softmax_cross_entropy", e))?;
        check_labels(&self.labels, logits.nrows(), logits.ncols())
            .map_err(|e| TapeError::op("softmax_cross_entropy", e))?;
        let total: f64 = logits
            .outer_iter()
            .zip(&self.labels)
            .map(|(row, &label)| {
                let (max, log_sum) = row_log_sum_exp(row);
                max + log_sum - row[label].as_f64()
            })
            .sum();
        Ok(ndarray::arr0(T::from_f64_lossy(total / logits.nrows() as f64)).into_dyn())
    }

    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        let logits = as_matrix(&args.inputs[0]).map_err(|e| TapeError::op("softmax_cross_entropy", e))?;
        let g = args.grad_output.iter().next().map_or(0.0, |g| g.as_f64());
        Ok(vec![
            args.needs_grad[0].then(|| grad_logits(logits, &self.labels, g)),
        ])
    }

    /// One fused node, `softmax_cross_entropy_backward` (see the [module docs](self)).
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        if !args.needs_grad[0] {
            return Ok(vec![None]);
        }
        let node = SoftmaxCrossEntropyBackward {
            labels: self.labels.clone(),
        };
        let logits = args.inputs[0];
        Ok(vec![Some(
            logits.tape().apply(node, &[logits, args.grad_output])?,
        )])
    }
}

/// Calls `each(row, p)` with each row's softmax `p`, in f64.
fn softmax_rows<T: Element>(logits: ArrayView2<'_, T>, mut each: impl FnMut(usize, &[f64])) {
    let mut p = vec![0.0; logits.ncols()];
    for (i, row) in logits.outer_iter().enumerate() {
        let (max, log_sum) = row_log_sum_exp(row);
        for (p, &z) in p.iter_mut().zip(row) {
            *p = (z.as_f64() - max - log_sum).exp();
        }
        each(i, &p);
    }
}

/// `(g/N)(softmax(z) - onehot)`: the gradient of `g ·` the mean loss.
fn grad_logits<T: Element>(logits: ArrayView2<'_, T>, labels: &[usize], g: f64) -> ArrayD<T> {
    let scale = g / logits.nrows() as f64;
    let mut grad = logits.mapv(|_| T::zero());
    softmax_rows(logits, |i, p| {
        for (j, (d, &p)) in grad.row_mut(i).iter_mut().zip(p).enumerate() {
            *d = T::from_f64_lossy(scale * (p - if j == labels[i] { 1.0 } else { 0.0 }));
        }
    });
    grad.into_dyn()
}

/// The recorded backward of [`SoftmaxCrossEntropy`]: inputs the logits and the upstream
/// scalar, result the logits' gradient; its backward is the double backward of the module docs.
struct SoftmaxCrossEntropyBackward {
    labels: Vec<usize>,
}

impl<T: Element> Function<T> for SoftmaxCrossEntropyBackward {
    fn name(&self) -> &str {
        "softmax_cross_entropy_backward"
    }

    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        let op = "softmax_cross_entropy_backward";
        let [logits, g] = inputs else {
            return Err(TapeError::op(
                op,
                format!("takes 2 inputs (logits, dloss), got {}", inputs.len()),
            ));
        };
        let logits = as_matrix(logits).map_err(|e| TapeError::op(op, e))?;
        check_labels(&self.labels, logits.nrows(), logits.ncols()).map_err(|e| TapeError::op(op, e))?;
        let Some(g) = g.iter().next().filter(|_| g.len() == 1) else {
            return Err(TapeError::op(
                op,
                format!("dloss has shape {:?}, expected one value", g.shape()),
            ));
        };
        Ok(grad_logits(logits, &self.labels, g.as_f64()))
    }

    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        let logits =
            as_matrix(&args.inputs[0]).map_err(|e| TapeError::op("softmax_cross_entropy_backward", e))?;
        let g = args.inputs[1].iter().next().map_or(0.0, |g| g.as_f64());
        let a = &args.grad_output;
        let n = logits.nrows() as f64;
        let mut d_logits = logits.mapv(|_| T::zero());
        let mut d_g = 0.0;
        softmax_rows(logits, |i, p| {
            let a = a.index_axis(Axis(0), i);
            let a_dot_p: f64 = a.iter().zip(p).map(|(&a, &p)| a.as_f64() * p).sum();
            d_g += a_dot_p - a[self.labels[i]].as_f64();
            for ((d, &a), &p) in d_logits.row_mut(i).iter_mut().zip(&a).zip(p) {
                *d = T::from_f64_lossy(g / n * p * (a.as_f64() - a_dot_p));
            }
        });
        let d_g = ArrayD::from_elem(args.inputs[1].raw_dim(), T::from_f64_lossy(d_g / n));
        Ok(vec![
            args.needs_grad[0].then(|| d_logits.into_dyn()),
            args.needs_grad[1].then_some(d_g),
        ])
    }
}

/// Mean softmax cross-entropy of `logits` `(N, classes)` against `labels` (one class index per
/// row), as one fused node: stable for any finite logits (1e4 included), accumulated in f64.
///
/// # Errors
/// [`Error::Shape`] when `logits` is not 2-D, [`Error::Length`] when `labels` does not have
/// one entry per row, [`Error::Label`] for a label out of range.
///
/// # Example
/// ```
/// use ndarray::array;
/// let tape = tape::Tape::<f64>::new();
/// let logits = tape.var(array![[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]]);
/// let loss = layers::softmax_cross_entropy(logits, &[0, 1])?;
/// let grads = loss.backward()?;
/// assert!(loss.scalar() > 0.0 && grads.wrt(logits)?.sum().abs() < 1e-15);
/// # Ok::<(), layers::Error>(())
/// ```
pub fn softmax_cross_entropy<'t, T: Element>(logits: Var<'t, T>, labels: &[usize]) -> Result<Var<'t, T>> {
    let value = logits.value();
    let matrix = as_matrix(&value.view())?;
    check_labels(labels, matrix.nrows(), matrix.ncols())?;
    let node = SoftmaxCrossEntropy {
        labels: labels.to_vec(),
    };
    Ok(logits.tape().apply(node, &[logits])?)
}

/// The same loss from tape primitives: `mean(max + ln Σ exp(z - max) - Σ z · onehot)`. The tape
/// derives its gradient; tests check it against the fused node.
///
/// # Errors
/// As [`softmax_cross_entropy`].
pub fn softmax_cross_entropy_composed<'t, T: Element>(
    logits: Var<'t, T>,
    labels: &[usize],
) -> Result<Var<'t, T>> {
    let value = logits.value();
    let matrix = as_matrix(&value.view())?;
    let (rows, classes) = matrix.dim();
    check_labels(labels, rows, classes)?;
    let onehot =
        ndarray::Array2::from_shape_fn(
            (rows, classes),
            |(i, j)| if labels[i] == j { T::one() } else { T::zero() },
        );
    let onehot = logits.tape().constant(onehot);
    let max = logits.max_axis(1, true)?;
    let log_sum_exp = logits
        .try_sub(max)?
        .exp()
        .sum_axes(&[1], true)?
        .ln()
        .try_add(max)?;
    let picked = logits.try_mul(onehot)?.sum_axes(&[1], true)?;
    Ok(log_sum_exp.try_sub(picked)?.mean())
}

/// Fraction of rows whose largest logit is at the label (the first of equal largest ones).
///
/// # Errors
/// As [`softmax_cross_entropy`] for shapes and labels, and [`Error::Nan`] when a logit is NaN
/// (a row with NaN has no largest logit: the net's output is not a prediction).
pub fn accuracy<T: Element>(logits: &ArrayD<T>, labels: &[usize]) -> Result<f64> {
    let matrix = as_matrix(&logits.view())?;
    check_labels(labels, matrix.nrows(), matrix.ncols())?;
    if let Some(((row, column), _)) = matrix.indexed_iter().find(|(_, z)| z.is_nan()) {
        return Err(Error::Nan {
            name: "logits",
            index: vec![row, column],
        });
    }
    let correct = matrix
        .axis_iter(Axis(0))
        .zip(labels)
        .filter(|(row, label)| {
            let best = row
                .iter()
                .enumerate()
                .fold(0, |best, (j, &z)| if z > row[best] { j } else { best });
            best == **label
        })
        .count();
    Ok(correct as f64 / matrix.nrows() as f64)
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, array};
    use tape::{Tape, check_gradients};

    use super::*;

    #[test]
    fn fused_and_composed_agree_and_pass_the_gradient_checker() {
        let logits = array![
            [0.3, -1.2, 2.0, 0.1],
            [1.5, 0.4, -0.3, 0.0],
            [-2.0, 0.7, 0.2, 1.1]
        ]
        .into_dyn();
        let labels = [2, 0, 3];
        check_gradients(
            |_, v| Ok(softmax_cross_entropy(v[0], &labels)?),
            std::slice::from_ref(&logits),
        )
        .unwrap();
        check_gradients(
            |_, v| Ok(softmax_cross_entropy_composed(v[0], &labels)?),
            std::slice::from_ref(&logits),
        )
        .unwrap();
        let run = |composed: bool| {
            let tape = Tape::<f64>::new();
            let z = tape.var(logits.clone());
            let loss = if composed {
                softmax_cross_entropy_composed(z, &labels)
            } else {
                softmax_cross_entropy(z, &labels)
            };
            let loss = loss.unwrap();
            let grads = loss.backward().unwrap();
            (loss.scalar(), grads.wrt(z).unwrap().clone())
        };
        let ((fused, g_fused), (composed, g_composed)) = (run(false), run(true));
        approx::assert_relative_eq!(fused, composed, max_relative = 1e-14);
        assert!(g_fused.abs_diff_eq(&g_composed, 1e-15));
    }

    #[test]
    fn extreme_logits_give_finite_loss_and_gradients() {
        let tape = Tape::<f32>::new();
        let z = tape.var(array![[1e4f32, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, 1e4]]);
        let loss = softmax_cross_entropy(z, &[1, 2, 0]).unwrap();
        let grads = loss.backward().unwrap();
        // Row 0 is wrong by 2e4, row 1 right, row 2 a three-way tie: (2e4 + 0 + ln 3) / 3.
        approx::assert_relative_eq!(
            f64::from(loss.scalar()),
            (2e4 + 3f64.ln()) / 3.0,
            max_relative = 1e-6
        );
        assert!(grads.wrt(z).unwrap().iter().all(|g| g.is_finite()));
        let fused_f64 = {
            let tape = Tape::<f64>::new();
            let z = tape.var(array![[1e4, -1e4, 0.0]]);
            let composed = softmax_cross_entropy_composed(z, &[0]).unwrap();
            composed.scalar()
        };
        assert_eq!(fused_f64, 0.0);
    }

    #[test]
    fn bad_labels_and_shapes_are_errors() {
        let tape = Tape::<f64>::new();
        let z = tape.var(Array2::<f64>::zeros((3, 4)));
        assert_eq!(
            softmax_cross_entropy(z, &[0, 1]).unwrap_err().to_string(),
            "labels has 2 elements, expected 3 (rows of logits)"
        );
        assert_eq!(
            softmax_cross_entropy(z, &[0, 4, 1]).unwrap_err().to_string(),
            "label 4 at row 1 is out of range for 4 classes"
        );
        assert_eq!(
            softmax_cross_entropy(tape.var(Array2::<f64>::zeros((1, 3))), &[])
                .unwrap_err()
                .to_string(),
            "labels has 0 elements, expected 1 (rows of logits)"
        );
        assert_eq!(
            softmax_cross_entropy(z, &[0]).unwrap_err().to_string(),
            "labels has 1 element, expected 3 (rows of logits)"
        );
        let flat = tape.var(ndarray::Array1::<f64>::zeros(4));
        let expected = "expected rank 2, (N, classes), with at least one row and one class";
        assert_eq!(
            softmax_cross_entropy(flat, &[0]).unwrap_err().to_string(),
            format!("logits has shape [4], {expected}")
        );
        // An empty batch has no mean loss and no accuracy (it gave -0.0 and 0).
        let empty = Array2::<f64>::zeros((0, 3));
        assert_eq!(
            softmax_cross_entropy(tape.var(empty.clone()), &[])
                .unwrap_err()
                .to_string(),
            format!("logits has shape [0, 3], {expected}")
        );
        assert!(accuracy(&empty.into_dyn(), &[]).is_err());
        assert!(accuracy(&Array2::<f64>::zeros((2, 0)).into_dyn(), &[0, 0]).is_err());
    }

    #[test]
    fn nan_logits_have_no_accuracy() {
        // NaN compared false with every logit, so the row counted as a prediction of class 0.
        let logits = array![[0.1, 0.9], [f64::NAN, 0.2]].into_dyn();
        assert_eq!(
            accuracy(&logits, &[1, 0]).unwrap_err().to_string(),
            "logits has NaN at index [1, 0]; expected numbers (a net that diverged gives NaN)"
        );
        // Infinities are numbers: the largest logit is well defined.
        let logits = array![[f64::NEG_INFINITY, f64::INFINITY], [1.0, f64::NEG_INFINITY]].into_dyn();
        assert_eq!(accuracy(&logits, &[1, 0]).unwrap(), 1.0);
    }

    #[test]
    fn accuracy_counts_argmax_hits() {
        let logits = array![[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]].into_dyn();
        assert_eq!(accuracy(&logits, &[1, 1, 1]).unwrap(), 2.0 / 3.0);
    }
}
