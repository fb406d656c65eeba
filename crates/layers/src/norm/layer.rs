//! The LayerNorm and GroupNorm layers: their parameters under PyTorch's names, `affine` on or off.

use ndarray::{ArrayD, IxDyn};
use tape::{Element, Var};

use super::{check_normalized_shape, check_num_groups, group_norm, layer_norm};
use crate::error::{Error, Result, check_non_negative};
use crate::module::{Mode, Module, StateDict, load_parameters, parameter_state};
use crate::param::Parameter;

/// The weight (ones) and bias (zeros) of `shape`, where `affine`.
fn affine_parameters<T: Element>(shape: &[usize], affine: bool) -> Option<(Parameter<T>, Parameter<T>)> {
    affine.then(|| {
        (
            Parameter::new(ArrayD::from_elem(IxDyn(shape), T::from_f64_lossy(1.0))),
            Parameter::new(ArrayD::from_elem(IxDyn(shape), T::from_f64_lossy(0.0))),
        )
    })
}

/// The weight and the bias on `tape`, where `affine`.
fn bound<'t, T: Element>(
    affine: &Option<(Parameter<T>, Parameter<T>)>,
    tape: &'t tape::Tape<T>,
) -> (Option<Var<'t, T>>, Option<Var<'t, T>>) {
    affine.as_ref().map(|(w, b)| (w.bind(tape), b.bind(tape))).unzip()
}

/// The parameters as a list, for [`Module::parameters`].
fn listed<T: Element>(affine: &Option<(Parameter<T>, Parameter<T>)>) -> Vec<&Parameter<T>> {
    affine.iter().flat_map(|(w, b)| [w, b]).collect()
}

fn listed_mut<T: Element>(affine: &mut Option<(Parameter<T>, Parameter<T>)>) -> Vec<&mut Parameter<T>> {
    affine.iter_mut().flat_map(|(w, b)| [w, b]).collect()
}

fn state<T: Element>(affine: &Option<(Parameter<T>, Parameter<T>)>) -> StateDict<T> {
    match affine {
        Some((w, b)) => parameter_state(&[("weight", w), ("bias", b)]),
        None => StateDict::new(),
    }
}

fn load<T: Element>(
    affine: &mut Option<(Parameter<T>, Parameter<T>)>,
    dict: &StateDict<T>,
    strict: bool,
) -> Result<()> {
    match affine {
        Some((w, b)) => load_parameters(vec![("weight", w), ("bias", b)], dict, strict),
        None => load_parameters(Vec::new(), dict, strict),
    }
}

/// Layer Normalization over the trailing axes `normalized_shape`, as PyTorch's `nn.LayerNorm`:
/// a fused node ([`layer_norm`]), the same in training and evaluation.
///
/// With `affine` (PyTorch's `elementwise_affine`), a `weight` (starting at 1) and a `bias`
/// (starting at 0) of `normalized_shape`, under those names in the state dict.
///
/// # Shapes
/// `x`: `(*, *normalized_shape)`; the output: as `x`.
///
/// # Example
/// ```
/// use layers::{LayerNorm, Mode, Module};
/// use ndarray::Array3;
///
/// let mut norm = LayerNorm::<f32>::new(&[8])?;
/// let tape = tape::Tape::new();
/// let x = tape.constant(Array3::from_shape_fn((2, 5, 8), |(b, t, d)| (b + t * d) as f32));
/// let y = norm.forward(x, Mode::Train)?;
/// assert_eq!(y.shape(), vec![2, 5, 8]);
/// assert_eq!(norm.describe(), "LayerNorm([8])");
/// assert_eq!(norm.state_dict().keys().collect::<Vec<_>>(), ["bias", "weight"]);
/// # Ok::<(), layers::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LayerNorm<T: Element> {
    normalized_shape: Vec<usize>,
    eps: f64,
    /// The weight and the bias, where `affine`.
    affine: Option<(Parameter<T>, Parameter<T>)>,
}

impl<T: Element> LayerNorm<T> {
    /// PyTorch's defaults: `eps = 1e-5`, with a weight and a bias.
    ///
    /// # Errors
    /// As [`LayerNorm::with_options`].
    pub fn new(normalized_shape: &[usize]) -> Result<Self> {
        Self::with_options(normalized_shape, 1e-5, true)
    }

    /// A layer with this `eps`, with (`affine`) or without a weight and a bias.
    ///
    /// # Errors
    /// [`Error::Shape`] for an empty `normalized_shape` or one holding a 0,
    /// [`Error::InvalidSetting`] for a negative or NaN `eps`.
    pub fn with_options(normalized_shape: &[usize], eps: f64, affine: bool) -> Result<Self> {
        check_non_negative("eps", eps)?;
        check_normalized_shape(normalized_shape)?;
        Ok(LayerNorm {
            normalized_shape: normalized_shape.to_vec(),
            eps,
            affine: affine_parameters(normalized_shape, affine),
        })
    }

    /// The trailing axes normalized together.
    pub fn normalized_shape(&self) -> &[usize] {
        &self.normalized_shape
    }

    /// The weight, where `affine`.
    pub fn weight(&self) -> Option<&Parameter<T>> {
        self.affine.as_ref().map(|(w, _)| w)
    }

    /// The bias, where `affine`.
    pub fn bias(&self) -> Option<&Parameter<T>> {
        self.affine.as_ref().map(|(_, b)| b)
    }
}

impl<T: Element> Module<T> for LayerNorm<T> {
    /// # Errors
    /// As [`layer_norm`].
    fn forward<'t>(&mut self, x: Var<'t, T>, _mode: Mode) -> Result<Var<'t, T>> {
        let (weight, bias) = bound(&self.affine, x.tape());
        layer_norm(x, &self.normalized_shape, weight, bias, self.eps)
    }

    fn parameters(&self) -> Vec<&Parameter<T>> {
        listed(&self.affine)
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        listed_mut(&mut self.affine)
    }

    fn describe(&self) -> String {
        let affine = if self.affine.is_some() { "" } else { ", no affine" };
        format!("LayerNorm({:?}{affine})", self.normalized_shape)
    }

    /// `weight` and `bias` of `normalized_shape` where `affine`, as PyTorch's `nn.LayerNorm`.
    fn state_dict(&self) -> StateDict<T> {
        state(&self.affine)
    }

    fn load_state_dict(&mut self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        load(&mut self.affine, dict, strict)
    }
}

/// Group Normalization of `(N, C, *)` input in `num_groups` groups of channels, as PyTorch's
/// `nn.GroupNorm`: a fused node ([`group_norm`]), the same in training and evaluation.
/// `num_groups = C` is InstanceNorm, `num_groups = 1` normalizes each sample over all its values.
///
/// With `affine`, a `weight` (starting at 1) and a `bias` (starting at 0) per channel.
///
/// # Shapes
/// `x`: `(N, C, *)` with `C = num_channels`; the output: as `x`.
///
/// # Example
/// ```
/// use layers::{GroupNorm, Mode, Module};
/// use ndarray::Array4;
///
/// let mut norm = GroupNorm::<f32>::new(2, 6)?;
/// let tape = tape::Tape::new();
/// let x = tape.constant(Array4::from_shape_fn((3, 6, 4, 4), |(n, c, h, w)| (n * c + h * w) as f32));
/// assert_eq!(norm.forward(x, Mode::Train)?.shape(), vec![3, 6, 4, 4]);
/// assert_eq!(norm.describe(), "GroupNorm(2 groups, 6 channels)");
/// # Ok::<(), layers::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct GroupNorm<T: Element> {
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    /// The weight and the bias, where `affine`.
    affine: Option<(Parameter<T>, Parameter<T>)>,
}

impl<T: Element> GroupNorm<T> {
    /// PyTorch's defaults: `eps = 1e-5`, with a weight and a bias.
    ///
    /// # Errors
    /// As [`GroupNorm::with_options`].
    pub fn new(num_groups: usize, num_channels: usize) -> Result<Self> {
        Self::with_options(num_groups, num_channels, 1e-5, true)
    }

    /// A layer with this `eps`, with (`affine`) or without a weight and a bias.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for `num_groups = 0` or a negative or NaN `eps`,
    /// [`Error::Groups`] when `num_groups` does not divide `num_channels`.
    pub fn with_options(num_groups: usize, num_channels: usize, eps: f64, affine: bool) -> Result<Self> {
        check_non_negative("eps", eps)?;
        check_num_groups(num_groups, num_channels)?;
        Ok(GroupNorm {
            num_groups,
            num_channels,
            eps,
            affine: affine_parameters(&[num_channels], affine),
        })
    }

    /// The number of groups.
    pub fn num_groups(&self) -> usize {
        self.num_groups
    }

    /// The number of channels.
    pub fn num_channels(&self) -> usize {
        self.num_channels
    }

    /// The weight, where `affine`.
    pub fn weight(&self) -> Option<&Parameter<T>> {
        self.affine.as_ref().map(|(w, _)| w)
    }

    /// The bias, where `affine`.
    pub fn bias(&self) -> Option<&Parameter<T>> {
        self.affine.as_ref().map(|(_, b)| b)
    }
}

impl<T: Element> Module<T> for GroupNorm<T> {
    /// # Errors
    /// As [`group_norm`], and [`Error::Shape`] when axis 1 of `x` is not `num_channels`.
    fn forward<'t>(&mut self, x: Var<'t, T>, _mode: Mode) -> Result<Var<'t, T>> {
        let shape = x.shape();
        if shape.get(1) != Some(&self.num_channels) {
            return Err(Error::Shape {
                name: "x",
                got: shape,
                expected: format!("(N, {}, *) for {}", self.num_channels, self.describe()),
            });
        }
        let (weight, bias) = bound(&self.affine, x.tape());
        group_norm(x, self.num_groups, weight, bias, self.eps)
    }

    fn parameters(&self) -> Vec<&Parameter<T>> {
        listed(&self.affine)
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        listed_mut(&mut self.affine)
    }

    fn describe(&self) -> String {
        let affine = if self.affine.is_some() { "" } else { ", no affine" };
        format!(
            "GroupNorm({} groups, {} channels{affine})",
            self.num_groups, self.num_channels
        )
    }

    /// `weight` and `bias` `(C,)` where `affine`, as PyTorch's `nn.GroupNorm`.
    fn state_dict(&self) -> StateDict<T> {
        state(&self.affine)
    }

    fn load_state_dict(&mut self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        load(&mut self.affine, dict, strict)
    }
}
