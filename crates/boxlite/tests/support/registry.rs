//! Test support: a real Docker distribution registry (Debian's `docker-registry`) on 127.0.0.1
//! with a free port and storage in a temporary folder, without auth, with htpasswd Basic auth,
//! or with token auth backed by a small token issuer of our own (RS256 JWTs signed by a key
//! whose certificate is the registry's `rootcertbundle`; signing is done by `openssl`).
//!
//! Use from a test file with `#[path = "support/registry.rs"] mod registry;`.
//! Needs: docker-registry, openssl, htpasswd (apache2-utils) on PATH.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// An image manager in a home of its own (the folder goes when the first value is dropped).
pub fn manager() -> (tempfile::TempDir, boxlite::images::manager::ImageManager) {
    let dir = tempfile::tempdir().unwrap();
    let home = boxlite::home::Home::open(dir.path()).unwrap();
    let images = boxlite::images::manager::ImageManager::new(&home).unwrap();
    (dir, images)
}

/// Pull options without progress output.
pub fn quiet() -> boxlite::images::pull::PullOptions {
    boxlite::images::pull::PullOptions {
        quiet: true,
        ..Default::default()
    }
}

/// An error with all its sources, `: `-separated, as the CLI prints it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How the registry wants clients to authenticate.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    /// htpasswd Basic auth with one user.
    Basic {
        user: String,
        password: String,
    },
    /// Token auth. `user` (if any) may push and pull; anonymous clients may pull when
    /// `anonymous_pull`.
    Token {
        user: Option<(String, String)>,
        anonymous_pull: bool,
    },
}

/// A running registry; killed (it is our child) when dropped.
pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    pub issuer: Option<TokenIssuer>,
    basic_user: Option<(String, String)>,
}

/// Whether our `child` serves `port`: it accepts connections and is still running a moment
/// later (a registry that lost the port to someone else exits).
fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            std::thread::sleep(Duration::from_millis(300));
            return matches!(child.try_wait(), Ok(None));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A free TCP port on 127.0.0.1 (bound, then released: fine for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let mut issuer = None;
        let auth_yaml = match &auth {
            Auth::None => String::new(),
            Auth::Basic { user, password } => {
                let htpasswd = dir.path().join("htpasswd");
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("htpasswd (apache2-utils) must be installed");
                assert!(out.status.success());
                std::fs::write(&htpasswd, out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: boxlite-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            Auth::Token {
                user,
                anonymous_pull,
            } => {
                let t = TokenIssuer::start(dir.path(), user.clone(), *anonymous_pull);
                let yaml = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                    t.realm(),
                    t.cert.display()
                );
                issuer = Some(t);
                yaml
            }
        };
        let basic_user = match &auth {
            Auth::Basic { user, password } => Some((user.clone(), password.clone())),
            _ => None,
        };
        // Another test may take the free port between our probe and the registry's bind: then
        // the registry exits, and we try another port.
        for _ in 0..5 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: boxlite-test-secret\n{auth_yaml}",
                dir.path().join("data").display()
            );
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdout(std::fs::File::create(dir.path().join("access.log")).unwrap())
                .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
                .spawn()
                .expect("docker-registry must be installed");
            if wait_ready(&mut child, port) {
                return Registry {
                    child,
                    port,
                    dir,
                    issuer,
                    basic_user,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "docker-registry did not start: {}",
            std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
        );
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The access log (combined log format, one line per request).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Successful GETs of blob `digest` (`sha256:…`) by boxlite.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.access_log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
            .filter(|l| l.contains("\" 200 ") || l.contains("\" 206 "))
            .filter(|l| l.contains("boxlite/"))
            .count()
    }

    /// Pushes `source` (a skopeo transport reference such as `oci:/dir:tag`) to `repo_tag` in
    /// this registry with `skopeo copy`; `extra` are more skopeo arguments.
    pub fn push(&self, source: &str, repo_tag: &str, extra: &[&str]) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(TokenIssuer {
            user: Some((u, p)), ..
        }) = &self.issuer
        {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        if let Some((u, p)) = &self.basic_user {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        cmd.args(extra)
            .arg(source)
            .arg(format!("docker://{}/{repo_tag}", self.host()));
        let out = cmd.output().expect("skopeo must be installed");
        assert!(
            out.status.success(),
            "skopeo copy {source} → {repo_tag} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const SERVICE: &str = "boxlite-test-registry";
pub const ISSUER: &str = "boxlite-test-issuer";

/// One request the token issuer received.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub url: String,
    pub authorization: Option<String>,
}

/// A token endpoint on 127.0.0.1 that signs registry JWTs with its own key.
pub struct TokenIssuer {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    port: u16,
    pub cert: PathBuf,
    pub user: Option<(String, String)>,
    pub requests: Arc<Mutex<Vec<TokenRequest>>>,
}

impl TokenIssuer {
    fn start(dir: &Path, user: Option<(String, String)>, anonymous_pull: bool) -> TokenIssuer {
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=boxlite-test-issuer", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let spki = Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(spki.status.success());
        let kid = libtrust_key_id(&spki.stdout);

        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let server = server.clone();
            let requests = requests.clone();
            let user = user.clone();
            std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    let authorization = header(&req, "Authorization");
                    requests.lock().unwrap().push(TokenRequest {
                        url: req.url().to_string(),
                        authorization: authorization.clone(),
                    });
                    let (subject, may_push) = match (&user, &authorization) {
                        (Some((u, p)), Some(a)) => {
                            let want = format!(
                                "Basic {}",
                                base64::engine::general_purpose::STANDARD
                                    .encode(format!("{u}:{p}"))
                            );
                            if *a != want {
                                let _ = req.respond(
                                    tiny_http::Response::from_string(
                                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                                    )
                                    .with_status_code(401),
                                );
                                continue;
                            }
                            (u.clone(), true)
                        }
                        _ if anonymous_pull || user.is_none() => (String::new(), user.is_none()),
                        _ => {
                            let _ = req.respond(
                                tiny_http::Response::from_string(
                                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"credentials required"}]}"#,
                                )
                                .with_status_code(401),
                            );
                            continue;
                        }
                    };
                    let scopes = query_values(req.url(), "scope");
                    let token = sign_token(&key, &kid, &subject, &scopes, may_push);
                    let body = format!(r#"{{"token":"{token}","expires_in":300}}"#);
                    let _ = req.respond(tiny_http::Response::from_string(body).with_header(
                        tiny_http::Header::from_bytes("Content-Type", "application/json").unwrap(),
                    ));
                }
            })
        };
        TokenIssuer {
            server,
            thread: Some(thread),
            port,
            cert,
            user,
            requests,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Token requests so far.
    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn header(req: &tiny_http::Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

/// Every value of query parameter `key`, percent-decoded.
pub fn query_values(url: &str, key: &str) -> Vec<String> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?');
                out.push(h);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The key id docker's libtrust gives a public key: base32 of the first 240 bits of the
/// SHA-256 of its DER SubjectPublicKeyInfo, in 12 groups of 4 separated by ':'.
fn libtrust_key_id(spki_der: &[u8]) -> String {
    let hash = Sha256::digest(spki_der);
    let b32 = base32(&hash[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":")
}

fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut buffer = 0u32;
    let mut bits = 0;
    for &b in data {
        buffer = (buffer << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buffer >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A registry JWT granting the requested scopes (pull always; push when `may_push`).
fn sign_token(key: &Path, kid: &str, subject: &str, scopes: &[String], may_push: bool) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .flat_map(|s| s.split(' '))
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|a| *a == "pull" || (may_push && *a == "push"))
                .collect();
            Some(serde_json::json!({"type": kind, "name": name, "actions": granted}))
        })
        .collect();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": kid});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": subject, "aud": SERVICE,
        "exp": now + 600, "nbf": now - 60, "iat": now,
        "jti": format!("{now}-{}", rand_suffix()),
        "access": access,
    });
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    format!("{input}.{}", b64url(&out.stdout))
}

fn rand_suffix() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The generator of shared case `prefix` (e.g. "17-"): `<repo>/../shared/cases/` first (CI's
/// layout), then `/work/shared/cases/`.
pub fn case_script(prefix: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for dir in [
        repo.join("../shared/cases"),
        PathBuf::from("/work/shared/cases"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) && name.ends_with(".py") {
                    return e.path();
                }
            }
        }
    }
    panic!("case generator {prefix}*.py not found beside the repository or in /work/shared/cases");
}

/// Runs case generator `prefix` into a fresh temporary folder.
pub fn run_case(prefix: &str, args: &[&str]) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new("python3")
        .arg(case_script(prefix))
        .arg(out.path())
        .args(args)
        .status()
        .expect("python3 must be installed");
    assert!(status.success(), "case generator {prefix} failed");
    out
}
