//! Matrix product, batched as NumPy's `matmul`: `a` of shape `(..., m, k)` and `b` of shape
//! `(..., k, n)` give `(..., m, n)`, one product per matrix of the batch, where the leading
//! (batch) axes broadcast. For `C = A·B` with upstream gradient `G`: `∂/∂A = G·Bᵀ` and
//! `∂/∂B = Aᵀ·G` for each matrix, summed back over the batch axes an operand was broadcast
//! along.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, Axis, Ix2, IxDyn};

use super::arity;
use super::shape::element_count;
use crate::rule::{Rule, Tensor};
use crate::{BackwardArgs, Element, Function, GraphArgs, Result, TapeError, Var, broadcast_shape};

fn rank_error(x: &ArrayViewD<'_, impl Element>, what: &'static str) -> TapeError {
    TapeError::Shape {
        op: "matmul",
        what,
        expected: "rank 2 or more (a matrix, or a batch of matrices on the last two axes)".into(),
        got: x.shape().to_vec(),
    }
}

/// The batch shape of `a · b`, after checking that the product exists.
fn batch_shape<T: Element>(a: &ArrayViewD<'_, T>, b: &ArrayViewD<'_, T>) -> Result<Vec<usize>> {
    let (&[m, k], &[k_b, n]) = (last_two(a.shape()), last_two(b.shape())) else {
        return Err(if a.ndim() < 2 {
            rank_error(a, "the left operand")
        } else {
            rank_error(b, "the right operand")
        });
    };
    if k != k_b {
        return Err(TapeError::Shape {
            op: "matmul",
            what: "the right operand",
            expected: format!("{k} rows (the columns of the left operand {:?})", a.shape()),
            got: b.shape().to_vec(),
        });
    }
    let batch = broadcast_shape("matmul", &a.shape()[..a.ndim() - 2], &b.shape()[..b.ndim() - 2])?;
    let out: Vec<usize> = batch.iter().copied().chain([m, n]).collect();
    if element_count::<T>(&out).is_none() {
        return Err(TapeError::TooLarge {
            op: "matmul",
            shape: out,
        });
    }
    Ok(batch)
}

/// The last two sizes of a shape of rank 2 or more (else the whole, shorter shape).
fn last_two(shape: &[usize]) -> &[usize] {
    &shape[shape.len().saturating_sub(2)..]
}

/// `a · b` for each matrix of the batch, `a` and `b` broadcast to `batch` first (each
/// transposed first where `transpose` says so): the result has shape `batch + [rows, cols]`.
fn batched_product<T: Element>(
    a: &ArrayViewD<'_, T>,
    b: &ArrayViewD<'_, T>,
    batch: &[usize],
    transpose: [bool; 2],
) -> ArrayD<T> {
    let (a, b) = (
        Batch::new(a, batch, transpose[0]),
        Batch::new(b, batch, transpose[1]),
    );
    let (rows, cols) = (a.matrix_shape[0], b.matrix_shape[1]);
    let count: usize = batch.iter().product();
    let mut products = Vec::with_capacity(count * rows * cols);
    let mut c = Array2::zeros((rows, cols));
    let mut index = vec![0; batch.len()];
    for _ in 0..count {
        general_mat_mul(T::one(), &a.at(&index), &b.at(&index), T::zero(), &mut c);
        products.extend(c.iter().copied());
        // The next batch index, the last axis fastest.
        for axis in (0..batch.len()).rev() {
            index[axis] += 1;
            if index[axis] < batch[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    let shape: Vec<usize> = batch.iter().copied().chain([rows, cols]).collect();
    ArrayD::from_shape_vec(IxDyn(&shape), products).unwrap_or_else(|_| unreachable!("one product per matrix"))
}

/// An operand broadcast to the batch shape, giving its matrix at a batch index.
struct Batch<'a, T> {
    values: ArrayViewD<'a, T>,
    transpose: bool,
    /// `[rows, cols]` of each matrix, after the transposition.
    matrix_shape: [usize; 2],
}

impl<'a, T: Element> Batch<'a, T> {
    fn new(x: &'a ArrayViewD<'_, T>, batch: &[usize], transpose: bool) -> Self {
        let &[rows, cols] = last_two(x.shape()) else {
            unreachable!("operands have rank 2 or more");
        };
        let shape: Vec<usize> = batch.iter().copied().chain([rows, cols]).collect();
        let values = x
            .broadcast(IxDyn(&shape))
            .unwrap_or_else(|| unreachable!("the batch shape was broadcast from the operands"));
        let matrix_shape = if transpose { [cols, rows] } else { [rows, cols] };
        Batch {
            values,
            transpose,
            matrix_shape,
        }
    }

    fn at(&self, index: &[usize]) -> ArrayView2<'_, T> {
        let mut view = self.values.view();
        for &i in index {
            view = view.index_axis_move(Axis(0), i);
        }
        let view = view
            .into_dimensionality::<Ix2>()
            .unwrap_or_else(|_| unreachable!("two axes are left"));
        if self.transpose {
            view.reversed_axes()
        } else {
            view
        }
    }
}

/// `a · b` for `a` of shape `(..., m, k)` and `b` of shape `(..., k, n)`, batch axes broadcast.
pub struct MatMul;

impl<T: Element> Function<T> for MatMul {
    fn name(&self) -> &str {
        "matmul"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("matmul", inputs, 2)?;
        let (a, b) = (&inputs[0], &inputs[1]);
        let batch = batch_shape(a, b)?;
        if a.ndim() == 2 && b.ndim() == 2 {
            return Ok(two_d(a).dot(&two_d(b)).into_dyn());
        }
        Ok(batched_product(a, b, &batch, [false, false]))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for MatMul {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let (a, b) = (&inputs[0], &inputs[1]);
        Ok(vec![
            needs[0]
                .then(|| g.product(b, [false, true])?.summed_to(&a.dims()))
                .transpose()?,
            needs[1]
                .then(|| a.product(g, [true, false])?.summed_to(&b.dims()))
                .transpose()?,
        ])
    }
}

/// `a · b` with the last two axes of either transposed first (`transpose`), batch axes
/// broadcast: the products of matmul's backward.
pub(crate) fn product<T: Element>(
    a: &ArrayViewD<'_, T>,
    b: &ArrayViewD<'_, T>,
    transpose: [bool; 2],
) -> Result<ArrayD<T>> {
    if a.ndim() == 2 && b.ndim() == 2 {
        let (a, b) = (two_d(a), two_d(b));
        let a = if transpose[0] { a.t() } else { a };
        let b = if transpose[1] { b.t() } else { b };
        return Ok(a.dot(&b).into_dyn());
    }
    let leading = |x: &ArrayViewD<'_, T>| x.shape()[..x.ndim().saturating_sub(2)].to_vec();
    let batch = broadcast_shape("matmul", &leading(a), &leading(b))?;
    Ok(batched_product(a, b, &batch, transpose))
}

/// A 2-D view of a value checked to be 2-D.
fn two_d<'a, T: Element>(x: &ArrayViewD<'a, T>) -> ArrayView2<'a, T> {
    x.clone()
        .into_dimensionality::<Ix2>()
        .unwrap_or_else(|_| unreachable!("checked to be 2-D"))
}

impl<'t, T: Element> Var<'t, T> {
    /// Matrix product `self · rhs`: of 2-D values, or of batches of matrices on the last two
    /// axes, whose leading axes broadcast (NumPy's and PyTorch's `matmul`, for rank 2 and more).
    ///
    /// # Errors
    /// [`TapeError::Shape`] if either has rank below 2 or the inner sizes differ,
    /// [`TapeError::Broadcast`] if the batch axes do not broadcast,
    /// [`TapeError::ForeignVar`] if `rhs` is on another tape.
    ///
    /// # Example
    /// ```
    /// use ndarray::{Array2, Array3};
    ///
    /// let tape = tape::Tape::<f64>::new();
    /// let weights = tape.var(Array3::<f64>::ones((4, 2, 3))); // 4 matrices of 2x3
    /// let x = tape.var(Array2::<f64>::ones((3, 5)));          // one 3x5, broadcast to all 4
    /// assert_eq!(weights.matmul(x)?.shape(), vec![4, 2, 5]);
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn matmul(self, rhs: Var<'_, T>) -> Result<Var<'t, T>> {
        self.tape.apply(MatMul, &[self, rhs])
    }
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use crate::testing::uniform;
    use crate::{Tape, check_gradients};

    #[test]
    fn matmul_passes_the_gradient_checker() {
        check_gradients(
            |_, v| v[0].matmul(v[1]),
            &[uniform(&[3, 4], 1), uniform(&[4, 2], 2)],
        )
        .unwrap();
        // The same matrix on both sides: gradients from both operands accumulate.
        check_gradients(|_, v| v[0].matmul(v[0]), &[uniform(&[3, 3], 3)]).unwrap();
        check_gradients(|_, v| v[0].matmul(v[0].transpose()?), &[uniform(&[2, 5], 4)]).unwrap();
    }

    #[test]
    fn matmul_computes_the_product_and_rejects_bad_shapes() {
        let tape = Tape::<f32>::new();
        let a = tape.var(array![[1.0f32, 2.0], [3.0, 4.0]]);
        let b = tape.var(array![[1.0f32], [-1.0]]);
        assert_eq!(
            *a.matmul(b).unwrap().value(),
            array![[-1.0f32], [-1.0]].into_dyn()
        );
        assert_eq!(
            b.matmul(b).unwrap_err().to_string(),
            "matmul: the right operand has shape [2, 1], expected 1 rows (the columns of the left operand [2, 1])"
        );
        let vector = tape.var(array![1.0f32, 2.0]);
        assert_eq!(
            vector.matmul(a).unwrap_err().to_string(),
            "matmul: the left operand has shape [2], expected rank 2 or more (a matrix, or a \
             batch of matrices on the last two axes)"
        );
        let (left, right) = (
            tape.var(ndarray::Array3::<f32>::zeros((3, 2, 2))),
            tape.var(ndarray::Array3::<f32>::zeros((4, 2, 2))),
        );
        assert_eq!(
            left.matmul(right).unwrap_err().to_string(),
            "matmul: shapes [3] and [4] cannot be broadcast together (each trailing axis must be \
             equal or 1)"
        );
    }

    #[test]
    fn batched_matmul_multiplies_each_matrix_and_passes_the_gradient_checker() {
        // Batch axes broadcast: (2, 1, 3, 4) · (5, 4, 2) is (2, 5, 3, 2).
        let (a, b) = (uniform(&[2, 1, 3, 4], 1), uniform(&[5, 4, 2], 2));
        let tape = Tape::<f64>::new();
        let product = tape.var(a.clone()).matmul(tape.var(b.clone())).unwrap();
        assert_eq!(product.shape(), vec![2, 5, 3, 2]);
        for i in 0..2 {
            for j in 0..5 {
                let a = a
                    .slice(ndarray::s![i, 0, .., ..])
                    .into_dimensionality::<ndarray::Ix2>()
                    .unwrap();
                let b = b
                    .slice(ndarray::s![j, .., ..])
                    .into_dimensionality::<ndarray::Ix2>()
                    .unwrap();
                let expected = a.dot(&b);
                let got = product.value().slice(ndarray::s![i, j, .., ..]).to_owned();
                let got = got.into_dimensionality::<ndarray::Ix2>().unwrap();
                assert!(got.abs_diff_eq(&expected, 1e-15), "matrix ({i}, {j})");
            }
        }
        check_gradients(|_, v| v[0].matmul(v[1]), &[a, b]).unwrap();
        // A plain matrix on either side, broadcast over the other's batch.
        check_gradients(
            |_, v| v[0].matmul(v[1]),
            &[uniform(&[3, 4], 3), uniform(&[2, 4, 2], 4)],
        )
        .unwrap();
        check_gradients(
            |_, v| v[0].matmul(v[1]),
            &[uniform(&[2, 3, 4], 5), uniform(&[4, 2], 6)],
        )
        .unwrap();
        // An empty batch gives an empty result of the right shape.
        let empty = tape.var(ndarray::ArrayD::<f64>::zeros(ndarray::IxDyn(&[0, 3, 4])));
        let matrix = tape.var(uniform(&[4, 2], 7));
        assert_eq!(empty.matmul(matrix).unwrap().shape(), vec![0, 3, 2]);
    }
}
