//! Reverse-mode automatic differentiation over [`ndarray`] arrays.
//!
//! A [`Tape`] records every operation applied to its [`Var`]s; [`Tape::backward`] walks the
//! record in reverse and applies each op's backward (the chain rule), accumulating the
//! gradient of every node. The primitives ([`ops`]) are written against the same public
//! custom-op API ([`Function`]) that other crates use for fused ops, and
//! [`check_gradients`] verifies any of them against finite differences.
//!
//! [`Tape::grad`] with [`GradOptions::create_graph`] records the backward pass itself on the
//! tape, so gradients can be differentiated again (Hessian-vector products, gradient
//! penalties), to any order through the primitives. Each primitive writes its derivative rule
//! once, over scalars or arrays for `backward` and over `Var`s for the recorded pass; a custom op
//! takes part by implementing [`Function::backward_graph`], and without it is a clear error
//! naming the op.
//!
//! Works over `f32` and `f64` ([`Element`]).
//!
//! # Example
//! ```
//! use ndarray::array;
//! use tape::Tape;
//!
//! let tape = Tape::new();
//! let x = tape.var(array![[1.0, 2.0], [3.0, 4.0]]);
//! let w = tape.var(array![[0.5], [-0.5]]);
//! let loss = x.matmul(w)?.tanh().powi(2).mean();
//! let grads = loss.backward()?;
//! println!("loss = {}, dL/dw = {}", loss.scalar(), grads.wrt(w)?);
//!
//! // The same function, checked against central differences.
//! let inputs = [x.value().as_ref().clone(), w.value().as_ref().clone()];
//! tape::check_gradients(|_, v| Ok(v[0].matmul(v[1])?.tanh().powi(2).mean()), &inputs)
//!     .expect("gradients agree with finite differences");
//! # Ok::<(), tape::TapeError>(())
//! ```

mod broadcast;
mod dot;
mod element;
mod error;
mod function;
mod gradcheck;
pub mod html;
pub mod ops;
mod rule;
mod tape;

pub use broadcast::{broadcast_shape, sum_to_shape};
pub use element::Element;
pub use error::{Result, TapeError};
pub use function::{BackwardArgs, Function, GraphArgs};
pub use gradcheck::{
    GradCheck, GradCheckError, GradCheckReport, InputReport, check_gradients, check_second_order,
};
pub use tape::{BackwardStep, GradOptions, Gradients, Tape, Var, VarId};

#[cfg(test)]
pub(crate) mod testing {
    //! Seeded random inputs for the unit tests.
    use ndarray::ArrayD;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Uniform values in `[-2, 2)`.
    pub fn uniform(shape: &[usize], seed: u64) -> ArrayD<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        ArrayD::from_shape_simple_fn(shape, || rng.random_range(-2.0..2.0))
    }

    /// Uniform values in `[0.5, 2)`, away from the kinks and poles of ln, sqrt, div, abs.
    pub fn positive(shape: &[usize], seed: u64) -> ArrayD<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        ArrayD::from_shape_simple_fn(shape, || rng.random_range(0.5..2.0))
    }
}
