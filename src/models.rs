//! The two nets the main job trains on the digits, each with or without BatchNorm.
//!
//! - [`Model::Mlp`], after Ioffe and Szegedy (2015), Figure 1: three hidden layers of 100 sigmoid
//!   units, BatchNorm (when enabled) between each hidden linear layer and its sigmoid.
//! - [`Model::Cnn`]: the digits as `1 × 8 × 8` images,
//!   `Conv2d(1, 16, 3, padding 1) → [BatchNorm2d(16)] → ReLU → Conv2d(16, 32, 3, padding 1)
//!   → [BatchNorm2d(32)] → ReLU → MaxPool2d(2) → Flatten → Linear(512, 10)`.

use std::fmt;

use layers::{Activation, BatchNorm, Conv2d, Conv2dOptions, Flatten, Linear, MaxPool2d, Sequential};
use ndarray::{Array2, ArrayD, IxDyn};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tape::Element;

use layers::datasets::digits::{CLASSES, FEATURES};

/// Hidden units per layer of the MLP.
pub const HIDDEN: usize = 100;
/// Hidden layers of the MLP.
pub const DEPTH: usize = 3;
/// The side of a digit image.
pub const SIDE: usize = 8;

/// Which net.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Model {
    /// The 3 × 100 sigmoid MLP.
    Mlp,
    /// The two-layer convolutional net.
    Cnn,
}

impl Model {
    /// `"mlp"` or `"cnn"`, as in `summary.json`.
    pub fn name(self) -> &'static str {
        match self {
            Model::Mlp => "mlp",
            Model::Cnn => "cnn",
        }
    }

    /// The net, initialised from `seed`, named by [`Model::arch`].
    pub fn build<T: Element>(self, batchnorm: bool, seed: u64) -> Sequential<T> {
        let net = match self {
            Model::Mlp => mlp(batchnorm, seed),
            Model::Cnn => cnn(batchnorm, seed),
        };
        net.with_arch(self.arch(batchnorm))
    }

    /// The architecture's name in model files: `"mlp"`, `"mlp-bn"`, `"cnn"` or `"cnn-bn"`.
    pub fn arch(self, batchnorm: bool) -> String {
        format!("{}{}", self.name(), if batchnorm { "-bn" } else { "" })
    }

    /// The model and whether it has BatchNorm, from an architecture's name ([`Model::arch`]).
    pub fn from_arch(arch: &str) -> Option<(Model, bool)> {
        let (name, batchnorm) = match arch.strip_suffix("-bn") {
            Some(name) => (name, true),
            None => (arch, false),
        };
        [Model::Mlp, Model::Cnn]
            .into_iter()
            .find(|model| model.name() == name)
            .map(|model| (model, batchnorm))
    }

    /// A batch of rows of 64 pixels as this net's input: the rows themselves for the MLP,
    /// `(N, 1, 8, 8)` images for the CNN.
    pub fn input<T: Element>(self, rows: Array2<T>) -> ArrayD<T> {
        match self {
            Model::Mlp => rows.into_dyn(),
            Model::Cnn => {
                let n = rows.nrows();
                rows.into_shape_with_order(IxDyn(&[n, 1, SIDE, SIDE]))
                    .unwrap_or_else(|_| unreachable!("each row holds the 64 pixels of an image"))
            }
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Model::Mlp => "MLP",
            Model::Cnn => "CNN",
        })
    }
}

/// The MLP: `64 → (Linear → [BatchNorm] → Sigmoid) × 3 → Linear → 10`, initialised from `seed`.
pub fn mlp<T: Element>(batchnorm: bool, seed: u64) -> Sequential<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut net = Sequential::new();
    let mut width = FEATURES;
    for _ in 0..DEPTH {
        net = net.push(Linear::new(width, HIDDEN, &mut rng));
        if batchnorm {
            net = net.push(BatchNorm::new(HIDDEN));
        }
        net = net.push(Activation::Sigmoid);
        width = HIDDEN;
    }
    net.push(Linear::new(width, CLASSES, &mut rng))
}

/// The CNN on `(N, 1, 8, 8)` images, initialised from `seed` as PyTorch initialises it.
pub fn cnn<T: Element>(batchnorm: bool, seed: u64) -> Sequential<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let same = Conv2dOptions::default().with_padding([1, 1]);
    let mut net = Sequential::new();
    for (c_in, c_out) in [(1, 16), (16, 32)] {
        let conv = Conv2d::with_options(c_in, c_out, [3, 3], same, true, &mut rng)
            .unwrap_or_else(|_| unreachable!("one group divides any channel count"));
        net = net.push(conv);
        if batchnorm {
            net = net.push(BatchNorm::new(c_out));
        }
        net = net.push(Activation::Relu);
    }
    let pooled = 32 * (SIDE / 2) * (SIDE / 2);
    net.push(MaxPool2d::new([2, 2]))
        .push(Flatten)
        .push(Linear::new(pooled, CLASSES, &mut rng))
}

#[cfg(test)]
mod tests {
    use layers::{Mode, Module};
    use tape::Tape;

    use super::*;

    #[test]
    fn the_mlp_has_the_papers_shape() {
        let plain = mlp::<f32>(false, 0);
        let with_bn = mlp::<f32>(true, 0);
        assert_eq!(plain.layers().len(), 7);
        assert_eq!(with_bn.layers().len(), 10);
        assert_eq!(
            plain.parameter_count(),
            64 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10
        );
        assert_eq!(with_bn.parameter_count(), plain.parameter_count() + 3 * 200);
    }

    #[test]
    fn the_cnn_has_the_layers_of_the_main_job() {
        let mut net = cnn::<f32>(true, 0);
        assert_eq!(
            net.describe(),
            "Sequential[Conv2d(1 -> 16, 3x3, padding [1, 1]), BatchNorm(16), Relu, Conv2d(16 -> 32, \
             3x3, padding [1, 1]), BatchNorm(32), Relu, MaxPool2d(2x2), Flatten, Linear(512 -> 10)]"
        );
        let convs = 16 * 9 + 16 + 32 * 16 * 9 + 32;
        assert_eq!(cnn::<f32>(false, 0).parameter_count(), convs + 512 * 10 + 10);
        assert_eq!(net.parameter_count(), convs + 512 * 10 + 10 + 2 * (16 + 32));
        let tape = Tape::new();
        let x = Model::Cnn.input(Array2::<f32>::zeros((5, 64)));
        assert_eq!(x.shape(), &[5, 1, 8, 8]);
        let logits = net.forward(tape.constant(x), Mode::Train).unwrap();
        assert_eq!(logits.shape(), vec![5, 10]);
    }

    #[test]
    fn architecture_names_round_trip() {
        for model in [Model::Mlp, Model::Cnn] {
            for batchnorm in [false, true] {
                assert_eq!(Model::from_arch(&model.arch(batchnorm)), Some((model, batchnorm)));
            }
        }
        assert_eq!(Model::from_arch("rnn-bn"), None);
        assert_eq!(Model::from_arch("cnn-"), None);
    }

    #[test]
    fn an_image_is_its_row_of_pixels_row_by_row() {
        let rows = Array2::from_shape_fn((2, 64), |(n, i)| (100 * n + i) as f32);
        let images = Model::Cnn.input(rows);
        assert_eq!(images[[1, 0, 2, 3]], 100.0 + 19.0);
    }
}
