//! Classifier fine-tunes through the binary: a tiny random BERT learns a generated
//! two-class text set and a tiny random ResNet learns generated coloured shapes, each to
//! above 90% held-out accuracy, then `evaluate` and `predict` read the saved checkpoint.
//! The models are built here (random weights; nothing is fetched).

use super::{loraloop, stdout_of};
use image::{Rgb, RgbImage};
use loraloop_model::testing::{
    REVIEW_WORDS, two_class_reviews, write_tiny_bert, write_tiny_resnet,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

#[test]
fn a_tiny_encoder_learns_a_two_class_text_set_and_the_checkpoint_evaluates_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-bert");
    write_tiny_bert(&model, &REVIEW_WORDS, 32, 2, 7).unwrap();
    let train = dir.path().join("reviews.jsonl");
    std::fs::write(&train, two_class_reviews(240, 1)).unwrap();
    let held_out = dir.path().join("held_out.jsonl");
    std::fs::write(&held_out, two_class_reviews(100, 2)).unwrap();
    let out_dir = dir.path().join("models");
    let out = loraloop(dir.path())
        .args(["fine-tune", "--model"])
        .arg(&model)
        .arg("--data-path")
        .arg(&train)
        .args([
            "--epochs",
            "20",
            "--batch-size",
            "16",
            "--learning-rate",
            "2e-3",
            "--warmup-ratio",
            "0.1",
            "--output-dir",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fine-tune failed: {stderr}");
    assert!(stderr.contains("text-classification"), "{stderr}");
    assert!(stderr.contains("epoch 20:"), "one line per epoch: {stderr}");
    for e in [1, 10, 20] {
        assert!(
            out_dir
                .join(format!("checkpoint-{e}/model.safetensors"))
                .is_file()
        );
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["log_history"].as_array().unwrap().len(), 20);

    let json = stdout_of(
        loraloop(dir.path())
            .args(["evaluate", "--model-path"])
            .arg(out_dir.join("checkpoint-20"))
            .arg("--data-path")
            .arg(&held_out)
            .arg("--json"),
    );
    let m: serde_json::Value = serde_json::from_str(&json).unwrap();
    let acc = m["accuracy"].as_f64().unwrap();
    eprintln!("held-out accuracy {acc}");
    assert!(
        acc > 0.9,
        "held-out accuracy {acc}: {json}\ntraining: {stderr}"
    );
    assert_eq!(m["examples"], 100);
    assert!(m["macro_f1"].as_f64().unwrap() > 0.9);
    assert_eq!(m["per_class"].as_array().unwrap().len(), 2);
    let cm = m["confusion_matrix"].as_array().unwrap();
    let total: u64 = cm
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 100);
    // The human report has the same numbers.
    let report = stdout_of(
        loraloop(dir.path())
            .args(["evaluate", "--model-path"])
            .arg(out_dir.join("checkpoint-20"))
            .arg("--data-path")
            .arg(&held_out),
    );
    assert!(report.contains("confusion matrix"), "{report}");
    assert!(
        report.contains(&format!("accuracy {:.2}%", acc * 100.0)),
        "{report}"
    );
    // Language-model flags cannot apply to a classifier: refused, not ignored.
    let refused = failure(
        loraloop(dir.path())
            .args(["evaluate", "--model-path"])
            .arg(out_dir.join("checkpoint-20"))
            .arg("--data-path")
            .arg(&held_out)
            .args(["--sequence-len", "64"]),
    );
    assert!(
        refused.contains("--sequence-len is for a language model")
            && refused.contains("classifier checkpoint"),
        "{refused}"
    );

    let preds = stdout_of(
        loraloop(dir.path())
            .args(["predict", "--json", "--model-path"])
            .arg(out_dir.join("checkpoint-20"))
            .args(["the film was superb and lovely", "a dull and dreadful plot"]),
    );
    let lines: Vec<serde_json::Value> = preds
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["label"], "positive", "{preds}");
    assert_eq!(lines[1]["label"], "negative", "{preds}");
}

/// A `size`x`size` image of a filled circle or square of a random colour, size and place
/// on a random dark background.
fn shape(rng: &mut StdRng, circle: bool, size: u32) -> RgbImage {
    let bg = Rgb([
        rng.random_range(0..60),
        rng.random_range(0..60),
        rng.random_range(0..60),
    ]);
    let fg = Rgb([
        rng.random_range(120..=255),
        rng.random_range(120..=255),
        rng.random_range(120..=255),
    ]);
    let r = rng.random_range(size as f32 * 0.2..size as f32 * 0.35);
    let cx = rng.random_range(r..size as f32 - r);
    let cy = rng.random_range(r..size as f32 - r);
    RgbImage::from_fn(size, size, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let inside = if circle {
            dx * dx + dy * dy <= r * r
        } else {
            dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85
        };
        if inside { fg } else { bg }
    })
}

fn write_shapes(dir: &Path, per_class: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for class in ["circle", "square"] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..per_class {
            let img = shape(&mut rng, class == "circle", 40);
            // The three formats a class folder may hold.
            let ext = ["png", "jpg", "webp"][i % 3];
            img.save(dir.join(class).join(format!("{i}.{ext}")))
                .unwrap();
        }
    }
}

#[test]
fn a_tiny_resnet_learns_coloured_shapes_and_the_checkpoint_evaluates_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-resnet");
    write_tiny_resnet(&model, 8, &[1, 1], false, 3).unwrap();
    let data = dir.path().join("shapes");
    write_shapes(&data.join("train"), 120, 1);
    write_shapes(&data.join("val"), 40, 2);
    let out_dir = dir.path().join("models");
    let out = loraloop(dir.path())
        .args(["fine-tune", "--model"])
        .arg(&model)
        .arg("--data-path")
        .arg(&data)
        .args([
            "--epochs",
            "15",
            "--batch-size",
            "16",
            "--learning-rate",
            "3e-3",
            "--image-size",
            "32",
            // Activations recomputed block by block (the gradients match PyTorch's in
            // model/tests/classify.rs); it must learn as well as without.
            "--gradient-checkpointing",
            "--output-dir",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fine-tune failed: {stderr}");
    assert!(stderr.contains("image-classification"), "{stderr}");
    let json = stdout_of(
        loraloop(dir.path())
            .args(["evaluate", "--json", "--model-path"])
            .arg(out_dir.join("checkpoint-15"))
            .arg("--data-path")
            .arg(&data),
    );
    let m: serde_json::Value = serde_json::from_str(&json).unwrap();
    let acc = m["accuracy"].as_f64().unwrap();
    eprintln!("held-out accuracy {acc}");
    assert!(
        acc > 0.9,
        "held-out accuracy {acc} on val/: {json}\ntraining: {stderr}"
    );
    assert_eq!(m["examples"], 80, "evaluate reads the folder's val/ split");

    let mut rng = StdRng::seed_from_u64(9);
    let (c, s) = (dir.path().join("c.png"), dir.path().join("s.png"));
    shape(&mut rng, true, 40).save(&c).unwrap();
    shape(&mut rng, false, 40).save(&s).unwrap();
    let preds = stdout_of(
        loraloop(dir.path())
            .args(["predict", "--json", "--model-path"])
            .arg(out_dir.join("checkpoint-15"))
            .arg(&c)
            .arg(&s),
    );
    let lines: Vec<serde_json::Value> = preds
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines
            .iter()
            .all(|l| l["scores"].as_object().unwrap().len() == 2),
        "{preds}"
    );
}

fn failure(cmd: &mut assert_cmd::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_classifier_data_is_refused_with_the_reason_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-bert");
    write_tiny_bert(&model, &REVIEW_WORDS, 16, 1, 7).unwrap();
    let out = dir.path().join("out");
    let cases: [(&str, &str, &str); 5] = [
        (
            "bad.jsonl",
            "{\"text\": \"good\", \"label\": \"a\"}\nnot json\n{\"text\": \"\", \"label\": \"b\"}\n{\"text\": \"x\"}\n",
            "3 problem(s)",
        ),
        (
            "one.jsonl",
            "{\"text\": \"good\", \"label\": \"a\"}\n{\"text\": \"bad\", \"label\": \"a\"}\n",
            "only one label",
        ),
        (
            "cols.csv",
            "sentence,sentiment\ngood,1\n",
            "\"text\" and \"label\" columns",
        ),
        ("empty.jsonl", "\n\n", "holds no examples"),
        ("quoted.csv", "text,label\n\"unterminated,1\n", "problem"),
    ];
    for (name, content, want) in cases {
        let data = dir.path().join(name);
        std::fs::write(&data, content).unwrap();
        let err = failure(
            loraloop(dir.path())
                .args(["fine-tune", "--model"])
                .arg(&model)
                .arg("--data-path")
                .arg(&data)
                .arg("--output-dir")
                .arg(&out),
        );
        assert!(err.contains(want), "{name}: {err}");
        assert!(!out.join("checkpoint-1").exists());
    }
    // Texts given to an image model, images to a text model.
    let shapes = dir.path().join("shapes");
    write_shapes(&shapes, 2, 1);
    let err = failure(
        loraloop(dir.path())
            .args(["fine-tune", "--task", "text-classification", "--model"])
            .arg(&model)
            .arg("--data-path")
            .arg(&shapes),
    );
    assert!(err.contains("folder of images"), "{err}");
    // A corrupt image is named.
    std::fs::write(shapes.join("circle/broken.png"), b"not a png").unwrap();
    let resnet = dir.path().join("tiny-resnet");
    write_tiny_resnet(&resnet, 4, &[1], false, 1).unwrap();
    let err = failure(
        loraloop(dir.path())
            .args(["fine-tune", "--image-size", "16", "--model"])
            .arg(&resnet)
            .arg("--data-path")
            .arg(&shapes)
            .arg("--output-dir")
            .arg(&out),
    );
    assert!(err.contains("broken.png"), "{err}");
    // Settings a classifier cannot use.
    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, two_class_reviews(10, 1)).unwrap();
    for (flags, want) in [
        (vec!["--metric-for-best-model", "vibes"], "unknown metric"),
        (vec!["--method", "qlora"], "unknown method"),
    ] {
        let err = failure(
            loraloop(dir.path())
                .args(["fine-tune", "--model"])
                .arg(&model)
                .arg("--data-path")
                .arg(&good)
                .args(&flags),
        );
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}

#[test]
fn a_bare_resnet_name_trains_from_random_weights_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let shapes = dir.path().join("shapes");
    write_shapes(&shapes, 4, 1);
    let out = loraloop(dir.path())
        .args(["fine-tune", "--model", "resnet18", "--data-path"])
        .arg(&shapes)
        .args([
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--val-set-size",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("RANDOM initialization of resnet18"),
        "{stderr}"
    );
    let ckpt = dir
        .path()
        .join("classifiers/resnet18-image-classification/checkpoint-1");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("classifier.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["arch"]["config"]["layers"],
        serde_json::json!([2, 2, 2, 2])
    );
    assert_eq!(manifest["labels"], serde_json::json!(["circle", "square"]));
}

#[test]
fn a_training_yaml_drives_a_classifier_fine_tune() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-bert");
    write_tiny_bert(&model, &REVIEW_WORDS, 16, 1, 7).unwrap();
    std::fs::write(dir.path().join("reviews.csv"), {
        let mut csv = String::from("text,label\n");
        for line in two_class_reviews(40, 4).lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let label = if v["label"] == "positive" { 1 } else { 0 };
            csv.push_str(&format!("\"{}\",{label}\n", v["text"].as_str().unwrap()));
        }
        csv
    })
    .unwrap();
    let yaml = format!(
        "base_model: {}\ndatasets:\n  - path: reviews.csv\noutput_dir: yaml-out\nnum_epochs: 2\nmicro_batch_size: 8\nlearning_rate: 0.001\nfinetuning_type: lora\nlora_r: 4\nmetric_for_best_model: macro_f1\nval_set_size: 8\n",
        model.display()
    );
    std::fs::write(dir.path().join("train.yaml"), yaml).unwrap();
    let out = loraloop(dir.path())
        .args(["fine-tune", "--config", "train.yaml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("(lora)"), "{stderr}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("yaml-out/checkpoint-2/classifier.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["labels"],
        serde_json::json!(["0", "1"]),
        "integer labels sort numerically"
    );
    assert_eq!(manifest["method"], "lora");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("yaml-out/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["metric_for_best_model"], "macro_f1");
}
