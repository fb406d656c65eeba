//! The training loop on the bundled digits: settings checked, runs reproducible.

use super::*;
use layers::datasets::digits;

fn data() -> (Dataset, Dataset) {
    let data = digits::load_bundled().unwrap();
    let (train, test) = digits::split(&data, 0.2, 0).unwrap();
    let scaler = digits::Standardizer::fit(&train);
    (scaler.apply(&train), scaler.apply(&test))
}

fn config(batchnorm: bool) -> RunConfig {
    RunConfig {
        name: "test".into(),
        model: Model::Mlp,
        norm: if batchnorm { Norm::Batch } else { Norm::None },
        learning_rate: 0.05,
        schedule: Schedule::Constant,
        clip_norm: None,
        steps: 60,
        batch_size: 32,
        seed: 3,
        eval_every: 20,
        input_grad_penalty: None,
    }
}

#[test]
fn schedules_warm_up_then_anneal_to_zero() {
    let config = RunConfig {
        steps: 1000,
        learning_rate: 1.0,
        schedule: Schedule::WarmupCosine { warmup: 100 },
        ..config(true)
    };
    let rates = config.learning_rates().unwrap();
    assert!((rates.lr(0) - 0.1).abs() < 1e-12);
    assert!((rates.lr(50) - 0.55).abs() < 1e-12);
    assert_eq!(rates.lr(100), 1.0);
    assert!((rates.lr(550) - 0.5).abs() < 1e-12, "half way through the cosine");
    assert!(rates.lr(999) < 1e-4 && rates.lr(999) > 0.0);
    let no_warmup = RunConfig {
        schedule: Schedule::WarmupCosine { warmup: 0 },
        ..config.clone()
    };
    assert_eq!(no_warmup.learning_rates().unwrap().lr(0), 1.0);
    let constant = RunConfig {
        schedule: Schedule::Constant,
        ..config
    };
    let rates = constant.learning_rates().unwrap();
    assert!((0..1000).all(|t| rates.lr(t) == 1.0));
}

#[test]
fn clipping_bounds_the_step_and_layernorm_learns() {
    // At lr 1 the plain MLP's first steps overshoot; clipped to norm 1 they stay bounded.
    let (train, test) = data();
    let clipped = RunConfig {
        norm: Norm::Layer,
        clip_norm: Some(1.0),
        ..config(false)
    };
    let result = run(&clipped, &train, &test, |_, _| {}).unwrap();
    assert!(
        result.final_test_accuracy() > result.curve[0].1 + 0.3,
        "{:?}",
        result.curve
    );
    assert!(result.state.contains_key("1.weight") && result.file_name().starts_with("mlp-ln-"));
    let bad = RunConfig {
        clip_norm: Some(0.0),
        ..clipped
    };
    assert_eq!(
        run(&bad, &train, &test, |_, _| {}).unwrap_err().to_string(),
        "clip_norm must be a finite number > 0, got 0"
    );
}

#[test]
fn bad_settings_are_errors_before_any_step() {
    // eval_every = 0 divided by zero, a batch larger than the data sliced past its end.
    let (train, test) = data();
    let cases = [
        (
            RunConfig {
                eval_every: 0,
                ..config(true)
            },
            "eval_every must be at least 1, got 0",
        ),
        (
            RunConfig {
                steps: 0,
                ..config(true)
            },
            "steps must be at least 1, got 0",
        ),
        (
            RunConfig {
                batch_size: 0,
                ..config(true)
            },
            "batch_size must be at least 1, got 0",
        ),
        (
            RunConfig {
                batch_size: 5000,
                ..config(true)
            },
            "batch_size must be at most the 1438 training images, got 5000",
        ),
        (
            RunConfig {
                learning_rate: f64::NAN,
                ..config(true)
            },
            "learning_rate must be a finite number >= 0, got NaN",
        ),
    ];
    for (bad, message) in cases {
        let mut steps = 0;
        let error = run(&bad, &train, &test, |_, _| steps += 1).unwrap_err();
        assert_eq!((error.to_string(), steps), (message.to_string(), 0));
    }
}

#[test]
fn a_net_that_diverges_stops_and_says_where() {
    // At lr 1e38 the f32 weights overflow and the loss turns NaN; the accuracy of NaN logits
    // used to print as the share of label 0.
    let (train, test) = data();
    let wild = RunConfig {
        name: "wild".into(),
        learning_rate: 1e38,
        ..config(false)
    };
    let mut steps = 0;
    let result = run(&wild, &train, &test, |_, _| steps += 1).unwrap();
    let at = result.diverged_at.expect("the run diverges");
    assert!(at <= 60 && steps == at - 1, "{at}, {steps}");
    assert!(result.curve.iter().all(|&(step, _)| step < at));
}

#[test]
fn a_run_is_deterministic_and_learns() {
    let (train, test) = data();
    assert_eq!((train.len(), test.len()), (1438, 359));
    for (model, batchnorm) in [
        (Model::Mlp, false),
        (Model::Mlp, true),
        (Model::Cnn, false),
        (Model::Cnn, true),
    ] {
        let config = RunConfig {
            model,
            ..config(batchnorm)
        };
        let first = run(&config, &train, &test, |_, _| {}).unwrap();
        let second = run(&config, &train, &test, |_, _| {}).unwrap();
        assert_eq!(first.curve, second.curve, "same seed, same numbers");
        assert_eq!(first.losses, second.losses);
        assert_eq!(first.curve.len(), 4);
        assert_eq!(first.diverged_at, None);
        // In 60 steps the BatchNorm nets and the CNN learn; a deep sigmoid net without
        // BatchNorm barely moves.
        if batchnorm || model == Model::Cnn {
            assert!(
                first.final_test_accuracy() > first.curve[0].1 + 0.3,
                "{:?}",
                first.curve
            );
        }
    }
    let summary = summary_json(&[run(&config(true), &train, &test, |_, _| {}).unwrap()]);
    let keys: Vec<&String> = summary["runs"][0].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 14);
    assert!(summary["runs"][0]["input_grad_penalty"].is_null());
    assert!(summary["runs"][0]["input_grad_norm"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["runs"][0]["norm"], "batch");
    assert_eq!(summary["runs"][0]["schedule"], "constant");
    assert_eq!(summary["runs"][0]["model"], "mlp");
    assert!(summary["runs"][0]["steps_to_90"].is_null() || summary["runs"][0]["steps_to_90"].is_u64());
}

#[test]
fn a_gradient_penalty_trains_end_to_end_and_smooths_the_net() {
    let (train, test) = data();
    let plain = RunConfig {
        steps: 200,
        ..config(true)
    };
    let penalized = RunConfig {
        input_grad_penalty: Some(300.0),
        ..plain.clone()
    };
    let plain = run(&plain, &train, &test, |_, _| {}).unwrap();
    let result = run(&penalized, &train, &test, |_, _| {}).unwrap();
    assert!(result.diverged_at.is_none());
    assert!(
        result.final_test_accuracy() > 0.75,
        "{}",
        result.final_test_accuracy()
    );
    assert!(
        result.input_grad_norm < 0.8 * plain.input_grad_norm,
        "{} vs {}",
        result.input_grad_norm,
        plain.input_grad_norm
    );
    assert!(result.file_name().ends_with("-gp300.safetensors"));
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let config = RunConfig {
            input_grad_penalty: Some(bad),
            ..config(true)
        };
        let error = run(&config, &train, &test, |_, _| {}).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("input_grad_penalty must be a finite number > 0")
        );
    }
}
