use super::{fixture, loraloop, stdout_of};
use std::path::Path;

fn datasets(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&stdout_of(loraloop(dir).args(["data", "list", "--json"]))).unwrap()
}

fn import(dir: &Path, file: &Path, name: &str) -> std::process::Output {
    loraloop(dir)
        .args(["data", "import"])
        .arg(file)
        .args(["--name", name])
        .output()
        .unwrap()
}

#[test]
fn every_supported_format_imports_with_its_detected_format_and_example_count() {
    let dir = tempfile::tempdir().unwrap();
    // (fixture, detected format, examples) — counts are the non-blank lines of each fixture.
    let cases = [
        ("valid/openai.jsonl", "openai"),
        ("valid/prompt_completion_crlf.jsonl", "prompt-completion"),
        ("valid/text_bom.jsonl", "text"),
        ("valid/alpaca_blank_lines.jsonl", "alpaca"),
        ("valid/sharegpt.jsonl", "sharegpt"),
    ];
    for (i, (file, format)) in cases.iter().enumerate() {
        let path = fixture(file);
        let lines = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        let out = import(dir.path(), &path, &format!("ds{i}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("imported {lines} example(s)")),
            "{file}: {stdout}"
        );
        assert!(
            stdout.contains(&format!("format {format}")),
            "{file}: {stdout}"
        );
    }
    assert_eq!(datasets(dir.path()).as_array().unwrap().len(), cases.len());
}

#[test]
fn validate_reads_preference_files_as_import_does() {
    let dir = tempfile::tempdir().unwrap();
    let dpo = dir.path().join("dpo.jsonl");
    std::fs::write(&dpo, concat!(
        r#"{"input":{"messages":[{"role":"user","content":"q"}]},"preferred_output":[{"role":"assistant","content":"x"}],"non_preferred_output":[{"role":"assistant","content":"y"}]}"#,
        "\n"
    ))
    .unwrap();
    let kto = dir.path().join("kto.jsonl");
    std::fs::write(
        &kto,
        "{\"prompt\":\"a\",\"completion\":\"b\",\"label\":\"yes\"}\n{\"prompt\":\"a\",\"completion\":\"b\",\"label\":true}\n",
    )
    .unwrap();
    let validate = |file: &Path, extra: &[&str]| {
        loraloop(dir.path())
            .args(["data", "validate"])
            .arg(file)
            .args(extra)
            .output()
            .unwrap()
    };
    // A valid DPO file: valid (it was "unknown_format"), and so with --format dpo.
    for extra in [&[][..], &["--format", "dpo"][..]] {
        let out = validate(&dpo, extra);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains("1 valid dpo row(s)"), "{said}");
    }
    // A KTO label that is not a boolean: refused by both (validate passed it as chat data).
    let out = validate(&kto, &[]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("invalid_label"), "{said}");
    assert!(!import(dir.path(), &kto, "k").status.success());
}

#[test]
fn each_malformed_file_is_refused_with_its_code_and_line_and_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A good version first, so "nothing" means the database is exactly as it was.
    assert!(
        import(dir.path(), &fixture("valid/openai.jsonl"), "faq")
            .status
            .success()
    );
    let before = datasets(dir.path());
    let errors = std::fs::read_dir(fixture("errors")).unwrap();
    let mut seen = 0;
    for entry in errors {
        let path = entry.unwrap().path();
        let code = path.file_stem().unwrap().to_string_lossy().into_owned();
        let out = import(dir.path(), &path, "faq");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{code} was accepted");
        assert!(stderr.contains(&format!(": {code}: ")), "{code}: {stderr}");
        assert!(stderr.contains("nothing was imported"), "{code}: {stderr}");
        if code != "empty_file" {
            assert!(
                stderr.contains("line "),
                "{code} has no line number: {stderr}"
            );
        }
        seen += 1;
    }
    assert!(seen >= 15, "only {seen} error fixtures");
    assert_eq!(datasets(dir.path()), before);
}

#[test]
fn a_file_with_many_problems_lists_the_first_twenty_and_the_total() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, "not json\n".repeat(25)).unwrap();
    let out = import(dir.path(), &file, "bad");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.matches(": invalid_json: ").count(), 20, "{stderr}");
    assert!(
        stderr.contains("... and 5 more (25 problems in total)"),
        "{stderr}"
    );
}

#[test]
fn warnings_are_shown_but_do_not_block_the_import() {
    let dir = tempfile::tempdir().unwrap();
    let out = import(
        dir.path(),
        &fixture("warnings/duplicate_example.jsonl"),
        "dup",
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("duplicate_example"));
}

#[test]
fn an_exported_dataset_reimports_to_the_same_hash_and_an_identical_import_adds_no_version() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        import(dir.path(), &fixture("valid/openai.jsonl"), "faq")
            .status
            .success()
    );
    let again = import(dir.path(), &fixture("valid/openai.jsonl"), "faq");
    assert!(String::from_utf8_lossy(&again.stdout).contains("unchanged: faq v1"));

    let exported = dir.path().join("out.jsonl");
    stdout_of(
        loraloop(dir.path())
            .args(["data", "export", "faq", "-o"])
            .arg(&exported),
    );
    // Same name: recognised as the same content.
    let same = import(dir.path(), &exported, "faq");
    assert!(String::from_utf8_lossy(&same.stdout).contains("unchanged: faq v1"));
    // Another name: a new dataset with the identical hash.
    assert!(import(dir.path(), &exported, "faq-copy").status.success());
    let list = datasets(dir.path());
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["content_hash"], rows[1]["content_hash"]);
    // The export is OpenAI chat JSONL and keeps per-message weights.
    let text = std::fs::read_to_string(&exported).unwrap();
    assert!(
        text.lines()
            .all(|l| l.starts_with(r#"{"messages":[{"role":"#)),
        "{text}"
    );
    assert!(
        text.contains(r#""weight":0"#) || text.contains(r#""weight":0.0"#),
        "{text}"
    );
}

#[test]
fn a_changed_file_under_the_same_name_becomes_version_two() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        import(dir.path(), &fixture("valid/openai.jsonl"), "faq")
            .status
            .success()
    );
    let out = import(dir.path(), &fixture("valid/sharegpt.jsonl"), "faq");
    assert!(String::from_utf8_lossy(&out.stdout).contains("as faq v2"));
    let show = stdout_of(loraloop(dir.path()).args(["data", "show", "faq", "--version", "1"]));
    assert!(show.contains("dataset faq v1"), "{show}");
}

#[test]
fn show_reports_counts_roles_and_a_length_histogram() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("two.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"messages":[{"role":"system","content":"S"},{"role":"user","content":"Q"},{"role":"assistant","content":"A","weight":0},{"role":"user","content":"Q2"},{"role":"assistant","content":"A2"}]}"#,
            "\n",
            r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello there"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    assert!(import(dir.path(), &file, "two").status.success());
    let out = stdout_of(loraloop(dir.path()).args(["data", "show", "two", "--examples", "1"]));
    // By hand: 2 examples, 7 messages (1 system, 3 user, 3 assistant); chars per example
    // "S"+"Q"+"A"+"Q2"+"A2" = 7 and "Hi"+"Hello there" = 13: both in the <64 bucket.
    assert!(out.contains("examples    2"), "{out}");
    assert!(
        out.contains("messages    7 (system 1, user 3, assistant 3)"),
        "{out}"
    );
    assert!(out.contains("weight 0    1 example(s)"), "{out}");
    assert!(
        out.contains("characters  min 7, mean 10.0, max 13, total 20"),
        "{out}"
    );
    assert!(out.contains("<64       2"), "{out}");
    assert!(out.contains("[assistant (weight 0)] A"), "{out}");
}

#[test]
fn unknown_datasets_and_bad_names_and_formats_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = loraloop(dir.path())
        .args(["data", "show", "nope"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("dataset \"nope\" not found"));
    let out = import(dir.path(), &fixture("valid/openai.jsonl"), "bad name");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid dataset name"));
    let out = loraloop(dir.path())
        .args(["data", "import"])
        .arg(fixture("valid/openai.jsonl"))
        .args(["--name", "x", "--format", "csv"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--format") && stderr.contains("alpaca"),
        "{stderr}"
    );
    let out = loraloop(dir.path())
        .args(["data", "import", "missing.jsonl", "--name", "x"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read missing.jsonl"));
}
