//! Learning-rate schedules with PyTorch's formulas: one learning rate per step, a pure function
//! of the step, so a schedule can be asked for any step (resuming included) and composed.
//!
//! - [`StepLr`]: `lr₀ · γ^⌊t / step_size⌋` (PyTorch's `StepLR`);
//! - [`CosineAnnealingLr`]: `η_min + (lr₀ - η_min) · (1 + cos(π t / T_max)) / 2` (PyTorch's
//!   `CosineAnnealingLR`, in its closed form), `η_min` from `T_max` on;
//! - [`LinearWarmup`]: `lr₀ · (s + (1 - s) · min(t, n) / n)` from `s · lr₀` to `lr₀` over `n`
//!   steps (PyTorch's `LinearLR` with `end_factor = 1`);
//! - [`LrSchedule::then`]: one schedule up to a step, another (counting from 0) after it
//!   (PyTorch's `SequentialLR`): warm-up, then cosine.
//!
//! Set the optimizer's rate from it before each step:
//!
//! ```
//! use layers::lr_schedule::{CosineAnnealingLr, LinearWarmup, LrSchedule};
//! use layers::Sgd;
//!
//! let schedule = LinearWarmup::new(0.1, 0.1, 5)?.then(5, CosineAnnealingLr::new(0.1, 95, 0.0)?);
//! let mut opt = Sgd::<f32>::new(schedule.lr(0), 0.9)?;
//! for step in 0..100 {
//!     opt.set_lr(schedule.lr(step))?;
//!     // ... forward, backward, opt.step(...)
//! }
//! assert!((schedule.lr(0) - 0.01).abs() < 1e-12 && schedule.lr(5) == 0.1);
//! # Ok::<(), layers::Error>(())
//! ```

use crate::error::{Error, Result};

/// A learning rate for each step `t = 0, 1, ...`.
pub trait LrSchedule {
    /// The learning rate of step `t`.
    fn lr(&self, t: usize) -> f64;

    /// This schedule for steps `0..milestone`, then `next` from its own step 0.
    fn then<S: LrSchedule>(self, milestone: usize, next: S) -> Then<Self, S>
    where
        Self: Sized,
    {
        Then {
            first: self,
            milestone,
            next,
        }
    }
}

fn check(name: &'static str, got: f64, expected: &'static str, valid: bool) -> Result<()> {
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidSetting { name, expected, got })
    }
}

fn check_lr(name: &'static str, lr: f64) -> Result<()> {
    check(name, lr, "a finite number >= 0", lr.is_finite() && lr >= 0.0)
}

fn check_steps(name: &'static str, steps: usize) -> Result<()> {
    check(name, steps as f64, "at least 1", steps >= 1)
}

/// The rate multiplied by `gamma` every `step_size` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLr {
    base: f64,
    step_size: usize,
    gamma: f64,
}

impl StepLr {
    /// From `base`, times `gamma` every `step_size` steps.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `base` and `gamma` are finite and at least 0 and
    /// `step_size` is at least 1.
    pub fn new(base: f64, step_size: usize, gamma: f64) -> Result<Self> {
        check_lr("the base learning rate", base)?;
        check_steps("step_size", step_size)?;
        check(
            "gamma",
            gamma,
            "a finite number >= 0",
            gamma.is_finite() && gamma >= 0.0,
        )?;
        Ok(StepLr {
            base,
            step_size,
            gamma,
        })
    }
}

impl LrSchedule for StepLr {
    fn lr(&self, t: usize) -> f64 {
        let decays = i32::try_from(t / self.step_size).unwrap_or(i32::MAX);
        self.base * self.gamma.powi(decays)
    }
}

/// Half a cosine from `base` down to `eta_min` over `t_max` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineAnnealingLr {
    base: f64,
    t_max: usize,
    eta_min: f64,
}

impl CosineAnnealingLr {
    /// From `base` at step 0 to `eta_min` at step `t_max` (and after it).
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless both rates are finite and at least 0 and `t_max` is at
    /// least 1.
    pub fn new(base: f64, t_max: usize, eta_min: f64) -> Result<Self> {
        check_lr("the base learning rate", base)?;
        check_lr("eta_min", eta_min)?;
        check_steps("t_max", t_max)?;
        Ok(CosineAnnealingLr { base, t_max, eta_min })
    }
}

impl LrSchedule for CosineAnnealingLr {
    fn lr(&self, t: usize) -> f64 {
        let progress = t.min(self.t_max) as f64 / self.t_max as f64;
        self.eta_min + (self.base - self.eta_min) * (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0
    }
}

/// A linear ramp from `start_factor · base` to `base` over `steps` steps, then `base`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearWarmup {
    base: f64,
    start_factor: f64,
    steps: usize,
}

impl LinearWarmup {
    /// From `start_factor · base` at step 0 to `base` at step `steps`.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `base` is finite and at least 0, `start_factor` is in
    /// `(0, 1]` (as PyTorch's `LinearLR` asks) and `steps` is at least 1.
    pub fn new(base: f64, start_factor: f64, steps: usize) -> Result<Self> {
        check_lr("the base learning rate", base)?;
        check(
            "start_factor",
            start_factor,
            "in (0, 1]",
            start_factor > 0.0 && start_factor <= 1.0,
        )?;
        check_steps("the warm-up steps", steps)?;
        Ok(LinearWarmup {
            base,
            start_factor,
            steps,
        })
    }
}

impl LrSchedule for LinearWarmup {
    fn lr(&self, t: usize) -> f64 {
        let progress = t.min(self.steps) as f64 / self.steps as f64;
        self.base * (self.start_factor + (1.0 - self.start_factor) * progress)
    }
}

/// One schedule, then another: see [`LrSchedule::then`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Then<A, B> {
    first: A,
    milestone: usize,
    next: B,
}

impl<A: LrSchedule, B: LrSchedule> LrSchedule for Then<A, B> {
    fn lr(&self, t: usize) -> f64 {
        if t < self.milestone {
            self.first.lr(t)
        } else {
            self.next.lr(t - self.milestone)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 * b.abs().max(1.0)
    }

    #[test]
    fn step_lr_decays_every_step_size_steps() {
        // PyTorch: StepLR(step_size=3, gamma=0.5) from 0.1 gives 0.1 0.1 0.1 0.05 0.05 0.05 0.025.
        let schedule = StepLr::new(0.1, 3, 0.5).unwrap();
        let lrs: Vec<f64> = (0..7).map(|t| schedule.lr(t)).collect();
        assert_eq!(lrs, [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]);
        assert_eq!(schedule.lr(usize::MAX), 0.0, "decays to 0, no overflow");
    }

    #[test]
    fn cosine_annealing_follows_the_closed_form() {
        let schedule = CosineAnnealingLr::new(0.1, 10, 0.001).unwrap();
        assert_eq!(schedule.lr(0), 0.1);
        assert!(close(schedule.lr(5), 0.001 + 0.099 / 2.0), "halfway: the mean");
        for t in 0..=10 {
            let formula =
                0.001 + (0.1 - 0.001) * (1.0 + (std::f64::consts::PI * t as f64 / 10.0).cos()) / 2.0;
            assert!(close(schedule.lr(t), formula), "step {t}");
        }
        assert!(close(schedule.lr(10), 0.001) && schedule.lr(1000) == schedule.lr(10));
    }

    #[test]
    fn warmup_ramps_linearly_then_holds() {
        let schedule = LinearWarmup::new(0.2, 0.25, 4).unwrap();
        let lrs: Vec<f64> = (0..6).map(|t| schedule.lr(t)).collect();
        for (lr, expected) in lrs.iter().zip([0.05, 0.0875, 0.125, 0.1625, 0.2, 0.2]) {
            assert!(close(*lr, expected), "{lrs:?}");
        }
    }

    #[test]
    fn schedules_compose_one_after_the_other() {
        let warmup = LinearWarmup::new(0.1, 0.5, 2).unwrap();
        let decay = StepLr::new(0.1, 2, 0.1).unwrap();
        let schedule = warmup.then(2, decay).then(6, StepLr::new(0.5, 1, 1.0).unwrap());
        let lrs: Vec<f64> = (0..8).map(|t| schedule.lr(t)).collect();
        let expected = [0.05, 0.075, 0.1, 0.1, 0.01, 0.01, 0.5, 0.5];
        assert!(lrs.iter().zip(expected).all(|(a, b)| close(*a, b)), "{lrs:?}");
    }

    #[test]
    fn settings_are_checked() {
        let errors = [
            StepLr::new(0.1, 0, 0.5).map(|_| ()).unwrap_err(),
            StepLr::new(f64::NAN, 1, 0.5).map(|_| ()).unwrap_err(),
            CosineAnnealingLr::new(0.1, 0, 0.0).map(|_| ()).unwrap_err(),
            CosineAnnealingLr::new(0.1, 5, -1.0).map(|_| ()).unwrap_err(),
            LinearWarmup::new(0.1, 0.0, 5).map(|_| ()).unwrap_err(),
        ];
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "step_size must be at least 1, got 0",
                "the base learning rate must be a finite number >= 0, got NaN",
                "t_max must be at least 1, got 0",
                "eta_min must be a finite number >= 0, got -1",
                "start_factor must be in (0, 1], got 0",
            ]
        );
    }
}
