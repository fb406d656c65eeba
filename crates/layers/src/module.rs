//! What every layer is ([`Module`]), its state under PyTorch's names ([`StateDict`]), and a way
//! to stack layers ([`Sequential`]).

use std::collections::BTreeMap;

use ndarray::ArrayD;
use tape::{Element, Var};

use crate::error::{Error, Result};
use crate::param::Parameter;

/// A name → array map under PyTorch's `state_dict` names: `weight`, `bias`, `running_mean`,
/// `running_var`, `num_batches_tracked` (a rank-0 array), and in a [`Sequential`] each child's
/// keys behind its index (`0.weight`, `1.running_mean`).
pub type StateDict<T> = BTreeMap<String, ArrayD<T>>;

/// The state of a layer whose state is its parameters, under these names.
pub(crate) fn parameter_state<T: Element>(named: &[(&str, &Parameter<T>)]) -> StateDict<T> {
    named
        .iter()
        .map(|(name, parameter)| (name.to_string(), parameter.value.clone()))
        .collect()
}

/// Loads the parameters named so from `dict`, all checked first.
pub(crate) fn load_parameters<T: Element>(
    named: Vec<(&str, &mut Parameter<T>)>,
    dict: &StateDict<T>,
    strict: bool,
) -> Result<()> {
    let expected: StateDict<T> = named
        .iter()
        .map(|(name, parameter)| (name.to_string(), parameter.value.clone()))
        .collect();
    check_state_dict(&expected, dict, strict)?;
    for (name, parameter) in named {
        parameter.value = dict[name].clone();
    }
    Ok(())
}

/// Checks `dict` against a layer's own state `expected`: every expected key present with the
/// expected shape, and with `strict`, no other key.
///
/// # Errors
/// [`Error::MissingKey`], [`Error::StateShape`], or [`Error::UnexpectedKey`] (strict).
pub(crate) fn check_state_dict<T: Element>(
    expected: &StateDict<T>,
    dict: &StateDict<T>,
    strict: bool,
) -> Result<()> {
    let keys = || expected.keys().cloned().collect::<Vec<_>>();
    for (key, value) in expected {
        match dict.get(key) {
            None => {
                return Err(Error::MissingKey {
                    key: key.clone(),
                    expected: keys(),
                });
            }
            Some(got) if got.shape() != value.shape() => {
                return Err(Error::StateShape {
                    key: key.clone(),
                    expected: value.shape().to_vec(),
                    got: got.shape().to_vec(),
                });
            }
            Some(_) => {}
        }
    }
    match dict.keys().find(|key| strict && !expected.contains_key(*key)) {
        Some(key) => Err(Error::UnexpectedKey {
            key: key.clone(),
            expected: keys(),
        }),
        None => Ok(()),
    }
}

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

    /// The layer's parameters and buffers under PyTorch's names (none for a layer without
    /// state), copied.
    fn state_dict(&self) -> StateDict<T> {
        StateDict::new()
    }

    /// Loads a state under the names [`state_dict`](Module::state_dict) gives, of the same
    /// shapes: PyTorch's own `state_dict()` of the same layer loads as it is. With `strict`, a
    /// key the layer does not have is an error; without, it is ignored.
    ///
    /// Everything is checked ([`check_state_dict`](Module::check_state_dict)) before anything
    /// changes: on error the layer is as it was.
    ///
    /// # Errors
    /// As [`check_state_dict`](Module::check_state_dict).
    fn load_state_dict(&mut self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        self.check_state_dict(dict, strict)
    }

    /// Saves the [`state_dict`](Module::state_dict) as a safetensors file, atomically (see
    /// [`crate::files`]). [`Sequential`] adds its architecture's name as metadata.
    ///
    /// # Errors
    /// [`Error::File`] when the file cannot be written; the target is then unchanged.
    fn save_safetensors(&self, path: impl AsRef<std::path::Path>) -> Result<()>
    where
        Self: Sized,
    {
        crate::files::save_safetensors(&self.state_dict(), &Default::default(), path)
    }

    /// Loads a safetensors file strictly (every key, no other, every shape), converting its
    /// floats to `T`; returns the file's metadata. Nothing changes on error.
    ///
    /// # Errors
    /// As [`crate::files::load_safetensors`] and [`Module::load_state_dict`].
    fn load_safetensors(
        &mut self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<std::collections::HashMap<String, String>>
    where
        Self: Sized,
    {
        let (dict, metadata) = crate::files::load_safetensors(path)?;
        self.load_state_dict(&dict, true)?;
        Ok(metadata)
    }

    /// Whether [`load_state_dict`](Module::load_state_dict) would take `dict`, changing nothing.
    ///
    /// # Errors
    /// [`Error::MissingKey`], [`Error::StateShape`] naming the key, the shape expected and the
    /// shape got, [`Error::UnexpectedKey`] (strict), or a layer's own check of a value (a
    /// BatchNorm count that is not a whole number, say).
    fn check_state_dict(&self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        check_state_dict(&self.state_dict(), dict, strict)
    }
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
    arch: Option<String>,
}

impl<T: Element> Default for Sequential<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Element> Sequential<T> {
    /// No layers yet.
    pub fn new() -> Self {
        Sequential {
            layers: Vec::new(),
            arch: None,
        }
    }

    /// Appends a layer.
    #[must_use]
    pub fn push(mut self, layer: impl Module<T> + 'static) -> Self {
        self.layers.push(Box::new(layer));
        self
    }

    /// Appends a layer already boxed (one chosen at run time, say).
    #[must_use]
    pub fn push_boxed(mut self, layer: Box<dyn Module<T>>) -> Self {
        self.layers.push(layer);
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

    /// This net with a name for its architecture (`"cnn-bn"`, say), written into its files'
    /// metadata as `"arch"`.
    #[must_use]
    pub fn with_arch(self, arch: impl Into<String>) -> Self {
        Sequential {
            arch: Some(arch.into()),
            ..self
        }
    }

    /// The architecture's name, if given.
    pub fn arch(&self) -> Option<&str> {
        self.arch.as_deref()
    }

    /// The output of every layer in order (the last is the net's output), for reading the
    /// gradients of intermediate values after backward: each is a `Var` on the same tape, and
    /// [`Gradients::get`](tape::Gradients::get) gives its gradient.
    ///
    /// # Errors
    /// As [`Module::forward`]: the first layer's error, with nothing after it run.
    ///
    /// # Example
    /// ```
    /// use layers::prelude::*;
    ///
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let mut net = Sequential::<f64>::new()
    ///     .push(Linear::new(3, 4, &mut rng))
    ///     .push(Activation::Relu)
    ///     .push(Linear::new(4, 2, &mut rng));
    /// let tape = Tape::new();
    /// let outputs = net.forward_each(tape.constant(array![[1.0, -2.0, 0.5]]), Mode::Train)?;
    /// let loss = softmax_cross_entropy(outputs[2], &[1])?;
    /// let grads = loss.backward()?;
    /// // The gradient of the loss with respect to the hidden activations (after the ReLU).
    /// assert_eq!(grads.get(outputs[1]).unwrap().shape(), &[1, 4]);
    /// # Ok::<(), layers::Error>(())
    /// ```
    pub fn forward_each<'t>(&mut self, x: Var<'t, T>, mode: Mode) -> Result<Vec<Var<'t, T>>> {
        let mut outputs = Vec::with_capacity(self.layers.len());
        let mut current = x;
        for layer in &mut self.layers {
            current = layer.forward(current, mode)?;
            outputs.push(current);
        }
        Ok(outputs)
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

    /// Saves the state dict with `{"arch": ...}` as metadata when the net has a name.
    ///
    /// # Example
    /// ```
    /// use layers::prelude::*;
    ///
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let net = Sequential::<f32>::new().push(Linear::new(4, 2, &mut rng)).with_arch("tiny");
    /// let path = std::env::temp_dir().join(format!("tiny-{}.safetensors", std::process::id()));
    /// net.save_safetensors(&path)?;
    /// let mut copy = Sequential::<f64>::new().push(Linear::new(4, 2, &mut rng));
    /// assert_eq!(copy.load_safetensors(&path)?.get("arch").map(String::as_str), Some("tiny"));
    /// assert_eq!(copy.state_dict()["0.weight"], net.state_dict()["0.weight"].mapv(f64::from));
    /// # std::fs::remove_file(&path).unwrap();
    /// # Ok::<(), layers::Error>(())
    /// ```
    fn save_safetensors(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let metadata = self
            .arch
            .iter()
            .map(|arch| ("arch".to_string(), arch.clone()))
            .collect();
        crate::files::save_safetensors(&self.state_dict(), &metadata, path)
    }

    /// Each child's state with its index in front, as PyTorch's `nn.Sequential`: `0.weight`,
    /// `1.running_mean`, ...
    fn state_dict(&self) -> StateDict<T> {
        let mut dict = StateDict::new();
        for (i, layer) in self.layers.iter().enumerate() {
            dict.extend(
                layer
                    .state_dict()
                    .into_iter()
                    .map(|(key, value)| (format!("{i}.{key}"), value)),
            );
        }
        dict
    }

    /// Checks the whole dict against every child first, then loads each child's share.
    fn load_state_dict(&mut self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        self.check_state_dict(dict, strict)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.load_state_dict(&share(dict, i), false)?;
        }
        Ok(())
    }

    fn check_state_dict(&self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        check_state_dict(&self.state_dict(), dict, strict)?;
        // Each child's own checks of its values.
        for (i, layer) in self.layers.iter().enumerate() {
            layer.check_state_dict(&share(dict, i), false)?;
        }
        Ok(())
    }
}

/// The keys of child `i` in a [`Sequential`]'s dict, without their `i.` prefix.
fn share<T: Element>(dict: &StateDict<T>, i: usize) -> StateDict<T> {
    let prefix = format!("{i}.");
    dict.iter()
        .filter_map(|(key, value)| {
            key.strip_prefix(&prefix)
                .map(|key| (key.to_string(), value.clone()))
        })
        .collect()
}
