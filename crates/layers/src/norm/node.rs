//! LayerNorm and GroupNorm on the tape, two ways each: [`layer_norm`] and [`group_norm`] record
//! ONE fused node whose backward is the closed form of the [module docs](super);
//! [`layer_norm_composed`] and [`group_norm_composed`] record the same computation as tape
//! primitives, so the tape derives its gradient. Tests check that the two agree.

use ndarray::{ArrayD, ArrayViewD};
use tape::{BackwardArgs, Element, Function, GraphArgs, TapeError, Var};

use super::double::GroupNormBackward;

use super::kernel::{self, Affine, Groups, Saved};
use super::{channel_groups, check_parameter, layer_groups};
use crate::batch_norm::{row_major, shaped, to_f64};
use crate::error::Result;

/// The fused LayerNorm or GroupNorm node: inputs `x`, then the weight and the bias where there
/// are; saved state only each group's mean and inverse standard deviation (`f64`).
///
/// Made by [`layer_norm`] and [`group_norm`] (and the [`LayerNorm`](crate::LayerNorm) and
/// [`GroupNorm`](crate::GroupNorm) layers), which compute the statistics and the output
/// together; the node hands that output to the tape. Implemented with the tape's public
/// custom-op API, [`tape::Function`].
#[derive(Debug, Clone)]
pub struct GroupNormNode<T> {
    /// `"layer_norm"` or `"group_norm"`.
    name: &'static str,
    groups: Groups,
    has_weight: bool,
    has_bias: bool,
    mean: Vec<f64>,
    pub(super) inv_std: Vec<f64>,
    /// The output computed with the statistics, until `forward` hands it to the tape.
    output: Option<Vec<T>>,
}

impl<T: Element> GroupNormNode<T> {
    /// Computes the statistics and the output of `x` (checked to be `groups`) and returns the
    /// node, to be applied to `x`, `weight` and `bias` (those given).
    pub(super) fn new(
        name: &'static str,
        x: &[T],
        groups: Groups,
        (weight, bias): (Option<&[f64]>, Option<&[f64]>),
        eps: f64,
    ) -> Self {
        let (mean, inv_std, out) = kernel::forward(x, groups, Affine { weight, bias }, eps);
        GroupNormNode {
            name,
            groups,
            has_weight: weight.is_some(),
            has_bias: bias.is_some(),
            mean,
            inv_std,
            output: Some(out),
        }
    }

    fn inputs(&self) -> usize {
        1 + usize::from(self.has_weight) + usize::from(self.has_bias)
    }
}

impl<T: Element> Function<T> for GroupNormNode<T> {
    fn name(&self) -> &str {
        self.name
    }

    fn rule(&self) -> &str {
        "normalization (fused): ∂/∂x = r [w g - mean(w g) - x̂ mean(w g x̂)], ∂/∂w = Σ g x̂, ∂/∂b = Σ g"
    }

    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        if inputs.len() != self.inputs() {
            return Err(TapeError::op(
                self.name,
                format!("takes {} inputs, got {}", self.inputs(), inputs.len()),
            ));
        }
        let x = &inputs[0];
        match self.output.take() {
            Some(out) if out.len() == x.len() => Ok(shaped(out, x.raw_dim())),
            Some(out) => Err(TapeError::op(
                self.name,
                format!("the node's output has {} values, x has {}", out.len(), x.len()),
            )),
            None => Err(TapeError::op(self.name, "the node was applied twice")),
        }
    }

    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        let (x, params) = args
            .inputs
            .split_first()
            .ok_or_else(|| TapeError::op(self.name, "backward takes the forward inputs"))?;
        let weight = self.has_weight.then(|| to_f64(&params[0]));
        let saved = Saved {
            weight: weight.as_deref(),
            mean: &self.mean,
            inv_std: &self.inv_std,
        };
        let (dout, x_values) = (row_major(&args.grad_output), row_major(x));
        let grads = kernel::backward(&dout, &x_values, self.groups, saved, args.needs_grad[0]);
        let parameter = |values: &[f64], like: &ArrayViewD<'_, T>| {
            let values = values.iter().map(|&v| T::from_f64_lossy(v)).collect();
            shaped(values, like.raw_dim())
        };
        let mut out = vec![grads.dx.map(|dx| shaped(dx, x.raw_dim()))];
        let mut rest = params.iter().zip(&args.needs_grad[1..]);
        if self.has_weight {
            let (weight, &needed) = rest.next().unwrap_or_else(|| unreachable!("counted in forward"));
            out.push(needed.then(|| parameter(&grads.dweight, weight)));
        }
        if self.has_bias {
            let (bias, &needed) = rest.next().unwrap_or_else(|| unreachable!("counted in forward"));
            out.push(needed.then(|| parameter(&grads.dbias, bias)));
        }
        Ok(out)
    }

    /// One fused node, `layer_norm_backward` or `group_norm_backward`, whose own backward is
    /// the closed-form double backward (see the [module docs](super#the-double-backward)).
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        let node = GroupNormBackward {
            name: if self.name == "layer_norm" {
                "layer_norm_backward"
            } else {
                "group_norm_backward"
            },
            groups: self.groups,
            has_weight: self.has_weight,
            has_bias: self.has_bias,
            mean: self.mean.clone(),
            inv_std: self.inv_std.clone(),
        };
        node.record(args)
    }

    fn saved_bytes(&self) -> usize {
        (self.mean.len() + self.inv_std.len()) * std::mem::size_of::<f64>()
    }
}

/// LayerNorm as ONE fused tape node with a hand-written backward (see the [module docs](super)
/// for the derivation): each sample normalized over its trailing axes `normalized_shape`, then
/// scaled by `weight` and shifted by `bias` (each optional, as in PyTorch's
/// `F.layer_norm(x, normalized_shape, weight, bias, eps)`).
///
/// # Shapes
/// `x`: `(*, *normalized_shape)`; `weight`, `bias`: `normalized_shape`; the result: as `x`.
///
/// # Errors
/// [`Error::Shape`](crate::Error::Shape) when `x` does not end in `normalized_shape` (or that is
/// empty or holds a 0), or `weight` or `bias` are not of `normalized_shape`;
/// [`Error::InvalidSetting`](crate::Error::InvalidSetting) for a negative or NaN `eps`;
/// [`Error::Tape`](crate::Error::Tape) for a `Var` of another tape.
///
/// # Example
/// ```
/// use ndarray::array;
/// use tape::Tape;
///
/// let tape = Tape::<f64>::new();
/// let x = tape.var(array![[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]]);
/// let (weight, bias) = (tape.var(array![1.0, 1.0, 2.0]), tape.var(array![0.0, 0.5, 0.0]));
/// let y = layers::layer_norm(x, &[3], Some(weight), Some(bias), 1e-5)?;
/// // Each row has mean 0 and variance 1 before the weight and bias.
/// assert!((y.value()[[0, 0]] + 1.2247).abs() < 1e-4);
/// let grads = y.backward_with(array![[0.1, -0.4, 0.7], [0.2, -0.3, 0.9]])?;
/// assert_eq!(grads.wrt(weight)?.shape(), &[3]);
/// # Ok::<(), layers::Error>(())
/// ```
pub fn layer_norm<'t, T: Element>(
    x: Var<'t, T>,
    normalized_shape: &[usize],
    weight: Option<Var<'t, T>>,
    bias: Option<Var<'t, T>>,
    eps: f64,
) -> Result<Var<'t, T>> {
    let groups = layer_groups(&x.shape(), normalized_shape, eps)?;
    check_parameters(weight, bias, normalized_shape, "normalized_shape")?;
    apply("layer_norm", x, groups, weight, bias, eps)
}

/// GroupNorm as ONE fused tape node with a hand-written backward (see the [module docs](super)):
/// each sample's channels normalized in `num_groups` groups of `C / num_groups` channels over
/// all their positions, then each channel scaled by `weight` and shifted by `bias` (each
/// optional, as in PyTorch's `F.group_norm(x, num_groups, weight, bias, eps)`). `num_groups = C`
/// is InstanceNorm.
///
/// # Shapes
/// `x`: `(N, C, *)`, rank 2 or more; `weight`, `bias`: `(C,)`; the result: as `x`.
///
/// # Errors
/// [`Error::Groups`](crate::Error::Groups) when `num_groups` does not divide `C`,
/// [`Error::InvalidSetting`](crate::Error::InvalidSetting) for `num_groups = 0` or a negative or
/// NaN `eps`, [`Error::Shape`](crate::Error::Shape) for `x` of rank below 2 (or with no value
/// per group) or `weight` or `bias` not `(C,)`, [`Error::Tape`](crate::Error::Tape) for a `Var`
/// of another tape.
///
/// # Example
/// ```
/// use ndarray::{array, Array4};
/// use tape::Tape;
///
/// let tape = Tape::<f64>::new();
/// let x = tape.var(Array4::from_shape_fn((2, 4, 3, 3), |(n, c, h, w)| (n + c * h + w) as f64));
/// let (weight, bias) = (tape.var(array![1.0, 2.0, 1.0, 0.5]), tape.var(array![0.0, 0.0, 0.0, 0.0]));
/// let y = layers::group_norm(x, 2, Some(weight), Some(bias), 1e-5)?;
/// assert_eq!(y.shape(), vec![2, 4, 3, 3]);
/// # Ok::<(), layers::Error>(())
/// ```
pub fn group_norm<'t, T: Element>(
    x: Var<'t, T>,
    num_groups: usize,
    weight: Option<Var<'t, T>>,
    bias: Option<Var<'t, T>>,
    eps: f64,
) -> Result<Var<'t, T>> {
    let shape = x.shape();
    let groups = channel_groups(&shape, num_groups, eps)?;
    check_parameters(weight, bias, &shape[1..2], "one value per channel of x")?;
    apply("group_norm", x, groups, weight, bias, eps)
}

/// The weight and the bias, those given, are of `shape` (`of` says where it comes from).
fn check_parameters<T: Element>(
    weight: Option<Var<'_, T>>,
    bias: Option<Var<'_, T>>,
    shape: &[usize],
    of: &str,
) -> Result<()> {
    for (name, p) in [("weight", weight), ("bias", bias)] {
        if let Some(p) = p {
            check_parameter(name, &p.shape(), shape, of)?;
        }
    }
    Ok(())
}

fn apply<'t, T: Element>(
    name: &'static str,
    x: Var<'t, T>,
    groups: Groups,
    weight: Option<Var<'t, T>>,
    bias: Option<Var<'t, T>>,
    eps: f64,
) -> Result<Var<'t, T>> {
    let inputs: Vec<Var<'t, T>> = std::iter::once(x).chain(weight).chain(bias).collect();
    let as_f64 = |p: Option<Var<'t, T>>| p.map(|p| to_f64(&p.value()));
    let (weight_f64, bias_f64) = (as_f64(weight), as_f64(bias));
    let value = x.value();
    let node = GroupNormNode::new(
        name,
        &row_major(&*value),
        groups,
        (weight_f64.as_deref(), bias_f64.as_deref()),
        eps,
    );
    Ok(x.tape().apply(node, &inputs)?)
}

/// LayerNorm composed from tape primitives only (mean over the trailing axes, sub, mul, add
/// eps, sqrt, div, scale, shift), computed in `T`: the tape derives its gradient. It exists to
/// check [`layer_norm`] against and to show the chain rule at work.
///
/// # Shapes
/// As [`layer_norm`].
///
/// # Errors
/// As [`layer_norm`].
pub fn layer_norm_composed<'t, T: Element>(
    x: Var<'t, T>,
    normalized_shape: &[usize],
    weight: Option<Var<'t, T>>,
    bias: Option<Var<'t, T>>,
    eps: f64,
) -> Result<Var<'t, T>> {
    let shape = x.shape();
    layer_groups(&shape, normalized_shape, eps)?;
    check_parameters(weight, bias, normalized_shape, "normalized_shape")?;
    let axes: Vec<usize> = (shape.len() - normalized_shape.len()..shape.len()).collect();
    let normalized = standardized(x, &axes, eps)?;
    affine(normalized, weight, bias)
}

/// GroupNorm composed from tape primitives only: `x` reshaped to `(N, groups, rest)`,
/// standardized over the last axis, reshaped back, then scaled and shifted per channel. As
/// [`layer_norm_composed`], it exists to check [`group_norm`] against.
///
/// # Shapes
/// As [`group_norm`].
///
/// # Errors
/// As [`group_norm`].
pub fn group_norm_composed<'t, T: Element>(
    x: Var<'t, T>,
    num_groups: usize,
    weight: Option<Var<'t, T>>,
    bias: Option<Var<'t, T>>,
    eps: f64,
) -> Result<Var<'t, T>> {
    let shape = x.shape();
    let groups = channel_groups(&shape, num_groups, eps)?;
    check_parameters(weight, bias, &shape[1..2], "one value per channel of x")?;
    let mut channel_shape = vec![1; shape.len()];
    channel_shape[1] = shape[1];
    let as_channel = |p: Option<Var<'t, T>>| p.map(|p| p.reshape(&channel_shape)).transpose();
    let (weight, bias) = (as_channel(weight)?, as_channel(bias)?);
    let grouped = x.reshape(&[shape[0], num_groups, groups.len()])?;
    let normalized = standardized(grouped, &[2], eps)?.reshape(&shape)?;
    affine(normalized, weight, bias)
}

/// `(x - mean) / sqrt(var + eps)` over `axes`, from primitives.
fn standardized<'t, T: Element>(x: Var<'t, T>, axes: &[usize], eps: f64) -> Result<Var<'t, T>> {
    let centred = x.try_sub(x.mean_axes(axes, true)?)?;
    let var = centred.try_mul(centred)?.mean_axes(axes, true)?;
    Ok(centred.try_div(var.add_scalar(T::from_f64_lossy(eps)).sqrt())?)
}

/// `x · weight + bias`, broadcasting, for those given.
fn affine<'t, T: Element>(
    x: Var<'t, T>,
    weight: Option<Var<'t, T>>,
    bias: Option<Var<'t, T>>,
) -> Result<Var<'t, T>> {
    let scaled = match weight {
        Some(weight) => x.try_mul(weight)?,
        None => x,
    };
    Ok(match bias {
        Some(bias) => scaled.try_add(bias)?,
        None => scaled,
    })
}
