//! Image references as users type them (`alpine`, `localhost:5000/x:1`, `name:tag@sha256:…`),
//! normalised the way Docker does it (distribution's `reference` grammar): a first path component
//! that holds a `.` or a `:` or is `localhost` names the registry, otherwise the registry is
//! `docker.io`; a single-component Docker Hub name lives under `library/`; no tag and no digest
//! means `latest`.

use std::fmt;
use std::str::FromStr;

use crate::images::digest::Digest;

/// The registry that an unqualified name lives in.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed, normalised image reference.
///
/// ```
/// use boxlite::images::reference::Reference;
/// let r: Reference = "alpine".parse().unwrap();
/// assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// A reference that does not follow the grammar; `reference` is what the user typed.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct InvalidReference {
    pub reference: String,
    pub reason: String,
}

impl Reference {
    /// The registry host (with port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry, e.g. `library/alpine`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry's manifest endpoint for: the digest when there is one, else the
    /// tag (a digest pins the content, so it wins over a tag given beside it).
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The host to contact for the registry's API: Docker Hub's API lives on its own name.
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// The same repository with another digest and no tag (`name@sha256:…`).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = InvalidReference;

    fn from_str(input: &str) -> Result<Reference, InvalidReference> {
        let bad = |reason: &str| InvalidReference {
            reference: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(bad("empty"));
        }
        if input.len() > 4096 {
            return Err(bad("longer than 4096 characters"));
        }

        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest = d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?;
                (rest, Some(digest))
            }
            None => (input, None),
        };

        // A tag is after the last ':' that comes after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                check_tag(tag).map_err(|r| bad(&r))?;
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };

        let (registry, repository) = split_registry(name);
        if registry.is_empty() {
            return Err(bad("empty registry host"));
        }
        check_registry(registry).map_err(|r| bad(&r))?;
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        check_repository(&repository).map_err(|r| bad(&r))?;

        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry: normalise_registry(registry),
            repository,
            tag,
            digest,
        })
    }
}

/// Docker Hub goes by several names; they all mean `docker.io`.
fn normalise_registry(registry: &str) -> String {
    match registry {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DEFAULT_REGISTRY.to_string()
        }
        other => other.to_string(),
    }
}

fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => (DEFAULT_REGISTRY, name),
    }
}

fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
        ))
    }
}

fn check_registry(host: &str) -> Result<(), String> {
    let ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "registry host {host:?} has characters a host name cannot have"
        ))
    }
}

/// Path components: lowercase alphanumerics separated by `.`, `_`, `__` or runs of `-`.
fn check_repository(repo: &str) -> Result<(), String> {
    for component in repo.split('/') {
        let bytes = component.as_bytes();
        let ends_ok = bytes.first().is_some_and(|b| is_lower_alnum(*b))
            && bytes.last().is_some_and(|b| is_lower_alnum(*b));
        let chars_ok = bytes
            .iter()
            .all(|b| is_lower_alnum(*b) || matches!(b, b'.' | b'_' | b'-'));
        let separators_ok = !component.contains("..") && !component.contains("___");
        if !(ends_ok && chars_ok && separators_ok) {
            return Err(format!(
                "repository component {component:?} must be lowercase letters and digits \
                 separated by '.', '_' or '-'"
            ));
        }
    }
    Ok(())
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// Whether a registry host is on this machine's loopback, reached over plain HTTP.
pub fn is_loopback_host(registry: &str) -> bool {
    let host = host_without_port(registry);
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

/// `host:port` → `host`, `[::1]:5000` → `::1`.
pub fn host_without_port(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn norm(s: &str) -> String {
        s.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn normalises_like_docker() {
        assert_eq!(norm("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            norm("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(norm("localhost:5000/x:1"), "localhost:5000/x:1");
        assert_eq!(norm("localhost/x"), "localhost/x:latest");
        assert_eq!(norm("quay.io/a/b/c:v1.2-rc"), "quay.io/a/b/c:v1.2-rc");
        assert_eq!(
            norm(&format!("127.0.0.1:5000/a/b@{D}")),
            format!("127.0.0.1:5000/a/b@{D}")
        );
        assert_eq!(
            norm(&format!("name:tag@{D}")),
            format!("docker.io/library/name:tag@{D}")
        );
    }

    #[test]
    fn digest_wins_for_the_manifest_request() {
        let r: Reference = format!("name:tag@{D}").parse().unwrap();
        assert_eq!(r.manifest_reference(), D);
        let r: Reference = "localhost:5000/x:1".parse().unwrap();
        assert_eq!(r.manifest_reference(), "1");
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "x");
        assert_eq!(r.api_host(), "localhost:5000");
        assert_eq!(
            "alpine".parse::<Reference>().unwrap().api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn errors_name_the_reference() {
        for bad in [
            "",
            "Alpine",
            "alpine:",
            "alpine:-x",
            "a//b",
            "alpine@sha256:abc",
            "local host:5000/x",
            "x/../y",
            "/x",
        ] {
            let err = bad.parse::<Reference>().unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "error for {bad:?} must quote it: {err}"
            );
        }
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("127.0.0.1:38123"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("docker.io"));
        assert!(!is_loopback_host("localhost.example.com"));
    }
}
