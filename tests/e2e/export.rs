//! `loraloop export` on the real default model: a LoRA GGUF with a Modelfile that points
//! llama.cpp / Ollama at the base, and a merged Q4_1 GGUF that loads and chats.

use super::{loraloop, stdout_of};
use loraloop_model::engine::LoadedModel;
use loraloop_model::llama::config::Projection;
use loraloop_model::lora::{PeftConfig, random_peft_tensors, write_peft_dir};
use std::path::Path;

fn real_model() -> std::path::PathBuf {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "run `cargo run -- models fetch` first");
    p
}

/// A rank-4 adapter of small random weights for the real model at `dir/my-adapter`.
fn random_adapter(dir: &Path) {
    let dev = candle_core::Device::Cpu;
    let base = LoadedModel::load(&real_model(), &dev).unwrap();
    let peft = PeftConfig::new(4, 8.0, &[Projection::Q, Projection::V]);
    let tensors = random_peft_tensors(&base.llama.config, &peft, 0.01, &dev).unwrap();
    write_peft_dir(&dir.join("my-adapter"), &peft, &tensors).unwrap();
}

#[test]
fn an_export_killed_while_writing_leaves_the_earlier_file_whole_and_the_next_removes_its_leftover()
{
    let dir = tempfile::tempdir().unwrap();
    random_adapter(dir.path());
    let merged = dir.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let earlier = merged.join("model-f16.gguf");
    std::fs::write(&earlier, b"an earlier export").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_loraloop"))
        .current_dir(dir.path())
        .args([
            "export",
            "--adapter",
            "my-adapter",
            "--format",
            "merged",
            "--type",
            "f16",
        ])
        .args(["--output-dir", "merged", "--model"])
        .arg(real_model())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once a megabyte of the new file is written (it holds about 270 MB).
    let partial_size = || {
        std::fs::read_dir(&merged)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".model-f16.gguf.partial")
            })
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .max()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while partial_size().unwrap_or(0) < 1 << 20 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the export ended before the kill"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no partial file appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read(&earlier).unwrap(), b"an earlier export");
    assert!(partial_size().is_some(), "the kill left its partial file");

    // The next export replaces the file and removes what the killed one left.
    stdout_of(
        loraloop(dir.path())
            .args(["export", "--adapter", "my-adapter", "--format", "merged"])
            .args(["--type", "f16", "--output-dir", "merged", "--model"])
            .arg(real_model()),
    );
    assert_eq!(
        partial_size(),
        None,
        "a killed export's partial file was left"
    );
    let exported = LoadedModel::load(&earlier, &candle_core::Device::Cpu).unwrap();
    assert_eq!(exported.llama.config.num_layers, 30);
}

#[test]
fn a_refused_export_leaves_no_folder_and_a_lora_gguf_takes_no_type() {
    let dir = tempfile::tempdir().unwrap();
    for (args, said) in [
        (&["--adapter", "missing"][..], "missing"),
        (
            &["--adapter", "missing", "--type", "q4_1"][..],
            "--type q4_1 is for --format merged or hf",
        ),
    ] {
        let out = loraloop(dir.path())
            .arg("export")
            .args(args)
            .args(["--output-dir", "never", "--model"])
            .arg(real_model())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(said), "{stderr}");
        assert!(!dir.path().join("never").exists(), "{args:?}");
    }
}

#[test]
fn export_writes_a_lora_gguf_or_a_merged_gguf_with_an_ollama_modelfile() {
    let dir = tempfile::tempdir().unwrap();
    random_adapter(dir.path());

    stdout_of(
        loraloop(dir.path())
            .args([
                "export",
                "--adapter",
                "my-adapter",
                "--output-dir",
                "lora",
                "--model",
            ])
            .arg(real_model()),
    );
    let gguf = std::fs::read(dir.path().join("lora/adapter.gguf")).unwrap();
    assert_eq!(&gguf[..4], b"GGUF");
    let modelfile = std::fs::read_to_string(dir.path().join("lora/Modelfile")).unwrap();
    let from = std::fs::canonicalize(real_model()).unwrap();
    assert!(
        modelfile.starts_with(&format!(
            "FROM {}\nADAPTER ./adapter.gguf\n",
            from.display()
        )),
        "{modelfile}"
    );
    assert!(
        modelfile.contains("SYSTEM \"\"\"You are a helpful assistant.\"\"\""),
        "{modelfile}"
    );

    let stdout = stdout_of(
        loraloop(dir.path())
            .args([
                "export",
                "--adapter",
                "my-adapter",
                "--format",
                "merged",
                "--type",
                "q4_1",
            ])
            .args(["--output-dir", "merged", "--model"])
            .arg(real_model()),
    );
    assert!(stdout.contains("model-q4_1.gguf"), "{stdout}");
    let modelfile = std::fs::read_to_string(dir.path().join("merged/Modelfile")).unwrap();
    assert!(
        modelfile.starts_with("FROM ./model-q4_1.gguf\n"),
        "{modelfile}"
    );
    // The merged file is a model of its own: `loraloop chat` runs it.
    let stdout = stdout_of(
        loraloop(dir.path())
            .args([
                "chat",
                "--json",
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
                "--model",
            ])
            .arg(dir.path().join("merged/model-q4_1.gguf"))
            .write_stdin("What is the capital of France?\n"),
    );
    let reply: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(!reply["reply"].as_str().unwrap().is_empty(), "{reply}");

    // The merged model as a Hugging Face folder, which the folder loader runs.
    stdout_of(
        loraloop(dir.path())
            .args([
                "export",
                "--adapter",
                "my-adapter",
                "--format",
                "hf",
                "--output-dir",
                "hf",
                "--model",
            ])
            .arg(real_model()),
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.path().join("hf").join(f).is_file(), "{f}");
    }
    stdout_of(
        loraloop(dir.path())
            .args([
                "chat",
                "--json",
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
                "--model",
                "hf",
            ])
            .write_stdin("What is the capital of France?\n"),
    );

    let out = loraloop(dir.path())
        .args([
            "export",
            "--adapter",
            "missing",
            "--output-dir",
            "x",
            "--model",
        ])
        .arg(real_model())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));
}
