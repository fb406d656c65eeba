//! What every layer is ([`Module`]) and a way to stack them ([`Sequential`]).

use tape::{Element, Var};

use crate::error::Result;
use crate::param::Parameter;

/// Whether a layer runs for training or for evaluation. Passed to every forward call: there is
/// no global flag to forget to flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics; running statistics are updated.
    Train,
    /// Running statistics (when tracked); nothing is updated.
    Eval,
}

/// A layer: a forward pass on the tape and the parameters it trains.
///
/// `forward` takes `&mut self` because some layers keep state between calls (BatchNorm's running
/// statistics); `mode` says whether this call trains or evaluates.
pub trait Module<T: Element> {
    /// The layer applied to `x`, recorded on `x`'s tape.
    ///
    /// # Errors
    /// The layer's own errors (shapes, settings), as [`crate::Error`].
    fn forward<'t>(&mut self, x: Var<'t, T>, mode: Mode) -> Result<Var<'t, T>>;

    /// The trainable parameters, in a fixed order.
    fn parameters(&self) -> Vec<&Parameter<T>>;

    /// The trainable parameters, mutably, in the same order (for optimizers).
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>>;

    /// A short description for summaries, such as `Linear(64 -> 100)`.
    fn describe(&self) -> String;
}

/// Layers applied one after the other.
///
/// # Example
/// ```
/// use layers::prelude::*;
///
/// let mut rng = StdRng::seed_from_u64(0);
/// let mut net = Sequential::<f64>::new()
///     .push(Linear::new(4, 8, &mut rng))
///     .push(BatchNorm::new(8))
///     .push(Activation::Relu)
///     .push(Linear::new(8, 3, &mut rng));
/// assert_eq!(net.parameters().len(), 6); // two weights, two biases, BatchNorm's gamma and beta
///
/// // One training step: forward on a new tape, loss, backward, update.
/// let mut opt = Sgd::new(0.1, 0.9)?;
/// let tape = Tape::new();
/// let x = tape.constant(Array2::from_shape_fn((5, 4), |(i, j)| (i + 2 * j) as f64 / 7.0));
/// let logits = net.forward(x, Mode::Train)?;
/// assert_eq!(logits.shape(), vec![5, 3]);
/// let loss = softmax_cross_entropy(logits, &[0, 2, 1, 1, 0])?;
/// let grads = loss.backward()?;
/// opt.step(net.parameters_mut(), &grads)?;
/// # Ok::<(), layers::Error>(())
/// ```
pub struct Sequential<T: Element> {
    layers: Vec<Box<dyn Module<T>>>,
}

impl<T: Element> Default for Sequential<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Element> Sequential<T> {
    /// No layers yet.
    pub fn new() -> Self {
        Sequential { layers: Vec::new() }
    }

    /// Appends a layer.
    #[must_use]
    pub fn push(mut self, layer: impl Module<T> + 'static) -> Self {
        self.layers.push(Box::new(layer));
        self
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Box<dyn Module<T>>] {
        &self.layers
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|p| p.len()).sum()
    }
}

impl<T: Element> Module<T> for Sequential<T> {
    fn forward<'t>(&mut self, x: Var<'t, T>, mode: Mode) -> Result<Var<'t, T>> {
        self.layers
            .iter_mut()
            .try_fold(x, |x, layer| layer.forward(x, mode))
    }

    fn parameters(&self) -> Vec<&Parameter<T>> {
        self.layers.iter().flat_map(|layer| layer.parameters()).collect()
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        self.layers
            .iter_mut()
            .flat_map(|layer| layer.parameters_mut())
            .collect()
    }

    fn describe(&self) -> String {
        let inner: Vec<String> = self.layers.iter().map(|layer| layer.describe()).collect();
        format!("Sequential[{}]", inner.join(", "))
    }
}
