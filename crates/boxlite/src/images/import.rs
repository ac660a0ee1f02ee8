//! Owned by the registry work (not yet written).
