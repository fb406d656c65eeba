//! The pooling layers.

use tape::{Element, Var};

use super::{Window2d, avg_pool2d, max_pool2d};
use crate::error::Result;
use crate::module::{Mode, Module};
use crate::param::Parameter;

/// `MaxPool2d(3x3, stride [1, 1])`: the kernel, and each setting that differs from PyTorch's
/// layer defaults (stride = kernel, no padding, dilation 1).
fn describe(name: &str, w: &Window2d) -> String {
    let [kh, kw] = w.kernel;
    let mut text = format!("{name}({kh}x{kw}");
    for (setting, value, default) in [
        ("stride", w.stride, w.kernel),
        ("padding", w.padding, [0, 0]),
        ("dilation", w.dilation, [1, 1]),
    ] {
        if value != default {
            text += &format!(", {setting} {value:?}");
        }
    }
    text + ")"
}

/// Max pooling, as PyTorch's `nn.MaxPool2d`; see [`max_pool2d`]. No parameters.
///
/// # Example
/// ```
/// use layers::{MaxPool2d, Mode, Module};
///
/// let mut pool = MaxPool2d::new([2, 2]); // stride 2, as PyTorch's MaxPool2d(2)
/// let tape = tape::Tape::<f32>::new();
/// let y = pool.forward(tape.constant(ndarray::Array4::<f32>::zeros((60, 32, 8, 8))), Mode::Train)?;
/// assert_eq!(y.shape(), vec![60, 32, 4, 4]);
/// assert_eq!(Module::<f32>::describe(&pool), "MaxPool2d(2x2)");
/// # Ok::<(), layers::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    /// The window; PyTorch's layer default stride is the kernel size.
    pub window: Window2d,
}

impl MaxPool2d {
    /// Windows of `kernel` with stride `kernel`, no padding: PyTorch's defaults.
    pub fn new(kernel: [usize; 2]) -> Self {
        MaxPool2d {
            window: Window2d::new(kernel).with_stride(kernel),
        }
    }

    /// Pooling over this window.
    pub fn with_window(window: Window2d) -> Self {
        MaxPool2d { window }
    }
}

impl<T: Element> Module<T> for MaxPool2d {
    /// # Errors
    /// As [`max_pool2d`].
    fn forward<'t>(&mut self, x: Var<'t, T>, _mode: Mode) -> Result<Var<'t, T>> {
        max_pool2d(x, self.window)
    }

    fn parameters(&self) -> Vec<&Parameter<T>> {
        Vec::new()
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        Vec::new()
    }

    fn describe(&self) -> String {
        describe("MaxPool2d", &self.window)
    }
}

/// Average pooling, as PyTorch's `nn.AvgPool2d` (padding counts in the divisor); see
/// [`avg_pool2d`]. No parameters.
///
/// # Example
/// ```
/// use layers::{AvgPool2d, Module};
/// use layers::pool::Window2d;
///
/// let pool = AvgPool2d::with_window(Window2d::new([3, 3]).with_padding([1, 1]));
/// assert_eq!(Module::<f64>::describe(&pool), "AvgPool2d(3x3, stride [1, 1], padding [1, 1])");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvgPool2d {
    /// The window; PyTorch's layer default stride is the kernel size.
    pub window: Window2d,
}

impl AvgPool2d {
    /// Windows of `kernel` with stride `kernel`, no padding: PyTorch's defaults.
    pub fn new(kernel: [usize; 2]) -> Self {
        AvgPool2d {
            window: Window2d::new(kernel).with_stride(kernel),
        }
    }

    /// Pooling over this window.
    pub fn with_window(window: Window2d) -> Self {
        AvgPool2d { window }
    }
}

impl<T: Element> Module<T> for AvgPool2d {
    /// # Errors
    /// As [`avg_pool2d`].
    fn forward<'t>(&mut self, x: Var<'t, T>, _mode: Mode) -> Result<Var<'t, T>> {
        avg_pool2d(x, self.window)
    }

    fn parameters(&self) -> Vec<&Parameter<T>> {
        Vec::new()
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<T>> {
        Vec::new()
    }

    fn describe(&self) -> String {
        describe("AvgPool2d", &self.window)
    }
}
