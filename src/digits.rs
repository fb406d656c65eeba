//! The handwritten digits data (`data/digits.csv.gz`, see `data/README.md`): loading, a seeded
//! train/test split, and standardisation fitted on the training split only.

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
}

/// Images and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// One row of 64 pixel values per image.
    pub features: Array2<f64>,
    /// The digit of each image.
    pub labels: Vec<usize>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        Dataset {
            features: self.features.select(Axis(0), indices),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// Reads a gzipped CSV of digits (64 pixels then the label per line).
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
        for field in &fields[..FEATURES] {
            let value: f64 = field
                .parse()
                .map_err(|_| line_error(format!("pixel {field:?} is not a number")))?;
            pixels.push(value);
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

/// A seeded shuffle split: `(train, test)` with `test_fraction` of the images in `test`.
pub fn split(data: &Dataset, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let test_len = ((data.len() as f64) * test_fraction).round() as usize;
    let (test, train) = order.split_at(test_len);
    (data.select(train), data.select(test))
}

/// Per-feature mean and standard deviation of a training split.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    /// Mean of each feature.
    pub mean: Array1<f64>,
    /// Standard deviation of each feature (1 where a feature is constant, such as a border
    /// pixel that is always 0, so it maps to 0 rather than NaN).
    pub std: Array1<f64>,
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

    fn line(label: usize) -> String {
        let pixels: Vec<String> = (0..FEATURES).map(|i| (i % 17).to_string()).collect();
        format!("{},{label}\n", pixels.join(","))
    }

    #[test]
    fn parses_rows_and_reports_bad_lines() {
        let text = format!("{}{}", line(3), line(9));
        let data = parse(text.as_bytes()).unwrap();
        assert_eq!((data.len(), data.labels.clone()), (2, vec![3, 9]));
        assert_eq!(data.features[[1, 16]], 16.0);
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
    }

    #[test]
    fn the_split_is_seeded_and_the_standardizer_uses_train_only() {
        let text: String = (0..50).map(|i| line(i % 10)).collect();
        let mut data = parse(text.as_bytes()).unwrap();
        data.features
            .column_mut(5)
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f64);
        let (train, test) = split(&data, 0.2, 7);
        assert_eq!((train.len(), test.len()), (40, 10));
        assert_eq!(split(&data, 0.2, 7), (train.clone(), test.clone()));
        assert_ne!(split(&data, 0.2, 8).1, test);
        let scaler = Standardizer::fit(&train);
        let scaled = scaler.apply(&train);
        approx::assert_abs_diff_eq!(scaled.features.column(5).mean().unwrap(), 0.0, epsilon = 1e-12);
        approx::assert_abs_diff_eq!(scaled.features.column(5).std(0.0), 1.0, epsilon = 1e-12);
        // A constant column stays finite.
        assert!(scaler.apply(&test).features.iter().all(|v| v.is_finite()));
    }
}
