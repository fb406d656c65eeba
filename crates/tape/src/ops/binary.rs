//! Elementwise `add`, `sub`, `mul`, `div` with NumPy broadcasting. The forward broadcasts both
//! operands to a common shape; the backward computes the gradient at that shape and sums it back
//! to each operand's shape with [`sum_to_shape`](crate::sum_to_shape), the one shared helper.

use ndarray::{ArrayD, ArrayViewD};

use super::arity;
use crate::rule::{Rule, Tensor};
use crate::{BackwardArgs, Element, Function, GraphArgs, Result, Var, broadcast_shape};

/// The gradient `compute()` of a broadcast result summed back to `operand`'s shape, when the
/// operand needs it.
fn back<T: Element, V: Tensor<T>>(
    needed: bool,
    compute: impl FnOnce() -> Result<V>,
    operand: &V,
) -> Result<Option<V>> {
    needed.then(|| compute()?.summed_to(&operand.dims())).transpose()
}

fn operands<'a, 'b, T: Element>(
    inputs: &'a [ArrayViewD<'b, T>],
) -> (&'a ArrayViewD<'b, T>, &'a ArrayViewD<'b, T>) {
    (&inputs[0], &inputs[1])
}

/// `a + b`. Gradients: `∂/∂a = g`, `∂/∂b = g`.
pub struct Add;

impl<T: Element> Function<T> for Add {
    fn name(&self) -> &str {
        "add"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("add", inputs, 2)?;
        let (a, b) = operands(inputs);
        broadcast_shape("add", a.shape(), b.shape())?;
        Ok(a + b)
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Add {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let (a, b) = (&inputs[0], &inputs[1]);
        Ok(vec![
            back(needs[0], || Ok(g.clone()), a)?,
            back(needs[1], || Ok(g.clone()), b)?,
        ])
    }
}

/// `a - b`. Gradients: `∂/∂a = g`, `∂/∂b = -g`.
pub struct Sub;

impl<T: Element> Function<T> for Sub {
    fn name(&self) -> &str {
        "sub"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("sub", inputs, 2)?;
        let (a, b) = operands(inputs);
        broadcast_shape("sub", a.shape(), b.shape())?;
        Ok(a - b)
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Sub {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let (a, b) = (&inputs[0], &inputs[1]);
        Ok(vec![
            back(needs[0], || Ok(g.clone()), a)?,
            back(needs[1], || Ok(g.clone().negated()), b)?,
        ])
    }
}

/// `a * b`. Gradients: `∂/∂a = g·b`, `∂/∂b = g·a`.
pub struct Mul;

impl<T: Element> Function<T> for Mul {
    fn name(&self) -> &str {
        "mul"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("mul", inputs, 2)?;
        let (a, b) = operands(inputs);
        broadcast_shape("mul", a.shape(), b.shape())?;
        Ok(a * b)
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Mul {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let (a, b) = (&inputs[0], &inputs[1]);
        Ok(vec![
            back(needs[0], || g.clone().times(b), a)?,
            back(needs[1], || g.clone().times(a), b)?,
        ])
    }
}

/// `a / b`. Gradients: `∂/∂a = g / b`, `∂/∂b = -g·a / b² = -g·out / b`.
pub struct Div;

impl<T: Element> Function<T> for Div {
    fn name(&self) -> &str {
        "div"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("div", inputs, 2)?;
        let (a, b) = operands(inputs);
        broadcast_shape("div", a.shape(), b.shape())?;
        Ok(a / b)
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Div {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        Ok(vec![
            back(needs[0], || g.clone().over(b), a)?,
            back(needs[1], || g.clone().times(output)?.negated().over(b), b)?,
        ])
    }
}

impl<'t, T: Element> Var<'t, T> {
    /// `self + rhs` with broadcasting.
    ///
    /// # Errors
    /// [`TapeError::Broadcast`](crate::TapeError::Broadcast) when the shapes are incompatible,
    /// [`TapeError::ForeignVar`](crate::TapeError::ForeignVar) when `rhs` is on another tape.
    pub fn try_add(self, rhs: Var<'_, T>) -> Result<Var<'t, T>> {
        self.tape.apply(Add, &[self, rhs])
    }

    /// `self - rhs` with broadcasting.
    ///
    /// # Errors
    /// As [`try_add`](Var::try_add).
    pub fn try_sub(self, rhs: Var<'_, T>) -> Result<Var<'t, T>> {
        self.tape.apply(Sub, &[self, rhs])
    }

    /// `self * rhs` (elementwise) with broadcasting.
    ///
    /// # Errors
    /// As [`try_add`](Var::try_add).
    pub fn try_mul(self, rhs: Var<'_, T>) -> Result<Var<'t, T>> {
        self.tape.apply(Mul, &[self, rhs])
    }

    /// `self / rhs` (elementwise) with broadcasting.
    ///
    /// # Errors
    /// As [`try_add`](Var::try_add).
    pub fn try_div(self, rhs: Var<'_, T>) -> Result<Var<'t, T>> {
        self.tape.apply(Div, &[self, rhs])
    }
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use crate::testing::{positive, uniform};
    use crate::{Tape, TapeError, check_gradients};

    /// Shape pairs covering equal shapes and broadcasting in both directions.
    const SHAPES: [(&[usize], &[usize]); 5] = [
        (&[3, 4], &[3, 4]),
        (&[3, 4], &[4]),
        (&[4], &[3, 4]),
        (&[2, 1, 4], &[3, 1]),
        (&[], &[2, 3]),
    ];

    #[test]
    fn add_sub_mul_div_pass_the_gradient_checker_with_broadcasting() {
        for (seed, (a, b)) in SHAPES.iter().enumerate() {
            let x = uniform(a, seed as u64);
            let y = uniform(b, 100 + seed as u64);
            let y_positive = positive(b, 200 + seed as u64);
            check_gradients(|_, v| v[0].try_add(v[1]), &[x.clone(), y.clone()]).unwrap();
            check_gradients(|_, v| v[0].try_sub(v[1]), &[x.clone(), y.clone()]).unwrap();
            check_gradients(|_, v| v[0].try_mul(v[1]), &[x.clone(), y.clone()]).unwrap();
            check_gradients(|_, v| v[0].try_div(v[1]), &[x.clone(), y_positive]).unwrap();
        }
    }

    #[test]
    fn a_var_used_twice_accumulates_its_gradient() {
        let x = uniform(&[5], 7);
        // x·x + x/x·x - x: every path into x contributes.
        check_gradients(
            |_, v| Ok(v[0] * v[0] + v[0] / (v[0] * v[0] + 1.0) - v[0]),
            std::slice::from_ref(&x),
        )
        .unwrap();
        let tape = Tape::new();
        let v = tape.var(x.clone());
        let grads = (v * v + v).sum().backward().unwrap();
        assert_eq!(grads.wrt(v).unwrap(), &x.mapv(|x| 2.0 * x + 1.0));
    }

    #[test]
    fn forward_matches_ndarray_in_f32() {
        let tape = Tape::<f32>::new();
        let a = tape.var(array![[1.0f32, 2.0], [3.0, 4.0]]);
        let b = tape.constant(array![10.0f32, 20.0]);
        assert_eq!(*(a + b).value(), array![[11.0f32, 22.0], [13.0, 24.0]].into_dyn());
        assert_eq!(
            *(a - b).value(),
            array![[-9.0f32, -18.0], [-7.0, -16.0]].into_dyn()
        );
        assert_eq!(*(a * b).value(), array![[10.0f32, 40.0], [30.0, 80.0]].into_dyn());
        assert_eq!(*(a / b).value(), array![[0.1f32, 0.1], [0.3, 0.2]].into_dyn());
        let grads = (a * b).sum().backward().unwrap();
        assert_eq!(
            grads.wrt(a).unwrap(),
            &array![[10.0f32, 20.0], [10.0, 20.0]].into_dyn()
        );
        assert!(grads.get(b).is_none(), "constants get no gradient");
    }

    #[test]
    fn incompatible_shapes_are_an_error_with_both_shapes() {
        let tape = Tape::<f64>::new();
        let a = tape.var(uniform(&[2, 3], 0));
        let b = tape.var(uniform(&[4], 1));
        let error = a.try_mul(b).unwrap_err();
        assert!(matches!(error, TapeError::Broadcast { op: "mul", .. }));
        assert_eq!(
            error.to_string(),
            "mul: shapes [2, 3] and [4] cannot be broadcast together (each trailing axis must be equal or 1)"
        );
    }

    #[test]
    #[should_panic(expected = "add: shapes [2, 3] and [4] cannot be broadcast")]
    fn the_operator_panics_with_the_same_message() {
        let tape = Tape::<f64>::new();
        let _ = tape.var(uniform(&[2, 3], 0)) + tape.var(uniform(&[4], 1));
    }

    #[test]
    fn the_operator_panic_names_the_callers_line() {
        use std::panic::{self, AssertUnwindSafe};
        use std::sync::{Arc, Mutex};
        let tape = Tape::<f64>::new();
        let (a, b) = (tape.var(uniform(&[2, 3], 0)), tape.var(uniform(&[4], 1)));
        // Record where this thread's panic says it happened (other tests run on other threads).
        let (seen, this_thread) = (Arc::new(Mutex::new(None)), std::thread::current().id());
        let record = Arc::clone(&seen);
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == this_thread {
                *record.lock().unwrap() = info.location().map(|l| (l.file().to_string(), l.line()));
            }
        }));
        let line = line!() + 1;
        let result = panic::catch_unwind(AssertUnwindSafe(|| a * b));
        panic::set_hook(previous);
        assert!(result.is_err());
        assert_eq!(*seen.lock().unwrap(), Some((file!().to_string(), line)));
    }

    #[test]
    fn a_primitive_given_the_wrong_number_of_inputs_is_an_error() {
        // The primitives are public types: `tape.apply(Add, &[x])` indexed past its inputs.
        let tape = Tape::<f64>::new();
        let x = tape.var(uniform(&[2], 0));
        let error = tape.apply(super::Add, &[x]).unwrap_err();
        assert_eq!(error.to_string(), "add: takes 2 input(s), got 1");
        assert!(matches!(
            tape.apply(crate::ops::unary::Exp, &[]),
            Err(TapeError::Arity { op: "exp", .. })
        ));
        assert!(tape.apply(crate::ops::matmul::MatMul, &[x, x, x]).is_err());
        assert!(tape.apply(crate::ops::shape::Transpose, &[]).is_err());
        assert!(tape.apply(crate::ops::unary::PowF(2.0), &[x, x]).is_err());
    }

    #[test]
    fn a_var_of_another_tape_is_an_error() {
        let first = Tape::<f64>::new();
        let second = Tape::<f64>::new();
        let a = first.var(uniform(&[2], 0));
        let b = second.var(uniform(&[2], 1));
        assert!(matches!(a.try_add(b), Err(TapeError::ForeignVar { op }) if op == "add"));
        assert!(matches!(b.matmul(a), Err(TapeError::ForeignVar { op }) if op == "matmul"));
        assert!(matches!(first.backward(b), Err(TapeError::ForeignVar { .. })));
        assert!(matches!(
            first.backward_with(b, uniform(&[2], 2)),
            Err(TapeError::ForeignVar { op }) if op == "backward_with"
        ));
        let grads = (a * a).sum().backward().unwrap();
        assert!(matches!(grads.wrt(b), Err(TapeError::ForeignVar { .. })));
    }
}
