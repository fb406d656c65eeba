//! Matrix product of two 2-D values. For `C = A·B` with upstream gradient `G`:
//! `∂/∂A = G·Bᵀ` and `∂/∂B = Aᵀ·G`.

use ndarray::{ArrayD, ArrayView2, ArrayViewD, Ix2};

use super::{arity, grad_if};
use crate::{BackwardArgs, Element, Function, Result, TapeError, Var};

fn as_matrix<'a, T: Element>(x: &ArrayViewD<'a, T>, what: &'static str) -> Result<ArrayView2<'a, T>> {
    x.clone()
        .into_dimensionality::<Ix2>()
        .map_err(|_| TapeError::Shape {
            op: "matmul",
            what,
            expected: "a 2-D array".into(),
            got: x.shape().to_vec(),
        })
}

/// `a · b` for `a` of shape `(m, k)` and `b` of shape `(k, n)`.
pub struct MatMul;

impl<T: Element> Function<T> for MatMul {
    fn name(&self) -> &str {
        "matmul"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("matmul", inputs, 2)?;
        let a = as_matrix(&inputs[0], "the left operand")?;
        let b = as_matrix(&inputs[1], "the right operand")?;
        if a.ncols() != b.nrows() {
            return Err(TapeError::Shape {
                op: "matmul",
                what: "the right operand",
                expected: format!(
                    "{} rows (the columns of the left operand {:?})",
                    a.ncols(),
                    a.shape()
                ),
                got: b.shape().to_vec(),
            });
        }
        Ok(a.dot(&b).into_dyn())
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        let a = as_matrix(&args.inputs[0], "the left operand")?;
        let b = as_matrix(&args.inputs[1], "the right operand")?;
        let g = as_matrix(&args.grad_output, "the output gradient")?;
        Ok(vec![
            grad_if(args.needs_grad[0], || g.dot(&b.t()).into_dyn()),
            grad_if(args.needs_grad[1], || a.t().dot(&g).into_dyn()),
        ])
    }
}

impl<'t, T: Element> Var<'t, T> {
    /// Matrix product `self · rhs` of 2-D values.
    ///
    /// # Errors
    /// [`TapeError::Shape`] if either is not 2-D or the inner sizes differ,
    /// [`TapeError::ForeignVar`] if `rhs` is on another tape.
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
            "matmul: the left operand has shape [2], expected a 2-D array"
        );
    }
}
