//! The floating-point element types a [`Tape`](crate::Tape) works over.

use std::fmt::{Debug, Display};
use std::iter::Sum;

use ndarray::{LinalgScalar, ScalarOperand};
use num_traits::Float;

/// A floating-point type the tape can differentiate: `f32` or `f64`.
///
/// It gathers what `num-traits` (`Float`) and `ndarray` (`LinalgScalar` for `dot`,
/// `ScalarOperand` for `array * scalar`) need, plus lossless-enough conversions to and from
/// `f64`, which is the precision statistics and gradient checks are done in.
///
/// The trait is sealed: it is implemented for `f32` and `f64` only, so code written for each of
/// them (a kernel compiled once per type) covers every `Element`.
pub trait Element:
    Float
    + LinalgScalar
    + ScalarOperand
    + Debug
    + Display
    + Default
    + Sum
    + Send
    + Sync
    + 'static
    + sealed::Sealed
{
    /// The Rust name of the type, `"f32"` or `"f64"`, for messages and reports.
    const NAME: &'static str;

    /// Converts from `f64`, rounding to nearest for `f32` (out-of-range values become ±inf).
    fn from_f64_lossy(value: f64) -> Self;

    /// Converts to `f64` exactly (every `f32` is an `f64`).
    fn as_f64(self) -> f64;
}

mod sealed {
    /// Implemented for the element types only: see [`Element`](super::Element).
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

impl Element for f32 {
    const NAME: &'static str = "f32";

    #[inline]
    fn from_f64_lossy(value: f64) -> Self {
        value as f32
    }

    #[inline]
    fn as_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Element for f64 {
    const NAME: &'static str = "f64";

    #[inline]
    fn from_f64_lossy(value: f64) -> Self {
        value
    }

    #[inline]
    fn as_f64(self) -> f64 {
        self
    }
}
