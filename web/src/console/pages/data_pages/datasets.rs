//! `/datasets`: every dataset version, importing a JSONL file, building a dataset from the
//! stored conversations, a preview with token counts, export and deletion.

use super::{Params, notice_block, parse_date, parse_id, short_time, storage_error_page};
use crate::auth::AdminSession;
use crate::console::{Console, csrf_field, error_page, layout};
use crate::error::ApiError;
use crate::operations::{self, Imported};
use crate::state::AppState;
use axum::extract::{Path, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use loraloop_core::domain::{ChatExample, Role};
use loraloop_core::preference::Objective;
use loraloop_core::storage::{
    Dataset, DatasetInsert, Platform, RatingFilter, StorageError, validate_dataset_name,
};
use loraloop_trainer::dataset::{
    self, BuildError, BuildSpec, MAX_LISTED_PROBLEMS, format_problems, store,
};
use maud::{Markup, html};

/// Examples the preview shows.
const PREVIEW_EXAMPLES: usize = 50;

/// What the datasets page shows besides the list: the outcome of a form just posted.
#[derive(Default)]
struct Outcome {
    status: Option<StatusCode>,
    /// The import form's result block.
    import: Option<Markup>,
    /// The build form's error and the values it was posted with.
    build_error: Option<String>,
    build_form: Option<Params>,
    /// An error about the list (a deletion that was refused).
    list_error: Option<String>,
}

pub(super) async fn list(Console { state, session }: Console, params: Params) -> Response {
    datasets_page(&state, &session, &params, Outcome::default()).await
}

async fn datasets_page(
    state: &AppState,
    session: &AdminSession,
    params: &Params,
    outcome: Outcome,
) -> Response {
    let datasets = match state.core.db.list_datasets().await {
        Ok(d) => d,
        Err(e) => return storage_error_page(session, e),
    };
    let mut resp = layout(
        "Datasets",
        Some(session),
        "/datasets",
        html! {
            h1 { "Datasets" }
            (notice_block(params))
            @if let Some(e) = &outcome.list_error { p.error role="alert" id="datasets-error" { (e) } }
            (dataset_table(session, &datasets))
            div.grid {
                section.card {
                    h2 { "Import a JSONL file" }
                    (import_form(session))
                    @if let Some(result) = &outcome.import { (result) }
                }
                section.card {
                    h2 { "Build from conversations" }
                    @if let Some(e) = &outcome.build_error { p.error role="alert" id="build-error" { (e) } }
                    (build_form(session, outcome.build_form.as_ref()))
                }
            }
        },
    );
    *resp.status_mut() = outcome.status.unwrap_or(StatusCode::OK);
    resp
}

fn dataset_table(session: &AdminSession, datasets: &[Dataset]) -> Markup {
    html! {
        div.table-wrap {
            table id="datasets" {
                thead { tr {
                    th { "Name" } th { "Version" } th { "Rows" } th { "Kind" } th { "Format" }
                    th { "Source" } th { "Created" } th { "Hash" } th { "" }
                } }
                tbody {
                    @for d in datasets {
                        tr data-id=(d.id) {
                            td { a href=(format!("/datasets/{}", d.id)) { (d.name) } }
                            td { (d.version) }
                            td { (d.example_count) }
                            td.kind title=(kind_label(d.objective())) { (d.kind) }
                            td { (d.format) }
                            td.source title=(d.source) { (shorten(&d.source, 48)) }
                            td { (short_time(&d.created_at)) }
                            td { code title=(d.content_hash) { (d.content_hash.get(..12).unwrap_or(&d.content_hash)) } }
                            td.actions {
                                a href=(format!("/datasets/{}", d.id)) { "Preview" } " · "
                                a href=(format!("/datasets/{}/export", d.id)) download { "Export" }
                                form.confirm method="post" action=(format!("/datasets/{}/delete", d.id)) {
                                    (csrf_field(session))
                                    label.inline { input type="checkbox" name="confirm" value="1" required; " sure" }
                                    " "
                                    button.danger type="submit" { "Delete" }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if datasets.is_empty() { p.muted { "No dataset yet: import a file or build one from conversations." } }
    }
}

/// What a dataset of each kind holds, as the console says it.
fn kind_label(kind: Objective) -> &'static str {
    match kind {
        Objective::Sft => "chat examples (SFT)",
        Objective::Dpo => "preference pairs: a preferred and a non-preferred reply (DPO)",
        Objective::Kto => "replies rated good or bad (KTO)",
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max - 1).collect();
        out.push('…');
        out
    }
}

fn import_form(session: &AdminSession) -> Markup {
    html! {
        form id="import-form" method="post" enctype="multipart/form-data"
            action=(format!("/datasets/import?_csrf={}", session.csrf)) {
            label { "Name" input name="name" required pattern="[A-Za-z0-9_\\-][A-Za-z0-9_.\\-]{0,99}" placeholder="faq"; }
            label { "Format"
                select name="format" {
                    @for f in ["auto", "openai", "prompt-completion", "text", "alpaca", "sharegpt", "dpo", "kto"] {
                        option value=(f) { (f) }
                    }
                }
            }
            label { "File (JSONL)" input type="file" name="file" accept=".jsonl,.json,application/jsonl,application/json" required; }
            button type="submit" { "Import" }
            p.hint { "The same checks as `loraloop data import`: a file with any error is not stored. dpo: OpenAI's preference lines (input, preferred_output, non_preferred_output); kto: prompt, completion, label." }
        }
    }
}

fn build_form(session: &AdminSession, posted: Option<&Params>) -> Markup {
    let value = |k: &str| posted.map_or("", |p| p.raw(k)).to_string();
    // A fresh form trains on corrections and leaves out 👎 replies.
    let checked = |k: &str, default: bool| posted.map_or(default, |p| p.checked(k));
    let platform = posted.and_then(|p| p.get("platform")).unwrap_or("any");
    let rating = posted.and_then(|p| p.get("rating")).unwrap_or("any");
    let kind = posted.and_then(|p| p.get("kind")).unwrap_or("sft");
    html! {
        form id="build-form" method="post" action="/datasets/build" {
            (csrf_field(session))
            label { "Name" input name="name" required value=(value("name")) placeholder="from-chats"; }
            label { "Rows"
                select name="kind" {
                    @for k in [Objective::Sft, Objective::Dpo, Objective::Kto] {
                        option value=(k.as_str()) selected[kind == k.as_str()] { (kind_label(k)) }
                    }
                }
            }
            label { "Platform"
                select name="platform" {
                    option value="any" selected[platform == "any"] { "any" }
                    @for p in Platform::ALL {
                        option value=(p.as_str()) selected[platform == p.as_str()] { (p.as_str()) }
                    }
                }
            }
            div.row {
                label { "From" input type="date" name="from" value=(value("from")); }
                label { "To" input type="date" name="to" value=(value("to")); }
            }
            div.row {
                label { "Rated"
                    select name="rating" {
                        @for r in RatingFilter::ALL {
                            option value=(r.as_str()) selected[rating == r.as_str()] { (r.as_str()) }
                        }
                    }
                }
                label { "Answered by adapter" input name="adapter" value=(value("adapter")) placeholder="any"; }
                label { "Chat id" input name="chat" value=(value("chat")) placeholder="any"; }
            }
            label.check { input type="checkbox" name="only_upvoted" value="1" checked[checked("only_upvoted", false)]; " Only 👍-rated replies" }
            label.check { input type="checkbox" name="include_corrections" value="1" checked[checked("include_corrections", true)]; " Include operator corrections (they replace the reply)" }
            label.check { input type="checkbox" name="exclude_downvoted" value="1" checked[checked("exclude_downvoted", true)]; " Exclude 👎-rated replies" }
            button type="submit" { "Build dataset" }
            p.hint { "Conversations and users excluded from training are always left out. Replies that are not trained on stay as context with weight 0. DPO pairs come from operators' corrections (preferred over the original reply); KTO rows from 👍/👎 and corrections. The checkboxes shape SFT rows." }
        }
    }
}

/// The import form's result block.
fn import_result(result: &Result<Imported, ApiError>) -> Markup {
    match result {
        Ok(i) => {
            let d = &i.dataset;
            html! {
                div.result id="import-result" data-outcome=(if i.created { "created" } else { "unchanged" }) {
                    @if i.created {
                        p.ok { "Imported " a href=(format!("/datasets/{}", d.id)) { (d.name) " version " (d.version) } ": " (d.example_count) " examples (" (d.format) ")." }
                    } @else {
                        p.ok { "Unchanged: this content already is " a href=(format!("/datasets/{}", d.id)) { (d.name) " version " (d.version) } "; nothing new was stored." }
                    }
                    @if !i.warnings.is_empty() {
                        p { (i.warnings.len()) " warning(s):" }
                        pre.warnings { (format_problems(&i.warnings, MAX_LISTED_PROBLEMS)) }
                    }
                }
            }
        }
        Err(e) => html! {
            div.result id="import-result" data-outcome="error" {
                p.error role="alert" { (e.message) }
            }
        },
    }
}

pub(super) async fn import(Console { state, session }: Console, req: Request) -> Response {
    // A body over the limit is refused by its declared length: past the limit the
    // multipart reader only says that the form could not be parsed.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let result = async {
        if declared.is_some_and(|n| n > state.max_upload_bytes) {
            return Err(ApiError::too_large(state.max_upload_bytes).with_param("file"));
        }
        let (bytes, fields) = crate::files::read_upload(&state, req, "file").await?;
        let name = fields.get("name").map_or("", |n| n.trim());
        if name.is_empty() {
            return Err(ApiError::invalid("name", "give the dataset a name"));
        }
        let format = fields
            .get("format")
            .map(String::as_str)
            .filter(|f| *f != "auto");
        let source = fields
            .get("filename")
            .map(String::as_str)
            .filter(|f| !f.is_empty())
            .unwrap_or("upload");
        operations::import_dataset(&state, name, bytes, format, source).await
    }
    .await;
    let status = match &result {
        Ok(i) if i.created => StatusCode::CREATED,
        Ok(_) => StatusCode::OK,
        Err(e) => e.status,
    };
    let outcome = Outcome {
        status: Some(status),
        import: Some(import_result(&result)),
        ..Default::default()
    };
    datasets_page(&state, &session, &Params::default(), outcome).await
}

/// The build form's values as the builder's spec.
fn build_spec(form: &Params) -> Result<BuildSpec, String> {
    Ok(BuildSpec {
        kind: form.get("kind").unwrap_or("sft").parse()?,
        platform: form.get("platform").map(str::to_string),
        rating: form.get("rating").map(str::to_string),
        adapter: form.get("adapter").map(str::to_string),
        chat: form.get("chat").map(str::to_string),
        from: parse_date(form, "from")?,
        to: parse_date(form, "to")?,
        only_upvoted: form.checked("only_upvoted"),
        include_corrections: Some(form.checked("include_corrections")),
        exclude_downvoted: Some(form.checked("exclude_downvoted")),
        ..Default::default()
    })
}

pub(super) async fn build(Console { state, session }: Console, body: String) -> Response {
    let form = Params::parse(&body);
    match build_dataset(&state, &form).await {
        Ok(DatasetInsert::Created(d)) => {
            Redirect::to(&format!("/datasets/{}?ok=built", d.id)).into_response()
        }
        Ok(DatasetInsert::Unchanged(d)) => {
            Redirect::to(&format!("/datasets/{}?ok=unchanged", d.id)).into_response()
        }
        Err((status, message)) => {
            let outcome = Outcome {
                status: Some(status),
                build_error: Some(message),
                build_form: Some(form),
                ..Default::default()
            };
            datasets_page(&state, &session, &Params::default(), outcome).await
        }
    }
}

async fn build_dataset(
    state: &AppState,
    form: &Params,
) -> Result<DatasetInsert, (StatusCode, String)> {
    let invalid = |m: String| (StatusCode::UNPROCESSABLE_ENTITY, m);
    let name = form.get("name").unwrap_or("");
    validate_dataset_name(name).map_err(|e| invalid(e.to_string()))?;
    let db = &state.core.db;
    let built = async {
        let spec = build_spec(form).map_err(|m| BuildError::Invalid {
            field: "date",
            message: m,
        })?;
        let filter = spec.filter(db).await?;
        store(db, name, &filter, spec.kind).await
    }
    .await;
    built.map_err(|e| match e {
        BuildError::Storage(e) => super::storage_failure(e),
        BuildError::Empty(what) => invalid(format!(
            "No conversation matches these settings with a {what} left to use: nothing was stored."
        )),
        BuildError::Invalid { message, .. } => invalid(message),
    })
}

/// Tokens of each example through the served model's tokenizer and chat template, as the
/// trainer counts them (an error in place of an example the template cannot render).
async fn token_counts(state: &AppState, examples: Vec<ChatExample>) -> Vec<Result<usize, String>> {
    let state = state.clone();
    let n = examples.len();
    tokio::task::spawn_blocking(move || {
        let model = state.core.engine.model();
        examples
            .iter()
            .enumerate()
            .map(|(i, ex)| {
                loraloop_trainer::tokenize::tokenize_example(
                    ex,
                    i,
                    &model.tokenizer,
                    &model.template,
                    false,
                )
                .map(|t| t.tokens.len())
                .map_err(|e| e.to_string())
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| vec![Err(format!("token counting failed: {e}")); n])
}

/// A dataset id from the path, or the page that says there is no such dataset.
async fn find_dataset(
    state: &AppState,
    session: &AdminSession,
    id: &str,
) -> Result<Dataset, Response> {
    let Some(id) = parse_id(id) else {
        return Err(error_page(
            session,
            StatusCode::NOT_FOUND,
            "no such dataset",
        ));
    };
    state
        .core
        .db
        .dataset_by_id(id)
        .await
        .map_err(|e| storage_error_page(session, e))
}

pub(super) async fn preview(
    Console { state, session }: Console,
    Path(id): Path<String>,
    params: Params,
) -> Response {
    let d = match find_dataset(&state, &session, &id).await {
        Ok(d) => d,
        Err(page) => return page,
    };
    if d.objective() != Objective::Sft {
        return match state.core.db.dataset_lines(d.id).await {
            Ok(lines) => super::preference_preview::page(&session, &d, &lines, &params),
            Err(e) => storage_error_page(&session, e),
        };
    }
    let stored = match state.core.db.dataset_examples(d.id).await {
        Ok(e) => e,
        Err(e) => return storage_error_page(&session, e),
    };
    let all: Vec<ChatExample> = stored.iter().map(|s| s.example.clone()).collect();
    let stats = dataset::stats(&all);
    let shown: Vec<ChatExample> = all.into_iter().take(PREVIEW_EXAMPLES).collect();
    let tokens = token_counts(&state, shown.clone()).await;
    let total_tokens: usize = tokens.iter().filter_map(|t| t.as_ref().ok()).sum();
    let roles = stats.messages_per_role;
    layout(
        &format!("Dataset {}", d.name),
        Some(&session),
        "/datasets",
        html! {
            p { a href="/datasets" { "← Datasets" } }
            h1 { (d.name) " · version " (d.version) }
            (notice_block(&params))
            section.card {
                dl id="dataset-info" {
                    dt { "Examples" } dd { (d.example_count) }
                    dt { "Format" } dd { (d.format) }
                    dt { "Source" } dd { code { (d.source) } }
                    dt { "Created" } dd { (short_time(&d.created_at)) }
                    dt { "Hash" } dd { code { (d.content_hash) } }
                    dt { "Messages" } dd id="role-counts" {
                        (roles.system) " system · " (roles.user) " user · " (roles.assistant) " assistant"
                    }
                    dt { "Not trained" } dd { (stats.examples_with_zero_weight) " example(s) with a weight-0 reply" }
                    dt { "Tokens" } dd id="total-tokens" data-tokens=(total_tokens) {
                        (total_tokens) " in the " (shown.len()) " example(s) shown (" (state.core.model.name) "'s tokenizer and chat template)"
                    }
                }
                p.row {
                    a.button href=(format!("/datasets/{}/export", d.id)) download { "Export JSONL" }
                }
            }
            @if stored.len() > shown.len() {
                p.muted { "The first " (shown.len()) " of " (stored.len()) " examples:" }
            }
            @for ((ex, s), t) in shown.iter().zip(&stored).zip(&tokens) {
                section.card.example data-position=(s.position) {
                    p.meta {
                        "#" (s.position + 1) " · "
                        @match t {
                            Ok(n) => { span.tokens data-tokens=(n) { (n) " tokens" } }
                            Err(e) => { span.error title=(e) { "tokens: cannot render" } }
                        }
                        @if let Some(c) = s.source_conversation_id {
                            " · from " a href=(format!("/conversations/{c}")) { "conversation " (c) }
                        }
                    }
                    @for m in &ex.messages {
                        div class=(format!("msg {}", m.role)) {
                            div.meta {
                                strong { (m.role) }
                                @if m.role == Role::Assistant && m.weight == Some(0.0) { " · " span.weight0 { "weight 0: not trained on" } }
                                @else if let Some(w) = m.weight.filter(|w| *w != 1.0) { " · weight " (w) }
                            }
                            (m.content)
                        }
                    }
                }
            }
        },
    )
}

pub(super) async fn export(
    Console { state, session }: Console,
    Path(id): Path<String>,
) -> Response {
    let d = match find_dataset(&state, &session, &id).await {
        Ok(d) => d,
        Err(page) => return page,
    };
    let body = match state.core.db.dataset_jsonl(d.id).await {
        Ok(text) => text,
        Err(e) => return storage_error_page(&session, e),
    };
    // Dataset names are letters, digits, '-', '_' and '.': safe in a quoted file name.
    let disposition = format!("attachment; filename=\"{}-v{}.jsonl\"", d.name, d.version);
    (
        [
            (header::CONTENT_TYPE, "application/jsonl".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn delete(
    Console { state, session }: Console,
    Path(id): Path<String>,
    body: String,
) -> Response {
    let d = match find_dataset(&state, &session, &id).await {
        Ok(d) => d,
        Err(page) => return page,
    };
    let refuse = |status: StatusCode, message: String| Outcome {
        status: Some(status),
        list_error: Some(message),
        ..Default::default()
    };
    let label = format!("{} version {}", d.name, d.version);
    let outcome = if !Params::parse(&body).checked("confirm") {
        refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{label} was not deleted: tick “sure” next to its Delete button to confirm."),
        )
    } else {
        let jobs = match state.core.db.jobs_using_dataset(d.id).await {
            Ok(j) => j,
            Err(e) => return storage_error_page(&session, e),
        };
        if !jobs.is_empty() {
            refuse(StatusCode::CONFLICT, in_use(&label, &jobs))
        } else {
            match state.core.db.delete_dataset(&d.name, Some(d.version)).await {
                Ok(_) => {
                    crate::audit::record(&state, crate::audit::CONSOLE, "delete dataset", &label)
                        .await;
                    return Redirect::to("/datasets?ok=dataset-deleted").into_response();
                }
                // A job created since the check above.
                Err(StorageError::Invalid { .. }) => {
                    let jobs = state
                        .core
                        .db
                        .jobs_using_dataset(d.id)
                        .await
                        .unwrap_or_default();
                    refuse(StatusCode::CONFLICT, in_use(&label, &jobs))
                }
                Err(e) => return storage_error_page(&session, e),
            }
        }
    };
    datasets_page(&state, &session, &Params::default(), outcome).await
}

fn in_use(label: &str, jobs: &[i64]) -> String {
    let list = jobs
        .iter()
        .map(|j| format!("#{j}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{label} cannot be deleted: training job {list} used it, and a job's data must stay as it was trained on. Delete the job first."
    )
}
