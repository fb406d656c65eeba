//! The BatchNorm layer: parameters, running statistics, explicit training and evaluation modes,
//! and PyTorch-compatible state.

use ndarray::Array1;
use tape::{Element, Var};

use super::kernel::{self, Dims};
use super::node::BatchNormNode;
use super::{check_batch, check_channels, dims_of, row_major, to_f64};
use crate::error::{Error, Result, check_non_negative};
use crate::module::{Mode, Module, StateDict, check_state_dict};
use crate::param::Parameter;

/// Batch Normalization over the channel axis (axis 1) of `(N, C)` or `(N, C, *spatial)` input:
/// one layer for what PyTorch splits into `BatchNorm1d/2d/3d`, with their names and semantics.
///
/// # Training vs evaluation
/// In [`Mode::Train`] the layer normalizes with the batch's mean and biased variance and updates
/// `running_mean` and `running_var` (with the unbiased variance):
/// `running = (1 - momentum) · running + momentum · batch`, or the cumulative average when
/// `momentum` is `None`. In [`Mode::Eval`] it normalizes with the running statistics, and its
/// backward is exact for that (the statistics are constants). Without `track_running_stats`,
/// both modes use batch statistics. The running statistics never go on the tape.
///
/// # Shapes
/// `x`: `(N, C, *)` with `C = num_features`, rank 2 to 5. The output has the shape of `x`.
///
/// # Example
/// ```
/// use ndarray::array;
/// use layers::{BatchNorm, Mode};
/// use tape::Tape;
///
/// let mut bn = BatchNorm::<f64>::new(2);
/// let tape = Tape::new();
/// let x = tape.constant(array![[1.0, 2.0], [3.0, 6.0]]);
/// let y = bn.forward(x, Mode::Train)?;
/// let grads = y.backward_with(array![[0.5, -1.0], [0.25, 2.0]])?;
/// assert!(bn.weight.grad(&grads).is_some());
/// assert_eq!(bn.running_mean, array![0.2, 0.4]); // 0.9 · 0 + 0.1 · batch mean
/// assert_eq!(bn.num_batches_tracked, 1);
/// # Ok::<(), layers::Error>(())
/// ```
///
/// # Gradient checking
/// The checker's closure may borrow the layer mutably and pass its errors on with `?`:
/// ```
/// use layers::{BatchNorm, Mode};
///
/// let mut bn = BatchNorm::<f64>::new(3);
/// let x = ndarray::Array::from_shape_fn((4, 3), |(i, j)| (i * 3 + j) as f64 * 0.7 % 1.9).into_dyn();
/// tape::check_gradients(|_, v| Ok(bn.forward(v[0], Mode::Train)?), &[x])?;
/// # Ok::<(), tape::GradCheckError>(())
/// ```
#[derive(Debug, Clone)]
pub struct BatchNorm<T: Element> {
    num_features: usize,
    eps: f64,
    momentum: Option<f64>,
    affine: bool,
    track_running_stats: bool,
    /// `gamma`, the per-channel scale (starts at 1; trained only when `affine`).
    pub weight: Parameter<T>,
    /// `beta`, the per-channel shift (starts at 0; trained only when `affine`).
    pub bias: Parameter<T>,
    /// Running mean (starts at 0).
    pub running_mean: Array1<T>,
    /// Running unbiased variance (starts at 1).
    pub running_var: Array1<T>,
    /// Training batches seen while tracking running statistics.
    pub num_batches_tracked: u64,
}

impl<T: Element> BatchNorm<T> {
    /// PyTorch's defaults: `eps = 1e-5`, `momentum = Some(0.1)`, `affine`, tracking running stats.
    pub fn new(num_features: usize) -> Self {
        BatchNorm {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
            weight: Parameter::new(Array1::ones(num_features)),
            bias: Parameter::new(Array1::zeros(num_features)),
            running_mean: Array1::zeros(num_features),
            running_var: Array1::ones(num_features),
            num_batches_tracked: 0,
        }
    }

    /// All settings, checked.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for a negative, NaN or infinite `eps`, or a `momentum` outside
    /// `[0, 1]`.
    pub fn with_options(
        num_features: usize,
        eps: f64,
        momentum: Option<f64>,
        affine: bool,
        track_running_stats: bool,
    ) -> Result<Self> {
        check_non_negative("eps", eps)?;
        if let Some(m) = momentum.filter(|m| !(0.0..=1.0).contains(m)) {
            return Err(Error::InvalidSetting {
                name: "momentum",
                expected: "in [0, 1], or None for a cumulative average",
                got: m,
            });
        }
        Ok(BatchNorm {
            eps,
            momentum,
            affine,
            track_running_stats,
            ..BatchNorm::new(num_features)
        })
    }

    /// Number of channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }
    /// The `eps` added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }
    /// The momentum of the running statistics (`None`: cumulative average).
    pub fn momentum(&self) -> Option<f64> {
        self.momentum
    }
    /// Whether `weight` and `bias` are trained.
    pub fn affine(&self) -> bool {
        self.affine
    }
    /// Whether running statistics are kept and used in evaluation.
    pub fn track_running_stats(&self) -> bool {
        self.track_running_stats
    }

    /// The trainable parameters (`weight`, `bias` when `affine`, else none).
    pub fn parameters(&self) -> Vec<&Parameter<T>> {
        if self.affine {
            vec![&self.weight, &self.bias]
        } else {
            Vec::new()
        }
    }

    /// The trainable parameters, mutably, for an optimizer.
    pub fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        if self.affine {
            vec![&mut self.weight, &mut self.bias]
        } else {
            Vec::new()
        }
    }

    /// Normalizes `x` on its tape as one fused node (see [`BatchNormNode`]); in
    /// [`Mode::Train`] also updates the running statistics.
    ///
    /// # Errors
    /// [`Error::Shape`] for a rank other than 2 to 5 or when axis 1 of `x` is not
    /// `num_features`, [`Error::SingleValuePerChannel`] for one value per channel in training,
    /// [`Error::Length`] when the running statistics or parameters were replaced by
    /// arrays of the wrong size.
    pub fn forward<'t>(&mut self, x: Var<'t, T>, mode: Mode) -> Result<Var<'t, T>> {
        let tape = x.tape();
        let value = x.value();
        let dims = dims_of(value.shape())?;
        if dims.c != self.num_features {
            let mut expected = value.shape().to_vec();
            expected[1] = self.num_features;
            return Err(Error::Shape {
                name: "x",
                got: value.shape().to_vec(),
                expected: format!(
                    "{expected:?} (axis 1 holds the {} channels of the layer)",
                    self.num_features
                ),
            });
        }
        check_channels("weight", self.weight.value.shape(), dims.c)?;
        check_channels("bias", self.bias.value.shape(), dims.c)?;
        if self.track_running_stats {
            check_channels("running_mean", self.running_mean.shape(), dims.c)?;
            check_channels("running_var", self.running_var.shape(), dims.c)?;
        }
        // Batch statistics in training, and in evaluation when none are tracked (as PyTorch).
        let (node, batch_stats) = if mode == Mode::Train || !self.track_running_stats {
            check_batch(value.shape(), dims)?;
            let (gamma, beta) = if self.affine {
                (to_f64(&self.weight.value), to_f64(&self.bias.value))
            } else {
                (vec![1.0; dims.c], vec![0.0; dims.c])
            };
            let (node, stats) = BatchNormNode::training(&row_major(&value), dims, &gamma, &beta, self.eps);
            (node, Some(stats))
        } else {
            let node = BatchNormNode::from_running(&self.running_mean, &self.running_var, self.eps);
            (node, None)
        };

        // Every check has passed: only now do the parameters go on the tape and the running
        // statistics change, so a failed call leaves both as they were.
        let (gamma, beta) = if self.affine {
            (self.weight.bind(tape), self.bias.bind(tape))
        } else {
            (
                tape.constant(Array1::ones(dims.c)),
                tape.constant(Array1::zeros(dims.c)),
            )
        };
        let y = tape.apply(node, &[x, gamma, beta])?;
        if let Some(stats) = batch_stats.filter(|_| mode == Mode::Train && self.track_running_stats) {
            self.update_running_stats(&stats, dims);
        }
        Ok(y)
    }

    /// PyTorch's update (sizes checked by `forward`).
    fn update_running_stats(&mut self, stats: &kernel::Stats, dims: Dims) {
        // Saturating: at 2⁶⁴ - 1 batches a wrap to 0 would divide by 0 for `momentum = None`.
        self.num_batches_tracked = self.num_batches_tracked.saturating_add(1);
        let momentum = self.momentum.unwrap_or(1.0 / self.num_batches_tracked as f64);
        let m = dims.per_channel() as f64;
        let unbiased = m / (m - 1.0);
        let blend = |running: T, batch: f64| {
            T::from_f64_lossy((1.0 - momentum) * running.as_f64() + momentum * batch)
        };
        for (c, (rm, rv)) in self
            .running_mean
            .iter_mut()
            .zip(self.running_var.iter_mut())
            .enumerate()
        {
            *rm = blend(*rm, stats.mean[c]);
            *rv = blend(*rv, stats.var[c] * unbiased);
        }
    }

    /// The batch count in a state dict, checked: a whole number that fits the `u64` count.
    fn count_in(dict: &StateDict<T>) -> Result<Option<u64>> {
        let Some(count) = dict.get("num_batches_tracked") else {
            return Ok(None);
        };
        let value = count.iter().next().map_or(0.0, |c| c.as_f64());
        // 2⁶⁴ and more do not fit the u64 count (`as` would saturate them silently).
        if !(value >= 0.0 && value.fract() == 0.0 && value < 18_446_744_073_709_551_616.0) {
            return Err(Error::InvalidSetting {
                name: "num_batches_tracked",
                expected: "a whole number in [0, 2^64)",
                got: value,
            });
        }
        Ok(Some(value as u64))
    }
}

impl<T: Element> Module<T> for BatchNorm<T> {
    fn forward<'t>(&mut self, x: Var<'t, T>, mode: Mode) -> Result<Var<'t, T>> {
        BatchNorm::forward(self, x, mode)
    }
    fn parameters(&self) -> Vec<&Parameter<T>> {
        BatchNorm::parameters(self)
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        BatchNorm::parameters_mut(self)
    }
    fn describe(&self) -> String {
        format!("BatchNorm({})", self.num_features())
    }

    /// The state under PyTorch's keys: `weight` and `bias` when `affine`; `running_mean`,
    /// `running_var` and `num_batches_tracked` (a rank-0 array, exact up to 2²⁴ in `f32`) when
    /// tracking running statistics.
    fn state_dict(&self) -> StateDict<T> {
        let mut state = StateDict::new();
        if self.affine {
            state.insert("weight".into(), self.weight.value.clone());
            state.insert("bias".into(), self.bias.value.clone());
        }
        if self.track_running_stats {
            state.insert("running_mean".into(), self.running_mean.clone().into_dyn());
            state.insert("running_var".into(), self.running_var.clone().into_dyn());
            let count = T::from_f64_lossy(self.num_batches_tracked as f64);
            state.insert("num_batches_tracked".into(), ndarray::arr0(count).into_dyn());
        }
        state
    }

    fn load_state_dict(&mut self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        self.check_state_dict(dict, strict)?;
        let vector = |key: &str| dict[key].iter().copied().collect::<Array1<T>>();
        if self.affine {
            self.weight.value = dict["weight"].clone();
            self.bias.value = dict["bias"].clone();
        }
        if self.track_running_stats {
            self.running_mean = vector("running_mean");
            self.running_var = vector("running_var");
            self.num_batches_tracked = Self::count_in(dict)?.unwrap_or(0);
        }
        Ok(())
    }

    fn check_state_dict(&self, dict: &StateDict<T>, strict: bool) -> Result<()> {
        check_state_dict(&self.state_dict(), dict, strict)?;
        if self.track_running_stats {
            Self::count_in(dict)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
