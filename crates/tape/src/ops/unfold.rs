//! Sliding windows over images: `unfold` (PyTorch's `F.unfold`, im2col) copies every window of
//! an `(N, C, H, W)` input into a column, and its backward is `fold` (col2im), which adds each
//! column back where its values came from. A convolution is then a matrix product with the
//! columns, and a pooling a reduction over them: the composed forms that check the fused ones.
//!
//! [`im2col`] and [`col2im_add`] are the same two loops on one sample's slices, for fused ops
//! that unfold one sample at a time.

use std::ops::Range;

use ndarray::{ArrayD, ArrayViewD};

use super::arity;
use super::shape::element_count;
use crate::rule::{Rule, Tensor};
use crate::{BackwardArgs, Element, Function, GraphArgs, Result, TapeError, Var};

/// A sliding window over the last two axes of `(N, C, H, W)` data, each setting as
/// `[height, width]`: the kernel size, the stride, the zero padding added on each side and the
/// dilation (the spacing of the kernel's taps). PyTorch's output size:
/// `out = ⌊(in + 2·padding - dilation·(kernel - 1) - 1) / stride⌋ + 1`.
///
/// # Example
/// ```
/// use tape::ops::unfold::Window2d;
///
/// let window = Window2d::new([3, 3]).with_padding([1, 1]).with_stride([2, 2]);
/// assert_eq!(window.output_size("conv2d", &[8, 3, 7, 6])?, [4, 3]);
/// # Ok::<(), tape::TapeError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window2d {
    /// Kernel size.
    pub kernel: [usize; 2],
    /// Step between windows.
    pub stride: [usize; 2],
    /// Padding added on each side.
    pub padding: [usize; 2],
    /// Spacing of the kernel's taps (1: adjacent).
    pub dilation: [usize; 2],
}

impl Window2d {
    /// A window of this kernel size with stride 1, no padding and dilation 1.
    pub fn new(kernel: [usize; 2]) -> Self {
        Window2d {
            kernel,
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
        }
    }

    /// The same window with this stride.
    #[must_use]
    pub fn with_stride(self, stride: [usize; 2]) -> Self {
        Window2d { stride, ..self }
    }

    /// The same window with this padding on each side.
    #[must_use]
    pub fn with_padding(self, padding: [usize; 2]) -> Self {
        Window2d { padding, ..self }
    }

    /// The same window with this dilation.
    #[must_use]
    pub fn with_dilation(self, dilation: [usize; 2]) -> Self {
        Window2d { dilation, ..self }
    }

    /// Checks the window against an input of shape `x_shape`, `(N, C, H, W)`, and returns the
    /// output's `[height, width]`. `op` is named in the error.
    ///
    /// # Errors
    /// [`TapeError::InvalidSetting`] for a kernel size, stride or dilation of 0;
    /// [`TapeError::Shape`] for an input that is not 4-D, or smaller than the kernel's span once
    /// padded.
    pub fn output_size(&self, op: &'static str, x_shape: &[usize]) -> Result<[usize; 2]> {
        for (name, value) in [
            ("the kernel size", self.kernel),
            ("the stride", self.stride),
            ("the dilation", self.dilation),
        ] {
            if value.contains(&0) {
                return Err(TapeError::InvalidSetting {
                    op,
                    name,
                    expected: "at least 1 in each dimension",
                    got: format!("{value:?}"),
                });
            }
        }
        let &[_, _, height, width] = x_shape else {
            return Err(TapeError::Shape {
                op,
                what: "the input",
                expected: "rank 4, (N, C, H, W)".into(),
                got: x_shape.to_vec(),
            });
        };
        let too_small = || TapeError::Shape {
            op,
            what: "the input",
            expected: format!(
                "a height and width of at least the kernel's span {} once padded by {:?} on each \
                 side (kernel {:?}, dilation {:?})",
                self.span()
                    .map_or("(too large)".into(), |[h, w]| format!("{h}x{w}")),
                self.padding,
                self.kernel,
                self.dilation
            ),
            got: x_shape.to_vec(),
        };
        let (span, padded) = (self.span(), self.padded([height, width]));
        match (span, padded) {
            (Some(span), Some(padded)) if span[0] <= padded[0] && span[1] <= padded[1] => Ok([
                (padded[0] - span[0]) / self.stride[0] + 1,
                (padded[1] - span[1]) / self.stride[1] + 1,
            ]),
            _ => Err(too_small()),
        }
    }

    /// The extent of the dilated kernel, `dilation · (kernel - 1) + 1`, if it fits in a `usize`.
    fn span(&self) -> Option<[usize; 2]> {
        let one = |axis: usize| {
            self.dilation[axis]
                .checked_mul(self.kernel[axis] - 1)?
                .checked_add(1)
        };
        Some([one(0)?, one(1)?])
    }

    /// The input size with the padding on both sides, if it fits in a `usize`.
    fn padded(&self, input: [usize; 2]) -> Option<[usize; 2]> {
        let one = |axis: usize| input[axis].checked_add(self.padding[axis].checked_mul(2)?);
        Some([one(0)?, one(1)?])
    }
}

/// Everything the loops need about one sample: checked sizes, the window and the output size.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    input: [usize; 2],
    window: Window2d,
    output: [usize; 2],
}

impl Geometry {
    /// Checks `[C, H, W]` against the window and the lengths of the two buffers.
    fn new<T>(op: &'static str, chw: [usize; 3], window: &Window2d, image: &[T], cols: &[T]) -> Result<Self> {
        let [channels, height, width] = chw;
        let output = window.output_size(op, &[1, channels, height, width])?;
        let geometry = Geometry {
            input: [height, width],
            window: *window,
            output,
        };
        let image_len = element_count::<T>(&chw);
        if image_len != Some(image.len()) {
            return Err(TapeError::Shape {
                op,
                what: "the image buffer",
                expected: format!(
                    "{} values ([C, H, W] = {chw:?})",
                    image_len.map_or("more".into(), |len| len.to_string())
                ),
                got: vec![image.len()],
            });
        }
        let cols_shape = [channels, window.kernel[0], window.kernel[1], output[0], output[1]];
        let cols_len = element_count::<T>(&cols_shape);
        if cols_len != Some(cols.len()) {
            return Err(TapeError::Shape {
                op,
                what: "the columns buffer",
                expected: format!(
                    "{} values (C·kH·kW rows of oH·oW positions, {cols_shape:?})",
                    cols_len.map_or("more".into(), |len| len.to_string())
                ),
                got: vec![cols.len()],
            });
        }
        Ok(geometry)
    }

    fn positions(&self) -> usize {
        self.output[0] * self.output[1]
    }

    /// Where each tap of the kernel reads, in row-major order of the taps (the same for every
    /// channel).
    fn taps(&self) -> Vec<Tap> {
        let [kh, kw] = self.window.kernel;
        (0..kh * kw)
            .map(|index| self.tap(index / kw, index % kw))
            .collect()
    }

    /// Where tap `(ki, kj)` of the kernel reads, for every output position.
    fn tap(&self, ki: usize, kj: usize) -> Tap {
        let w = &self.window;
        let (rows, row_first) = valid_range(
            ki * w.dilation[0],
            w.padding[0],
            w.stride[0],
            self.input[0],
            self.output[0],
        );
        let (cols, col_first) = valid_range(
            kj * w.dilation[1],
            w.padding[1],
            w.stride[1],
            self.input[1],
            self.output[1],
        );
        Tap {
            rows,
            row_first,
            cols,
            col_first,
        }
    }
}

/// For one axis and one tap at `offset` (its dilation times its index): the outputs `lo..hi`
/// whose input `o·stride + offset - padding` is inside `0..size` (possibly none), and the input
/// of output `lo` when there are some.
#[inline]
fn valid_range(
    offset: usize,
    padding: usize,
    stride: usize,
    size: usize,
    out: usize,
) -> (Range<usize>, usize) {
    let lo = padding.saturating_sub(offset).div_ceil(stride).min(out);
    let hi = (size + padding)
        .saturating_sub(offset)
        .div_ceil(stride)
        .clamp(lo, out);
    let first = if lo < hi {
        lo * stride + offset - padding
    } else {
        0
    };
    (lo..hi, first)
}

/// The outputs of one kernel tap that read inside the image: rows `rows` from input row
/// `row_first` on, columns `cols` from input column `col_first` on (at the stride's steps).
struct Tap {
    rows: Range<usize>,
    row_first: usize,
    cols: Range<usize>,
    col_first: usize,
}

/// Unfolds one sample: `image` is `[C, H, W]` row-major, and `cols` receives `C·kH·kW` rows of
/// `oH·oW` values, row-major, in PyTorch's order (row `(c·kH + i)·kW + j` holds tap `(i, j)` of
/// channel `c` at every output position). Positions in the padding get `pad`.
///
/// # Errors
/// As [`Window2d::output_size`], and [`TapeError::Shape`] when a buffer has the wrong length.
///
/// # Example
/// ```
/// use tape::ops::unfold::{Window2d, im2col};
///
/// // A 1x3x3 image, 2x2 windows: 4 rows (the taps) of 4 positions.
/// let image = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
/// let mut cols = [0.0; 16];
/// im2col(&image, [1, 3, 3], &Window2d::new([2, 2]), 0.0, &mut cols)?;
/// assert_eq!(cols[..4], [1.0, 2.0, 4.0, 5.0]); // the top-left tap of each window
/// # Ok::<(), tape::TapeError>(())
/// ```
pub fn im2col<T: Element>(
    image: &[T],
    chw: [usize; 3],
    window: &Window2d,
    pad: T,
    cols: &mut [T],
) -> Result<()> {
    let g = Geometry::new("im2col", chw, window, image, cols)?;
    let (positions, [h, w]) = (g.positions(), g.input);
    if h * w == 0 {
        // An empty image (padding only): every value is padding.
        cols.fill(pad);
        return Ok(());
    }
    let (kh, kw) = (window.kernel[0], window.kernel[1]);
    let (out_w, [row_stride, col_stride]) = (g.output[1], window.stride);
    // Stride 1 and as many outputs as inputs per row: the valid rows of a tap are one run of
    // the flat image, shifted, with the columns that wrap around reset to `pad`.
    let flat = row_stride == 1 && col_stride == 1 && out_w == w;
    let taps = g.taps();
    for (plane, channel_cols) in image
        .chunks_exact(h * w)
        .zip(cols.chunks_exact_mut(kh * kw * positions))
    {
        for (tap, row) in taps.iter().zip(channel_cols.chunks_exact_mut(positions)) {
            let (rows, cols) = (tap.rows.clone(), tap.cols.clone());
            row[..rows.start * out_w].fill(pad);
            row[rows.end * out_w..].fill(pad);
            if cols.is_empty() {
                row[rows.start * out_w..rows.end * out_w].fill(pad);
                continue;
            }
            if flat && !rows.is_empty() {
                // Output (oh, ow) reads input (oh + row_first - rows.start, ow + col_first - cols.start).
                let (out_start, in_start) = (rows.start * w + cols.start, tap.row_first * w + tap.col_first);
                let len = (rows.end - rows.start) * w - cols.start - (w - cols.end);
                row[out_start..out_start + len].copy_from_slice(&plane[in_start..in_start + len]);
            }
            let edges = cols.start > 0 || cols.end < out_w;
            for (oh, segment) in (rows.start..rows.end).zip(row[rows.start * out_w..].chunks_exact_mut(out_w))
            {
                if edges {
                    segment[..cols.start].fill(pad);
                    segment[cols.end..].fill(pad);
                }
                if flat {
                    continue;
                }
                let ih = tap.row_first + (oh - rows.start) * row_stride;
                let source = &plane[ih * w + tap.col_first..(ih + 1) * w];
                let segment = &mut segment[cols.clone()];
                if col_stride == 1 {
                    segment.copy_from_slice(&source[..segment.len()]);
                } else {
                    for (value, &x) in segment.iter_mut().zip(source.iter().step_by(col_stride)) {
                        *value = x;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Folds columns back onto one sample: the inverse movement of [`im2col`], adding each value of
/// `cols` (`C·kH·kW` rows of `oH·oW`) into `image` (`[C, H, W]`) where `im2col` took it from;
/// values that came from the padding are dropped. This is the backward of unfolding.
///
/// # Errors
/// As [`im2col`].
pub fn col2im_add<T: Element>(cols: &[T], chw: [usize; 3], window: &Window2d, image: &mut [T]) -> Result<()> {
    let g = Geometry::new("col2im", chw, window, image, cols)?;
    let (positions, [h, w]) = (g.positions(), g.input);
    if h * w == 0 {
        return Ok(()); // nothing but padding
    }
    let (kh, kw) = (window.kernel[0], window.kernel[1]);
    let (out_w, [row_stride, col_stride]) = (g.output[1], window.stride);
    let taps = g.taps();
    for (plane, channel_cols) in image
        .chunks_exact_mut(h * w)
        .zip(cols.chunks_exact(kh * kw * positions))
    {
        for (tap, row) in taps.iter().zip(channel_cols.chunks_exact(positions)) {
            let cols = tap.cols.clone();
            if cols.is_empty() {
                continue;
            }
            for (oh, segment) in tap
                .rows
                .clone()
                .zip(row[tap.rows.start * out_w..].chunks_exact(out_w))
            {
                let ih = tap.row_first + (oh - tap.rows.start) * row_stride;
                let target = &mut plane[ih * w + tap.col_first..(ih + 1) * w];
                let segment = &segment[cols.clone()];
                if col_stride == 1 {
                    for (x, &value) in target.iter_mut().zip(segment) {
                        *x = *x + value;
                    }
                } else {
                    for (x, &value) in target.iter_mut().step_by(col_stride).zip(segment) {
                        *x = *x + value;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Unfold (im2col): `(N, C, H, W)` to `(N, C·kH·kW, oH·oW)`, padding with `pad`. Backward: fold
/// the gradient back with [`col2im_add`] (the padding's share is dropped).
pub struct Unfold<T> {
    window: Window2d,
    pad: T,
}

impl<T: Element> Unfold<T> {
    /// The op for this window, padding with `pad`.
    pub fn new(window: Window2d, pad: T) -> Self {
        Unfold { window, pad }
    }
}

impl<T: Element> Function<T> for Unfold<T> {
    fn name(&self) -> &str {
        "unfold"
    }
    fn forward(&mut self, inputs: &[ArrayViewD<'_, T>]) -> Result<ArrayD<T>> {
        arity("unfold", inputs, 1)?;
        unfold_array(&inputs[0], &self.window, self.pad)
    }
    fn backward(&self, args: &BackwardArgs<'_, T>) -> Result<Vec<Option<ArrayD<T>>>> {
        self.eager(args)
    }
    fn backward_graph<'t>(&self, args: &GraphArgs<'_, 't, T>) -> Result<Vec<Option<Var<'t, T>>>> {
        self.graph(args)
    }
}

impl<T: Element> Rule<T> for Unfold<T> {
    fn rule<V: Tensor<T>>(&self, inputs: &[V], output: &V, g: &V, needs: &[bool]) -> Result<Vec<Option<V>>> {
        let _ = output;
        let shape = inputs[0].dims();
        needs[0]
            .then(|| g.clone().folded(&self.window, &shape))
            .transpose()
            .map(|g| vec![g])
    }
}

impl<'t, T: Element> Var<'t, T> {
    /// Every `window` of this `(N, C, H, W)` value as a column, zero-padded: the result is
    /// `(N, C·kH·kW, oH·oW)`, as PyTorch's `F.unfold`. A convolution is `weight · unfold(x)`.
    ///
    /// # Errors
    /// As [`Window2d::output_size`], and [`TapeError::TooLarge`] when the columns could not be
    /// allocated.
    ///
    /// # Example
    /// ```
    /// use ndarray::Array4;
    /// use tape::{Tape, ops::unfold::Window2d};
    ///
    /// let tape = Tape::<f64>::new();
    /// let x = tape.var(Array4::from_shape_fn((2, 3, 5, 5), |(n, c, h, w)| (n + c + h * w) as f64));
    /// let cols = x.unfold(Window2d::new([3, 3]).with_padding([1, 1]))?;
    /// assert_eq!(cols.shape(), vec![2, 27, 25]);
    /// # Ok::<(), tape::TapeError>(())
    /// ```
    pub fn unfold(self, window: Window2d) -> Result<Var<'t, T>> {
        self.unfold_with_pad(window, T::zero())
    }

    /// As [`unfold`](Var::unfold), with the padding filled with `pad` (`-∞` for max pooling).
    ///
    /// # Errors
    /// As [`unfold`](Var::unfold).
    pub fn unfold_with_pad(self, window: Window2d, pad: T) -> Result<Var<'t, T>> {
        self.tape.apply(Unfold::new(window, pad), &[self])
    }
}

mod fold;

pub use self::fold::Fold;
pub(crate) use self::fold::{fold_array, unfold_array};

#[cfg(test)]
mod tests;
