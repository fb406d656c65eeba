//! Layer Normalization (Ba, Kiros and Hinton 2016, <https://arxiv.org/abs/1607.06450>) and
//! Group Normalization (Wu and He 2018, <https://arxiv.org/abs/1803.08494>): normalization over
//! groups of values that lie next to each other in memory, each sample on its own.
//!
//! - [`layer_norm()`] normalizes each sample over its trailing axes (`normalized_shape`), with a
//!   weight and a bias per position of those axes: the normalization of transformers.
//! - [`group_norm()`] normalizes each sample over groups of `C / num_groups` channels and every
//!   position, with a weight and a bias per channel: for conv nets trained on small batches.
//!   One group per channel is Instance Normalization (`nn.InstanceNorm2d` with `affine=True`);
//!   one group for all channels normalizes each sample over all its values.
//!
//! Each is ONE fused tape node with the hand-written backward below, beside its composition from
//! tape primitives ([`layer_norm_composed`], [`group_norm_composed`]) that the tests check it
//! against; the layers [`LayerNorm`] and [`GroupNorm`] hold the parameters under PyTorch's
//! names. Neither keeps running statistics: training and evaluation compute the same thing.
//!
//! # The derivation of the fused backward
//! A group holds `M` values `x₁ … x_M`, and value `i` has its own weight `wᵢ` and bias `bᵢ` (in
//! LayerNorm every value of a sample's group has its own; in GroupNorm the values of one channel
//! share theirs). As BatchNorm, but per group:
//!
//! ```text
//! μ = (1/M) Σᵢ xᵢ,   σ² = (1/M) Σᵢ (xᵢ - μ)²,   r = 1 / √(σ² + ε)
//! x̂ᵢ = (xᵢ - μ) r,   yᵢ = wᵢ x̂ᵢ + bᵢ
//! ```
//!
//! With `gᵢ = ∂L/∂yᵢ`, `∂L/∂x̂ᵢ = wᵢ gᵢ`, and the Jacobian of `x̂` is BatchNorm's,
//! `∂x̂ᵢ/∂xⱼ = r (δᵢⱼ - 1/M) - (r/M) x̂ᵢ x̂ⱼ`, so
//!
//! ```text
//! ∂L/∂xⱼ = Σᵢ wᵢ gᵢ ∂x̂ᵢ/∂xⱼ = r [ wⱼ gⱼ - mean(w g) - x̂ⱼ · mean(w g x̂) ]
//! ```
//!
//! The difference from BatchNorm is that the weight sits inside both means, since it varies
//! within a group. The parameter gradients sum over every group that uses a parameter:
//! `∂L/∂w_p = Σ g x̂` and `∂L/∂b_p = Σ g` over the values of parameter `p` in all samples.
//! One pass over a group's `g` and `x` gives, lane by lane (the values of one parameter), both
//! `Σ g` and `Σ g x̂`: the parameter gradients, and weighted by `w` the group's two means. A
//! second pass writes `∂L/∂x` while the group is in cache. Backward keeps only `μ` and `r` per
//! group besides `x`, which the tape holds anyway.
//!
//! # The double backward
//! Recording the backward ([`tape::Tape::grad`] with `create_graph`) adds one fused node,
//! `layer_norm_backward` or `group_norm_backward`, with inputs `x`, the weight (if any) and `g`,
//! and result `(∂L/∂x, ∂L/∂w, ∂L/∂b)` (those the node has). It is BatchNorm's double backward
//! (see [`batch_norm`](mod@crate::batch_norm#the-double-backward)) per group with `γ = 1` and
//! `ĝ = w g` in place of `g`, plus the weight's own terms. With `A`, `B`, `C` the upstream
//! gradients of the three results, `T(v) = v - mean(v) - x̂ mean(v x̂)` per group, `m =
//! mean(ĝ x̂)`, `a = mean(A x̂)`, `Ā = mean(A)` and `h = B g` (each value's `B` is its
//! parameter's):
//!
//! ```text
//! ∂S/∂gₖ = wₖ r T(A)ₖ + Bₖ x̂ₖ + Cₖ
//! ∂S/∂w_p = Σ g r T(A)                    over the values of parameter p in every group
//! ∂S/∂xₖ = r² [ (a m - mean(A ĝ) + Ā mean(ĝ)) x̂ₖ - m T(A)ₖ - a T(ĝ)ₖ ] + r T(h)ₖ
//! ```
//!
//! `Σ A ∂L/∂x = r Σ T(A) ĝ` (`T` is symmetric) gives the first; the last is BatchNorm's `x`
//! formula with the `b Σ g x̂` term now `Σ h x̂`, since `∂L/∂w` sums `g x̂` lane by lane. One pass
//! takes seven means per group (of `A`, `A x̂`, `A ĝ`, `ĝ`, `ĝ x̂`, `h`, `h x̂`); each output
//! asked for is one more. A third derivative through the node is
//! [`TapeError::NoGraphRule`](tape::TapeError::NoGraphRule) naming it.
//!
//! # Numerics
//! As BatchNorm's, with the same statistics code: `f64` statistics for `f32` data, a group
//! with every value equal normalizes to exactly its bias (and `r = 0` where `σ² + ε = 0`), and
//! finite input never yields NaN (with BatchNorm's one exception, `f64` values so far apart that
//! `x - μ` overflows). The output and `∂L/∂x` are computed in `f64` and rounded once.
//!
//! # Shapes
//! LayerNorm: `x` of any rank ending in `normalized_shape`; weight and bias of
//! `normalized_shape`. GroupNorm: `x` `(N, C, *)`, rank 2 or more, `C` divisible by
//! `num_groups`; weight and bias `(C,)`. The result has the shape of `x`.

mod double;
mod kernel;
mod layer;
mod node;

pub use self::layer::{GroupNorm, LayerNorm};
pub use self::node::{GroupNormNode, group_norm, group_norm_composed, layer_norm, layer_norm_composed};

use self::kernel::Groups;
use crate::error::{Error, Result, check_non_negative};

/// The groups of a LayerNorm of `x` over its trailing `normalized_shape`, checked.
fn layer_groups(x: &[usize], normalized_shape: &[usize], eps: f64) -> Result<Groups> {
    check_non_negative("eps", eps)?;
    check_normalized_shape(normalized_shape)?;
    let axes = normalized_shape.len();
    if axes > x.len() || x[x.len() - axes..] != *normalized_shape {
        return Err(Error::Shape {
            name: "x",
            got: x.to_vec(),
            expected: format!("[..., {}] (ending in normalized_shape)", dims(normalized_shape)),
        });
    }
    Ok(Groups {
        count: x[..x.len() - axes].iter().product(),
        lanes: normalized_shape.iter().product(),
        s: 1,
        sets: 1,
    })
}

/// The groups of a GroupNorm of `x` `(N, C, *)` in `num_groups` groups of channels, checked.
fn channel_groups(x: &[usize], num_groups: usize, eps: f64) -> Result<Groups> {
    check_non_negative("eps", eps)?;
    let [n, c, spatial @ ..] = x else {
        return Err(Error::Shape {
            name: "x",
            got: x.to_vec(),
            expected: "rank 2 or more for GroupNorm: (N, C, *)".into(),
        });
    };
    check_num_groups(num_groups, *c)?;
    let (lanes, s) = (c / num_groups, spatial.iter().product());
    check_group_size(x, lanes * s)?;
    Ok(Groups {
        count: n * num_groups,
        lanes,
        s,
        sets: num_groups,
    })
}

/// LayerNorm normalizes over one or more axes, none of them empty.
pub(crate) fn check_normalized_shape(normalized_shape: &[usize]) -> Result<()> {
    if normalized_shape.is_empty() || normalized_shape.contains(&0) {
        return Err(Error::Shape {
            name: "normalized_shape",
            got: normalized_shape.to_vec(),
            expected: "one or more axes, each of size 1 or more".into(),
        });
    }
    Ok(())
}

/// `num_groups` is at least 1 and divides the `channels`.
fn check_num_groups(num_groups: usize, channels: usize) -> Result<()> {
    if num_groups == 0 {
        return Err(Error::InvalidSetting {
            name: "num_groups",
            expected: "at least 1",
            got: 0.0,
        });
    }
    if channels % num_groups != 0 {
        return Err(Error::Groups {
            groups: num_groups,
            channels,
            of: "channels of x",
        });
    }
    Ok(())
}

/// A group must hold at least one value: statistics of none are undefined.
fn check_group_size(x: &[usize], len: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::Shape {
            name: "x",
            got: x.to_vec(),
            expected: "at least one value per normalized group".into(),
        });
    }
    Ok(())
}

/// A parameter of the given `shape`, or an error naming it.
fn check_parameter(name: &'static str, got: &[usize], shape: &[usize], of: &str) -> Result<()> {
    if got == shape {
        Ok(())
    } else {
        Err(Error::Shape {
            name,
            got: got.to_vec(),
            expected: format!("[{}] ({of})", dims(shape)),
        })
    }
}

/// `4, 5` for `[4, 5]`.
fn dims(shape: &[usize]) -> String {
    shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests;
