//! Batch Normalization (Ioffe and Szegedy 2015, <https://arxiv.org/abs/1502.03167>).
//!
//! Three levels, each a thin layer over the one below:
//!
//! - functions on arrays: [`batchnorm_forward`] returns the output and a cache, and
//!   [`batchnorm_backward`] the three gradients;
//! - tape nodes: [`batch_norm`] (one fused node) and [`batch_norm_composed`] (the same from
//!   primitives);
//! - the layer, [`BatchNorm`]: parameters, running statistics, train/eval mode, state dict.
//!
//! # Shapes
//! `x` is `(N, C)` or `(N, C, *spatial)` with rank 2 to 5 and the channel on axis 1 (PyTorch's
//! layout). Statistics are taken per channel over every other axis: `M = N × spatial size`
//! values each. `gamma`, `beta` and the statistics have `C` elements.
//!
//! # Training mode, and the derivation of the fused backward
//! For one channel with values `x₁ … x_M`:
//!
//! ```text
//! μ = (1/M) Σᵢ xᵢ                 batch mean
//! σ² = (1/M) Σᵢ (xᵢ - μ)²         batch variance, biased (divided by M, as PyTorch normalizes)
//! r = 1 / √(σ² + ε)               inverse standard deviation
//! x̂ᵢ = (xᵢ - μ) r                 normalized value
//! yᵢ = γ x̂ᵢ + β                   output
//! ```
//!
//! Given the upstream gradient `gᵢ = ∂L/∂yᵢ`, the parameter gradients are direct:
//! `∂L/∂β = Σᵢ gᵢ` and `∂L/∂γ = Σᵢ gᵢ x̂ᵢ`. For the input, every `x̂ᵢ` depends on every `xⱼ`
//! through `μ` and `σ²`:
//!
//! ```text
//! ∂μ/∂xⱼ  = 1/M
//! ∂σ²/∂xⱼ = (2/M)(xⱼ - μ)          (the term through μ vanishes: Σᵢ (xᵢ - μ) = 0)
//! ∂r/∂xⱼ  = -½ r³ ∂σ²/∂xⱼ = -(r³/M)(xⱼ - μ)
//! ∂x̂ᵢ/∂xⱼ = r (δᵢⱼ - 1/M) - (r³/M)(xᵢ - μ)(xⱼ - μ)
//! ```
//!
//! so, with `∂L/∂x̂ᵢ = γ gᵢ`,
//!
//! ```text
//! ∂L/∂xⱼ = Σᵢ γ gᵢ ∂x̂ᵢ/∂xⱼ
//!        = γ r [ gⱼ - (1/M) Σᵢ gᵢ - x̂ⱼ (1/M) Σᵢ gᵢ x̂ᵢ ]
//!        = γ r [ gⱼ - mean(g) - x̂ⱼ · mean(g x̂) ]
//! ```
//!
//! Two per-channel sums, `Σ g` (which is `∂L/∂β`) and `Σ g (x - μ)` (which is `∂L/∂γ / r`),
//! read `g` and `x` once; a second pass writes `∂L/∂x`. Backward keeps only `x` (which a tape
//! holds anyway), `μ` and `r`: nothing of the input's size is saved for it. `∂L/∂x` sums to zero
//! over each channel, since `Σ x̂ = 0`; and it is zero when `g` is constant over a channel (the
//! normalized output cannot move all its values the same way).
//!
//! # The double backward
//! Recording the backward ([`tape::Tape::grad`] with `create_graph`) adds one fused node, whose
//! inputs are `x`, `γ` and `g` and whose result is `(∂L/∂x, ∂L/∂γ, ∂L/∂β)`. Its own backward
//! takes upstream gradients `Aⱼ` (of `∂L/∂xⱼ`), `b` (of `∂L/∂γ`) and `c` (of `∂L/∂β`), and
//! differentiates `S = Σⱼ Aⱼ ∂L/∂xⱼ + b ∂L/∂γ + c ∂L/∂β`. Write `T(v)ⱼ = vⱼ - mean(v) - x̂ⱼ
//! mean(v x̂)` for the centring of the first-order formula, so that `∂L/∂x = γ r T(g)`; then
//! `Σᵢ vᵢ x̂ᵢ` has gradient `r T(v)` with respect to `x` (the same algebra as above), and `r`
//! has `-(r²/M) x̂`. With `ḡ = mean(g)`, `m = mean(g x̂)`, `Ā = mean(A)`, `a = mean(A x̂)`:
//!
//! ```text
//! S = γ r Σ A (g - ḡ) - (γ r / M) (Σ A x̂)(Σ g x̂) + b Σ g x̂ + c Σ g
//!
//! ∂S/∂gₖ = γ r T(A)ₖ + b x̂ₖ + c                          (the first-order formula, applied to A)
//! ∂S/∂γ  = r Σ A T(g) = M r [ mean(A g) - Ā ḡ - a m ]
//! ∂S/∂xₖ = γ r² [ (a m - mean(A g) + Ā ḡ) x̂ₖ - m T(A)ₖ - a T(g)ₖ ] + b r T(g)ₖ
//! ```
//!
//! (the `x̂` term from the derivative of `r`, the others from those of `Σ A x̂` and `Σ g x̂`;
//! with the `T` expanded, `x̂ₖ` has coefficient `γ r² (3 a m - mean(A g) + Ā ḡ) - b r m`). Each output is `p A + q g + s x̂ + t` with per-channel coefficients
//! from five sums (`Σ g`, `Σ g x̂`, `Σ A`, `Σ A x̂`, `Σ A g`): one pass reads `x`, `g` and `A`,
//! one more writes each output asked for. In evaluation mode `r` and `μ` are constants: `∂S/∂g
//! = γ r A + b x̂ + c`, `∂S/∂γ = r Σ A g`, `∂S/∂x = b r g`. The double backward node saves what
//! the first one did, `μ` and `r`; its own backward cannot be recorded, so a third derivative
//! through it is [`TapeError::NoGraphRule`](tape::TapeError::NoGraphRule) naming
//! `batch_norm_backward`.
//!
//! # Evaluation mode
//! The running statistics replace `μ` and `σ²`. They are constants, so `∂L/∂x = γ r g`
//! exactly, while `∂L/∂γ` and `∂L/∂β` are as above.
//!
//! # Numerics
//! Statistics accumulate in `f64` for `f32` data too, and `dx` is computed in `f64` and rounded
//! once. The output is computed in `T` from `x - μ` with `μ` split into two `T` parts (`μ_hi +
//! μ_lo`), so no digit of `x - μ` is lost to the rounding of `μ`: a constant channel (even at
//! 1e30) has `x - μ = 0` exactly and normalizes to exactly `β`, and finite input never yields NaN
//! or infinity, with one exception: `f64` data whose values in one channel are so far apart that
//! `x - μ` itself overflows (beyond about ±9e307 on both sides of the mean) gives infinite
//! outputs there.
//!
//! # Conventions (PyTorch's, where references differ)
//! Normalization uses the biased batch variance; the running variance is updated with the
//! unbiased one (`σ² M / (M - 1)`). `running = (1 - momentum) · running + momentum · batch`
//! with `momentum = 0.1`, or the cumulative average `momentum = 1 / num_batches_tracked` when
//! it is `None`. Running statistics start at 0 (mean) and 1 (variance).

mod double;
pub(crate) mod kernel;
mod layer;
mod node;

use std::borrow::Cow;

use ndarray::{Array, Array1, ArrayD, ArrayRef, AsArray, Dimension, Ix1};
use tape::Element;

use self::kernel::{Dims, Saved};
pub use self::layer::BatchNorm;
pub use self::node::{BatchNormNode, batch_norm, batch_norm_composed, batch_norm_eval};
use crate::error::{Error, Result, check_non_negative};

/// The `(N, C, S)` dimensions of `shape`, checking rank 2 to 5.
pub(crate) fn dims_of(shape: &[usize]) -> Result<Dims> {
    if (2..=5).contains(&shape.len()) {
        Ok(Dims::of(shape))
    } else {
        Err(Error::Shape {
            name: "x",
            got: shape.to_vec(),
            expected: "rank 2 to 5 for BatchNorm: (N, C) or (N, C, *spatial)".into(),
        })
    }
}

/// Checks that a per-channel argument has `channels` elements.
pub(crate) fn check_channels(name: &'static str, shape: &[usize], channels: usize) -> Result<()> {
    match shape {
        [count] if *count == channels => Ok(()),
        [count] => Err(Error::Length {
            name,
            got: *count,
            expected: channels,
            of: "channels of x",
        }),
        _ => Err(Error::Shape {
            name,
            got: shape.to_vec(),
            expected: format!("[{channels}] (one value per channel of x)"),
        }),
    }
}

/// Training mode needs two or more values per channel (as PyTorch).
pub(crate) fn check_batch(shape: &[usize], dims: Dims) -> Result<()> {
    if dims.per_channel() > 1 {
        Ok(())
    } else {
        Err(Error::SingleValuePerChannel {
            shape: shape.to_vec(),
            per_channel: dims.per_channel(),
        })
    }
}

/// Checks the inputs of a training-mode BatchNorm: `eps`, the rank of `x`, one `gamma` and one
/// `beta` per channel, and two or more values per channel.
pub(crate) fn check_training_inputs(x: &[usize], gamma: &[usize], beta: &[usize], eps: f64) -> Result<Dims> {
    check_non_negative("eps", eps)?;
    let dims = dims_of(x)?;
    check_channels("gamma", gamma, dims.c)?;
    check_channels("beta", beta, dims.c)?;
    check_batch(x, dims)?;
    Ok(dims)
}

/// The elements in row-major order, without a copy when they are already contiguous.
pub(crate) fn row_major<T: Element, D: Dimension>(values: &ArrayRef<T, D>) -> Cow<'_, [T]> {
    match values.as_slice() {
        Some(slice) => Cow::Borrowed(slice),
        None => Cow::Owned(values.iter().copied().collect()),
    }
}

/// The values as f64, in row-major order.
pub(crate) fn to_f64<T: Element, D: Dimension>(values: &ArrayRef<T, D>) -> Vec<f64> {
    row_major(values).iter().map(|v| v.as_f64()).collect()
}

pub(crate) fn from_f64<T: Element>(values: &[f64]) -> Array1<T> {
    values.iter().map(|&v| T::from_f64_lossy(v)).collect()
}

/// What [`batchnorm_forward`] keeps for [`batchnorm_backward`].
///
/// It holds one array of the input's size, the input `x` itself (exact: a saved `x̂` would be
/// rounded to `T`), and per-channel vectors: `gamma`, the batch mean and the inverse standard
/// deviation (in `f64`). Backward recomputes `x̂ = (x - mean) · inv_std` on the fly, which costs
/// less than reading a saved copy.
#[derive(Debug, Clone)]
pub struct BatchNormCache<T: Element> {
    x: ArrayD<T>,
    gamma: Vec<f64>,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    var: Vec<f64>,
    eps: f64,
}

impl<T: Element> BatchNormCache<T> {
    /// The input of the forward pass.
    pub fn x(&self) -> &ArrayD<T> {
        &self.x
    }
    /// Per-channel batch mean (`saved_mean` in PyTorch).
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }
    /// Per-channel biased batch variance.
    pub fn var(&self) -> &[f64] {
        &self.var
    }
    /// Per-channel `1 / sqrt(var + eps)` (`saved_invstd` in PyTorch).
    pub fn inv_std(&self) -> &[f64] {
        &self.inv_std
    }
    /// The `eps` of the forward pass.
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

/// Training-mode BatchNorm forward: normalizes each channel of `x` with its batch mean and
/// biased variance, then scales by `gamma` and shifts by `beta`.
///
/// # Shapes
/// `x`: `(N, C)` or `(N, C, *spatial)`, rank 2 to 5; `gamma`, `beta`: `(C,)`; `out`: as `x`.
/// Any array or view is accepted (`&Array`, `ArrayView`, non-contiguous views too).
///
/// # Errors
/// [`Error::Shape`] for another rank, [`Error::Length`] when `gamma` or `beta` do not have
/// `C` elements, [`Error::SingleValuePerChannel`] when `N × spatial == 1`,
/// [`Error::InvalidSetting`] for a negative or NaN `eps`.
///
/// # Example: each column normalized, then scaled by `gamma` and shifted by `beta`
/// ```
/// use ndarray::array;
/// use layers::batchnorm_forward;
///
/// let x = array![[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]];
/// let (out, _cache) = batchnorm_forward(&x, &array![2.0, 0.5], &array![1.0, -1.0], 1e-5)?;
/// let expected = array![[-1.4494, -1.6124], [1.0, -1.0], [3.4494, -0.3876]];
/// assert!(out.abs_diff_eq(&expected, 1e-4));
/// # Ok::<(), layers::Error>(())
/// ```
pub fn batchnorm_forward<'a, T, D>(
    x: impl AsArray<'a, T, D>,
    gamma: impl AsArray<'a, T, Ix1>,
    beta: impl AsArray<'a, T, Ix1>,
    eps: f64,
) -> Result<(Array<T, D>, BatchNormCache<T>)>
where
    T: Element,
    D: Dimension,
{
    let (x, gamma, beta) = (x.into(), gamma.into(), beta.into());
    let dims = check_training_inputs(x.shape(), gamma.shape(), beta.shape(), eps)?;

    let gamma = to_f64(&gamma);
    let (stats, inv_std, out) = kernel::forward_batch(&row_major(&x), dims, &gamma, &to_f64(&beta), eps);
    let cache = BatchNormCache {
        x: x.to_owned().into_dyn(),
        gamma,
        mean: stats.mean,
        inv_std,
        var: stats.var,
        eps,
    };
    Ok((shaped(out, x.raw_dim()), cache))
}

/// `(dx, dgamma, dbeta)`: the gradients [`batchnorm_backward`] returns.
pub type BatchNormGrads<T, D> = (Array<T, D>, Array1<T>, Array1<T>);

/// Training-mode BatchNorm backward: the gradients with respect to `x`, `gamma` and `beta`
/// given the upstream gradient `dout`, by the closed form derived in the [module docs](self).
///
/// # Shapes
/// `dout`: the shape of the forward's `x`; `dx`: the same; `dgamma`, `dbeta`: `(C,)`.
///
/// # Errors
/// [`Error::Shape`] when `dout` does not have the shape of `x`.
///
/// # Example: the gradients for an uneven upstream gradient
/// ```
/// use ndarray::array;
/// use layers::{batchnorm_backward, batchnorm_forward};
///
/// let x = array![[1.0, 2.0], [3.0, 4.0]];
/// let (_, cache) = batchnorm_forward(&x, &array![1.0, 1.0], &array![0.0, 0.0], 1e-5)?;
/// let dout = array![[0.3, -1.2], [0.8, 0.5]];
/// let (dx, dgamma, dbeta) = batchnorm_backward(&dout, &cache)?;
/// assert!(dbeta.abs_diff_eq(&array![1.1, -0.7], 1e-12));  // column sums of dout
/// assert!(dx.sum_axis(ndarray::Axis(0)).abs_diff_eq(&array![0.0, 0.0], 1e-12)); // columns sum to 0
/// # Ok::<(), layers::Error>(())
/// ```
pub fn batchnorm_backward<'a, T, D>(
    dout: impl AsArray<'a, T, D>,
    cache: &BatchNormCache<T>,
) -> Result<BatchNormGrads<T, D>>
where
    T: Element,
    D: Dimension,
{
    let dout = dout.into();
    if dout.shape() != cache.x.shape() {
        return Err(Error::Shape {
            name: "dout",
            got: dout.shape().to_vec(),
            expected: format!("{:?} (the shape of x)", cache.x.shape()),
        });
    }
    let dims = Dims::of(cache.x.shape());
    let saved = Saved {
        gamma: &cache.gamma,
        mean: &cache.mean,
        inv_std: &cache.inv_std,
        batch_stats: true,
    };
    let grads = kernel::backward(&row_major(&dout), &row_major(&cache.x), dims, saved, true);
    Ok((
        shaped(grads.dx.unwrap_or_default(), dout.raw_dim()),
        from_f64(&grads.dgamma),
        from_f64(&grads.dbeta),
    ))
}

/// A row-major `Vec` as an array of `dim` (whose element count it has).
pub(crate) fn shaped<T, D: Dimension>(data: Vec<T>, dim: D) -> Array<T, D> {
    Array::from_shape_vec(dim, data).unwrap_or_else(|_| unreachable!("the kernels keep the element count"))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Seeded random arrays for the tests.
    use ndarray::{Array1, ArrayD, IxDyn};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, StandardNormal};

    /// Normal values with the given mean and standard deviation.
    pub fn normal(shape: &[usize], mean: f64, std: f64, seed: u64) -> ArrayD<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        ArrayD::from_shape_simple_fn(IxDyn(shape), || {
            let z: f64 = StandardNormal.sample(&mut rng);
            mean + std * z
        })
    }

    /// A per-channel vector of normal values.
    pub fn channel(c: usize, mean: f64, seed: u64) -> Array1<f64> {
        normal(&[c], mean, 1.0, seed).into_iter().collect()
    }

    /// `run` on a pool of 1, then 2, then 3 threads: the results in that order.
    pub fn on_1_2_3_threads<R: Send>(run: impl Fn() -> R + Send + Sync) -> Vec<R> {
        [1, 2, 3]
            .into_iter()
            .map(|threads| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
                pool.unwrap_or_else(|e| panic!("a pool of {threads} threads: {e}"))
                    .install(&run)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
