//! The primitive ops. Each is a small type implementing [`Function`](crate::Function), the same
//! public API a custom op uses, with its forward and its backward side by side, followed by the
//! `Var` methods that record it. Each derivative rule is written once and serves both
//! `backward` (on arrays) and a recorded backward (on `Var`s, differentiable again).
//!
//! | module | ops |
//! |---|---|
//! | [`binary`] | `add`, `sub`, `mul`, `div` with NumPy broadcasting |
//! | [`unary`] | `neg`, `exp`, `ln`, `sqrt`, `powf`, `powi`, `abs`, `relu`, `sigmoid`, `tanh`, scalar `+`, `*` and `/` |
//! | [`reduce`] | `sum`, `mean` over chosen axes or everything, `max` over an axis |
//! | [`shape`] | `reshape`, `flatten`, `broadcast_to`, `transpose`, `swap_last_axes`, `detach` |
//! | [`split`] | `split` a value into parts (how an op hands out several results), and its adjoint `embed` |
//! | [`unfold`] | `unfold` (im2col) and its adjoint `fold` (col2im), for convolution and pooling |
//! | [`matmul`] | matrix product, batched over leading axes |
//! | [`operators`] | `+ - * /` and unary `-` on `Var`s and scalars |

pub mod binary;
pub mod matmul;
pub mod operators;
pub mod reduce;
pub mod shape;
pub mod split;
pub mod unary;
pub mod unfold;

use ndarray::{ArrayD, ArrayViewD};

use crate::{Result, TapeError};

/// Checks that an op was given `count` inputs: the primitives are public types, so
/// `tape.apply(Add, &[x])` can reach them with any number.
pub(crate) fn arity<T>(op: &'static str, inputs: &[ArrayViewD<'_, T>], count: usize) -> Result<()> {
    if inputs.len() == count {
        Ok(())
    } else {
        Err(TapeError::Arity {
            op,
            expected: count,
            got: inputs.len(),
        })
    }
}

/// `Some(compute())` when the gradient is needed, `None` otherwise (the work is skipped).
pub(crate) fn grad_if<T>(needed: bool, compute: impl FnOnce() -> ArrayD<T>) -> Option<ArrayD<T>> {
    needed.then(compute)
}

/// For ops whose forward cannot fail (elementwise ops on one input of the same tape).
pub(crate) fn infallible<T>(result: Result<T>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("internal error: an infallible op failed: {error}"),
    }
}
