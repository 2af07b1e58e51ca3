//! Bearer tokens: JWT signed with HS256. `sub` is the user id; `exp` is required. Anything
//! else (`alg: none`, other algorithms, a wrong signature, an expired token) is refused.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::header::{HeaderMap, AUTHORIZATION};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::user::UserId;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: u64,
    /// Optional scope, e.g. `preview` for the short-lived preview links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid or expired token")]
    Invalid,
}

#[derive(Clone)]
pub struct Auth {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
}

impl Auth {
    pub fn new(secret: &[u8]) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Auth {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// A token for `user`, valid for `ttl`.
    pub fn issue(&self, user: &UserId, ttl: Duration) -> anyhow::Result<String> {
        self.issue_scoped(user, ttl, None)
    }

    pub fn issue_scoped(
        &self,
        user: &UserId,
        ttl: Duration,
        scope: Option<&str>,
    ) -> anyhow::Result<String> {
        let now = unix_now();
        let claims = Claims {
            sub: user.to_string(),
            iat: now,
            exp: now + ttl.as_secs().max(1),
            scope: scope.map(str::to_owned),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.enc,
        )?)
    }

    /// The user a general-purpose token belongs to.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        self.verify_scoped(token, None)
    }

    /// Verifies a token carrying exactly `scope` (None: a general token).
    pub fn verify_scoped(&self, token: &str, scope: Option<&str>) -> Result<UserId, AuthError> {
        if token.is_empty() || token.len() > 4096 {
            return Err(AuthError::Invalid);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation)
            .map_err(|_| AuthError::Invalid)?;
        if data.claims.scope.as_deref() != scope {
            return Err(AuthError::Invalid);
        }
        UserId::parse(&data.claims.sub).map_err(|_| AuthError::Invalid)
    }

    /// Authenticates a request by its `Authorization: Bearer` header.
    pub fn from_headers(&self, headers: &HeaderMap) -> Result<UserId, AuthError> {
        let token = bearer(headers).ok_or(AuthError::Missing)?;
        self.verify(token)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The signing secret: `auth_secret` when set, else the contents of `auth_secret_file`,
/// generated (32 random bytes, hex, mode 0600) when the file does not exist.
pub fn load_secret(cfg: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(s) = &cfg.auth_secret {
        return Ok(s.as_bytes().to_vec());
    }
    read_or_create_secret(&cfg.auth_secret_file)
}

fn read_or_create_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let s = s.trim();
            if s.len() < 16 {
                bail!(
                    "{} holds a secret shorter than 16 characters",
                    path.display()
                );
            }
            return Ok(s.as_bytes().to_vec());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(secret.as_bytes())?;
            Ok(secret.into_bytes())
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_or_create_secret(path),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn auth() -> Auth {
        Auth::new(b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn round_trip() {
        let u = UserId::parse("42").unwrap();
        let t = auth().issue(&u, Duration::from_secs(60)).unwrap();
        assert_eq!(auth().verify(&t), Ok(u.clone()));
        // A scoped token is not a general one, and vice versa.
        let p = auth()
            .issue_scoped(&u, Duration::from_secs(60), Some("preview"))
            .unwrap();
        assert_eq!(auth().verify(&p), Err(AuthError::Invalid));
        assert_eq!(auth().verify_scoped(&p, Some("preview")), Ok(u));
    }

    #[test]
    fn rejects_forgeries() {
        let u = UserId::parse("42").unwrap();
        let other = Auth::new(b"another-secret-another-secret!!");
        let t = other.issue(&u, Duration::from_secs(60)).unwrap();
        assert_eq!(auth().verify(&t), Err(AuthError::Invalid));
        // alg: none
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(br#"{"sub":"42","exp":9999999999,"iat":0}"#);
        assert_eq!(
            auth().verify(&format!("{header}.{body}.")),
            Err(AuthError::Invalid)
        );
        // expired
        let now = unix_now();
        let claims = Claims {
            sub: "42".into(),
            exp: now - 3600,
            iat: now - 7200,
            scope: None,
        };
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert_eq!(auth().verify(&t), Err(AuthError::Invalid));
        // invalid subject
        let claims = Claims {
            sub: "../x".into(),
            exp: now + 60,
            iat: now,
            scope: None,
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert_eq!(auth().verify(&t), Err(AuthError::Invalid));
        assert_eq!(auth().verify("garbage"), Err(AuthError::Invalid));
    }

    #[test]
    fn bearer_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, "bearer   ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn secret_file_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/secret");
        let a = read_or_create_secret(&p).unwrap();
        let b = read_or_create_secret(&p).unwrap();
        assert_eq!(a, b);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
