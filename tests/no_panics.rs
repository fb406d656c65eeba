//! Hostile input never panics: the public API (tape ops, BatchNorm at its three levels, conv,
//! pooling and dropout, the layers and the loss, the optimizers, the golden reader, model files)
//! is driven with random shapes, empty ones included, and random values, NaN, ±inf, subnormals
//! and ±1e300 included. Every call must return `Ok` or `Err`; which one is not checked here (the
//! unit tests check the values).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::panic::{AssertUnwindSafe, catch_unwind};

use layers::{
    Activation, Adam, AvgPool2d, BatchNorm, Conv2d, Conv2dOptions, Dropout, Flatten, Linear, MaxPool2d, Mode,
    Module, Optimizer, Parameter, Sequential, Sgd, Window2d, accuracy, avg_pool2d, avg_pool2d_composed,
    batch_norm, batch_norm_composed, batchnorm_backward, batchnorm_forward, conv2d, conv2d_composed, dropout,
    dropout_composed, max_pool2d, max_pool2d_composed, softmax_cross_entropy, softmax_cross_entropy_composed,
};
use layers::{GroupNorm, LayerNorm, group_norm, group_norm_composed, layer_norm, layer_norm_composed};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use rand::SeedableRng;
use tape::{GradCheck, Tape};

/// Enough cases to reach the corners (each is small): about a second in release.
const CASES: u32 = 1000;

/// Values a hostile caller would send: the special ones, and ordinary numbers.
fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(0.0),
        1 => Just(-0.0),
        1 => Just(5e-324),
        1 => Just(-1e-310),
        1 => Just(1e300),
        1 => Just(-1e300),
        1 => Just(f64::MAX),
        6 => -10.0..10.0f64,
    ]
}

/// Shapes of rank 0 to `max_rank` with sizes 0 to 3.
fn shape(max_rank: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..4, 0..=max_rank)
}

/// Shapes asked for (reshape, broadcast): small ones, and sizes whose product overflows.
fn target_shape() -> impl Strategy<Value = Vec<usize>> {
    let size = prop_oneof![8 => 0usize..4, 1 => Just((1usize << 63) + 3), 1 => Just(usize::MAX)];
    prop::collection::vec(size, 0..=3)
}

/// Window settings a hostile caller would send: small ones, 0, and sizes that overflow.
fn setting() -> impl Strategy<Value = [usize; 2]> {
    let size = prop_oneof![8 => 0usize..4, 1 => Just(usize::MAX / 2), 1 => Just(usize::MAX)];
    [size.clone(), size]
}

/// An array of `shape` filled with `values`, repeated.
fn array(shape: &[usize], values: &[f64]) -> ArrayD<f64> {
    let len: usize = shape.iter().product();
    let data = (0..len).map(|i| values.get(i % values.len().max(1)).copied().unwrap_or(1.0));
    ArrayD::from_shape_vec(IxDyn(shape), data.collect()).unwrap()
}

/// Runs `f`, failing the case if it panics.
fn no_panic(what: &str, f: impl FnOnce()) -> Result<(), TestCaseError> {
    prop_assert!(catch_unwind(AssertUnwindSafe(f)).is_ok(), "{} panicked", what);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn tape_ops_return_ok_or_err(
        (a, b, new_shape) in (shape(3), shape(3), target_shape()),
        values in prop::collection::vec(value(), 1..8),
        axes in prop::collection::vec(0usize..4, 0..3),
        keep_dims in any::<bool>(),
        scalar in value(),
    ) {
        no_panic("tape ops", || {
            let tape = Tape::<f64>::new();
            let (x, y) = (tape.var(array(&a, &values)), tape.var(array(&b, &values[1..])));
            let mut outputs = vec![x.exp(), x.ln(), x.sqrt(), x.abs(), x.relu(), x.sigmoid(), x.tanh()];
            outputs.extend([x.powf(scalar), x.powi(-3), x.div_scalar(scalar), x.scalar_div(scalar)]);
            outputs.extend([x.mul_scalar(scalar), x.add_scalar(scalar), x.negate(), x.sum(), x.mean()]);
            for result in [
                x.try_add(y), x.try_sub(y), x.try_mul(y), x.try_div(y), x.matmul(y), x.transpose(),
                x.reshape(&new_shape), x.broadcast_to(&new_shape), x.sum_axes(&axes, keep_dims),
                x.mean_axes(&axes, keep_dims), x.max_axis(axes.first().copied().unwrap_or(0), keep_dims),
            ] {
                outputs.extend(result);
            }
            for output in outputs {
                let _ = output.try_scalar();
                let _ = output.backward();
                let _ = output.backward_with(array(&output.shape(), &values));
                let _ = output.backward_with(array(&b, &values));
            }
            let _ = tape::sum_to_shape(array(&a, &values), &b);
            let _ = tape::broadcast_shape("test", &a, &b);
            let _ = tape.to_dot();
        })?;
    }

    #[test]
    fn batch_norm_returns_ok_or_err_at_every_level(
        x_shape in shape(5),
        gamma_len in 0usize..5,
        values in prop::collection::vec(value(), 1..8),
        eps in value(),
        momentum in prop::option::of(value()),
        flags in (any::<bool>(), any::<bool>()),
    ) {
        no_panic("BatchNorm", || {
            let x = array(&x_shape, &values);
            let gamma = array(&[gamma_len], &values).into_dimensionality::<ndarray::Ix1>().unwrap();
            let beta = gamma.mapv(|v| -v);
            if let Ok((out, cache)) = batchnorm_forward(&x, &gamma, &beta, eps) {
                let _ = batchnorm_backward(&out, &cache);
                let _ = batchnorm_backward(&array(&[2, 1], &values), &cache);
            }
            let tape = Tape::<f64>::new();
            let (vx, vg, vb) = (tape.var(x.clone()), tape.var(gamma.clone()), tape.var(beta.clone()));
            for y in [batch_norm(vx, vg, vb, eps), batch_norm_composed(vx, vg, vb, eps)].into_iter().flatten() {
                let _ = y.backward_with(array(&x_shape, &values[1..]));
            }
            let channels = x_shape.get(1).copied().unwrap_or(gamma_len);
            if let Ok(mut layer) = BatchNorm::<f64>::with_options(channels, eps, momentum, flags.0, flags.1) {
                for mode in [Mode::Train, Mode::Eval, Mode::Train] {
                    if let Ok(y) = layer.forward(tape.var(x.clone()), mode) {
                        let _ = y.backward_with(array(&x_shape, &values));
                    }
                }
                let mut state = layer.state_dict();
                for value in state.values_mut() {
                    value.iter_mut().zip(values.iter().cycle()).for_each(|(v, &new)| *v = new);
                }
                let _ = layer.load_state_dict(&state, true);
                let _ = layer.load_state_dict(&state, false);
                layer.running_var = gamma.clone();
                let _ = layer.forward(tape.var(x.clone()), Mode::Eval);
            }
        })?;
    }

    #[test]
    fn conv_pooling_and_dropout_return_ok_or_err(
        (x_shape, w_shape, b_shape) in (shape(5), shape(5), shape(2)),
        values in prop::collection::vec(value(), 1..8),
        (kernel, stride, padding, dilation) in (setting(), setting(), setting(), setting()),
        groups in prop_oneof![4 => 0usize..4, 1 => Just(usize::MAX)],
        p in value(),
    ) {
        no_panic("conv, pooling, dropout", || {
            let tape = Tape::<f64>::new();
            let (x, w) = (tape.var(array(&x_shape, &values)), tape.var(array(&w_shape, &values[1..])));
            let b = tape.var(array(&b_shape, &values));
            let options = Conv2dOptions { stride, padding, dilation, groups };
            let window = Window2d { kernel, stride, padding, dilation };
            let mut outputs = Vec::new();
            for bias in [None, Some(b)] {
                outputs.extend(conv2d(x, w, bias, options).ok());
                outputs.extend(conv2d_composed(x, w, bias, options).ok());
            }
            for pool in [max_pool2d, max_pool2d_composed, avg_pool2d, avg_pool2d_composed] {
                outputs.extend(pool(x, window).ok());
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            outputs.extend(dropout(x, p, &mut rng).ok());
            outputs.extend(dropout_composed(x, p, &mut rng).ok());
            outputs.extend(x.unfold(window).ok());
            outputs.extend(x.flatten().ok());
            for (weight, bias) in [(None, None), (Some(w), Some(b)), (Some(b), None)] {
                outputs.extend(layer_norm(x, &w_shape, weight, bias, p).ok());
                outputs.extend(layer_norm_composed(x, &w_shape, weight, bias, p).ok());
                outputs.extend(group_norm(x, groups, weight, bias, p).ok());
                outputs.extend(group_norm_composed(x, groups, weight, bias, p).ok());
            }
            for output in outputs {
                let _ = output.backward_with(array(&output.shape(), &values));
                let _ = output.backward_with(array(&x_shape, &values));
            }
            let channels = |i: usize| x_shape.get(i).copied().unwrap_or(1);
            let mut layers: Vec<Box<dyn Module<f64>>> = vec![
                Box::new(MaxPool2d::with_window(window)),
                Box::new(AvgPool2d::new(kernel)),
                Box::new(Flatten),
            ];
            layers.extend(Dropout::new(p, 0).ok().map(|d| Box::new(d) as _));
            layers.extend(LayerNorm::with_options(&w_shape, p, true).ok().map(|l| Box::new(l) as _));
            layers.extend(GroupNorm::with_options(groups, channels(1), p, false).ok().map(|g| Box::new(g) as _));
            layers.extend(
                Conv2d::with_options(channels(1), channels(0), kernel, options, true, &mut rng)
                    .ok()
                    .filter(|_| kernel.iter().chain(&[channels(0), channels(1)]).all(|&k| k < 8))
                    .map(|c| Box::new(c) as _),
            );
            for layer in &mut layers {
                for mode in [Mode::Train, Mode::Eval] {
                    if let Ok(y) = layer.forward(x, mode) {
                        let _ = y.backward_with(array(&y.shape(), &values));
                    }
                }
            }
        })?;
    }

    #[test]
    fn layers_losses_and_optimizers_return_ok_or_err(
        (x_shape, weight_shape) in (shape(3), shape(3)),
        (inputs, outputs) in (0usize..4, 0usize..4),
        values in prop::collection::vec(value(), 1..8),
        labels in prop::collection::vec(0usize..5, 0..5),
        settings in (value(), value(), value(), value()),
    ) {
        no_panic("layers, losses, optimizers", || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            let mut linear = Linear::<f64>::new(inputs, outputs, &mut rng);
            let mut net = Sequential::<f64>::new()
                .push(Linear::new(inputs, outputs, &mut rng))
                .push(Activation::Relu)
                .push(BatchNorm::new(outputs));
            let tape = Tape::<f64>::new();
            let x = tape.constant(array(&x_shape, &values));
            for mode in [Mode::Train, Mode::Eval] {
                let _ = net.forward(x, mode);
                let _ = linear.forward(x, mode);
            }
            let logits = array(&x_shape, &values);
            let _ = accuracy(&logits, &labels);
            let z = tape.var(logits);
            for loss in [softmax_cross_entropy(z, &labels), softmax_cross_entropy_composed(z, &labels)]
                .into_iter()
                .flatten()
            {
                let _ = loss.backward();
            }
            linear.weight.value = array(&weight_shape, &values);
            let _ = linear.forward(x, Mode::Train);

            let (lr, momentum, beta1, beta2) = settings;
            let mut optimizers: Vec<Box<dyn Optimizer<f64>>> = Vec::new();
            optimizers.extend(Sgd::new(lr, momentum).ok().map(|o| Box::new(o) as Box<dyn Optimizer<f64>>));
            optimizers.extend(Adam::with_options(lr, beta1, beta2, momentum).ok().map(|o| Box::new(o) as _));
            optimizers.push(Box::new(Sgd::new(0.1, 0.9).unwrap()));
            let mut a = Parameter::new(array(&x_shape, &values));
            let mut b = Parameter::new(array(&weight_shape, &values));
            for opt in &mut optimizers {
                let tape = Tape::new();
                let loss = a.bind(&tape).sum().try_mul(b.bind(&tape).sum());
                if let Ok(grads) = loss.map(|loss| loss.backward()) {
                    let grads = grads.unwrap();
                    let _ = opt.step(vec![&mut a, &mut b], &grads);
                    let _ = opt.step(vec![&mut b, &mut a], &grads);
                    let _ = opt.step(vec![&mut a], &grads);
                    a.value = array(&weight_shape, &values);
                    let _ = opt.step(vec![&mut a, &mut b], &grads);
                }
            }
            let check = GradCheck { step: settings.0, atol: settings.1, rtol: settings.2, seed: 0 };
            let _ = check.run(|_, v| Ok(v[0].tanh()), &[array(&x_shape, &values)]);
        })?;
    }

    #[test]
    fn model_files_load_or_fail_for_any_bytes(
        at in any::<prop::sample::Index>(),
        cut in 0usize..64,
        insert in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        // A real model file with bytes cut out somewhere and others put in.
        let bytes = include_bytes!("data/pytorch_cnn_bn.safetensors");
        let start = at.index(bytes.len());
        let end = (start + cut).min(bytes.len());
        let mut mutated = bytes[..start].to_vec();
        mutated.extend(&insert);
        mutated.extend(&bytes[end..]);
        let path = std::env::temp_dir().join(format!("bnorm-mutated-{}.safetensors", std::process::id()));
        std::fs::write(&path, &mutated).unwrap();
        no_panic("model files", || {
            let _ = layers::files::load_safetensors::<f32>(&path);
            let mut net = bnorm::models::Model::Cnn.build::<f64>(bnorm::models::Norm::Batch, 0);
            let _ = net.load_safetensors(&path);
        })?;
    }

    #[test]
    fn the_golden_reader_returns_ok_or_err_for_any_shape(
        occurrence in 0usize..200,
        shape in prop::collection::vec(
            prop_oneof![Just("0"), Just("1"), Just("3"), Just("-2"), Just("1.5"), Just("9223372036854775811"),
                        Just("18446744073709551615"), Just("18446744073709551616")],
            0..4,
        ),
    ) {
        // A real file with the shape of one of its arrays replaced.
        let text = FILES[occurrence % FILES.len()];
        let starts: Vec<usize> = text.match_indices("\"shape\": [").map(|(i, m)| i + m.len()).collect();
        let start = starts[occurrence % starts.len()];
        let end = start + text[start..].find(']').unwrap();
        let mutated = format!("{}{}{}", &text[..start], shape.join(", "), &text[end..]);
        no_panic("golden reader", || read_and_check(&mutated))?;
    }

    #[test]
    fn the_golden_reader_returns_ok_or_err(
        at in any::<prop::sample::Index>(),
        cut in 0usize..40,
        insert in prop::sample::select(vec![
            "", "-1", "1e400", "9223372036854775811", "[]", "{}", "null", "\"x\"", "[[", "]", ",", "0.5",
            "18446744073709551616", "[9223372036854775811, 2]",
        ]),
    ) {
        // A real file with up to 40 bytes cut out somewhere and something else put in.
        let text = FILES[at.index(FILES.len())];
        let start = floor_boundary(text, at.index(text.len()));
        let end = floor_boundary(text, (start + cut).min(text.len()));
        let mutated = format!("{}{insert}{}", &text[..start], &text[end..]);
        no_panic("golden reader", || read_and_check(&mutated))?;
    }
}

/// The golden files, each of its own kinds.
const FILES: [&str; 4] = [
    include_str!("data/pytorch_batchnorm.json"),
    include_str!("data/pytorch_conv_pool.json"),
    include_str!("data/pytorch_layer_group_norm.json"),
    include_str!("data/pytorch_batchnorm_double_backward.json"),
];

/// Parses a golden file and checks every case it accepts, in f64 and in f32.
fn read_and_check(text: &str) {
    if let Ok(cases) = bnorm::golden::parse(text) {
        for case in &cases {
            let _ = bnorm::golden::check_case::<f64>(case);
            let _ = bnorm::golden::check_case::<f32>(case);
        }
    }
}

/// The largest char boundary of `text` at or below `index`.
fn floor_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}
