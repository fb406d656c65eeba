//! Batch Normalization as one fused tape node, and the layers a small net needs.
