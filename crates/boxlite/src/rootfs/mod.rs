//! Root filesystems and Box disks: shared read-only base images built from an image's layers, and
//! per-Box QCOW2 overlays over them (qcow2 spec: backing files with an explicit format).
