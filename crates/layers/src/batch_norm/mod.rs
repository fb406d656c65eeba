//! Batch Normalization (Ioffe and Szegedy 2015, <https://arxiv.org/abs/1502.03167>).
//!
//! Three levels, each a thin layer over the one below:
//!
//! | level | what | where |
//! |---|---|---|
//! | functions on arrays | [`batchnorm_forward`], [`batchnorm_backward`]: the seed task's API | this module |
//! | tape nodes | [`batch_norm`] (one fused node) and [`batch_norm_composed`] (primitives) | [`node`] |
//! | the layer | [`BatchNorm`]: parameters, running statistics, train/eval mode, state dict | [`layer`] |
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
//! holds anyway), `μ` and `r`: nothing of the input's size is saved for it. The fused node keeps
//! `μ` rounded to the data's type, `μ_T` (for f32, 4 bytes a channel instead of 8), and the first
//! pass also sums `d = x - μ_T`, which gives back the digits the rounding lost:
//!
//! ```text
//! μ = μ_T + Σ d / M,    Σ g (x - μ) = Σ g d - (Σ d / M) Σ g
//! ```
//! `dx` sums to zero over each channel, since `Σ x̂ = 0`.
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
//! or infinity.
//!
//! # Conventions (PyTorch's, where references differ)
//! Normalization uses the biased batch variance; the running variance is updated with the
//! unbiased one (`σ² M / (M - 1)`). `running = (1 - momentum) · running + momentum · batch`
//! with `momentum = 0.1`, or the cumulative average `momentum = 1 / num_batches_tracked` when
//! it is `None`. Running statistics start at 0 (mean) and 1 (variance).

pub mod kernel;
pub mod layer;
pub mod node;

use std::borrow::Cow;

use ndarray::{Array, Array1, ArrayD, ArrayRef, AsArray, Dimension, Ix1};
use tape::Element;

use self::kernel::Dims;
pub use self::layer::{BatchNorm, Mode, StateDict};
pub use self::node::{BatchNormNode, batch_norm, batch_norm_composed};
use crate::error::{Error, Result, check_non_negative};

/// The `(N, C, S)` dimensions of `shape`, checking rank 2 to 5.
pub(crate) fn dims_of(shape: &[usize]) -> Result<Dims> {
    if (2..=5).contains(&shape.len()) {
        Ok(Dims::of(shape))
    } else {
        Err(Error::InputRank { got: shape.to_vec() })
    }
}

/// Checks that a per-channel argument has `channels` elements.
pub(crate) fn check_channels(name: &'static str, shape: &[usize], channels: usize) -> Result<()> {
    match shape {
        [count] if *count == channels => Ok(()),
        [count] => Err(Error::ChannelCount {
            name,
            got: *count,
            expected: channels,
            of: "channels of x",
        }),
        _ => Err(Error::Shape {
            name,
            got: shape.to_vec(),
            expected: vec![channels],
            of: "one value per channel of x",
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

/// The elements in row-major order, without a copy when they are already contiguous. (Takes the
/// array itself, not a view: making an `IxDyn` view copies its shape and strides.)
pub(crate) fn row_major<T: Element, D: Dimension>(values: &ArrayRef<T, D>) -> Cow<'_, [T]> {
    match values.as_slice() {
        Some(slice) => Cow::Borrowed(slice),
        None => Cow::Owned(values.iter().copied().collect()),
    }
}

/// The values as f64, in row-major order (through a slice when contiguous: iterating an
/// `IxDyn` array element by element costs nanoseconds per value).
pub(crate) fn to_f64<T: Element, D: Dimension>(values: &ArrayRef<T, D>) -> Vec<f64> {
    to_f64_joined([&row_major(values)])
}

/// Several per-channel vectors as f64, one after the other in one allocation (the fused node
/// converts two at each call: one allocation fewer than two `to_f64`).
pub(crate) fn to_f64_joined<T: Element, const K: usize>(parts: [&[T]; K]) -> Vec<f64> {
    let mut joined = Vec::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        joined.extend(part.iter().map(|v| v.as_f64()));
    }
    joined
}

pub(crate) fn from_f64<T: Element>(values: &[f64]) -> Array1<T> {
    values.iter().map(|&v| T::from_f64_lossy(v)).collect()
}

/// The output of a normalization with known per-channel `mean` and `inv_std`.
pub(crate) fn normalize<T: Element>(
    x: &[T],
    dims: Dims,
    gamma: &[f64],
    beta: &[f64],
    mean: &[f64],
    inv_std: &[f64],
) -> Vec<T> {
    let scale: Vec<f64> = gamma.iter().zip(inv_std).map(|(g, r)| g * r).collect();
    kernel::normalize(x, dims, mean, &scale, beta)
}

/// Training-mode forward: the batch statistics of `x`, their `inv_std`, and the output
/// normalized with them, as one job on the thread pool (see [`kernel::on_pool`]).
pub(crate) fn normalize_batch<T: Element>(
    x: &[T],
    dims: Dims,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (kernel::Stats, Vec<f64>, Vec<T>) {
    kernel::on_pool(dims, || {
        if kernel::by_channel::applies::<T>(dims) {
            return kernel::by_channel::normalize_batch(x, dims, gamma, beta, eps);
        }
        let stats = kernel::stats(x, dims);
        let inv_std = stats.inv_std(eps);
        let out = normalize(x, dims, gamma, beta, &stats.mean, &inv_std);
        (stats, inv_std, out)
    })
}

/// Gradients `(dx, [dbeta | dgamma])` of a normalization; `batch_stats` says whether `mean` and
/// `inv_std` were computed from `x` (training) or are constants (evaluation). `dx` is skipped
/// (`None`) when not `want_dx`.
///
/// In training `mean` need only be close to the batch mean (the fused node keeps it rounded to
/// `T`): the pass summing `dout` and `dout · (x - mean)` also sums `x - mean`, which recovers the
/// batch mean's lost digits (see [`kernel::centre`]).
#[allow(clippy::too_many_arguments)] // the kernel's inputs, named; a struct would only rename them
pub(crate) fn gradients<T: Element>(
    dout: &[T],
    x: &[T],
    dims: Dims,
    gamma: &[f64],
    mean: &[f64],
    inv_std: &[f64],
    batch_stats: bool,
    want_dx: bool,
) -> (Option<Vec<T>>, kernel::ParamGrads) {
    // The two passes as one job on the thread pool (see `kernel::on_pool`).
    kernel::on_pool(dims, || {
        if kernel::by_channel::applies::<T>(dims) {
            let args = (gamma, mean, inv_std);
            return kernel::by_channel::gradients(dout, x, dims, args, batch_stats, want_dx);
        }
        let (c, m) = (dims.c, dims.per_channel() as f64);
        let mut sums = kernel::grad_sums(dout, x, dims, mean);
        // In place: `[sum(dout) | sum(dout · (x - μ)) | μ]`, then `[dbeta | dgamma | μ]`.
        sums.centre_all(mean, m, kernel::recentres::<T>(batch_stats));
        let [sum_dout, dgamma, mean] = sums.parts_mut();
        for (s, r) in dgamma.iter_mut().zip(inv_std) {
            *s *= r; // sum(dout · (x - μ)) · r = sum(dout · x̂)
        }
        let dx = want_dx.then(|| {
            // The three per-channel coefficients of `dx`, in one allocation.
            let mut coefficients = vec![0.0; 3 * c];
            let [grad_scale, xmu_scale, offset] = kernel::parts_mut(&mut coefficients, c);
            // Slices cut to one width and the mode decided outside: the loops vectorise.
            let (gamma, inv_std) = (&gamma[..c], &inv_std[..c]);
            let (sum_dout, dgamma) = (&sum_dout[..c], &dgamma[..c]);
            let (a, b, d) = (&mut grad_scale[..c], &mut xmu_scale[..c], &mut offset[..c]);
            let mut fill = |batch_stats: bool| {
                for ch in 0..c {
                    let (g, r, s, dg) = (gamma[ch], inv_std[ch], sum_dout[ch], dgamma[ch]);
                    [a[ch], b[ch], d[ch]] = kernel::input_grad_coefficients(g, r, s, dg, m, batch_stats);
                }
            };
            if batch_stats {
                fill(true)
            } else {
                fill(false)
            }
            kernel::input_grad(dout, x, dims, mean, grad_scale, xmu_scale, offset)
        });
        (dx, kernel::ParamGrads::new(sums.into_vec(), c))
    })
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
/// [`Error::InputRank`] for another rank, [`Error::ChannelCount`] when `gamma` or `beta` do
/// not have `C` elements, [`Error::SingleValuePerChannel`] when `N × spatial == 1`,
/// [`Error::InvalidSetting`] for a negative or NaN `eps`.
///
/// # Example: the seed's Example 2
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
    let (stats, inv_std, out) = normalize_batch(&row_major(&x), dims, &gamma, &to_f64(&beta), eps);
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
/// # Example: the seed's Example 3, with a random upstream gradient
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
            expected: cache.x.shape().to_vec(),
            of: "the shape of x",
        });
    }
    let dims = Dims::of(cache.x.shape());
    let x = row_major(&cache.x);
    let (dx, params) = gradients(
        &row_major(&dout),
        &x,
        dims,
        &cache.gamma,
        &cache.mean,
        &cache.inv_std,
        true,
        true,
    );
    let dx = dx.unwrap_or_default();
    Ok((
        shaped(dx, dout.raw_dim()),
        from_f64(params.dgamma()),
        from_f64(params.dbeta()),
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
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, Axis, array, s};

    use super::testing::{channel, normal};
    use super::*;

    const SEED_X: [[f64; 2]; 3] = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]];

    #[test]
    fn seed_example_1_normalizes_each_column() {
        let x = Array2::from(SEED_X.to_vec());
        let (out, _) = batchnorm_forward(&x, &array![1.0, 1.0], &array![0.0, 0.0], 1e-5).unwrap();
        let expected = array![[-1.2247, -1.2247], [0.0, 0.0], [1.2247, 1.2247]];
        assert!(out.abs_diff_eq(&expected, 1e-4), "{out}");
        // Each column has mean 0 and (biased) standard deviation 1, up to eps.
        assert!(
            out.mean_axis(Axis(0))
                .unwrap()
                .abs_diff_eq(&array![0.0, 0.0], 1e-15)
        );
        assert!(out.std_axis(Axis(0), 0.0).abs_diff_eq(&array![1.0, 1.0], 1e-5));
    }

    #[test]
    fn seed_example_2_scales_and_shifts() {
        let x = Array2::from(SEED_X.to_vec());
        let (out, _) = batchnorm_forward(&x, &array![2.0, 0.5], &array![1.0, -1.0], 1e-5).unwrap();
        // The seed prints 4 decimals, truncated (-1.44948... as -1.4494): agree to 1e-4.
        let expected = array![[-1.4494, -1.6124], [1.0, -1.0], [3.4494, -0.3876]];
        assert!(out.abs_diff_eq(&expected, 1e-4), "{out}");
    }

    #[test]
    fn seed_example_3_backward() {
        let x = array![[1.0, 2.0], [3.0, 4.0]];
        let (out, cache) = batchnorm_forward(&x, &array![1.0, 1.0], &array![0.0, 0.0], 1e-5).unwrap();
        // The seed's upstream gradient is all ones: then dx is exactly the zero vector per column
        // (a constant upstream gradient cannot change a normalized output), which we assert too.
        let (dx, dgamma, dbeta) = batchnorm_backward(&Array2::ones(out.raw_dim()), &cache).unwrap();
        assert!(dbeta.abs_diff_eq(&array![2.0, 2.0], 1e-12));
        assert!(dgamma.abs_diff_eq(&array![0.0, 0.0], 1e-12));
        assert!(dx.abs_diff_eq(&Array2::zeros((2, 2)), 1e-12));
        // With two rows the normalized output is ±1 whatever x is, so dx is 0 for ANY upstream
        // gradient. With the three rows of Example 1 and a random one, dx is not zero, and its
        // columns still sum to 0.
        let x = Array2::from(SEED_X.to_vec());
        let (_, cache) = batchnorm_forward(&x, &array![1.0, 1.0], &array![0.0, 0.0], 1e-5).unwrap();
        let dout = normal(&[3, 2], 0.0, 1.0, 3)
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        let (dx, _, dbeta) = batchnorm_backward(&dout, &cache).unwrap();
        assert!(dx.iter().any(|v| v.abs() > 1e-3), "{dx}");
        assert!(dx.sum_axis(Axis(0)).abs_diff_eq(&array![0.0, 0.0], 1e-12));
        assert!(dbeta.abs_diff_eq(&dout.sum_axis(Axis(0)), 1e-12));
    }

    #[test]
    fn every_rank_from_2_to_5_normalizes_per_channel() {
        for shape in [&[6, 3][..], &[4, 3, 5], &[2, 3, 4, 5], &[2, 3, 2, 3, 2]] {
            let x = normal(shape, 3.0, 2.0, shape.len() as u64);
            let dout = normal(shape, 0.0, 1.0, 10);
            let (out, cache) =
                batchnorm_forward(&x, &array![1.0, 1.0, 1.0], &array![0.0, 0.0, 0.0], 0.0).unwrap();
            let (dx, _, _) = batchnorm_backward(&dout, &cache).unwrap();
            assert_eq!(out.shape(), shape);
            for c in 0..3 {
                let channel = out.index_axis(Axis(1), c);
                approx::assert_abs_diff_eq!(channel.mean().unwrap(), 0.0, epsilon = 1e-12);
                approx::assert_abs_diff_eq!(channel.var(0.0), 1.0, epsilon = 1e-12);
                approx::assert_abs_diff_eq!(dx.index_axis(Axis(1), c).sum(), 0.0, epsilon = 1e-12);
            }
        }
    }

    #[test]
    fn views_give_the_same_results_as_owned_arrays() {
        let base = normal(&[5, 8], 1.0, 2.0, 4)
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        let (gamma, beta) = (channel(5, 1.0, 5), channel(5, 0.0, 6));
        // A transposed (column-major) view of shape (8, 5), and its contiguous copy.
        let view = base.t();
        let owned = view.to_owned();
        let (out_view, cache_view) = batchnorm_forward(view, &gamma, &beta, 1e-5).unwrap();
        let (out_owned, cache_owned) = batchnorm_forward(&owned, &gamma, &beta, 1e-5).unwrap();
        assert_eq!(out_view, out_owned);
        let dout = normal(&[8, 5], 0.0, 1.0, 7)
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        let dout_t = dout.t().to_owned();
        let from_view = batchnorm_backward(dout_t.t(), &cache_view).unwrap();
        assert_eq!(from_view, batchnorm_backward(&dout, &cache_owned).unwrap());
        // A strided slice: every other row.
        let rows = base.slice(s![.., ..;2]).t().to_owned();
        let (strided, _) = batchnorm_forward(base.slice(s![.., ..;2]).t(), &gamma, &beta, 1e-5).unwrap();
        assert_eq!(strided, batchnorm_forward(&rows, &gamma, &beta, 1e-5).unwrap().0);
    }

    #[test]
    fn a_constant_channel_normalizes_to_exactly_beta() {
        for value in [0.0, -3.5, 1e7, 1e30] {
            let mut x = normal(&[64, 3], 0.0, 1.0, 8);
            x.index_axis_mut(Axis(1), 1).fill(value);
            let x32 = x.mapv(|v| v as f32);
            let beta = array![0.1f32, -0.75, 2.0];
            let (out, cache) = batchnorm_forward(&x32, &array![1.5f32, 3.0, 0.5], &beta, 1e-5).unwrap();
            assert!(
                out.index_axis(Axis(1), 1).iter().all(|&v| v == -0.75),
                "constant {value}"
            );
            let (dx, dgamma, dbeta) =
                batchnorm_backward(&normal(&[64, 3], 0.0, 1.0, 9).mapv(|v| v as f32), &cache).unwrap();
            assert!(dx.iter().chain(&dgamma).chain(&dbeta).all(|v| v.is_finite()));
            assert_eq!(dgamma[1], 0.0, "x̂ = 0 on a constant channel");
            // The same in f64.
            let (out, _) =
                batchnorm_forward(&x, &array![1.5, 3.0, 0.5], &array![0.1, -0.75, 2.0], 1e-5).unwrap();
            assert!(out.index_axis(Axis(1), 1).iter().all(|&v| v == -0.75));
        }
    }

    #[test]
    fn eps_zero_on_a_constant_channel_gives_beta_not_nan() {
        let x = array![[2.0f32, 1.0], [2.0, 3.0]];
        let (out, cache) = batchnorm_forward(&x, &array![1.0f32, 1.0], &array![0.5f32, 0.0], 0.0).unwrap();
        assert_eq!(out.column(0).to_vec(), vec![0.5, 0.5]);
        let (dx, _, _) = batchnorm_backward(&array![[1.0f32, -2.0], [0.5, 1.0]], &cache).unwrap();
        assert!(dx.iter().all(|v| v.is_finite()));
    }

    fn all_finite<T: Element, D: Dimension>(arrays: &[&Array<T, D>], vectors: &[&Array1<T>]) -> bool {
        arrays.iter().all(|a| a.iter().all(|v| v.is_finite()))
            && vectors.iter().all(|a| a.iter().all(|v| v.is_finite()))
    }

    #[test]
    fn finite_extreme_input_never_gives_nan_or_inf() {
        let mut rows = vec![
            [3.0e38f32, 1e-40, -3.0e38],
            [-3.0e38, -1e-40, 3.0e38],
            [1.0e38, 0.0, 0.0],
        ];
        rows.push([-1.0e38, 1e-45, 1.0]);
        let x = Array2::from(rows);
        let gamma = array![2.0f32, 1.0, 0.5];
        let (out, cache) = batchnorm_forward(&x, &gamma, &array![0.0f32, 1.0, -1.0], 1e-5).unwrap();
        let (dx, dgamma, dbeta) =
            batchnorm_backward(&x.mapv(|v| (v / 1e38).clamp(-3.0, 3.0)), &cache).unwrap();
        assert!(all_finite(&[&out, &dx], &[&dgamma, &dbeta]), "{out} {dx}");
        // f64 data near 1e300: the squared deviations overflow f64, the statistics do not.
        let x: Array2<f64> = array![[1e300, 1.0], [-1e300, 2.0], [5e299, 3.0], [-5e299, 4.0]];
        let (out, cache) = batchnorm_forward(&x, &array![1.0, 1.0], &array![0.0, 0.0], 1e-5).unwrap();
        let (dx, dgamma, dbeta) =
            batchnorm_backward(&array![[1.0, 0.5], [-2.0, 1.0], [0.3, 0.0], [0.1, -1.0]], &cache).unwrap();
        assert!(all_finite(&[&out, &dx], &[&dgamma, &dbeta]), "{out} {dx}");
        approx::assert_abs_diff_eq!(out.column(0).var(0.0), 1.0, epsilon = 1e-12);
    }

    #[test]
    fn errors_say_what_was_expected_and_what_was_got() {
        let x = Array2::<f64>::zeros((4, 4));
        let (g4, b4) = (Array1::<f64>::ones(4), Array1::<f64>::zeros(4));
        let message = |r: Result<_>| {
            r.map(|_: (Array2<f64>, BatchNormCache<f64>)| ())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            message(batchnorm_forward(&x, &Array1::ones(3), &b4, 1e-5)),
            "gamma has 3 elements, expected 4 (channels of x)"
        );
        assert_eq!(
            message(batchnorm_forward(&x, &g4, &Array1::zeros(5), 1e-5)),
            "beta has 5 elements, expected 4 (channels of x)"
        );
        assert_eq!(
            message(batchnorm_forward(&Array2::zeros((1, 4)), &g4, &b4, 1e-5)),
            "expected more than 1 value per channel when training, got input of shape [1, 4] (1 value per channel)"
        );
        assert_eq!(
            message(batchnorm_forward(&x, &g4, &b4, -1.0)),
            "eps must be a finite number >= 0, got -1"
        );
        assert_eq!(
            message(batchnorm_forward(&x, &g4, &b4, f64::NAN)),
            "eps must be a finite number >= 0, got NaN"
        );
        let rank1 = batchnorm_forward(&Array1::<f64>::zeros(4), &g4, &b4, 1e-5).unwrap_err();
        assert_eq!(
            rank1.to_string(),
            "x has shape [4], expected rank 2 to 5: (N, C) or (N, C, *spatial)"
        );
        let rank6 = ndarray::ArrayD::<f64>::zeros(vec![2, 4, 1, 1, 1, 1]);
        assert!(matches!(
            batchnorm_forward(&rank6, &g4, &b4, 1e-5),
            Err(Error::InputRank { .. })
        ));

        let (_, cache) = batchnorm_forward(&normal(&[4, 4], 0.0, 1.0, 1), &g4, &b4, 1e-5).unwrap();
        assert_eq!(
            batchnorm_backward(&Array2::<f64>::zeros((3, 4)), &cache)
                .unwrap_err()
                .to_string(),
            "dout has shape [3, 4], expected [4, 4] (the shape of x)"
        );
    }

    #[test]
    fn zero_channels_give_empty_outputs_and_gradients() {
        // As in PyTorch: nothing to normalize is not an error. (It used to panic in the kernel,
        // which cannot walk rows of width 0.)
        let x = Array2::<f32>::zeros((4, 0));
        let none = Array1::<f32>::zeros(0);
        let (out, cache) = batchnorm_forward(&x, &none, &none, 1e-5).unwrap();
        assert_eq!(out.shape(), &[4, 0]);
        let (dx, dgamma, dbeta) = batchnorm_backward(&x, &cache).unwrap();
        assert_eq!((dx.shape(), dgamma.len(), dbeta.len()), (&[4, 0][..], 0, 0));

        let tape = tape::Tape::<f32>::new();
        let x = tape.var(ndarray::ArrayD::<f32>::zeros(vec![2, 0, 3]));
        let (gamma, beta) = (tape.var(none.clone()), tape.var(none.clone()));
        let grads = crate::batch_norm(x, gamma, beta, 1e-5)
            .unwrap()
            .backward_with(ndarray::ArrayD::<f32>::zeros(vec![2, 0, 3]))
            .unwrap();
        assert_eq!(grads.wrt(x).unwrap().shape(), &[2, 0, 3]);
        let mut layer = BatchNorm::<f32>::new(0);
        for mode in [Mode::Train, Mode::Eval] {
            assert_eq!(layer.forward(x, mode).unwrap().shape(), vec![2, 0, 3]);
        }
    }

    #[test]
    fn the_cache_holds_one_input_sized_array() {
        let x = normal(&[16, 3, 4], 0.0, 1.0, 2);
        let (_, cache) = batchnorm_forward(&x, &Array1::ones(3), &Array1::zeros(3), 1e-5).unwrap();
        assert_eq!(cache.x(), &x);
        assert_eq!(
            (cache.mean().len(), cache.var().len(), cache.inv_std().len()),
            (3, 3, 3)
        );
        assert_eq!(cache.eps(), 1e-5);
        for c in 0..3 {
            let channel = x.index_axis(Axis(1), c);
            approx::assert_relative_eq!(cache.mean()[c], channel.mean().unwrap(), max_relative = 1e-14);
            approx::assert_relative_eq!(cache.var()[c], channel.var(0.0), max_relative = 1e-14);
            approx::assert_relative_eq!(
                cache.inv_std()[c],
                1.0 / (channel.var(0.0) + 1e-5).sqrt(),
                max_relative = 1e-14
            );
        }
    }
}
