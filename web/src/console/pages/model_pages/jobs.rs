//! Training pages: the job list, the new-job form (presets, a time and memory estimate),
//! a job's page with its live chart and log, cancelling.

use super::{duration, fail, field, num, path_id, short_time};
use crate::auth::{AdminSession, url_decode_pairs};
use crate::console::{csrf_field, layout};
use crate::error::ApiError;
use crate::operations::{self, CreateJob};
use crate::state::AppState;
use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use loraloop_core::storage::{Dataset, TrainingEvent, TrainingJob};
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

/// Settings that make sense for a ~135M model trained on a CPU.
pub struct Preset {
    pub name: &'static str,
    pub label: &'static str,
    pub epochs: &'static str,
    pub learning_rate: &'static str,
    pub batch_size: &'static str,
    pub lora_r: &'static str,
    pub lora_alpha: &'static str,
    pub sequence_len: &'static str,
    pub val_set_size: &'static str,
}

pub const PRESETS: [Preset; 3] = [
    Preset {
        name: "quick",
        label: "Quick: 1 epoch, rank 8, no evaluation",
        epochs: "1",
        learning_rate: "2e-4",
        batch_size: "8",
        lora_r: "8",
        lora_alpha: "16",
        sequence_len: "512",
        val_set_size: "0",
    },
    Preset {
        name: "standard",
        label: "Standard: 3 epochs, rank 16",
        epochs: "3",
        learning_rate: "2e-4",
        batch_size: "8",
        lora_r: "16",
        lora_alpha: "32",
        sequence_len: "512",
        val_set_size: "0.1",
    },
    Preset {
        name: "thorough",
        label: "Thorough: 5 epochs, rank 32, evaluated",
        epochs: "5",
        learning_rate: "1e-4",
        batch_size: "16",
        lora_r: "32",
        lora_alpha: "64",
        sequence_len: "1024",
        val_set_size: "0.15",
    },
];

/// The fields of the form, as typed.
const FIELDS: [&str; 10] = [
    "dataset_id",
    "method",
    "epochs",
    "learning_rate",
    "batch_size",
    "lora_r",
    "lora_alpha",
    "sequence_len",
    "val_set_size",
    "max_steps",
];

#[derive(Debug, Clone, Default)]
pub struct JobForm {
    pub preset: String,
    values: Vec<(&'static str, String)>,
}

impl JobForm {
    fn from_pairs(pairs: &[(String, String)]) -> Self {
        Self {
            preset: field(pairs, "preset").trim().to_string(),
            values: FIELDS
                .iter()
                .map(|k| (*k, field(pairs, k).trim().to_string()))
                .collect(),
        }
    }

    fn get(&self, key: &str) -> &str {
        self.values
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    fn set(&mut self, key: &'static str, value: &str) {
        match self.values.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => self.values.push((key, value.to_string())),
        }
    }

    /// Fill the fields left empty from the chosen preset (what the page's script does
    /// when the preset changes; without a script the server does it here).
    fn apply_preset(&mut self) {
        let Some(p) = PRESETS.iter().find(|p| p.name == self.preset) else {
            return;
        };
        for (k, v) in [
            ("epochs", p.epochs),
            ("learning_rate", p.learning_rate),
            ("batch_size", p.batch_size),
            ("lora_r", p.lora_r),
            ("lora_alpha", p.lora_alpha),
            ("sequence_len", p.sequence_len),
            ("val_set_size", p.val_set_size),
        ] {
            if self.get(k).is_empty() {
                self.set(k, v);
            }
        }
    }

    /// The API's request: numbers parsed, hyperparameters by their training-YAML names.
    fn to_request(&self) -> Result<CreateJob, ApiError> {
        let dataset_id = match self.get("dataset_id") {
            "" => None,
            s => Some(s.parse::<i64>().map_err(|_| {
                ApiError::invalid("dataset_id", format!("{s:?} is not a dataset id"))
            })?),
        };
        let float = |k: &str| -> Result<Option<f64>, ApiError> {
            match self.get(k) {
                "" => Ok(None),
                s => s.parse::<f64>().map(Some).map_err(|_| {
                    ApiError::invalid(k.to_string(), format!("{k}: {s:?} is not a number"))
                }),
            }
        };
        let whole = |k: &str| -> Result<Option<u64>, ApiError> {
            match self.get(k) {
                "" => Ok(None),
                s => s.parse::<u64>().map(Some).map_err(|_| {
                    ApiError::invalid(k.to_string(), format!("{k}: {s:?} is not a whole number"))
                }),
            }
        };
        let mut hp = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                hp.insert(k.to_string(), v);
            }
        };
        put("learning_rate", float("learning_rate")?.map(Value::from));
        put("batch_size", whole("batch_size")?.map(Value::from));
        put("lora_r", whole("lora_r")?.map(Value::from));
        put("lora_alpha", float("lora_alpha")?.map(Value::from));
        put("sequence_len", whole("sequence_len")?.map(Value::from));
        put("val_set_size", float("val_set_size")?.map(Value::from));
        put("max_steps", whole("max_steps")?.map(Value::from));
        let method = match self.get("method") {
            "" => None,
            m => Some(m.to_string()),
        };
        Ok(CreateJob {
            model_id: None,
            dataset_id,
            dataset_url: None,
            epochs: float("epochs")?,
            method,
            hyperparameters: hp,
        })
    }
}

async fn list(State(state): State<AppState>, session: AdminSession) -> Response {
    let jobs = match state.core.db.list_jobs(None, 200).await {
        Ok(j) => j,
        Err(e) => return fail(&session, &e.into()),
    };
    let datasets = state.core.db.list_datasets().await.unwrap_or_default();
    let adapters = state.core.db.list_adapters().await.unwrap_or_default();
    let dataset_name = |id: i64| {
        datasets
            .iter()
            .find(|d| d.id == id)
            .map(|d| format!("{} v{}", d.name, d.version))
            .unwrap_or_else(|| format!("#{id}"))
    };
    layout(
        "Training",
        Some(&session),
        "/jobs",
        html! {
            h1 { "Training" }
            p { a.button href="/jobs/new" id="new-job" { "New training job" } }
            @if jobs.is_empty() {
                p.muted { "No training jobs yet." }
            } @else {
                div.table-wrap {
                    table id="job-list" {
                        thead { tr { th { "Job" } th { "Status" } th { "Dataset" } th { "Model" } th { "Step" } th { "Created" } th { "Adapter" } } }
                        tbody {
                            @for j in &jobs {
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
                            }
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

async fn new_form(
    State(state): State<AppState>,
    session: AdminSession,
    RawQuery(q): RawQuery,
) -> Response {
    let pairs = url_decode_pairs(q.as_deref().unwrap_or(""));
    let mut form = JobForm::from_pairs(&pairs);
    if form.preset.is_empty() && pairs.is_empty() {
        form.preset = "standard".into();
    }
    if form.get("method").is_empty() {
        form.set("method", "lora");
    }
    form.apply_preset();
    job_form(&state, &session, &form, None).await
}

async fn create(State(state): State<AppState>, session: AdminSession, body: String) -> Response {
    let pairs = url_decode_pairs(&body);
    let mut form = JobForm::from_pairs(&pairs);
    form.apply_preset();
    let result = match form.to_request() {
        Ok(req) => operations::create_job(&state, &req).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(job) => Redirect::to(&format!("/jobs/{}", job.id)).into_response(),
        Err(e) if e.status.is_client_error() => job_form(&state, &session, &form, Some(&e)).await,
        Err(e) => fail(&session, &e),
    }
}

/// The form's field a service error is about.
fn error_field(e: &ApiError) -> &str {
    let p = e.param.as_deref().unwrap_or("");
    let p = p.strip_prefix("hyperparameters.").unwrap_or(p);
    match p {
        "num_epochs" | "n_epochs" => "epochs",
        "micro_batch_size" | "gradient_accumulation_steps" => "batch_size",
        other => other,
    }
}

async fn job_form(
    state: &AppState,
    session: &AdminSession,
    form: &JobForm,
    error: Option<&ApiError>,
) -> Response {
    let mut datasets = match state.core.db.list_datasets().await {
        Ok(d) => d,
        Err(e) => return fail(session, &e.into()),
    };
    datasets.sort_by_key(|d| std::cmp::Reverse(d.id));
    let bad = error.map(error_field).unwrap_or("");
    let presets_json = Value::Array(
        PRESETS
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name, "epochs": p.epochs, "learning_rate": p.learning_rate,
                    "batch_size": p.batch_size, "lora_r": p.lora_r, "lora_alpha": p.lora_alpha,
                    "sequence_len": p.sequence_len, "val_set_size": p.val_set_size,
                })
            })
            .collect(),
    )
    .to_string();
    let estimate = estimate_markup(state, form).await;
    let input = |name: &'static str, label: &str, hint: &str, kind: &str| {
        html! {
            label {
                (label)
                input name=(name) id=(format!("job-{name}")) type=(kind) step=[(kind == "number").then_some("any")]
                    value=(form.get(name)) aria-invalid=[(bad == name).then_some("true")];
                @if !hint.is_empty() { span.hint { (hint) } }
            }
        }
    };
    let mut resp = layout(
        "New training job",
        Some(session),
        "/jobs",
        html! {
            h1 { "New training job" }
            @if let Some(e) = error {
                p.error role="alert" id="form-error" { (e.message) }
            }
            @if datasets.is_empty() {
                p.error { "There is no dataset yet: import one on the " a href="/datasets" { "Datasets" } " page first." }
            }
            form.card method="post" action="/jobs" id="job-form" {
                (csrf_field(session))
                label {
                    "Dataset"
                    select name="dataset_id" id="job-dataset" required aria-invalid=[(bad == "dataset_id").then_some("true")] {
                        @for d in &datasets {
                            option value=(d.id) selected[form.get("dataset_id") == d.id.to_string()] {
                                (d.name) " v" (d.version) " (" (d.example_count) " examples)"
                            }
                        }
                    }
                }
                div.grid.form-grid {
                    label {
                        "Preset"
                        select name="preset" id="job-preset" data-presets=(presets_json) {
                            option value="" selected[form.preset.is_empty()] { "Custom" }
                            @for p in &PRESETS {
                                option value=(p.name) selected[form.preset == p.name] { (p.label) }
                            }
                        }
                        span.hint { "Fills the settings below; empty fields take the preset's value." }
                    }
                    label {
                        "Method"
                        select name="method" id="job-method" aria-invalid=[(bad == "method").then_some("true")] {
                            @for (m, l) in [("lora", "LoRA adapter (recommended)"), ("full", "Full fine-tuning"), ("freeze", "Last layers only (freeze)")] {
                                option value=(m) selected[form.get("method") == m] { (l) }
                            }
                        }
                    }
                    (input("epochs", "Epochs", "", "number"))
                    (input("learning_rate", "Learning rate", "", "text"))
                    (input("batch_size", "Batch size", "examples per optimizer step", "number"))
                    (input("lora_r", "LoRA rank (r)", "", "number"))
                    (input("lora_alpha", "LoRA alpha", "usually twice the rank", "number"))
                    (input("sequence_len", "Sequence length", "tokens; longer examples are cut", "number"))
                    (input("val_set_size", "Held out for evaluation", "share of examples, 0 for none", "number"))
                    (input("max_steps", "Max steps", "optional: stop after this many steps", "number"))
                }
                div id="job-estimate" aria-live="polite" { (estimate) }
                button type="submit" id="start-job" { "Start training" }
            }
        },
    );
    if error.is_some() {
        *resp.status_mut() = error.map_or(StatusCode::UNPROCESSABLE_ENTITY, |e| e.status);
    }
    resp
}

/// `GET /jobs/estimate?...`: the estimate for the form's current values (the page's
/// script swaps it in as the fields change).
async fn estimate_fragment(
    State(state): State<AppState>,
    _session: AdminSession,
    RawQuery(q): RawQuery,
) -> Response {
    let mut form = JobForm::from_pairs(&url_decode_pairs(q.as_deref().unwrap_or("")));
    form.apply_preset();
    estimate_markup(&state, &form).await.into_response()
}

/// SmolLM2-135M's parameter count: the reference measurement's model.
const REFERENCE_PARAMS: f64 = 134_515_008.0;
/// Training tokens per second measured on this project's 2-core CPU for SmolLM2-135M,
/// LoRA rank 16, sequence length 256, micro batch 4.
const REFERENCE_TOKENS_PER_SEC: f64 = 130.0;

/// What a run will roughly take.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub examples: i64,
    pub train_tokens: f64,
    pub steps: u64,
    pub tokens_per_sec: f64,
    pub seconds: f64,
    pub memory_bytes: f64,
}

/// The model's shape, for the estimate.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub params: f64,
    pub layers: f64,
    pub hidden: f64,
    pub vocab: f64,
    /// Sum over the seven projections of (in + out): LoRA parameters per rank and layer.
    pub lora_dims: f64,
}

impl Shape {
    fn of(state: &AppState) -> Self {
        let c = &state.core.engine.model().llama.config;
        let (h, i, v, l) = (
            c.hidden_size as f64,
            c.intermediate_size as f64,
            c.vocab_size as f64,
            c.num_layers as f64,
        );
        let (q, kv) = (c.q_dim() as f64, c.kv_dim() as f64);
        let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i + 2.0 * h;
        let embeddings = v * h * if c.tie_word_embeddings { 1.0 } else { 2.0 };
        let lora_dims = (h + q) + 2.0 * (h + kv) + (q + h) + 3.0 * (h + i);
        Self {
            params: embeddings + l * per_layer + h,
            layers: l,
            hidden: h,
            vocab: v,
            lora_dims,
        }
    }
}

/// The settings the estimate needs, with the trainer's defaults for what is unset.
#[derive(Debug, Clone, Copy)]
pub struct RunSettings {
    pub method: &'static str,
    pub epochs: f64,
    pub batch_size: u64,
    pub micro_batch: u64,
    pub lora_r: u64,
    pub sequence_len: u64,
    pub val_set_size: f64,
    pub max_steps: Option<u64>,
}

impl RunSettings {
    fn of(form: &JobForm) -> Self {
        let f = |k: &str, d: f64| {
            form.get(k)
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .unwrap_or(d)
        };
        let u = |k: &str, d: u64| {
            form.get(k)
                .parse::<u64>()
                .ok()
                .filter(|x| *x >= 1)
                .unwrap_or(d)
        };
        let batch = u("batch_size", 4);
        Self {
            method: match form.get("method") {
                "full" => "full",
                "freeze" => "freeze",
                _ => "lora",
            },
            epochs: f("epochs", 3.0).max(0.01),
            batch_size: batch,
            micro_batch: batch.min(4),
            lora_r: u("lora_r", 16),
            sequence_len: u("sequence_len", 512),
            val_set_size: f("val_set_size", 0.1),
            max_steps: form
                .get("max_steps")
                .parse::<u64>()
                .ok()
                .filter(|x| *x >= 1),
        }
    }
}

/// Time and peak memory of a run, scaled from the one reference measurement: throughput
/// inversely with the parameter count; memory as f32 weights, optimizer state for what
/// trains, and activations per token in flight calibrated so the reference run comes to
/// its measured ~2.5 GB.
pub fn estimate(shape: Shape, s: RunSettings, examples: i64, tokens: f64) -> Estimate {
    let held_out = if s.val_set_size >= 1.0 {
        (s.val_set_size.floor() / examples.max(1) as f64).min(1.0)
    } else {
        s.val_set_size
    };
    let train_share = (1.0 - held_out).clamp(0.0, 1.0);
    let train_examples = (examples as f64 * train_share).round().max(0.0);
    let steps_per_epoch = (train_examples / s.batch_size as f64).ceil();
    let mut steps = (steps_per_epoch * s.epochs).ceil();
    let mut train_tokens = tokens * train_share * s.epochs;
    if let Some(m) = s.max_steps
        && (m as f64) < steps
        && steps > 0.0
    {
        train_tokens *= m as f64 / steps;
        steps = m as f64;
    }
    let speed_factor = match s.method {
        "lora" => 1.0,
        // Every weight gets a gradient and an AdamW update: assume half the speed.
        _ => 0.5,
    };
    let tokens_per_sec =
        REFERENCE_TOKENS_PER_SEC * (REFERENCE_PARAMS / shape.params.max(1.0)) * speed_factor;
    let weights = shape.params * 4.0;
    let trained = match s.method {
        "full" => shape.params,
        "freeze" => shape.params * (2.0 / shape.layers.max(2.0)),
        _ => shape.lora_dims * s.lora_r as f64 * shape.layers,
    };
    // Gradient and two AdamW moments (f32) for every trained parameter, plus the copy.
    let optimizer = trained * 4.0 * if s.method == "lora" { 4.0 } else { 3.0 };
    let per_token = shape.layers * shape.hidden * 60.0 + shape.vocab * 12.0;
    let in_flight = (s.micro_batch * s.sequence_len) as f64;
    let overhead = 0.3e9;
    Estimate {
        examples,
        train_tokens,
        steps: steps as u64,
        tokens_per_sec,
        seconds: train_tokens / tokens_per_sec.max(1e-9),
        memory_bytes: weights + optimizer + per_token * in_flight + overhead,
    }
}

async fn estimate_markup(state: &AppState, form: &JobForm) -> Markup {
    let s = RunSettings::of(form);
    let chosen = form.get("dataset_id").parse::<i64>().ok();
    // Before one is chosen: the select's first entry, the newest dataset.
    let newest = || async {
        let d: Option<Dataset> = state
            .core
            .db
            .list_datasets()
            .await
            .ok()
            .and_then(|d| d.into_iter().max_by_key(|d| d.id));
        d.map(|d| d.id)
    };
    let dataset_id = match chosen {
        Some(id) => id,
        None => match newest().await {
            Some(id) => id,
            None => return html! { p.muted { "Choose a dataset to see an estimate." } },
        },
    };
    let row = state
        .core
        .db
        .dataset_token_estimate(dataset_id, s.sequence_len as usize)
        .await;
    let Ok((examples, tokens)) = row else {
        return html! { p.muted { "No estimate: the dataset cannot be read." } };
    };
    let e = estimate(Shape::of(state), s, examples, tokens);
    html! {
        div.estimate.card data-seconds=(format!("{:.3}", e.seconds)) data-tokens=(format!("{:.0}", e.train_tokens)) data-memory=(format!("{:.0}", e.memory_bytes)) {
            strong { "Estimate: about " (duration(e.seconds)) " and " (format!("{:.1}", e.memory_bytes / 1e9)) " GB of memory" }
            p.hint {
                (e.examples) " examples, ~" (format!("{:.0}", e.train_tokens)) " training tokens in ~" (e.steps) " steps at ~"
                (format!("{:.0}", e.tokens_per_sec)) " tokens/s. "
                "This is a rough estimate: tokens ≈ characters ÷ 4 (cut at the sequence length); speed and memory are scaled by the model's size ("
                (params_label(Shape::of(state).params)) " parameters) from one measurement on a 2-core CPU "
                "(SmolLM2-135M, LoRA rank 16, sequence length 256, micro batch 4: ~130 tokens/s, ~2.5 GB peak). "
                "Other machines, longer sequences and full fine-tuning differ."
            }
        }
    }
}

async fn show(
    State(state): State<AppState>,
    session: AdminSession,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Response {
    let id = match path_id(id) {
        Ok(i) => i,
        Err(e) => return fail(&session, &e),
    };
    let job = match state.core.db.job(id).await {
        Ok(j) => j,
        Err(e) => return fail(&session, &e.into()),
    };
    let events = match state.core.db.training_events(id, 0).await {
        Ok(e) => e,
        Err(e) => return fail(&session, &e.into()),
    };
    let dataset = operations::dataset_by_id(&state, job.dataset_id).await.ok();
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
                        dt { "Dataset" } dd { @match &dataset { Some(d) => { (d.name) " v" (d.version) " (" (d.example_count) " examples)" }, None => { "#" (job.dataset_id) } } }
                        dt { "Model" } dd { (model_label(&job.base_model)) }
                        dt { "Method" } dd { (job.method) }
                        @for (k, v) in hp.iter().filter(|(k, _)| k.as_str() != "finetuning_type") {
                            dt { (k) } dd { (match v { Value::String(s) => s.clone(), other => other.to_string() }) }
                        }
                    }
                }
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

/// A parameter count as `135M` or `42K`.
fn params_label(p: f64) -> String {
    if p >= 1e9 {
        format!("{:.1}B", p / 1e9)
    } else if p >= 1e6 {
        format!("{:.0}M", p / 1e6)
    } else {
        format!("{:.0}K", p / 1e3)
    }
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
    State(state): State<AppState>,
    session: AdminSession,
    headers: HeaderMap,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Response {
    let id = match path_id(id) {
        Ok(i) => i,
        Err(e) => return fail(&session, &e),
    };
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

async fn cancel(
    State(state): State<AppState>,
    session: AdminSession,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Response {
    let id = match path_id(id) {
        Ok(i) => i,
        Err(e) => return fail(&session, &e),
    };
    match state.core.db.request_cancel(id).await {
        Ok(true) => Redirect::to(&format!("/jobs/{id}")).into_response(),
        Ok(false) => match state.core.db.job(id).await {
            Ok(j) => fail(
                &session,
                &ApiError::conflict(format!("job {id} has already finished ({})", j.state)),
            ),
            Err(e) => fail(&session, &e.into()),
        },
        Err(e) => fail(&session, &e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> Shape {
        // SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, 9 heads of 64, 3 KV heads.
        let (h, i, q, kv, l, v) = (576.0, 1536.0, 576.0, 192.0, 30.0, 49152.0);
        Shape {
            params: v * h + l * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i + 2.0 * h) + h,
            layers: l,
            hidden: h,
            vocab: v,
            lora_dims: (h + q) + 2.0 * (h + kv) + (q + h) + 3.0 * (h + i),
        }
    }

    fn settings() -> RunSettings {
        RunSettings {
            method: "lora",
            epochs: 1.0,
            batch_size: 4,
            micro_batch: 4,
            lora_r: 16,
            sequence_len: 256,
            val_set_size: 0.0,
            max_steps: None,
        }
    }

    #[test]
    fn the_reference_run_estimates_its_measurement() {
        let shape = smollm();
        assert!((shape.params - REFERENCE_PARAMS).abs() / REFERENCE_PARAMS < 0.01);
        let e = estimate(shape, settings(), 100, 13_000.0);
        assert!((e.tokens_per_sec - 130.0).abs() < 2.0, "{e:?}");
        assert!((e.seconds - 100.0).abs() < 2.0, "{e:?}");
        assert!((2.3e9..2.7e9).contains(&e.memory_bytes), "{e:?}");
        assert_eq!(e.steps, 25);
    }

    #[test]
    fn epochs_held_out_examples_and_max_steps_change_the_estimate() {
        let one = estimate(smollm(), settings(), 100, 10_000.0);
        let three = estimate(
            smollm(),
            RunSettings {
                epochs: 3.0,
                ..settings()
            },
            100,
            10_000.0,
        );
        assert!((three.seconds / one.seconds - 3.0).abs() < 1e-9);
        let held = estimate(
            smollm(),
            RunSettings {
                val_set_size: 0.2,
                ..settings()
            },
            100,
            10_000.0,
        );
        assert!((held.train_tokens - 8_000.0).abs() < 1e-6);
        let capped = estimate(
            smollm(),
            RunSettings {
                max_steps: Some(5),
                ..settings()
            },
            100,
            10_000.0,
        );
        assert_eq!(capped.steps, 5);
        assert!((capped.train_tokens - 2_000.0).abs() < 1e-6);
        let full = estimate(
            smollm(),
            RunSettings {
                method: "full",
                ..settings()
            },
            100,
            10_000.0,
        );
        assert!(full.memory_bytes > one.memory_bytes + 1e9 && full.seconds > one.seconds);
    }

    #[test]
    fn presets_fill_only_empty_fields_and_build_the_api_request() {
        let pairs = url_decode_pairs("preset=quick&dataset_id=3&lora_r=4&method=lora");
        let mut f = JobForm::from_pairs(&pairs);
        f.apply_preset();
        assert_eq!(f.get("lora_r"), "4");
        assert_eq!(f.get("epochs"), "1");
        let req = f.to_request().unwrap();
        assert_eq!(req.dataset_id, Some(3));
        assert_eq!(req.epochs, Some(1.0));
        assert_eq!(req.hyperparameters["lora_r"], 4);
        assert_eq!(req.hyperparameters["batch_size"], 8);
        assert_eq!(req.hyperparameters["sequence_len"], 512);
        let bad = JobForm::from_pairs(&url_decode_pairs("dataset_id=1&epochs=two"));
        let e = bad.to_request().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("epochs"));
        assert!(crate::operations::job_settings(&req).is_ok());
    }
}
