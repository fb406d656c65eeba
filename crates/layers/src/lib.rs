//! Batch Normalization as one fused tape node, and the layers a small net needs.
//!
//! - [`batchnorm_forward`] / [`batchnorm_backward`]: the seed task's functions, on arrays.
//! - [`batch_norm()`]: one fused node on a [`tape::Tape`], with a hand-written backward;
//!   [`batch_norm_composed`]: the same from tape primitives, to check it against.
//! - [`BatchNorm`]: the layer, with running statistics and PyTorch's semantics.
//!
//! - For small nets: [`Linear`], [`Activation`], [`Sequential`] (all [`Module`]s), the fused
//!   [`softmax_cross_entropy`] loss, and the [`Sgd`] and [`Adam`] optimizers.
//!
//! See the [`batch_norm`](mod@batch_norm) module for the derivation and the conventions.

mod activation;
pub mod batch_norm;
mod error;
mod linear;
mod loss;
mod module;
mod optim;
mod param;
mod schedule;

pub use activation::Activation;
pub use linear::Linear;
pub use loss::{accuracy, softmax_cross_entropy, softmax_cross_entropy_composed};
pub use module::{Mode, Module, Sequential};
pub use optim::{Adam, Optimizer, Sgd};

pub use batch_norm::{
    BatchNorm, BatchNormCache, BatchNormGrads, BatchNormNode, StateDict, batch_norm, batch_norm_composed,
    batchnorm_backward, batchnorm_forward,
};
pub use error::{Error, Result};
pub use param::Parameter;
