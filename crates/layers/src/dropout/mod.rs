//! Inverted dropout: one fused tape node ([`dropout`]), the same as a product with a constant
//! mask ([`dropout_composed`]), and the layer, [`Dropout`].
//!
//! # The computation and its derivative
//! In training, each value is kept with probability `1 - p` and scaled by `1 / (1 - p)`, so
//! that the expected output is the input; the others become 0. With the mask
//! `m[i] ∈ {0, 1 / (1 - p)}` drawn once per call:
//!
//! ```text
//! y[i] = x[i] · m[i]        ∂L/∂x[i] = ∂L/∂y[i] · m[i]
//! ```
//!
//! The node keeps the mask (one `bool` per value) for backward. The map is linear and
//! symmetric (a diagonal matrix), so its backward is the same node applied to the gradient:
//! recorded ([`tape::Tape::grad`] with `create_graph`) that node shares the mask, and it
//! differentiates to any order, the second derivative being 0 (the recorded backward does not
//! depend on `x`). In evaluation the layer is the
//! identity. The mask comes from the random generator given (the layer's own, seeded), so a run
//! is reproducible; it is not PyTorch's random stream.

use std::rc::Rc;

use ndarray::{ArrayD, ArrayViewD};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tape::{BackwardArgs, Element, Function, GraphArgs, TapeError, Var};

use crate::error::{Error, Result};
use crate::module::{Mode, Module};
use crate::param::Parameter;

fn check_p(p: f64) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::InvalidSetting {
            name: "the dropout probability p",
            expected: "in [0, 1)",
            got: p,
        })
    }
}

/// Checks `p` and draws a keep-mask for `x`: value `i` (row-major) is kept when a uniform draw in
/// `[0, 1)` is at least `p`.
fn draw_mask<T: Element>(x: &Var<'_, T>, p: f64, rng: &mut impl Rng) -> Result<Vec<bool>> {
    check_p(p)?;
    let len = x.shape().iter().product();
    Ok((0..len).map(|_| rng.random::<f64>() >= p).collect())
}

/// `1 / (1 - p)` where kept, 0 where dropped.
fn factor<T: Element>(keep: bool, scale: T) -> T {
    if keep { scale } else { T::zero() }
}

/// Inverted dropout as ONE fused tape node: each value of `x` is zeroed with probability `p`
/// and the rest are scaled by `1 / (1 - p)`; the gradient is masked and scaled the same way.
/// The mask is drawn from `rng`, one draw per value in row-major order.
///
/// # Shapes
/// Any shape; the result has the shape of `x`.
///
/// # Errors
/// [`Error::InvalidSetting`] if `p` is not in `[0, 1)` (NaN included).
///
/// # Example
/// ```
/// use layers::dropout;
/// use rand::SeedableRng;
///
/// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
/// let tape = tape::Tape::<f64>::new();
/// let x = tape.var(ndarray::Array2::from_elem((4, 100), 3.0));
/// let y = dropout(x, 0.25, &mut rng)?;
/// // Every value is dropped (0) or kept and scaled by 1 / (1 - 0.25).
/// assert!(y.value().iter().all(|&v| v == 0.0 || v == 4.0));
/// assert!(dropout(x, 1.0, &mut rng).is_err());
/// # Ok::<(), layers::Error>(())
/// ```
pub fn dropout<'t, T: Element>(x: Var<'t, T>, p: f64, rng: &mut impl Rng) -> Result<Var<'t, T>> {
    let keep = draw_mask(&x, p, rng)?;
    let node = DropoutNode {
        keep: keep.into(),
        scale: T::from_f64_lossy(1.0 / (1.0 - p)),
        shares_mask: false,
    };
    Ok(x.tape().apply(node, &[x])?)
}

/// Dropout composed from tape primitives: `x` times a constant mask of `0` and `1 / (1 - p)`,
/// drawn from `rng` as [`dropout`] draws it. It exists to check [`dropout`] against.
///
/// # Shapes
/// As [`dropout`].
///
/// # Errors
/// As [`dropout`].
pub fn dropout_composed<'t, T: Element>(x: Var<'t, T>, p: f64, rng: &mut impl Rng) -> Result<Var<'t, T>> {
    let keep = draw_mask(&x, p, rng)?;
    let scale = T::from_f64_lossy(1.0 / (1.0 - p));
    let mask = ArrayD::from_shape_vec(x.shape(), keep.iter().map(|&k| factor(k, scale)).collect())
        .unwrap_or_else(|_| unreachable!("one mask value per element"));
    Ok(x.try_mul(x.tape().constant(mask))?)
}

/// The fused dropout: the keep-mask (shared with the nodes of its recorded backwards) and the
/// scale `1 / (1 - p)`.
#[derive(Clone)]
struct DropoutNode<T> {
    keep: Rc<[bool]>,
    scale: T,
    /// True for the nodes of recorded backwards: the mask is counted once, by the first node.
    shares_mask: bool,
}

impl<T: Element> DropoutNode<T> {
    /// `values · m`, elementwise, in row-major order.
    fn masked(&self, values: &ArrayViewD<'_, T>) -> ArrayD<T> {
        let mut out = values.as_standard_layout().into_owned();
        for (v, &keep) in out.iter_mut().zip(self.keep.iter()) {
            *v = *v * factor(keep, self.scale);
        }
        out
    }
}

impl<T: Element> Function<T> for DropoutNode<T> {
    fn name(&self) -> &str {
        "dropout"
    }

    fn rule(&self) -> &str {
        "dropout (fused): ∂/∂x = g·m, the same mask m (0 or 1/(1-p))"
    }

    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> tape::Result<ArrayD<T>> {
        match inputs {
            [x] if x.len() == self.keep.len() => Ok(self.masked(x)),
            [x] => Err(TapeError::Shape {
                op: "dropout",
                what: "the input",
                expected: format!("{} elements, one per mask value", self.keep.len()),
                got: x.shape().to_vec(),
            }),
            _ => Err(TapeError::Arity {
                op: "dropout",
                expected: 1,
                got: inputs.len(),
            }),
        }
    }

    fn backward(&self, args: &BackwardArgs<'_, T>) -> tape::Result<Vec<Option<ArrayD<T>>>> {
        Ok(vec![
            args.needs_grad[0].then(|| self.masked(&args.grad_output.view())),
        ])
    }

    /// The same node, sharing the mask, applied to the gradient: `∂L/∂x = m · ∂L/∂y`.
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> tape::Result<Vec<Option<Var<'t, T>>>> {
        if !args.needs_grad[0] {
            return Ok(vec![None]);
        }
        let grad = args.grad_output;
        let node = DropoutNode {
            shares_mask: true,
            ..self.clone()
        };
        Ok(vec![Some(grad.tape().apply(node, &[grad])?)])
    }

    fn saved_bytes(&self) -> usize {
        if self.shares_mask {
            return 0;
        }
        self.keep.len() * std::mem::size_of::<bool>()
    }
}

/// Dropout, as PyTorch's `nn.Dropout`: [`dropout`] in [`Mode::Train`], the identity in
/// [`Mode::Eval`]. The layer owns its random generator, seeded at construction, so a training
/// run is reproducible.
///
/// # Example
/// ```
/// use layers::{Dropout, Mode, Module};
///
/// let mut drop = Dropout::new(0.5, 7)?;
/// let tape = tape::Tape::<f32>::new();
/// let x = tape.constant(ndarray::Array2::<f32>::ones((2, 3)));
/// assert_eq!(*drop.forward(x, Mode::Eval)?.value(), *x.value());
/// assert_eq!(Module::<f32>::describe(&drop), "Dropout(p = 0.5)");
/// # Ok::<(), layers::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    rng: StdRng,
}

impl Dropout {
    /// Dropout with probability `p`, its masks drawn from a generator seeded with `seed`.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] if `p` is not in `[0, 1)`.
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        check_p(p)?;
        Ok(Dropout {
            p,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The probability of dropping a value.
    pub fn p(&self) -> f64 {
        self.p
    }
}

impl<T: Element> Module<T> for Dropout {
    fn forward<'t>(&mut self, x: Var<'t, T>, mode: Mode) -> Result<Var<'t, T>> {
        match mode {
            Mode::Train => dropout(x, self.p, &mut self.rng),
            Mode::Eval => Ok(x),
        }
    }

    fn parameters(&self) -> Vec<&Parameter<T>> {
        Vec::new()
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        Vec::new()
    }

    fn describe(&self) -> String {
        format!("Dropout(p = {})", self.p)
    }
}

#[cfg(test)]
mod tests;
