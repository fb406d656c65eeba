//! A model and its optimizer saved in one file: training resumed from it takes exactly the steps
//! that training without a stop takes.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use layers::files::{load_checkpoint, save_checkpoint};
use layers::prelude::*;
use layers::{AdamW, StateDict};

fn net(seed: u64) -> Sequential<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    Sequential::new()
        .push(Linear::new(2, 8, &mut rng))
        .push(BatchNorm::new(8))
        .push(Activation::Tanh)
        .push(Linear::new(8, 2, &mut rng))
}

fn train(net: &mut Sequential<f64>, opt: &mut impl Optimizer<f64>, steps: usize) {
    let x = array![
        [0.0, 0.0],
        [0.0, 1.0],
        [1.0, 0.0],
        [1.0, 1.0],
        [0.5, 0.2],
        [0.1, 0.9]
    ];
    let labels = [0, 1, 1, 0, 1, 0];
    for _ in 0..steps {
        let tape = Tape::new();
        let logits = net.forward(tape.constant(x.clone()), Mode::Train).unwrap();
        let grads = softmax_cross_entropy(logits, &labels)
            .unwrap()
            .backward()
            .unwrap();
        opt.step(net.parameters_mut(), &grads).unwrap();
    }
}

/// Ten steps straight, and five, a save, a load into a fresh net and optimizer, and five more.
fn both<O: Optimizer<f64>>(make: impl Fn() -> O, name: &str) -> [(StateDict<f64>, StateDict<f64>); 2] {
    let (mut straight, mut opt) = (net(1), make());
    train(&mut straight, &mut opt, 10);
    let path = std::env::temp_dir().join(format!(
        "bnorm-checkpoint-{name}-{}.safetensors",
        std::process::id()
    ));
    let (mut first, mut first_opt) = (net(1), make());
    train(&mut first, &mut first_opt, 5);
    save_checkpoint(&first, &first_opt, &Default::default(), &path).unwrap();
    let (mut resumed, mut resumed_opt) = (net(2), make());
    load_checkpoint(&mut resumed, &mut resumed_opt, &path).unwrap();
    train(&mut resumed, &mut resumed_opt, 5);
    std::fs::remove_file(&path).unwrap();
    [
        (straight.state_dict(), opt.state_dict()),
        (resumed.state_dict(), resumed_opt.state_dict()),
    ]
}

#[test]
fn resumed_training_takes_the_same_steps_as_training_without_a_stop() {
    let [straight, resumed] = both(
        || Sgd::new(0.1, 0.9).unwrap().with_weight_decay(0.01).unwrap(),
        "sgd",
    );
    assert_eq!(straight, resumed, "SGD with momentum and weight decay");
    assert!(straight.1.contains_key("state.0.momentum_buffer"));
    let [straight, resumed] = both(|| Adam::new(0.01).unwrap(), "adam");
    assert_eq!(straight, resumed, "Adam");
    assert_eq!(straight.1["state.3.step"], ndarray::arr0(10.0).into_dyn());
    let [straight, resumed] = both(|| AdamW::new(0.01, 0.1).unwrap(), "adamw");
    assert_eq!(straight, resumed, "AdamW");
}

#[test]
fn a_checkpoint_of_another_optimizer_is_an_error_that_changes_nothing() {
    let path = std::env::temp_dir().join(format!(
        "bnorm-checkpoint-mixed-{}.safetensors",
        std::process::id()
    ));
    let (mut trained, mut sgd) = (net(1), Sgd::new(0.1, 0.9).unwrap());
    train(&mut trained, &mut sgd, 3);
    save_checkpoint(&trained, &sgd, &Default::default(), &path).unwrap();
    let (mut fresh, mut adam) = (net(2), Adam::new(0.01).unwrap());
    let before = (fresh.state_dict(), adam.state_dict());
    let error = load_checkpoint(&mut fresh, &mut adam, &path)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("state dict has \"state.0.momentum_buffer\""),
        "{error}"
    );
    assert_eq!((fresh.state_dict(), adam.state_dict()), before);
    // A model file without optimizer state loads into a fresh optimizer (it starts from zero).
    fresh.save_safetensors(&path).unwrap();
    load_checkpoint(&mut trained, &mut adam, &path).unwrap();
    assert_eq!(trained.state_dict(), fresh.state_dict());
    std::fs::remove_file(&path).unwrap();
}
