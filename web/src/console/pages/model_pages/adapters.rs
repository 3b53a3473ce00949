//! Adapter pages: the list with one-click activation and rollback, downloads and uploads
//! of PEFT zips, and a side-by-side comparison of two adapters on a few prompts.

use super::{ChosenAssistant, PageId, fail, field, num, short_time};
use crate::adapter_views::AdapterView;
use crate::auth::AdminSession;
use crate::console::{Console, QueryPairs, csrf_field, layout};
use crate::error::ApiError;
use crate::state::AppState;
use axum::Router;
use axum::extract::Request;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use loraloop_core::service::adapters::reserved_model_name;
use loraloop_core::storage::{Assistant, NewAdapter};
use loraloop_model::engine::{AdapterChoice, GenerateRequest, Prompt};
use loraloop_model::lora::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use loraloop_model::sampling::SamplingParams;
use loraloop_model::template::TemplateMessage;
use loraloop_trainer::checkpoint::METADATA_FILE;
use maud::{Markup, html};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path as FsPath, PathBuf};

/// The files a PEFT adapter zip may hold.
const ADAPTER_FILES: [&str; 3] = [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, METADATA_FILE];
/// Prompts a comparison answers at most, and tokens per answer.
const COMPARE_PROMPTS: usize = 5;
const COMPARE_TOKENS: usize = 128;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/adapters", get(list))
        .route("/adapters/{id}/activate", post(activate))
        .route("/adapters/{id}/download", get(download))
        .route("/adapters/{id}/export", get(export))
        .route("/adapters/rollback", post(rollback))
        .route("/adapters/canary/stop", post(super::canary::stop))
        .route("/adapters/base", post(use_base))
        .route("/adapters/upload", post(upload))
        .route("/adapters/compare", get(compare))
}

/// What the last action did, by a fixed code (nothing a link could put words into).
fn notice(code: &str) -> Option<&'static str> {
    match code {
        "activated" => Some("Activated: the next replies come from this adapter."),
        "rolledback" => Some("Rolled back one step in the activation history."),
        "canarystopped" => Some(
            "The canary was stopped and its adapter rolled back: its conversations move to the active adapter at their next message.",
        ),
        "base" => Some("The assistant answers with the base model now."),
        "uploaded" => Some("The adapter was uploaded and checked against the served model."),
        _ => None,
    }
}

/// `/adapters?assistant=NAME&ok=CODE`: back to the assistant's adapters after an action.
fn back_to(a: &Assistant, ok: &str) -> Response {
    Redirect::to(&format!("/adapters?assistant={}&ok={ok}", a.name)).into_response()
}

async fn list(
    Console { state, session }: Console,
    ChosenAssistant(assistant): ChosenAssistant,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    page(
        &state,
        &session,
        &assistant,
        notice(field(&pairs, "ok")),
        None,
    )
    .await
}

/// The adapters page of an assistant, with a notice or an error (and the error's status).
async fn page(
    state: &AppState,
    session: &AdminSession,
    assistant: &Assistant,
    ok: Option<&str>,
    error: Option<&ApiError>,
) -> Response {
    let views = match crate::adapter_views::adapter_views(state, assistant).await {
        Ok(v) => v,
        Err(e) => return fail(session, &e),
    };
    let canaries =
        match crate::canary_views::canary_views(state, assistant, super::canary::SHOWN).await {
            Ok(c) => c,
            Err(e) => return fail(session, &e),
        };
    let assistants = match state.core.assistants.list().await {
        Ok(a) => a,
        Err(e) => return fail(session, &e.into()),
    };
    let active = views.iter().find(|v| v.active).map(|v| v.name.clone());
    let q = format!("?assistant={}", assistant.name);
    let mut resp = layout(
        "Adapters",
        Some(session),
        "/adapters",
        html! {
            h1 { "Adapters" }
            @if let Some(m) = ok { p.ok role="status" id="adapter-notice" { (m) } }
            @if let Some(e) = error { p.error role="alert" id="adapter-error" { (e.message) } }
            @if assistants.len() > 1 {
                nav.tabs id="assistant-tabs" aria-label="Assistant" {
                    @for a in &assistants {
                        a href=(format!("/adapters?assistant={}", a.name)) aria-current=[(a.id == assistant.id).then_some("page")] { (a.name) }
                    }
                }
            }
            section.card {
                p {
                    "The assistant " strong id="adapter-assistant" { (assistant.name) } " answers with "
                    strong id="active-adapter" { @match &active { Some(t) => (t), None => "the base model" } }
                    "."
                }
                div.row {
                    form.inline method="post" action=(format!("/adapters/rollback{q}")) {
                        (csrf_field(session))
                        button.secondary type="submit" id="rollback" { "Roll back" }
                    }
                    form.inline method="post" action=(format!("/adapters/base{q}")) {
                        (csrf_field(session))
                        button.secondary type="submit" id="use-base" disabled[active.is_none()] { "Use base model" }
                    }
                    a.button href="/adapters/compare" { "Compare" }
                }
            }
            (super::canary::section(session, &canaries, &views, &q))
            @if views.is_empty() {
                p.muted { "No adapters yet: they appear here when a training job succeeds, or upload one below." }
            } @else {
                div.table-wrap {
                    table id="adapter-list" {
                        thead { tr { th { "Name" } th { "Job" } th { "Base model" } th { "Rank" } th { "Metrics" } th { "Ratings" } th { "Created" } th { "" } } }
                        tbody { @for a in &views { (adapter_row(session, a, &q)) } }
                    }
                }
            }
            section.card {
                h2 { "Upload a PEFT adapter" }
                p.hint {
                    "A zip with adapter_config.json and adapter_model.safetensors (and loraloop_adapter.json, if it came from loraloop). "
                    "It is checked against the served model " (state.core.model.name) " before it is kept."
                }
                form method="post" enctype="multipart/form-data" id="upload-form"
                    action=(format!("/adapters/upload?_csrf={}", session.csrf)) {
                    label { "Name" input name="name" id="upload-name" required pattern="[A-Za-z0-9_][A-Za-z0-9_.\\-]*" maxlength="100"; }
                    label { "Zip file" input type="file" name="file" id="upload-file" accept=".zip,application/zip" required; }
                    button type="submit" { "Upload" }
                }
            }
        },
    );
    if let Some(e) = error {
        *resp.status_mut() = e.status;
    }
    resp
}

fn adapter_row(session: &AdminSession, a: &AdapterView, q: &str) -> Markup {
    let m = &a.metrics;
    let final_loss = m.get("final_loss").and_then(Value::as_f64);
    let eval = m.get("eval");
    let eval_loss = eval.and_then(|e| e.get("loss")).and_then(Value::as_f64);
    let ppl = eval
        .and_then(|e| e.get("perplexity"))
        .and_then(Value::as_f64);
    let acc = eval.and_then(|e| e.get("accuracy")).and_then(Value::as_f64);
    html! {
        tr id=(format!("adapter-{}", a.id)) data-name=(a.name) data-active=(a.active) {
            td {
                strong { (a.name) }
                @if a.active { " " span.badge.active-marker { "active" } }
                @if a.canary { " " span.badge.canary-marker { "canary" } }
                @if let Some(why) = &a.incompatible { p.error.small { (why) } }
                @if a.forgotten_data_at.is_some() { p.error.small { "Trained on data a user asked to forget: retrain it on the dataset's new version, or retire it." } }
            }
            td { @match a.job_id { Some(j) => { a href=(format!("/jobs/{j}")) { "#" (j) } }, None => { span.muted { "upload" } } } }
            td { (super::jobs::model_label(&a.base_model)) " · " (a.method) }
            td { @match a.rank { Some(r) => (r), None => "–" } @if let Some(al) = a.alpha { span.muted { " α " (num(al)) } } }
            td.metrics {
                @if let Some(l) = final_loss { span { "loss " (num(l)) } " " }
                @if let Some(l) = eval_loss { span { "eval loss " (num(l)) } " " }
                @if let Some(p) = ppl { span { "ppl " (num(p)) } " " }
                @if let Some(x) = acc { span { "acc " (format!("{:.1}%", x * 100.0)) } }
                @if final_loss.is_none() && eval_loss.is_none() { span.muted { "–" } }
                @if let Some(card) = a.report_card.clone().and_then(|c| serde_json::from_value(c).ok()) {
                    " " a href=(format!("/jobs/{}#report-card", a.job_id.unwrap_or_default())) { (super::report_card::badge(&card)) }
                }
            }
            td { (super::canary::ratings(a)) }
            td { (short_time(&chrono::DateTime::from_timestamp(a.created_at, 0).map(|t| t.to_rfc3339()).unwrap_or_default())) }
            td.actions {
                @if !a.active && a.incompatible.is_none() {
                    form.inline method="post" action=(format!("/adapters/{}/activate{q}", a.id)) {
                        (csrf_field(session))
                        button type="submit" class="activate" data-adapter=(a.name) { "Activate" }
                    }
                    " "
                }
                a href=(format!("/adapters/{}/download", a.id)) class="download" title="PEFT files (zip)" { "Download" }
                @if a.incompatible.is_none() {
                    " "
                    a href=(format!("/adapters/{}/export?format=lora", a.id)) class="export-lora" title="LoRA GGUF for llama.cpp (--lora) or Ollama (ADAPTER)" { "GGUF" }
                    " "
                    a href=(format!("/adapters/{}/export?format=merged&type=q8_0", a.id)) class="export-merged" title="the model with this adapter merged in, Q8_0 GGUF" { "Merged GGUF" }
                }
            }
        }
    }
}

async fn activate(
    Console { state, session }: Console,
    PageId(id): PageId,
    ChosenAssistant(assistant): ChosenAssistant,
) -> Response {
    swap(&state, &session, &assistant, Some(id), "activated").await
}

async fn use_base(
    Console { state, session }: Console,
    ChosenAssistant(assistant): ChosenAssistant,
) -> Response {
    swap(&state, &session, &assistant, None, "base").await
}

/// Activate `adapter` (None: the base model) for the assistant.
async fn swap(
    state: &AppState,
    session: &AdminSession,
    assistant: &Assistant,
    adapter: Option<i64>,
    ok: &str,
) -> Response {
    match state
        .core
        .adapters
        .activate(assistant.id, adapter, "operator")
        .await
    {
        Ok(_) => back_to(assistant, ok),
        Err(e) => page(state, session, assistant, None, Some(&ApiError::from(e))).await,
    }
}

async fn rollback(
    Console { state, session }: Console,
    ChosenAssistant(assistant): ChosenAssistant,
) -> Response {
    match state.core.adapters.rollback(assistant.id, "operator").await {
        Ok(_) => back_to(&assistant, "rolledback"),
        Err(e) => page(&state, &session, &assistant, None, Some(&ApiError::from(e))).await,
    }
}

/// `GET /adapters/{id}/export?format=lora|merged&type=...`: a GGUF for llama.cpp / Ollama.
async fn export(
    Console { state, session }: Console,
    PageId(id): PageId,
    q: Result<
        axum::extract::Query<crate::export_api::ExportQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Response {
    let q = match q {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return fail(&session, &ApiError::invalid("query", e.body_text())),
    };
    match crate::export_api::export_download(&state, id, &q, crate::audit::CONSOLE).await {
        Ok(r) => r,
        Err(e) => fail(&session, &e),
    }
}

/// `GET /adapters/{id}/download`: the adapter's PEFT files as a zip.
async fn download(Console { state, session }: Console, PageId(id): PageId) -> Response {
    let row = match state.core.db.adapter(id).await {
        Ok(r) => r,
        Err(e) => return fail(&session, &ApiError::from(e)),
    };
    let dir = PathBuf::from(&row.path);
    let zipped = tokio::task::spawn_blocking(move || zip_dir(&dir)).await;
    let bytes = match zipped {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return fail(&session, &e),
        Err(e) => return fail(&session, &ApiError::internal(e)),
    };
    let file_name = crate::export_api::download_name(&row.name);
    (
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file_name}.zip\""),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// A zip of the adapter files in `dir` (the config and weights must be there).
fn zip_dir(dir: &FsPath) -> Result<Vec<u8>, ApiError> {
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(false);
    for name in ADAPTER_FILES {
        let path = dir.join(name);
        if !path.is_file() {
            if name == METADATA_FILE {
                continue;
            }
            return Err(ApiError::not_found(format!(
                "the adapter's {name} is missing from {}",
                dir.display()
            )));
        }
        let bytes = std::fs::read(&path).map_err(ApiError::internal)?;
        out.start_file(name, options).map_err(ApiError::internal)?;
        out.write_all(&bytes).map_err(ApiError::internal)?;
    }
    Ok(out.finish().map_err(ApiError::internal)?.into_inner())
}

/// Names an uploaded adapter may not take: they mean something else to `model`.
async fn reserved(state: &AppState, name: &str) -> bool {
    reserved_model_name(name, &state.core.model.name) || state.core.db.assistant(name).await.is_ok()
}

/// `POST /adapters/upload?_csrf=...` (multipart: `file`, `name`).
async fn upload(Console { state, session }: Console, req: Request) -> Response {
    match receive_upload(&state, req).await {
        Ok(()) => Redirect::to("/adapters?ok=uploaded").into_response(),
        Err(e) => match state.core.assistants.default_assistant().await {
            Ok(a) => page(&state, &session, &a, None, Some(&e)).await,
            Err(d) => fail(&session, &d.into()),
        },
    }
}

async fn receive_upload(state: &AppState, req: Request) -> Result<(), ApiError> {
    let (bytes, fields) = crate::files::read_upload(state, req, "file").await?;
    let given = fields.get("name").map(|n| n.trim()).unwrap_or("");
    let name = if given.is_empty() {
        fields
            .get("filename")
            .map(|f| f.trim_end_matches(".zip").to_string())
            .unwrap_or_default()
    } else {
        given.to_string()
    };
    crate::files::safe_file_name(&name)?;
    if reserved(state, &name).await {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} is reserved; choose another name"),
        ));
    }
    if state.core.db.adapter_named(&name).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "an adapter named {name:?} exists already"
        )));
    }
    let target = state
        .core
        .adapters_dir
        .join(format!("{}{name}", crate::files::UPLOADED_PREFIX));
    if target.exists() {
        return Err(ApiError::conflict(format!(
            "the folder {} exists already",
            target.display()
        )));
    }
    let staging = state.core.adapters_dir.join(format!(
        "{}{}",
        crate::files::UPLOAD_STAGING_PREFIX,
        loraloop_core::token::random_token(8)
    ));
    let result = check_upload(state, &name, bytes, &staging, &target).await;
    if staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    if result.is_ok() {
        crate::audit::record(state, crate::audit::CONSOLE, "upload adapter", &name).await;
    }
    result
}

/// Unpack into `staging`, check the files against the served model, move them to
/// `target` and record the adapter. The caller removes `staging`; `target` is removed
/// here if the adapter cannot be recorded.
async fn check_upload(
    state: &AppState,
    name: &str,
    bytes: Vec<u8>,
    staging: &FsPath,
    target: &FsPath,
) -> Result<(), ApiError> {
    let limit = state.max_upload_bytes;
    let dir = staging.to_path_buf();
    tokio::task::spawn_blocking(move || unpack(&bytes, &dir, limit))
        .await
        .map_err(ApiError::internal)??;
    let metadata = match std::fs::read_to_string(staging.join(METADATA_FILE)) {
        Ok(text) => Some(serde_json::from_str::<Value>(&text).map_err(|e| {
            ApiError::invalid("file", format!("{METADATA_FILE} is not valid JSON: {e}"))
        })?),
        Err(_) => None,
    };
    if let Some(meta) = &metadata {
        let m = &state.core.model;
        for (key, what, ours) in [
            ("base_model_hash", "base model", &m.hash),
            ("tokenizer_hash", "tokenizer", &m.tokenizer_hash),
            ("chat_template_hash", "chat template", &m.chat_template_hash),
        ] {
            let theirs = meta.get(key).and_then(Value::as_str).unwrap_or("");
            if theirs != ours {
                return Err(ApiError::conflict(format!(
                    "this adapter was trained against a different {what} than the served model {} ({METADATA_FILE} has {key} {theirs:?}); it would produce garbage",
                    m.name
                )));
            }
        }
    }
    let lora = state
        .core
        .engine
        .load_adapter(staging.to_path_buf())
        .await
        .map_err(|e| {
            ApiError::invalid(
                "file",
                format!("the adapter does not fit the served model: {e}"),
            )
        })?;
    std::fs::rename(staging, target).map_err(ApiError::internal)?;
    let mut modules: Vec<String> = lora
        .targets
        .iter()
        .map(|p| p.hf_name().to_string())
        .collect();
    modules.sort();
    let mut metrics = serde_json::json!({ "source": "upload" });
    if let Some(meta) = &metadata {
        for k in ["final_loss", "eval", "step"] {
            if let Some(v) = meta.get(k).filter(|v| !v.is_null()) {
                metrics[k] = v.clone();
            }
        }
    }
    let base_model = metadata
        .as_ref()
        .and_then(|m| m.get("base_model"))
        .and_then(Value::as_str)
        .unwrap_or(&state.core.model.config_name)
        .to_string();
    let inserted = state
        .core
        .db
        .insert_adapter(&NewAdapter {
            name,
            path: &target.display().to_string(),
            base_model: &base_model,
            base_model_hash: &state.core.model.hash,
            tokenizer_hash: &state.core.model.tokenizer_hash,
            chat_template_hash: &state.core.model.chat_template_hash,
            rank: Some(lora.config.r as i64),
            alpha: Some(lora.config.lora_alpha),
            target_modules: &modules,
            metrics: &metrics,
            job_id: None,
            assistant_id: None,
        })
        .await;
    if let Err(e) = inserted {
        let _ = std::fs::remove_dir_all(target);
        return Err(e.into());
    }
    Ok(())
}

/// Unpack a PEFT adapter zip into `dir` (created here): only the expected files, at the
/// top or in one folder, no paths that leave the folder, no links, at most `limit`
/// bytes unpacked.
fn unpack(bytes: &[u8], dir: &FsPath, limit: u64) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::invalid("file", m);
    // The zip itself was within the upload limit; what it unpacks to is held to it too.
    let too_big = || {
        ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the zip unpacks to more than the upload limit of {} (server.max_upload_mb)",
                crate::error::size_text(limit)
            ),
        )
        .with_param("file")
    };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| bad(format!("the file is not a zip archive: {e}")))?;
    // The reader keeps only the last of entries with one name; another unzip tool may
    // take the first, so which file is the adapter would depend on the tool.
    if zip.has_duplicate_names() {
        return Err(bad("the zip holds an entry name twice".into()));
    }
    std::fs::create_dir_all(dir).map_err(ApiError::internal)?;
    let mut total = 0u64;
    let mut seen: Vec<&str> = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| bad(format!("the zip cannot be read: {e}")))?;
        let raw = entry
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        let absolute = raw.starts_with(['/', '\\']) || raw.contains(':');
        let Some(path) = entry.enclosed_name().filter(|_| !absolute) else {
            return Err(bad(format!(
                "the zip entry {raw:?} points outside the adapter folder"
            )));
        };
        if entry.is_symlink() {
            return Err(bad(format!("the zip entry {raw:?} is a link")));
        }
        if entry.is_dir() {
            if path.components().count() > 1 {
                return Err(bad(format!("unexpected folder {raw:?} in the zip")));
            }
            continue;
        }
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(known) = ADAPTER_FILES.iter().find(|f| **f == file_name) else {
            return Err(bad(format!(
                "unexpected file {raw:?}: an adapter zip holds only {}",
                ADAPTER_FILES.join(", ")
            )));
        };
        if path.components().count() > 2 {
            return Err(bad(format!(
                "{raw:?} is nested too deep: put the files at the top of the zip"
            )));
        }
        if seen.contains(known) {
            return Err(bad(format!("the zip holds {known} twice")));
        }
        seen.push(known);
        if total.saturating_add(entry.size()) > limit {
            return Err(too_big());
        }
        let mut out = std::fs::File::create(dir.join(known)).map_err(ApiError::internal)?;
        // The declared size can lie: never write more than the limit allows.
        let copied = std::io::copy(&mut (&mut entry).take(limit - total + 1), &mut out)
            .map_err(|e| bad(format!("{known} cannot be unpacked: {e}")))?;
        total += copied;
        if total > limit {
            return Err(too_big());
        }
    }
    for required in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] {
        if !seen.contains(&required) {
            return Err(bad(format!("the zip has no {required}")));
        }
    }
    Ok(())
}

/// What the compare form's choice runs on: `active`, `base` or an adapter name.
async fn choice_for(state: &AppState, sel: &str) -> Result<AdapterChoice, ApiError> {
    match sel {
        "" | "active" => Ok(AdapterChoice::Active),
        other => Ok(state.core.adapters.choice(other).await?),
    }
}

/// One side's answer to one prompt: the text and what produced it.
struct Answer {
    text: Result<String, String>,
    adapter: String,
}

async fn answer(state: &AppState, prompt: &str, choice: AdapterChoice) -> Answer {
    let mut messages = Vec::new();
    if !state.core.assistant.system_prompt.is_empty() {
        messages.push(TemplateMessage::new(
            "system",
            state.core.assistant.system_prompt.clone(),
        ));
    }
    messages.push(TemplateMessage::new("user", prompt.to_string()));
    let generation = state
        .core
        .engine
        .generate_off_thread(GenerateRequest {
            prompt: Prompt::Chat(messages),
            params: SamplingParams::greedy(COMPARE_TOKENS),
            adapter: choice,
            user: None,
        })
        .await;
    let mut in_flight = state.core.metrics.generation_started();
    let result = match generation {
        Ok(g) => g.finish().await,
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(f) => {
            in_flight.finished(f.completion_tokens, f.decode_secs);
            Answer {
                adapter: f
                    .adapter
                    .as_ref()
                    .map_or("base".to_string(), |t| t.name.clone()),
                text: Ok(f.text),
            }
        }
        Err(m) => {
            in_flight.failed();
            Answer {
                adapter: String::new(),
                text: Err(m),
            }
        }
    }
}

/// `GET /adapters/compare?a=base&b=NAME&prompts=...`: both answers to each prompt.
async fn compare(
    Console { state, session }: Console,
    ChosenAssistant(assistant): ChosenAssistant,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let views = match crate::adapter_views::adapter_views(&state, &assistant).await {
        Ok(v) => v,
        Err(e) => return fail(&session, &e),
    };
    let a = match field(&pairs, "a") {
        "" => "base",
        s => s,
    };
    let b = match field(&pairs, "b") {
        "" => "active",
        s => s,
    };
    let prompts_text = field(&pairs, "prompts");
    let prompts: Vec<&str> = prompts_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut error = None;
    let mut results = Vec::new();
    if prompts.len() > COMPARE_PROMPTS {
        error = Some(ApiError::invalid(
            "prompts",
            format!(
                "at most {COMPARE_PROMPTS} prompts, one per line (got {})",
                prompts.len()
            ),
        ));
    } else if !prompts.is_empty() {
        match (choice_for(&state, a).await, choice_for(&state, b).await) {
            (Ok(ca), Ok(cb)) => {
                let jobs = prompts.iter().map(|p| {
                    let (state, ca, cb) = (&state, ca.clone(), cb.clone());
                    async move {
                        let (x, y) =
                            futures_util::join!(answer(state, p, ca), answer(state, p, cb));
                        (p.to_string(), x, y)
                    }
                });
                results = futures_util::future::join_all(jobs).await;
            }
            (Err(e), _) | (_, Err(e)) => error = Some(e),
        }
    }
    let options = |selected: &str| {
        html! {
            option value="active" selected[selected == "active"] { "The assistant now (active adapter)" }
            option value="base" selected[selected == "base"] { "Base model" }
            @for v in views.iter().filter(|v| v.incompatible.is_none()) {
                option value=(v.name) selected[selected == v.name] { (v.name) }
            }
        }
    };
    let mut resp = layout(
        "Compare adapters",
        Some(&session),
        "/adapters",
        html! {
            h1 { "Compare" }
            @if let Some(e) = &error { p.error role="alert" id="compare-error" { (e.message) } }
            form.card method="get" action="/adapters/compare" id="compare-form" {
                div.grid {
                    label { "Left" select name="a" id="compare-a" { (options(a)) } }
                    label { "Right" select name="b" id="compare-b" { (options(b)) } }
                }
                label {
                    "Prompts, one per line (at most " (COMPARE_PROMPTS) ")"
                    textarea name="prompts" id="compare-prompts" rows="5" { (prompts_text) }
                }
                p.hint { "Greedy decoding, at most " (COMPARE_TOKENS) " tokens per answer." }
                button type="submit" { "Compare" }
            }
            @if !results.is_empty() {
                div id="compare-results" {
                    @for (prompt, x, y) in &results {
                        section.card.compare {
                            div.msg.user { (prompt) }
                            div.compare-pair {
                                @for (side, ans) in [(a, x), (b, y)] {
                                    div.msg.assistant data-adapter=(ans.adapter) data-choice=(side) {
                                        div.meta { (side) @if !ans.adapter.is_empty() && ans.adapter != side { " (" (ans.adapter) ")" } }
                                        @match &ans.text {
                                            Ok(t) => { (t) }
                                            Err(m) => { span.error { "failed: " (m) } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    );
    if let Some(e) = &error {
        *resp.status_mut() = e.status;
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, bytes) in entries {
            w.start_file(*name, SimpleFileOptions::default()).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn unpack_takes_only_the_adapter_files() {
        let tmp = tempfile::tempdir().unwrap();
        let ok = zip_of(&[
            ("my-adapter/adapter_config.json", b"{}"),
            ("my-adapter/adapter_model.safetensors", b"xx"),
        ]);
        let dir = tmp.path().join("ok");
        unpack(&ok, &dir, 1000).unwrap();
        assert_eq!(std::fs::read(dir.join(ADAPTER_CONFIG_FILE)).unwrap(), b"{}");

        for (entries, why) in [
            (
                vec![("adapter_config.json", &b"{}"[..]), ("../evil", b"x")],
                "outside",
            ),
            (
                vec![("adapter_config.json", &b"{}"[..]), ("/etc/evil", b"x")],
                "outside",
            ),
            (
                vec![("adapter_config.json", &b"{}"[..]), ("run.sh", b"x")],
                "unexpected file",
            ),
            (
                vec![("adapter_config.json", &b"{}"[..])],
                "no adapter_model",
            ),
            (
                vec![
                    ("adapter_config.json", &b"{}"[..]),
                    ("adapter_model.safetensors", &[0u8; 2000][..]),
                ],
                "the zip unpacks to more than the upload limit of 1 KB",
            ),
        ] {
            let dir = tmp.path().join("bad");
            let e = unpack(&zip_of(&entries), &dir, 1000).unwrap_err();
            assert!(e.message.contains(why), "{why}: {}", e.message);
            assert!(!tmp.path().join("evil").exists());
            let _ = std::fs::remove_dir_all(&dir);
        }
        let e = unpack(b"not a zip", &tmp.path().join("x"), 1000).unwrap_err();
        assert!(e.message.contains("not a zip"), "{}", e.message);
        // One name twice (the writer refuses that, so the second name is patched in: a
        // zip stores names outside what its checksums cover).
        let mut twice = zip_of(&[
            ("adapter_config.json", b"{}"),
            ("adapter_config.jsoX", b"{\"r\": 8}"),
            ("adapter_model.safetensors", b"xx"),
        ]);
        let (from, to) = (&b"adapter_config.jsoX"[..], &b"adapter_config.json"[..]);
        for i in 0..twice.len() - from.len() {
            if &twice[i..i + from.len()] == from {
                twice[i..i + to.len()].copy_from_slice(to);
            }
        }
        let e = unpack(&twice, &tmp.path().join("twice"), 1000).unwrap_err();
        assert!(e.message.contains("an entry name twice"), "{}", e.message);
    }
}
