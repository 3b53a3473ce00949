//! The official `openai` Python client against the OpenAI-compatible endpoint (CI
//! installs it with pip; see .ci/run). Streaming and non-streaming, model listing and
//! retrieval, the client's error type for a bad request, and a second turn that resends
//! the first reply as the client returned it.

use crate::support::{KEY, start};

const SCRIPT: &str = r#"
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2])
out = {}
out["models"] = [m.id for m in client.models.list().data]
out["retrieved"] = client.models.retrieve("base").id
try:
    client.models.retrieve("no-such-model")
except openai.NotFoundError as e:
    out["retrieve_missing"] = e.status_code
r = client.chat.completions.create(model="loraloop", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0)
out["text"] = r.choices[0].message.content
out["finish"] = r.choices[0].finish_reason
out["usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]
out["fingerprint"] = r.system_fingerprint
pieces = []
for chunk in client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        out["stream_usage"] = chunk.usage.completion_tokens
out["streamed"] = "".join(pieces)
# The usual multi-turn loop: the reply goes back as the client hands it out (model_dump()
# carries refusal, annotations, audio, function_call and tool_calls as null), with the
# neutral values of parameters this server does not implement.
history = [{"role": "user", "content": "Hello there"}, r.choices[0].message.model_dump(), {"role": "user", "content": "And then?"}]
r2 = client.chat.completions.create(model="loraloop", messages=history, max_tokens=4, temperature=0, response_format={"type": "text"}, tool_choice="none", parallel_tool_calls=False, logit_bias={}, store=False, metadata={"run": "test"}, safety_identifier="u-1")
out["second_turn"] = r2.usage.prompt_tokens > r.usage.prompt_tokens and r2.usage.completion_tokens == 4
try:
    client.chat.completions.create(model="loraloop", messages=history, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
except openai.UnprocessableEntityError as e:
    out["tools"] = e.body["param"]
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
except openai.NotFoundError as e:
    out["not_found"] = e.status_code
    out["not_found_type"] = e.type
bad = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="wrong")
try:
    bad.models.list()
except openai.AuthenticationError as e:
    out["unauthorized"] = e.status_code
    out["unauthorized_type"] = e.type
print(json.dumps(out))
"#;

#[tokio::test]
async fn the_official_openai_python_client_talks_to_the_assistant() {
    let check = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    assert!(
        check.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs python3 with the `openai` package: pip install 'openai>=1,<2' (.ci/run does)"
    );
    let s = start(false, &[]).await;
    let base = s.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", SCRIPT, &base, KEY])
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
    assert_eq!(v["models"], serde_json::json!(["loraloop", "base"]));
    assert_eq!(v["retrieved"], "base", "{v}");
    assert_eq!(v["retrieve_missing"], 404, "{v}");
    assert_eq!(v["finish"], "length", "{v}");
    assert_eq!(v["usage"][1], 8);
    assert_eq!(v["fingerprint"], "base");
    assert_eq!(v["stream_usage"], 8);
    // Greedy on the same model: streamed and whole replies are the same text.
    assert_eq!(v["streamed"], v["text"]);
    assert!(!v["text"].as_str().unwrap().is_empty());
    assert_eq!(v["second_turn"], true, "{v}");
    assert_eq!(v["tools"], "tools", "{v}");
    assert_eq!(v["not_found"], 404);
    assert_eq!(v["unauthorized"], 401);
    // The client reads the error's class from the body's `type`.
    assert_eq!(v["not_found_type"], "invalid_request_error", "{v}");
    assert_eq!(v["unauthorized_type"], "authentication_error", "{v}");
    s.stop().await;
}
