//! Optimizers: SGD with momentum and Adam, with PyTorch's update rules.
//!
//! Settings are checked when an optimizer is made (or changed with `set_lr`), and every `step`
//! checks its parameters against the optimizer's state before changing anything: a failed step
//! leaves the parameters and the state as they were.

use ndarray::{ArrayD, Zip};
use tape::{Element, Gradients};

use crate::error::{Error, Result};
use crate::param::Parameter;

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
}

/// Checks a learning rate: finite and at least 0.
fn check_lr(lr: f64) -> Result<()> {
    check_setting("lr", lr, "a finite number >= 0", lr.is_finite() && lr >= 0.0)
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

/// Stochastic gradient descent with momentum (PyTorch's form):
/// `v ← μ·v + g`, `θ ← θ - lr·v` (plain SGD for `μ = 0`).
#[derive(Debug, Clone)]
pub struct Sgd<T: Element> {
    lr: f64,
    momentum: f64,
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
            velocity: Vec::new(),
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
        for (param, velocity) in params.iter_mut().zip(&mut self.velocity) {
            let Some(grad) = param.grad(grads) else { continue };
            let grad = grad.clone();
            Zip::from(&mut param.value)
                .and(&mut *velocity)
                .and(&grad)
                .for_each(|w, v, &g| {
                    *v = momentum * *v + g;
                    *w = *w - lr * *v;
                });
        }
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
}

#[cfg(test)]
mod tests {
    use ndarray::array;
    use tape::Tape;

    use super::*;

    /// Minimises `sum((w - target)²)` and returns the final `w`.
    fn minimise(optimizer: &mut dyn Optimizer<f64>, steps: usize) -> ArrayD<f64> {
        let target = array![3.0, -1.0].into_dyn();
        let mut w = Parameter::new(array![0.0, 0.0]);
        for _ in 0..steps {
            let tape = Tape::new();
            let v = w.bind(&tape);
            let diff = v - tape.constant(target.clone());
            let grads = (diff * diff).sum().backward().unwrap();
            optimizer.step(vec![&mut w], &grads).unwrap();
        }
        w.value
    }

    #[test]
    fn sgd_takes_the_textbook_step_and_converges() {
        // One step from 0 with lr 0.1: gradient 2(w - t) = (-6, 2), so w = (0.6, -0.2).
        assert!(
            minimise(&mut Sgd::new(0.1, 0.0).unwrap(), 1).abs_diff_eq(&array![0.6, -0.2].into_dyn(), 1e-15)
        );
        // Momentum: the second step is -lr·(μ·g₁ + g₂).
        let two = minimise(&mut Sgd::new(0.1, 0.9).unwrap(), 2);
        let g2 = array![2.0 * (0.6 - 3.0), 2.0 * (-0.2 + 1.0)];
        let expected = array![0.6, -0.2] - (array![-6.0, 2.0] * 0.9 + g2) * 0.1;
        assert!(two.abs_diff_eq(&expected.into_dyn(), 1e-15));
        // Heavy-ball momentum contracts by √μ ≈ 0.95 per step here: 500 steps reach 1e-6.
        assert!(
            minimise(&mut Sgd::new(0.1, 0.9).unwrap(), 500).abs_diff_eq(&array![3.0, -1.0].into_dyn(), 1e-6)
        );
    }

    #[test]
    fn adam_first_step_is_lr_times_the_sign_and_converges() {
        let one = minimise(&mut Adam::new(0.01).unwrap(), 1);
        assert!(one.abs_diff_eq(&array![0.01, -0.01].into_dyn(), 1e-9));
        assert!(minimise(&mut Adam::new(0.1).unwrap(), 500).abs_diff_eq(&array![3.0, -1.0].into_dyn(), 1e-3));
    }

    #[test]
    fn a_changed_parameter_set_is_an_error() {
        let mut sgd = Sgd::<f64>::new(0.1, 0.0).unwrap();
        let tape = Tape::new();
        let (mut a, mut b) = (Parameter::new(array![1.0]), Parameter::new(array![2.0]));
        let grads = (a.bind(&tape) * b.bind(&tape)).sum().backward().unwrap();
        sgd.step(vec![&mut a, &mut b], &grads).unwrap();
        assert_eq!((a.value[0], b.value[0]), (0.8, 1.9));
        let error = sgd.step(vec![&mut a], &grads).unwrap_err();
        assert_eq!(
            error.to_string(),
            "optimizer state holds 2 parameters, got 1; use one optimizer per set of parameters"
        );
    }

    /// Two parameters of shapes [2] and [3], bound to a new tape, with their gradients.
    fn two_parameters(a: &Parameter<f64>, b: &Parameter<f64>) -> Gradients<f64> {
        let tape = Tape::new();
        let loss = a.bind(&tape).sum() * b.bind(&tape).sum();
        loss.backward().unwrap()
    }

    #[test]
    fn parameters_that_change_shape_or_order_are_errors_and_change_nothing() {
        // They panicked inside ndarray.
        let optimizers: [Box<dyn Optimizer<f64>>; 2] = [
            Box::new(Sgd::new(0.1, 0.9).unwrap()),
            Box::new(Adam::new(0.1).unwrap()),
        ];
        for mut opt in optimizers {
            let (mut a, mut b) = (
                Parameter::new(array![1.0, 2.0]),
                Parameter::new(array![3.0, 4.0, 5.0]),
            );
            let grads = two_parameters(&a, &b);
            opt.step(vec![&mut a, &mut b], &grads).unwrap();
            let grads = two_parameters(&a, &b);
            let before = (a.value.clone(), b.value.clone());
            let error = opt.step(vec![&mut b, &mut a], &grads).unwrap_err();
            assert_eq!(
                error.to_string(),
                "parameter 0 has shape [3], expected [2] (its shape at the optimizer's first step); \
                 give the optimizer the same parameters in the same order every step"
            );
            a.value = array![1.0, 2.0, 3.0, 4.0].into_dyn();
            assert!(matches!(
                opt.step(vec![&mut a, &mut b], &grads),
                Err(Error::ParameterShape { index: 0, .. })
            ));
            a.value = before.0.clone();
            assert_eq!(
                (a.value.clone(), b.value.clone()),
                before,
                "a failed step changes nothing"
            );
            // The state is as it was: the next step in the right order works.
            opt.step(vec![&mut a, &mut b], &grads).unwrap();
        }
    }

    #[test]
    fn gradients_of_a_tape_that_never_saw_the_parameters_are_an_error() {
        // The step silently did nothing.
        let mut sgd = Sgd::<f64>::new(0.1, 0.0).unwrap();
        let mut w = Parameter::new(array![1.0, 2.0]);
        let other = Tape::new();
        let unrelated = (other.var(array![3.0]) * 2.0).sum().backward().unwrap();
        let error = sgd.step(vec![&mut w], &unrelated).unwrap_err();
        assert_eq!(
            error.to_string(),
            "none of the 1 parameter was used on the tape these gradients come from; run the \
             forward pass (which binds them) on that tape before backward"
        );
        assert_eq!(w.value, array![1.0, 2.0].into_dyn());
        // A parameter bound to the tape but unused by the loss is left as it is (PyTorch's None
        // gradient), beside one that is used.
        let (mut used, mut unused) = (Parameter::new(array![1.0]), Parameter::new(array![5.0]));
        let tape = Tape::new();
        let _ = unused.bind(&tape);
        let grads = (used.bind(&tape) * 3.0).sum().backward().unwrap();
        sgd.step(vec![&mut used, &mut unused], &grads).unwrap();
        assert_eq!((used.value[0], unused.value[0]), (1.0 - 0.1 * 3.0, 5.0));
    }

    #[test]
    fn settings_are_checked() {
        for (made, message) in [
            (
                Sgd::<f64>::new(f64::NAN, 0.9).map(|_| ()),
                "lr must be a finite number >= 0, got NaN",
            ),
            (
                Sgd::<f64>::new(-0.1, 0.9).map(|_| ()),
                "lr must be a finite number >= 0, got -0.1",
            ),
            (
                Sgd::<f64>::new(0.1, f64::INFINITY).map(|_| ()),
                "momentum must be a finite number >= 0, got inf",
            ),
            (
                Adam::<f64>::new(f64::INFINITY).map(|_| ()),
                "lr must be a finite number >= 0, got inf",
            ),
            (
                Adam::<f64>::with_options(0.1, 1.0, 0.999, 1e-8).map(|_| ()),
                "beta1 must be in [0, 1), got 1",
            ),
            (
                Adam::<f64>::with_options(0.1, 0.9, 1.0, 1e-8).map(|_| ()),
                "beta2 must be in [0, 1), got 1",
            ),
            (
                Adam::<f64>::with_options(0.1, 0.9, 0.999, -1.0).map(|_| ()),
                "eps must be a finite number >= 0, got -1",
            ),
        ] {
            assert_eq!(made.unwrap_err().to_string(), message);
        }
        let mut adam = Adam::<f64>::new(0.1).unwrap();
        assert!(adam.set_lr(f64::NAN).is_err());
        assert_eq!(adam.lr(), 0.1, "a failed set_lr changes nothing");
        adam.set_lr(0.01).unwrap();
        assert_eq!((adam.lr(), adam.betas(), adam.eps()), (0.01, (0.9, 0.999), 1e-8));
    }
}
