//! Classifier fine-tunes in the console: start one (a model folder from the models
//! directory, data inside `imports.dir`, the task's settings), follow it: a loss chart
//! drawn on the server (each step's training loss, each epoch's held-out loss), each
//! epoch's held-out accuracy and macro-F1, the best epoch's per-class scores and
//! confusion matrix. While the job is live, `console.js` fetches the page again every two
//! seconds and swaps the job's part in.

use super::{PageId, fail, field, num};
use crate::auth::AdminSession;
use crate::classifier_api::{self, ClassifierJobView};
use crate::console::{Console, FormPairs, csrf_field, layout, short_time};
use crate::error::ApiError;
use crate::operations::CreateJob;
use crate::state::AppState;
use axum::Router;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};
use serde_json::{Map, Value};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/classifiers", get(list).post(create))
        .route("/classifiers/{id}", get(show))
        .route("/classifiers/{id}/cancel", post(cancel))
}

/// Model folders the console offers: encoders and ResNets in the models directory.
fn model_choices(state: &AppState) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&state.core.config.models_dir) {
        for e in rd.flatten() {
            let p = e.path();
            if let Some(task) = p
                .is_dir()
                .then(|| loraloop_model::classify::detect_task(&p))
                .flatten()
            {
                out.push((e.file_name().to_string_lossy().to_string(), task.name()));
            }
        }
    }
    out.sort();
    for r in ["resnet18", "resnet34", "resnet50"] {
        if !out.iter().any(|(n, _)| n == r) {
            out.push((r.to_string(), "image-classification, random weights"));
        }
    }
    out
}

async fn list(Console { state, session }: Console) -> Response {
    page(&state, &session, &[], None).await
}

async fn page(
    state: &AppState,
    session: &AdminSession,
    form: &[(String, String)],
    error: Option<&ApiError>,
) -> Response {
    let jobs = match state.core.db.list_classifier_jobs(None, 50).await {
        Ok(j) => j,
        Err(e) => return fail(session, &e.into()),
    };
    let models = model_choices(state);
    let v = |k: &str, d: &str| -> String {
        let f = field(form, k);
        if f.is_empty() {
            d.to_string()
        } else {
            f.to_string()
        }
    };
    // A select's fixed choices, the posted one (else `default`) selected.
    let choices = |name: &str, options: &[&str], default: &str| {
        let chosen = v(name, default);
        html! { @for m in options { option value=(m) selected[chosen == *m] { (m) } } }
    };
    let imports = state.core.config.raw.imports.dir.clone();
    let mut resp = layout(
        "Classifiers",
        Some(session),
        "/classifiers",
        html! {
            h1 { "Classifiers" }
            p.hint { "Fine-tune a text encoder (BERT, DistilBERT, MiniLM) on labelled texts or a ResNet on class folders of images. Held-out accuracy, macro-F1 and the confusion matrix come after every epoch; every epoch is a checkpoint, and the best one serves POST /api/v1/predict." }
            @if let Some(e) = error {
                p.error id="classifier-error" role="alert" { (e.message) }
            }
            @match &imports {
                None => p.muted id="classifier-no-imports" { "Set imports.dir in the configuration: classifier data is read from there." },
                Some(dir) => form method="post" action="/classifiers" id="classifier-form" {
                    (csrf_field(session))
                    label for="c-model" { "Model (folders in the models directory)" }
                    select id="c-model" name="model_id" {
                        @for (name, task) in &models {
                            option value=(name) selected[v("model_id", "") == *name] { (name) " (" (task) ")" }
                        }
                    }
                    label for="c-data" { "Data in " code { (dir.display()) } ": a JSONL/CSV file of texts, or a folder of class folders" }
                    input id="c-data" name="data_path" value=(v("data_path", "")) required;
                    (text_field("eval", "eval_data_path", "Held-out data (optional; default: the folder's val/, else a split)", &v("eval_data_path", "")))
                    label for="c-method" { "Method" }
                    select id="c-method" name="method" { (choices("method", &["full", "freeze", "lora"], "full")) }
                    (text_field("epochs", "epochs", "Epochs", &v("epochs", "3")))
                    (text_field("batch", "batch_size", "Batch size", &v("batch_size", "16")))
                    (text_field("lr", "learning_rate", "Learning rate (empty: the method's default)", &v("learning_rate", "")))
                    (text_field("freeze", "freeze_trainable_layers", "Freeze: last layers that train (0: only the head)", &v("freeze_trainable_layers", "")))
                    label for="c-metric" { "Best checkpoint by" }
                    select id="c-metric" name="metric_for_best_model" { (choices("metric_for_best_model", &["accuracy", "macro_f1", "loss"], "accuracy")) }
                    (text_field("size", "image_size", "Images: side in pixels", &v("image_size", "224")))
                    (text_field("len", "sequence_len", "Texts: tokens per text (empty: the model's)", &v("sequence_len", "")))
                    label.check for="c-ckpt" {
                        input id="c-ckpt" type="checkbox" name="gradient_checkpointing" value="on" checked[!field(form, "gradient_checkpointing").is_empty()];
                        " Gradient checkpointing (less memory: each layer's activations are recomputed in the backward pass)"
                    }
                    button type="submit" { "Start fine-tune" }
                }
            }
            @if jobs.is_empty() {
                p.muted { "No classifier fine-tunes yet." }
            } @else {
                table id="classifier-list" {
                    thead { tr { th { "Job" } th { "Task" } th { "Model" } th { "Status" } th { "Step" } th { "Best" } th { "Created" } } }
                    tbody {
                        @for j in jobs {
                            tr data-job=(j.id) {
                                td { a href=(format!("/classifiers/{}", j.id)) { "clsjob-" (j.id) } }
                                td { (j.task.replace('_', "-")) }
                                td { (std::path::Path::new(&j.base_model).file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default()) }
                                td { (j.state) }
                                td { (j.step) " / " (j.total_steps.map(|t| t.to_string()).unwrap_or("-".into())) }
                                td { (j.best_metric.map(num).unwrap_or("-".into())) }
                                td { (short_time(&j.created_at)) }
                            }
                        }
                    }
                }
            }
        },
    );
    if error.is_some() {
        *resp.status_mut() = axum::http::StatusCode::UNPROCESSABLE_ENTITY;
    }
    resp
}

/// The form as the API's request: numbers parsed, empty fields left to the defaults.
/// A labelled text input of the form (its element id is `c-` and `id`).
fn text_field(id: &str, name: &str, label: &str, value: &str) -> Markup {
    let id = format!("c-{id}");
    html! {
        label for=(id) { (label) }
        input id=(id) name=(name) value=(value);
    }
}

fn request(pairs: &[(String, String)]) -> Result<CreateJob, ApiError> {
    let opt = |k: &str| Some(field(pairs, k).trim()).filter(|s| !s.is_empty());
    let mut hp = Map::new();
    for k in [
        "batch_size",
        "learning_rate",
        "freeze_trainable_layers",
        "image_size",
        "sequence_len",
    ] {
        if let Some(s) = opt(k) {
            let n: f64 = s.parse().map_err(|_| {
                ApiError::invalid(
                    format!("hyperparameters.{k}"),
                    format!("{k}: not a number: {s:?}"),
                )
            })?;
            let v = if k == "learning_rate" {
                Value::from(n)
            } else {
                Value::from(n as u64)
            };
            if k != "learning_rate" && (n.fract() != 0.0 || n < 0.0) {
                return Err(ApiError::invalid(
                    format!("hyperparameters.{k}"),
                    format!("{k}: a whole number, got {s:?}"),
                ));
            }
            hp.insert(k.to_string(), v);
        }
    }
    if let Some(m) = opt("metric_for_best_model") {
        hp.insert("metric_for_best_model".into(), Value::from(m));
    }
    if opt("gradient_checkpointing").is_some() {
        hp.insert("gradient_checkpointing".into(), Value::from(true));
    }
    let epochs = match opt("epochs") {
        Some(e) => Some(
            e.parse::<f64>()
                .map_err(|_| ApiError::invalid("epochs", format!("epochs: not a number: {e:?}")))?,
        ),
        None => None,
    };
    Ok(CreateJob {
        model_id: opt("model_id").map(str::to_string),
        data_path: opt("data_path").map(str::to_string),
        eval_data_path: opt("eval_data_path").map(str::to_string),
        method: opt("method").map(str::to_string),
        epochs,
        hyperparameters: hp,
        ..Default::default()
    })
}

async fn create(Console { state, session }: Console, FormPairs(pairs): FormPairs) -> Response {
    let created = match request(&pairs) {
        Ok(req) => match classifier_api::create(&state, &req).await {
            Ok(Some(job)) => Ok(job),
            Ok(None) => Err(ApiError::invalid(
                "model_id",
                "choose an encoder or ResNet model",
            )),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match created {
        Ok(job) => Redirect::to(&format!(
            "/classifiers/{}",
            job.id.trim_start_matches("clsjob-")
        ))
        .into_response(),
        Err(e) => page(&state, &session, &pairs, Some(&e)).await,
    }
}

async fn cancel(Console { state, session }: Console, PageId(id): PageId) -> Response {
    match state.core.db.cancel_classifier_job(id).await {
        Ok(_) => Redirect::to(&format!("/classifiers/{id}")).into_response(),
        Err(e) => fail(&session, &e.into()),
    }
}

async fn show(Console { state, session }: Console, PageId(id): PageId) -> Response {
    let job = match state.core.db.classifier_job(id).await {
        Ok(j) => j,
        Err(e) => return fail(&session, &e.into()),
    };
    let events = match state.core.db.classifier_events(id, 0, 100_000).await {
        Ok(e) => e,
        Err(e) => return fail(&session, &e.into()),
    };
    let parsed: Vec<(String, Value)> = events
        .into_iter()
        .map(|e| {
            (
                e.kind,
                serde_json::from_str(&e.payload).unwrap_or(Value::Null),
            )
        })
        .collect();
    let view = classifier_api::view(job);
    let title = view.id.clone();
    layout(
        &title,
        Some(&session),
        "/classifiers",
        job_page(&session, &view, &parsed),
    )
}

fn job_page(session: &AdminSession, v: &ClassifierJobView, events: &[(String, Value)]) -> Markup {
    let steps: Vec<(f64, f64)> = events
        .iter()
        .filter(|(k, _)| k == "step")
        .filter_map(|(_, d)| Some((d["step"].as_f64()?, d["loss"].as_f64()?)))
        .collect();
    let evals: Vec<&Value> = events
        .iter()
        .filter(|(k, _)| k == "evaluated")
        .map(|(_, d)| d)
        .collect();
    let eval_points: Vec<(f64, f64)> = evals
        .iter()
        .filter_map(|d| Some((d["step"].as_f64()?, d["metrics"]["loss"].as_f64()?)))
        .collect();
    let best_epoch = events
        .iter()
        .rev()
        .find(|(k, _)| k == "best")
        .and_then(|(_, d)| d["epoch"].as_u64());
    let best = evals.iter().find(|d| d["epoch"].as_u64() == best_epoch);
    let messages: Vec<&str> = events
        .iter()
        .filter(|(k, _)| k == "message")
        .filter_map(|(_, d)| d["text"].as_str())
        .collect();
    let live = v.status == "queued" || v.status == "running";
    let id = v.id.trim_start_matches(classifier_api::ID_PREFIX);
    html! {
        div id="classifier-job" data-follow=[live.then(|| format!("/classifiers/{id}"))] {
        h1 { (v.id) " · " (v.task) }
        p id="classifier-status" data-status=(v.status) {
            "Status: " strong { (v.status) } " · step " (v.step) " / " (v.total_steps.map(|t| t.to_string()).unwrap_or("-".into()))
            @if let Some(e) = &v.error { " · " span.error { (e) } }
        }
        p { "Model " code { (v.model) } " · data " code { (v.data_path) } }
        @for m in &messages { p.hint { (m) } }
        @if live {
            form method="post" action=(format!("/classifiers/{id}/cancel")) {
                (csrf_field(session))
                button type="submit" { "Cancel" }
            }
            noscript { p.muted { "Reload to follow the run." } }
        }
        h2 { "Loss" }
        (loss_chart(&steps, &eval_points))
        @if !evals.is_empty() {
            h2 { "Held-out metrics per epoch" }
            table id="classifier-epochs" {
                thead { tr { th { "Epoch" } th { "Train loss" } th { "Held-out loss" } th { "Accuracy" } th { "Macro-F1" } } }
                tbody {
                    @for d in &evals {
                        tr data-epoch=(d["epoch"]) {
                            td { (d["epoch"]) @if d["epoch"].as_u64() == best_epoch { " (best)" } }
                            td { (d["train_loss"].as_f64().map(num).unwrap_or_default()) }
                            td { (d["metrics"]["loss"].as_f64().map(num).unwrap_or_default()) }
                            td { (d["metrics"]["accuracy"].as_f64().map(|a| format!("{:.2}%", a * 100.0)).unwrap_or_default()) }
                            td { (d["metrics"]["macro_f1"].as_f64().map(|f| format!("{f:.4}")).unwrap_or_default()) }
                        }
                    }
                }
            }
        }
        @if let Some(b) = best {
            h2 { "Best epoch (" (b["epoch"]) ") by class" }
            table id="classifier-classes" {
                thead { tr { th { "Label" } th { "Precision" } th { "Recall" } th { "F1" } th { "Support" } } }
                tbody {
                    @for c in b["metrics"]["per_class"].as_array().into_iter().flatten() {
                        tr {
                            td { (c["label"].as_str().unwrap_or("")) }
                            td { (format!("{:.4}", c["precision"].as_f64().unwrap_or(0.0))) }
                            td { (format!("{:.4}", c["recall"].as_f64().unwrap_or(0.0))) }
                            td { (format!("{:.4}", c["f1"].as_f64().unwrap_or(0.0))) }
                            td { (c["support"]) }
                        }
                    }
                }
            }
            h3 { "Confusion matrix (rows: true label, columns: predicted)" }
            table id="classifier-confusion" {
                thead { tr { th {} @for c in b["metrics"]["per_class"].as_array().into_iter().flatten() { th { (c["label"].as_str().unwrap_or("")) } } } }
                tbody {
                    @for (c, row) in b["metrics"]["per_class"].as_array().into_iter().flatten().zip(b["metrics"]["confusion_matrix"].as_array().into_iter().flatten()) {
                        tr { th { (c["label"].as_str().unwrap_or("")) } @for n in row.as_array().into_iter().flatten() { td { (n) } } }
                    }
                }
            }
        }
        @if let Some(c) = &v.best_checkpoint {
            p { "Best checkpoint: " code { (c) } " (POST /api/v1/predict with model " code { (v.id) } ")" }
        }
        p { a href="/classifiers" { "All classifier fine-tunes" } }
        }
    }
}

/// An SVG chart: the training loss of every step (line) and the held-out loss after each
/// epoch (dots), on one scale.
fn loss_chart(steps: &[(f64, f64)], evals: &[(f64, f64)]) -> Markup {
    const W: f64 = 640.0;
    const H: f64 = 200.0;
    const PAD: f64 = 30.0;
    if steps.is_empty() {
        return html! { p.muted id="classifier-loss-chart" data-points="0" { "No steps yet." } };
    }
    let max_x = steps.iter().chain(evals).map(|p| p.0).fold(1.0, f64::max);
    let max_y = steps.iter().chain(evals).map(|p| p.1).fold(1e-9, f64::max);
    let x = |v: f64| PAD + (W - 2.0 * PAD) * v / max_x;
    let y = |v: f64| H - PAD - (H - 2.0 * PAD) * v / max_y;
    let line: String = steps
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
        .collect::<Vec<_>>()
        .join(" ");
    html! {
        svg id="classifier-loss-chart" data-points=(steps.len()) width=(W) height=(H) viewBox=(format!("0 0 {W} {H}")) role="img"
            aria-label=(format!("training loss over {} steps; held-out loss after {} epochs", steps.len(), evals.len())) {
            line x1=(PAD) y1=(H - PAD) x2=(W - PAD) y2=(H - PAD) stroke="#888" {}
            line x1=(PAD) y1=(PAD) x2=(PAD) y2=(H - PAD) stroke="#888" {}
            text x=(2) y=(PAD) font-size="10" { (num(max_y)) }
            text x=(2) y=(H - PAD) font-size="10" { "0" }
            text x=(W - PAD) y=(H - 8.0) font-size="10" text-anchor="end" { "step " (max_x as u64) }
            polyline points=(line) fill="none" stroke="#3366cc" stroke-width="1.5" {}
            @for p in evals {
                circle cx=(format!("{:.1}", x(p.0))) cy=(format!("{:.1}", y(p.1))) r="3.5" fill="#dc3912" {}
            }
        }
        p.hint { span style="color:#3366cc" { "—" } " training loss per step · " span style="color:#dc3912" { "●" } " held-out loss per epoch" }
    }
}
