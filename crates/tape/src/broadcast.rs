//! NumPy broadcasting: the shape two operands broadcast to, and the ONE helper that sums a
//! broadcast gradient back to an operand's shape. Every op that broadcasts uses these two.

use ndarray::{ArrayD, Axis};

use crate::{Element, Result, TapeError};

/// The shape `lhs` and `rhs` broadcast to under NumPy rules: shapes are aligned on their trailing
/// axes, and each pair of sizes must be equal or contain a 1.
///
/// # Errors
/// [`TapeError::Broadcast`] naming `op` and both shapes when they are incompatible.
///
/// # Example
/// ```
/// assert_eq!(tape::broadcast_shape("add", &[4, 1, 3], &[5, 1]).unwrap(), vec![4, 5, 3]);
/// assert!(tape::broadcast_shape("add", &[2, 3], &[4]).is_err());
/// ```
pub fn broadcast_shape(op: &'static str, lhs: &[usize], rhs: &[usize]) -> Result<Vec<usize>> {
    let ndim = lhs.len().max(rhs.len());
    let size_at = |shape: &[usize], i: usize| {
        // Axis i of the result, counted from the left, is axis i - (ndim - rank) of the operand.
        (i + shape.len()).checked_sub(ndim).map_or(1, |axis| shape[axis])
    };
    (0..ndim)
        .map(|i| match (size_at(lhs, i), size_at(rhs, i)) {
            (a, b) if a == b => Ok(a),
            (1, b) => Ok(b),
            (a, 1) => Ok(a),
            _ => Err(TapeError::Broadcast {
                op,
                lhs: lhs.to_vec(),
                rhs: rhs.to_vec(),
            }),
        })
        .collect()
}

/// Sums `grad`, the gradient of a broadcast result, back to `shape`, the shape of the operand that
/// was broadcast: the chain rule for broadcasting, since a broadcast copies one value to many
/// places and its gradient is the sum of theirs.
///
/// Leading axes the operand did not have are summed away; axes where the operand had size 1 are
/// summed with the axis kept.
///
/// # Errors
/// [`TapeError::Shape`] when `shape` does not broadcast to `grad`'s shape (a higher rank, or a
/// trailing axis that is neither equal nor 1).
///
/// # Example
/// ```
/// use ndarray::{ArrayD, IxDyn};
///
/// let grad = ArrayD::<f64>::ones(IxDyn(&[2, 3]));
/// assert_eq!(tape::sum_to_shape(grad.clone(), &[1, 3])?, ArrayD::from_elem(IxDyn(&[1, 3]), 2.0));
/// assert!(tape::sum_to_shape(grad, &[2]).is_err());
/// # Ok::<(), tape::TapeError>(())
/// ```
pub fn sum_to_shape<T: Element>(grad: ArrayD<T>, shape: &[usize]) -> Result<ArrayD<T>> {
    let broadcasts = shape.len() <= grad.ndim()
        && shape
            .iter()
            .rev()
            .zip(grad.shape().iter().rev())
            .all(|(&size, &grad_size)| size == grad_size || size == 1);
    if !broadcasts {
        return Err(TapeError::Shape {
            op: "sum_to_shape",
            what: "the target shape",
            expected: format!("a shape that broadcasts to the gradient's {:?}", grad.shape()),
            got: shape.to_vec(),
        });
    }
    let mut grad = grad;
    while grad.ndim() > shape.len() {
        grad = grad.sum_axis(Axis(0));
    }
    for (axis, &size) in shape.iter().enumerate() {
        if size == 1 && grad.shape()[axis] != 1 {
            grad = grad.sum_axis(Axis(axis)).insert_axis(Axis(axis));
        }
    }
    Ok(grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn broadcast_shape_follows_numpy() {
        assert_eq!(broadcast_shape("t", &[3], &[2, 3]).unwrap(), vec![2, 3]);
        assert_eq!(broadcast_shape("t", &[2, 1], &[1, 3]).unwrap(), vec![2, 3]);
        assert_eq!(broadcast_shape("t", &[], &[2, 3]).unwrap(), vec![2, 3]);
        assert_eq!(broadcast_shape("t", &[0, 1], &[1, 5]).unwrap(), vec![0, 5]);
    }

    #[test]
    fn incompatible_shapes_name_both() {
        let message = broadcast_shape("mul", &[2, 3], &[4]).unwrap_err().to_string();
        assert!(
            message.contains("mul") && message.contains("[2, 3]") && message.contains("[4]"),
            "{message}"
        );
    }

    #[test]
    fn sum_to_shape_sums_leading_and_unit_axes() {
        let grad = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |i| (i[0] * 12 + i[1] * 4 + i[2]) as f64);
        let reduced = sum_to_shape(grad.clone(), &[3, 1]).unwrap();
        assert_eq!(reduced.shape(), &[3, 1]);
        for j in 0..3 {
            let expected: f64 = (0..2)
                .flat_map(|i| (0..4).map(move |k| (i * 12 + j * 4 + k) as f64))
                .sum();
            assert_eq!(reduced[[j, 0]], expected);
        }
        assert_eq!(
            sum_to_shape(grad.clone(), &[])
                .unwrap()
                .into_raw_vec_and_offset()
                .0,
            vec![grad.sum()]
        );
        assert_eq!(sum_to_shape(grad.clone(), &[2, 3, 4]).unwrap(), grad);
    }

    #[test]
    fn a_shape_that_does_not_broadcast_to_the_gradient_is_an_error() {
        let grad = ArrayD::<f64>::ones(IxDyn(&[2, 3]));
        for shape in [&[2][..], &[3, 3], &[1, 2, 3], &[2, 1, 3]] {
            let error = sum_to_shape(grad.clone(), shape).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "sum_to_shape: the target shape has shape {shape:?}, expected a shape that \
                     broadcasts to the gradient's [2, 3]"
                )
            );
        }
    }
}
