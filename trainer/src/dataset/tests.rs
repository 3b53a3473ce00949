//! Fixture-driven tests of parsing, detection, validation, hashing and export.
//!
//! Expected examples are written out by hand here, not derived from the code under test.

use super::*;
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use sha2::{Digest, Sha256};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/datasets");

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{path}"))
        .unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
}

fn parse_ok(path: &str, format: Option<Format>) -> ParseOutcome {
    let outcome = parse_jsonl(&fixture(path), format);
    assert!(
        outcome.is_ok(),
        "{path} should parse cleanly:\n{}",
        format_problems(&outcome.errors, MAX_LISTED_PROBLEMS)
    );
    assert!(
        outcome.warnings.is_empty(),
        "{path}: {:?}",
        outcome.warnings
    );
    outcome
}

fn m(role: Role, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn w(role: Role, content: &str, weight: f64) -> ChatMessage {
    ChatMessage {
        weight: Some(weight),
        ..m(role, content)
    }
}

fn ex(messages: Vec<ChatMessage>) -> ChatExample {
    ChatExample { messages }
}

/// The codes of `outcome.errors`, with their lines.
fn error_codes(outcome: &ParseOutcome) -> Vec<(Option<usize>, ProblemCode)> {
    outcome.errors.iter().map(|p| (p.line, p.code)).collect()
}

use Role::{Assistant, System, User};

// ---------------------------------------------------------------- valid formats

#[test]
fn an_openai_file_keeps_roles_weights_and_unicode_and_drops_names() {
    let out = parse_ok("valid/openai.jsonl", None);
    assert_eq!(out.format, Some(Format::OpenAiChat));
    assert_eq!(out.example_lines, [1, 2, 3]);
    assert_eq!(
        out.examples,
        [
            ex(vec![
                m(System, "You are a terse assistant."),
                m(User, "What is the capital of France?"),
                m(Assistant, "Paris."),
            ]),
            ex(vec![
                m(User, "Say hi in Japanese 🇯🇵"),
                w(Assistant, "こんにちは 👋", 1.0),
                m(User, "And in Greek?"),
                w(Assistant, "Γειά σου", 0.0),
            ]),
            ex(vec![
                m(User, "Count to three."),
                w(Assistant, "1, 2, 3", 0.5)
            ]),
        ]
    );
}

#[test]
fn a_prompt_completion_line_becomes_a_user_and_an_assistant_turn() {
    // The fixture has CRLF line endings; no '\r' may leak into the content.
    let out = parse_ok("valid/prompt_completion_crlf.jsonl", None);
    assert_eq!(out.format, Some(Format::PromptCompletion));
    assert_eq!(out.example_lines, [1, 2, 3]);
    assert_eq!(
        out.examples,
        [
            ex(vec![m(User, "2+2="), m(Assistant, " 4")]),
            ex(vec![
                m(User, "Translate to French: cat"),
                m(Assistant, "chat")
            ]),
            ex(vec![m(User, "Spell 'dog' backwards"), m(Assistant, "god")]),
        ]
    );
}

#[test]
fn a_text_line_becomes_a_single_assistant_turn() {
    // The fixture starts with a UTF-8 BOM, which must not shift line numbers.
    let out = parse_ok("valid/text_bom.jsonl", None);
    assert_eq!(out.format, Some(Format::Text));
    assert_eq!(out.example_lines, [1, 2, 3]);
    assert_eq!(
        out.examples,
        [
            ex(vec![m(
                Assistant,
                "The quick brown fox jumps over the lazy dog."
            )]),
            ex(vec![m(Assistant, "Line one\nLine two")]),
            ex(vec![m(Assistant, "Ünïcödé ✓ 🚀")]),
        ]
    );
}

#[test]
fn an_alpaca_line_keeps_llama_factorys_system_and_history() {
    let line =
        r#"{"instruction":"And 3+3?","output":"6","system":"Be brief.","history":[["2+2?","4"]]}"#;
    let out = parse_jsonl(line.as_bytes(), None);
    assert!(out.is_ok(), "{:?}", out.errors);
    assert_eq!(
        out.examples,
        [ex(vec![
            m(System, "Be brief."),
            m(User, "2+2?"),
            m(Assistant, "4"),
            m(User, "And 3+3?"),
            m(Assistant, "6"),
        ])]
    );
    for bad in [
        r#"{"instruction":"q","output":"a","history":[["only one"]]}"#,
        r#"{"instruction":"q","output":"a","history":"2+2? 4"}"#,
        r#"{"instruction":"q","output":"a","system":3}"#,
    ] {
        let out = parse_jsonl(bad.as_bytes(), None);
        let codes: Vec<_> = out.errors.iter().map(|p| p.code).collect();
        assert_eq!(codes, [ProblemCode::MissingContent], "{bad}");
    }
}

#[test]
fn an_alpaca_line_joins_instruction_and_non_empty_input_with_a_blank_line() {
    // Blank and whitespace-only lines are skipped but still counted.
    let out = parse_ok("valid/alpaca_blank_lines.jsonl", None);
    assert_eq!(out.format, Some(Format::Alpaca));
    assert_eq!(out.example_lines, [1, 3, 6, 7]);
    assert_eq!(
        out.examples,
        [
            ex(vec![
                m(User, "Give a synonym for happy."),
                m(Assistant, "Joyful.")
            ]),
            ex(vec![
                m(
                    User,
                    "Summarize the text.\n\nRust is a systems programming language."
                ),
                m(Assistant, "Rust: systems language."),
            ]),
            ex(vec![m(User, "Name a prime number."), m(Assistant, "7")]),
            ex(vec![m(User, "Greet in German."), m(Assistant, "Hallo!")]),
        ]
    );
}

#[test]
fn sharegpt_turns_map_to_chat_roles_and_keep_the_system_prompt() {
    let out = parse_ok("valid/sharegpt.jsonl", None);
    assert_eq!(out.format, Some(Format::ShareGpt));
    assert_eq!(out.example_lines, [1, 2, 3]);
    assert_eq!(
        out.examples,
        [
            ex(vec![m(User, "Hi!"), m(Assistant, "Hello! 😊")]),
            ex(vec![
                m(System, "You are a pirate."),
                m(User, "Where is the treasure?"),
                m(Assistant, "Arr, buried deep."),
            ]),
            // An empty top-level "system" is ignored; "Human" matches case-insensitively.
            ex(vec![
                m(System, "Be brief."),
                m(User, "2+2?"),
                m(Assistant, "4"),
                m(User, "3+3?"),
                m(Assistant, "6"),
            ]),
        ]
    );
}

// ---------------------------------------------------------------- problem fixtures

/// Where the one problem of each code's fixture sits (`None`: file-level). An exhaustive
/// match, so a new [`ProblemCode`] does not compile until its fixture line is decided.
fn fixture_problem_line(code: ProblemCode) -> Option<usize> {
    use ProblemCode::*;
    match code {
        InvalidUtf8 => Some(3),
        EmptyFile => None,
        InvalidJson => Some(2),
        DataType => Some(3),
        UnknownFormat => Some(2),
        MixedFormats => Some(3),
        MissingMessagesList => Some(2),
        MissingConversationsList => Some(3),
        MessageMissingKey => Some(3),
        MessageUnrecognizedKey => Some(2),
        UnrecognizedRole => Some(2),
        MissingContent => Some(4),
        ExampleMissingAssistantMessage => Some(2),
        InvalidWeight => Some(3),
        MissingKey => Some(3),
        UnsupportedKey => Some(2),
        DuplicateExample => Some(4),
        LongExample => Some(2),
    }
}

fn fixture_dir(code: ProblemCode) -> &'static str {
    if code.is_error() {
        "errors"
    } else {
        "warnings"
    }
}

#[test]
fn every_problem_code_has_a_fixture_that_reports_exactly_it_on_the_expected_line() {
    for &code in ProblemCode::ALL {
        let path = format!("{}/{code}.jsonl", fixture_dir(code));
        assert!(
            std::path::Path::new(&format!("{FIXTURES}/{path}")).is_file(),
            "problem code {code} has no fixture {path}"
        );
        let out = parse_jsonl(&fixture(&path), None);
        let line = fixture_problem_line(code);
        let (reported, other) = if code.is_error() {
            (&out.errors, &out.warnings)
        } else {
            (&out.warnings, &out.errors)
        };
        let got: Vec<_> = reported.iter().map(|p| (p.line, p.code)).collect();
        assert_eq!(got, [(line, code)], "{path}: {reported:?}");
        assert!(other.is_empty(), "{path}: unexpected {other:?}");
        if let Some(line) = line {
            let example_on_bad_line = out.example_lines.contains(&line);
            assert_eq!(example_on_bad_line, !code.is_error(), "{path}");
        }
    }
}

#[test]
fn every_problem_fixture_is_named_after_a_code_of_its_severity() {
    for dir in ["errors", "warnings"] {
        let entries = std::fs::read_dir(format!("{FIXTURES}/{dir}")).expect("fixture dir");
        for entry in entries {
            let name = entry.expect("dir entry").file_name();
            let name = name.to_string_lossy();
            let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
            let code = ProblemCode::ALL
                .iter()
                .find(|c| c.as_str() == stem)
                .unwrap_or_else(|| panic!("{dir}/{name} is not named after a problem code"));
            assert_eq!(fixture_dir(*code), dir, "{name} is in the wrong folder");
        }
    }
}

#[test]
fn problems_on_one_line_do_not_stop_later_lines() {
    let out = parse_jsonl(&fixture("errors/invalid_json.jsonl"), None);
    assert_eq!(out.example_lines, [1, 3]);
    assert!(!out.is_ok());
}

#[test]
fn the_invalid_utf8_error_names_the_exact_byte_offset_and_line() {
    // LC_ALL=C grep -obUaP '\xff' errors/invalid_utf8.jsonl  ->  241 (grep -naP: line 3)
    let out = parse_jsonl(&fixture("errors/invalid_utf8.jsonl"), None);
    assert_eq!(error_codes(&out), [(Some(3), ProblemCode::InvalidUtf8)]);
    let message = &out.errors[0].message;
    assert!(message.contains("offset 241"), "{message}");
    assert!(message.contains("line 3"), "{message}");
    assert!(out.examples.is_empty());
    assert_eq!(out.format, None);

    // After a BOM, offsets still count from the start of the file: 3 (BOM) + 13
    // (`{"text":"a"}` and its newline) = 16, on line 2.
    let out = parse_jsonl(b"\xEF\xBB\xBF{\"text\":\"a\"}\n\xFE\n", None);
    assert_eq!(error_codes(&out), [(Some(2), ProblemCode::InvalidUtf8)]);
    assert!(
        out.errors[0].message.contains("offset 16"),
        "{:?}",
        out.errors
    );
}

#[test]
fn a_file_with_nothing_but_a_bom_or_nothing_at_all_is_empty() {
    for bytes in [&b""[..], b"\xEF\xBB\xBF", b"\xEF\xBB\xBF\r\n  \n"] {
        let out = parse_jsonl(bytes, None);
        assert_eq!(
            error_codes(&out),
            [(None, ProblemCode::EmptyFile)],
            "{bytes:?}"
        );
    }
}

#[test]
fn problem_messages_say_what_is_wrong_and_where() {
    let message = |path: &str| {
        let out = parse_jsonl(&fixture(path), None);
        out.errors
            .iter()
            .chain(&out.warnings)
            .map(|p| p.message.clone())
            .next()
            .unwrap_or_default()
    };
    assert_eq!(
        message("errors/missing_content.jsonl"),
        "message 2 has empty content"
    );
    let json = message("errors/invalid_json.jsonl");
    assert!(json.contains("EOF while parsing"), "{json}");
    assert!(json.contains("column"), "{json}");
    let mixed = message("errors/mixed_formats.jsonl");
    assert!(
        mixed.contains("prompt-completion") && mixed.contains("openai") && mixed.contains("line 1"),
        "{mixed}"
    );
    let missing = message("errors/missing_key.jsonl");
    assert!(missing.contains("`completion`"), "{missing}");
    assert!(!missing.contains("`prompt`"), "{missing}");
    assert!(message("errors/data_type.jsonl").contains("list"));
    assert!(message("errors/message_unrecognized_key.jsonl").contains("`tone`"));
    assert!(message("errors/unrecognized_role.jsonl").contains("\"bot\""));
    assert!(message("errors/invalid_weight.jsonl").contains("weight 2"));
    assert_eq!(
        message("warnings/duplicate_example.jsonl"),
        "same example as line 1"
    );
    assert!(message("warnings/long_example.jsonl").contains("32419 characters"));
}

// ---------------------------------------------------------------- explicit format

#[test]
fn an_explicit_format_validates_every_line_against_it() {
    let out = parse_jsonl(
        &fixture("valid/prompt_completion_crlf.jsonl"),
        Some(Format::Alpaca),
    );
    assert_eq!(out.format, Some(Format::Alpaca));
    assert!(out.examples.is_empty());
    assert_eq!(
        error_codes(&out),
        [
            (Some(1), ProblemCode::MissingKey),
            (Some(2), ProblemCode::MissingKey),
            (Some(3), ProblemCode::MissingKey),
        ]
    );
    assert_eq!(
        out.errors[0].message,
        "missing keys `instruction`, `output` (required by the alpaca format)"
    );
}

#[test]
fn an_explicit_format_replaces_the_mixed_formats_check_with_its_own() {
    let out = parse_jsonl(
        &fixture("errors/mixed_formats.jsonl"),
        Some(Format::OpenAiChat),
    );
    assert_eq!(
        error_codes(&out),
        [(Some(3), ProblemCode::MissingMessagesList)]
    );
    assert_eq!(out.example_lines, [1, 2, 4]);
}

#[test]
fn an_explicit_format_matching_the_file_gives_the_same_result_as_detection() {
    let bytes = fixture("valid/sharegpt.jsonl");
    assert_eq!(
        parse_jsonl(&bytes, Some(Format::ShareGpt)),
        parse_jsonl(&bytes, None)
    );
}

// ---------------------------------------------------------------- line-level rules

fn codes_of(line: &str, format: Option<Format>) -> Vec<ProblemCode> {
    parse_jsonl(line.as_bytes(), format)
        .errors
        .iter()
        .map(|p| p.code)
        .collect()
}

#[test]
fn several_problems_on_one_line_are_reported_once_per_code() {
    let line = r#"{"messages":[{"role":"user","content":"","mood":1},{"role":"assistant","content":" ","x":2}]}"#;
    assert_eq!(
        codes_of(line, None),
        [
            ProblemCode::MessageUnrecognizedKey,
            ProblemCode::MissingContent
        ]
    );
}

#[test]
fn openai_message_shape_errors_use_the_cookbook_codes() {
    use ProblemCode::*;
    let cases: [(&str, &[ProblemCode]); 11] = [
        (r#"{"messages":"hi"}"#, &[MissingMessagesList]),
        (r#"{"messages":null}"#, &[MissingMessagesList]),
        (
            r#"{"messages":["hi",{"role":"assistant","content":"a"}]}"#,
            &[MessageMissingKey],
        ),
        (
            r#"{"messages":[{"content":"hi"},{"role":"assistant","content":"a"}]}"#,
            &[MessageMissingKey],
        ),
        (
            r#"{"messages":[{"role":"User","content":"hi"},{"role":"assistant","content":"a"}]}"#,
            &[UnrecognizedRole],
        ),
        (
            r#"{"messages":[{"role":"user","content":["hi"]},{"role":"assistant","content":"a"}]}"#,
            &[MissingContent],
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi","weight":1},{"role":"assistant","content":"a"}]}"#,
            &[InvalidWeight],
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"a","weight":"1"}]}"#,
            &[InvalidWeight],
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"a","weight":-0.1}]}"#,
            &[InvalidWeight],
        ),
        // Every assistant turn out of the loss: nothing to learn.
        (
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"a","weight":0}]}"#,
            &[ExampleMissingAssistantMessage],
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"a","weight":0},{"role":"user","content":"and?"},{"role":"assistant","content":"b"}]}"#,
            &[],
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(codes_of(line, None), expected, "{line}");
    }
}

#[test]
fn the_other_formats_report_missing_keys_and_empty_values() {
    use ProblemCode::*;
    let cases: [(&str, Option<Format>, &[ProblemCode]); 9] = [
        (r#"{"prompt":"q","completion":""}"#, None, &[MissingContent]),
        (r#"{"completion":"a"}"#, None, &[MissingKey]),
        (r#"{"prompt":1,"completion":"a"}"#, None, &[MissingContent]),
        (r#"{"body":"x"}"#, Some(Format::Text), &[MissingKey]),
        (r#"{"text":"  "}"#, None, &[MissingContent]),
        (r#"{"instruction":"q"}"#, None, &[MissingKey]),
        (
            r#"{"instruction":"q","input":3,"output":"a"}"#,
            None,
            &[MissingContent],
        ),
        (
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"tool","value":"a"}]}"#,
            None,
            &[UnrecognizedRole, ExampleMissingAssistantMessage],
        ),
        (
            r#"{"conversations":[{"from":"human"},{"from":"gpt","value":"a"}]}"#,
            None,
            &[MessageMissingKey],
        ),
    ];
    for (line, format, expected) in cases {
        assert_eq!(codes_of(line, format), expected, "{line}");
    }
}

// ---------------------------------------------------------------- hash and export

#[test]
fn the_content_hash_of_a_tiny_dataset_matches_sha256sum() {
    // printf '{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}\n{"messages":[{"role":"user","content":"2+2?"},{"role":"assistant","content":"4","weight":0.0}]}\n' | sha256sum
    let examples = [
        ex(vec![m(User, "hi"), m(Assistant, "hello")]),
        ex(vec![m(User, "2+2?"), w(Assistant, "4", 0.0)]),
    ];
    assert_eq!(
        content_hash(&examples),
        "978734de40c8630e069b106b815a619d2990a1c4ab0725eaf4f3935033abc6d5"
    );
    // printf '' | sha256sum
    assert_eq!(
        content_hash(&[]),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn exported_datasets_reimport_to_the_same_examples_and_hash() {
    for path in [
        "valid/openai.jsonl",
        "valid/prompt_completion_crlf.jsonl",
        "valid/text_bom.jsonl",
        "valid/alpaca_blank_lines.jsonl",
        "valid/sharegpt.jsonl",
    ] {
        let original = parse_ok(path, None);
        let exported = to_openai_jsonl(&original.examples);
        assert_eq!(exported.lines().count(), original.examples.len());
        assert!(exported.ends_with('\n'));
        let again = parse_jsonl(exported.as_bytes(), None);
        assert!(again.is_ok(), "{path}: {:?}", again.errors);
        assert_eq!(again.format, Some(Format::OpenAiChat));
        assert_eq!(again.examples, original.examples, "{path}");
        assert_eq!(
            content_hash(&again.examples),
            content_hash(&original.examples)
        );
        // The hash is the sha256 of the exported file itself.
        assert_eq!(
            hex::encode(Sha256::digest(exported.as_bytes())),
            content_hash(&original.examples)
        );
    }
}

#[test]
fn the_content_hash_ignores_bom_line_endings_and_blank_lines() {
    let crlf = parse_ok("valid/prompt_completion_crlf.jsonl", None);
    let lf = String::from_utf8(fixture("valid/prompt_completion_crlf.jsonl"))
        .expect("utf-8")
        .replace("\r\n", "\n\n");
    let lf = parse_jsonl(format!("\u{feff}{lf}").as_bytes(), None);
    assert!(lf.is_ok());
    assert_eq!(content_hash(&lf.examples), content_hash(&crlf.examples));
}

#[test]
fn duplicates_and_long_examples_are_kept_as_examples() {
    let out = parse_jsonl(&fixture("warnings/duplicate_example.jsonl"), None);
    assert!(out.is_ok());
    assert_eq!(out.example_lines, [1, 2, 4, 5]);
    assert_eq!(out.examples[0], out.examples[2]);
    let out = parse_jsonl(&fixture("warnings/long_example.jsonl"), None);
    assert!(out.is_ok());
    assert_eq!(out.examples.len(), 3);
    assert_eq!(out.examples[1].char_len(), 32419);
}

#[test]
fn a_missing_empty_or_wrong_turn_list_is_reported_in_the_formats_own_words() {
    // One line each: the list missing, empty, and not a list; for both chat formats.
    for (format, key, code) in [
        (
            Format::OpenAiChat,
            "messages",
            ProblemCode::MissingMessagesList,
        ),
        (
            Format::ShareGpt,
            "conversations",
            ProblemCode::MissingConversationsList,
        ),
    ] {
        let data = format!("{{\"other\": 1}}\n{{\"{key}\": []}}\n{{\"{key}\": \"hi\"}}\n");
        let out = parse_jsonl(data.as_bytes(), Some(format));
        assert_eq!(
            error_codes(&out),
            [(Some(1), code), (Some(2), code), (Some(3), code)]
        );
        let messages: Vec<&str> = out.errors.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                format!("missing key `{key}`"),
                format!("`{key}` is an empty list"),
                format!("`{key}` is not a list (found string)"),
            ]
        );
    }
}
