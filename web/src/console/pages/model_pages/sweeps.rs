//! Sweeps in the console: start one from its YAML (the same as `loraloop sweep`), follow
//! its trials, see them ranked by their report cards and what became of the best.

use super::{PageId, fail, field, num};
use crate::auth::AdminSession;
use crate::console::{Console, FormPairs, csrf_field, layout, short_time};
use crate::error::ApiError;
use crate::state::AppState;
use crate::sweep_api::{SweepView, start_sweep, sweep_view};
use axum::Router;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use loraloop_trainer::sweep::SweepSpec;
use maud::{Markup, html};

const EXAMPLE: &str = "dataset: my-dataset      # a stored dataset's name or id
search: grid             # or random, with trials: N and seed: S
hyperparameters: {batch_size: 8, val_set_size: 0.1}
parameters:
  learning_rate: [1e-4, 2e-4]
  lora_r: [8, 16]
activate_best: false     # true: the best goes through the activation policy
";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sweeps", get(list).post(start))
        .route("/sweeps/{id}", get(show))
}

async fn list(Console { state, session }: Console) -> Response {
    page(&state, &session, EXAMPLE, None).await
}

async fn page(
    state: &AppState,
    session: &AdminSession,
    yaml: &str,
    error: Option<&ApiError>,
) -> Response {
    let sweeps = match state.core.db.list_sweeps(50).await {
        Ok(s) => s,
        Err(e) => return fail(session, &e.into()),
    };
    let mut views = Vec::new();
    for s in sweeps {
        match sweep_view(state, s).await {
            Ok(v) => views.push(v),
            Err(e) => return fail(session, &e),
        }
    }
    let status = if error.is_some() {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY
    } else {
        axum::http::StatusCode::OK
    };
    let mut resp = layout(
        "Sweeps",
        Some(session),
        "/sweeps",
        html! {
            h1 { "Sweeps" }
            p.hint { "Grid or random search over training settings: each trial is a training job, ranked by its report card (passes the gate, then the lowest held-out loss, then the least drift from the base model) when the last one ends." }
            @if let Some(e) = error {
                p.error id="sweep-error" role="alert" { (e.message) }
            }
            form method="post" action="/sweeps" id="sweep-form" {
                (csrf_field(session))
                label for="sweep-yaml" { "Sweep (YAML)" }
                textarea id="sweep-yaml" name="yaml" rows="10" spellcheck="false" { (yaml) }
                button type="submit" { "Start sweep" }
            }
            @if views.is_empty() {
                p.muted { "No sweeps yet." }
            } @else {
                table id="sweep-list" {
                    thead { tr { th { "Sweep" } th { "Status" } th { "Trials" } th { "Best" } th { "Started" } } }
                    tbody {
                        @for v in &views {
                            tr data-sweep=(v.id) {
                                td { a href=(format!("/sweeps/{}", v.id)) { (v.name) } }
                                td { (v.status) }
                                td { (v.trials.len()) }
                                td { (v.best_adapter.as_deref().unwrap_or("-")) }
                                td { (short_time(&chrono::DateTime::from_timestamp(v.created_at, 0).map(|t| t.to_rfc3339()).unwrap_or_default())) }
                            }
                        }
                    }
                }
            }
        },
    );
    *resp.status_mut() = status;
    resp
}

async fn start(Console { state, session }: Console, FormPairs(pairs): FormPairs) -> Response {
    let yaml = field(&pairs, "yaml");
    let spec: Result<SweepSpec, ApiError> = serde_yaml::from_str::<serde_json::Value>(yaml)
        .map_err(|e| ApiError::invalid("yaml", format!("not valid YAML: {e}")))
        .and_then(|v| {
            serde_json::from_value(v)
                .map_err(|e| ApiError::invalid("yaml", format!("not a sweep: {e}")))
        });
    let started = match spec {
        Ok(s) => start_sweep(&state, &s, crate::audit::CONSOLE).await,
        Err(e) => Err(e),
    };
    match started {
        Ok(s) => Redirect::to(&format!("/sweeps/{}", s.id)).into_response(),
        Err(e) => page(&state, &session, yaml, Some(&e)).await,
    }
}

async fn show(Console { state, session }: Console, PageId(id): PageId) -> Response {
    let view = match state.core.db.sweep(id).await {
        Ok(s) => sweep_view(&state, s).await,
        Err(e) => Err(e.into()),
    };
    match view {
        Ok(v) => layout(&v.name.clone(), Some(&session), "/sweeps", trials(&v)),
        Err(e) => fail(&session, &e),
    }
}

fn trials(v: &SweepView) -> Markup {
    let mut rows: Vec<_> = v.trials.iter().collect();
    rows.sort_by_key(|t| t.rank.unwrap_or(usize::MAX));
    let opt = |x: Option<f64>| x.map_or("-".to_string(), num);
    html! {
        h1 { (v.name) }
        p id="sweep-status" data-status=(v.status) {
            @if v.status == "finished" { "Finished. " (v.decision.as_deref().unwrap_or("")) } @else { "Running: this page shows the trials as they are now; reload to follow." }
        }
        table id="sweep-trials" {
            thead { tr { th { "Rank" } th { "Job" } th { "Settings" } th { "Status" } th { "Passes gate" } th { "Held-out loss (base)" } th { "Drift KL" } th { "Adapter" } } }
            tbody {
                @for t in rows {
                    tr data-job=(t.job_id) data-rank=(t.rank.map(|r| r.to_string()).unwrap_or_default()) {
                        td { (t.rank.map(|r| r.to_string()).unwrap_or("-".into())) }
                        td { a href=(format!("/jobs/{}", t.job_id)) { "#" (t.job_id) } }
                        td { code { (serde_json::Value::Object(t.varied.clone())) } }
                        td { (t.status) }
                        @match &t.standing {
                            Some(s) => {
                                td { (if s.passes { "yes" } else { "no" }) }
                                td { (opt(s.heldout_loss)) " (" (opt(s.base_heldout_loss)) ")" }
                                td { (num(s.drift_kl)) }
                            }
                            None => { td { "-" } td { "-" } td { "-" } }
                        }
                        td { (t.adapter.as_deref().unwrap_or("-")) }
                    }
                }
            }
        }
        p { a href="/sweeps" { "All sweeps" } }
    }
}
