//! The conv-net kinds: `conv2d`, `max_pool2d` and `avg_pool2d`, each run forward and backward
//! through the fused node and through its composition from tape primitives (results prefixed
//! `composed.`).

use layers::{Conv2dOptions, Window2d, avg_pool2d, avg_pool2d_composed, conv2d, conv2d_composed};
use layers::{max_pool2d, max_pool2d_composed};
use ndarray::ArrayD;
use tape::{Element, Tape, Var};

use super::{Errors, GoldenError, Obj, Tensor, gradient_or_empty, relative_error};

/// A convolution: inputs, settings, and PyTorch's results.
#[derive(Debug, Clone)]
pub struct ConvCase {
    /// `(N, C_in, H, W)`.
    pub x: Tensor,
    /// `(C_out, C_in / groups, kH, kW)`.
    pub weight: Tensor,
    /// `(C_out,)`, or none.
    pub bias: Option<Tensor>,
    /// The upstream gradient, of the output's shape.
    pub dout: Tensor,
    /// Stride, padding, dilation and groups.
    pub options: Conv2dOptions,
    /// Expected `out`, `dx`, `dweight`, and `dbias` when there is a bias.
    pub expected: Vec<(&'static str, Tensor)>,
}

/// A max or average pooling: input, window, and PyTorch's results.
#[derive(Debug, Clone)]
pub struct PoolCase {
    /// Max pooling if true, else average pooling (padding counted).
    pub max: bool,
    /// `(N, C, H, W)`.
    pub x: Tensor,
    /// The upstream gradient, of the output's shape.
    pub dout: Tensor,
    /// Kernel size, stride and padding (no dilation).
    pub window: Window2d,
    /// Expected `out` and `dx`.
    pub expected: Vec<(&'static str, Tensor)>,
}

impl PoolCase {
    pub(super) fn kind_name(&self) -> &'static str {
        if self.max { "max_pool2d" } else { "avg_pool2d" }
    }
}

pub(super) fn parse_conv(case: &Obj<'_>) -> Result<ConvCase, GoldenError> {
    let bias = case.optional_tensor("bias")?;
    let mut expected = case.tensors(&["out", "dx", "dweight"])?;
    if bias.is_some() {
        expected.push(("dbias", case.tensor("dbias")?));
    }
    let groups = case.count("groups")? as usize;
    Ok(ConvCase {
        x: case.tensor("x")?,
        weight: case.tensor("weight")?,
        bias,
        dout: case.tensor("dout")?,
        options: Conv2dOptions {
            stride: case.pair("stride")?,
            padding: case.pair("padding")?,
            dilation: case.pair("dilation")?,
            groups,
        },
        expected,
    })
}

pub(super) fn parse_pool(case: &Obj<'_>, max: bool) -> Result<PoolCase, GoldenError> {
    Ok(PoolCase {
        max,
        x: case.tensor("x")?,
        dout: case.tensor("dout")?,
        window: Window2d::new(case.pair("kernel_size")?)
            .with_stride(case.pair("stride")?)
            .with_padding(case.pair("padding")?),
        expected: case.tensors(&["out", "dx"])?,
    })
}

/// Each of `results` (fused, then composed) against the expected results of the same name.
fn compare<T: Element>(expected: &[(&'static str, Tensor)], results: [Vec<ArrayD<T>>; 2]) -> Errors {
    let mut errors = Errors::new();
    for (prefix, ours) in ["", "composed."].into_iter().zip(results) {
        for ((name, reference), ours) in expected.iter().zip(&ours) {
            errors.push((format!("{prefix}{name}"), relative_error(ours, reference)));
        }
    }
    errors
}

pub(super) fn check_conv<T: Element>(case: &ConvCase) -> layers::Result<Errors> {
    let mut results: [Vec<ArrayD<T>>; 2] = Default::default();
    for (composed, results) in [false, true].into_iter().zip(&mut results) {
        let tape = Tape::new();
        let x = tape.var(case.x.to_array::<T>());
        let weight = tape.var(case.weight.to_array::<T>());
        let bias = case.bias.as_ref().map(|b| tape.var(b.to_array::<T>()));
        let conv = if composed { conv2d_composed } else { conv2d };
        let y = conv(x, weight, bias, case.options)?;
        let grads = y.backward_with(case.dout.to_array::<T>())?;
        *results = vec![y.value().as_ref().clone()];
        results.extend(
            [Some(x), Some(weight), bias]
                .into_iter()
                .flatten()
                .map(|v| gradient_or_empty(grads.get(v))),
        );
    }
    Ok(compare(&case.expected, results))
}

type Pool<T> = for<'t> fn(Var<'t, T>, Window2d) -> layers::Result<Var<'t, T>>;

pub(super) fn check_pool<T: Element>(case: &PoolCase) -> layers::Result<Errors> {
    let pools: [Pool<T>; 2] = if case.max {
        [max_pool2d, max_pool2d_composed]
    } else {
        [avg_pool2d, avg_pool2d_composed]
    };
    let mut results: [Vec<ArrayD<T>>; 2] = Default::default();
    for (pool, results) in pools.into_iter().zip(&mut results) {
        let tape = Tape::new();
        let x = tape.var(case.x.to_array::<T>());
        let y = pool(x, case.window)?;
        let grads = y.backward_with(case.dout.to_array::<T>())?;
        *results = vec![y.value().as_ref().clone(), gradient_or_empty(grads.get(x))];
    }
    Ok(compare(&case.expected, results))
}
