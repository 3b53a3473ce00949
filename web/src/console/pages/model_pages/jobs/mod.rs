//! The console's training jobs: the list, a job's page with its loss chart and events,
//! cancelling; the new-job form is in `form`, the run estimate in `estimate`.

mod estimate;
mod form;

use super::report_card;
use super::{PageId, duration, fail, num, short_time};
use crate::classifier_api;
use crate::console::{Console, csrf_field, layout};
use crate::error::ApiError;
use crate::operations::{self};
use crate::state::AppState;
use axum::Router;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use form::{create, estimate_fragment, new_form};
use loraloop_core::storage::{TrainingEvent, TrainingJob};
use maud::{Markup, html};
use serde_json::{Map, Value};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/jobs", get(list).post(create))
        .route("/jobs/new", get(new_form))
        .route("/jobs/estimate", get(estimate_fragment))
        .route("/jobs/{id}", get(show))
        .route("/jobs/{id}/events", get(events))
        .route("/jobs/{id}/cancel", post(cancel))
}

async fn list(Console { state, session }: Console) -> Response {
    let jobs = match state.core.db.list_jobs(None, 200).await {
        Ok(j) => j,
        Err(e) => return fail(&session, &e.into()),
    };
    let classifier_jobs = match state.core.db.list_classifier_jobs(None, 200).await {
        Ok(j) => j,
        Err(e) => return fail(&session, &e.into()),
    };
    let datasets = state.core.db.list_datasets().await.unwrap_or_default();
    let adapters = state.core.db.list_adapters().await.unwrap_or_default();
    let dataset_name = |id: Option<i64>| match id {
        Some(id) => datasets
            .iter()
            .find(|d| d.id == id)
            .map(|d| format!("{} v{}", d.name, d.version))
            .unwrap_or_else(|| format!("#{id}")),
        None => "(file being validated)".to_string(),
    };
    // Chat-model and classifier fine-tunes in one list, newest first (both tables stamp
    // created_at in the same ISO format, so the strings order as the times do).
    let mut rows: Vec<(&str, Markup)> = Vec::with_capacity(jobs.len() + classifier_jobs.len());
    for j in &jobs {
        rows.push((
            &j.created_at,
            html! {
                tr data-job=(j.id) {
                    td { a href=(format!("/jobs/{}", j.id)) { "#" (j.id) } }
                    td { span class=(format!("status status-{}", j.state)) { (j.state) } }
                    td { (dataset_name(j.dataset_id)) }
                    td { (model_label(&j.base_model)) " · " (j.method) }
                    td { (j.step) " / " @match j.total_steps { Some(t) => (t), None => "?" } }
                    td { (short_time(&j.created_at)) }
                    td {
                        @match j.adapter_id.and_then(|id| adapters.iter().find(|a| a.id == id)) {
                            Some(a) => { a href=(format!("/adapters#adapter-{}", a.id)) { (a.name) } }
                            None => { span.muted { "–" } }
                        }
                    }
                }
            },
        ));
    }
    for j in &classifier_jobs {
        let method = serde_json::from_str::<Value>(&j.settings)
            .ok()
            .and_then(|v| v["finetuning_type"].as_str().map(str::to_string))
            .unwrap_or_else(|| "full".into());
        rows.push((
            &j.created_at,
            html! {
                tr data-classifier-job=(j.id) {
                    td { a href=(format!("/classifiers/{}", j.id)) { (classifier_api::ID_PREFIX) (j.id) } }
                    td { span class=(format!("status status-{}", j.state)) { (j.state) } }
                    td { (model_label(&j.data_path)) }
                    td { (model_label(&j.base_model)) " · " (j.task.replace('_', "-")) " · " (method) }
                    td { (j.step) " / " @match j.total_steps { Some(t) => (t), None => "?" } }
                    td { (short_time(&j.created_at)) }
                    td {
                        @match j.best_metric {
                            Some(m) => { "best " (num(m)) }
                            None => { span.muted { "–" } }
                        }
                    }
                }
            },
        ));
    }
    rows.sort_by(|a, b| b.0.cmp(a.0));
    layout(
        "Training",
        Some(&session),
        "/jobs",
        html! {
            h1 { "Training" }
            p {
                a.button href="/jobs/new" id="new-job" { "New training job" }
                " "
                a.button href="/classifiers" id="new-classifier-job" { "New classifier fine-tune" }
            }
            @if rows.is_empty() {
                p.muted { "No training jobs yet." }
            } @else {
                div.table-wrap {
                    table id="job-list" {
                        thead { tr { th { "Job" } th { "Status" } th { "Data" } th { "Model" } th { "Step" } th { "Created" } th { "Result" } } }
                        tbody {
                            @for (_, row) in &rows { (row) }
                        }
                    }
                }
            }
        },
    )
}

/// A model path shown by its last component.
pub(super) fn model_label(m: &str) -> &str {
    m.trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(m)
}

async fn show(Console { state, session }: Console, PageId(id): PageId) -> Response {
    let job = match state.core.db.job(id).await {
        Ok(j) => j,
        Err(e) => return fail(&session, &e.into()),
    };
    let events = match state.core.db.training_events(id, 0).await {
        Ok(e) => e,
        Err(e) => return fail(&session, &e.into()),
    };
    let dataset = match job.dataset_id {
        Some(d) => operations::dataset_by_id(&state, d).await.ok(),
        None => None,
    };
    let adapter = match job.adapter_id {
        Some(a) => state.core.db.adapter(a).await.ok(),
        None => None,
    };
    let hp: Map<String, Value> = serde_json::from_str(&job.hyperparameters).unwrap_or_default();
    let final_state = job.state().is_final();
    let (elapsed, remaining) = timing(&job, &events);
    const SHOWN: usize = 300;
    let skipped = events.len().saturating_sub(SHOWN);
    layout(
        &format!("Job {id}"),
        Some(&session),
        "/jobs",
        html! {
            link rel="stylesheet" href="/assets/uPlot.min.css";
            script src="/assets/uPlot.iife.min.js" defer {}
            h1 { "Training job #" (id) }
            @if let Some(err) = &job.error {
                div.card.failed role="alert" id="job-error" {
                    h2 { "The job failed" }
                    pre { (err) }
                }
            }
            div.grid {
                section.card {
                    h2 { "Progress" }
                    dl {
                        dt { "Status" } dd { span id="job-status" class=(format!("status status-{}", job.state)) { (job.state) }
                            @if job.cancel_requested && !final_state { " (cancel requested)" } }
                        dt { "Step" } dd id="job-step" { (job.step) " / " @match job.total_steps { Some(t) => (t), None => "?" } }
                        dt { "Elapsed" } dd id="job-elapsed" { (elapsed.map(duration).unwrap_or_else(|| "–".into())) }
                        dt { "Remaining" } dd id="job-remaining" { (remaining.map(duration).unwrap_or_else(|| "–".into())) }
                        dt { "Created" } dd { (short_time(&job.created_at)) }
                        @if let Some(a) = &adapter {
                            dt { "Adapter" } dd { a href=(format!("/adapters#adapter-{}", a.id)) id="job-adapter" { (a.name) } }
                        }
                    }
                    progress id="job-progress" max=(job.total_steps.unwrap_or(0).max(1)) value=(job.step) {}
                    @if !final_state {
                        form method="post" action=(format!("/jobs/{id}/cancel")) id="cancel-form" {
                            (csrf_field(&session))
                            button.danger type="submit" id="cancel-job" { "Cancel job" }
                        }
                    }
                }
                section.card {
                    h2 { "Settings" }
                    dl id="job-settings" {
                        dt { "Dataset" } dd { @match &dataset { Some(d) => { (d.name) " v" (d.version) " (" (d.example_count) " examples)" }, None => { (job.dataset_id.map_or("none yet: its file is being validated".to_string(), |d| format!("#{d}"))) } } }
                        dt { "Model" } dd { (model_label(&job.base_model)) }
                        dt { "Method" } dd { (job.method) }
                        @for (k, v) in hp.iter().filter(|(k, _)| k.as_str() != "finetuning_type") {
                            dt { (k) } dd { (match v { Value::String(s) => s.clone(), other => other.to_string() }) }
                        }
                    }
                }
            }
            @if let Some(card) = report_card::parse(adapter.as_ref().and_then(|a| a.report_card.as_deref())) {
                (report_card::full(&card))
            }
            section.card {
                h2 { "Loss and learning rate" }
                div id="loss-chart" class="chart" data-points="0" data-job=(id)
                    data-events-url=(format!("/jobs/{id}/events")) data-total=(job.total_steps.unwrap_or(0))
                    data-final=(final_state) {
                    noscript { "The chart needs JavaScript; the log below has every value." }
                }
            }
            section.card {
                h2 { "Log" }
                @if skipped > 0 { p.hint { "The first " (skipped) " events are not shown." } }
                div id="job-log" class="log" data-last-id=(events.last().map_or(0, |e| e.id)) {
                    @for e in events.iter().skip(skipped) {
                        div.ev data-id=(e.id) data-kind=(e.kind) { (event_line(e)) }
                    }
                }
            }
        },
    )
}

/// Elapsed seconds, and remaining seconds from the pace of the step events.
fn timing(job: &TrainingJob, events: &[TrainingEvent]) -> (Option<f64>, Option<f64>) {
    let secs = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|d| d.timestamp_millis() as f64 / 1e3)
    };
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1e3;
    let start = job.started_at.as_deref().and_then(secs);
    let end = job.finished_at.as_deref().and_then(secs).unwrap_or(now);
    let elapsed = start.map(|s| (end - s).max(0.0));
    if job.state().is_final() {
        return (elapsed, None);
    }
    let steps: Vec<(i64, f64)> = events
        .iter()
        .filter(|e| e.kind == "step")
        .filter_map(|e| Some((e.step?, secs(&e.created_at)?)))
        .collect();
    let remaining = match (job.total_steps, steps.first(), steps.last()) {
        (Some(total), Some(&(s0, t0)), Some(&(s1, t1))) if s1 > s0 => {
            Some((t1 - t0) / (s1 - s0) as f64 * (total - s1) as f64)
        }
        (Some(total), Some(&(s1, t1)), _) if s1 > 0 => {
            start.map(|s| (t1 - s) / s1 as f64 * (total - s1) as f64)
        }
        _ => None,
    };
    (elapsed, remaining)
}

/// One log line: what a step, an evaluation or a message said.
fn event_line(e: &TrainingEvent) -> String {
    let time = e.created_at.get(11..19).unwrap_or("");
    let body = match e.kind.as_str() {
        "step" => {
            let mut s = format!("step {}", e.step.unwrap_or(0));
            if let Some(l) = e.loss {
                s += &format!(" · loss {}", num(l));
            }
            if let Some(lr) = e.learning_rate {
                s += &format!(" · lr {}", num(lr));
            }
            if let Some(t) = e.tokens_per_sec {
                s += &format!(" · {t:.0} tokens/s");
            }
            s
        }
        "eval" => format!(
            "eval at step {} · eval loss {}",
            e.step.unwrap_or(0),
            e.eval_loss.map(num).unwrap_or_default()
        ),
        _ => e.message.clone().unwrap_or_default(),
    };
    format!("{time} {} {body}", e.kind)
}

/// `GET /jobs/{id}/events`: the job's events as server-sent events (the chart's feed).
/// A reconnecting browser sends `Last-Event-ID` and gets only what it missed.
async fn events(
    Console { state, .. }: Console,
    headers: HeaderMap,
    PageId(id): PageId,
) -> Response {
    if let Err(e) = state.core.db.job(id).await {
        return ApiError::from(e).into_response();
    }
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    crate::api::event_stream(state, id, after).into_response()
}

async fn cancel(Console { state, session }: Console, PageId(id): PageId) -> Response {
    match operations::cancel_job(&state, id, &format!("job {id}"), crate::audit::CONSOLE).await {
        Ok(()) => Redirect::to(&format!("/jobs/{id}")).into_response(),
        Err(e) => fail(&session, &e),
    }
}
