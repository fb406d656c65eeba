//! What the derivative rules of the elementwise ops compute with, so that each rule is written
//! once and serves both paths: a scalar `T`, one element at a time, in [`Tape::backward`]
//! (fused into one pass over the arrays), and a [`Var`], recorded on the tape, when the
//! backward itself is to be differentiated ([`Tape::grad`] with `create_graph`).
//!
//! [`Tape::backward`]: crate::Tape::backward
//! [`Tape::grad`]: crate::Tape::grad

use std::ops::{Add, Div, Mul, Neg, Sub};

use ndarray::{ArrayD, ArrayViewD, IxDyn};

use crate::ops::reduce::{GatherLanes, Lanes, ScatterLanes};
use crate::ops::unfold::{Fold, Window2d};
use crate::{BackwardArgs, Element, GraphArgs, Result, TapeError, Var, sum_to_shape};

/// A scalar or a `Var`: the arithmetic a derivative rule may use.
pub(crate) trait Elem<T: Element>:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + Add<T, Output = Self>
    + Sub<T, Output = Self>
    + Mul<T, Output = Self>
{
    /// The constant `c`, shaped to combine with `self` (a scalar, or a rank-0 constant).
    fn lit(self, c: T) -> Self;
    /// `1 / self`.
    fn recip(self) -> Self;
    /// `selfᵖ`.
    fn powf(self, p: T) -> Self;
    /// `selfⁿ`.
    fn powi(self, n: i32) -> Self;
    /// 1 where `self > 0`, else 0 (NaN gives 1, as relu passes a NaN's gradient on): piecewise
    /// constant, so its own derivative is 0.
    fn step(self) -> Self;
    /// The sign, 0 at 0: piecewise constant.
    fn sign(self) -> Self;
}

impl<T: Element> Elem<T> for T {
    fn lit(self, c: T) -> T {
        c
    }
    fn recip(self) -> T {
        num_traits::Float::recip(self)
    }
    fn powf(self, p: T) -> T {
        num_traits::Float::powf(self, p)
    }
    fn powi(self, n: i32) -> T {
        num_traits::Float::powi(self, n)
    }
    fn step(self) -> T {
        if self <= T::zero() { T::zero() } else { T::one() }
    }
    fn sign(self) -> T {
        if self > T::zero() {
            T::one()
        } else if self < T::zero() {
            -T::one()
        } else {
            T::zero()
        }
    }
}

impl<'t, T: Element> Elem<T> for Var<'t, T> {
    fn lit(self, c: T) -> Self {
        self.tape.scalar(c)
    }
    fn recip(self) -> Self {
        self.scalar_div(T::one())
    }
    fn powf(self, p: T) -> Self {
        Var::powf(self, p)
    }
    fn powi(self, n: i32) -> Self {
        Var::powi(self, n)
    }
    fn step(self) -> Self {
        self.piecewise(Elem::step)
    }
    fn sign(self) -> Self {
        self.piecewise(Elem::sign)
    }
}

/// The array operations the derivative rules of the structural primitives (broadcasting
/// arithmetic, reductions, reshapes, products) use: implemented on arrays ([`Eager`], for
/// [`Tape::backward`](crate::Tape::backward)) and on [`Var`]s (recorded), so that each rule is
/// written once.
pub(crate) trait Tensor<T: Element>: Clone {
    /// The shape.
    fn dims(&self) -> Vec<usize>;
    /// `self · rhs`, broadcasting.
    fn times(self, rhs: &Self) -> Result<Self>;
    /// `self / rhs`, broadcasting.
    fn over(self, rhs: &Self) -> Result<Self>;
    /// `-self`.
    fn negated(self) -> Self;
    /// Summed down to `shape`, a shape that broadcasts to this one.
    fn summed_to(self, shape: &[usize]) -> Result<Self>;
    /// The same values in `shape`.
    fn reshaped(self, shape: &[usize]) -> Result<Self>;
    /// Reshaped to `kept` (a keep-dims shape), broadcast to `shape` and divided by `divisor`:
    /// a reduction's gradient spread back over its input.
    fn spread(self, kept: &[usize], shape: &[usize], divisor: T) -> Result<Self>;
    /// The last two axes swapped (the transpose of a 2-D value; of each matrix of a batch).
    fn swapped_last(self) -> Result<Self>;
    /// The matrix product with the last two axes of either operand transposed first.
    fn product(&self, rhs: &Self, transpose: [bool; 2]) -> Result<Self>;
    /// One value per lane written into zeros of `shape` at each lane's chosen index.
    fn scattered(self, lanes: Lanes<'_>, shape: &[usize]) -> Result<Self>;
    /// Each lane's chosen element.
    fn gathered(self, lanes: Lanes<'_>) -> Result<Self>;
    /// The columns of [`unfold`](crate::Var::unfold) folded back into images of `shape`
    /// (overlaps added, the padding's share dropped).
    fn folded(self, window: &Window2d, shape: &[usize]) -> Result<Self>;
    /// The values unfolded (im2col) with zero padding.
    fn unfolded(self, window: &Window2d) -> Result<Self>;
    /// Elements `start ..` (row-major) in `shape`: one part of a split.
    fn part(self, start: usize, shape: &[usize]) -> Result<Self>;
    /// The values written at `start` (row-major) into zeros of shape `whole`.
    fn embedded(self, start: usize, whole: &[usize]) -> Result<Self>;
}

/// An array for [`Tensor`]'s rules in backward: a view of a value the tape holds, or an array a
/// rule computed.
#[derive(Debug, Clone)]
pub(crate) enum Eager<'a, T> {
    /// A value the tape holds.
    View(ArrayViewD<'a, T>),
    /// A computed array.
    Owned(ArrayD<T>),
}

impl<T: Element> Eager<'_, T> {
    fn view(&self) -> ArrayViewD<'_, T> {
        match self {
            Eager::View(view) => view.view(),
            Eager::Owned(array) => array.view(),
        }
    }

    /// The array, copied from a view.
    pub fn into_owned(self) -> ArrayD<T> {
        match self {
            Eager::View(view) => view.to_owned(),
            Eager::Owned(array) => array,
        }
    }
}

impl<T: Element> Tensor<T> for Eager<'_, T> {
    fn dims(&self) -> Vec<usize> {
        self.view().shape().to_vec()
    }
    // An owned left operand is reused in place (as ndarray's `array * &rhs` does).
    fn times(self, rhs: &Self) -> Result<Self> {
        Ok(Eager::Owned(match self {
            Eager::View(a) => &a * &rhs.view(),
            Eager::Owned(a) => a * &rhs.view(),
        }))
    }
    fn over(self, rhs: &Self) -> Result<Self> {
        Ok(Eager::Owned(match self {
            Eager::View(a) => &a / &rhs.view(),
            Eager::Owned(a) => a / &rhs.view(),
        }))
    }
    fn negated(self) -> Self {
        Eager::Owned(match self {
            Eager::View(a) => a.mapv(|v| -v),
            Eager::Owned(a) => -a,
        })
    }
    fn summed_to(self, shape: &[usize]) -> Result<Self> {
        Ok(Eager::Owned(sum_to_shape(self.into_owned(), shape)?))
    }
    fn reshaped(self, shape: &[usize]) -> Result<Self> {
        let reshaped = self.view().to_shape(IxDyn(shape)).map(|a| a.into_owned());
        reshaped.map(Eager::Owned).map_err(|_| TapeError::Reshape {
            from: self.dims(),
            to: shape.to_vec(),
            count: Some(shape.iter().product()),
        })
    }
    fn spread(self, kept: &[usize], shape: &[usize], divisor: T) -> Result<Self> {
        let view = self.view();
        let g = view.to_shape(IxDyn(kept)).map_err(|_| TapeError::Reshape {
            from: view.shape().to_vec(),
            to: kept.to_vec(),
            count: Some(kept.iter().product()),
        })?;
        let g = g.broadcast(IxDyn(shape)).ok_or_else(|| TapeError::Broadcast {
            op: "spread",
            lhs: kept.to_vec(),
            rhs: shape.to_vec(),
        })?;
        Ok(Eager::Owned(g.mapv(|g| g / divisor)))
    }
    fn swapped_last(self) -> Result<Self> {
        Ok(Eager::Owned(crate::ops::shape::swap_last(&self.view())))
    }
    fn product(&self, rhs: &Self, transpose: [bool; 2]) -> Result<Self> {
        Ok(Eager::Owned(crate::ops::matmul::product(
            &self.view(),
            &rhs.view(),
            transpose,
        )?))
    }
    fn scattered(self, lanes: Lanes<'_>, shape: &[usize]) -> Result<Self> {
        Ok(Eager::Owned(lanes.scatter(&self.view(), shape)))
    }
    fn gathered(self, lanes: Lanes<'_>) -> Result<Self> {
        Ok(Eager::Owned(lanes.gather(&self.view())))
    }
    fn folded(self, window: &Window2d, shape: &[usize]) -> Result<Self> {
        Ok(Eager::Owned(crate::ops::unfold::fold_array(
            &self.view(),
            window,
            shape,
        )?))
    }
    fn unfolded(self, window: &Window2d) -> Result<Self> {
        Ok(Eager::Owned(crate::ops::unfold::unfold_array(
            &self.view(),
            window,
            T::zero(),
        )?))
    }
    fn part(self, start: usize, shape: &[usize]) -> Result<Self> {
        Ok(Eager::Owned(crate::ops::split::part_array(
            &self.view(),
            start,
            shape,
        )?))
    }
    fn embedded(self, start: usize, whole: &[usize]) -> Result<Self> {
        Ok(Eager::Owned(crate::ops::split::embed_array(
            &self.view(),
            start,
            whole,
        )?))
    }
}

impl<'t, T: Element> Tensor<T> for Var<'t, T> {
    fn dims(&self) -> Vec<usize> {
        self.shape()
    }
    fn times(self, rhs: &Self) -> Result<Self> {
        self.try_mul(*rhs)
    }
    fn over(self, rhs: &Self) -> Result<Self> {
        self.try_div(*rhs)
    }
    fn negated(self) -> Self {
        self.negate()
    }
    fn summed_to(self, shape: &[usize]) -> Result<Self> {
        self.sum_to(shape)
    }
    fn reshaped(self, shape: &[usize]) -> Result<Self> {
        self.reshape(shape)
    }
    fn spread(self, kept: &[usize], shape: &[usize], divisor: T) -> Result<Self> {
        let spread = self.reshape(kept)?.broadcast_to(shape)?;
        Ok(if divisor == T::one() {
            spread
        } else {
            spread.div_scalar(divisor)
        })
    }
    fn swapped_last(self) -> Result<Self> {
        self.swap_last_axes()
    }
    fn product(&self, rhs: &Self, transpose: [bool; 2]) -> Result<Self> {
        let operand = |v: Var<'t, T>, t: bool| if t { v.swap_last_axes() } else { Ok(v) };
        operand(*self, transpose[0])?.matmul(operand(*rhs, transpose[1])?)
    }
    fn scattered(self, lanes: Lanes<'_>, shape: &[usize]) -> Result<Self> {
        self.tape.apply(ScatterLanes::new(lanes, shape), &[self])
    }
    fn gathered(self, lanes: Lanes<'_>) -> Result<Self> {
        self.tape.apply(GatherLanes::new(lanes), &[self])
    }
    fn folded(self, window: &Window2d, shape: &[usize]) -> Result<Self> {
        self.tape.apply(Fold::new(*window, shape), &[self])
    }
    fn unfolded(self, window: &Window2d) -> Result<Self> {
        self.unfold(*window)
    }
    fn part(self, start: usize, shape: &[usize]) -> Result<Self> {
        Var::part(self, start, shape)
    }
    fn embedded(self, start: usize, whole: &[usize]) -> Result<Self> {
        self.embed(start, whole)
    }
}

/// A primitive's derivative rule, written once over [`Tensor`]: the gradient of each input
/// (where `needs` says it is needed) from the inputs, the output and the output's gradient.
pub(crate) trait Rule<T: Element> {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>>;

    /// The rule on arrays, for [`Function::backward`](crate::Function::backward).
    fn eager(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        let inputs: Vec<Eager<'_, T>> = args.inputs.iter().map(|v| Eager::View(v.view())).collect();
        let output = Eager::View(args.output.view());
        let g = Eager::View(args.grad_output.view());
        let grads = self.rule(&inputs, &output, &g, args.needs_grad)?;
        Ok(grads.into_iter().map(|g| g.map(Eager::into_owned)).collect())
    }

    /// The rule on `Var`s, for [`Function::backward_graph`](crate::Function::backward_graph).
    fn graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.rule(args.inputs, &args.output, &args.grad_output, args.needs_grad)
    }
}
