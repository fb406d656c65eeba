//! LayerNorm's and GroupNorm's cases: the fused node against its composition, forward +
//! backward with every gradient, on a transformer block's and a conv net's shapes.

use std::hint::black_box;

use layers::{group_norm, group_norm_composed, layer_norm, layer_norm_composed};
use ndarray::{Array1, ArrayD};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tape::{Element, Tape};

use crate::{Budget, medians_us, normal};

/// LayerNorm over the last axis: 64 sequences of 128 tokens of width 768.
pub(crate) const LAYER_NORM: [[usize; 2]; 1] = [[64 * 128, 768]];
/// GroupNorm: the input shape and the groups.
pub(crate) const GROUP_NORM: [([usize; 4], usize); 1] = [([32, 64, 56, 56], 32)];

/// Which normalization a case runs.
#[derive(Clone, Copy)]
pub(crate) enum Norm {
    /// Over the last axis.
    Layer,
    /// Over groups of channels.
    Group(usize),
}

/// One forward + backward on a fresh tape; returns the bytes the tape kept for backward.
fn pass<T: Element>(
    norm: Norm,
    composed: bool,
    (x, weight, bias, dout): (ArrayD<T>, ArrayD<T>, ArrayD<T>, ArrayD<T>),
) -> usize {
    let tape = Tape::new();
    let (x, weight, bias) = (tape.var(x), tape.var(weight), tape.var(bias));
    let (w, b) = (Some(weight), Some(bias));
    let y = match (norm, composed) {
        (Norm::Layer, false) => layer_norm(x, &weight.shape(), w, b, 1e-5),
        (Norm::Layer, true) => layer_norm_composed(x, &weight.shape(), w, b, 1e-5),
        (Norm::Group(groups), false) => group_norm(x, groups, w, b, 1e-5),
        (Norm::Group(groups), true) => group_norm_composed(x, groups, w, b, 1e-5),
    };
    let y = y.unwrap_or_else(|e| panic!("benchmark inputs are valid: {e}"));
    let saved = tape.saved_bytes();
    let grads = y
        .backward_with(dout)
        .unwrap_or_else(|e| panic!("benchmark gradient is valid: {e}"));
    black_box(grads.get(x).map(|g| g.len()));
    saved
}

/// Times one case and returns its JSON line.
pub(crate) fn case<T: Element>(norm: Norm, shape: &[usize], budget: Budget) -> String {
    let mut rng = StdRng::seed_from_u64(0);
    let parameters = match norm {
        Norm::Layer => shape[shape.len() - 1],
        Norm::Group(_) => shape[1],
    };
    let x = normal::<T>(shape, &mut rng);
    let dout = normal::<T>(shape, &mut rng);
    let weight = normal::<T>(&[parameters], &mut rng);
    let bias = Array1::<T>::zeros(parameters).into_dyn();
    let inputs = || (x.clone(), weight.clone(), bias.clone(), dout.clone());
    let fused_saved = pass(norm, false, inputs());
    let composed_saved = pass(norm, true, inputs());
    let mut composed = |i| {
        pass(norm, true, i);
    };
    let (fused_us, composed_us) = medians_us(
        budget,
        inputs,
        |i| {
            pass(norm, false, i);
        },
        Some(&mut composed),
    );
    let composed_us = composed_us.unwrap_or(f64::NAN);
    let (op, groups) = match norm {
        Norm::Layer => ("layer_norm", String::new()),
        Norm::Group(groups) => ("group_norm", format!(", \"groups\": {groups}")),
    };
    eprintln!(
        "{:>4} {op:<10} {:<18} fused {fused_us:>10.1} us   composed {composed_us:>10.1} us   saved bytes {fused_saved} vs {composed_saved}",
        T::NAME,
        format!("{shape:?}"),
    );
    format!(
        "{{\"op\": \"{op}\", \"dtype\": \"{}\", \"shape\": {shape:?}{groups}, \"fused_us\": {fused_us:.1}, \"composed_us\": {composed_us:.1}, \
         \"fused_saved_bytes\": {fused_saved}, \"composed_saved_bytes\": {composed_saved}}}",
        T::NAME
    )
}
