//! The web console: server-rendered HTML (maud) with a little JavaScript, all embedded in
//! the binary. Every page but the login page needs an admin session; every form carries
//! the session's CSRF token (see [`crate::auth::require_session`]).

mod pages;

use crate::auth::{self, AdminSession};
use crate::state::AppState;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, PreEscaped, html};

pub const CSS: &str = include_str!("../../assets/console.css");
pub const JS: &str = include_str!("../../assets/console.js");

/// The console's routes: the open ones (login, assets) and those behind a session.
pub fn router(state: AppState) -> Router<AppState> {
    let protected = pages::routes()
        .route("/", get(dashboard))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(state, auth::require_session));
    Router::new()
        .route("/login", get(login_page).post(login))
        .route(
            "/assets/console.css",
            get(|| async { asset(CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/assets/console.js",
            get(|| async { asset(JS, "text/javascript; charset=utf-8") }),
        )
        .merge(protected)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Headers every console page gets: no framing, no sniffing, no referrer leaks, and no
/// copy kept in a cache (pages show users' conversations).
fn secure_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'"),
    );
}

/// The page frame: navigation, the CSRF token for scripts, a flash message.
pub fn layout(title: &str, session: Option<&AdminSession>, active: &str, body: Markup) -> Response {
    let nav = [
        ("/", "Dashboard"),
        ("/conversations", "Conversations"),
        ("/datasets", "Datasets"),
        ("/jobs", "Training"),
        ("/sweeps", "Sweeps"),
        ("/classifiers", "Classifiers"),
        ("/adapters", "Adapters"),
        ("/assistants", "Assistants"),
        ("/playground", "Playground"),
        ("/audit", "Audit log"),
    ];
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(s) = session { meta name="csrf-token" content=(s.csrf); }
                title { (title) " · loraloop" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "loraloop" }
                    @if let Some(s) = session {
                        nav {
                            @for (href, label) in nav {
                                a href=(href) class=[(active == href).then_some("active")] { (label) }
                            }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="_csrf" value=(s.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    };
    let mut resp = markup.into_response();
    secure_headers(&mut resp);
    resp
}

/// `2026-11-22T10:31:05.123Z` as `2026-11-22 10:31` (UTC, as stored).
pub fn short_time(ts: &str) -> String {
    ts.get(..16).unwrap_or(ts).replacen('T', " ", 1)
}

/// What a console handler starts from: the app and the signed-in admin's session.
pub struct Console {
    pub state: AppState,
    pub session: AdminSession,
}

impl axum::extract::FromRequestParts<AppState> for Console {
    type Rejection = auth::LoginRequired;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self {
            state: state.clone(),
            session: AdminSession::from_request_parts(parts, state).await?,
        })
    }
}

/// The query string's `key=value` pairs, decoded: so that a page takes them as an
/// argument instead of parsing `RawQuery` itself.
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for QueryPairs {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(auth::url_decode_pairs(
            parts.uri.query().unwrap_or(""),
        )))
    }
}

/// A URL-encoded form body's pairs, decoded, likewise (a body that is not UTF-8 is refused
/// as the `String` extractor refuses it).
pub struct FormPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for FormPairs {
    type Rejection = axum::extract::rejection::StringRejection;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = String::from_request(req, state).await?;
        Ok(Self(auth::url_decode_pairs(&body)))
    }
}

/// A hidden CSRF field for a form.
pub fn csrf_field(s: &AdminSession) -> Markup {
    html! { input type="hidden" name="_csrf" value=(s.csrf); }
}

/// A page that says what went wrong, with the right status. "Back" goes back in the
/// browser's history (console.js; the CSP forbids a `javascript:` link), else home.
pub fn error_page(session: &AdminSession, status: StatusCode, message: &str) -> Response {
    let mut r = layout(
        "Error",
        Some(session),
        "",
        html! { h1 { "Something went wrong" } p.error { (message) } p { a href="/" data-back { "Back" } } },
    );
    *r.status_mut() = status;
    r
}

async fn login_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if auth::session_from_headers(&state.core.db, &headers)
        .await
        .is_some()
    {
        return Redirect::to("/").into_response();
    }
    login_form(None)
}

fn login_form(error: Option<&str>) -> Response {
    layout(
        "Log in",
        None,
        "",
        html! {
            section.card.login {
                h1 { "Log in" }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/login" {
                    label { "User" input name="username" value="admin" autocomplete="username" required; }
                    label { "Password" input type="password" name="password" autocomplete="current-password" required autofocus; }
                    button type="submit" { "Log in" }
                }
                p.hint { "The password is LORALOOP_ADMIN_PASSWORD, or the one `loraloop serve` printed when it first started." }
            }
        },
    )
}

async fn login(
    State(state): State<AppState>,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    body: String,
) -> Response {
    let ip = crate::limits::client_ip(
        &extensions,
        &headers,
        &state.core.config.raw.server.trusted_proxies,
    );
    if let Some(wait) = state.logins.wait(ip) {
        let minutes = wait.as_secs().div_ceil(60);
        let mut r = login_form(Some(&format!(
            "Too many failed logins from your address: try again in {minutes} minute(s)."
        )));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    // One password check at a time (see `LoginThrottle`).
    let Ok(_permit) = state.logins.hashing.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let pairs = auth::url_decode_pairs(&body);
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    match auth::login(&state.core.db, get("username"), get("password")).await {
        Ok(Some((token, _csrf))) => {
            state.logins.succeeded(ip);
            crate::audit::record(&state, crate::audit::CONSOLE, "log in", &ip.to_string()).await;
            let cookie = auth::session_cookie(&token, auth::is_https(&headers));
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Ok(None) => {
            state.logins.failed(ip);
            crate::audit::record(&state, "console", "failed login", &ip.to_string()).await;
            let mut r = login_form(Some("Wrong user or password."));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        }
        Err(e) => {
            tracing::error!("login: {e:#}");
            let mut r = login_form(Some("The login failed on the server; see its log."));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    }
}

async fn logout(Console { state, session }: Console, headers: HeaderMap) -> Response {
    if let Err(e) = auth::logout(&state.core.db, &session.token).await {
        tracing::error!("logout: {e:#}");
    }
    let cookie = auth::clear_cookie(auth::is_https(&headers));
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

async fn dashboard(Console { state, session }: Console) -> Response {
    let counts = match state.core.db.counts().await {
        Ok(c) => c,
        Err(e) => {
            return error_page(
                &session,
                StatusCode::INTERNAL_SERVER_ERROR,
                &crate::error::ApiError::from(e).message,
            );
        }
    };
    let active = state.core.engine.active_adapter();
    let running = state
        .core
        .db
        .list_jobs(None, 20)
        .await
        .unwrap_or_default()
        .into_iter()
        .find(|j| j.state == "running" || j.state == "queued");
    layout(
        "Dashboard",
        Some(&session),
        "/",
        html! {
            h1 { "Dashboard" }
            div.grid {
                section.card {
                    h2 { "Assistant" }
                    dl {
                        dt { "Name" } dd { (state.core.assistant.name) }
                        dt { "Model" } dd { (state.core.model.name) " (" (state.core.model.layers) " layers, context " (state.core.model.context_length) ")" }
                        dt { "Device" } dd { (state.core.model.device.to_uppercase()) }
                        dt { "Active adapter" } dd id="active-adapter" { @match &active { Some(t) => { (t.name) }, None => { "none (base model)" } } }
                    }
                }
                section.card {
                    h2 { "Data" }
                    dl {
                        dt { "Conversations" } dd id="count-conversations" { (counts.conversations) }
                        dt { "Messages" } dd id="count-messages" { (counts.messages) }
                        dt { "Rated replies" } dd id="count-rated" { (counts.rated_replies) }
                        dt { "Datasets" } dd { (counts.datasets) }
                    }
                }
                section.card {
                    h2 { "Training" }
                    @match &running {
                        Some(j) => {
                            p { a href=(format!("/jobs/{}", j.id)) { "Job " (j.id) } " is " strong { (j.state) } }
                            @if let Some(t) = j.total_steps {
                                progress max=(t) value=(j.step) {}
                                p { "step " (j.step) " of " (t) }
                            }
                        }
                        None => { p { "No job running. " a href="/jobs/new" { "Start one" } } }
                    }
                }
            }
            (PreEscaped(""))
        },
    )
}
