//! Volumes: named QCOW2 volumes (thin, persistent, snapshots, backing volumes) and host directory
//! shares over virtiofs.
