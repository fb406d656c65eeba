//! The convolution layer.

use ndarray::{Array, Array1};
use rand::Rng;
use tape::{Element, Var};

use super::{Conv2dOptions, conv2d};
use crate::error::{Error, Result};
use crate::module::{Mode, Module, StateDict, load_parameters, parameter_state};
use crate::param::Parameter;

/// A 2-D convolution layer, as PyTorch's `nn.Conv2d`.
///
/// # Initialisation
/// Weights and bias are drawn uniformly from `[-1/√fan_in, 1/√fan_in)` with the given random
/// generator, `fan_in = C_in / groups · kH · kW`: PyTorch's default (Kaiming-uniform with
/// `a = √5` for the weight, and the same bound for the bias). Seed the generator for a
/// reproducible net.
///
/// # Shapes
/// `x`: `(N, C_in, H, W)`; output `(N, C_out, oH, oW)` (see [`conv2d`]).
///
/// # Example
/// ```
/// use layers::{Conv2d, Conv2dOptions, Mode, Module};
/// use rand::SeedableRng;
///
/// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
/// let mut conv = Conv2d::<f32>::with_options(1, 16, [3, 3], Conv2dOptions::default().with_padding([1, 1]), true, &mut rng)?;
/// let tape = tape::Tape::new();
/// let y = conv.forward(tape.constant(ndarray::Array4::<f32>::zeros((60, 1, 8, 8))), Mode::Train)?;
/// assert_eq!(y.shape(), vec![60, 16, 8, 8]);
/// assert_eq!(conv.describe(), "Conv2d(1 -> 16, 3x3, padding [1, 1])");
/// # Ok::<(), layers::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Conv2d<T: Element> {
    /// `(C_out, C_in / groups, kH, kW)`.
    pub weight: Parameter<T>,
    /// `(C_out,)`, or none.
    pub bias: Option<Parameter<T>>,
    /// Stride, padding, dilation and groups.
    pub options: Conv2dOptions,
}

impl<T: Element> Conv2d<T> {
    /// A layer with a bias and the default options (stride 1, no padding), initialised as
    /// PyTorch does from `rng`.
    ///
    /// # Panics
    /// If the weight, `out_channels × in_channels × kH × kW` values, could not be allocated
    /// ([`Conv2d::with_options`] returns an error instead).
    pub fn new(in_channels: usize, out_channels: usize, kernel: [usize; 2], rng: &mut impl Rng) -> Self {
        Self::build(
            in_channels,
            out_channels,
            kernel,
            Conv2dOptions::default(),
            true,
            rng,
        )
    }

    /// A layer with these options, with or without a bias.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for `groups = 0`, [`Error::Groups`] when `groups` does not divide
    /// both channel counts, [`Error::Tape`] when the weight is larger than an array can be.
    pub fn with_options(
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        options: Conv2dOptions,
        bias: bool,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let groups = options.groups;
        super::check_groups(
            groups,
            &[(in_channels, "input channels"), (out_channels, "output channels")],
        )?;
        let shape = [out_channels, in_channels / groups, kernel[0], kernel[1]];
        if !super::fits::<T>(&shape) {
            return Err(Error::Tape(tape::TapeError::TooLarge {
                op: "Conv2d",
                shape: shape.to_vec(),
            }));
        }
        Ok(Self::build(in_channels, out_channels, kernel, options, bias, rng))
    }

    fn build(
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        options: Conv2dOptions,
        bias: bool,
        rng: &mut impl Rng,
    ) -> Self {
        let per_group = in_channels / options.groups.max(1);
        let fan_in = per_group * kernel[0] * kernel[1];
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let mut draw = || T::from_f64_lossy(rng.random_range(-bound..bound));
        let weight = Array::from_shape_simple_fn((out_channels, per_group, kernel[0], kernel[1]), &mut draw);
        let bias = bias.then(|| Parameter::new(Array1::from_shape_simple_fn(out_channels, &mut draw)));
        Conv2d {
            weight: Parameter::new(weight),
            bias,
            options,
        }
    }

    /// Input channels: axis 1 of the weight times the groups (0 for a weight that is not 4-D).
    pub fn in_channels(&self) -> usize {
        match self.weight.value.shape() {
            [_, per_group, _, _] => per_group * self.options.groups,
            _ => 0,
        }
    }

    /// Output channels: axis 0 of the weight (0 for a weight of rank 0).
    pub fn out_channels(&self) -> usize {
        self.weight.value.shape().first().copied().unwrap_or(0)
    }
}

impl<T: Element> Module<T> for Conv2d<T> {
    /// # Errors
    /// As [`conv2d`]: the input's shape, and the weight's and bias's (public fields, which may
    /// have been replaced).
    fn forward<'t>(&mut self, x: Var<'t, T>, _mode: Mode) -> Result<Var<'t, T>> {
        let tape = x.tape();
        let bias = self.bias.as_ref().map(|bias| bias.bind(tape));
        conv2d(x, self.weight.bind(tape), bias, self.options)
    }

    fn parameters(&self) -> Vec<&Parameter<T>> {
        std::iter::once(&self.weight).chain(&self.bias).collect()
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        std::iter::once(&mut self.weight).chain(&mut self.bias).collect()
    }

    /// `weight` `(C_out, C_in / groups, kH, kW)` and, with a bias, `bias`, as PyTorch's
    /// `nn.Conv2d`.
    fn state_dict(&self) -> StateDict<T> {
        let bias = self.bias.as_ref().map(|bias| ("bias", bias));
        parameter_state(
            &std::iter::once(("weight", &self.weight))
                .chain(bias)
                .collect::<Vec<_>>(),
        )
    }

    fn load_state_dict(&mut self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        let bias = self.bias.as_mut().map(|bias| ("bias", bias));
        load_parameters(
            std::iter::once(("weight", &mut self.weight))
                .chain(bias)
                .collect(),
            dict,
            strict,
        )
    }

    fn describe(&self) -> String {
        let kernel = match self.weight.value.shape() {
            [_, _, kh, kw] => format!("{kh}x{kw}"),
            shape => format!("weight {shape:?}"),
        };
        let defaults = Conv2dOptions::default();
        let o = &self.options;
        let mut text = format!(
            "Conv2d({} -> {}, {kernel}",
            self.in_channels(),
            self.out_channels()
        );
        for (name, value, default) in [
            ("stride", o.stride, defaults.stride),
            ("padding", o.padding, defaults.padding),
            ("dilation", o.dilation, defaults.dilation),
        ] {
            if value != default {
                text += &format!(", {name} {value:?}");
            }
        }
        if o.groups != 1 {
            text += &format!(", groups {}", o.groups);
        }
        if self.bias.is_none() {
            text += ", no bias";
        }
        text + ")"
    }
}
