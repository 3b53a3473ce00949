//! `/conversations`: search, one conversation turn by turn, the operator's ratings and
//! corrections, exclusion from training and deletion.

use super::{
    Params, encode, notice_block, parse_date, parse_id, short_time, storage_error_page,
    storage_failure,
};
use crate::auth::AdminSession;
use crate::console::{Console, csrf_field, error_page, layout};
use crate::state::AppState;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use loraloop_core::storage::{
    ConversationDetail, ConversationFilter, ConversationSummary, MessageWithFeedback, Platform,
    RatingFilter,
};
use maud::{Markup, html};

/// Conversations per page.
const PAGE_SIZE: i64 = 50;

/// The search form's values as a filter; an error names the field that is wrong.
fn filter_from(params: &Params) -> Result<ConversationFilter, String> {
    let platform = match params.get("platform") {
        None | Some("any") => None,
        Some(p) => Some(p.parse().map_err(|e| format!("platform: {e}"))?),
    };
    let rating = match params.get("rating") {
        None => RatingFilter::Any,
        Some(r) => r.parse().map_err(|e| format!("rating: {e}"))?,
    };
    let from = parse_date(params, "from")?;
    let to = parse_date(params, "to")?;
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(format!("from ({f}) is after to ({t})"));
    }
    Ok(ConversationFilter {
        text: params.get("q").map(str::to_string),
        platform,
        user: params.get("user").map(str::to_string),
        from,
        to,
        rating,
    })
}

/// The query string of the search, without the page (for the pager's links).
fn search_query(params: &Params) -> String {
    ["q", "platform", "user", "from", "to", "rating"]
        .into_iter()
        .filter_map(|k| params.get(k).map(|v| format!("{k}={}", encode(v))))
        .collect::<Vec<_>>()
        .join("&")
}

pub(super) async fn list(Console { state, session }: Console, params: Params) -> Response {
    let page = params
        .get("page")
        .and_then(|p| p.parse::<i64>().ok())
        .filter(|p| (1..=1_000_000).contains(p))
        .unwrap_or(1);
    let (result, status) = match filter_from(&params) {
        Ok(filter) => match state
            .core
            .db
            .search_conversations(&filter, PAGE_SIZE, (page - 1) * PAGE_SIZE)
            .await
        {
            Ok(found) => (Ok(found), StatusCode::OK),
            Err(e) => {
                let (status, message) = storage_failure(e);
                (Err(message), status)
            }
        },
        Err(message) => (Err(message), StatusCode::UNPROCESSABLE_ENTITY),
    };
    let mut resp = layout(
        "Conversations",
        Some(&session),
        "/conversations",
        html! {
            h1 { "Conversations" }
            (notice_block(&params))
            (search_form(&params))
            @match &result {
                Err(message) => { p.error role="alert" { (message) } }
                Ok((rows, total)) => { (results(rows, *total, page, &params)) }
            }
        },
    );
    *resp.status_mut() = status;
    resp
}

fn search_form(params: &Params) -> Markup {
    let platform = params.get("platform").unwrap_or("any");
    let rating = params.get("rating").unwrap_or("any");
    html! {
        form.card.filters id="search-form" method="get" action="/conversations" {
            div.row {
                label { "Text" input type="search" name="q" value=(params.raw("q")) placeholder="in any message"; }
                label { "Platform"
                    select name="platform" {
                        option value="any" selected[platform == "any"] { "any" }
                        @for p in Platform::ALL {
                            option value=(p.as_str()) selected[platform == p.as_str()] { (p.as_str()) }
                        }
                    }
                }
                label { "User" input type="search" name="user" value=(params.raw("user")) placeholder="name or id"; }
                label { "From" input type="date" name="from" value=(params.raw("from")); }
                label { "To" input type="date" name="to" value=(params.raw("to")); }
                label { "Rating"
                    select name="rating" {
                        @for (value, text) in [("any", "any"), ("up", "has 👍"), ("down", "has 👎"), ("unrated", "unrated")] {
                            option value=(value) selected[rating == value] { (text) }
                        }
                    }
                }
                button type="submit" { "Search" }
                a href="/conversations" { "Clear" }
            }
        }
    }
}

fn results(rows: &[ConversationSummary], total: i64, page: i64, params: &Params) -> Markup {
    let pages = ((total + PAGE_SIZE - 1) / PAGE_SIZE).max(1);
    let query = search_query(params);
    let link = |p: i64| {
        if query.is_empty() {
            format!("/conversations?page={p}")
        } else {
            format!("/conversations?{query}&page={p}")
        }
    };
    html! {
        p.muted id="conversation-count" {
            (total) " conversation" @if total != 1 { "s" }
            @if pages > 1 { " · page " (page) " of " (pages) }
        }
        div.table-wrap {
            table id="conversations" {
                thead { tr {
                    th { "#" } th { "Platform" } th { "User" } th { "Started" }
                    th { "Messages" } th { "Ratings" } th { "Training" }
                } }
                tbody {
                    @for c in rows {
                        tr data-id=(c.id) {
                            td { a href=(format!("/conversations/{}", c.id)) { (c.id) } }
                            td { (c.platform.as_deref().unwrap_or("—")) }
                            td { (c.user.as_deref().unwrap_or("—")) }
                            td { (short_time(&c.created_at)) }
                            td { (c.message_count) }
                            td.ratings { "👍 " (c.thumbs_up) " · 👎 " (c.thumbs_down) }
                            td { @if c.excluded_from_training { span.bad { "excluded" } } @else { "included" } }
                        }
                    }
                }
            }
        }
        @if rows.is_empty() { p.muted { "No conversation matches." } }
        @if pages > 1 {
            nav.pager {
                @if page > 1 { a href=(link(page - 1)) rel="prev" { "← Newer" } }
                @if page < pages { a href=(link(page + 1)) rel="next" { "Older →" } }
            }
        }
    }
}

pub(super) async fn show(
    Console { state, session }: Console,
    Path(id): Path<String>,
    params: Params,
) -> Response {
    let Some(id) = parse_id(&id) else {
        return error_page(&session, StatusCode::NOT_FOUND, "no such conversation");
    };
    conversation_page(&state, &session, id, &params, None).await
}

/// A conversation's page, with an error of the form just posted (and its status).
async fn conversation_page(
    state: &AppState,
    session: &AdminSession,
    id: i64,
    params: &Params,
    error: Option<(StatusCode, String)>,
) -> Response {
    let detail = match state.core.db.conversation_detail(id).await {
        Ok(d) => d,
        Err(e) => return storage_error_page(session, e),
    };
    let status = error.as_ref().map_or(StatusCode::OK, |(s, _)| *s);
    let mut resp = layout(
        &format!("Conversation {id}"),
        Some(session),
        "/conversations",
        html! {
            p { a href="/conversations" { "← Conversations" } }
            h1 { "Conversation " (id) }
            (notice_block(params))
            @if let Some((_, message)) = &error { p.error role="alert" id="form-error" { (message) } }
            (conversation_header(session, &detail))
            @for m in &detail.messages { (turn(session, m)) }
            @if detail.messages.is_empty() { p.muted { "No messages." } }
        },
    );
    *resp.status_mut() = status;
    resp
}

fn conversation_header(session: &AdminSession, detail: &ConversationDetail) -> Markup {
    let c = &detail.summary;
    html! {
        section.card {
            dl {
                dt { "Platform" } dd { (c.platform.as_deref().unwrap_or("—")) }
                dt { "User" } dd { (c.user.as_deref().unwrap_or("—")) }
                dt { "Started" } dd { (short_time(&c.created_at)) }
                @if let Some(closed) = &c.closed_at { dt { "Closed" } dd { (short_time(closed)) } }
                dt { "Messages" } dd { (c.message_count) }
                dt { "Ratings" } dd { "👍 " (c.thumbs_up) " · 👎 " (c.thumbs_down) }
                dt { "Training" } dd id="training-status" {
                    @if c.excluded_from_training { "excluded: never used in a dataset" } @else { "included" }
                }
            }
            div.row.actions {
                form method="post" action=(format!("/conversations/{}/exclude", c.id)) {
                    (csrf_field(session))
                    button.secondary type="submit" id="exclude-toggle" {
                        @if c.excluded_from_training { "Include in training" } @else { "Exclude from training" }
                    }
                }
                form.confirm method="post" action=(format!("/conversations/{}/delete", c.id)) id="delete-form" {
                    (csrf_field(session))
                    label.inline { input type="checkbox" name="confirm" value="1" required; " Yes, delete it with every message and rating" }
                    " "
                    button.danger type="submit" { "Delete conversation" }
                }
            }
        }
    }
}

fn turn(session: &AdminSession, m: &MessageWithFeedback) -> Markup {
    let assistant = m.role == "assistant";
    let operator = m.operator_feedback();
    let op_rating = operator.and_then(|f| f.rating);
    let correction = operator.and_then(|f| f.correction.as_deref());
    html! {
        article class=(format!("msg turn {}", m.role)) id=(format!("m{}", m.id)) data-role=(m.role) {
            div.meta {
                strong { (m.role) }
                @if let Some(a) = &m.author { " · " (a) }
                " · " (short_time(&m.created_at))
                @if assistant { " · " span.adapter { (m.adapter_name.as_deref().unwrap_or("base model")) } }
            }
            div.content { (m.content) }
            @if assistant {
                div.feedback {
                    @if m.feedback.iter().any(|f| f.rating.is_some()) {
                        ul.ratings {
                            @for f in m.feedback.iter().filter(|f| f.rating.is_some()) {
                                li { (f.rater) ": " @if f.rating == Some(1) { "👍" } @else { "👎" } }
                            }
                        }
                    } @else { span.muted { "not rated" } }
                    @if let Some(c) = correction {
                        div.correction {
                            span.meta { "Operator's correction (the training target when corrections are included):" }
                            div.content { (c) }
                        }
                    }
                    form.rate method="post" action=(format!("/messages/{}/rate", m.id)) {
                        (csrf_field(session))
                        button type="submit" name="rating" value="1" class=(if op_rating == Some(1) { "chosen" } else { "secondary" }) title="Good reply" { "👍" }
                        " "
                        button type="submit" name="rating" value="-1" class=(if op_rating == Some(-1) { "chosen" } else { "secondary" }) title="Bad reply" { "👎" }
                    }
                    details open[correction.is_some()] {
                        summary { @if correction.is_some() { "Edit the correction" } @else { "Write a corrected reply" } }
                        form.correct method="post" action=(format!("/messages/{}/correct", m.id)) {
                            (csrf_field(session))
                            label { "Corrected reply" textarea name="correction" rows="4" { (correction.unwrap_or("")) } }
                            button type="submit" { "Save correction" }
                            span.hint { " Saving it empty removes the correction." }
                        }
                    }
                }
            }
        }
    }
}

/// `/conversations/{id}` after a change, at the message `anchor` when given.
fn back_to(conversation: i64, ok: &str, anchor: Option<i64>) -> Response {
    let fragment = anchor.map(|m| format!("#m{m}")).unwrap_or_default();
    Redirect::to(&format!("/conversations/{conversation}?ok={ok}{fragment}")).into_response()
}

/// The conversation of the reply `id`, or the page that says why there is none.
async fn reply_conversation(
    state: &AppState,
    session: &AdminSession,
    id: &str,
) -> Result<(i64, i64), Response> {
    let Some(id) = parse_id(id) else {
        return Err(error_page(
            session,
            StatusCode::NOT_FOUND,
            "no such message",
        ));
    };
    match state.core.db.reply_conversation(id).await {
        Ok(conversation) => Ok((id, conversation)),
        Err(e) => Err(storage_error_page(session, e)),
    }
}

/// An operator's change to the reply `id`: `change` gets the reply's id and answers the
/// notice to redirect with, or the error to show on the conversation's page (a storage
/// error, or a form value it refused).
async fn change_reply(
    state: &AppState,
    session: &AdminSession,
    id: &str,
    change: impl AsyncFnOnce(i64) -> Result<&'static str, (StatusCode, String)>,
) -> Response {
    let (id, conversation) = match reply_conversation(state, session, id).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    match change(id).await {
        Ok(ok) => back_to(conversation, ok, Some(id)),
        Err(error) => {
            conversation_page(
                state,
                session,
                conversation,
                &Params::default(),
                Some(error),
            )
            .await
        }
    }
}

pub(super) async fn rate(
    Console { state, session }: Console,
    Path(id): Path<String>,
    body: String,
) -> Response {
    let rating = match Params::parse(&body).get("rating") {
        Some("1") => Ok(1),
        Some("-1") => Ok(-1),
        _ => Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "rating: use 1 (👍) or -1 (👎)".to_string(),
        )),
    };
    change_reply(&state, &session, &id, async |id| {
        // A bad rating shows only once the reply is known to exist (else a 404).
        let rating = rating?;
        state
            .core
            .db
            .set_operator_rating(id, rating)
            .await
            .map_err(storage_failure)?;
        Ok("rated")
    })
    .await
}

pub(super) async fn correct(
    Console { state, session }: Console,
    Path(id): Path<String>,
    body: String,
) -> Response {
    // Browsers send a textarea's line breaks as CRLF.
    let text = Params::parse(&body).raw("correction").replace("\r\n", "\n");
    let correction = Some(text.trim()).filter(|c| !c.is_empty());
    change_reply(&state, &session, &id, async |id| {
        state
            .core
            .db
            .set_operator_correction(id, correction)
            .await
            .map_err(storage_failure)?;
        Ok(if correction.is_some() {
            "corrected"
        } else {
            "correction-cleared"
        })
    })
    .await
}

pub(super) async fn toggle_excluded(
    Console { state, session }: Console,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = parse_id(&id) else {
        return error_page(&session, StatusCode::NOT_FOUND, "no such conversation");
    };
    match state.core.db.toggle_conversation_excluded(id).await {
        Ok(true) => back_to(id, "excluded", None),
        Ok(false) => back_to(id, "included", None),
        Err(e) => storage_error_page(&session, e),
    }
}

pub(super) async fn delete(
    Console { state, session }: Console,
    Path(id): Path<String>,
    body: String,
) -> Response {
    let Some(id) = parse_id(&id) else {
        return error_page(&session, StatusCode::NOT_FOUND, "no such conversation");
    };
    if !Params::parse(&body).checked("confirm") {
        let error = (
            StatusCode::UNPROCESSABLE_ENTITY,
            "Nothing was deleted: tick “Yes, delete it” to confirm.".to_string(),
        );
        return conversation_page(&state, &session, id, &Params::default(), Some(error)).await;
    }
    match state.core.db.delete_conversation(id).await {
        Ok(()) => {
            crate::audit::record(
                &state,
                crate::audit::CONSOLE,
                "delete conversation",
                &format!("conversation {id}"),
            )
            .await;
            Redirect::to("/conversations?ok=deleted").into_response()
        }
        Err(e) => storage_error_page(&session, e),
    }
}
