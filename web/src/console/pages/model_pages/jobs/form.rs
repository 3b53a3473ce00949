//! The new-job form: presets, the fields as typed, their validation into an API request,
//! and the live estimate beside them.

use super::super::{duration, fail, field};
use super::estimate::{RunSettings, Shape, estimate, params_label};
use crate::auth::AdminSession;
use crate::console::{Console, FormPairs, QueryPairs, csrf_field, layout};
use crate::error::ApiError;
use crate::operations::{self, CreateJob};
use crate::state::AppState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use loraloop_core::storage::Dataset;
use loraloop_trainer::config::{Objective, TrainFile};
use maud::{Markup, html};
use serde_json::{Map, Value};

/// Settings that make sense for a ~135M model trained on a CPU.
pub struct Preset {
    pub name: &'static str,
    pub label: String,
    pub epochs: String,
    pub learning_rate: String,
    pub batch_size: String,
    pub lora_r: String,
    pub lora_alpha: String,
    pub sequence_len: String,
    pub val_set_size: String,
}

/// The presets: "standard" is the trainer's own defaults (the same job as `loraloop
/// fine-tune` without flags and the API without hyperparameters); "quick" and "thorough"
/// change what their labels say.
pub fn presets() -> [Preset; 3] {
    let d = TrainFile::default()
        .validate()
        .expect("the trainer's defaults are valid");
    let batch = (d.micro_batch_size * d.gradient_accumulation_steps).to_string();
    let num = |v: f64| format!("{v}");
    [
        Preset {
            name: "quick",
            label: "Quick: 1 epoch, rank 8, no evaluation".into(),
            epochs: "1".into(),
            learning_rate: format!("{:e}", d.learning_rate),
            batch_size: batch.clone(),
            lora_r: "8".into(),
            lora_alpha: "16".into(),
            sequence_len: d.sequence_len.to_string(),
            val_set_size: "0".into(),
        },
        Preset {
            name: "standard",
            label: format!(
                "Standard: the defaults ({} epochs, rank {})",
                num(d.num_epochs),
                d.lora_r
            ),
            epochs: num(d.num_epochs),
            learning_rate: format!("{:e}", d.learning_rate),
            batch_size: batch,
            lora_r: d.lora_r.to_string(),
            lora_alpha: num(d.lora_alpha),
            sequence_len: d.sequence_len.to_string(),
            val_set_size: num(d.val_set_size),
        },
        Preset {
            name: "thorough",
            label: "Thorough: 5 epochs, rank 32, evaluated".into(),
            epochs: "5".into(),
            learning_rate: "1e-4".into(),
            batch_size: "16".into(),
            lora_r: "32".into(),
            lora_alpha: "64".into(),
            sequence_len: "1024".into(),
            val_set_size: "0.15".into(),
        },
    ]
}

/// The fields of the form, as typed.
pub(super) const FIELDS: [&str; 12] = [
    "dataset_id",
    "assistant",
    "method",
    "epochs",
    "learning_rate",
    "batch_size",
    "lora_r",
    "lora_alpha",
    "sequence_len",
    "val_set_size",
    "max_steps",
    "rl_beta",
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
        let all = presets();
        let Some(p) = all.iter().find(|p| p.name == self.preset) else {
            return;
        };
        for (k, v) in [
            ("epochs", &p.epochs),
            ("learning_rate", &p.learning_rate),
            ("batch_size", &p.batch_size),
            ("lora_r", &p.lora_r),
            ("lora_alpha", &p.lora_alpha),
            ("sequence_len", &p.sequence_len),
            ("val_set_size", &p.val_set_size),
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
        put("rl_beta", float("rl_beta")?.map(Value::from));
        let method = match self.get("method") {
            "" => None,
            m => Some(m.to_string()),
        };
        Ok(CreateJob {
            model_id: None,
            dataset_id,
            assistant: Some(self.get("assistant").to_string()).filter(|a| !a.is_empty()),
            dataset_url: None,
            epochs: float("epochs")?,
            method,
            hyperparameters: hp,
            ..Default::default()
        })
    }
}

pub(super) async fn new_form(
    Console { state, session }: Console,
    QueryPairs(pairs): QueryPairs,
) -> Response {
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

pub(super) async fn create(
    Console { state, session }: Console,
    FormPairs(pairs): FormPairs,
) -> Response {
    let mut form = JobForm::from_pairs(&pairs);
    form.apply_preset();
    let result = match form.to_request() {
        Ok(req) => operations::create_job(&state, &req, crate::audit::CONSOLE).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(job) => Redirect::to(&format!("/jobs/{}", job.id)).into_response(),
        Err(e) if e.status.is_client_error() => job_form(&state, &session, &form, Some(&e)).await,
        Err(e) => fail(&session, &e),
    }
}

/// The form's field a service error is about.
pub(super) fn error_field(e: &ApiError) -> &str {
    let p = e.param.as_deref().unwrap_or("");
    let p = p.strip_prefix("hyperparameters.").unwrap_or(p);
    match p {
        "num_epochs" | "n_epochs" => "epochs",
        "micro_batch_size" | "gradient_accumulation_steps" => "batch_size",
        other => other,
    }
}

pub(super) async fn job_form(
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
    let assistants = match state.core.assistants.list().await {
        Ok(a) => a,
        Err(e) => return fail(session, &e.into()),
    };
    let bad = error.map(error_field).unwrap_or("");
    let presets_json = Value::Array(
        presets()
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
                                (d.name) " v" (d.version) " (" (d.example_count) " " (dataset_rows(d)) ")"
                            }
                        }
                    }
                }
                @if assistants.len() > 1 {
                    label {
                        "Assistant"
                        select name="assistant" id="job-assistant" aria-invalid=[(bad == "assistant").then_some("true")] {
                            option value="" selected[form.get("assistant").is_empty()] { "The dataset's (else the default assistant)" }
                            @for a in &assistants {
                                option value=(a.name) selected[form.get("assistant") == a.name] { (a.name) }
                            }
                        }
                        span.hint { "Its activation policy decides what happens to the adapter." }
                    }
                }
                div.grid.form-grid {
                    label {
                        "Preset"
                        select name="preset" id="job-preset" data-presets=(presets_json) {
                            option value="" selected[form.preset.is_empty()] { "Custom" }
                            @for p in &presets() {
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
                    (input("rl_beta", "β (DPO and KTO datasets)", "optional: how far from the base model the preferences may pull (default 0.1)", "number"))
                }
                p.hint { "A job trains what its dataset holds: chat examples (SFT), preference pairs (DPO) or rated replies (KTO). Build DPO and KTO datasets from corrections and 👍/👎 on the Datasets page." }
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

/// What a dataset's rows are, for the dataset choice.
fn dataset_rows(d: &Dataset) -> &'static str {
    match d.objective() {
        Objective::Sft => "examples",
        Objective::Dpo => "DPO pairs",
        Objective::Kto => "KTO rows",
    }
}

/// `GET /jobs/estimate?...`: the estimate for the form's current values (the page's
/// script swaps it in as the fields change).
pub(super) async fn estimate_fragment(
    Console { state, .. }: Console,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let mut form = JobForm::from_pairs(&pairs);
    form.apply_preset();
    estimate_markup(&state, &form).await.into_response()
}

pub(super) async fn estimate_markup(state: &AppState, form: &JobForm) -> Markup {
    let s = form.run_settings();
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

impl JobForm {
    /// The run these fields describe, with the defaults where a field is empty or invalid.
    pub(super) fn run_settings(&self) -> RunSettings {
        let form = self;
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
        RunSettings {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::url_decode_pairs;

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
        // The trainer's default batch: the console and the CLI run the same default job.
        let d = TrainFile::default().validate().unwrap();
        assert_eq!(
            req.hyperparameters["batch_size"],
            (d.micro_batch_size * d.gradient_accumulation_steps) as u64
        );
        assert_eq!(req.hyperparameters["sequence_len"], 512);
        let bad = JobForm::from_pairs(&url_decode_pairs("dataset_id=1&epochs=two"));
        let e = bad.to_request().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("epochs"));
        assert!(crate::operations::job_settings(&req).is_ok());
    }
}
