//! State dicts under PyTorch's names, for every layer and for `Sequential`: the keys and shapes,
//! round trips, and loads that fail changing nothing.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use layers::StateDict;
use layers::prelude::*;
use ndarray::ArrayD;

fn cnn(seed: u64, bias: bool) -> Sequential<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let same = Conv2dOptions::default().with_padding([1, 1]);
    Sequential::new()
        .push(Conv2d::with_options(1, 4, [3, 3], same, bias, &mut rng).unwrap())
        .push(BatchNorm::new(4))
        .push(Activation::Relu)
        .push(MaxPool2d::new([2, 2]))
        .push(Dropout::new(0.5, 3).unwrap())
        .push(Flatten)
        .push(Linear::new(4 * 2 * 2, 3, &mut rng))
}

fn shapes(dict: &StateDict<f64>) -> Vec<(String, Vec<usize>)> {
    dict.iter()
        .map(|(key, value)| (key.clone(), value.shape().to_vec()))
        .collect()
}

#[test]
fn sequential_keys_and_shapes_follow_pytorch() {
    let expected: Vec<(String, Vec<usize>)> = [
        ("0.bias", vec![4]),
        ("0.weight", vec![4, 1, 3, 3]),
        ("1.bias", vec![4]),
        ("1.num_batches_tracked", vec![]),
        ("1.running_mean", vec![4]),
        ("1.running_var", vec![4]),
        ("1.weight", vec![4]),
        ("6.bias", vec![3]),
        ("6.weight", vec![3, 16]),
    ]
    .into_iter()
    .map(|(key, shape)| (key.to_string(), shape))
    .collect();
    assert_eq!(shapes(&cnn(0, true).state_dict()), expected);
    let without_bias = shapes(&cnn(0, false).state_dict());
    assert!(!without_bias.iter().any(|(key, _)| key == "0.bias"));
    assert_eq!(without_bias.len(), expected.len() - 1);
}

#[test]
fn a_loaded_net_computes_what_the_saved_one_did() {
    let x = ArrayD::from_shape_fn(vec![5, 1, 4, 4], |i| {
        ((i[0] * 16 + i[2] * 4 + i[3]) % 7) as f64 - 3.0
    });
    let mut trained = cnn(1, true);
    // A training step changes the running statistics and the batch count.
    let tape = Tape::new();
    trained.forward(tape.constant(x.clone()), Mode::Train).unwrap();
    let mut loaded = cnn(2, true);
    assert_ne!(loaded.state_dict(), trained.state_dict());
    loaded.load_state_dict(&trained.state_dict(), true).unwrap();
    assert_eq!(loaded.state_dict(), trained.state_dict());
    let eval = |net: &mut Sequential<f64>| {
        let tape = Tape::new();
        net.forward(tape.constant(x.clone()), Mode::Eval)
            .unwrap()
            .value()
            .as_ref()
            .clone()
    };
    assert_eq!(eval(&mut loaded), eval(&mut trained));
}

#[test]
fn bad_dicts_are_errors_that_change_nothing() {
    let mut net = cnn(1, true);
    let before = net.state_dict();
    let good = cnn(2, true).state_dict();
    let mut load =
        |dict: &StateDict<f64>, strict: bool| net.load_state_dict(dict, strict).map_err(|e| e.to_string());

    let mut missing = good.clone();
    missing.remove("6.bias");
    assert!(
        load(&missing, false)
            .unwrap_err()
            .starts_with("state dict has no \"6.bias\"; expected keys")
    );

    // The last layer's shape is wrong: the earlier layers, which are fine, must not be loaded.
    let mut wrong = good.clone();
    wrong.insert("6.weight".into(), ArrayD::zeros(vec![16, 3]));
    assert_eq!(
        load(&wrong, true).unwrap_err(),
        "state dict's \"6.weight\" has shape [16, 3], expected [3, 16]"
    );

    let mut extra = good.clone();
    extra.insert("7.weight".into(), ArrayD::zeros(vec![2]));
    assert!(
        load(&extra, true)
            .unwrap_err()
            .starts_with("state dict has \"7.weight\", which the layer does not have")
    );

    // A value only BatchNorm checks: a count that is not a whole number.
    let mut count = good.clone();
    count.insert("1.num_batches_tracked".into(), ndarray::arr0(2.5).into_dyn());
    assert_eq!(
        load(&count, true).unwrap_err(),
        "num_batches_tracked must be a whole number in [0, 2^64), got 2.5"
    );
    assert_eq!(
        net.state_dict(),
        before,
        "every failed load left the net as it was"
    );

    // Without strict, keys the net does not have are ignored.
    net.load_state_dict(&extra, false).unwrap();
    assert_eq!(net.state_dict(), good);
}

#[test]
fn layers_without_state_have_empty_dicts() {
    let layers: Vec<Box<dyn Module<f64>>> = vec![
        Box::new(Activation::Relu),
        Box::new(MaxPool2d::new([2, 2])),
        Box::new(AvgPool2d::new([2, 2])),
        Box::new(Flatten),
        Box::new(Dropout::new(0.1, 0).unwrap()),
    ];
    let mut extra = StateDict::new();
    extra.insert("weight".to_string(), ArrayD::zeros(vec![1]));
    for mut layer in layers {
        assert!(layer.state_dict().is_empty(), "{}", layer.describe());
        layer.load_state_dict(&StateDict::new(), true).unwrap();
        layer.load_state_dict(&extra, false).unwrap();
        assert!(
            layer.load_state_dict(&extra, true).is_err(),
            "{}",
            layer.describe()
        );
    }
}

#[test]
fn any_layer_saves_and_loads_a_file_converting_between_f64_and_f32() {
    let path = std::env::temp_dir().join(format!("bnorm-conv-{}.safetensors", std::process::id()));
    let mut rng = StdRng::seed_from_u64(5);
    let conv = Conv2d::<f64>::new(2, 3, [3, 3], &mut rng);
    conv.save_safetensors(&path).unwrap();
    let mut narrow = Conv2d::<f32>::new(2, 3, [3, 3], &mut rng);
    let metadata = narrow.load_safetensors(&path).unwrap();
    assert!(metadata.is_empty(), "a lone layer has no architecture to record");
    // f64 to f32 rounds to nearest.
    assert_eq!(narrow.weight.value, conv.weight.value.mapv(|w| w as f32));
    let mut wrong = Linear::<f32>::new(2, 3, &mut rng);
    let error = wrong.load_safetensors(&path).unwrap_err().to_string();
    assert_eq!(
        error,
        "state dict's \"weight\" has shape [3, 2, 3, 3], expected [3, 2]"
    );
    std::fs::remove_file(&path).unwrap();
}
