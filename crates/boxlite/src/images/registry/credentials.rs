//! Registry credentials: where they come from and how they are kept.
//!
//! Lookup order for a registry host: boxlite's own store (`auth.json` in the home folder, written
//! by `boxlite login`, mode 0600), then Docker's client config (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`): `credHelpers[host]`, then `credsStore`, then `auths[host].auth`
//! (base64 `user:password`). Helpers are the `docker-credential-<name>` programs of Docker's
//! credential-helper protocol (`get`, server URL on stdin, JSON on stdout).
//!
//! [`Secret`] wraps every password and token: its `Debug` and `Display` print `<redacted>`, so
//! no log line or error message can carry one.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{RegistryError, Result};
use crate::home::Home;
use crate::images::reference::DEFAULT_REGISTRY;

/// A string that must never be printed (password, token).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for building a request header. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A user name and password for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: Secret,
}

impl Credential {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Credential {
        Credential {
            username: username.into(),
            password: Secret::new(password),
        }
    }

    /// Docker's marker user name for an identity token (an OAuth2 refresh token) in place of a
    /// password.
    pub const IDENTITY_TOKEN_USER: &'static str = "<token>";

    /// An identity token: exchanged at the token endpoint by the OAuth2 refresh-token grant.
    pub fn identity_token(token: impl Into<String>) -> Credential {
        Credential::new(Credential::IDENTITY_TOKEN_USER, token)
    }

    pub fn is_identity_token(&self) -> bool {
        self.username == Credential::IDENTITY_TOKEN_USER
    }

    /// The value of an `Authorization: Basic …` header.
    pub fn basic_header(&self) -> Secret {
        let raw = format!("{}:{}", self.username, self.password.expose());
        Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
    }

    fn from_auth_field(auth: &str) -> Option<Credential> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (user, pass) = raw.split_once(':')?;
        Some(Credential::new(user, pass))
    }
}

/// Docker's config.json, the parts that hold credentials. Also the shape of boxlite's auth.json.
#[derive(Debug, Default, Serialize, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(
        rename = "credsStore",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    creds_store: Option<String>,
    #[serde(
        rename = "credHelpers",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    cred_helpers: BTreeMap<String, String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AuthEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identitytoken: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

/// Where credentials are looked up, and where `boxlite login` keeps them.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    boxlite_auth: PathBuf,
    docker_config: Option<PathBuf>,
    tmp_dir: PathBuf,
}

impl CredentialStore {
    /// boxlite's store in `home`, plus Docker's config from `DOCKER_CONFIG` or `~/.docker`.
    pub fn new(home: &Home) -> CredentialStore {
        let docker_config = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
            .map(|dir| dir.join("config.json"));
        CredentialStore {
            boxlite_auth: home.root().join("auth.json"),
            docker_config,
            tmp_dir: home.tmp_dir(),
        }
    }

    /// The credential for `registry` (host[:port] as in a reference), if any source has one.
    pub fn lookup(&self, registry: &str) -> Result<Option<Credential>> {
        if let Some(file) = read_auth_file(&self.boxlite_auth)? {
            if let Some(c) = find_in_auths(&file, registry) {
                return Ok(Some(c));
            }
        }
        let Some(path) = &self.docker_config else {
            return Ok(None);
        };
        let Some(file) = read_auth_file(path)? else {
            return Ok(None);
        };
        let helper = file
            .cred_helpers
            .iter()
            .find(|(k, _)| same_registry(k, registry))
            .map(|(_, v)| v.clone())
            .or_else(|| file.creds_store.clone());
        if let Some(helper) = helper {
            if let Some(c) = run_helper(&helper, registry)? {
                return Ok(Some(c));
            }
        }
        Ok(find_in_auths(&file, registry))
    }

    /// Stores `credential` for `registry` in boxlite's own file (mode 0600, atomic replace).
    pub fn save(&self, registry: &str, credential: &Credential) -> Result<()> {
        let mut file = read_auth_file(&self.boxlite_auth)?.unwrap_or_default();
        file.auths.retain(|k, _| !same_registry(k, registry));
        let raw = format!("{}:{}", credential.username, credential.password.expose());
        file.auths.insert(
            registry.to_string(),
            AuthEntry {
                auth: Some(base64::engine::general_purpose::STANDARD.encode(raw)),
                identitytoken: None,
                other: BTreeMap::new(),
            },
        );
        self.write(&file)
    }

    /// Forgets boxlite's stored credential for `registry`; false when there was none.
    pub fn remove(&self, registry: &str) -> Result<bool> {
        let Some(mut file) = read_auth_file(&self.boxlite_auth)? else {
            return Ok(false);
        };
        let before = file.auths.len();
        file.auths.retain(|k, _| !same_registry(k, registry));
        if file.auths.len() == before {
            return Ok(false);
        }
        self.write(&file)?;
        Ok(true)
    }

    fn write(&self, file: &AuthFile) -> Result<()> {
        let io_err = |action, source| RegistryError::Io {
            action,
            path: self.boxlite_auth.clone(),
            source,
        };
        let mut tmp = tempfile::NamedTempFile::new_in(&self.tmp_dir)
            .map_err(|e| io_err("creating a temporary file for", e))?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("setting permissions of", e))?;
        let json = serde_json::to_vec_pretty(file).expect("auth file serialises");
        tmp.write_all(&json)
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(|e| io_err("writing", e))?;
        tmp.persist(&self.boxlite_auth)
            .map_err(|e| io_err("replacing", e.error))?;
        Ok(())
    }
}

fn read_auth_file(path: &Path) -> Result<Option<AuthFile>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RegistryError::BadConfig {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RegistryError::Io {
            action: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn find_in_auths(file: &AuthFile, registry: &str) -> Option<Credential> {
    file.auths
        .iter()
        .filter(|(k, _)| same_registry(k, registry))
        .find_map(|(_, e)| match &e.identitytoken {
            Some(token) if !token.is_empty() => Some(Credential::identity_token(token.clone())),
            _ => e.auth.as_deref().and_then(Credential::from_auth_field),
        })
}

/// Docker config keys come as `host`, `https://host/v1/`, … ; Docker Hub under several names.
fn same_registry(key: &str, registry: &str) -> bool {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or(key);
    canonical_registry(host) == canonical_registry(registry)
}

fn canonical_registry(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DEFAULT_REGISTRY,
        other => other,
    }
}

/// The server URL a helper is asked about (Docker Hub keeps its historic URL).
fn helper_server_url(registry: &str) -> String {
    if registry == DEFAULT_REGISTRY {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    }
}

/// Runs `docker-credential-<helper> get`; `None` when the helper has nothing for the registry.
fn run_helper(helper: &str, registry: &str) -> Result<Option<Credential>> {
    #[derive(Deserialize)]
    struct HelperAnswer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let program = format!("docker-credential-{helper}");
    let fail = |message: String| RegistryError::CredentialHelper {
        helper: program.clone(),
        message,
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(helper_server_url(registry).as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        // The helper's own message, never its stdout beyond that: it may hold a secret.
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(fail(format!("{} {}", out.status, stderr.trim())));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("its answer is not the expected JSON: {e}")))?;
    // A user name of "<token>" marks an identity token; the client exchanges it by OAuth2.
    Ok(Some(Credential::new(answer.username, answer.secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let c = Credential::new("tester", "s3cret-pass");
        let shown = format!("{c:?} {:?} {}", c.basic_header(), c.password);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("dGVzdGVyOnMzY3JldC1wYXNz"), "{shown}");
    }

    #[test]
    fn keys_match_hosts() {
        assert!(same_registry("https://index.docker.io/v1/", "docker.io"));
        assert!(same_registry("127.0.0.1:5000", "127.0.0.1:5000"));
        assert!(same_registry("http://127.0.0.1:5000", "127.0.0.1:5000"));
        assert!(!same_registry("127.0.0.1:5001", "127.0.0.1:5000"));
    }

    #[test]
    fn login_store_roundtrip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path()).unwrap();
        let mut store = CredentialStore::new(&home);
        store.docker_config = None;
        store
            .save("127.0.0.1:5000", &Credential::new("u", "p:w"))
            .unwrap();
        let mode = std::fs::metadata(home.root().join("auth.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let c = store.lookup("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.expose()), ("u", "p:w"));
        assert!(store.remove("127.0.0.1:5000").unwrap());
        assert!(store.lookup("127.0.0.1:5000").unwrap().is_none());
        assert!(!store.remove("127.0.0.1:5000").unwrap());
    }

    #[test]
    fn docker_config_auths() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path().join("home")).unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(
            &cfg,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dGVzdGVyOnMzY3JldC1wYXNz"}}}"#,
        )
        .unwrap();
        let mut store = CredentialStore::new(&home);
        store.docker_config = Some(cfg);
        let c = store.lookup("docker.io").unwrap().unwrap();
        assert_eq!(c, Credential::new("tester", "s3cret-pass"));
        assert!(store.lookup("quay.io").unwrap().is_none());

        std::fs::write(
            store.docker_config.as_ref().unwrap(),
            r#"{"auths":{"registry.example":{"auth":"","identitytoken":"REFRESH-1"}}}"#,
        )
        .unwrap();
        let c = store.lookup("registry.example").unwrap().unwrap();
        assert!(c.is_identity_token());
        assert_eq!(c.password.expose(), "REFRESH-1");
    }
}
