//! The handwritten digits (the UCI "Optical Recognition of Handwritten Digits" set, by E.
//! Alpaydin and C. Kaynak, 1998, CC BY 4.0: the 1,797 images scikit-learn ships as
//! `load_digits`), bundled in this crate: [`load_bundled`] needs no file and no network. Each
//! image is 8 × 8 pixels in 0..=16 with its digit 0..9. Also here: a seeded train/test
//! [`split`], and a [`Standardizer`] fitted on the training split only.
//!
//! # Example: a split, standardised, in mini-batches
//! ```
//! use layers::data::DataLoader;
//! use layers::datasets::digits::{self, Standardizer};
//!
//! let data = digits::load_bundled()?;
//! assert_eq!((data.len(), data.features().ncols()), (1797, 64));
//! let (train, test) = digits::split(&data, 0.2, 0)?;
//! let scaler = Standardizer::fit(&train);
//! let (train, test) = (scaler.apply(&train), scaler.apply(&test));
//! let mut loader = DataLoader::new(train.features().mapv(|v| v as f32).into_dyn(), train.labels().to_vec(), 64)?
//!     .shuffled(1);
//! let batch = loader.epoch().next().unwrap();
//! assert_eq!(batch.x.shape(), &[64, 64]);
//! assert_eq!(test.len(), 359); // 20% of 1,797
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::GzDecoder;
use ndarray::{Array1, Array2, Axis};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// Pixels per image (8 × 8).
pub const FEATURES: usize = 64;
/// Digits 0..9.
pub const CLASSES: usize = 10;
/// The largest pixel value (pixels are 0..=16).
pub const MAX_PIXEL: u8 = 16;

/// Why the data could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened or decompressed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path given.
        path: String,
        /// The I/O or gzip error.
        source: std::io::Error,
    },
    /// A line is not 64 pixels and a label.
    #[error("line {line}: {problem}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong, with what was expected.
        problem: String,
    },
    /// No rows.
    #[error("the data has no rows")]
    Empty,
    /// Images and labels that do not fit together.
    #[error("{problem}")]
    Shape {
        /// What is wrong, with what was expected.
        problem: String,
    },
    /// An index past the last image.
    #[error("index {index} is out of range for {len} images")]
    Index {
        /// The index given.
        index: usize,
        /// The number of images.
        len: usize,
    },
    /// A setting is out of its range.
    #[error("{name} must be {expected}, got {got}")]
    Setting {
        /// The setting.
        name: &'static str,
        /// Its valid range, in words.
        expected: &'static str,
        /// The value given.
        got: f64,
    },
}

/// Images and their labels: one row of 64 values and one digit per image.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    features: Array2<f64>,
    labels: Vec<usize>,
}

impl Dataset {
    /// Images `(N, 64)` and their `N` digits.
    ///
    /// # Errors
    /// [`DataError::Shape`] when `features` is not 64 wide, the labels are not one per row, or a
    /// label is not a digit 0..9.
    pub fn new(features: Array2<f64>, labels: Vec<usize>) -> Result<Dataset, DataError> {
        let shape_error = |problem: String| Err(DataError::Shape { problem });
        if features.ncols() != FEATURES {
            return shape_error(format!(
                "features have {} columns, expected {FEATURES}",
                features.ncols()
            ));
        }
        if labels.len() != features.nrows() {
            return shape_error(format!(
                "{} labels for {} images, expected one per image",
                labels.len(),
                features.nrows()
            ));
        }
        if let Some((row, label)) = labels.iter().enumerate().find(|&(_, &label)| label >= CLASSES) {
            return shape_error(format!("label {label} of image {row} is not a digit 0..9"));
        }
        Ok(Dataset { features, labels })
    }

    /// One row of 64 values per image.
    pub fn features(&self) -> &Array2<f64> {
        &self.features
    }

    /// The digit of each image.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images at `indices`, in that order.
    ///
    /// # Errors
    /// [`DataError::Index`] for an index past the last image.
    pub fn select(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        if let Some(&index) = indices.iter().find(|&&index| index >= self.len()) {
            return Err(DataError::Index {
                index,
                len: self.len(),
            });
        }
        Ok(Dataset {
            features: self.features.select(Axis(0), indices),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        })
    }
}

/// The gzipped CSV bundled in this crate (`data/digits.csv.gz`, credit in `data/README.md`).
const BUNDLED: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// The 1,797 bundled images and labels.
///
/// # Errors
/// None in practice: the bundled file is checked by this crate's tests; the `Result` is that
/// of [`parse`].
pub fn load_bundled() -> Result<Dataset, DataError> {
    let mut text = String::new();
    GzDecoder::new(BUNDLED)
        .read_to_string(&mut text)
        .map_err(|source| DataError::Io {
            path: "the bundled digits".into(),
            source,
        })?;
    parse(BufReader::new(text.as_bytes()))
}

/// Reads a gzipped CSV of digits (64 pixels then the label per line) from a file.
///
/// # Errors
/// [`DataError::Io`] when the file cannot be read, [`DataError::Line`] naming the first bad line.
pub fn load(path: impl AsRef<Path>) -> Result<Dataset, DataError> {
    let path = path.as_ref();
    let io_error = |source| DataError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let mut text = String::new();
    GzDecoder::new(file).read_to_string(&mut text).map_err(io_error)?;
    parse(BufReader::new(text.as_bytes()))
}

/// Parses the CSV text (64 pixels in 0..=16, then the label in 0..=9, per line).
///
/// # Errors
/// [`DataError::Line`] naming the first bad line and what is wrong with it, [`DataError::Empty`].
pub fn parse(reader: impl BufRead) -> Result<Dataset, DataError> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (number, line) in reader.lines().enumerate() {
        let line_error = |problem: String| DataError::Line {
            line: number + 1,
            problem,
        };
        let line = line.map_err(|e| line_error(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != FEATURES + 1 {
            return Err(line_error(format!(
                "has {} fields, expected {} (64 pixels and a label)",
                fields.len(),
                FEATURES + 1
            )));
        }
        for (column, field) in fields[..FEATURES].iter().enumerate() {
            // Pixels are whole numbers 0..=16: NaN, inf, -5 or 100 are not pixels.
            let value: u8 = field
                .parse()
                .ok()
                .filter(|&value| value <= MAX_PIXEL)
                .ok_or_else(|| {
                    line_error(format!(
                        "pixel {column} is {field:?}, expected a whole number 0..16"
                    ))
                })?;
            pixels.push(f64::from(value));
        }
        let label: usize = fields[FEATURES]
            .parse()
            .ok()
            .filter(|&label| label < CLASSES)
            .ok_or_else(|| line_error(format!("label {:?} is not a digit 0..9", fields[FEATURES])))?;
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(DataError::Empty);
    }
    let features = Array2::from_shape_vec((labels.len(), FEATURES), pixels)
        .unwrap_or_else(|_| unreachable!("64 pixels were pushed per label"));
    Ok(Dataset { features, labels })
}

/// A seeded shuffle split: `(train, test)` with `test_fraction` of the images in `test`
/// (rounded to a whole number of images).
///
/// # Errors
/// [`DataError::Setting`] unless `test_fraction` is in `[0, 1]`.
pub fn split(data: &Dataset, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset), DataError> {
    if !(0.0..=1.0).contains(&test_fraction) {
        return Err(DataError::Setting {
            name: "test_fraction",
            expected: "in [0, 1]",
            got: test_fraction,
        });
    }
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let test_len = ((data.len() as f64) * test_fraction).round() as usize;
    let (test, train) = order.split_at(test_len.min(order.len()));
    Ok((data.select(train)?, data.select(test)?))
}

/// Per-feature mean and standard deviation of a training split.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    mean: Array1<f64>,
    std: Array1<f64>,
}

impl Standardizer {
    /// Fits on `train` only: the test split must not leak into its own preprocessing.
    pub fn fit(train: &Dataset) -> Self {
        let mean = train
            .features
            .mean_axis(Axis(0))
            .unwrap_or_else(|| Array1::zeros(FEATURES));
        let std = train
            .features
            .std_axis(Axis(0), 0.0)
            .mapv(|s| if s > 0.0 { s } else { 1.0 });
        Standardizer { mean, std }
    }

    /// Mean of each feature.
    pub fn mean(&self) -> &Array1<f64> {
        &self.mean
    }

    /// Standard deviation of each feature (1 where a feature is constant, such as a border
    /// pixel that is always 0, so it maps to 0 rather than NaN).
    pub fn std(&self) -> &Array1<f64> {
        &self.std
    }

    /// `(x - mean) / std` for every image.
    pub fn apply(&self, data: &Dataset) -> Dataset {
        Dataset {
            features: (&data.features - &self.mean) / &self.std,
            labels: data.labels.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_digits_are_the_file() {
        let data = load_bundled().unwrap();
        assert_eq!((data.len(), data.features().ncols()), (1797, FEATURES));
        for digit in 0..CLASSES {
            let count = data.labels().iter().filter(|&&l| l == digit).count();
            assert!((174..=183).contains(&count), "digit {digit}: {count} images");
        }
        let file = load(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz")).unwrap();
        assert_eq!(file, data);
        assert!(matches!(load("no/such/file.csv.gz"), Err(DataError::Io { .. })));
    }

    fn line(label: usize) -> String {
        let pixels: Vec<String> = (0..FEATURES).map(|i| (i % 17).to_string()).collect();
        format!("{},{label}\n", pixels.join(","))
    }

    #[test]
    fn parses_rows_and_reports_bad_lines() {
        let text = format!("{}{}", line(3), line(9));
        let data = parse(text.as_bytes()).unwrap();
        assert_eq!((data.len(), data.labels()), (2, &[3, 9][..]));
        assert_eq!(data.features()[[1, 16]], 16.0);
        let bad = format!("{}1,2,3\n", line(0));
        assert_eq!(
            parse(bad.as_bytes()).unwrap_err().to_string(),
            "line 2: has 3 fields, expected 65 (64 pixels and a label)"
        );
        let bad_label = line(0).replace(",0\n", ",12\n");
        assert_eq!(
            parse(bad_label.as_bytes()).unwrap_err().to_string(),
            "line 1: label \"12\" is not a digit 0..9"
        );
        assert!(matches!(parse("".as_bytes()), Err(DataError::Empty)));
        // Pixels outside 0..=16 were read as they were.
        for (pixel, shown) in [
            ("NaN", "\"NaN\""),
            ("inf", "\"inf\""),
            ("-5", "\"-5\""),
            ("100", "\"100\""),
            ("2.5", "\"2.5\""),
        ] {
            let bad = line(1).replacen("0,", &format!("{pixel},"), 1);
            assert_eq!(
                parse(bad.as_bytes()).unwrap_err().to_string(),
                format!("line 1: pixel 0 is {shown}, expected a whole number 0..16")
            );
        }
    }

    #[test]
    fn datasets_that_do_not_fit_together_are_errors() {
        let data = parse(format!("{}{}", line(3), line(9)).as_bytes()).unwrap();
        // Indices past the end panicked inside ndarray.
        assert_eq!(
            data.select(&[1, 2]).unwrap_err().to_string(),
            "index 2 is out of range for 2 images"
        );
        assert_eq!(data.select(&[1, 0]).unwrap().labels(), &[9, 3]);
        let features = data.features().clone();
        for (labels, message) in [
            (vec![1], "1 labels for 2 images, expected one per image"),
            (vec![1, 10], "label 10 of image 1 is not a digit 0..9"),
        ] {
            assert_eq!(
                Dataset::new(features.clone(), labels).unwrap_err().to_string(),
                message
            );
        }
        let narrow = ndarray::Array2::zeros((2, 3));
        assert_eq!(
            Dataset::new(narrow, vec![0, 1]).unwrap_err().to_string(),
            "features have 3 columns, expected 64"
        );
    }

    #[test]
    fn a_test_fraction_outside_zero_to_one_is_an_error() {
        // Above 1 it split past the end of the data.
        let data = parse((0..10).map(|i| line(i % 10)).collect::<String>().as_bytes()).unwrap();
        for fraction in [1.5, -0.1, f64::NAN] {
            assert_eq!(
                split(&data, fraction, 0).unwrap_err().to_string(),
                format!("test_fraction must be in [0, 1], got {fraction}")
            );
        }
        let (train, test) = split(&data, 1.0, 0).unwrap();
        assert_eq!((train.len(), test.len()), (0, 10));
    }

    #[test]
    fn the_split_is_seeded_and_the_standardizer_uses_train_only() {
        let text: String = (0..50).map(|i| line(i % 10)).collect();
        let data = parse(text.as_bytes()).unwrap();
        let mut features = data.features().clone();
        features
            .column_mut(5)
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f64);
        let data = Dataset::new(features, data.labels().to_vec()).unwrap();
        let (train, test) = split(&data, 0.2, 7).unwrap();
        assert_eq!((train.len(), test.len()), (40, 10));
        assert_eq!(split(&data, 0.2, 7).unwrap(), (train.clone(), test.clone()));
        assert_ne!(split(&data, 0.2, 8).unwrap().1, test);
        let scaler = Standardizer::fit(&train);
        let scaled = scaler.apply(&train);
        approx::assert_abs_diff_eq!(scaled.features().column(5).mean().unwrap(), 0.0, epsilon = 1e-12);
        approx::assert_abs_diff_eq!(scaled.features().column(5).std(0.0), 1.0, epsilon = 1e-12);
        // A constant column stays finite.
        assert!(scaler.apply(&test).features().iter().all(|v| v.is_finite()));
    }
}
