//! Owned by the layer-extraction work (not yet written).
