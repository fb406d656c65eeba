use ndarray::{Array4, ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::testing::uniform;
use crate::{Tape, check_gradients};

/// `im2col` by its definition, one value at a time: the value at tap `(i, j)` of channel `c` for
/// output position `(oh, ow)`, or `pad` where that falls in the padding.
fn naive_columns(image: &[f64], [c, h, w]: [usize; 3], window: &Window2d, pad: f64) -> Vec<f64> {
    let [oh, ow] = window.output_size("test", &[1, c, h, w]).unwrap();
    let [kh, kw] = window.kernel;
    let mut cols = Vec::new();
    for ch in 0..c {
        for i in 0..kh {
            for j in 0..kw {
                for y in 0..oh {
                    for x in 0..ow {
                        let row = (y * window.stride[0] + i * window.dilation[0]) as isize
                            - window.padding[0] as isize;
                        let col = (x * window.stride[1] + j * window.dilation[1]) as isize
                            - window.padding[1] as isize;
                        let inside = (0..h as isize).contains(&row) && (0..w as isize).contains(&col);
                        cols.push(if inside {
                            image[(ch * h + row as usize) * w + col as usize]
                        } else {
                            pad
                        });
                    }
                }
            }
        }
    }
    cols
}

fn random_window(rng: &mut StdRng) -> Window2d {
    let mut pick =
        |range: std::ops::RangeInclusive<usize>| [rng.random_range(range.clone()), rng.random_range(range)];
    Window2d {
        kernel: pick(1..=4),
        stride: pick(1..=3),
        padding: pick(0..=2),
        dilation: pick(1..=3),
    }
}

#[test]
fn im2col_takes_every_tap_of_every_window_and_col2im_is_its_adjoint() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut checked = 0;
    while checked < 300 {
        let window = random_window(&mut rng);
        let chw = [
            rng.random_range(1..=3),
            rng.random_range(0..=9),
            rng.random_range(0..=9),
        ];
        let Ok([oh, ow]) = window.output_size("test", &[1, chw[0], chw[1], chw[2]]) else {
            continue;
        };
        let image: Vec<f64> = (0..chw.iter().product())
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let rows = chw[0] * window.kernel[0] * window.kernel[1];
        let mut cols = vec![f64::NAN; rows * oh * ow];
        im2col(&image, chw, &window, -7.5, &mut cols).unwrap();
        assert_eq!(
            cols,
            naive_columns(&image, chw, &window, -7.5),
            "{window:?} {chw:?}"
        );

        // <im2col(x), c> = <x, col2im(c)> for zero padding: col2im moves values back.
        let upstream: Vec<f64> = (0..cols.len()).map(|_| rng.random_range(-2.0..2.0)).collect();
        im2col(&image, chw, &window, 0.0, &mut cols).unwrap();
        let mut folded = vec![0.0; image.len()];
        col2im_add(&upstream, chw, &window, &mut folded).unwrap();
        let lhs: f64 = cols.iter().zip(&upstream).map(|(a, b)| a * b).sum();
        let rhs: f64 = image.iter().zip(&folded).map(|(a, b)| a * b).sum();
        assert!(
            (lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()),
            "{window:?} {chw:?}: {lhs} vs {rhs}"
        );
        checked += 1;
    }
}

#[test]
fn unfold_passes_the_gradient_checker() {
    for window in [
        Window2d::new([3, 3]).with_padding([1, 1]),
        Window2d::new([2, 3]).with_stride([2, 1]).with_dilation([1, 2]),
        Window2d::new([1, 1]),
    ] {
        check_gradients(|_, v| v[0].unfold(window), &[uniform(&[2, 2, 5, 6], 3)]).unwrap();
        check_gradients(
            |_, v| v[0].unfold_with_pad(window, 0.5),
            &[uniform(&[1, 3, 4, 6], 4)],
        )
        .unwrap();
    }
}

#[test]
fn unfold_lays_out_columns_as_pytorch_does() {
    // F.unfold(torch.arange(16.).reshape(1, 1, 4, 4), 2, stride=2): the four taps of the four
    // non-overlapping 2x2 blocks.
    let tape = Tape::<f32>::new();
    let x = tape.var(Array4::from_shape_fn((1, 1, 4, 4), |(_, _, h, w)| {
        (4 * h + w) as f32
    }));
    let cols = x.unfold(Window2d::new([2, 2]).with_stride([2, 2])).unwrap();
    let expected = ArrayD::from_shape_vec(
        IxDyn(&[1, 4, 4]),
        vec![
            0.0, 2.0, 8.0, 10.0, 1.0, 3.0, 9.0, 11.0, 4.0, 6.0, 12.0, 14.0, 5.0, 7.0, 13.0, 15.0,
        ],
    )
    .unwrap();
    assert_eq!(*cols.value(), expected);
    // Each input value is in exactly one window, so the gradient of the sum is all ones.
    let grads = cols.sum().backward().unwrap();
    assert_eq!(
        grads.wrt(x).unwrap(),
        &ArrayD::from_elem(IxDyn(&[1, 1, 4, 4]), 1.0f32)
    );
}

#[test]
fn bad_windows_are_errors_that_say_why() {
    let tape = Tape::<f64>::new();
    let x = tape.var(uniform(&[1, 2, 4, 4], 0));
    assert_eq!(
        x.unfold(Window2d::new([3, 3]).with_stride([0, 1]))
            .unwrap_err()
            .to_string(),
        "unfold: the stride must be at least 1 in each dimension, got [0, 1]"
    );
    assert_eq!(
        x.unfold(Window2d::new([0, 2])).unwrap_err().to_string(),
        "unfold: the kernel size must be at least 1 in each dimension, got [0, 2]"
    );
    assert_eq!(
        x.unfold(Window2d::new([3, 3]).with_dilation([2, 2]))
            .unwrap_err()
            .to_string(),
        "unfold: the input has shape [1, 2, 4, 4], expected a height and width of at least the \
         kernel's span 5x5 once padded by [0, 0] on each side (kernel [3, 3], dilation [2, 2])"
    );
    // Padding makes room: 4 + 2 = 6 >= 5.
    assert!(
        x.unfold(Window2d::new([3, 3]).with_dilation([2, 2]).with_padding([1, 1]))
            .is_ok()
    );
    let flat = tape.var(uniform(&[2, 4, 4], 0));
    assert_eq!(
        flat.unfold(Window2d::new([2, 2])).unwrap_err().to_string(),
        "unfold: the input has shape [2, 4, 4], expected rank 4, (N, C, H, W)"
    );
    // Sizes that overflow are errors, not wrapped arithmetic.
    let huge = Window2d::new([usize::MAX, 2]).with_dilation([2, 1]);
    assert!(matches!(x.unfold(huge), Err(TapeError::Shape { .. })));
    let mut cols = vec![0.0; 3];
    assert_eq!(
        im2col(&[1.0; 16], [1, 4, 4], &Window2d::new([2, 2]), 0.0, &mut cols)
            .unwrap_err()
            .to_string(),
        "im2col: the columns buffer has shape [3], expected 36 values (C·kH·kW rows of oH·oW positions, \
         [1, 2, 2, 3, 3])"
    );
}

#[test]
fn an_empty_image_unfolds_to_padding() {
    // Height 0 padded by 1 on each side holds one 2-row window of padding only.
    let tape = Tape::<f64>::new();
    let x = tape.var(ArrayD::zeros(IxDyn(&[2, 1, 0, 3])));
    let cols = x
        .unfold_with_pad(Window2d::new([2, 2]).with_padding([1, 0]), -1.0)
        .unwrap();
    assert_eq!(cols.shape(), vec![2, 4, 2]);
    assert!(cols.value().iter().all(|&v| v == -1.0));
    let grads = cols.sum().backward().unwrap();
    assert_eq!(grads.wrt(x).unwrap().shape(), &[2, 1, 0, 3]);
}
