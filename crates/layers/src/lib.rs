//! Neural-net layers on the [`tape`]: Batch Normalization as one fused node with a hand-written
//! backward, and what a small net needs around it.
//!
//! - [`batchnorm_forward`] / [`batchnorm_backward`]: BatchNorm on arrays, returning a cache and
//!   the three gradients.
//! - [`batch_norm()`]: one fused node on a [`Tape`](tape::Tape), with a hand-written backward;
//!   [`batch_norm_composed`]: the same from tape primitives, to check it against.
//! - [`BatchNorm`]: the layer, with running statistics and PyTorch's semantics.
//! - [`layer_norm()`] and [`group_norm()`]: LayerNorm and GroupNorm (InstanceNorm with one group
//!   per channel), each one fused node beside its composition, and the [`LayerNorm`] and
//!   [`GroupNorm`] layers.
//! - For conv nets, each op one fused node with a hand-written backward beside its composition
//!   from primitives: [`conv2d()`] and the [`Conv2d`] layer, [`max_pool2d`] / [`avg_pool2d`] and
//!   the [`MaxPool2d`] / [`AvgPool2d`] layers, [`dropout()`] and the [`Dropout`] layer, and
//!   [`Flatten`].
//! - For small nets: [`Linear`], [`Activation`], [`Sequential`] (all [`Module`]s), the fused
//!   [`softmax_cross_entropy`] loss, the [`Sgd`], [`Adam`] and [`AdamW`] optimizers (weight
//!   decay, gradient clipping in [`optim`]), learning-rate schedules ([`lr_schedule`]) and
//!   mini-batches ([`data::DataLoader`]) of in-memory data such as the bundled handwritten
//!   digits ([`datasets::digits`]).
//! - State under PyTorch's names ([`Module::state_dict`], [`Module::load_state_dict`]) and
//!   safetensors files ([`Module::save_safetensors`], [`files`]) that PyTorch reads and writes,
//!   with checkpoints of a model and its optimizer ([`files::save_checkpoint`]).
//!
//! See the [`batch_norm`](mod@batch_norm), [`norm`], [`conv`], [`pool`] and
//! [`dropout`](mod@dropout) modules for the derivations and the conventions.
//!
//! # Using it from your crate
//! `use layers::prelude::*` brings the types of a training loop into scope. This crate
//! re-exports the [`tape`], [`ndarray`] and [`rand`] crates it is built with, so arrays and
//! random generators made through them always fit its API (a `rand` of another version in
//! your own `Cargo.toml` would give generators of another `Rng` trait).
//!
//! ```
//! use layers::prelude::*;
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let mut net = Sequential::<f64>::new()
//!     .push(Linear::new(2, 8, &mut rng))
//!     .push(BatchNorm::new(8))
//!     .push(Activation::Tanh)
//!     .push(Linear::new(8, 2, &mut rng));
//! let mut opt = Sgd::new(0.1, 0.9)?;
//! let x = array![[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]];
//! let labels = [0, 1, 1, 0];
//! for _ in 0..100 {
//!     let tape = Tape::new();
//!     let logits = net.forward(tape.constant(x.clone()), Mode::Train)?;
//!     let loss = softmax_cross_entropy(logits, &labels)?;
//!     let grads = loss.backward()?;
//!     opt.step(net.parameters_mut(), &grads)?;
//! }
//! // Evaluation: BatchNorm normalizes with its running statistics.
//! let tape = Tape::new();
//! let logits = net.forward(tape.constant(x), Mode::Eval)?;
//! assert_eq!(accuracy(&logits.value(), &labels)?, 1.0);
//! # Ok::<(), layers::Error>(())
//! ```

mod activation;
pub mod batch_norm;
pub mod conv;
pub mod data;
pub mod datasets;
pub mod dropout;
mod error;
pub mod files;
mod flatten;
mod linear;
mod loss;
pub mod lr_schedule;
mod module;
pub mod norm;
pub mod optim;
mod param;
pub mod pool;
mod schedule;

pub use activation::Activation;
pub use conv::{Conv2d, Conv2dOptions, conv2d, conv2d_composed};
pub use dropout::{Dropout, dropout, dropout_composed};
pub use flatten::Flatten;
pub use linear::Linear;
pub use loss::{accuracy, softmax_cross_entropy, softmax_cross_entropy_composed};
pub use module::{Mode, Module, Sequential, StateDict};
pub use norm::{GroupNorm, LayerNorm, group_norm, group_norm_composed, layer_norm, layer_norm_composed};
pub use optim::{Adam, AdamW, Optimizer, Sgd};

pub use batch_norm::{
    BatchNorm, BatchNormCache, BatchNormGrads, BatchNormNode, batch_norm, batch_norm_composed,
    batch_norm_eval, batchnorm_backward, batchnorm_forward,
};
pub use error::{Error, Result};
pub use param::Parameter;
pub use pool::{
    AvgPool2d, MaxPool2d, Window2d, avg_pool2d, avg_pool2d_composed, max_pool2d, max_pool2d_composed,
};
pub use {ndarray, rand, tape};

/// What a training loop needs, in one `use layers::prelude::*`: the tape, the layers, the loss,
/// the optimizers, the gradient checker, `ndarray`'s `array!` and array types, and a seedable
/// random generator.
pub mod prelude {
    pub use ndarray::{Array1, Array2, ArrayD, array};
    pub use rand::SeedableRng;
    pub use rand::rngs::StdRng;
    pub use tape::{GradCheck, Gradients, Tape, Var, check_gradients};

    pub use crate::{
        Activation, Adam, AdamW, AvgPool2d, BatchNorm, Conv2d, Conv2dOptions, Dropout, Flatten, GroupNorm,
        LayerNorm, Linear, MaxPool2d, Mode, Module, Optimizer, Sequential, Sgd, Window2d, accuracy,
        batch_norm, softmax_cross_entropy,
    };
}
