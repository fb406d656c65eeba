//! Optimizers: SGD with momentum and weight decay, Adam, and AdamW, with PyTorch's update rules;
//! and gradient clipping ([`clip_grad_norm`], [`clip_grad_value`]).
//!
//! Settings are checked when an optimizer is made (or changed with `set_lr`), and every `step`
//! checks its parameters against the optimizer's state before changing anything: a failed step
//! leaves the parameters and the state as they were.

mod clip;

use ndarray::{ArrayD, Zip};
use tape::{Element, Gradients};

use crate::error::{Error, Result};
use crate::module::StateDict;
use crate::param::Parameter;

pub use self::clip::{clip_grad_norm, clip_grad_value};

/// Updates parameters from their gradients.
pub trait Optimizer<T: Element> {
    /// One update of `params` (in the same order every call) from the gradients of the backward
    /// pass they were last bound to. Parameters without a gradient (unused by the loss) are left
    /// as they are.
    ///
    /// # Errors
    /// [`Error::ParameterCount`] or [`Error::ParameterShape`] when the parameters changed in
    /// number, shape or order since the first step; [`Error::ForeignGradients`] when none of
    /// them was used on the tape `grads` come from. Nothing changes on error.
    fn step(&mut self, params: Vec<&mut Parameter<T>>, grads: &Gradients<T>) -> Result<()>;

    /// The per-parameter state under the names of PyTorch's `optimizer.state_dict()["state"]`,
    /// flattened: `state.{i}.momentum_buffer` for [`Sgd`]; `state.{i}.exp_avg`,
    /// `state.{i}.exp_avg_sq` and `state.{i}.step` for [`Adam`] and [`AdamW`], `i` the
    /// parameter's position. Empty before the first step. The settings (learning rate, ...) are
    /// not in it: they are the optimizer's constructor's arguments.
    fn state_dict(&self) -> StateDict<T>;

    /// Loads a state [`state_dict`](Optimizer::state_dict) gave, so that training resumes where
    /// it stopped. Nothing changes on error.
    ///
    /// # Errors
    /// [`Error::MissingKey`] when a parameter's entry lacks a key the others have or the
    /// positions are not `0..n`, [`Error::UnexpectedKey`] for a key of another optimizer,
    /// [`Error::InvalidSetting`] for a step count that is not a whole number.
    fn load_state_dict(&mut self, dict: &StateDict<T>) -> Result<()>;
}

/// `state.{i}.{name}` for each of `names` and each buffer of `buffers[k]`.
fn buffers_state<T: Element>(names: &[&str], buffers: &[&Vec<ArrayD<T>>]) -> StateDict<T> {
    let mut dict = StateDict::new();
    for (name, buffer) in names.iter().zip(buffers) {
        for (i, value) in buffer.iter().enumerate() {
            dict.insert(format!("state.{i}.{name}"), value.clone());
        }
    }
    dict
}

/// The buffers `names` of every parameter position in `dict` (`state.{i}.{name}`), checked:
/// positions `0..n`, each with every name, and no other key.
fn buffers_from<T: Element>(dict: &StateDict<T>, names: &[&str]) -> Result<Vec<Vec<ArrayD<T>>>> {
    let expected = || {
        names
            .iter()
            .map(|n| format!("state.{{i}}.{n}"))
            .collect::<Vec<_>>()
    };
    let mut count = 0;
    for key in dict.keys() {
        let parsed = key
            .strip_prefix("state.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(i, name)| Some((i.parse::<usize>().ok()?, name)));
        match parsed {
            Some((i, name)) if names.contains(&name) => count = count.max(i + 1),
            _ => {
                return Err(Error::UnexpectedKey {
                    key: key.clone(),
                    expected: expected(),
                });
            }
        }
    }
    names
        .iter()
        .map(|name| {
            (0..count)
                .map(|i| {
                    let key = format!("state.{i}.{name}");
                    dict.get(&key).cloned().ok_or_else(|| Error::MissingKey {
                        key,
                        expected: expected(),
                    })
                })
                .collect()
        })
        .collect()
}

/// Checks a learning rate: finite and at least 0.
fn check_lr(lr: f64) -> Result<()> {
    check_setting("lr", lr, "a finite number >= 0", lr.is_finite() && lr >= 0.0)
}

fn check_weight_decay(weight_decay: f64) -> Result<()> {
    check_setting(
        "weight_decay",
        weight_decay,
        "a finite number >= 0",
        weight_decay.is_finite() && weight_decay >= 0.0,
    )
}

fn check_setting(name: &'static str, got: f64, expected: &'static str, valid: bool) -> Result<()> {
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidSetting { name, expected, got })
    }
}

/// Checks `params` against the per-parameter `states` (each as long as `params`, or empty
/// before the first step) and `grads`, without changing anything.
fn check_step<T: Element>(
    states: &[&Vec<ArrayD<T>>],
    params: &[&mut Parameter<T>],
    grads: &Gradients<T>,
) -> Result<()> {
    if !params.is_empty() && !params.iter().any(|p| p.is_bound_to(grads)) {
        return Err(Error::ForeignGradients {
            parameters: params.len(),
        });
    }
    for state in states.iter().filter(|state| !state.is_empty()) {
        if state.len() != params.len() {
            return Err(Error::ParameterCount {
                expected: state.len(),
                got: params.len(),
            });
        }
        for (index, (param, kept)) in params.iter().zip(state.iter()).enumerate() {
            if param.value.shape() != kept.shape() {
                return Err(Error::ParameterShape {
                    index,
                    expected: kept.shape().to_vec(),
                    got: param.value.shape().to_vec(),
                });
            }
        }
    }
    Ok(())
}

/// Per-parameter state of zeros, created on the first step.
fn init_state<T: Element>(state: &mut Vec<ArrayD<T>>, params: &[&mut Parameter<T>]) {
    if state.is_empty() {
        *state = params.iter().map(|p| ArrayD::zeros(p.value.raw_dim())).collect();
    }
}

/// Stochastic gradient descent with momentum and weight decay (PyTorch's form, with PyTorch's
/// coupled L2 decay `λ`): `g ← g + λ·θ`, `v ← μ·v + g`, `θ ← θ - lr·v` (plain SGD for
/// `μ = λ = 0`).
#[derive(Debug, Clone)]
pub struct Sgd<T: Element> {
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    velocity: Vec<ArrayD<T>>,
}

impl<T: Element> Sgd<T> {
    /// SGD with this learning rate and momentum.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `lr` and `momentum` are finite and at least 0.
    pub fn new(lr: f64, momentum: f64) -> Result<Self> {
        check_lr(lr)?;
        check_setting(
            "momentum",
            momentum,
            "a finite number >= 0",
            momentum.is_finite() && momentum >= 0.0,
        )?;
        Ok(Sgd {
            lr,
            momentum,
            weight_decay: 0.0,
            velocity: Vec::new(),
        })
    }

    /// This optimizer with L2 weight decay `λ` added to every gradient, as PyTorch's
    /// `SGD(weight_decay=λ)`.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `weight_decay` is finite and at least 0.
    pub fn with_weight_decay(self, weight_decay: f64) -> Result<Self> {
        check_weight_decay(weight_decay)?;
        Ok(Sgd { weight_decay, ..self })
    }

    /// The weight decay `λ`.
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Changes the learning rate for the next steps.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `lr` is finite and at least 0 (then nothing changes).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.lr = lr;
        Ok(())
    }

    /// The momentum `μ`.
    pub fn momentum(&self) -> f64 {
        self.momentum
    }
}

impl<T: Element> Optimizer<T> for Sgd<T> {
    fn step(&mut self, mut params: Vec<&mut Parameter<T>>, grads: &Gradients<T>) -> Result<()> {
        check_step(&[&self.velocity], &params, grads)?;
        init_state(&mut self.velocity, &params);
        let (lr, momentum) = (T::from_f64_lossy(self.lr), T::from_f64_lossy(self.momentum));
        let (decay, decaying) = (T::from_f64_lossy(self.weight_decay), self.weight_decay != 0.0);
        for (param, velocity) in params.iter_mut().zip(&mut self.velocity) {
            let Some(grad) = param.grad(grads) else { continue };
            let grad = grad.clone();
            Zip::from(&mut param.value)
                .and(&mut *velocity)
                .and(&grad)
                .for_each(|w, v, &g| {
                    // Without decay the gradient as it is (0 · an infinite weight would be NaN).
                    let g = if decaying { g + decay * *w } else { g };
                    *v = momentum * *v + g;
                    *w = *w - lr * *v;
                });
        }
        Ok(())
    }

    fn state_dict(&self) -> StateDict<T> {
        buffers_state(&["momentum_buffer"], &[&self.velocity])
    }

    fn load_state_dict(&mut self, dict: &StateDict<T>) -> Result<()> {
        let mut buffers = buffers_from(dict, &["momentum_buffer"])?;
        self.velocity = buffers.remove(0);
        Ok(())
    }
}

/// Adam (Kingma and Ba 2015) with bias correction, PyTorch's defaults
/// (`β₁ = 0.9`, `β₂ = 0.999`, `ε = 1e-8`):
/// `m ← β₁m + (1-β₁)g`, `v ← β₂v + (1-β₂)g²`, `θ ← θ - lr · m̂ / (√v̂ + ε)`.
#[derive(Debug, Clone)]
pub struct Adam<T: Element> {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    steps: i32,
    first: Vec<ArrayD<T>>,
    second: Vec<ArrayD<T>>,
}

impl<T: Element> Adam<T> {
    /// Adam with this learning rate and PyTorch's other defaults.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `lr` is finite and at least 0.
    pub fn new(lr: f64) -> Result<Self> {
        Self::with_options(lr, 0.9, 0.999, 1e-8)
    }

    /// Adam with every setting.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `lr` and `eps` are finite and at least 0 and both betas
    /// are in `[0, 1)` (with a beta of 1 the bias correction divides by 0).
    pub fn with_options(lr: f64, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        check_lr(lr)?;
        for (name, beta) in [("beta1", beta1), ("beta2", beta2)] {
            check_setting(name, beta, "in [0, 1)", (0.0..1.0).contains(&beta))?;
        }
        check_setting("eps", eps, "a finite number >= 0", eps.is_finite() && eps >= 0.0)?;
        Ok(Adam {
            lr,
            beta1,
            beta2,
            eps,
            steps: 0,
            first: Vec::new(),
            second: Vec::new(),
        })
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Changes the learning rate for the next steps.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `lr` is finite and at least 0 (then nothing changes).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.lr = lr;
        Ok(())
    }

    /// `(β₁, β₂)`, the decays of the first and second moments.
    pub fn betas(&self) -> (f64, f64) {
        (self.beta1, self.beta2)
    }

    /// The `ε` added to the denominator.
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

impl<T: Element> Optimizer<T> for Adam<T> {
    fn step(&mut self, mut params: Vec<&mut Parameter<T>>, grads: &Gradients<T>) -> Result<()> {
        check_step(&[&self.first, &self.second], &params, grads)?;
        init_state(&mut self.first, &params);
        init_state(&mut self.second, &params);
        self.steps = self.steps.saturating_add(1);
        let (b1, b2) = (self.beta1, self.beta2);
        let step_size = self.lr / (1.0 - b1.powi(self.steps));
        let correction2 = 1.0 - b2.powi(self.steps);
        let moments = self.first.iter_mut().zip(&mut self.second);
        for (param, (m, v)) in params.iter_mut().zip(moments) {
            let Some(grad) = param.grad(grads) else { continue };
            let grad = grad.clone();
            Zip::from(&mut param.value)
                .and(&mut *m)
                .and(&mut *v)
                .and(&grad)
                .for_each(|w, m, v, &g| {
                    let g = g.as_f64();
                    let new_m = b1 * m.as_f64() + (1.0 - b1) * g;
                    let new_v = b2 * v.as_f64() + (1.0 - b2) * g * g;
                    *m = T::from_f64_lossy(new_m);
                    *v = T::from_f64_lossy(new_v);
                    let update = step_size * new_m / ((new_v / correction2).sqrt() + self.eps);
                    *w = T::from_f64_lossy(w.as_f64() - update);
                });
        }
        Ok(())
    }

    fn state_dict(&self) -> StateDict<T> {
        let mut dict = buffers_state(&["exp_avg", "exp_avg_sq"], &[&self.first, &self.second]);
        for i in 0..self.first.len() {
            let step = ndarray::arr0(T::from_f64_lossy(f64::from(self.steps))).into_dyn();
            dict.insert(format!("state.{i}.step"), step);
        }
        dict
    }

    fn load_state_dict(&mut self, dict: &StateDict<T>) -> Result<()> {
        let mut buffers = buffers_from(dict, &["exp_avg", "exp_avg_sq", "step"])?;
        let steps = buffers.pop().unwrap_or_default();
        let count = steps
            .first()
            .and_then(|s| s.iter().next())
            .map_or(0.0, |s| s.as_f64());
        let whole = steps.iter().all(|s| s.iter().all(|v| v.as_f64() == count));
        check_setting(
            "the step count (state.{i}.step)",
            count,
            "a whole number in [0, 2^31), the same for every parameter",
            whole && count >= 0.0 && count.fract() == 0.0 && count < 2_147_483_648.0,
        )?;
        let second = buffers.pop().unwrap_or_default();
        let first = buffers.pop().unwrap_or_default();
        (self.first, self.second, self.steps) = (first, second, count as i32);
        Ok(())
    }
}

/// AdamW (Loshchilov and Hutter 2019): Adam with decoupled weight decay, PyTorch's
/// `AdamW`: each step first shrinks the weights, `θ ← θ · (1 - lr·λ)`, then takes Adam's step
/// (which does not see `λ`). PyTorch's default `λ` is 0.01.
#[derive(Debug, Clone)]
pub struct AdamW<T: Element> {
    adam: Adam<T>,
    weight_decay: f64,
}

impl<T: Element> AdamW<T> {
    /// AdamW with this learning rate and weight decay, and Adam's other defaults.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `lr` and `weight_decay` are finite and at least 0.
    pub fn new(lr: f64, weight_decay: f64) -> Result<Self> {
        Self::with_options(lr, 0.9, 0.999, 1e-8, weight_decay)
    }

    /// AdamW with every setting.
    ///
    /// # Errors
    /// As [`Adam::with_options`], and [`Error::InvalidSetting`] unless `weight_decay` is finite
    /// and at least 0.
    pub fn with_options(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        check_weight_decay(weight_decay)?;
        Ok(AdamW {
            adam: Adam::with_options(lr, beta1, beta2, eps)?,
            weight_decay,
        })
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.adam.lr()
    }

    /// Changes the learning rate for the next steps (the decay uses it too).
    ///
    /// # Errors
    /// As [`Adam::set_lr`].
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.adam.set_lr(lr)
    }

    /// The weight decay `λ`.
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay
    }
}

impl<T: Element> Optimizer<T> for AdamW<T> {
    fn step(&mut self, mut params: Vec<&mut Parameter<T>>, grads: &Gradients<T>) -> Result<()> {
        let adam = &self.adam;
        check_step(&[&adam.first, &adam.second], &params, grads)?;
        let shrink = 1.0 - adam.lr * self.weight_decay;
        for param in params.iter_mut().filter(|param| param.grad(grads).is_some()) {
            param
                .value
                .mapv_inplace(|w| T::from_f64_lossy(w.as_f64() * shrink));
        }
        self.adam.step(params, grads)
    }

    fn state_dict(&self) -> StateDict<T> {
        self.adam.state_dict()
    }

    fn load_state_dict(&mut self, dict: &StateDict<T>) -> Result<()> {
        self.adam.load_state_dict(dict)
    }
}

#[cfg(test)]
mod tests;
