//! Elementwise functions of one input. Each backward is `g · f'(x)`, written with whichever of
//! the input `x` or the output `y` makes it cheapest (`exp' = y`, `tanh' = 1 - y²`).

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::{arity, grad_if, infallible};
use crate::rule::Elem;
use crate::{BackwardArgs, Element, Function, GraphArgs, Result, Var};

/// `g · f'(x, y)` elementwise, where `x` is the input and `y` the output.
fn chain<T: Element>(args: &BackwardArgs<'_, T>, derivative: impl Fn(T, T) -> T) -> Vec<Option<ArrayD<T>>> {
    vec![grad_if(args.needs_grad[0], || {
        Zip::from(&args.grad_output)
            .and(&args.inputs[0])
            .and(&args.output)
            .map_collect(|&g, &x, &y| g * derivative(x, y))
    })]
}

/// `g · f'(x, y)` recorded on the tape, the same rule applied to `Var`s.
fn chain_graph<'t, T: Element>(
    args: &GraphArgs<'_, 't, T>,
    derivative: impl Fn(Var<'t, T>, Var<'t, T>) -> Var<'t, T>,
) -> Result<Vec<Option<Var<'t, T>>>> {
    Ok(vec![if args.needs_grad[0] {
        Some(
            args.grad_output
                .try_mul(derivative(args.inputs[0], args.output))?,
        )
    } else {
        None
    }])
}

macro_rules! unary_op {
    ($(#[$doc:meta])* $name:ident, $label:literal, forward: |$x:ident| $forward:expr, backward: |$bx:pat_param, $by:pat_param| $backward:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl $name {
            /// The derivative, one rule for scalars and for `Var`s.
            #[inline(always)]
            fn derivative<T: Element, E: Elem<T>>($bx: E, $by: E) -> E {
                $backward
            }
        }

        impl<T: Element> Function<T> for $name {
            fn name(&self) -> &str {
                $label
            }
            fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
                arity($label, inputs, 1)?;
                Ok(inputs[0].mapv(|$x: T| $forward))
            }
            fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
                Ok(chain(args, |x: T, y: T| Self::derivative::<T, T>(x, y)))
            }
            fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
                chain_graph(args, |x, y| Self::derivative::<T, Var<'t, T>>(x, y))
            }
        }
    };
}

unary_op!(
    /// `-x`; derivative `-1`.
    Neg, "neg", forward: |x| -x, backward: |x, _| x.lit(-T::one())
);
unary_op!(
    /// `eˣ`; derivative `eˣ = y`.
    Exp, "exp", forward: |x| x.exp(), backward: |_, y| y
);
unary_op!(
    /// Natural logarithm; derivative `1 / x`.
    Ln, "ln", forward: |x| x.ln(), backward: |x, _| x.recip()
);
unary_op!(
    /// `√x`; derivative `1 / (2√x) = 1 / (2y)`.
    Sqrt, "sqrt", forward: |x| x.sqrt(), backward: |_, y| (y + y).recip()
);
unary_op!(
    /// `|x|`; derivative `sign(x)`, taken as 0 at 0 (as PyTorch).
    Abs, "abs", forward: |x| x.abs(), backward: |x, _| x.sign()
);
unary_op!(
    /// `max(x, 0)`, NaN for NaN (as IEEE `maximum`, NumPy and PyTorch); derivative 0 where
    /// `x <= 0` (0 at 0, as PyTorch), else 1 (so a NaN passes the gradient on, as in PyTorch).
    Relu, "relu", forward: |x| if x <= T::zero() { T::zero() } else { x }, backward: |x, _| x.step()
);
unary_op!(
    /// The logistic function `1 / (1 + e⁻ˣ)`, evaluated without overflow for large `|x|`;
    /// derivative `y (1 - y)`.
    Sigmoid, "sigmoid", forward: |x| sigmoid(x), backward: |_, y| y * -(y - T::one())
);
unary_op!(
    /// `tanh x`; derivative `1 - y²`.
    Tanh, "tanh", forward: |x| x.tanh(), backward: |_, y| -(y * y - T::one())
);

/// A piecewise-constant function of `x` (a step or a sign, inside another op's derivative):
/// its derivative is 0 wherever it is defined, so no gradient flows through it.
pub struct Piecewise<T>(pub fn(T) -> T);

impl<T: Element> Function<T> for Piecewise<T> {
    fn name(&self) -> &str {
        "piecewise"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("piecewise", inputs, 1)?;
        Ok(inputs[0].mapv(self.0))
    }
    fn backward(&self, _: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        Ok(vec![None])
    }
    fn backward_graph<'t>(&self, _: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        Ok(vec![None])
    }
}

/// `1 / (1 + e⁻ˣ)` for `x ≥ 0` and `eˣ / (1 + eˣ)` below, so `exp` never overflows.
fn sigmoid<T: Element>(x: T) -> T {
    if x >= T::zero() {
        (T::one() + (-x).exp()).recip()
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// `xᵖ` for a real exponent; derivative `p·xᵖ⁻¹`, and 0 for `p = 0` (where `xᵖ = 1`
/// everywhere, also at `x = 0`, whose `0 · 0⁻¹` would be NaN; as PyTorch).
pub struct PowF<T>(pub T);

impl<T: Element> Function<T> for PowF<T> {
    fn name(&self) -> &str {
        "powf"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("powf", inputs, 1)?;
        let p = self.0;
        Ok(inputs[0].mapv(|x| x.powf(p)))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        Ok(chain(args, |x: T, _| self.derivative(x)))
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        chain_graph(args, |x, _| self.derivative(x))
    }
}

impl<T: Element> PowF<T> {
    #[inline(always)]
    fn derivative<E: Elem<T>>(&self, x: E) -> E {
        let p = self.0;
        if p == T::zero() {
            x.lit(T::zero())
        } else {
            x.powf(p - T::one()) * p
        }
    }
}

/// `xⁿ` for an integer exponent; derivative `n·xⁿ⁻¹`.
pub struct PowI(pub i32);

impl<T: Element> Function<T> for PowI {
    fn name(&self) -> &str {
        "powi"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("powi", inputs, 1)?;
        let n = self.0;
        Ok(inputs[0].mapv(|x| x.powi(n)))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        Ok(chain(args, |x: T, _| self.derivative(x)))
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        chain_graph(args, |x, _| self.derivative(x))
    }
}

impl PowI {
    #[inline(always)]
    fn derivative<T: Element, E: Elem<T>>(&self, x: E) -> E {
        let n = self.0;
        if n == 0 {
            x.lit(T::zero())
        } else {
            x.powi(n - 1) * T::from_f64_lossy(f64::from(n))
        }
    }
}

/// `x + c` for a scalar `c`; derivative 1.
pub struct AddScalar<T>(pub T);

impl<T: Element> Function<T> for AddScalar<T> {
    fn name(&self) -> &str {
        "add_scalar"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("add_scalar", inputs, 1)?;
        let c = self.0;
        Ok(inputs[0].mapv(|x| x + c))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        Ok(vec![grad_if(args.needs_grad[0], || args.grad_output.to_owned())])
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        Ok(vec![args.needs_grad[0].then_some(args.grad_output)])
    }
}

/// `x / c` for a scalar `c`, divided (not multiplied by `1 / c`, which rounds twice and
/// overflows for tiny `c`); derivative `1 / c`, applied as `g / c`.
pub struct DivScalar<T>(pub T);

impl<T: Element> Function<T> for DivScalar<T> {
    fn name(&self) -> &str {
        "div_scalar"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("div_scalar", inputs, 1)?;
        let c = self.0;
        Ok(inputs[0].mapv(|x| x / c))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        let c = self.0;
        Ok(vec![grad_if(args.needs_grad[0], || {
            args.grad_output.mapv(|g| g / c)
        })])
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        Ok(vec![
            args.needs_grad[0].then(|| args.grad_output.div_scalar(self.0)),
        ])
    }
}

/// `c / x` for a scalar `c`; derivative `-c / x² = -y / x`, applied as `-(g · y) / x` (no `x²`,
/// which overflows or underflows before `c / x²` does).
pub struct ScalarDiv<T>(pub T);

impl<T: Element> Function<T> for ScalarDiv<T> {
    fn name(&self) -> &str {
        "scalar_div"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("scalar_div", inputs, 1)?;
        let c = self.0;
        Ok(inputs[0].mapv(|x| c / x))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        Ok(chain(args, |x: T, y: T| scalar_div_derivative(x, y)))
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        chain_graph(args, scalar_div_derivative)
    }
}

/// `d(c / x)/dx = -y / x`.
#[inline(always)]
fn scalar_div_derivative<T: Element, E: Elem<T>>(x: E, y: E) -> E {
    -y / x
}

/// `c · x` for a scalar `c`; derivative `c`.
pub struct MulScalar<T>(pub T);

impl<T: Element> Function<T> for MulScalar<T> {
    fn name(&self) -> &str {
        "mul_scalar"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("mul_scalar", inputs, 1)?;
        let c = self.0;
        Ok(inputs[0].mapv(|x| c * x))
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        let c = self.0;
        Ok(vec![grad_if(args.needs_grad[0], || {
            args.grad_output.mapv(|g| c * g)
        })])
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        Ok(vec![
            args.needs_grad[0].then(|| args.grad_output.mul_scalar(self.0)),
        ])
    }
}

impl<'t, T: Element> Var<'t, T> {
    fn unary(self, op: impl Function<T>) -> Var<'t, T> {
        infallible(self.tape.apply(op, &[self]))
    }

    /// `eˣ` elementwise.
    pub fn exp(self) -> Var<'t, T> {
        self.unary(Exp)
    }
    /// Natural logarithm elementwise.
    pub fn ln(self) -> Var<'t, T> {
        self.unary(Ln)
    }
    /// Square root elementwise.
    pub fn sqrt(self) -> Var<'t, T> {
        self.unary(Sqrt)
    }
    /// `xᵖ` elementwise for a real `p`.
    pub fn powf(self, p: T) -> Var<'t, T> {
        self.unary(PowF(p))
    }
    /// `xⁿ` elementwise for an integer `n`.
    pub fn powi(self, n: i32) -> Var<'t, T> {
        self.unary(PowI(n))
    }
    /// `|x|` elementwise.
    pub fn abs(self) -> Var<'t, T> {
        self.unary(Abs)
    }
    /// `max(x, 0)` elementwise.
    pub fn relu(self) -> Var<'t, T> {
        self.unary(Relu)
    }
    /// The logistic sigmoid elementwise.
    pub fn sigmoid(self) -> Var<'t, T> {
        self.unary(Sigmoid)
    }
    /// `tanh x` elementwise.
    pub fn tanh(self) -> Var<'t, T> {
        self.unary(Tanh)
    }
    /// `x + c` for a scalar `c` (also `x + c` with the operator).
    pub fn add_scalar(self, c: T) -> Var<'t, T> {
        self.unary(AddScalar(c))
    }
    /// `c · x` for a scalar `c` (also `x * c` with the operator).
    pub fn mul_scalar(self, c: T) -> Var<'t, T> {
        self.unary(MulScalar(c))
    }
    /// `x / c` for a scalar `c` (also `x / c` with the operator).
    pub fn div_scalar(self, c: T) -> Var<'t, T> {
        self.unary(DivScalar(c))
    }
    /// `c / x` for a scalar `c` (also `c / x` with the operator).
    pub fn scalar_div(self, c: T) -> Var<'t, T> {
        self.unary(ScalarDiv(c))
    }
    /// `-x` (also `-x` with the operator).
    pub fn negate(self) -> Var<'t, T> {
        self.unary(Neg)
    }
    /// `f(x)` elementwise for a piecewise-constant `f` (a step, a sign): no gradient flows
    /// through it.
    pub(crate) fn piecewise(self, f: fn(T) -> T) -> Var<'t, T> {
        self.unary(Piecewise(f))
    }
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use crate::testing::{positive, uniform};
    use crate::{Tape, check_gradients};

    #[test]
    fn every_unary_op_passes_the_gradient_checker() {
        let x = uniform(&[3, 4], 1);
        let p = positive(&[3, 4], 2);
        check_gradients(|_, v| Ok(-v[0]), std::slice::from_ref(&x)).unwrap();
        check_gradients(|_, v| Ok(v[0].exp()), std::slice::from_ref(&x)).unwrap();
        check_gradients(|_, v| Ok(v[0].ln()), std::slice::from_ref(&p)).unwrap();
        check_gradients(|_, v| Ok(v[0].sqrt()), std::slice::from_ref(&p)).unwrap();
        check_gradients(|_, v| Ok(v[0].powf(2.5)), std::slice::from_ref(&p)).unwrap();
        check_gradients(|_, v| Ok(v[0].powi(3)), std::slice::from_ref(&x)).unwrap();
        check_gradients(|_, v| Ok(v[0].powi(-2)), std::slice::from_ref(&p)).unwrap();
        check_gradients(|_, v| Ok(v[0].powi(0)), std::slice::from_ref(&x)).unwrap();
        // abs and relu have a kink at 0: the inputs are away from it.
        let away_from_zero = x.mapv(|x| if x.abs() < 0.1 { x + 0.5 } else { x });
        check_gradients(|_, v| Ok(v[0].abs()), std::slice::from_ref(&away_from_zero)).unwrap();
        check_gradients(|_, v| Ok(v[0].relu()), &[away_from_zero]).unwrap();
        check_gradients(|_, v| Ok(v[0].sigmoid()), std::slice::from_ref(&x)).unwrap();
        check_gradients(|_, v| Ok(v[0].tanh()), std::slice::from_ref(&x)).unwrap();
        check_gradients(|_, v| Ok(v[0] * 3.0 + 1.5 - 0.5 / v[0]), std::slice::from_ref(&p)).unwrap();
        check_gradients(|_, v| Ok(2.0 - v[0] / 4.0 + (1.0 + v[0]) * 0.5), &[x]).unwrap();
    }

    #[test]
    fn kinks_take_pytorchs_convention_of_zero() {
        let tape = Tape::<f64>::new();
        let x = tape.var(array![-1.0, 0.0, 2.0]);
        let grads = (x.relu() + x.abs()).sum().backward().unwrap();
        assert_eq!(grads.wrt(x).unwrap(), &array![-1.0, 0.0, 2.0].into_dyn());
    }

    #[test]
    fn division_by_a_scalar_divides() {
        // x / c and c / x as one division each, as IEEE and NumPy: multiplying by 1 / c rounds
        // twice (3 / 10 would be 0.30000000000000004) and overflows where 1 / c does.
        let tape = Tape::<f64>::new();
        let x = tape.var(array![3.0, 1e-10, 6.0]);
        let y = x / 10.0;
        assert_eq!(y.value().as_slice().unwrap(), &[0.3, 1e-10 / 10.0, 0.6]);
        assert_eq!((x / 1e-310).value()[1], 1e-10 / 1e-310);
        assert_eq!((1e-310 / x).value()[1], 1e-310 / 1e-10);
        assert_eq!((3.0 / x).value()[0], 1.0);
        let tape32 = Tape::<f32>::new();
        let m = tape32.var(array![f32::MAX]);
        assert_eq!((m / f32::MAX).value()[0], 1.0);
        assert_eq!((f32::MAX / m).value()[0], 1.0);
        // c / x's derivative is -c / x², taken without x² (which overflows here).
        let big = tape.var(array![1e200]);
        let grads = (1e300 / big).sum().backward().unwrap();
        assert_eq!(grads.wrt(big).unwrap()[0], -1e300 / 1e200 / 1e200);
        check_gradients(|_, v| Ok(v[0] / 4.0), &[uniform(&[5], 7)]).unwrap();
        check_gradients(|_, v| Ok(-2.5 / v[0]), &[positive(&[5], 8)]).unwrap();
    }

    #[test]
    fn relu_keeps_nan_and_passes_its_gradient_on() {
        // As PyTorch: relu(NaN) = NaN, and the gradient at NaN passes through.
        let tape = Tape::<f64>::new();
        let x = tape.var(array![f64::NAN, -1.0, 0.0, 2.0]);
        let y = x.relu();
        assert!(y.value()[0].is_nan());
        assert_eq!(&y.value().as_slice().unwrap()[1..], &[0.0, 0.0, 2.0]);
        let grads = y.backward_with(array![0.5, 0.5, 0.5, 0.5]).unwrap();
        assert_eq!(grads.wrt(x).unwrap(), &array![0.5, 0.0, 0.0, 0.5].into_dyn());
    }

    #[test]
    fn the_zeroth_power_has_derivative_zero_everywhere() {
        // x⁰ = 1 for every x, 0 included: its derivative is 0 there too (PyTorch: 0), not
        // 0 · 0⁻¹ = NaN.
        let tape = Tape::<f64>::new();
        let x = tape.var(array![0.0, 2.0, -3.0]);
        let grads = (x.powf(0.0) + x.powi(0)).sum().backward().unwrap();
        assert_eq!(grads.wrt(x).unwrap(), &array![0.0, 0.0, 0.0].into_dyn());
    }

    #[test]
    fn sigmoid_does_not_overflow_at_extreme_inputs() {
        let tape = Tape::<f32>::new();
        let x = tape.var(array![-1e4f32, -100.0, 0.0, 100.0, 1e4]);
        let y = x.sigmoid();
        let y_value = y.value();
        // e^-100 is a subnormal f32, not 0: the exp(x) / (1 + exp(x)) branch keeps it.
        assert_eq!(
            (y_value[0], y_value[2], y_value[3], y_value[4]),
            (0.0, 0.5, 1.0, 1.0)
        );
        assert!(y_value[1] > 0.0 && y_value[1] < 1e-40, "{}", y_value[1]);
        let grads = y.sum().backward().unwrap();
        assert!(grads.wrt(x).unwrap().iter().all(|g| g.is_finite()));
    }

    #[test]
    fn f32_matches_f64_within_f32_rounding() {
        let x64 = uniform(&[16], 3);
        let x32 = x64.mapv(|x| x as f32);
        let tape32 = Tape::<f32>::new();
        let tape64 = Tape::<f64>::new();
        let (a, b) = (tape32.var(x32), tape64.var(x64));
        let (y32, y64) = ((a.tanh() * a.exp()).sum(), (b.tanh() * b.exp()).sum());
        let (g32, g64) = (y32.backward().unwrap(), y64.backward().unwrap());
        approx::assert_relative_eq!(f64::from(y32.scalar()), y64.scalar(), max_relative = 1e-6);
        for (g32, g64) in g32.wrt(a).unwrap().iter().zip(g64.wrt(b).unwrap()) {
            approx::assert_relative_eq!(f64::from(*g32), *g64, max_relative = 1e-5);
        }
    }
}
