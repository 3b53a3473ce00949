//! A fake Telegram Bot API server (axum on 127.0.0.1): it queues updates for
//! `getUpdates`, records every call with the time it came, answers `sendMessage` and
//! edits like Telegram, and can refuse calls or leave them hanging on demand.
#![allow(dead_code)]

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "123456:secret-test-token";
pub const BOT_ID: i64 = 4242;

#[derive(Default)]
pub struct Fake {
    /// Updates waiting for getUpdates.
    pub queue: VecDeque<Value>,
    pub next_update: i64,
    pub next_message: i64,
    /// Every call: (method in lower case, params).
    pub calls: Vec<(String, Value)>,
    /// When each of `calls` came.
    pub call_times: Vec<Instant>,
    /// Indexes into `calls` by `chat_id`.
    pub by_chat: HashMap<i64, Vec<usize>>,
    /// Answers to force on upcoming calls of a method: (status, body).
    pub inject: HashMap<String, VecDeque<(u16, Value)>>,
    /// The highest offset the bot confirmed.
    pub confirmed: i64,
    /// After this many sendMessage/edit calls, record each call and never answer it: the
    /// reply reached Telegram but the bot never hears back (the moment a kill can make a
    /// duplicate).
    pub hang_after: Option<usize>,
    pub hung: usize,
    /// The bot it serves: its token and user id (None: [`TOKEN`] and [`BOT_ID`]).
    pub bot: Option<(String, i64)>,
}

impl Fake {
    fn record(&mut self, method: String, params: Value) {
        if let Some(chat) = params["chat_id"].as_i64() {
            self.by_chat.entry(chat).or_default().push(self.calls.len());
        }
        self.calls.push((method, params));
        self.call_times.push(Instant::now());
    }
}

#[derive(Clone, Default)]
pub struct FakeTelegram(pub Arc<Mutex<Fake>>, Arc<tokio::sync::Notify>);

impl FakeTelegram {
    pub fn user(id: i64) -> Value {
        json!({"id": id, "is_bot": false, "first_name": format!("User{id}"), "username": format!("user{id}")})
    }

    /// `user` pressing a button with `data` on a bot message in private chat `chat` (as
    /// Telegram sends it: with the message the button is on).
    pub fn press(&self, id: &str, user: i64, chat: i64, data: &str) -> i64 {
        self.push(
            "callback_query",
            json!({"id": id, "from": Self::user(user), "chat_instance": "x", "data": data,
                   "message": {"message_id": 1, "date": 1, "text": "a reply",
                               "chat": {"id": chat, "type": "private", "first_name": "U"}}}),
        )
    }

    pub fn push(&self, kind: &str, body: Value) -> i64 {
        let mut f = self.0.lock().unwrap();
        f.next_update += 1;
        let id = f.next_update;
        let mut u = json!({"update_id": id});
        u[kind] = body;
        f.queue.push_back(u);
        // A waiting getUpdates answers at once, as Telegram's long polling does.
        self.1.notify_waiters();
        id
    }

    /// A private text message from `user`; its message id.
    pub fn text(&self, user: i64, text: &str) -> i64 {
        let mid = self.new_message_id();
        self.push("message", json!({"message_id": mid, "date": 1, "chat": {"id": user, "type": "private", "first_name": "U"}, "from": Self::user(user), "text": text}));
        mid
    }

    pub fn new_message_id(&self) -> i64 {
        let mut f = self.0.lock().unwrap();
        f.next_message += 1;
        f.next_message
    }

    pub fn calls(&self, method: &str) -> Vec<Value> {
        self.0
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|(m, _)| m == method)
            .map(|(_, p)| p.clone())
            .collect()
    }

    pub fn inject(&self, method: &str, status: u16, body: Value) {
        self.0
            .lock()
            .unwrap()
            .inject
            .entry(method.to_string())
            .or_default()
            .push_back((status, body));
    }

    /// Sent or edited texts per chat, the last text of each bot message.
    pub fn final_texts(&self, chat: i64) -> Vec<String> {
        let f = self.0.lock().unwrap();
        let mut order: Vec<i64> = Vec::new();
        let mut texts: HashMap<i64, String> = HashMap::new();
        for (m, p) in &f.calls {
            if p["chat_id"].as_i64() != Some(chat) {
                continue;
            }
            if let Some(id) = p["_message_id"].as_i64() {
                if m == "sendmessage" {
                    order.push(id);
                }
                if m == "sendmessage" || m == "editmessagetext" {
                    texts.insert(id, p["text"].as_str().unwrap_or("").to_string());
                }
            }
        }
        order.iter().map(|id| texts[id].clone()).collect()
    }
}

/// The call's parameters: a JSON body, or a multipart form (teloxide sends methods that
/// can carry a file, like setWebhook, as multipart) whose JSON-looking fields are parsed.
async fn params_of(req: axum::extract::Request) -> Value {
    use axum::extract::FromRequest;
    let multipart = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("multipart/form-data"));
    if multipart {
        let mut form = axum::extract::Multipart::from_request(req, &())
            .await
            .unwrap();
        let mut params = json!({});
        while let Some(field) = form.next_field().await.unwrap() {
            let name = field.name().unwrap_or("").to_string();
            let text = field.text().await.unwrap();
            params[name] = serde_json::from_str(&text).unwrap_or(Value::String(text));
        }
        return params;
    }
    let bytes = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap_or(json!({}))
}

async fn handle(
    State(fake): State<FakeTelegram>,
    Path((token, method)): Path<(String, String)>,
    req: axum::extract::Request,
) -> (axum::http::StatusCode, Json<Value>) {
    let (want, bot_id) = fake
        .0
        .lock()
        .unwrap()
        .bot
        .clone()
        .unwrap_or((TOKEN.to_string(), BOT_ID));
    assert_eq!(token, format!("bot{want}"));
    let method = method.to_lowercase();
    let mut params = params_of(req).await;
    let forced = fake
        .0
        .lock()
        .unwrap()
        .inject
        .get_mut(&method)
        .and_then(|q| q.pop_front());
    if let Some((status, body)) = forced {
        fake.0
            .lock()
            .unwrap()
            .record(format!("{method}:refused"), params);
        return (
            axum::http::StatusCode::from_u16(status).unwrap(),
            Json(body),
        );
    }
    let ok = |v: Value| {
        (
            axum::http::StatusCode::OK,
            Json(json!({"ok": true, "result": v})),
        )
    };
    match method.as_str() {
        "getupdates" => {
            let offset = params["offset"].as_i64().unwrap_or(0);
            let timeout = params["timeout"].as_u64().unwrap_or(0).min(1);
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                {
                    let mut f = fake.0.lock().unwrap();
                    f.confirmed = f.confirmed.max(offset);
                    // Confirmed updates are gone, as on Telegram.
                    f.queue
                        .retain(|u| u["update_id"].as_i64().unwrap() >= offset);
                    if !f.queue.is_empty() {
                        let batch: Vec<Value> = f.queue.iter().take(100).cloned().collect();
                        return ok(Value::Array(batch));
                    }
                }
                if std::time::Instant::now() >= deadline {
                    return ok(json!([]));
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), fake.1.notified()).await;
            }
        }
        "getme" => ok(
            json!({"id": bot_id, "is_bot": true, "first_name": "loraloop", "username": "loraloop_bot",
                             "can_join_groups": true, "can_read_all_group_messages": false, "supports_inline_queries": false, "has_main_web_app": false}),
        ),
        "sendmessage" | "editmessagetext" | "editmessagereplymarkup" => {
            let hang = {
                let mut f = fake.0.lock().unwrap();
                let sent = f
                    .calls
                    .iter()
                    .filter(|(m, _)| m.starts_with("sendmessage") || m.starts_with("edit"))
                    .count();
                let hang = f.hang_after.is_some_and(|n| sent >= n);
                if hang {
                    f.hung += 1;
                }
                hang
            };
            let chat = params["chat_id"].as_i64().unwrap();
            let id = match params["message_id"].as_i64() {
                Some(id) => id,
                None => fake.new_message_id(),
            };
            params["_message_id"] = json!(id);
            // The bot never hears of this call: a send it cannot know succeeded.
            params["_hung"] = json!(hang);
            let text = params["text"].clone();
            fake.0.lock().unwrap().record(method, params);
            if hang {
                std::future::pending::<()>().await;
            }
            ok(
                json!({"message_id": id, "date": 1, "chat": {"id": chat, "type": "private", "first_name": "U"},
                      "from": {"id": bot_id, "is_bot": true, "first_name": "loraloop", "username": "loraloop_bot"},
                      "text": text.as_str().unwrap_or("")}),
            )
        }
        _ => {
            fake.0.lock().unwrap().record(method, params);
            ok(json!(true))
        }
    }
}

pub async fn fake_telegram() -> (FakeTelegram, String) {
    fake_telegram_for(TOKEN, BOT_ID).await
}

/// A fake Telegram for the bot with this token and user id.
pub async fn fake_telegram_for(token: &str, bot_id: i64) -> (FakeTelegram, String) {
    let fake = FakeTelegram::default();
    fake.0.lock().unwrap().bot = Some((token.to_string(), bot_id));
    let app = Router::new()
        .route("/{token}/{method}", post(handle))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, url)
}

/// Replies are the messages with rating buttons (the final form of each reply).
/// The bot messages created in `chat` (distinct messages, however often edited), and how
/// many of them were created by a call whose answer the bot never got.
pub fn bot_messages(fake: &FakeTelegram, chat: i64) -> (usize, usize) {
    let sends: Vec<Value> = fake
        .calls("sendmessage")
        .into_iter()
        .filter(|p| p["chat_id"].as_i64() == Some(chat))
        .collect();
    let unheard = sends.iter().filter(|p| p["_hung"] == true).count();
    (sends.len(), unheard)
}

pub fn rated_replies(fake: &FakeTelegram, chat: i64) -> usize {
    fake.calls("editmessagetext")
        .iter()
        .chain(fake.calls("sendmessage").iter())
        .chain(fake.calls("editmessagereplymarkup").iter())
        .filter(|p| {
            p["chat_id"].as_i64() == Some(chat)
                && p["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("rate:"))
        })
        .count()
}
