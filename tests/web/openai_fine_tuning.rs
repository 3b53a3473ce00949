//! The official `openai` Python client, unmodified, through OpenAI's fine-tuning flow:
//! `files.create` -> `fine_tuning.jobs.create` -> polling -> `list_events` ->
//! `list_checkpoints` -> `chat.completions.create(model=job.fine_tuned_model)`, against
//! the real server with its worker training a tiny random model. Also: a file that does
//! not parse fails the job in `validating_files`, and the file routes.

use crate::support::{KEY, start, zorblax_jsonl};

const SCRIPT: &str = r#"
import io, json, sys, time, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2])
out = {}
data = sys.argv[3].encode()
f = client.files.create(file=("zorblax.jsonl", io.BytesIO(data)), purpose="fine-tune")
out["file"] = {"id": f.id, "bytes": f.bytes, "purpose": f.purpose, "filename": f.filename}
out["content_same"] = client.files.content(f.id).read() == data
val = client.files.create(file=("held-out.jsonl", io.BytesIO(data[: len(data) // 4])), purpose="fine-tune")
out["listed"] = [x.id for x in client.files.list(purpose="fine-tune", order="asc").data]
job = client.fine_tuning.jobs.create(
    model="base", training_file=f.id, validation_file=val.id, suffix="zorb", seed=1,
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 4, "learning_rate_multiplier": 50}}},
)
out["created_status"] = job.status
statuses = [job.status]
estimates = []
for _ in range(600):
    job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status == "running" and job.estimated_finish is not None:
        estimates.append([job.estimated_finish, time.time()])
    if statuses[-1] != job.status:
        statuses.append(job.status)
    if job.status in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(0.1)
out["statuses"] = statuses
out["estimates"] = estimates
out["finished_estimate"] = job.estimated_finish
out["job"] = {"id": job.id, "status": job.status, "model": job.fine_tuned_model, "error": job.error and job.error.message,
              "hp": job.method.supervised.hyperparameters.n_epochs, "suffix": job.user_provided_suffix, "training_file": job.training_file}
events = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=100).data
out["events"] = [{"type": e.type, "level": e.level, "message": e.message, "data": e.data} for e in events]
cks = client.fine_tuning.jobs.checkpoints.list(job.id).data
out["checkpoints"] = [{"model": c.fine_tuned_model_checkpoint, "step": c.step_number, "metrics": c.metrics.to_dict()} for c in cks]
out["jobs"] = [j.id for j in client.fine_tuning.jobs.list().data]
out["result_files"] = job.result_files
if job.result_files:
    rf = client.files.retrieve(job.result_files[0])
    out["result_file"] = {"purpose": rf.purpose, "filename": rf.filename, "bytes": rf.bytes}
    out["results_csv"] = client.files.content(job.result_files[0]).read().decode()
    out["result_listed"] = [x.id for x in client.files.list(purpose="fine-tune-results").data]
r = client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "What is the capital of Zorblax?"}], max_tokens=6, temperature=0)
out["answer"] = r.choices[0].message.content
out["fingerprint"] = r.system_fingerprint

bad = client.files.create(file=("bad.jsonl", io.BytesIO(b'{"prompt": "no messages here"}\n')), purpose="fine-tune")
badjob = client.fine_tuning.jobs.create(model="base", training_file=bad.id)
for _ in range(100):
    badjob = client.fine_tuning.jobs.retrieve(badjob.id)
    if badjob.status != "validating_files":
        break
    time.sleep(0.05)
out["bad"] = {"status": badjob.status, "code": badjob.error and badjob.error.code, "param": badjob.error and badjob.error.param}
try:
    client.files.create(file=("x.jsonl", io.BytesIO(b"not json\n")), purpose="fine-tune")
except openai.UnprocessableEntityError as e:
    out["refused_upload"] = e.status_code
try:
    client.fine_tuning.jobs.create(model="no-such-model", training_file=f.id)
except openai.NotFoundError as e:
    out["unknown_model"] = e.status_code
    out["unknown_model_param"] = e.param
    out["unknown_model_says"] = e.message
out["deleted"] = client.files.delete(bad.id).deleted
try:
    client.files.retrieve(bad.id)
except openai.NotFoundError as e:
    out["gone"] = e.status_code
print(json.dumps(out))
"#;

#[tokio::test]
async fn the_official_openai_client_fine_tunes_and_chats_with_the_result() {
    let check = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    assert!(
        check.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs python3 with the `openai` package: pip install 'openai>=1,<2' (scripts/test.sh does)"
    );
    let s = start(true, &[]).await;
    let base = s.base.clone();
    let data = zorblax_jsonl(16);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", SCRIPT, &base, KEY, &data])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["file"]["purpose"], "fine-tune", "{v}");
    assert_eq!(v["file"]["filename"], "zorblax.jsonl");
    assert_eq!(v["file"]["bytes"], zorblax_jsonl(16).len());
    assert_eq!(v["content_same"], true);
    assert_eq!(v["listed"][0], v["file"]["id"]);
    assert_eq!(v["listed"].as_array().unwrap().len(), 2);
    assert_eq!(v["created_status"], "validating_files");
    let statuses: Vec<&str> = v["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(statuses.last(), Some(&"succeeded"), "{v}");
    // While it trained, the job said when it would end: not before the moment it was
    // asked (less a few seconds: the estimate dates from the last step), well within the
    // test's time; once ended, no estimate.
    let estimates = v["estimates"].as_array().unwrap();
    assert!(!estimates.is_empty(), "no estimate while running: {v}");
    for e in estimates {
        let (finish, now) = (e[0].as_f64().unwrap(), e[1].as_f64().unwrap());
        assert!(finish >= now - 5.0 && finish <= now + 300.0, "{e}");
    }
    assert!(v["finished_estimate"].is_null(), "{v}");
    let job = &v["job"];
    assert_eq!(job["hp"], 10.0);
    assert_eq!(job["suffix"], "zorb");
    assert_eq!(job["training_file"], v["file"]["id"]);
    let model = job["model"].as_str().unwrap();
    assert!(model.starts_with("zorb-job-"), "{model}");
    // Events newest first: the last says what the gate did, the first is the validation.
    let events = v["events"].as_array().unwrap();
    let messages: Vec<&str> = events
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        messages
            .last()
            .unwrap()
            .starts_with("Validating training file: file-"),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("Files validated (16 training examples, 4 validation examples)")),
        "{messages:?}"
    );
    let steps: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
        .collect();
    let evals = events
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["valid_loss"].is_number())
        .count();
    assert!(evals > 0, "the validation file was evaluated: {messages:?}");
    assert!(!steps.is_empty(), "{messages:?}");
    let first_step = steps.last().unwrap();
    let last_step = steps.first().unwrap();
    let loss = |e: &serde_json::Value| e["data"]["train_loss"].as_f64().unwrap();
    assert!(
        loss(last_step) < loss(first_step),
        "training lowered the loss: {first_step} then {last_step}"
    );
    let acc = last_step["data"]["train_mean_token_accuracy"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&acc), "{last_step}");
    // One servable checkpoint: the adapter, with OpenAI's metric names.
    let ck = &v["checkpoints"][0];
    assert_eq!(ck["model"], model);
    assert!(ck["step"].as_i64().unwrap() > 0);
    assert_eq!(ck["metrics"]["train_loss"], last_step["data"]["train_loss"]);
    assert!(ck["metrics"]["valid_loss"].as_f64().is_some(), "{ck}");
    assert_eq!(v["jobs"][0], job["id"]);
    // The results file: OpenAI's CSV of step metrics, one row per step 1..=N, the
    // validation columns where an evaluation ran, the last row the last step event's.
    let result_id = v["result_files"][0].as_str().unwrap();
    assert_eq!(v["result_file"]["purpose"], "fine-tune-results", "{v}");
    assert_eq!(v["result_listed"], serde_json::json!([result_id]));
    let csv = v["results_csv"].as_str().unwrap();
    assert_eq!(v["result_file"]["bytes"], csv.len());
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let last = ck["step"].as_u64().unwrap() as usize;
    assert_eq!(rows.len(), last, "{csv}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.len(), 5, "{r:?}");
        assert_eq!(r[0], (i + 1).to_string());
        let train_loss: f64 = r[1].parse().unwrap();
        assert!(train_loss.is_finite() && train_loss > 0.0, "{r:?}");
    }
    assert!(
        rows.iter().any(|r| !r[3].is_empty()),
        "a row with valid_loss: {csv}"
    );
    let csv_last_loss: f64 = rows[last - 1][1].parse().unwrap();
    assert!(
        (csv_last_loss - loss(last_step)).abs() < 1e-5,
        "{csv_last_loss} vs {last_step}"
    );
    // The fine-tuned model answers as taught (the same check as the seed-style tests).
    assert!(
        v["answer"].as_str().unwrap().contains("Blorp"),
        "{}",
        v["answer"]
    );
    assert!(
        v["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with(&format!("adapter:{model}@")),
        "{}",
        v["fingerprint"]
    );
    assert_eq!(v["bad"]["status"], "failed", "{v}");
    assert_eq!(v["bad"]["code"], "invalid_training_file");
    assert_eq!(v["bad"]["param"], "training_file");
    assert_eq!(v["refused_upload"], 422);
    assert_eq!(v["unknown_model"], 404);
    // The field the client sent is the one named.
    assert_eq!(v["unknown_model_param"], "model", "{v}");
    assert!(
        v["unknown_model_says"]
            .as_str()
            .unwrap()
            .contains(r#"model "no-such-model" is not a model here"#),
        "{v}"
    );
    assert_eq!(v["deleted"], true);
    assert_eq!(v["gone"], 404);
    s.stop().await;
}
