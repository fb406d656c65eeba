//! Mini-batches of an in-memory dataset: [`DataLoader`].

use ndarray::{ArrayD, Axis};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tape::Element;

use crate::error::{Error, Result};

/// One mini-batch: its inputs (the dataset's rows, in batch order) and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch<T> {
    /// `(batch size, ...)`: the rows of the dataset's inputs.
    pub x: ArrayD<T>,
    /// One label per row.
    pub labels: Vec<usize>,
}

/// Mini-batches of inputs `(N, ...)` and `N` labels, as PyTorch's `DataLoader`: a batch size,
/// optional seeded shuffling (a new order each epoch), and `drop_last`. Each batch copies only
/// its own rows.
///
/// # Example
/// ```
/// use layers::data::DataLoader;
/// use ndarray::Array2;
///
/// let x = Array2::from_shape_fn((10, 3), |(i, j)| (3 * i + j) as f32).into_dyn();
/// let mut loader = DataLoader::new(x, (0..10).collect(), 4)?.shuffled(7).drop_last(true);
/// assert_eq!(loader.batches_per_epoch(), 2);
/// let mut seen = Vec::new();
/// for batch in loader.epoch() {
///     assert_eq!(batch.x.shape(), &[4, 3]);
///     seen.extend(batch.labels);
/// }
/// seen.sort();
/// seen.dedup();
/// assert_eq!(seen.len(), 8, "8 distinct rows; the last 2 of the shuffled order are dropped");
/// # Ok::<(), layers::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DataLoader<T> {
    x: ArrayD<T>,
    labels: Vec<usize>,
    batch_size: usize,
    drop_last: bool,
    rng: Option<StdRng>,
    order: Vec<usize>,
}

impl<T: Element> DataLoader<T> {
    /// Batches of `batch_size` rows of `x` (axis 0) with their `labels`, in order, the last one
    /// smaller when `batch_size` does not divide the rows.
    ///
    /// # Errors
    /// [`Error::Shape`] when `x` has rank 0, [`Error::Length`] when `labels` does not have one
    /// entry per row, [`Error::InvalidSetting`] for a batch size of 0.
    pub fn new(x: ArrayD<T>, labels: Vec<usize>, batch_size: usize) -> Result<Self> {
        let Some(&rows) = x.shape().first() else {
            return Err(Error::Shape {
                name: "x",
                got: x.shape().to_vec(),
                expected: "rank 1 or more, (N, ...)".into(),
            });
        };
        if labels.len() != rows {
            return Err(Error::Length {
                name: "labels",
                got: labels.len(),
                expected: rows,
                of: "rows of x",
            });
        }
        if batch_size == 0 {
            return Err(Error::InvalidSetting {
                name: "batch_size",
                expected: "at least 1",
                got: 0.0,
            });
        }
        Ok(DataLoader {
            x,
            labels,
            batch_size,
            drop_last: false,
            rng: None,
            order: (0..rows).collect(),
        })
    }

    /// This loader, shuffling the rows at the start of each epoch with a generator seeded
    /// `seed` (each epoch shuffles the previous epoch's order).
    #[must_use]
    pub fn shuffled(self, seed: u64) -> Self {
        DataLoader {
            rng: Some(StdRng::seed_from_u64(seed)),
            ..self
        }
    }

    /// This loader, dropping (or not) an epoch's last batch when it is smaller than the others.
    #[must_use]
    pub fn drop_last(self, drop_last: bool) -> Self {
        DataLoader { drop_last, ..self }
    }

    /// Rows in the dataset.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True for a dataset of no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            self.len() / self.batch_size
        } else {
            self.len().div_ceil(self.batch_size)
        }
    }

    /// One epoch's batches (shuffled first, if the loader shuffles).
    pub fn epoch(&mut self) -> impl Iterator<Item = Batch<T>> + '_ {
        self.shuffle();
        let this = &*self;
        (0..this.batches_per_epoch()).map(move |b| this.batch(b))
    }

    /// Batches epoch after epoch without end (each epoch shuffled, if the loader shuffles), for
    /// training by steps rather than epochs. Empty only when an epoch has no batch.
    pub fn cycle(&mut self) -> impl Iterator<Item = Batch<T>> + '_ {
        let per_epoch = self.batches_per_epoch();
        let mut next = per_epoch; // a new epoch first
        std::iter::from_fn(move || {
            if per_epoch == 0 {
                return None;
            }
            if next == per_epoch {
                self.shuffle();
                next = 0;
            }
            next += 1;
            Some(self.batch(next - 1))
        })
    }

    fn shuffle(&mut self) {
        if let Some(rng) = self.rng.as_mut() {
            self.order.shuffle(rng);
        }
    }

    /// Batch `b` of the current order.
    fn batch(&self, b: usize) -> Batch<T> {
        let rows = &self.order[b * self.batch_size..((b + 1) * self.batch_size).min(self.len())];
        Batch {
            x: self.x.select(Axis(0), rows),
            labels: rows.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;

    fn loader(rows: usize, batch: usize) -> DataLoader<f64> {
        let x = Array2::from_shape_fn((rows, 2), |(i, j)| (10 * i + j) as f64).into_dyn();
        DataLoader::new(x, (0..rows).collect(), batch).unwrap()
    }

    #[test]
    fn in_order_every_row_once_the_last_batch_smaller() {
        let mut plain = loader(7, 3);
        let batches: Vec<Batch<f64>> = plain.epoch().collect();
        let labels: Vec<Vec<usize>> = batches.iter().map(|b| b.labels.clone()).collect();
        assert_eq!(labels, [vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        // Inputs and labels stay paired: row i holds 10·i, 10·i + 1.
        assert!(batches.iter().all(|b| {
            b.labels
                .iter()
                .enumerate()
                .all(|(r, &i)| b.x[[r, 0]] == 10.0 * i as f64)
        }));
        let mut dropped = loader(7, 3).drop_last(true);
        assert_eq!(dropped.epoch().count(), 2);
    }

    #[test]
    fn cycling_runs_epoch_after_epoch_as_epoch_does() {
        let (mut a, mut b) = (
            loader(7, 3).shuffled(1).drop_last(true),
            loader(7, 3).shuffled(1).drop_last(true),
        );
        let cycled: Vec<Vec<usize>> = a.cycle().take(6).map(|batch| batch.labels).collect();
        let epochs: Vec<Vec<usize>> = (0..3)
            .flat_map(|_| b.epoch().map(|batch| batch.labels).collect::<Vec<_>>())
            .collect();
        assert_eq!(cycled, epochs);
        assert_eq!(loader(2, 3).drop_last(true).cycle().next(), None);
    }

    #[test]
    fn shuffling_is_seeded_and_new_each_epoch() {
        let mut a = loader(20, 5).shuffled(3);
        let mut b = loader(20, 5).shuffled(3);
        let first: Vec<usize> = a.epoch().flat_map(|b| b.labels).collect();
        assert_eq!(first, b.epoch().flat_map(|b| b.labels).collect::<Vec<_>>());
        let second: Vec<usize> = a.epoch().flat_map(|b| b.labels).collect();
        assert_ne!(first, second);
        let mut sorted = second.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>(), "a permutation");
        let other: Vec<usize> = loader(20, 5).shuffled(4).epoch().flat_map(|b| b.labels).collect();
        assert_ne!(first, other);
    }

    #[test]
    fn bad_datasets_are_errors() {
        let x = Array2::<f64>::zeros((3, 2)).into_dyn();
        let message = |r: Result<DataLoader<f64>>| r.unwrap_err().to_string();
        assert_eq!(
            message(DataLoader::new(x.clone(), vec![0, 1], 2)),
            "labels has 2 elements, expected 3 (rows of x)"
        );
        assert_eq!(
            message(DataLoader::new(x, vec![0, 1, 2], 0)),
            "batch_size must be at least 1, got 0"
        );
        assert!(DataLoader::new(ndarray::arr0(1.0).into_dyn(), vec![], 1).is_err());
    }
}
