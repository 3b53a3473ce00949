//! The console's conversation and dataset pages, driven over HTTP against a real server
//! (a tiny random model, no network): what each form stores, what each page shows.

use loraloop::serve::{RunningServer, ServeOptions};
use loraloop_core::domain::{ChatExample, Role};
use loraloop_core::storage::{NewJob, NewMessage, Platform, StorageError};
use loraloop_core::{Config, Db};
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_DISPOSITION, CONTENT_TYPE, LOCATION};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// A started server and a logged-in client that does not follow redirects.
struct Console {
    server: RunningServer,
    client: reqwest::Client,
    base: String,
    csrf: String,
    _dir: tempfile::TempDir,
}

impl Console {
    async fn start(extra_env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("models/tiny");
        write_tiny_chat_model(&model, TinySpec::default()).unwrap();
        let mut env = BTreeMap::new();
        env.insert(
            "LORALOOP_DATA_DIR".into(),
            dir.path().join("data").display().to_string(),
        );
        env.insert("LORALOOP_MODEL".into(), model.display().to_string());
        env.insert("LORALOOP_ADMIN_PASSWORD".into(), "pw-for-tests".into());
        env.insert("LORALOOP_API_KEY".into(), "key-for-tests".into());
        for (k, v) in extra_env {
            env.insert(k.to_string(), v.to_string());
        }
        let config = Config::load_with_env(&Default::default(), &env).unwrap();
        let server = loraloop::serve::start(
            config,
            ServeOptions {
                bind: Some("127.0.0.1:0".parse().unwrap()),
                worker: false,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let client = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let base = format!("http://{}", server.addr.expect("serving HTTP"));
        let login = client
            .post(format!("{base}/login"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("username=admin&password=pw-for-tests")
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), StatusCode::SEE_OTHER);
        let home = client
            .get(format!("{base}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let csrf = between(&home, r#"<meta name="csrf-token" content=""#, "\"")
            .expect("the page carries the CSRF token")
            .to_string();
        Self {
            server,
            client,
            base,
            csrf,
            _dir: dir,
        }
    }

    fn db(&self) -> &Db {
        &self.server.state.db
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    /// POST a URL-encoded form (the CSRF token added); the status, the redirect target
    /// and the body.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> (StatusCode, String, String) {
        let mut fields = vec![("_csrf", self.csrf.as_str())];
        fields.extend_from_slice(form);
        self.post_raw(path, &encode_form(&fields)).await
    }

    async fn post_raw(&self, path: &str, body: &str) -> (StatusCode, String, String) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let location = resp
            .headers()
            .get(LOCATION)
            .map(|l| l.to_str().unwrap().to_string())
            .unwrap_or_default();
        (resp.status(), location, resp.text().await.unwrap())
    }

    /// Upload a file with the import form (CSRF token in the query, as the form does).
    async fn import(
        &self,
        name: &str,
        format: &str,
        bytes: Vec<u8>,
        csrf: bool,
    ) -> (StatusCode, String) {
        let form = reqwest::multipart::Form::new()
            .text("name", name.to_string())
            .text("format", format.to_string())
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name("upload.jsonl"),
            );
        let url = if csrf {
            format!("{}/datasets/import?_csrf={}", self.base, self.csrf)
        } else {
            format!("{}/datasets/import", self.base)
        };
        let resp = self.client.post(url).multipart(form).send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    /// A conversation on `platform` started by the user `key`, with its message ids.
    async fn conversation(
        &self,
        platform: Platform,
        key: &str,
        turns: &[(Role, &str)],
    ) -> (i64, Vec<i64>) {
        let db = self.db();
        let user = db
            .upsert_platform_user(platform, key, Some(key), None)
            .await
            .unwrap();
        let chat_key = format!("{key}-{}", db.counts().await.unwrap().conversations);
        let chat = db
            .upsert_chat(platform, &chat_key, "private", None)
            .await
            .unwrap();
        let conv = db
            .current_conversation(self.server.state.assistant.id, chat, None, Some(user.id))
            .await
            .unwrap();
        let mut ids = Vec::new();
        for (role, content) in turns {
            let m = db
                .insert_message(&NewMessage {
                    conversation_id: conv.id,
                    role: *role,
                    content,
                    user_id: (*role == Role::User).then_some(user.id),
                    platform_message_id: None,
                    adapter_id: None,
                    adapter_name: None,
                    prompt_tokens: None,
                    completion_tokens: None,
                })
                .await
                .unwrap();
            ids.push(m.id);
        }
        (conv.id, ids)
    }

    async fn exists(&self, conversation: i64) -> bool {
        let (n,): (i64,) = sqlx::query_as("select count(*) from conversations where id = ?")
            .bind(conversation)
            .fetch_one(self.db().pool())
            .await
            .unwrap();
        n == 1
    }
}

fn encode_form(fields: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

/// The ids of the rows of the `#conversations` table.
fn listed(page: &str) -> Vec<i64> {
    let table = between(page, r#"<table id="conversations">"#, "</table>").expect("the table");
    table
        .split(r#"<tr data-id=""#)
        .skip(1)
        .map(|row| row[..row.find('"').unwrap()].parse().unwrap())
        .collect()
}

#[tokio::test]
async fn conversations_are_searched_rated_corrected_excluded_and_deleted() {
    let c = Console::start(&[]).await;
    let (paris, pm) = c
        .conversation(
            Platform::Telegram,
            "ann",
            &[
                (Role::User, "Where is Paris?"),
                (Role::Assistant, "In Spain."),
            ],
        )
        .await;
    let (hello, _) = c
        .conversation(
            Platform::Discord,
            "bob",
            &[(Role::User, "hello"), (Role::Assistant, "hi <b>there</b>")],
        )
        .await;

    // Search filters narrow the list.
    let (status, page) = c.get("/conversations").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed(&page), [hello, paris]);
    assert_eq!(listed(&c.get("/conversations?q=PARIS").await.1), [paris]);
    assert_eq!(
        listed(&c.get("/conversations?platform=discord").await.1),
        [hello]
    );
    assert_eq!(listed(&c.get("/conversations?user=bo").await.1), [hello]);
    assert_eq!(
        listed(&c.get("/conversations?rating=up").await.1),
        Vec::<i64>::new()
    );
    assert_eq!(
        listed(
            &c.get("/conversations?rating=unrated&from=2000-01-01")
                .await
                .1
        ),
        [hello, paris]
    );
    assert_eq!(
        listed(&c.get("/conversations?from=2999-01-01").await.1),
        Vec::<i64>::new()
    );
    let (status, page) = c.get("/conversations?from=yesterday").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("is not a date (use YYYY-MM-DD)"), "{page}");

    // The conversation page: every turn, escaped, with the adapter that replied.
    let (status, page) = c.get(&format!("/conversations/{hello}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("hi &lt;b&gt;there&lt;/b&gt;"), "{page}");
    assert!(page.contains("base model"));

    // Rating and correcting store operator feedback; each keeps the other.
    let reply = pm[1];
    let (status, location, _) = c
        .post(&format!("/messages/{reply}/rate"), &[("rating", "-1")])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        location,
        format!("/conversations/{paris}?ok=rated#m{reply}")
    );
    let (status, _, _) = c
        .post(
            &format!("/messages/{reply}/correct"),
            &[("correction", "  In France.\r\nOn the Seine.  ")],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let fb = c.db().operator_feedback(reply).await.unwrap().unwrap();
    assert_eq!(
        (fb.rating, fb.correction.as_deref()),
        (Some(-1), Some("In France.\nOn the Seine."))
    );
    c.post(&format!("/messages/{reply}/rate"), &[("rating", "1")])
        .await;
    let fb = c.db().operator_feedback(reply).await.unwrap().unwrap();
    assert_eq!(
        (fb.rating, fb.correction.as_deref()),
        (Some(1), Some("In France.\nOn the Seine."))
    );
    let (_, page) = c.get(&format!("/conversations/{paris}?ok=rated")).await;
    assert!(page.contains("Rating saved."));
    assert!(page.contains("operator: 👍"), "{page}");
    assert!(page.contains("In France.\nOn the Seine."));
    assert_eq!(listed(&c.get("/conversations?rating=up").await.1), [paris]);
    assert_eq!(
        listed(&c.get("/conversations?rating=down").await.1),
        [0i64; 0]
    );
    // An empty correction clears it; the rating stays.
    c.post(
        &format!("/messages/{reply}/correct"),
        &[("correction", " ")],
    )
    .await;
    let fb = c.db().operator_feedback(reply).await.unwrap().unwrap();
    assert_eq!((fb.rating, fb.correction), (Some(1), None));

    // Bad input is shown on the page and changes nothing.
    let (status, _, page) = c
        .post(&format!("/messages/{reply}/rate"), &[("rating", "5")])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("rating: use 1"), "{page}");
    let (status, _, page) = c
        .post(&format!("/messages/{}/rate", pm[0]), &[("rating", "1")])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        page.contains("only assistant replies can be rated"),
        "{page}"
    );
    let (status, _, _) = c.post("/messages/999999/rate", &[("rating", "1")]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(c.get("/conversations/abc").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        c.get("/conversations/999999").await.0,
        StatusCode::NOT_FOUND
    );

    // Without the CSRF token: 403, and nothing changes.
    let (status, _, _) = c
        .post_raw(&format!("/messages/{reply}/rate"), "rating=-1")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = c
        .post_raw(&format!("/conversations/{paris}/delete"), "confirm=1")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = c
        .post_raw(
            &format!("/conversations/{paris}/exclude"),
            "_csrf=not-the-token",
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let fb = c.db().operator_feedback(reply).await.unwrap().unwrap();
    assert_eq!(fb.rating, Some(1));
    assert!(c.exists(paris).await);
    let detail = c.db().conversation_detail(paris).await.unwrap();
    assert!(!detail.summary.excluded_from_training);

    // Exclude, include again.
    let (status, location, _) = c
        .post(&format!("/conversations/{paris}/exclude"), &[])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location, format!("/conversations/{paris}?ok=excluded"));
    let detail = c.db().conversation_detail(paris).await.unwrap();
    assert!(detail.summary.excluded_from_training);
    let (_, page) = c.get(&location).await;
    assert!(page.contains("Include in training"));
    assert!(page.contains("excluded: never used in a dataset"));
    let page = c.get("/conversations").await.1;
    let row = between(&page, &format!(r#"<tr data-id="{paris}">"#), "</tr>").unwrap();
    assert!(row.contains("excluded"), "{row}");
    c.post(&format!("/conversations/{paris}/exclude"), &[])
        .await;
    let detail = c.db().conversation_detail(paris).await.unwrap();
    assert!(!detail.summary.excluded_from_training);

    // Delete: refused without the confirmation, done with it.
    let (status, _, page) = c.post(&format!("/conversations/{paris}/delete"), &[]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("Nothing was deleted"), "{page}");
    assert!(c.exists(paris).await);
    let (status, location, _) = c
        .post(
            &format!("/conversations/{paris}/delete"),
            &[("confirm", "1")],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location, "/conversations?ok=deleted");
    assert!(!c.exists(paris).await);
    assert!(matches!(c.db().operator_feedback(reply).await, Ok(None)));
    let (_, page) = c.get(&location).await;
    assert!(page.contains("The conversation was deleted."));
    assert_eq!(listed(&page), [hello]);

    c.server.stop().await.unwrap();
}

const MIXED: &str = concat!(
    r#"{"messages":[{"role":"user","content":"What is 2+2?"},{"role":"assistant","content":"4"}]}"#,
    "\n",
    r#"{"prompt":"x","completion":"y"}"#,
    "\n",
);

#[tokio::test]
async fn datasets_are_imported_previewed_exported_and_deleted() {
    let c = Console::start(&[]).await;
    let (status, page) = c.get("/datasets").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains(&format!(r#"action="/datasets/import?_csrf={}""#, c.csrf)),
        "{page}"
    );
    assert!(page.contains(r#"id="build-form""#));

    // A mixed-format file: refused whole, every problem listed by line.
    let (status, page) = c
        .import("faq", "auto", MIXED.as_bytes().to_vec(), true)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains(r#"data-outcome="error""#), "{page}");
    assert!(page.contains("line 2: mixed_formats"), "{page}");

    let bad = concat!(
        r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#,
        "\n",
        r#"{"messages":[{"role":"user","content":"only a question"}]}"#,
        "\n",
        "not json\n",
    );
    let (status, page) = c.import("faq", "openai", bad.into(), true).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let result = between(&page, r#"id="import-result""#, "</div>").unwrap();
    assert!(result.contains("2 problem(s)"), "{result}");
    assert!(
        result.contains("line 2: example_missing_assistant_message"),
        "{result}"
    );
    assert!(result.contains("line 3: invalid_json"), "{result}");
    assert!(c.db().list_datasets().await.unwrap().is_empty());

    // Without the CSRF token: 403, nothing stored.
    let good = concat!(
        r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"What is 2+2?"},{"role":"assistant","content":"4"}]}"#,
        "\n",
        r#"{"messages":[{"role":"user","content":"Capital of France?"},{"role":"assistant","content":"Paris","weight":0},{"role":"user","content":"Sure?"},{"role":"assistant","content":"Yes."}]}"#,
        "\n",
        r#"{"messages":[{"role":"user","content":"Capital of France?"},{"role":"assistant","content":"Paris","weight":0},{"role":"user","content":"Sure?"},{"role":"assistant","content":"Yes."}]}"#,
        "\n",
    );
    let (status, _) = c.import("faq", "auto", good.into(), false).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(c.db().list_datasets().await.unwrap().is_empty());

    // A valid file: created, with the duplicate reported as a warning.
    let (status, page) = c.import("faq", "auto", good.into(), true).await;
    assert_eq!(status, StatusCode::CREATED, "{page}");
    let result = between(&page, r#"id="import-result""#, "</div>").unwrap();
    assert!(result.contains(r#"data-outcome="created""#), "{result}");
    assert!(result.contains("faq version 1"), "{result}");
    assert!(result.contains("line 3: duplicate_example"), "{result}");
    let datasets = c.db().list_datasets().await.unwrap();
    assert_eq!(datasets.len(), 1);
    let faq = datasets[0].clone();
    assert_eq!(
        (faq.example_count, faq.source.as_str()),
        (3, "upload.jsonl")
    );
    let table = between(&page, r#"<table id="datasets">"#, "</table>").unwrap();
    assert!(table.contains(&faq.content_hash[..12]), "{table}");
    // The same content again: unchanged.
    let (status, page) = c.import("faq", "openai", good.into(), true).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"data-outcome="unchanged""#));
    assert_eq!(c.db().list_datasets().await.unwrap().len(), 1);

    // Export: the canonical JSONL, whose sha256 is the dataset's hash; re-importing it
    // changes nothing.
    let resp = c
        .client
        .get(format!("{}/datasets/{}/export", c.base, faq.id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "application/jsonl");
    assert_eq!(
        resp.headers()[CONTENT_DISPOSITION],
        "attachment; filename=\"faq-v1.jsonl\""
    );
    let exported = resp.bytes().await.unwrap().to_vec();
    assert_eq!(hex::encode(Sha256::digest(&exported)), faq.content_hash);
    let lines: Vec<ChatExample> = std::str::from_utf8(&exported)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let stored: Vec<ChatExample> = c
        .db()
        .dataset_examples(faq.id)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.example)
        .collect();
    assert_eq!(lines, stored);
    assert_eq!(lines[1].messages[1].weight, Some(0.0));
    let (status, page) = c.import("faq", "auto", exported, true).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"data-outcome="unchanged""#));

    // Preview: role counts and token counts from the served model's template.
    let (status, page) = c.get(&format!("/datasets/{}", faq.id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("1 system · 5 user · 5 assistant"), "{page}");
    let model = c.server.state.engine.model();
    let expected: Vec<usize> = stored
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            loraloop_trainer::tokenize::tokenize_example(
                ex,
                i,
                &model.tokenizer,
                &model.template,
                false,
            )
            .unwrap()
            .tokens
            .len()
        })
        .collect();
    let shown: Vec<usize> = page
        .split(r#"<span class="tokens" data-tokens=""#)
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].parse().unwrap())
        .collect();
    assert_eq!(shown, expected);
    let total: usize = expected.iter().sum();
    assert!(total > 0);
    assert!(
        page.contains(&format!(r#"id="total-tokens" data-tokens="{total}""#)),
        "{page}"
    );
    assert!(page.contains("weight 0: not trained on"));

    // Delete: refused while a training job uses the dataset, with a clear message.
    let job = c
        .db()
        .create_job(&NewJob {
            assistant_id: None,
            dataset_id: faq.id,
            base_model: "tiny",
            method: "lora",
            hyperparameters: &serde_json::json!({}),
        })
        .await
        .unwrap();
    let (status, _, page) = c
        .post(&format!("/datasets/{}/delete", faq.id), &[("confirm", "1")])
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        page.contains(&format!(
            "faq version 1 cannot be deleted: training job #{} used it",
            job.id
        )),
        "{page}"
    );
    assert_eq!(c.db().dataset_by_id(faq.id).await.unwrap(), faq);

    // A dataset no job uses: needs the confirmation, then goes.
    let (status, _) = c
        .import(
            "other",
            "prompt-completion",
            br#"{"prompt":"x","completion":"y"}"#.to_vec(),
            true,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let other = c.db().dataset("other", None).await.unwrap();
    let (status, _, page) = c.post(&format!("/datasets/{}/delete", other.id), &[]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("was not deleted"), "{page}");
    assert!(c.db().dataset_by_id(other.id).await.is_ok());
    let (status, location, _) = c
        .post(
            &format!("/datasets/{}/delete", other.id),
            &[("confirm", "1")],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location, "/datasets?ok=dataset-deleted");
    assert!(matches!(
        c.db().dataset_by_id(other.id).await,
        Err(StorageError::NotFound { .. })
    ));
    assert_eq!(
        c.get(&format!("/datasets/{}", other.id)).await.0,
        StatusCode::NOT_FOUND
    );

    c.server.stop().await.unwrap();
}

#[tokio::test]
async fn the_build_form_makes_a_dataset_from_rated_and_corrected_conversations() {
    let c = Console::start(&[]).await;
    let system = c.server.state.assistant.system_prompt.clone();
    assert!(!system.trim().is_empty());
    let db = c.db().clone();
    let (liked, m1) = c
        .conversation(
            Platform::Telegram,
            "ann",
            &[(Role::User, "2+2?"), (Role::Assistant, "4")],
        )
        .await;
    db.set_feedback(m1[1], "telegram:ann", None, Some(1), None)
        .await
        .unwrap();
    let (fixed, m2) = c
        .conversation(
            Platform::Telegram,
            "ann",
            &[(Role::User, "3+3?"), (Role::Assistant, "7")],
        )
        .await;
    db.set_feedback(m2[1], "telegram:ann", None, Some(-1), None)
        .await
        .unwrap();
    db.set_operator_correction(m2[1], Some("6")).await.unwrap();
    let (disliked, m3) = c
        .conversation(
            Platform::Discord,
            "bob",
            &[(Role::User, "capital of Peru?"), (Role::Assistant, "Quito")],
        )
        .await;
    db.set_feedback(m3[1], "discord:bob", None, Some(-1), None)
        .await
        .unwrap();
    let (excluded, _) = c
        .conversation(
            Platform::Telegram,
            "ann",
            &[(Role::User, "secret"), (Role::Assistant, "ok")],
        )
        .await;
    db.toggle_conversation_excluded(excluded).await.unwrap();

    let (status, location, _) = c
        .post(
            "/datasets/build",
            &[
                ("name", "from-chats"),
                ("platform", "any"),
                ("from", ""),
                ("to", ""),
                ("include_corrections", "1"),
                ("exclude_downvoted", "1"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let built = db.dataset("from-chats", None).await.unwrap();
    assert_eq!(location, format!("/datasets/{}?ok=built", built.id));
    assert_eq!(built.format, "conversations");
    let source: serde_json::Value = serde_json::from_str(&built.source).unwrap();
    assert_eq!(
        source,
        serde_json::json!({
            "platform": null, "from": null, "to": null, "only_upvoted": false,
            "include_corrections": true, "exclude_downvoted": true
        })
    );
    let examples = db.dataset_examples(built.id).await.unwrap();
    type Turns = Vec<(Role, String, Option<f64>)>;
    let got: Vec<(Option<i64>, Turns)> = examples
        .iter()
        .map(|s| {
            (
                s.source_conversation_id,
                s.example
                    .messages
                    .iter()
                    .map(|m| (m.role, m.content.clone(), m.weight))
                    .collect(),
            )
        })
        .collect();
    let sys = (Role::System, system.clone(), None);
    assert_eq!(
        got,
        [
            (
                Some(liked),
                vec![
                    sys.clone(),
                    (Role::User, "2+2?".into(), None),
                    (Role::Assistant, "4".into(), None)
                ]
            ),
            (
                Some(fixed),
                vec![
                    sys.clone(),
                    (Role::User, "3+3?".into(), None),
                    (Role::Assistant, "6".into(), None)
                ]
            ),
        ],
        "the 👎 reply without a correction leaves nothing to train on in {disliked}"
    );
    let all: Vec<ChatExample> = examples.into_iter().map(|s| s.example).collect();
    assert_eq!(
        built.content_hash,
        loraloop_trainer::dataset::content_hash(&all)
    );
    let (_, page) = c.get(&location).await;
    assert!(page.contains("Dataset built from the conversations."));
    assert!(page.contains(&format!(r#"href="/conversations/{fixed}""#)));

    // The same settings again: nothing new.
    let (status, location, _) = c
        .post(
            "/datasets/build",
            &[
                ("name", "from-chats"),
                ("include_corrections", "on"),
                ("exclude_downvoted", "on"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location, format!("/datasets/{}?ok=unchanged", built.id));

    // Only 👍 without corrections: just the liked conversation.
    let (status, _, _) = c
        .post(
            "/datasets/build",
            &[("name", "liked"), ("only_upvoted", "1")],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let liked_ds = db.dataset("liked", None).await.unwrap();
    let ex = db.dataset_examples(liked_ds.id).await.unwrap();
    assert_eq!(
        ex.iter()
            .map(|e| e.source_conversation_id)
            .collect::<Vec<_>>(),
        [Some(liked)]
    );

    // Conversations with a 👍 somewhere (the rating filter), all their replies trained on.
    let (status, _, _) = c
        .post("/datasets/build", &[("name", "rated-up"), ("rating", "up")])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let up = db.dataset("rated-up", None).await.unwrap();
    let ex = db.dataset_examples(up.id).await.unwrap();
    assert_eq!(
        ex.iter()
            .map(|e| e.source_conversation_id)
            .collect::<Vec<_>>(),
        [Some(liked)]
    );

    // Nothing matches: said on the page, nothing stored.
    let before = db.list_datasets().await.unwrap().len();
    let (status, _, page) = c
        .post(
            "/datasets/build",
            &[
                ("name", "peru"),
                ("platform", "discord"),
                ("exclude_downvoted", "1"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = between(&page, r#"id="build-error">"#, "</p>").unwrap();
    assert!(error.contains("nothing was stored"), "{error}");
    assert!(
        page.contains(r#"<option value="discord" selected>"#),
        "the form keeps its values: {page}"
    );
    let (status, _, page) = c
        .post(
            "/datasets/build",
            &[("name", "x"), ("from", "2026-05-01"), ("to", "2026-04-01")],
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("is after to"), "{page}");
    let (status, _, page) = c.post("/datasets/build", &[("name", "bad name")]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("invalid dataset name"), "{page}");
    let (status, _, page) = c
        .post("/datasets/build", &[("name", "x"), ("adapter", "nope")])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("no adapter is named"), "{page}");
    assert_eq!(db.list_datasets().await.unwrap().len(), before);

    // Deleting a conversation a dataset was built from leaves the dataset as it was.
    let (status, _, _) = c
        .post(
            &format!("/conversations/{fixed}/delete"),
            &[("confirm", "1")],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let after = db.dataset_examples(built.id).await.unwrap();
    assert_eq!(
        after.iter().map(|e| &e.example).collect::<Vec<_>>(),
        all.iter().collect::<Vec<_>>()
    );
    assert_eq!(
        after
            .iter()
            .map(|e| e.source_conversation_id)
            .collect::<Vec<_>>(),
        [Some(liked), None]
    );

    c.server.stop().await.unwrap();
}

#[tokio::test]
async fn an_upload_over_the_limit_shows_the_413_message() {
    let c = Console::start(&[("LORALOOP_SERVER__MAX_UPLOAD_MB", "1")]).await;
    let line = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#;
    let big = format!("{line}\n").repeat(2 * 1024 * 1024 / line.len());
    let (status, page) = c.import("big", "auto", big.into_bytes(), true).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{page}");
    assert!(page.contains("over the limit of 1 MB"), "{page}");
    assert!(c.db().list_datasets().await.unwrap().is_empty());
    c.server.stop().await.unwrap();
}

#[tokio::test]
async fn preference_datasets_are_built_imported_previewed_exported_and_offered_to_jobs() {
    let c = Console::start(&[]).await;
    let db = c.db().clone();
    let (_, m) = c
        .conversation(
            Platform::Telegram,
            "ann",
            &[(Role::User, "3+3?"), (Role::Assistant, "7")],
        )
        .await;
    db.set_feedback(m[1], "telegram:ann", None, Some(-1), None)
        .await
        .unwrap();
    db.set_operator_correction(m[1], Some("6")).await.unwrap();

    // The build form writes DPO pairs: the correction preferred over the reply.
    let (status, location, _) = c
        .post(
            "/datasets/build",
            &[("name", "pairs"), ("kind", "dpo"), ("platform", "any")],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let pairs = db.dataset("pairs", None).await.unwrap();
    assert_eq!(location, format!("/datasets/{}?ok=built", pairs.id));
    assert_eq!((pairs.kind.as_str(), pairs.example_count), ("dpo", 1));
    let (status, page) = c.get(&format!("/datasets/{}", pairs.id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"id="dataset-kind">dpo<"#), "{page}");
    let preferred = between(&page, "<strong>preferred</strong></div>", "</div>").unwrap();
    let rejected = between(&page, "<strong>not preferred</strong></div>", "</div>").unwrap();
    assert_eq!((preferred, rejected), ("6", "7"));
    // Export writes the stored OpenAI preference lines.
    let (status, body) = c.get(&format!("/datasets/{}/export", pairs.id)).await;
    assert_eq!(status, StatusCode::OK);
    let line: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(line["preferred_output"][0]["content"], "6");
    assert_eq!(line["non_preferred_output"][0]["content"], "7");
    assert_eq!(
        line["input"]["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["content"],
        "3+3?"
    );

    // A KTO file is recognized by its keys and stored as KTO rows.
    let kto = "{\"prompt\": \"Hi\", \"completion\": \"Hello!\", \"label\": true}\n{\"prompt\": \"Hi\", \"completion\": \"Go away.\", \"label\": false}\n";
    let (status, page) = c
        .import("rated", "auto", kto.as_bytes().to_vec(), true)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{page}");
    let rated = db.dataset("rated", None).await.unwrap();
    assert_eq!(
        (
            rated.kind.as_str(),
            rated.format.as_str(),
            rated.example_count
        ),
        ("kto", "kto", 2)
    );
    let (_, page) = c.get(&format!("/datasets/{}", rated.id)).await;
    assert_eq!(page.matches(r#"data-label="false""#).count(), 1, "{page}");
    assert!(page.contains("Go away."), "{page}");
    // A file named dpo with a bad row is refused whole, with the row's line and code.
    let bad = "{\"input\": {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}, \"preferred_output\": [{\"role\": \"assistant\", \"content\": \"Same\"}], \"non_preferred_output\": [{\"role\": \"assistant\", \"content\": \"Same\"}]}\n";
    let (status, page) = c.import("bad", "dpo", bad.as_bytes().to_vec(), true).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    assert!(
        page.contains("line 1") && page.contains("identical_outputs"),
        "{page}"
    );
    assert!(matches!(
        db.dataset("bad", None).await,
        Err(StorageError::NotFound { .. })
    ));

    // The list says what each dataset holds; the job form offers them by kind.
    let (_, list) = c.get("/datasets").await;
    assert!(
        list.contains(
            r#"title="preference pairs: a preferred and a non-preferred reply (DPO)">dpo<"#
        ),
        "{list}"
    );
    let (_, form) = c.get("/jobs/new").await;
    assert!(form.contains("pairs v1 (1 DPO pairs)"), "{form}");
    assert!(form.contains("rated v1 (2 KTO rows)"), "{form}");
}
