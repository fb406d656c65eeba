//! 2-D convolution, PyTorch's `conv2d`: one fused tape node ([`conv2d`]) with a hand-written
//! backward, the same computation composed from tape primitives ([`conv2d_composed`]) to check
//! it against, and the layer, [`Conv2d`].
//!
//! # Shapes
//! `x` is `(N, C_in, H, W)`; `weight` is `(C_out, C_in / groups, kH, kW)`; `bias`, if any,
//! `(C_out,)`; the output is `(N, C_out, oH, oW)` with PyTorch's output size
//! `o = ⌊(i + 2·padding - dilation·(k - 1) - 1) / stride⌋ + 1` on each axis
//! ([`Window2d::output_size`]). The input is zero-padded. With `groups = G`, the channels split
//! into `G` groups: output channels `g·C_out/G ..` see only input channels `g·C_in/G ..`.
//!
//! # The computation, and the derivation of the fused backward
//! Unfolding (im2col, [`tape::ops::unfold`]) copies the `C_in/G · kH · kW` input values under
//! each of the `L = oH · oW` window positions into a column; `cols[n]` is
//! `(C_in · kH · kW) × L`, a block of rows per group. Each group of one sample is then one matrix
//! product:
//!
//! ```text
//! Y[n, g] = W[g] · cols[n, g] + b[g]        W[g]: (C_out/G) × (C_in/G · kH · kW), Y[n, g]: (C_out/G) × L
//! ```
//!
//! Given the upstream gradient `G_Y = ∂L/∂Y`, the chain rule through a matrix product gives
//!
//! ```text
//! ∂L/∂b[o]       = Σₙ Σₚ G_Y[n, o, p]                    each output position adds b[o] once
//! ∂L/∂W[g]       = Σₙ G_Y[n, g] · cols[n, g]ᵀ           the product's right factor, summed over samples
//! ∂L/∂cols[n, g] = W[g]ᵀ · G_Y[n, g]
//! ∂L/∂x[n]       = fold(∂L/∂cols[n])                     each input value gets the gradient of every
//!                                                        column entry it was copied to (col2im)
//! ```
//!
//! Fused, the node keeps nothing beyond the tape's own values: backward unfolds `x` again, one
//! sample at a time, instead of keeping `cols` (which is `kH · kW` times the size of `x`).
//! Each of the three gradients is computed only when it is needed. Work is split over blocks
//! of whole samples fixed by the shape, and the per-block sums of `∂L/∂W` and `∂L/∂b` are added
//! in block order, so results are bit-identical on any number of threads. The matrix products
//! are `ndarray`'s (the `matrixmultiply` crate's kernels), each on one thread.
//!
//! # The double backward
//! Recording the backward ([`tape::Tape::grad`] with `create_graph`) adds one fused node,
//! `conv2d_backward`, with inputs `x`, `W`, `G_Y` and result `(∂L/∂x, ∂L/∂W, ∂L/∂b)`. Each is
//! linear in `G_Y`, and `∂L/∂x` in `W`, `∂L/∂W` in `x`: the backward of a convolution is made
//! of convolutions. With `A`, `B`, `c` the gradients of some `S` with respect to the three
//! results, `S = ⟨A, dx(G_Y; W)⟩ + ⟨B, dW(x; G_Y)⟩ + ⟨c, Σ G_Y⟩`, and since `dx(·; W)` is the
//! adjoint of `conv(·; W)` and `⟨B, dW(x; G)⟩ = ⟨conv(x; B), G⟩`:
//!
//! ```text
//! ∂S/∂G_Y = conv(A; W) + c + conv(x; B)      two forward convolutions, the first with bias c
//! ∂S/∂W   = dW(A; G_Y)                       the weight gradient, with A in place of x
//! ∂S/∂x   = dx(G_Y; B)                       the input gradient, with B in place of W
//! ```
//!
//! All three are computed by the node's own kernels, each only when needed. Recorded again,
//! they are `conv2d` nodes and parts of `conv2d_backward` nodes, so a convolution
//! differentiates to any order.
//!
//! # Numerics
//! Products accumulate in `T`, as PyTorch's do; `∂L/∂b` is summed in `f64`.

mod double;
mod layer;
mod node;

use tape::ops::unfold::Window2d;
use tape::{Element, TapeError, Var};

pub use self::layer::Conv2d;
use self::node::{Conv2dNode, Geometry};
use crate::error::{Error, Result};

/// The settings of a convolution besides its weight, each `[height, width]` (PyTorch's
/// defaults: stride 1, no padding, dilation 1, one group).
///
/// # Example
/// ```
/// use layers::Conv2dOptions;
///
/// let options = Conv2dOptions::default().with_padding([1, 1]);
/// assert_eq!((options.stride, options.padding, options.groups), ([1, 1], [1, 1], 1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2dOptions {
    /// Step between windows.
    pub stride: [usize; 2],
    /// Zero padding on each side.
    pub padding: [usize; 2],
    /// Spacing of the kernel's taps.
    pub dilation: [usize; 2],
    /// Number of channel groups; divides both channel counts.
    pub groups: usize,
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Conv2dOptions {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

impl Conv2dOptions {
    /// These options with this stride.
    #[must_use]
    pub fn with_stride(self, stride: [usize; 2]) -> Self {
        Conv2dOptions { stride, ..self }
    }

    /// These options with this padding.
    #[must_use]
    pub fn with_padding(self, padding: [usize; 2]) -> Self {
        Conv2dOptions { padding, ..self }
    }

    /// These options with this dilation.
    #[must_use]
    pub fn with_dilation(self, dilation: [usize; 2]) -> Self {
        Conv2dOptions { dilation, ..self }
    }

    /// These options with this many groups.
    #[must_use]
    pub fn with_groups(self, groups: usize) -> Self {
        Conv2dOptions { groups, ..self }
    }

    /// The sliding window of a kernel of this size.
    pub fn window(&self, kernel: [usize; 2]) -> Window2d {
        Window2d {
            kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        }
    }
}

/// Checks the shapes and settings of a convolution of `T` values, returning its geometry.
fn check<T>(
    x: &[usize],
    weight: &[usize],
    bias: Option<&[usize]>,
    options: &Conv2dOptions,
) -> Result<Geometry> {
    let &[n, c_in, h, w] = x else {
        return Err(Error::Shape {
            name: "x",
            got: x.to_vec(),
            expected: "rank 4, (N, C_in, H, W)".into(),
        });
    };
    let groups = options.groups;
    check_groups(groups, &[(c_in, "input channels of x")])?;
    let &[c_out, c_per_group, kh, kw] = weight else {
        return Err(Error::Shape {
            name: "weight",
            got: weight.to_vec(),
            expected: format!("rank 4, (C_out, C_in / groups = {}, kH, kW)", c_in / groups),
        });
    };
    if c_per_group != c_in / groups {
        return Err(Error::Shape {
            name: "weight",
            got: weight.to_vec(),
            expected: format!(
                "[{c_out}, {}, {kh}, {kw}] (axis 1 is C_in / groups = {c_in} / {groups})",
                c_in / groups
            ),
        });
    }
    check_groups(groups, &[(c_out, "output channels of weight (its axis 0)")])?;
    if let Some(bias) = bias.filter(|bias| *bias != [c_out]) {
        return Err(Error::Shape {
            name: "bias",
            got: bias.to_vec(),
            expected: format!("[{c_out}] (one value per output channel, axis 0 of the weight)"),
        });
    }
    let window = options.window([kh, kw]);
    let output = window.output_size("conv2d", x)?;
    // The output, and one sample's columns, must be arrays that can exist.
    for shape in [
        &[n, c_out, output[0], output[1]][..],
        &[c_in, kh, kw, output[0], output[1]],
    ] {
        if !fits::<T>(shape) {
            return Err(Error::Tape(TapeError::TooLarge {
                op: "conv2d",
                shape: shape.to_vec(),
            }));
        }
    }
    Ok(Geometry {
        n,
        c_in,
        input: [h, w],
        c_out,
        groups,
        window,
        output,
    })
}

/// Checks that `groups` is at least 1 and divides each channel count (given with whose it is).
fn check_groups(groups: usize, channels: &[(usize, &'static str)]) -> Result<()> {
    if groups == 0 {
        return Err(Error::InvalidSetting {
            name: "groups",
            expected: "at least 1",
            got: 0.0,
        });
    }
    match channels.iter().find(|(count, _)| count % groups != 0) {
        Some(&(channels, of)) => Err(Error::Groups { groups, channels, of }),
        None => Ok(()),
    }
}

/// Whether an array of `T` of this shape can exist: the product of its non-zero sizes, in
/// elements and in bytes, fits in `isize` (`ndarray` checks the non-zero sizes even when another
/// is 0).
fn fits<T>(shape: &[usize]) -> bool {
    shape
        .iter()
        .filter(|&&size| size != 0)
        .try_fold(std::mem::size_of::<T>(), |bytes, &size| bytes.checked_mul(size))
        .is_some_and(|bytes| bytes <= isize::MAX as usize)
}

/// 2-D convolution as ONE fused tape node with a hand-written backward (see the
/// [module docs](self) for the derivation), as PyTorch's `F.conv2d`.
///
/// # Shapes
/// `x`: `(N, C_in, H, W)`; `weight`: `(C_out, C_in / groups, kH, kW)`; `bias`: `(C_out,)`; the
/// result: `(N, C_out, oH, oW)`.
///
/// # Errors
/// [`Error::Shape`] for a tensor of the wrong rank or shape, [`Error::Groups`] when `groups` does
/// not divide both channel counts, [`Error::InvalidSetting`] for `groups = 0`, and
/// [`Error::Tape`] for a stride, dilation or kernel size of 0, a kernel larger than the padded
/// input, or a `Var` of another tape.
///
/// # Example
/// ```
/// use layers::{Conv2dOptions, conv2d};
/// use ndarray::{Array1, Array4};
///
/// let tape = tape::Tape::<f64>::new();
/// let x = tape.var(Array4::from_shape_fn((2, 3, 8, 8), |(n, c, h, w)| (n + c + h * w) as f64 / 64.0));
/// let weight = tape.var(Array4::from_elem((16, 3, 3, 3), 0.1));
/// let bias = tape.var(Array1::zeros(16));
/// let y = conv2d(x, weight, Some(bias), Conv2dOptions::default().with_padding([1, 1]))?;
/// assert_eq!(y.shape(), vec![2, 16, 8, 8]);
/// let grads = y.backward_with(Array4::from_shape_fn((2, 16, 8, 8), |(n, o, h, w)| (n + o + h + w) as f64))?;
/// assert_eq!(grads.wrt(weight)?.shape(), &[16, 3, 3, 3]);
/// # Ok::<(), layers::Error>(())
/// ```
pub fn conv2d<'t, T: Element>(
    x: Var<'t, T>,
    weight: Var<'t, T>,
    bias: Option<Var<'t, T>>,
    options: Conv2dOptions,
) -> Result<Var<'t, T>> {
    let bias_shape = bias.map(|b| b.shape());
    let geometry = check::<T>(&x.shape(), &weight.shape(), bias_shape.as_deref(), &options)?;
    let node = Conv2dNode::new(geometry);
    let tape = x.tape();
    Ok(match bias {
        Some(bias) => tape.apply(node, &[x, weight, bias])?,
        None => tape.apply(node, &[x, weight])?,
    })
}

/// 2-D convolution composed from tape primitives: unfold `x`, multiply by the weight (one
/// matrix product per group, batched), add the bias. The tape derives its gradient; it exists to
/// check [`conv2d`] against.
///
/// # Shapes
/// As [`conv2d`].
///
/// # Errors
/// As [`conv2d`].
pub fn conv2d_composed<'t, T: Element>(
    x: Var<'t, T>,
    weight: Var<'t, T>,
    bias: Option<Var<'t, T>>,
    options: Conv2dOptions,
) -> Result<Var<'t, T>> {
    let bias_shape = bias.map(|b| b.shape());
    let g = check::<T>(&x.shape(), &weight.shape(), bias_shape.as_deref(), &options)?;
    let groups = g.groups;
    let (rows, positions) = (g.rows_per_group(), g.output[0] * g.output[1]);
    // (N, C_in·kH·kW, L) → (N, G, rows, L); weight (C_out, ...) → (G, C_out/G, rows).
    let cols = x.unfold(g.window)?.reshape(&[g.n, groups, rows, positions])?;
    let weight = weight.reshape(&[groups, g.c_out / groups, rows])?;
    let y = weight
        .matmul(cols)?
        .reshape(&[g.n, g.c_out, g.output[0], g.output[1]])?;
    Ok(match bias {
        Some(bias) => y.try_add(bias.reshape(&[1, g.c_out, 1, 1])?)?,
        None => y,
    })
}

#[cfg(test)]
mod tests;
