//! [`RegistryClient`]: one registry endpoint, its auth state and the two reads a pull needs
//! (distribution spec v1.1 "pull": `GET /v2/<name>/manifests/<reference>` and
//! `GET /v2/<name>/blobs/<digest>`, with `Range` to resume).
//!
//! Redirects are followed by hand (blob storage often lives elsewhere): the `Authorization`
//! header only goes to the origin it was meant for and is dropped for any other host; an
//! https → http downgrade is refused. URLs are logged without their query (presigned URLs carry
//! signatures there).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tracing::debug;
use ureq::http::Response;
use ureq::{Agent, Body};

use super::auth::{self, AuthState, Challenge};
use super::credentials::{Credential, Secret};
use super::settings::ImageSettings;
use super::{RegistryError, Result};
use crate::images::digest::Digest;
use crate::images::manifest::ACCEPT_MANIFESTS;
use crate::images::reference::is_loopback_host;

const MAX_REDIRECTS: usize = 5;
/// Bound on error and token bodies we read.
const SMALL_BODY_LIMIT: u64 = 1 << 20;

/// A client for one registry endpoint (`scheme://host[:port]`).
#[derive(Debug)]
pub struct RegistryClient {
    agent: Agent,
    registry: String,
    base: String,
    credential: Option<Credential>,
    settings: ImageSettings,
    state: Mutex<AuthState>,
    blob_requests: AtomicU64,
    token_requests: AtomicU64,
}

/// A manifest or index as the registry sent it.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    /// The `Docker-Content-Digest` header: a claim, never trusted (the body is hashed instead).
    pub header_digest: Option<String>,
}

/// A blob body being received.
pub struct BlobResponse {
    pub reader: Box<dyn Read + Send>,
    /// True when the server honoured the `Range` request (206): the body starts at the offset.
    pub resumed: bool,
    pub url: String,
}

impl std::fmt::Debug for BlobResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobResponse")
            .field("resumed", &self.resumed)
            .field("url", &strip_query(&self.url))
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client for `registry` (host[:port] as in a reference) at `endpoint`
    /// (`http(s)://host[:port]`, the registry itself or a mirror).
    pub fn new(
        registry: &str,
        endpoint: &str,
        credential: Option<Credential>,
        settings: &ImageSettings,
    ) -> RegistryClient {
        let config = Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .user_agent(concat!("boxlite/", env!("CARGO_PKG_VERSION")))
            .build();
        RegistryClient {
            agent: Agent::new_with_config(config),
            registry: registry.to_string(),
            base: endpoint.trim_end_matches('/').to_string(),
            credential,
            settings: settings.clone(),
            state: Mutex::new(AuthState::default()),
            blob_requests: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
        }
    }

    /// The endpoint for `api_host` by the settings' scheme rules.
    pub fn endpoint_for(api_host: &str, settings: &ImageSettings) -> String {
        format!("{}://{}", settings.scheme_for(api_host), api_host)
    }

    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// Blob GETs sent so far (a resumed or retried blob counts again).
    pub fn blob_requests(&self) -> u64 {
        self.blob_requests.load(Ordering::Relaxed)
    }

    /// Token endpoint requests sent so far.
    pub fn token_requests(&self) -> u64 {
        self.token_requests.load(Ordering::Relaxed)
    }

    /// `GET /v2/`, answering an auth challenge: checks the endpoint and the credentials.
    pub fn ping(&self) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        let mut resp = self.get(&url, "", &[])?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            status => Err(RegistryError::Status {
                message: read_message(&mut resp),
                url,
                status,
            }),
        }
    }

    /// Fetches the manifest or index `reference` (tag or digest) of `repository`.
    pub fn manifest(&self, repository: &str, reference: &str) -> Result<FetchedManifest> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base);
        let accept = ACCEPT_MANIFESTS.join(", ");
        let mut resp = self.get(&url, &pull_scope(repository), &[("Accept", accept)])?;
        let status = resp.status().as_u16();
        if status == 404 {
            return Err(RegistryError::NotFound {
                what: format!("manifest {repository}:{reference}"),
                url,
            });
        }
        if status != 200 {
            return Err(RegistryError::Status {
                message: read_message(&mut resp),
                url,
                status,
            });
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type");
        let header_digest = header("docker-content-digest");
        let limit = self.settings.max_manifest_size;
        let body = read_limited(&mut resp, limit, &url)?;
        Ok(FetchedManifest {
            body,
            content_type,
            header_digest,
        })
    }

    /// Starts receiving blob `digest` of `repository` from byte `offset` on.
    pub fn blob(&self, repository: &str, digest: &Digest, offset: u64) -> Result<BlobResponse> {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        let mut headers = Vec::new();
        if offset > 0 {
            headers.push(("Range", format!("bytes={offset}-")));
        }
        self.blob_requests.fetch_add(1, Ordering::Relaxed);
        let mut resp = self.get(&url, &pull_scope(repository), &headers)?;
        let status = resp.status().as_u16();
        let resumed = match status {
            200 => false,
            206 => {
                let start = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(offset) {
                    return Err(RegistryError::Status {
                        url,
                        status,
                        message: format!("Content-Range does not start at byte {offset}"),
                    });
                }
                true
            }
            404 => {
                return Err(RegistryError::NotFound {
                    what: format!("blob {digest} of {repository}"),
                    url,
                })
            }
            _ => {
                return Err(RegistryError::Status {
                    message: read_message(&mut resp),
                    url,
                    status,
                })
            }
        };
        Ok(BlobResponse {
            reader: Box::new(resp.into_body().into_reader()),
            resumed,
            url,
        })
    }

    /// A GET with auth: cached credentials first, then one answer to a 401 challenge.
    fn get(&self, url: &str, scope: &str, headers: &[(&str, String)]) -> Result<Response<Body>> {
        let mut challenged = false;
        loop {
            let authorization = self.authorization(scope);
            let mut resp = self.get_with_redirects(url, headers, authorization)?;
            if resp.status().as_u16() != 401 {
                return Ok(resp);
            }
            let header = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let message = read_message(&mut resp);
            if challenged {
                return Err(RegistryError::Unauthorized {
                    registry: self.registry.clone(),
                    message,
                });
            }
            challenged = true;
            match auth::parse_challenge(&header) {
                Some(Challenge::Basic) => {
                    if self.credential.is_none() {
                        return Err(RegistryError::Unauthorized {
                            registry: self.registry.clone(),
                            message: format!(
                                "{message}; the registry wants a user name and password \
                                 (boxlite login {})",
                                self.registry
                            ),
                        });
                    }
                    self.state.lock().expect("auth state").use_basic();
                }
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: challenge_scope,
                }) => {
                    let wanted = if scope.is_empty() {
                        challenge_scope.unwrap_or_default()
                    } else {
                        scope.to_string()
                    };
                    let token = self.fetch_token(&realm, service.as_deref(), &wanted)?;
                    self.state
                        .lock()
                        .expect("auth state")
                        .store_token(scope, token);
                }
                None if header.is_empty() => {
                    return Err(RegistryError::Unauthorized {
                        registry: self.registry.clone(),
                        message,
                    })
                }
                None => {
                    return Err(RegistryError::BadChallenge {
                        url: strip_query(url),
                        header,
                    })
                }
            }
        }
    }

    fn authorization(&self, scope: &str) -> Option<Secret> {
        let state = self.state.lock().expect("auth state");
        if let Some(token) = state.token(scope) {
            return Some(Secret::new(format!("Bearer {}", token.value.expose())));
        }
        if state.wants_basic() {
            return self.credential.as_ref().map(Credential::basic_header);
        }
        None
    }

    /// One request to the token endpoint (distribution token spec).
    fn fetch_token(&self, realm: &str, service: Option<&str>, scope: &str) -> Result<auth::Token> {
        if !(realm.starts_with("https://") || realm.starts_with("http://")) {
            return Err(RegistryError::BadTokenResponse {
                realm: realm.to_string(),
                reason: "the realm is not an http(s) URL".to_string(),
            });
        }
        let mut url = realm.to_string();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for (key, value) in [("service", service), ("scope", Some(scope))] {
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                url.push(sep);
                url.push_str(&format!("{key}={}", auth::query_escape(value)));
                sep = '&';
            }
        }
        // Credentials travel to the realm only over TLS, or to this machine / a listed host.
        let realm_host = host_of(realm);
        let may_send = realm.starts_with("https://")
            || is_loopback_host(&realm_host)
            || self.settings.is_insecure(&realm_host);
        let authorization = self
            .credential
            .as_ref()
            .filter(|_| may_send)
            .map(Credential::basic_header);
        debug!(realm = %strip_query(realm), scope, "requesting a registry token");
        self.token_requests.fetch_add(1, Ordering::Relaxed);
        let mut resp = match self.credential.as_ref().filter(|_| may_send) {
            Some(c) if c.is_identity_token() => {
                self.refresh_token_grant(realm, service, scope, &c.password)?
            }
            _ => self.get_with_redirects(&url, &[], authorization)?,
        };
        let status = resp.status().as_u16();
        match status {
            200 => {
                let body = read_limited(&mut resp, SMALL_BODY_LIMIT, realm)?;
                auth::parse_token_response(realm, &body)
            }
            401 | 403 => Err(RegistryError::TokenDenied {
                realm: strip_query(realm),
                status,
                message: read_message(&mut resp),
            }),
            _ => Err(RegistryError::Status {
                url: strip_query(realm),
                status,
                message: read_message(&mut resp),
            }),
        }
    }

    /// The OAuth2 refresh-token grant of the distribution token spec (`POST realm`, form
    /// encoded), for identity tokens.
    fn refresh_token_grant(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        refresh_token: &Secret,
    ) -> Result<Response<Body>> {
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("client_id", "boxlite"),
            ("refresh_token", refresh_token.expose()),
        ];
        if let Some(service) = service {
            form.push(("service", service));
        }
        if !scope.is_empty() {
            form.push(("scope", scope));
        }
        self.agent
            .post(realm)
            .send_form(form)
            .map_err(|source| RegistryError::transport(strip_query(realm), source))
    }

    /// A GET that follows redirects itself, dropping `authorization` when the origin changes.
    fn get_with_redirects(
        &self,
        url: &str,
        headers: &[(&str, String)],
        mut authorization: Option<Secret>,
    ) -> Result<Response<Body>> {
        let mut current = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.get(&current);
            for (name, value) in headers {
                req = req.header(*name, value);
            }
            if let Some(a) = &authorization {
                req = req.header("Authorization", a.expose());
            }
            let resp = req
                .call()
                .map_err(|source| RegistryError::transport(strip_query(&current), source))?;
            let status = resp.status();
            debug!(url = %strip_query(&current), status = status.as_u16(), "registry response");
            if !status.is_redirection() || status.as_u16() == 304 {
                return Ok(resp);
            }
            let Some(location) = resp.headers().get("location").and_then(|v| v.to_str().ok())
            else {
                return Ok(resp);
            };
            let next = resolve_location(&current, location);
            if current.starts_with("https://") && !next.starts_with("https://") {
                return Err(RegistryError::BadRedirect {
                    from: strip_query(&current),
                    to: strip_query(&next),
                    reason: "it leaves HTTPS".to_string(),
                });
            }
            if origin(&next) != origin(&current) && authorization.take().is_some() {
                debug!(to = %strip_query(&next), "redirect to another host: credentials dropped");
            }
            current = next;
        }
        Err(RegistryError::TooManyRedirects {
            url: strip_query(url),
        })
    }
}

/// The token scope for pulling from `repository`.
pub fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

fn read_limited(resp: &mut Response<Body>, limit: u64, url: &str) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let reader = resp.body_mut().as_reader();
    reader
        .take(limit + 1)
        .read_to_end(&mut body)
        .map_err(|source| RegistryError::Body {
            url: strip_query(url),
            source,
        })?;
    if body.len() as u64 > limit {
        return Err(RegistryError::TooLarge {
            url: strip_query(url),
            limit,
        });
    }
    Ok(body)
}

fn read_message(resp: &mut Response<Body>) -> String {
    let mut body = Vec::new();
    let _ = resp
        .body_mut()
        .as_reader()
        .take(SMALL_BODY_LIMIT)
        .read_to_end(&mut body);
    auth::error_message(&body)
}

/// `bytes 100-199/200` → 100.
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes")?.trim();
    range.split('-').next()?.trim().parse().ok()
}

/// `scheme://authority` of an absolute URL.
fn origin(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
            format!(
                "{}://{}",
                scheme.to_ascii_lowercase(),
                authority.to_ascii_lowercase()
            )
        }
        None => String::new(),
    }
}

/// The host[:port] of an absolute URL.
fn host_of(url: &str) -> String {
    let o = origin(url);
    o.split_once("://").map(|(_, a)| a.to_string()).unwrap_or(o)
}

/// Resolves a `Location` header against the URL that sent it.
fn resolve_location(current: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let base = origin(current);
    if let Some(rest) = location.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        return format!("{scheme}://{rest}");
    }
    if location.starts_with('/') {
        return format!("{base}{location}");
    }
    let path = current[base.len()..]
        .split(['?', '#'])
        .next()
        .unwrap_or("/");
    let dir = &path[..path.rfind('/').map(|i| i + 1).unwrap_or(0)];
    format!("{base}{dir}{location}")
}

/// A URL without its query string, for logs and messages.
pub fn strip_query(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or(url).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_targets() {
        let cur = "http://127.0.0.1:5000/v2/a/blobs/sha256:00";
        assert_eq!(
            resolve_location(cur, "/x?y=1"),
            "http://127.0.0.1:5000/x?y=1"
        );
        assert_eq!(resolve_location(cur, "//h:1/p"), "http://h:1/p");
        assert_eq!(resolve_location(cur, "https://s3/x"), "https://s3/x");
        assert_eq!(
            resolve_location(cur, "z"),
            "http://127.0.0.1:5000/v2/a/blobs/z"
        );
        assert_eq!(origin("HTTP://Host:1/p?q"), "http://host:1");
        assert_ne!(
            origin("http://127.0.0.1:5000/a"),
            origin("http://127.0.0.1:5001/a")
        );
        assert_eq!(
            strip_query("https://s3/x?X-Amz-Signature=abc"),
            "https://s3/x"
        );
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
    }
}
