//! The two nets the main job trains on the digits, each without normalization, with BatchNorm
//! or with LayerNorm ([`Norm`]).
//!
//! - [`Model::Mlp`], after Ioffe and Szegedy (2015), Figure 1: three hidden layers of 100 sigmoid
//!   units, the normalization (when enabled) between each hidden linear layer and its sigmoid.
//! - [`Model::Cnn`]: the digits as `1 × 8 × 8` images,
//!   `Conv2d(1, 16, 3, padding 1) → [norm(16)] → ReLU → Conv2d(16, 32, 3, padding 1)
//!   → [norm(32)] → ReLU → MaxPool2d(2) → Flatten → Linear(512, 10)`, where BatchNorm is
//!   BatchNorm2d and LayerNorm normalizes each image over its channels and positions
//!   (GroupNorm with one group).

use std::fmt;

use layers::Sequential;
use layers::{
    Activation, BatchNorm, Conv2d, Conv2dOptions, Flatten, GroupNorm, LayerNorm, Linear, MaxPool2d, Module,
};
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

/// The normalization after each hidden linear or convolution layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Norm {
    /// None.
    None,
    /// BatchNorm (batch statistics in training, running statistics in evaluation).
    Batch,
    /// LayerNorm (each sample on its own, the same in training and evaluation).
    Layer,
}

impl Norm {
    /// Every normalization.
    pub const ALL: [Norm; 3] = [Norm::None, Norm::Batch, Norm::Layer];

    /// `"none"`, `"batch"` or `"layer"`, as in `summary.json`.
    pub fn name(self) -> &'static str {
        match self {
            Norm::None => "none",
            Norm::Batch => "batch",
            Norm::Layer => "layer",
        }
    }

    /// The suffix of an architecture's name: `""`, `"-bn"` or `"-ln"`.
    pub fn suffix(self) -> &'static str {
        match self {
            Norm::None => "",
            Norm::Batch => "-bn",
            Norm::Layer => "-ln",
        }
    }

    /// `"plain"`, `"BatchNorm"` or `"LayerNorm"`, for tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            Norm::None => "plain",
            Norm::Batch => "BatchNorm",
            Norm::Layer => "LayerNorm",
        }
    }

    /// The layer for `features` outputs of a linear layer, if any.
    fn for_features<T: Element>(self, features: usize) -> Option<Box<dyn Module<T>>> {
        match self {
            Norm::None => None,
            Norm::Batch => Some(Box::new(BatchNorm::new(features))),
            Norm::Layer => Some(Box::new(
                LayerNorm::new(&[features]).unwrap_or_else(|_| unreachable!("features > 0")),
            )),
        }
    }

    /// The layer for `channels` feature maps of a convolution, if any.
    fn for_channels<T: Element>(self, channels: usize) -> Option<Box<dyn Module<T>>> {
        match self {
            Norm::Layer => Some(Box::new(
                GroupNorm::new(1, channels).unwrap_or_else(|_| unreachable!("one group divides any count")),
            )),
            other => other.for_features(channels),
        }
    }
}

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
    pub fn build<T: Element>(self, norm: Norm, seed: u64) -> Sequential<T> {
        let net = match self {
            Model::Mlp => mlp(norm, seed),
            Model::Cnn => cnn(norm, seed),
        };
        net.with_arch(self.arch(norm))
    }

    /// The architecture's name in model files: `"mlp"`, `"mlp-bn"`, `"mlp-ln"`, `"cnn"`, ...
    pub fn arch(self, norm: Norm) -> String {
        format!("{}{}", self.name(), norm.suffix())
    }

    /// The model and its normalization, from an architecture's name ([`Model::arch`]).
    pub fn from_arch(arch: &str) -> Option<(Model, Norm)> {
        [Model::Mlp, Model::Cnn]
            .into_iter()
            .flat_map(|model| Norm::ALL.map(|norm| (model, norm)))
            .find(|&(model, norm)| model.arch(norm) == arch)
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

/// The MLP: `64 → (Linear → [norm] → Sigmoid) × 3 → Linear → 10`, initialised from `seed`.
pub fn mlp<T: Element>(norm: Norm, seed: u64) -> Sequential<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut net = Sequential::new();
    let mut width = FEATURES;
    for _ in 0..DEPTH {
        net = net.push(Linear::new(width, HIDDEN, &mut rng));
        if let Some(layer) = norm.for_features(HIDDEN) {
            net = net.push_boxed(layer);
        }
        net = net.push(Activation::Sigmoid);
        width = HIDDEN;
    }
    net.push(Linear::new(width, CLASSES, &mut rng))
}

/// The CNN on `(N, 1, 8, 8)` images, initialised from `seed` as PyTorch initialises it.
pub fn cnn<T: Element>(norm: Norm, seed: u64) -> Sequential<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let same = Conv2dOptions::default().with_padding([1, 1]);
    let mut net = Sequential::new();
    for (c_in, c_out) in [(1, 16), (16, 32)] {
        let conv = Conv2d::with_options(c_in, c_out, [3, 3], same, true, &mut rng)
            .unwrap_or_else(|_| unreachable!("one group divides any channel count"));
        net = net.push(conv);
        if let Some(layer) = norm.for_channels(c_out) {
            net = net.push_boxed(layer);
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
        let plain = mlp::<f32>(Norm::None, 0);
        let with_bn = mlp::<f32>(Norm::Batch, 0);
        let with_ln = mlp::<f32>(Norm::Layer, 0);
        assert_eq!(plain.layers().len(), 7);
        assert_eq!(with_bn.layers().len(), 10);
        assert_eq!(with_ln.describe().matches("LayerNorm([100])").count(), 3);
        assert_eq!(with_ln.parameter_count(), with_bn.parameter_count());
        assert_eq!(
            plain.parameter_count(),
            64 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10
        );
        assert_eq!(with_bn.parameter_count(), plain.parameter_count() + 3 * 200);
    }

    #[test]
    fn the_cnn_has_the_layers_of_the_main_job() {
        let mut net = cnn::<f32>(Norm::Batch, 0);
        assert_eq!(
            net.describe(),
            "Sequential[Conv2d(1 -> 16, 3x3, padding [1, 1]), BatchNorm(16), Relu, Conv2d(16 -> 32, \
             3x3, padding [1, 1]), BatchNorm(32), Relu, MaxPool2d(2x2), Flatten, Linear(512 -> 10)]"
        );
        let convs = 16 * 9 + 16 + 32 * 16 * 9 + 32;
        assert_eq!(cnn::<f32>(Norm::None, 0).parameter_count(), convs + 512 * 10 + 10);
        assert!(
            cnn::<f32>(Norm::Layer, 0)
                .describe()
                .contains("GroupNorm(1 groups, 32 channels)")
        );
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
            for norm in Norm::ALL {
                assert_eq!(Model::from_arch(&model.arch(norm)), Some((model, norm)));
            }
        }
        assert_eq!(Model::from_arch("rnn-bn"), None);
        assert_eq!(Model::from_arch("cnn-"), None);
        assert_eq!(Model::arch(Model::Mlp, Norm::Layer), "mlp-ln");
    }

    #[test]
    fn an_image_is_its_row_of_pixels_row_by_row() {
        let rows = Array2::from_shape_fn((2, 64), |(n, i)| (100 * n + i) as f32);
        let images = Model::Cnn.input(rows);
        assert_eq!(images[[1, 0, 2, 3]], 100.0 + 19.0);
    }
}
