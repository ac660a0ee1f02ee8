//! Registry authentication: `WWW-Authenticate` challenges (RFC 7235) and the distribution token
//! spec (`GET realm?service=…&scope=…` → `{"token"|"access_token", "expires_in"}`).
//!
//! Token rules that real registries rely on: the bearer may come as `token`, as `access_token`
//! or as both; `expires_in` missing means 60 seconds and anything below 60 counts as 60; a token
//! is cached per scope and reused until it expires. One challenge leads to at most one token
//! request: a refusal is an error, never a loop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::credentials::Secret;
use super::{RegistryError, Result};

/// The least lifetime the token spec grants a token.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// One parsed challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value; the first Basic or Bearer challenge wins.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `a="x, y",b=z` → [(a, "x, y"), (b, z)], honouring quotes and backslash escapes.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            name.push(c);
            chars.next();
        }
        if chars.next() != Some('=') {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((name.trim().to_string(), value.trim().to_string()));
    }
}

/// A bearer token and when it stops being usable.
#[derive(Debug, Clone)]
pub struct Token {
    pub value: Secret,
    pub expires: Instant,
}

/// Reads a token endpoint's 200 body.
pub fn parse_token_response(realm: &str, body: &[u8]) -> Result<Token> {
    let bad = |reason: &str| RegistryError::BadTokenResponse {
        realm: realm.to_string(),
        reason: reason.to_string(),
    };
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| bad("token response is not JSON"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("token response is not a JSON object"))?;
    let field = |k: &str| {
        obj.get(k)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    };
    let token = field("token")
        .or_else(|| field("access_token"))
        .ok_or_else(|| bad("token response has neither token nor access_token"))?;
    let lifetime = obj
        .get("expires_in")
        .and_then(|v| v.as_u64())
        .map(Duration::from_secs)
        .unwrap_or(MIN_TOKEN_LIFETIME)
        .max(MIN_TOKEN_LIFETIME);
    Ok(Token {
        value: Secret::new(token),
        expires: Instant::now() + lifetime,
    })
}

/// The registry's `{"errors":[{"message":…}]}`, else the start of the body as text.
pub fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(body) {
        let parts: Vec<String> = e
            .errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", e.code, e.message),
                (false, true) => e.code.clone(),
                _ => e.message.clone(),
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.trim().chars().take(200).collect();
    if text.is_empty() {
        "(no message)".to_string()
    } else {
        text
    }
}

/// What a client has learned about one registry's auth: tokens per scope, and whether it wants
/// Basic credentials on every request.
#[derive(Debug, Default)]
pub struct AuthState {
    tokens: HashMap<String, Token>,
    basic: bool,
}

impl AuthState {
    /// A cached token for `scope` that is still valid.
    pub fn token(&self, scope: &str) -> Option<&Token> {
        self.tokens
            .get(scope)
            .filter(|t| t.expires > Instant::now())
    }

    pub fn store_token(&mut self, scope: &str, token: Token) {
        self.tokens.insert(scope.to_string(), token);
    }

    pub fn use_basic(&mut self) {
        self.basic = true;
    }

    pub fn wants_basic(&self) -> bool {
        self.basic
    }
}

/// `application/x-www-form-urlencoded` style escaping for a query value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=http://x/t"),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
    }

    #[test]
    fn token_shapes() {
        let t = parse_token_response("r", br#"{"access_token":"A","expires_in":300}"#).unwrap();
        assert_eq!(t.value.expose(), "A");
        assert!(t.expires > Instant::now() + Duration::from_secs(290));
        let t = parse_token_response("r", br#"{"token":"T","expires_in":1}"#).unwrap();
        assert!(t.expires > Instant::now() + Duration::from_secs(55));
        let t = parse_token_response("r", br#"{"token":"","access_token":"B"}"#).unwrap();
        assert_eq!(t.value.expose(), "B");
        let e = parse_token_response("r", b"{}").unwrap_err().to_string();
        assert!(e.contains("neither token nor access_token"), "{e}");
        let e = parse_token_response("r", b"<html>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not JSON"), "{e}");
    }

    #[test]
    fn registry_errors() {
        assert_eq!(
            error_message(br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#),
            "UNAUTHORIZED: bad credentials"
        );
        assert_eq!(
            query_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
