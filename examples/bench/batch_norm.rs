//! BatchNorm's cases: the fused node against its composition, beside the memory-traffic bound.

use std::hint::black_box;
use std::time::Instant;

use layers::{batch_norm, batch_norm_composed};
use ndarray::{Array1, ArrayD};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;
use tape::{Element, Tape};

use crate::{Budget, medians_us, normal};

/// The shapes timed by default.
pub(crate) const GRID: [&[usize]; 7] = [
    &[8, 4],
    &[64, 64],
    &[256, 1024],
    &[1024, 64],
    &[4096, 4096],
    &[65536, 256],
    &[32, 64, 56, 56],
];
/// The shapes timed with `--quick`.
pub(crate) const QUICK: [&[usize]; 4] = [&[8, 4], &[64, 64], &[256, 1024], &[4096, 4096]];
/// Above this many elements the composed graph is not timed (its intermediates would not fit
/// comfortably).
const COMPOSED_MAX_ELEMENTS: usize = 20_000_000;
/// Copy bandwidth in GB/s (bytes read + bytes written per second): the best of a single- and
/// a multi-threaded copy of a buffer far larger than the caches.
pub(crate) fn copy_gbps() -> f64 {
    let len = 256 << 20 >> 3; // 256 MiB of f64
    let source = vec![1.0f64; len];
    let mut target = vec![0.0f64; len];
    let bytes = 2.0 * (len * 8) as f64;
    let mut best = 0.0f64;
    for parallel in [false, true] {
        for _ in 0..5 {
            let t = Instant::now();
            if parallel {
                target
                    .par_chunks_mut(1 << 16)
                    .zip(source.par_chunks(1 << 16))
                    .for_each(|(t, s)| t.copy_from_slice(s));
            } else {
                target.copy_from_slice(&source);
            }
            black_box(&target);
            best = best.max(bytes / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    best
}

/// One forward + backward on a fresh tape; returns the bytes the tape kept for backward.
fn pass<T: Element>(
    composed: bool,
    (x, gamma, beta, dout): (ArrayD<T>, Array1<T>, Array1<T>, ArrayD<T>),
) -> usize {
    let tape = Tape::new();
    let (x, gamma, beta) = (tape.var(x), tape.var(gamma), tape.var(beta));
    let y = if composed {
        batch_norm_composed(x, gamma, beta, 1e-5)
    } else {
        batch_norm(x, gamma, beta, 1e-5)
    };
    let y = y.unwrap_or_else(|e| panic!("benchmark inputs are valid: {e}"));
    let saved = tape.saved_bytes();
    let grads = y
        .backward_with(dout)
        .unwrap_or_else(|e| panic!("benchmark gradient is valid: {e}"));
    black_box(grads.get(x).map(|g| g.len()));
    saved
}

pub(crate) fn case<T: Element>(shape: &[usize], budget: Budget, copy_gbps: f64) -> String {
    let mut rng = StdRng::seed_from_u64(0);
    let c = shape[1];
    let x = normal::<T>(shape, &mut rng);
    let dout = normal::<T>(shape, &mut rng);
    let (gamma, beta) = (Array1::<T>::ones(c), Array1::<T>::zeros(c));
    let inputs = || (x.clone(), gamma.clone(), beta.clone(), dout.clone());
    let elements = x.len();

    let fused_saved = pass::<T>(false, inputs());
    let fused = |i| {
        pass::<T>(false, i);
    };
    let (fused_us, composed_us, composed_saved) = if elements <= COMPOSED_MAX_ELEMENTS {
        let mut composed = |i| {
            pass::<T>(true, i);
        };
        let (fused_us, composed_us) = medians_us(budget, inputs, fused, Some(&mut composed));
        let saved = pass::<T>(true, inputs());
        let composed_us = composed_us.map_or("null".to_string(), |us| format!("{us:.1}"));
        (fused_us, composed_us, saved.to_string())
    } else {
        let (fused_us, _) = medians_us(budget, inputs, fused, None);
        (fused_us, "null".to_string(), "null".to_string())
    };
    let traffic_bound_us = 9.0 * (elements * std::mem::size_of::<T>()) as f64 / (copy_gbps * 1e9) * 1e6;
    eprintln!(
        "{:>4} {:<18} fused {:>10.1} us ({:>5.2} x traffic bound)   composed {:>10} us   saved bytes {} vs {}",
        T::NAME,
        format!("{shape:?}"),
        fused_us,
        fused_us / traffic_bound_us,
        composed_us,
        fused_saved,
        composed_saved
    );
    format!(
        "{{\"op\": \"batch_norm\", \"dtype\": \"{}\", \"shape\": {shape:?}, \"fused_us\": {fused_us:.1}, \"composed_us\": {composed_us}, \
         \"fused_saved_bytes\": {fused_saved}, \"composed_saved_bytes\": {composed_saved}, \"copy_gbps\": {copy_gbps:.2}, \
         \"traffic_bound_us\": {traffic_bound_us:.3}}}",
        T::NAME
    )
}
