//! The normalization kinds `layer_norm` and `group_norm`, each run forward and backward through
//! the fused node and, in `f64`, through its composition from tape primitives (results prefixed
//! `composed.`). The composition computes its statistics in `T`: in `f32` it loses digits on
//! data far from 0 (the `ln_offset` case, 1.7e-5), which is what the fused node's `f64`
//! statistics avoid, so in `f32` only the fused node is checked.

use layers::{group_norm, group_norm_composed, layer_norm, layer_norm_composed};
use ndarray::ArrayD;
use tape::{Element, Tape};

use super::{Errors, GoldenError, Obj, Tensor, gradient_or_empty, relative_error};

/// Over what a [`NormCase`] normalizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Normalized {
    /// LayerNorm over these trailing axes.
    Layer(Vec<usize>),
    /// GroupNorm in this many groups of channels.
    Groups(usize),
}

/// A LayerNorm or GroupNorm call: inputs, settings, and PyTorch's results.
#[derive(Debug, Clone)]
pub struct NormCase {
    /// What is normalized together.
    pub normalized: Normalized,
    /// The input.
    pub x: Tensor,
    /// The weight and the bias, or none (no affine).
    pub affine: Option<(Tensor, Tensor)>,
    /// The upstream gradient.
    pub dout: Tensor,
    /// `eps`.
    pub eps: f64,
    /// Expected `out`, `dx`, and with affine `dweight` and `dbias`.
    pub expected: Vec<(&'static str, Tensor)>,
}

impl NormCase {
    /// `"layer_norm"` or `"group_norm"`.
    pub fn kind_name(&self) -> &'static str {
        match self.normalized {
            Normalized::Layer(_) => "layer_norm",
            Normalized::Groups(_) => "group_norm",
        }
    }
}

pub(super) fn parse_norm(case: &Obj<'_>, layer: bool) -> Result<NormCase, GoldenError> {
    let normalized = if layer {
        let field = case.field("normalized_shape")?;
        let axes = field
            .as_array()
            .and_then(|axes| axes.iter().map(|a| a.as_u64().map(|a| a as usize)).collect());
        Normalized::Layer(axes.ok_or_else(|| {
            super::format_error(
                format!("{}.normalized_shape", case.at),
                format!("expected an array of whole numbers, got {field}"),
            )
        })?)
    } else {
        Normalized::Groups(case.count("num_groups")? as usize)
    };
    let affine = match (case.optional_tensor("weight")?, case.optional_tensor("bias")?) {
        (Some(w), Some(b)) => Some((w, b)),
        (None, None) => None,
        _ => {
            return Err(super::format_error(
                &case.at,
                "expected both weight and bias, or neither (null)",
            ));
        }
    };
    let mut expected = case.tensors(&["out", "dx"])?;
    if affine.is_some() {
        expected.extend(case.tensors(&["dweight", "dbias"])?);
    }
    Ok(NormCase {
        normalized,
        x: case.tensor("x")?,
        affine,
        dout: case.tensor("dout")?,
        eps: case.number("eps")?,
        expected,
    })
}

pub(super) fn check_norm<T: Element>(case: &NormCase) -> layers::Result<Errors> {
    let mut errors = Errors::new();
    let forms: &[bool] = if std::mem::size_of::<T>() < 8 {
        &[false]
    } else {
        &[false, true]
    };
    for &composed in forms {
        let tape = Tape::new();
        let x = tape.var(case.x.to_array::<T>());
        let affine = case
            .affine
            .as_ref()
            .map(|(w, b)| (tape.var(w.to_array::<T>()), tape.var(b.to_array::<T>())));
        let (weight, bias) = (affine.map(|(w, _)| w), affine.map(|(_, b)| b));
        let y = match (&case.normalized, composed) {
            (Normalized::Layer(axes), false) => layer_norm(x, axes, weight, bias, case.eps),
            (Normalized::Layer(axes), true) => layer_norm_composed(x, axes, weight, bias, case.eps),
            (Normalized::Groups(groups), false) => group_norm(x, *groups, weight, bias, case.eps),
            (Normalized::Groups(groups), true) => group_norm_composed(x, *groups, weight, bias, case.eps),
        }?;
        let grads = y.backward_with(case.dout.to_array::<T>())?;
        let mut results: Vec<ArrayD<T>> = vec![y.value().as_ref().clone(), gradient_or_empty(grads.get(x))];
        results.extend(
            [weight, bias]
                .into_iter()
                .flatten()
                .map(|v| gradient_or_empty(grads.get(v))),
        );
        let prefix = if composed { "composed." } else { "" };
        for ((name, reference), ours) in case.expected.iter().zip(&results) {
            errors.push((format!("{prefix}{name}"), relative_error(ours, reference)));
        }
    }
    Ok(errors)
}
