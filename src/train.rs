//! Training a net on the digits, with or without BatchNorm or LayerNorm: the engine of
//! `cargo run --release --example train`.
//!
//! The nets are in [`crate::models`]: an MLP and a CNN. The variants with and without
//! normalization start from the same seed, see the same mini-batches and take the same steps,
//! with the same learning-rate schedule and gradient clipping.

use std::time::Instant;

use layers::data::{Batch, DataLoader};
use layers::lr_schedule::{CosineAnnealingLr, LinearWarmup, LrSchedule};
use layers::optim::clip_grad_norm;
use layers::{Mode, Module, Optimizer, Sequential, Sgd, StateDict, accuracy, softmax_cross_entropy};
use ndarray::Ix2;
use tape::{GradOptions, Tape};

use crate::models::{Model, Norm};
use layers::datasets::digits::Dataset;

/// Why a run could not be made or finished.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A setting of the run is out of its range.
    #[error("{name} must be {expected}, got {got}")]
    Setting {
        /// The setting (`steps`, `batch_size`, ...).
        name: &'static str,
        /// Its valid range, in words.
        expected: String,
        /// The value given.
        got: String,
    },
    /// An error of the layers (a shape, or the optimizer's settings).
    #[error(transparent)]
    Layer(#[from] layers::Error),
}

impl From<tape::TapeError> for TrainError {
    fn from(error: tape::TapeError) -> Self {
        TrainError::Layer(error.into())
    }
}

impl RunConfig {
    /// Checks the run against its training data: at least one step, one image per batch and one
    /// step between evaluations, a batch no larger than the data, a finite learning rate >= 0.
    ///
    /// # Errors
    /// [`TrainError::Setting`] naming the setting and its value.
    pub fn check(&self, train_images: usize) -> Result<(), TrainError> {
        let at_least_one = |name, value: usize| {
            if value >= 1 {
                Ok(())
            } else {
                Err(TrainError::Setting {
                    name,
                    expected: "at least 1".into(),
                    got: value.to_string(),
                })
            }
        };
        at_least_one("steps", self.steps)?;
        at_least_one("batch_size", self.batch_size)?;
        at_least_one("eval_every", self.eval_every)?;
        if self.batch_size > train_images {
            return Err(TrainError::Setting {
                name: "batch_size",
                expected: format!("at most the {train_images} training images"),
                got: self.batch_size.to_string(),
            });
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return Err(TrainError::Setting {
                name: "learning_rate",
                expected: "a finite number >= 0".into(),
                got: self.learning_rate.to_string(),
            });
        }
        if let Some(max_norm) = self.clip_norm.filter(|m| !(m.is_finite() && *m > 0.0)) {
            return Err(TrainError::Setting {
                name: "clip_norm",
                expected: "a finite number > 0".into(),
                got: max_norm.to_string(),
            });
        }
        if let Some(lambda) = self.input_grad_penalty.filter(|l| !(l.is_finite() && *l > 0.0)) {
            return Err(TrainError::Setting {
                name: "input_grad_penalty",
                expected: "a finite number > 0".into(),
                got: lambda.to_string(),
            });
        }
        Ok(())
    }

    /// The learning rate of each step (from 0), by [`RunConfig::schedule`].
    ///
    /// # Errors
    /// A schedule's own check of its settings (the learning rate, checked by [`check`](Self::check)).
    pub fn learning_rates(&self) -> layers::Result<Box<dyn LrSchedule>> {
        let lr = self.learning_rate;
        Ok(match self.schedule {
            Schedule::Constant => Box::new(LinearWarmup::new(lr, 1.0, 1)?),
            Schedule::WarmupCosine { warmup: 0 } => {
                Box::new(CosineAnnealingLr::new(lr, self.steps.max(1), 0.0)?)
            }
            Schedule::WarmupCosine { warmup } => {
                let warmup = warmup.min(self.steps.max(1));
                let rest = (self.steps - warmup).max(1);
                Box::new(
                    LinearWarmup::new(lr, 0.1, warmup)?.then(warmup, CosineAnnealingLr::new(lr, rest, 0.0)?),
                )
            }
        })
    }
}

/// How the learning rate moves over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// The same rate at every step.
    Constant,
    /// A linear warm-up from a tenth of the rate over `warmup` steps (none for 0), then cosine
    /// annealing to 0 at the last step.
    WarmupCosine {
        /// Steps of the warm-up.
        warmup: usize,
    },
}

impl Schedule {
    /// `"constant"` or `"warmup-cosine"`.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::WarmupCosine { .. } => "warmup-cosine",
        }
    }
}

/// One training run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// Its name in tables and plots.
    pub name: String,
    /// The net.
    pub model: Model,
    /// The normalization after each hidden linear or convolution layer.
    pub norm: Norm,
    /// SGD learning rate (momentum 0.9): the peak of the schedule.
    pub learning_rate: f64,
    /// How the learning rate moves over the run.
    pub schedule: Schedule,
    /// Gradients are clipped to this global L2 norm before each step (PyTorch's
    /// `clip_grad_norm_`), if given.
    pub clip_norm: Option<f64>,
    /// Optimisation steps (mini-batches).
    pub steps: usize,
    /// Images per mini-batch.
    pub batch_size: usize,
    /// Seed of the initial weights and of the batch order.
    pub seed: u64,
    /// Test accuracy is measured every this many steps (and after the last).
    pub eval_every: usize,
    /// `λ` of a gradient penalty: `λ ‖∂L/∂x‖²`, the squared norm of the batch loss's gradient
    /// with respect to the input images, added to the loss, if given. The gradient is recorded
    /// on the tape ([`Tape::grad`] with `create_graph`), so the penalty is differentiated through
    /// it: through each fused node's double backward.
    pub input_grad_penalty: Option<f64>,
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// The configuration.
    pub config: RunConfig,
    /// `(step, test accuracy)` at each evaluation, starting at step 0.
    pub curve: Vec<(usize, f64)>,
    /// `(step, training loss)` at each evaluation: the cross-entropy of the batch, without the
    /// gradient penalty.
    pub losses: Vec<(usize, f64)>,
    /// First evaluated step with test accuracy of at least 90%.
    pub steps_to_90: Option<usize>,
    /// The step at which the training loss stopped being a number (the net diverged), where the
    /// run stopped.
    pub diverged_at: Option<usize>,
    /// Wall time of the run in seconds.
    pub seconds: f64,
    /// The trained net's mean over test images of `‖∂ℓ/∂x‖`, the norm of each image's loss
    /// gradient with respect to its pixels (in evaluation mode): how much the prediction moves
    /// with the input, which a gradient penalty lowers.
    pub input_grad_norm: f64,
    /// The trained net's state (its `state_dict`), as training left it.
    pub state: StateDict<f32>,
}

impl RunResult {
    /// Test accuracy after the last step.
    pub fn final_test_accuracy(&self) -> f64 {
        self.curve.last().map_or(0.0, |&(_, accuracy)| accuracy)
    }

    /// The trained net's file name: `<model>[-bn|-ln]-lr<rate>[-gp<λ>].safetensors`.
    pub fn file_name(&self) -> String {
        let c = &self.config;
        let penalty = c.input_grad_penalty.map_or(String::new(), |l| format!("-gp{l}"));
        format!(
            "{}-lr{}{penalty}.safetensors",
            c.model.arch(c.norm),
            c.learning_rate
        )
    }

    /// Saves the trained net as a safetensors file, its metadata naming the architecture and
    /// the seed of the data split (`{"arch": "cnn-bn", "seed": "0"}`).
    ///
    /// # Errors
    /// As [`layers::files::save_safetensors`].
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> layers::Result<()> {
        let c = &self.config;
        let metadata = [("arch", c.model.arch(c.norm)), ("seed", c.seed.to_string())];
        let metadata = metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        layers::files::save_safetensors(&self.state, &metadata, path)
    }
}

fn as_f32(data: &Dataset) -> ndarray::Array2<f32> {
    data.features().mapv(|v| v as f32)
}

/// Test accuracy of `net`, a `model`, in evaluation mode (BatchNorm uses its running
/// statistics).
///
/// # Errors
/// A layer error (only on inconsistent shapes).
pub fn evaluate(model: Model, net: &mut Sequential<f32>, test: &Dataset) -> layers::Result<f64> {
    let tape = Tape::no_grad(); // evaluation: nothing kept for backward
    let logits = net.forward(tape.constant(model.input(as_f32(test))), Mode::Eval)?;
    accuracy(&logits.value(), test.labels())
}

/// The mean over `test`'s images of `‖∂ℓ/∂x‖`, each image's loss gradient with respect to its
/// pixels, in evaluation mode (so the images do not interact).
///
/// # Errors
/// A layer error (only on inconsistent shapes).
pub fn input_grad_norm(model: Model, net: &mut Sequential<f32>, test: &Dataset) -> layers::Result<f64> {
    let tape = Tape::new();
    let x = tape.var(model.input(as_f32(test)));
    let logits = net.forward(x, Mode::Eval)?;
    // The mean loss times N: each image's gradient is its own loss's.
    let rows = test.len() as f32;
    let grads = softmax_cross_entropy(logits, test.labels())?
        .mul_scalar(rows)
        .backward()?;
    let grad = grads.wrt(x)?;
    let per_image = grad.shape()[1..].iter().product::<usize>().max(1);
    let norms = grad
        .as_standard_layout()
        .as_slice()
        .unwrap_or_else(|| unreachable!("a standard-layout array is contiguous"))
        .chunks(per_image)
        .map(|g| g.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt())
        .collect::<Vec<f64>>();
    Ok(norms.iter().sum::<f64>() / norms.len().max(1) as f64)
}

/// Trains one net on `train`, measuring test accuracy on `test` as it goes. `on_step` is called
/// after every step with the step number and the latest test accuracy (for progress display).
/// A run whose training loss becomes NaN or infinite stops there, with
/// [`RunResult::diverged_at`] set.
///
/// # Errors
/// [`TrainError::Setting`] for a configuration [`RunConfig::check`] rejects, and a layer error
/// for data of the wrong shape (or an empty test set).
pub fn run(
    config: &RunConfig,
    train: &Dataset,
    test: &Dataset,
    mut on_step: impl FnMut(usize, f64),
) -> Result<RunResult, TrainError> {
    config.check(train.len())?;
    let start = Instant::now();
    let model = config.model;
    let mut net = model.build(config.norm, config.seed);
    let learning_rates = config.learning_rates()?;
    let mut optimizer = Sgd::new(learning_rates.lr(0), 0.9)?;
    // Batches of a new shuffled order each epoch, whole batches only.
    let mut loader = DataLoader::new(
        as_f32(train).into_dyn(),
        train.labels().to_vec(),
        config.batch_size,
    )?
    .shuffled(config.seed.wrapping_add(1))
    .drop_last(true);
    let mut batches = loader.cycle();

    let mut curve = vec![(0, evaluate(model, &mut net, test)?)];
    let mut losses = Vec::new();
    let mut diverged_at = None;
    for step in 1..=config.steps {
        // At least one batch an epoch: `check` keeps the batch within the data.
        let Some(Batch { x, labels }) = batches.next() else {
            break;
        };
        let tape = Tape::new();
        let rows = x.into_dimensionality::<Ix2>();
        let images = model.input(rows.unwrap_or_else(|_| unreachable!("the loader holds rows of 64 pixels")));
        // With a gradient penalty the images are variables: the loss's gradient reaches them.
        let x = match config.input_grad_penalty {
            Some(_) => tape.var(images),
            None => tape.constant(images),
        };
        let logits = net.forward(x, Mode::Train)?;
        // Diverged weights give NaN logits (which the loss rejects), or an infinite loss.
        let loss = match softmax_cross_entropy(logits, &labels) {
            Ok(loss) if loss.scalar().is_finite() => loss,
            Ok(_) | Err(layers::Error::Nan { .. }) => {
                diverged_at = Some(step);
                break;
            }
            Err(error) => return Err(error.into()),
        };
        let loss_value = f64::from(loss.scalar());
        let loss = match config.input_grad_penalty {
            Some(lambda) => {
                let recorded = GradOptions {
                    create_graph: true,
                    upstream: None,
                };
                let dx = tape.grad(loss, &[x], recorded)?[0];
                let dx = dx.unwrap_or_else(|| unreachable!("the loss depends on the images"));
                loss.try_add(dx.powi(2).sum().mul_scalar(lambda as f32))?
            }
            None => loss,
        };
        let mut grads = loss.backward()?;
        if let Some(max_norm) = config.clip_norm {
            clip_grad_norm(&net.parameters(), &mut grads, max_norm)?;
        }
        optimizer.set_lr(learning_rates.lr(step - 1))?;
        optimizer.step(net.parameters_mut(), &grads)?;

        if step % config.eval_every == 0 || step == config.steps {
            curve.push((step, evaluate(model, &mut net, test)?));
            losses.push((step, loss_value));
        }
        on_step(step, curve.last().map_or(0.0, |&(_, a)| a));
    }
    let steps_to_90 = curve
        .iter()
        .find(|&&(_, accuracy)| accuracy >= 0.9)
        .map(|&(step, _)| step);
    let seconds = start.elapsed().as_secs_f64();
    Ok(RunResult {
        config: config.clone(),
        curve,
        losses,
        steps_to_90,
        diverged_at,
        seconds,
        input_grad_norm: input_grad_norm(model, &mut net, test)?,
        state: net.state_dict(),
    })
}

/// `summary.json`: `{"runs": [{"name", "model", "norm", "batchnorm", "learning_rate",
/// "schedule", "clip_norm", "input_grad_penalty", "input_grad_norm", "steps",
/// "final_test_accuracy", "steps_to_90", "diverged_at", "seconds"}, ...]}`, `model` being `"mlp"` or `"cnn"`, `norm` `"none"`, `"batch"` or
/// `"layer"` (and `batchnorm` whether it is `"batch"`).
pub fn summary_json(results: &[RunResult]) -> serde_json::Value {
    let runs: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.config.name,
                "model": r.config.model.name(),
                "norm": r.config.norm.name(),
                "batchnorm": r.config.norm == Norm::Batch,
                "learning_rate": r.config.learning_rate,
                "schedule": r.config.schedule.name(),
                "clip_norm": r.config.clip_norm,
                "input_grad_penalty": r.config.input_grad_penalty,
                "input_grad_norm": r.input_grad_norm,
                "steps": r.config.steps,
                "final_test_accuracy": r.final_test_accuracy(),
                "steps_to_90": r.steps_to_90,
                "diverged_at": r.diverged_at,
                "seconds": r.seconds,
            })
        })
        .collect();
    serde_json::json!({ "runs": runs })
}

#[cfg(test)]
mod tests;
