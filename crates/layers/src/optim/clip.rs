//! Gradient clipping, as PyTorch's `clip_grad_norm_` and `clip_grad_value_`: between `backward`
//! and the optimizer's step, on the gradients of the parameters given.

use tape::{Element, Gradients};

use super::check_setting;
use crate::error::Result;
use crate::param::Parameter;

/// Scales the parameters' gradients so that their global L2 norm (over all of them, as one
/// vector) is at most `max_norm`, and returns the norm before clipping. As PyTorch: the factor
/// is `max_norm / (norm + 1e-6)`, applied when it is below 1; the norm is summed in `f64`.
/// Parameters without a gradient are skipped. An infinite or NaN norm is returned as it is, and
/// then scales the gradients to NaN, as PyTorch's default does.
///
/// # Errors
/// [`Error::InvalidSetting`](crate::Error::InvalidSetting) unless `max_norm` is finite and at
/// least 0; the gradients are then unchanged.
///
/// # Example
/// ```
/// use layers::{Parameter, optim::clip_grad_norm};
/// use ndarray::array;
///
/// let w = Parameter::new(array![1.0f64, 1.0]);
/// let tape = tape::Tape::new();
/// let v = w.bind(&tape);
/// let mut grads = (v * tape.constant(array![3.0, 4.0])).sum().backward()?;
/// let norm = clip_grad_norm(&[&w], &mut grads, 1.0)?;
/// assert_eq!(norm, 5.0);
/// assert!((w.grad(&grads).unwrap()[0] - 0.6).abs() < 1e-6);
/// # Ok::<(), layers::Error>(())
/// ```
pub fn clip_grad_norm<T: Element>(
    params: &[&Parameter<T>],
    grads: &mut Gradients<T>,
    max_norm: f64,
) -> Result<f64> {
    check_setting(
        "max_norm",
        max_norm,
        "a finite number >= 0",
        max_norm.is_finite() && max_norm >= 0.0,
    )?;
    let squares: f64 = params
        .iter()
        .filter_map(|p| p.grad(grads))
        .flat_map(|g| g.iter().map(|v| v.as_f64() * v.as_f64()))
        .sum();
    let norm = squares.sqrt();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 || factor.is_nan() {
        let factor = T::from_f64_lossy(factor);
        for param in params {
            if let Some(grad) = param.grad_mut(grads) {
                grad.mapv_inplace(|g| g * factor);
            }
        }
    }
    Ok(norm)
}

/// Clamps every gradient value of the parameters into `[-clip, clip]`, as PyTorch's
/// `clip_grad_value_` (a NaN stays NaN).
///
/// # Errors
/// [`Error::InvalidSetting`](crate::Error::InvalidSetting) unless `clip` is finite and at least 0.
pub fn clip_grad_value<T: Element>(
    params: &[&Parameter<T>],
    grads: &mut Gradients<T>,
    clip: f64,
) -> Result<()> {
    check_setting(
        "clip",
        clip,
        "a finite number >= 0",
        clip.is_finite() && clip >= 0.0,
    )?;
    let (low, high) = (T::from_f64_lossy(-clip), T::from_f64_lossy(clip));
    for param in params {
        if let Some(grad) = param.grad_mut(grads) {
            grad.mapv_inplace(|g| {
                if g < low {
                    low
                } else if g > high {
                    high
                } else {
                    g
                }
            });
        }
    }
    Ok(())
}
