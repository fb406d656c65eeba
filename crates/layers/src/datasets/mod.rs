//! Example datasets, bundled in the crate: [`digits`], 1,797 handwritten 8 × 8 digits, the
//! data of the main job and of the examples. Batch them with [`DataLoader`](crate::data::DataLoader).

pub mod digits;
