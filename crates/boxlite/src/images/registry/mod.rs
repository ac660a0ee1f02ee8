//! A client for the OCI distribution API v1.1 (`/v2/<name>/manifests/<ref>`,
//! `/v2/<name>/blobs/<digest>`), with the Docker registry auth flows.
//!
//! - [`settings`]: insecure registries, mirrors and limits from the home config file and env.
//! - [`credentials`]: where user names and passwords come from (`boxlite login`,
//!   `~/.docker/config.json`, `docker-credential-*` helpers); secrets never print.
//! - [`auth`]: `WWW-Authenticate` challenges, token requests (distribution token spec) and the
//!   per-scope token cache.
//! - [`client`]: [`RegistryClient`], requests with auth, redirects that never carry credentials to
//!   another host, manifests and blob streams.
//!
//! Errors are one [`RegistryError`] enum; [`RegistryError::is_transient`] tells the pull loop what
//! is worth a retry.

pub mod auth;
pub mod client;
pub mod credentials;
pub mod settings;

use std::path::PathBuf;

pub use client::{BlobResponse, FetchedManifest, RegistryClient};
pub use credentials::{Credential, CredentialStore, Secret};
pub use settings::ImageSettings;

/// What can go wrong talking to a registry. Every variant names the URL or registry involved.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request never got an HTTP answer (connection refused, reset, timeout, TLS).
    #[error("request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// The registry cannot be reached at all: its name does not resolve, or nothing listens
    /// at its address. Trying again at once would not help, so this is not transient.
    #[error("registry {host} is unreachable ({url}): {reason}")]
    Unreachable {
        host: String,
        url: String,
        reason: String,
    },
    /// Reading a response body failed midway.
    #[error("reading the response from {url} failed")]
    Body {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// An answer with a status the protocol does not allow here.
    #[error("{url} answered HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{what} not found at {url}")]
    NotFound { what: String, url: String },
    /// The registry refused our credentials (or wanted some and we had none).
    #[error("authentication to {registry} failed: {message}")]
    Unauthorized { registry: String, message: String },
    /// The token endpoint refused the request.
    #[error("authentication failed ({status}) at token endpoint {realm}: {message}")]
    TokenDenied {
        realm: String,
        status: u16,
        message: String,
    },
    /// The token endpoint answered 200 with something that is not a usable token.
    #[error("token endpoint {realm}: {reason}")]
    BadTokenResponse { realm: String, reason: String },
    #[error("cannot parse the WWW-Authenticate challenge {header:?} from {url}")]
    BadChallenge { url: String, header: String },
    #[error("too many redirects starting at {url}")]
    TooManyRedirects { url: String },
    #[error("refusing redirect from {from} to {to}: {reason}")]
    BadRedirect {
        from: String,
        to: String,
        reason: String,
    },
    #[error("response from {url} is larger than the {limit} byte limit")]
    TooLarge { url: String, limit: u64 },
    #[error("credential helper {helper} failed: {message}")]
    CredentialHelper { helper: String, message: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed {path}")]
    BadConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("registry host {host:?} is not on this machine and not listed as insecure; HTTPS is required")]
    InsecureNotAllowed { host: String },
}

impl RegistryError {
    /// The error of a request that got no HTTP answer: [`RegistryError::Unreachable`] when the
    /// name does not resolve or the connection is refused, else [`RegistryError::Transport`].
    pub fn transport(url: String, source: ureq::Error) -> RegistryError {
        let reason = match &source {
            ureq::Error::HostNotFound => Some("its host name does not resolve".to_string()),
            ureq::Error::ConnectionFailed => Some("no connection could be made".to_string()),
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Some("connection refused".to_string())
            }
            // std reports a failed name lookup as an uncategorised error with this text.
            ureq::Error::Io(e) if e.to_string().contains("failed to lookup address") => {
                Some(format!("its host name does not resolve ({e})"))
            }
            _ => None,
        };
        match reason {
            Some(reason) => RegistryError::Unreachable {
                host: url_host(&url).to_string(),
                url,
                reason,
            },
            None => RegistryError::Transport {
                url,
                source: Box::new(source),
            },
        }
    }

    /// Whether trying again later could succeed: network trouble (resets, timeouts), 5xx, 408
    /// and 429; not an unreachable registry.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { .. } | RegistryError::Body { .. } => true,
            RegistryError::Status { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            _ => false,
        }
    }
}

/// `host[:port]` of `scheme://host[:port]/path`.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
