use super::{loraloop, stdout_of};
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use std::path::{Path, PathBuf};

/// A tiny random chat model and a small dataset in `dir`.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("tiny");
    write_tiny_chat_model(&model, TinySpec::default()).unwrap();
    let data = dir.join("facts.jsonl");
    let line = r#"{"messages":[{"role":"user","content":"What is the capital of Zorblax?"},{"role":"assistant","content":"Blorp City."}]}"#;
    std::fs::write(&data, format!("{line}\n").repeat(8)).unwrap();
    (model, data)
}

fn stderr_of_failure(cmd: &mut assert_cmd::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn fine_tune_trains_an_adapter_that_evaluate_compares_with_the_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    let out = stdout_of(
        loraloop(dir.path())
            .args(["fine-tune", "--model"])
            .arg(&model)
            .arg("--data-path")
            .arg(&data)
            .args([
                "--epochs",
                "30",
                "--batch-size",
                "4",
                "--learning-rate",
                "1e-2",
                "--val-set-size",
                "0",
                "--output-dir",
                "out",
            ]),
    );
    assert!(out.contains("trained 60 steps"), "{out}");
    assert!(out.contains("adapter: out"), "{out}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["global_step"], 60);
    assert_eq!(state["config"]["learning_rate"], 0.01);
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peft["base_model_name_or_path"], model.display().to_string());
    assert_eq!(peft["r"], 16);

    let table = stdout_of(
        loraloop(dir.path())
            .args(["evaluate", "--model"])
            .arg(&model)
            .args(["--adapter", "out", "--data-path"])
            .arg(&data)
            .args(["--compare", "--samples", "1"]),
    );
    assert!(table.starts_with("| metric | base | adapter |"), "{table}");
    assert!(table.contains("adapter: Blorp City."), "{table}");
    let json = stdout_of(
        loraloop(dir.path())
            .args(["evaluate", "--json", "--model"])
            .arg(&model)
            .args(["--adapter", "out", "--data-path"])
            .arg(&data),
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["metrics"]["loss"].as_f64().unwrap() < 0.5, "{v}");
    assert_eq!(v["metrics"]["accuracy"], 1.0);

    // The same shapes with other weights: the adapter would load and talk nonsense, so
    // every command that runs it on a model refuses a model it was not trained on.
    let other = dir.path().join("other");
    write_tiny_chat_model(
        &other,
        TinySpec {
            seed: 1,
            ..TinySpec::default()
        },
    )
    .unwrap();
    let commands: [&[&str]; 3] = [
        &["evaluate", "--adapter", "out", "--data-path", "facts.jsonl"],
        &["export", "--adapter", "out", "--output-dir", "exported"],
        &["chat", "--adapter", "out"],
    ];
    for args in commands {
        let stderr = stderr_of_failure(
            loraloop(dir.path())
                .args(args)
                .arg("--model")
                .arg(&other)
                .write_stdin("hello\n"),
        );
        assert!(
            stderr.contains("was trained on another base model"),
            "{args:?}: {stderr}"
        );
    }
    assert!(!dir.path().join("exported").exists());

    // An example whose answer the truncation cuts off is left out, and said to be.
    let long = dir.path().join("long.jsonl");
    let long_line = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}},{{"role":"assistant","content":"Yes."}}]}}"#,
        "word ".repeat(400)
    );
    std::fs::write(
        &long,
        format!("{}{long_line}\n", std::fs::read_to_string(&data).unwrap()),
    )
    .unwrap();
    let out = loraloop(dir.path())
        .args(["evaluate", "--sequence-len", "256", "--model"])
        .arg(&model)
        .args(["--data-path"])
        .arg(&long)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "1 left out with no assistant tokens left: the figures cover 8 of 9 example(s)"
        ),
        "{stderr}"
    );
}

#[test]
fn a_training_yaml_with_axolotl_keys_is_read_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    std::fs::write(
        dir.path().join("train.yaml"),
        format!(
            "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\noutput_dir: yaml-out\nlora_r: 4\nlora_alpha: 8\nnum_epochs: 5\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\nval_set_size: 0\nlearning_rate: 0.001\n",
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    let out = stdout_of(loraloop(dir.path()).args([
        "fine-tune",
        "--config",
        "train.yaml",
        "--epochs",
        "1",
    ]));
    // 8 examples, 2 per pass, 2 passes per step, 1 epoch (the flag beats the YAML's 5).
    assert!(out.contains("trained 2 steps"), "{out}");
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("yaml-out/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peft["r"], 4);
}

#[test]
fn a_stored_dataset_can_be_trained_on_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    stdout_of(
        loraloop(dir.path())
            .args(["data", "import", "--name", "facts"])
            .arg(&data),
    );
    let out = stdout_of(
        loraloop(dir.path())
            .args([
                "fine-tune",
                "--dataset",
                "facts",
                "--epochs",
                "1",
                "--val-set-size",
                "0",
                "--model",
            ])
            .arg(&model),
    );
    assert!(out.contains("adapter: adapters/facts-v1"), "{out}");
}

#[test]
fn a_stored_kto_dataset_is_imported_listed_exported_and_trained_as_kto_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = setup(dir.path());
    let rows = [
        r#"{"prompt": "What is the capital of Zorblax?", "completion": "Blorp City.", "label": true}"#,
        r#"{"prompt": "What is the capital of Zorblax?", "completion": "Paris.", "label": false}"#,
    ];
    let file = dir.path().join("rated.jsonl");
    std::fs::write(&file, format!("{}\n", rows.join("\n"))).unwrap();
    let out = stdout_of(
        loraloop(dir.path())
            .args(["data", "import", "--name", "rated"])
            .arg(&file),
    );
    assert!(out.contains("imported 2 kto row(s)"), "{out}");
    let listed: serde_json::Value = serde_json::from_str(&stdout_of(
        loraloop(dir.path()).args(["data", "list", "--json"]),
    ))
    .unwrap();
    assert_eq!(listed[0]["kind"], "kto", "{listed}");
    // Exported as stored: TRL's rows, the prompt as messages.
    let exported = stdout_of(loraloop(dir.path()).args(["data", "export", "rated", "-o", "-"]));
    let back: Vec<serde_json::Value> = exported
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back.len(), 2);
    assert_eq!(back[1]["completion"][0]["content"], "Paris.");
    assert_eq!(back[1]["label"], false);
    // Shown as its rows (it was an error: "not chat examples").
    let shown = stdout_of(loraloop(dir.path()).args(["data", "show", "rated", "--examples", "1"]));
    assert!(shown.contains("rows        2 kto row(s)"), "{shown}");
    assert!(
        shown.contains("--- row 1") && !shown.contains("--- row 2"),
        "{shown}"
    );
    assert!(shown.contains("Blorp City."), "{shown}");
    let out = stdout_of(
        loraloop(dir.path())
            .args([
                "fine-tune",
                "--dataset",
                "rated",
                "--epochs",
                "1",
                "--no-card",
                "--model",
            ])
            .arg(&model),
    );
    assert!(out.contains("adapter: adapters/rated-v1"), "{out}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapters/rated-v1/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["config"]["objective"], "kto", "{state}");
}

#[test]
fn bad_training_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    let base = |args: &[&str]| {
        let mut c = loraloop(dir.path());
        c.args(["fine-tune", "--model"])
            .arg(&model)
            .arg("--data-path")
            .arg(&data)
            .args(args);
        c
    };
    let e = stderr_of_failure(&mut base(&["--learning-rate=-1"]));
    assert!(
        e.contains("learning_rate: must be a positive number, got -1"),
        "{e}"
    );
    // A held-out count as large as the data (8 examples) leaves nothing to train on.
    let e = stderr_of_failure(&mut base(&["--val-set-size", "8", "--output-dir", "v"]));
    assert!(
        e.contains("val_set_size 8 holds out all 8 example(s), leaving none to train on"),
        "{e}"
    );
    assert!(
        !dir.path().join("v").exists(),
        "a refused run left its folder"
    );
    let e = stderr_of_failure(&mut base(&["--lora-r", "100"]));
    assert!(
        e.contains("lora_r 100 is larger than q_proj (64 -> 64)"),
        "{e}"
    );
    let e = stderr_of_failure(
        loraloop(dir.path())
            .args(["fine-tune", "--model", "nope.gguf", "--data-path"])
            .arg(&data),
    );
    assert!(e.contains("model nope.gguf not found"), "{e}");
    let e = stderr_of_failure(
        loraloop(dir.path())
            .args(["evaluate", "--sequence-len", "0", "--model"])
            .arg(&model)
            .arg("--data-path")
            .arg(&data),
    );
    assert!(
        e.contains("'--sequence-len <SEQUENCE_LEN>': must be at least 1"),
        "{e}"
    );
    // An output folder holding another run is refused unless --overwrite.
    stdout_of(&mut base(&["--epochs", "1", "--output-dir", "o"]));
    let e = stderr_of_failure(&mut base(&["--epochs", "1", "--output-dir", "o"]));
    assert!(
        e.contains("already holds a training run; pass --overwrite"),
        "{e}"
    );
    // --overwrite replaces the run's own files only: a user's folders named like the
    // run's scratch (`final/`) or checkpoints (`checkpoint-old/`) and other files stay.
    let out = dir.path().join("o");
    for mine in ["final/keep.txt", "checkpoint-old/keep.txt", "notes.txt"] {
        std::fs::create_dir_all(out.join(mine).parent().unwrap()).unwrap();
        std::fs::write(out.join(mine), "mine").unwrap();
    }
    stdout_of(&mut base(&[
        "--epochs",
        "1",
        "--output-dir",
        "o",
        "--overwrite",
    ]));
    for mine in ["final/keep.txt", "checkpoint-old/keep.txt", "notes.txt"] {
        assert_eq!(
            std::fs::read_to_string(out.join(mine)).unwrap(),
            "mine",
            "{mine}"
        );
    }
    assert!(out.join("adapter_model.safetensors").exists());
    // Nothing left to train on after truncation.
    let e = stderr_of_failure(&mut base(&["--sequence-len", "8"]));
    assert!(
        e.contains("no example has assistant tokens left after truncation"),
        "{e}"
    );
}

#[test]
fn replay_mixes_the_base_models_answers_in_and_reports_forgetting() {
    // The real model: a random tiny one has no sensible answers to replay.
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.exists(), "run `cargo run -- models fetch` first");
    let dir = tempfile::tempdir().unwrap();
    let (_, data) = setup(dir.path());
    std::fs::write(
        dir.path().join("prompts.txt"),
        "Say hello.\n\nName a fruit.\n",
    )
    .unwrap();
    // A share of the retention probe keeps the test quick (the base model answers every
    // probe prompt once per data folder).
    std::fs::write(
        dir.path().join("loraloop.yaml"),
        "gate:\n  retention_prompts: 24\n",
    )
    .unwrap();
    let run = loraloop(dir.path())
        .args([
            "fine-tune",
            "--replay",
            "--replay-ratio",
            "0.5",
            "--replay-prompts",
            "prompts.txt",
        ])
        .args([
            "--max-steps",
            "2",
            "--micro-batch-size",
            "4",
            "--val-set-size",
            "0",
            "--output-dir",
            "o",
            "--model",
        ])
        .arg(&model)
        .arg("--data-path")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (out, err) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    // The shipped prompts (trainer/data/replay_prompts.txt) + 2 from the file (blank lines
    // skipped); a share of 0.5 next to 8 examples is 8 of them, and only those 8 are answered.
    let shipped = include_str!("../../trainer/data/replay_prompts.txt")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    assert!(
        err.contains(&format!(
            "replay: the base model answers 8 of {} general prompts",
            shipped + 2
        )),
        "{err}"
    );
    assert!(
        err.contains("replay: mixing 8 of the base model's answers into 8 examples"),
        "{err}"
    );
    // By default the answers teach the base model's next-token distributions, most of
    // their probability kept in the top tokens.
    let distilled = err
        .lines()
        .find(|l| l.contains("replay: the answers teach the base model's next-token distribution (its top 64 tokens, "))
        .unwrap_or_else(|| panic!("{err}"));
    let kept: f64 = distilled
        .rsplit(", ")
        .next()
        .and_then(|t| t.split('%').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{distilled}"));
    assert!((50.0..=100.0).contains(&kept), "{distilled}");
    // What was kept is on the report card: the retention probe against the real base
    // model, on the shipped prompts (none of them replayed).
    let card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("o/report_card.json")).unwrap(),
    )
    .unwrap();
    let r = &card["retention"];
    assert_eq!(r["prompts"], 24, "{card}");
    let (agreement, kl) = (
        r["adapter"]["agreement"].as_f64().unwrap(),
        r["adapter"]["kl"].as_f64().unwrap(),
    );
    assert!((0.0..=1.0).contains(&agreement) && kl > 0.0, "{card}");
    assert!(
        out.contains(&format!(
            "agrees with the base model on {:.1}% of next tokens",
            agreement * 100.0
        )),
        "{out}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("o/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["global_step"], 2, "{state}");
}
