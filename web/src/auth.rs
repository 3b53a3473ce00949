//! Who may do what: the console's admin login (argon2 password hash, server-side
//! sessions, CSRF tokens) and the API's bearer key (compared in constant time).

use crate::error::ApiError;
use crate::state::AppState;
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use loraloop_core::Db;
use loraloop_core::token::{constant_time_eq, random_token, sha256_hex};
use secrecy::{ExposeSecret, SecretString};

pub const SESSION_COOKIE: &str = "loraloop_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
pub const CSRF_FIELD: &str = "_csrf";
pub const ADMIN_USER: &str = "admin";
/// Sessions last a week.
const SESSION_DAYS: i64 = 7;

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?
        .to_string())
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Make sure the admin account exists. With `LORALOOP_ADMIN_PASSWORD` set, its hash is
/// stored (replacing an older one). Unset, a password is generated the first time and
/// returned so `serve` can print it once; only its hash is kept.
pub async fn ensure_admin(
    db: &Db,
    password: Option<&SecretString>,
) -> anyhow::Result<Option<String>> {
    let stored = db.admin_credentials(ADMIN_USER).await?;
    let (new_password, generated) = match (password, &stored) {
        (Some(p), Some((_, hash))) if verify_password(p.expose_secret(), hash) => return Ok(None),
        (Some(p), _) => (p.expose_secret().to_string(), false),
        (None, Some(_)) => return Ok(None),
        (None, None) => (random_token(12), true),
    };
    let pw = new_password.clone();
    let hash = tokio::task::spawn_blocking(move || hash_password(&pw)).await??;
    // A new password ends every session of the old one.
    db.set_admin_password(ADMIN_USER, &hash).await?;
    Ok(generated.then_some(new_password))
}

/// Check a login; on success a new session: (cookie value, CSRF token).
pub async fn login(
    db: &Db,
    username: &str,
    password: &str,
) -> anyhow::Result<Option<(String, String)>> {
    let stored = db.admin_credentials(username).await?;
    let pw = password.to_string();
    // Verify against a dummy hash for unknown users too, so timing does not tell them apart.
    let (id, hash) = stored.unwrap_or((-1, DUMMY_HASH.to_string()));
    let ok = tokio::task::spawn_blocking(move || verify_password(&pw, &hash)).await?;
    if !ok || id < 0 {
        return Ok(None);
    }
    let token = random_token(32);
    let csrf = random_token(16);
    let expires = (chrono::Utc::now() + chrono::Duration::days(SESSION_DAYS))
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    db.insert_web_session(&sha256_hex(&token), id, &csrf, &expires)
        .await?;
    Ok(Some((token, csrf)))
}

pub async fn logout(db: &Db, token: &str) -> anyhow::Result<()> {
    db.delete_web_session(&sha256_hex(token)).await?;
    Ok(())
}

/// argon2 hash of a random password nobody knows, for constant-time failed logins.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2E3qhB8s6J5zVnqX9gJ8oCqRk3Z1m9bN2t0yH4uKp7A";

/// The session cookie header for `token`. `Secure` when the request came over HTTPS
/// (directly or through a proxy that says so with `X-Forwarded-Proto: https`).
pub fn session_cookie(token: &str, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_DAYS * 86400,
        if secure { "; Secure" } else { "" }
    )
}

pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

pub fn is_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A logged-in console session.
#[derive(Debug, Clone)]
pub struct AdminSession {
    pub admin_id: i64,
    pub csrf: String,
    pub token: String,
}

pub async fn session_from_headers(db: &Db, headers: &HeaderMap) -> Option<AdminSession> {
    let token = cookie_value(headers, SESSION_COOKIE)?;
    let now = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    let row = db.web_session(&sha256_hex(&token), &now).await.ok()?;
    row.map(|(admin_id, csrf)| AdminSession {
        admin_id,
        csrf,
        token,
    })
}

/// Without a session: pages redirect to the login page, everything else gets a 401.
pub struct LoginRequired {
    redirect: bool,
}

impl IntoResponse for LoginRequired {
    fn into_response(self) -> Response {
        if self.redirect {
            Redirect::to("/login").into_response()
        } else {
            ApiError::unauthorized("log in to the console first").into_response()
        }
    }
}

impl FromRequestParts<AppState> for AdminSession {
    type Rejection = LoginRequired;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(s) = parts.extensions.get::<AdminSession>() {
            return Ok(s.clone());
        }
        session_from_headers(&state.core.db, &parts.headers)
            .await
            .ok_or(LoginRequired {
                redirect: parts.method == Method::GET
                    && parts
                        .headers
                        .get(header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.contains("text/html")),
            })
    }
}

/// Console middleware: every route needs a session; every request that changes
/// something (anything but GET/HEAD) must carry the session's CSRF token, in the
/// `X-CSRF-Token` header, a `_csrf` form field (URL-encoded forms) or a `_csrf` query
/// parameter (multipart uploads).
pub async fn require_session(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let session = match AdminSession::from_request_parts(&mut parts, &state).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let mut req = Request::from_parts(parts, body);
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut provided = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| query_param(req.uri().query().unwrap_or(""), CSRF_FIELD));
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if provided.is_none() && form {
            let (parts, body) = req.into_parts();
            let bytes = match axum::body::to_bytes(body, 1 << 20).await {
                Ok(b) => b,
                Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "form too large").into_response(),
            };
            provided = query_param(std::str::from_utf8(&bytes).unwrap_or(""), CSRF_FIELD);
            req = Request::from_parts(parts, axum::body::Body::from(bytes));
        }
        if !provided.is_some_and(|p| constant_time_eq(&p, &session.csrf)) {
            return (
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token: reload the page and try again",
            )
                .into_response();
        }
    }
    req.extensions_mut().insert(session);
    next.run(req).await
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url_decode_pairs(query)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// `a=1&b=x%20y` into pairs (application/x-www-form-urlencoded).
pub fn url_decode_pairs(s: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    match u8::from_str_radix(
                        std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                        16,
                    ) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// API middleware: `Authorization: Bearer <LORALOOP_API_KEY>`. With no key configured the
/// API is closed (every request is a 401 that says how to open it).
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else {
        return ApiError::unauthorized("the API is disabled: set LORALOOP_API_KEY and restart")
            .into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let refused = match given {
        Some(g) if constant_time_eq(g, key.expose_secret()) => return next.run(req).await,
        Some(_) => ApiError::unauthorized("the API key is wrong"),
        None => ApiError::unauthorized("send the API key as `Authorization: Bearer <key>`"),
    };
    // RFC 6750: a 401 names the scheme it wants.
    let mut response = refused.into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// The token of an `Authorization` value whose scheme is Bearer, in any case (RFC 7235:
/// the scheme is case-insensitive; clients send `bearer` too).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer_token("Bearer k1"), Some("k1"));
        assert_eq!(bearer_token("bearer k1"), Some("k1"));
        assert_eq!(bearer_token("BEARER  k1 "), Some("k1"));
        assert_eq!(bearer_token("Basic k1"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerk1"), None);
    }

    #[test]
    fn a_password_verifies_against_its_hash_and_nothing_else() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct hors", &h));
        assert!(!verify_password("correct horse", DUMMY_HASH));
    }

    #[test]
    fn form_pairs_are_decoded() {
        assert_eq!(
            url_decode_pairs("a=1&_csrf=ab%2Fc&msg=hi+there&e"),
            vec![
                ("a".into(), "1".into()),
                ("_csrf".into(), "ab/c".into()),
                ("msg".into(), "hi there".into()),
                ("e".into(), String::new()),
            ]
        );
        assert_eq!(
            url_decode_pairs("x=%zz%4"),
            vec![("x".into(), "%zz%4".into())]
        );
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; loraloop_session=tok; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_value(&h, SESSION_COOKIE).as_deref(), Some("tok"));
        assert_eq!(cookie_value(&h, "c"), None);
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
    }
}
