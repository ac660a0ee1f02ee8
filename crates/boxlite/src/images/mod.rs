//! Images: pulling from OCI registries, the content-addressed blob store, layer extraction and
//! rootfs assembly (OCI image spec v1.1, distribution spec v1.1, Docker image manifest v2.2).
//!
//! - [`digest`]: `sha256:<hex>` digests, validated once at the edge.
//! - [`reference`]: image references (`alpine`, `localhost:5000/x:1`, `name@sha256:…`).
//! - [`manifest`]: the JSON documents (index, manifest, config), OCI and Docker flavours.
//! - [`registry`]: the distribution API client with its auth flows.
//! - [`store`]: `ImageStore`, blobs by digest, verified and written atomically.
//! - [`archive`]: decompression (gzip, zstd, none) with size limits.
//! - [`chunks`]: a byte stream handed between threads (read-ahead, extraction during download).
//! - [`layer`]: applying one layer tar safely (hostile input).
//! - [`storage`]: `ImageStorage`, extracted layers by diff_id, shared across images.
//! - [`assemble`]: a rootfs directory from an image's layer chain.
//! - [`pull`] and [`import`]: getting images in; [`manager`]: `ImageManager`, the facade.

pub mod archive;
pub mod assemble;
pub mod chunks;
pub mod digest;
pub mod import;
pub mod layer;
pub mod manager;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod storage;
pub mod store;
