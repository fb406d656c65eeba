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
use tape::Tape;

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
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// The configuration.
    pub config: RunConfig,
    /// `(step, test accuracy)` at each evaluation, starting at step 0.
    pub curve: Vec<(usize, f64)>,
    /// `(step, training loss)` at each evaluation.
    pub losses: Vec<(usize, f64)>,
    /// First evaluated step with test accuracy of at least 90%.
    pub steps_to_90: Option<usize>,
    /// The step at which the training loss stopped being a number (the net diverged), where the
    /// run stopped.
    pub diverged_at: Option<usize>,
    /// Wall time of the run in seconds.
    pub seconds: f64,
    /// The trained net's state (its `state_dict`), as training left it.
    pub state: StateDict<f32>,
}

impl RunResult {
    /// Test accuracy after the last step.
    pub fn final_test_accuracy(&self) -> f64 {
        self.curve.last().map_or(0.0, |&(_, accuracy)| accuracy)
    }

    /// The trained net's file name: `<model>[-bn|-ln]-lr<rate>.safetensors`.
    pub fn file_name(&self) -> String {
        let c = &self.config;
        format!("{}-lr{}.safetensors", c.model.arch(c.norm), c.learning_rate)
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
        let x = tape.constant(
            model.input(rows.unwrap_or_else(|_| unreachable!("the loader holds rows of 64 pixels"))),
        );
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
    Ok(RunResult {
        config: config.clone(),
        curve,
        losses,
        steps_to_90,
        diverged_at,
        seconds: start.elapsed().as_secs_f64(),
        state: net.state_dict(),
    })
}

/// `summary.json`: `{"runs": [{"name", "model", "norm", "batchnorm", "learning_rate",
/// "schedule", "clip_norm", "steps", "final_test_accuracy", "steps_to_90", "diverged_at",
/// "seconds"}, ...]}`, `model` being `"mlp"` or `"cnn"`, `norm` `"none"`, `"batch"` or
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
mod tests {
    use super::*;
    use layers::datasets::digits;

    fn data() -> (Dataset, Dataset) {
        let data = digits::load_bundled().unwrap();
        let (train, test) = digits::split(&data, 0.2, 0).unwrap();
        let scaler = digits::Standardizer::fit(&train);
        (scaler.apply(&train), scaler.apply(&test))
    }

    fn config(batchnorm: bool) -> RunConfig {
        RunConfig {
            name: "test".into(),
            model: Model::Mlp,
            norm: if batchnorm { Norm::Batch } else { Norm::None },
            learning_rate: 0.05,
            schedule: Schedule::Constant,
            clip_norm: None,
            steps: 60,
            batch_size: 32,
            seed: 3,
            eval_every: 20,
        }
    }

    #[test]
    fn schedules_warm_up_then_anneal_to_zero() {
        let config = RunConfig {
            steps: 1000,
            learning_rate: 1.0,
            schedule: Schedule::WarmupCosine { warmup: 100 },
            ..config(true)
        };
        let rates = config.learning_rates().unwrap();
        assert!((rates.lr(0) - 0.1).abs() < 1e-12);
        assert!((rates.lr(50) - 0.55).abs() < 1e-12);
        assert_eq!(rates.lr(100), 1.0);
        assert!((rates.lr(550) - 0.5).abs() < 1e-12, "half way through the cosine");
        assert!(rates.lr(999) < 1e-4 && rates.lr(999) > 0.0);
        let no_warmup = RunConfig {
            schedule: Schedule::WarmupCosine { warmup: 0 },
            ..config.clone()
        };
        assert_eq!(no_warmup.learning_rates().unwrap().lr(0), 1.0);
        let constant = RunConfig {
            schedule: Schedule::Constant,
            ..config
        };
        let rates = constant.learning_rates().unwrap();
        assert!((0..1000).all(|t| rates.lr(t) == 1.0));
    }

    #[test]
    fn clipping_bounds_the_step_and_layernorm_learns() {
        // At lr 1 the plain MLP's first steps overshoot; clipped to norm 1 they stay bounded.
        let (train, test) = data();
        let clipped = RunConfig {
            norm: Norm::Layer,
            clip_norm: Some(1.0),
            ..config(false)
        };
        let result = run(&clipped, &train, &test, |_, _| {}).unwrap();
        assert!(
            result.final_test_accuracy() > result.curve[0].1 + 0.3,
            "{:?}",
            result.curve
        );
        assert!(result.state.contains_key("1.weight") && result.file_name().starts_with("mlp-ln-"));
        let bad = RunConfig {
            clip_norm: Some(0.0),
            ..clipped
        };
        assert_eq!(
            run(&bad, &train, &test, |_, _| {}).unwrap_err().to_string(),
            "clip_norm must be a finite number > 0, got 0"
        );
    }

    #[test]
    fn bad_settings_are_errors_before_any_step() {
        // eval_every = 0 divided by zero, a batch larger than the data sliced past its end.
        let (train, test) = data();
        let cases = [
            (
                RunConfig {
                    eval_every: 0,
                    ..config(true)
                },
                "eval_every must be at least 1, got 0",
            ),
            (
                RunConfig {
                    steps: 0,
                    ..config(true)
                },
                "steps must be at least 1, got 0",
            ),
            (
                RunConfig {
                    batch_size: 0,
                    ..config(true)
                },
                "batch_size must be at least 1, got 0",
            ),
            (
                RunConfig {
                    batch_size: 5000,
                    ..config(true)
                },
                "batch_size must be at most the 1438 training images, got 5000",
            ),
            (
                RunConfig {
                    learning_rate: f64::NAN,
                    ..config(true)
                },
                "learning_rate must be a finite number >= 0, got NaN",
            ),
        ];
        for (bad, message) in cases {
            let mut steps = 0;
            let error = run(&bad, &train, &test, |_, _| steps += 1).unwrap_err();
            assert_eq!((error.to_string(), steps), (message.to_string(), 0));
        }
    }

    #[test]
    fn a_net_that_diverges_stops_and_says_where() {
        // At lr 1e38 the f32 weights overflow and the loss turns NaN; the accuracy of NaN logits
        // used to print as the share of label 0.
        let (train, test) = data();
        let wild = RunConfig {
            name: "wild".into(),
            learning_rate: 1e38,
            ..config(false)
        };
        let mut steps = 0;
        let result = run(&wild, &train, &test, |_, _| steps += 1).unwrap();
        let at = result.diverged_at.expect("the run diverges");
        assert!(at <= 60 && steps == at - 1, "{at}, {steps}");
        assert!(result.curve.iter().all(|&(step, _)| step < at));
    }

    #[test]
    fn a_run_is_deterministic_and_learns() {
        let (train, test) = data();
        assert_eq!((train.len(), test.len()), (1438, 359));
        for (model, batchnorm) in [
            (Model::Mlp, false),
            (Model::Mlp, true),
            (Model::Cnn, false),
            (Model::Cnn, true),
        ] {
            let config = RunConfig {
                model,
                ..config(batchnorm)
            };
            let first = run(&config, &train, &test, |_, _| {}).unwrap();
            let second = run(&config, &train, &test, |_, _| {}).unwrap();
            assert_eq!(first.curve, second.curve, "same seed, same numbers");
            assert_eq!(first.losses, second.losses);
            assert_eq!(first.curve.len(), 4);
            assert_eq!(first.diverged_at, None);
            // In 60 steps the BatchNorm nets and the CNN learn; a deep sigmoid net without
            // BatchNorm barely moves.
            if batchnorm || model == Model::Cnn {
                assert!(
                    first.final_test_accuracy() > first.curve[0].1 + 0.3,
                    "{:?}",
                    first.curve
                );
            }
        }
        let summary = summary_json(&[run(&config(true), &train, &test, |_, _| {}).unwrap()]);
        let keys: Vec<&String> = summary["runs"][0].as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 12);
        assert_eq!(summary["runs"][0]["norm"], "batch");
        assert_eq!(summary["runs"][0]["schedule"], "constant");
        assert_eq!(summary["runs"][0]["model"], "mlp");
        assert!(summary["runs"][0]["steps_to_90"].is_null() || summary["runs"][0]["steps_to_90"].is_u64());
    }
}
