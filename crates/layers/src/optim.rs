//! Optimizers: SGD with momentum and Adam, with PyTorch's update rules.

use ndarray::{ArrayD, Zip};
use tape::{Element, Gradients};

use crate::error::{Error, Result};
use crate::param::Parameter;

/// Updates parameters from their gradients.
pub trait Optimizer<T: Element> {
    /// One update of `params` (in the same order every call) from the gradients of the backward
    /// pass they were last bound to. Parameters without a gradient are left as they are.
    ///
    /// # Errors
    /// [`Error::ParameterCount`] when the number of parameters changed since the first step.
    fn step(&mut self, params: Vec<&mut Parameter<T>>, grads: &Gradients<T>) -> Result<()>;
}

/// Per-parameter state, created on the first step.
fn state_for<T: Element>(state: &mut Vec<ArrayD<T>>, params: &[&mut Parameter<T>]) -> Result<()> {
    if state.is_empty() {
        *state = params.iter().map(|p| ArrayD::zeros(p.value.raw_dim())).collect();
    }
    if state.len() != params.len() {
        return Err(Error::ParameterCount {
            expected: state.len(),
            got: params.len(),
        });
    }
    Ok(())
}

/// Stochastic gradient descent with momentum (PyTorch's form):
/// `v ← μ·v + g`, `θ ← θ - lr·v` (plain SGD for `μ = 0`).
#[derive(Debug, Clone)]
pub struct Sgd<T: Element> {
    /// Learning rate.
    pub lr: f64,
    /// Momentum `μ`.
    pub momentum: f64,
    velocity: Vec<ArrayD<T>>,
}

impl<T: Element> Sgd<T> {
    /// SGD with this learning rate and momentum.
    pub fn new(lr: f64, momentum: f64) -> Self {
        Sgd {
            lr,
            momentum,
            velocity: Vec::new(),
        }
    }
}

impl<T: Element> Optimizer<T> for Sgd<T> {
    fn step(&mut self, mut params: Vec<&mut Parameter<T>>, grads: &Gradients<T>) -> Result<()> {
        state_for(&mut self.velocity, &params)?;
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
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    steps: i32,
    first: Vec<ArrayD<T>>,
    second: Vec<ArrayD<T>>,
}

impl<T: Element> Adam<T> {
    /// Adam with this learning rate and PyTorch's other defaults.
    pub fn new(lr: f64) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            steps: 0,
            first: Vec::new(),
            second: Vec::new(),
        }
    }
}

impl<T: Element> Optimizer<T> for Adam<T> {
    fn step(&mut self, mut params: Vec<&mut Parameter<T>>, grads: &Gradients<T>) -> Result<()> {
        state_for(&mut self.first, &params)?;
        state_for(&mut self.second, &params)?;
        self.steps += 1;
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
        assert!(minimise(&mut Sgd::new(0.1, 0.0), 1).abs_diff_eq(&array![0.6, -0.2].into_dyn(), 1e-15));
        // Momentum: the second step is -lr·(μ·g₁ + g₂).
        let two = minimise(&mut Sgd::new(0.1, 0.9), 2);
        let g2 = array![2.0 * (0.6 - 3.0), 2.0 * (-0.2 + 1.0)];
        let expected = array![0.6, -0.2] - (array![-6.0, 2.0] * 0.9 + g2) * 0.1;
        assert!(two.abs_diff_eq(&expected.into_dyn(), 1e-15));
        // Heavy-ball momentum contracts by √μ ≈ 0.95 per step here: 500 steps reach 1e-6.
        assert!(minimise(&mut Sgd::new(0.1, 0.9), 500).abs_diff_eq(&array![3.0, -1.0].into_dyn(), 1e-6));
    }

    #[test]
    fn adam_first_step_is_lr_times_the_sign_and_converges() {
        let one = minimise(&mut Adam::new(0.01), 1);
        assert!(one.abs_diff_eq(&array![0.01, -0.01].into_dyn(), 1e-9));
        assert!(minimise(&mut Adam::new(0.1), 500).abs_diff_eq(&array![3.0, -1.0].into_dyn(), 1e-3));
    }

    #[test]
    fn a_changed_parameter_set_is_an_error() {
        let mut sgd = Sgd::<f64>::new(0.1, 0.0);
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
}
