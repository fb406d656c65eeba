//! Evaluation on a `Tape::no_grad()`: the same outputs as on a recording tape, and nothing kept
//! for backward, fused nodes' saved statistics included.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use layers::prelude::*;

#[test]
fn a_net_evaluates_the_same_without_a_record() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut net = Sequential::<f32>::new()
        .push(Conv2d::new(1, 4, [3, 3], &mut rng))
        .push(BatchNorm::new(4))
        .push(Activation::Relu)
        .push(GroupNorm::new(2, 4).unwrap())
        .push(MaxPool2d::new([2, 2]))
        .push(Flatten)
        .push(Linear::new(4 * 3 * 3, 8, &mut rng))
        .push(LayerNorm::new(&[8]).unwrap())
        .push(Linear::new(8, 3, &mut rng));
    let x = ArrayD::from_shape_fn(ndarray::IxDyn(&[5, 1, 8, 8]), |i| {
        ((i[0] * 7 + i[2] * i[3]) % 11) as f32 * 0.3
    });
    // One training step first, so the running statistics are not the initial ones.
    let tape = Tape::new();
    let loss = softmax_cross_entropy(
        net.forward(tape.constant(x.clone()), Mode::Train).unwrap(),
        &[0, 1, 2, 0, 1],
    )
    .unwrap();
    loss.backward().unwrap();

    let recorded = Tape::new();
    let expected = net.forward(recorded.constant(x.clone()), Mode::Eval).unwrap();
    assert!(recorded.saved_bytes() > 0);
    let tape = Tape::no_grad();
    let logits = net.forward(tape.constant(x), Mode::Eval).unwrap();
    assert_eq!(logits.value(), expected.value());
    assert_eq!(tape.saved_bytes(), 0);
    assert!(matches!(
        logits.sum().backward(),
        Err(tape::TapeError::NotRecorded)
    ));
}
