//! A fake Discord on 127.0.0.1 for the bot's tests and load runs: the gateway (WebSocket:
//! HELLO, IDENTIFY, READY, heartbeats with ACK, dispatches with increasing `s`, RESUME with
//! a replay of what the session missed, then RESUMED) and the REST API under `/api/v10`
//! (messages, edits, typing, reactions, threads, roles, slash-command registration,
//! interaction callbacks).
//!
//! Tests act as users ([`FakeDiscord::dm`], [`FakeDiscord::guild_message`],
//! [`FakeDiscord::react`], [`FakeDiscord::command`], [`FakeDiscord::button`]) and read
//! what the bot did ([`FakeDiscord::sent`] with creation and edit times, [`FakeDiscord::calls`]).
//! [`FakeDiscord::disconnect`] closes the gateway connection; events dispatched until the
//! bot resumes are replayed to it, as Discord does.
//!
//! Like Discord: a thread started from a message has the message's id, and a second one on
//! it is refused (400, code 160004); a message sent with `enforce_nonce` and a nonce seen
//! in the last minutes returns the earlier message; the bot's own reactions come back as
//! MESSAGE_REACTION_ADD events; an interaction's first answer later than 3 s is refused
//! (404, code 10062), and deferred answers are edited under `/webhooks/.../@original`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub const BOT_ID: u64 = 990_000_000_000_000_001;
pub const APP_ID: u64 = 990_000_000_000_000_002;
pub const BOT_NAME: &str = "loraloop";
/// The heartbeat interval the fake asks for (short, so heartbeats happen in tests).
pub const HEARTBEAT_MS: u64 = 1500;
const TIMESTAMP: &str = "2025-01-01T00:00:00.000000+00:00";

/// One REST call the bot made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// The path after `/api/v10`, e.g. `/channels/5/messages`.
    pub path: String,
    pub body: Value,
    pub at: Instant,
    /// The status the fake answered.
    pub status: u16,
}

/// A message the bot created, with every later edit.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: u64,
    pub channel: u64,
    pub created: Instant,
    /// The content as created, then after each edit: (when, content).
    pub versions: Vec<(Instant, String)>,
    /// Emoji the bot put on it.
    pub reactions: Vec<String>,
    pub body: Value,
}

impl Sent {
    pub fn text(&self) -> &str {
        &self.versions.last().expect("created with a version").1
    }
}

/// The gateway's state of one bot session.
#[derive(Default)]
struct Gateway {
    seq: u64,
    /// Every dispatch with its `s`, to replay on RESUME.
    log: Vec<(u64, Value)>,
    /// The highest `s` written to any connection.
    sent_upto: u64,
    /// Whether a session was ever identified.
    identified_before: bool,
    session_id: Option<String>,
    /// The live connection (id, sender) once it is identified or resumed.
    live: Option<(u64, mpsc::UnboundedSender<Ws>)>,
    /// Every connection's sender, by id.
    conns: HashMap<u64, mpsc::UnboundedSender<Ws>>,
    next_conn: u64,
    /// The URL path (with query) of each connection.
    paths: Vec<String>,
    identifies: Vec<Value>,
    resumes: Vec<Value>,
    heartbeats: usize,
    /// On the next RESUME, also replay this many events the session had already seen
    /// (a redelivery).
    replay_extra: usize,
}

/// The injected status of a call that is never answered.
const HANG: u16 = 0;

#[derive(Default)]
struct Inner {
    gw: Gateway,
    calls: Vec<Call>,
    sent: Vec<Sent>,
    next_id: u64,
    /// Answers to force on upcoming calls: (method, path fragment, status, body, whether
    /// the call takes effect all the same, as a 5xx after the work was done).
    inject: VecDeque<(String, String, u16, Value, bool)>,
    /// Roles per guild: (role id, name).
    roles: HashMap<u64, Vec<(u64, String)>>,
    /// Threads created by the bot: thread id -> parent channel.
    threads: HashMap<u64, u64>,
    /// When set, calls that create or edit messages wait this long before answering.
    rest_delay: Option<Duration>,
    /// When set, fetching a server's roles waits this long.
    roles_delay: Option<Duration>,
    history_delay: Option<Duration>,
    /// Message nonces sent with `enforce_nonce`: (channel, nonce) -> (message id, when).
    nonces: HashMap<(u64, String), (u64, Instant)>,
    /// When each interaction was dispatched: Discord takes its first answer within 3 s.
    interactions: HashMap<u64, Instant>,
    /// IDENTIFY with the MESSAGE_CONTENT intent is refused with 4014 (the intent is not
    /// switched on in the developer portal).
    message_content_disallowed: bool,
    /// On the next thread creation, before answering it, this user writes this in the new
    /// thread (a quick follow-up); the message ids written so.
    follow_up: Option<(u64, String)>,
    follow_ups: Vec<u64>,
    /// Every message in each channel (users' and the bot's), for `GET .../messages`.
    history: HashMap<u64, Vec<Value>>,
}

#[derive(Clone)]
pub struct FakeDiscord {
    inner: Arc<Mutex<Inner>>,
    token: String,
    /// Base URL of the REST API (what `discord.api_url` is set to).
    pub api_url: String,
    /// The gateway's `ws://` URL.
    pub gateway_url: String,
}

pub fn user_json(id: u64) -> Value {
    json!({"id": id.to_string(), "username": format!("user{id}"), "global_name": format!("User {id}"),
           "discriminator": "0", "avatar": null, "bot": false})
}

fn bot_user() -> Value {
    json!({"id": BOT_ID.to_string(), "username": BOT_NAME, "global_name": null, "discriminator": "0",
           "avatar": null, "bot": true})
}

fn message_json(
    id: u64,
    channel: u64,
    guild: Option<u64>,
    author: Value,
    content: &str,
    mentions: Vec<Value>,
    referenced: Option<Value>,
) -> Value {
    let mut m = json!({
        "id": id.to_string(), "channel_id": channel.to_string(), "author": author, "content": content,
        "timestamp": TIMESTAMP, "edited_timestamp": null, "tts": false, "mention_everyone": false,
        "mentions": mentions, "mention_roles": [], "attachments": [], "embeds": [], "pinned": false,
        "type": if referenced.is_some() { 19 } else { 0 }, "flags": 0,
    });
    if let Some(g) = guild {
        m["guild_id"] = json!(g.to_string());
    }
    if let Some(r) = referenced {
        m["message_reference"] = json!({"message_id": r["id"], "channel_id": r["channel_id"]});
        m["referenced_message"] = r;
    }
    m
}

fn member_json(user: u64, roles: &[u64]) -> Value {
    json!({"user": user_json(user), "roles": roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
           "joined_at": TIMESTAMP, "deaf": false, "mute": false, "flags": 0, "nick": null})
}

impl FakeDiscord {
    /// Start the REST API and the gateway on 127.0.0.1; `token` is the bot token both check.
    pub async fn start(token: &str) -> FakeDiscord {
        let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeDiscord {
            inner: Arc::new(Mutex::new(Inner {
                next_id: 1_100_000_000_000_000_000,
                ..Default::default()
            })),
            token: token.to_string(),
            api_url: format!("http://{}", rest.local_addr().unwrap()),
            gateway_url: format!("ws://{}", ws.local_addr().unwrap()),
        };
        let app = axum::Router::new()
            .fallback(rest_call)
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(rest, app).await.unwrap() });
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = ws.accept().await else {
                    continue;
                };
                tokio::spawn(f.clone().gateway_connection(stream));
            }
        });
        fake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new snowflake (increasing, all of the same length).
    pub fn new_id(&self) -> u64 {
        let mut i = self.lock();
        i.next_id += 1;
        i.next_id
    }

    /// The direct-message channel of a user.
    pub fn dm_channel(user: u64) -> u64 {
        800_000_000_000_000_000 + user
    }

    // ---- acting as users ----

    /// Dispatch a gateway event (`t`, `d`): sent now on a live connection, otherwise kept
    /// for the next RESUME (or, before the first READY, sent after it).
    pub fn dispatch(&self, t: &str, d: Value) -> u64 {
        let mut i = self.lock();
        if t == "MESSAGE_CREATE"
            && let Some(ch) = d["channel_id"].as_str().and_then(|c| c.parse::<u64>().ok())
        {
            i.history.entry(ch).or_default().push(d.clone());
        }
        let gw = &mut i.gw;
        gw.seq += 1;
        let frame = json!({"op": 0, "t": t, "s": gw.seq, "d": d});
        gw.log.push((gw.seq, frame.clone()));
        if let Some((_, tx)) = &gw.live
            && tx.send(Ws::Text(frame.to_string())).is_ok()
        {
            gw.sent_upto = gw.seq;
        }
        gw.seq
    }

    /// A direct message from `user`; its message id.
    pub fn dm(&self, user: u64, text: &str) -> u64 {
        let id = self.new_id();
        let m = message_json(
            id,
            Self::dm_channel(user),
            None,
            user_json(user),
            text,
            vec![],
            None,
        );
        self.dispatch("MESSAGE_CREATE", m);
        id
    }

    /// A message in a server channel (or thread); `mention` puts `<@bot>` in front of the
    /// text; `reply_to` makes it a reply to a message the bot sent.
    pub fn guild_message(
        &self,
        guild: u64,
        channel: u64,
        user: u64,
        text: &str,
        mention: bool,
        reply_to: Option<u64>,
    ) -> u64 {
        let id = self.new_id();
        let (content, mentions) = if mention {
            (format!("<@{BOT_ID}> {text}"), vec![bot_user()])
        } else {
            (text.to_string(), vec![])
        };
        let referenced = reply_to.map(|r| {
            let sent = self
                .sent_message(r)
                .expect("a reply to a message the bot sent");
            sent.body
        });
        let mut m = message_json(
            id,
            channel,
            Some(guild),
            user_json(user),
            &content,
            mentions,
            referenced,
        );
        m["member"] =
            json!({"roles": [], "joined_at": TIMESTAMP, "deaf": false, "mute": false, "flags": 0});
        self.dispatch("MESSAGE_CREATE", m);
        id
    }

    /// `user` adds (`add`) or removes a reaction on a message.
    pub fn react(
        &self,
        user: u64,
        guild: Option<u64>,
        channel: u64,
        message: u64,
        emoji: &str,
        add: bool,
    ) {
        let mut d = json!({"user_id": user.to_string(), "channel_id": channel.to_string(),
                           "message_id": message.to_string(), "emoji": {"id": null, "name": emoji},
                           "burst": false, "type": 0});
        if let Some(g) = guild {
            d["guild_id"] = json!(g.to_string());
            if add {
                d["member"] = member_json(user, &[]);
            }
        }
        if add {
            d["message_author_id"] = json!(BOT_ID.to_string());
        }
        self.dispatch(
            if add {
                "MESSAGE_REACTION_ADD"
            } else {
                "MESSAGE_REACTION_REMOVE"
            },
            d,
        );
    }

    /// `user` runs the slash command `/name` in a channel (a server channel when `guild` is
    /// set, with the member's `roles`; a DM otherwise). Returns the interaction id.
    pub fn command(
        &self,
        user: u64,
        guild: Option<u64>,
        channel: u64,
        name: &str,
        roles: &[u64],
    ) -> u64 {
        let id = self.new_id();
        let mut d = json!({
            "id": id.to_string(), "application_id": APP_ID.to_string(), "type": 2,
            "data": {"id": "77", "name": name, "type": 1},
            "channel_id": channel.to_string(), "token": format!("itoken-{id}"), "version": 1,
            "locale": "en-US", "entitlements": [], "attachment_size_limit": 8_388_608,
            "app_permissions": "0",
        });
        match guild {
            Some(g) => {
                d["guild_id"] = json!(g.to_string());
                d["member"] = member_json(user, roles);
                d["context"] = json!(0);
            }
            None => {
                d["user"] = user_json(user);
                d["context"] = json!(1);
            }
        }
        self.lock().interactions.insert(id, Instant::now());
        self.dispatch("INTERACTION_CREATE", d);
        id
    }

    /// `user` presses a button with `custom_id` (on an ephemeral message in `channel`).
    pub fn button(&self, user: u64, guild: Option<u64>, channel: u64, custom_id: &str) -> u64 {
        let id = self.new_id();
        let message = message_json(self.new_id(), channel, guild, bot_user(), "…", vec![], None);
        let mut d = json!({
            "id": id.to_string(), "application_id": APP_ID.to_string(), "type": 3,
            "data": {"custom_id": custom_id, "component_type": 2},
            "channel_id": channel.to_string(), "token": format!("itoken-{id}"), "version": 1,
            "locale": "en-US", "entitlements": [], "attachment_size_limit": 8_388_608,
            "message": message,
        });
        match guild {
            Some(g) => {
                d["guild_id"] = json!(g.to_string());
                d["member"] = member_json(user, &[]);
            }
            None => d["user"] = user_json(user),
        }
        self.lock().interactions.insert(id, Instant::now());
        self.dispatch("INTERACTION_CREATE", d);
        id
    }

    /// A system message (`kind`: 1 a member added to a thread, 6 a pin, ...) by `user`
    /// in a server channel or thread; its id.
    pub fn system_message(&self, guild: u64, channel: u64, user: u64, kind: u64) -> u64 {
        let id = self.new_id();
        let mut m = message_json(id, channel, Some(guild), user_json(user), "", vec![], None);
        m["type"] = json!(kind);
        if kind == 1 {
            m["mentions"] = json!([bot_user()]);
        }
        self.dispatch("MESSAGE_CREATE", m);
        id
    }

    /// The message a MESSAGE_CREATE dispatch carried (what the bot received).
    pub fn dispatched_message(&self, id: u64) -> Option<Value> {
        self.lock()
            .gw
            .log
            .iter()
            .map(|(_, f)| f)
            .find(|f| {
                f["t"] == "MESSAGE_CREATE" && f["d"]["id"].as_str() == Some(id.to_string().as_str())
            })
            .map(|f| f["d"].clone())
    }

    /// The roles of a server (for `/status`'s admin check).
    pub fn set_roles(&self, guild: u64, roles: &[(u64, &str)]) {
        self.lock().roles.insert(
            guild,
            roles.iter().map(|(i, n)| (*i, n.to_string())).collect(),
        );
    }

    // ---- faults ----

    /// Answer the next call whose method is `method` and whose path contains `path` with
    /// `status` (a 429 gets Discord's body and headers).
    pub fn fail_next(&self, method: &str, path: &str, status: u16) {
        self.inject(method, path, status, false);
    }

    /// Like [`Self::fail_next`], but the call takes effect before the error is answered
    /// (a 5xx or a lost answer after Discord did the work).
    pub fn fail_next_after_effect(&self, method: &str, path: &str, status: u16) {
        self.inject(method, path, status, true);
    }

    /// The next such call takes effect and is never answered (the bot dies waiting).
    pub fn hang_next_after_effect(&self, method: &str, path: &str) {
        self.inject(method, path, HANG, true);
    }

    fn inject(&self, method: &str, path: &str, status: u16, effect: bool) {
        let body = if status == 429 {
            json!({"message": "You are being rate limited.", "retry_after": 0.3, "global": false, "code": 0})
        } else {
            json!({"message": "Internal Server Error", "code": 0})
        };
        self.lock()
            .inject
            .push_back((method.to_string(), path.to_string(), status, body, effect));
    }

    /// Delay the answer to a roles fetch (a slow Discord).
    pub fn set_roles_delay(&self, d: Option<Duration>) {
        self.lock().roles_delay = d;
    }

    /// Delay the answer to a read of a channel's history (a slow Discord).
    pub fn set_history_delay(&self, d: Option<Duration>) {
        self.lock().history_delay = d;
    }

    /// On the next thread the bot starts, `user` writes `text` in it before the bot has
    /// the answer to its request (the gateway is quicker than REST).
    pub fn follow_up_on_next_thread(&self, user: u64, text: &str) {
        self.lock().follow_up = Some((user, text.to_string()));
    }

    /// The messages written by [`Self::follow_up_on_next_thread`].
    pub fn follow_ups(&self) -> Vec<u64> {
        self.lock().follow_ups.clone()
    }

    /// Refuse IDENTIFY with close code 4014 while it asks for MESSAGE_CONTENT.
    pub fn disallow_message_content(&self) {
        self.lock().message_content_disallowed = true;
    }

    /// Close the gateway connection (close code 4000, as Discord does on an internal error).
    /// Events dispatched until the bot resumes are replayed to it.
    pub fn disconnect(&self) {
        let mut i = self.lock();
        if let Some((_, tx)) = i.gw.live.take() {
            let _ = tx.send(Ws::Close(Some(CloseFrame {
                code: CloseCode::Library(4000),
                reason: "fake: reconnect".into(),
            })));
        }
    }

    /// On the next RESUME also replay the last `n` events the session had already received.
    pub fn replay_extra_on_resume(&self, n: usize) {
        self.lock().gw.replay_extra = n;
    }

    /// Delay answers to message creations and edits (a slow Discord).
    pub fn set_rest_delay(&self, d: Option<Duration>) {
        self.lock().rest_delay = d;
    }

    // ---- what the bot did ----

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Calls with this method whose path contains `path`.
    pub fn calls_to(&self, method: &str, path: &str) -> Vec<Call> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.method == method && c.path.contains(path))
            .cloned()
            .collect()
    }

    /// Every message the bot created, in order.
    pub fn sent(&self) -> Vec<Sent> {
        self.lock().sent.clone()
    }

    pub fn sent_message(&self, id: u64) -> Option<Sent> {
        self.lock().sent.iter().find(|s| s.id == id).cloned()
    }

    /// The bot's messages in a channel, their latest text.
    pub fn texts(&self, channel: u64) -> Vec<String> {
        self.lock()
            .sent
            .iter()
            .filter(|s| s.channel == channel)
            .map(|s| s.text().to_string())
            .collect()
    }

    /// The bot's replies in a channel: its messages that got the rating reactions.
    pub fn replies(&self, channel: u64) -> Vec<Sent> {
        self.lock()
            .sent
            .iter()
            .filter(|s| s.channel == channel && s.reactions.len() == 2)
            .cloned()
            .collect()
    }

    /// The edits of interactions' original responses: (interaction id, edit body).
    pub fn interaction_edits(&self) -> Vec<(u64, Value)> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.method == "PATCH" && c.path.starts_with("/webhooks/") && c.status < 300)
            .filter_map(|c| {
                let token = c.path.split('/').nth(3)?;
                let id = token.strip_prefix("itoken-")?.parse().ok()?;
                Some((id, c.body.clone()))
            })
            .collect()
    }

    /// The interaction responses: (interaction id, response body).
    pub fn interaction_responses(&self) -> Vec<(u64, Value)> {
        self.lock()
            .calls
            .iter()
            .filter(|c| {
                c.method == "POST" && c.path.starts_with("/interactions/") && c.status < 300
            })
            .map(|c| {
                let id = c.path.split('/').nth(2).unwrap().parse().unwrap();
                (id, c.body.clone())
            })
            .collect()
    }

    /// The threads the bot started: (thread id, parent channel).
    pub fn threads(&self) -> Vec<(u64, u64)> {
        let mut t: Vec<(u64, u64)> = self.lock().threads.iter().map(|(a, b)| (*a, *b)).collect();
        t.sort();
        t
    }

    pub fn identifies(&self) -> Vec<Value> {
        self.lock().gw.identifies.clone()
    }

    pub fn resumes(&self) -> Vec<Value> {
        self.lock().gw.resumes.clone()
    }

    pub fn heartbeats(&self) -> usize {
        self.lock().gw.heartbeats
    }

    /// The path (with query) of every gateway connection.
    pub fn gateway_paths(&self) -> Vec<String> {
        self.lock().gw.paths.clone()
    }

    /// Whether a connection is identified or resumed now.
    pub fn is_live(&self) -> bool {
        self.lock().gw.live.is_some()
    }

    /// Whether every gateway connection is closed.
    pub fn all_closed(&self) -> bool {
        self.lock().gw.conns.is_empty()
    }

    // ---- the gateway ----

    async fn gateway_connection(self, stream: tokio::net::TcpStream) {
        let path = Arc::new(Mutex::new(String::new()));
        let p = path.clone();
        #[allow(clippy::result_large_err)]
        let callback = move |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                             resp| {
            *p.lock().unwrap() = req.uri().to_string();
            Ok(resp)
        };
        let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        let (mut sink, mut source) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Ws>();
        let conn = {
            let mut i = self.lock();
            i.gw.next_conn += 1;
            let id = i.gw.next_conn;
            i.gw.conns.insert(id, tx.clone());
            i.gw.paths.push(path.lock().unwrap().clone());
            id
        };
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let close = matches!(m, Ws::Close(_));
                if sink.send(m).await.is_err() || close {
                    break;
                }
            }
        });
        let _ = tx.send(Ws::Text(
            json!({"op": 10, "s": null, "t": null, "d": {"heartbeat_interval": HEARTBEAT_MS}})
                .to_string(),
        ));
        while let Some(Ok(msg)) = source.next().await {
            let Ws::Text(text) = msg else {
                // A close frame: keep reading so the reply goes out, until the stream ends.
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            match v["op"].as_u64() {
                Some(1) => {
                    self.lock().gw.heartbeats += 1;
                    let _ = tx.send(Ws::Text(
                        json!({"op": 11, "s": null, "t": null, "d": null}).to_string(),
                    ));
                }
                Some(2) => self.identify(conn, &tx, v["d"].clone()),
                Some(6) => self.resume(conn, &tx, v["d"].clone()),
                _ => {}
            }
        }
        {
            let mut i = self.lock();
            i.gw.conns.remove(&conn);
            if i.gw.live.as_ref().is_some_and(|(c, _)| *c == conn) {
                i.gw.live = None;
            }
        }
        writer.abort();
    }

    fn token_ok(&self, token: &Value) -> bool {
        let t = token.as_str().unwrap_or("");
        t == self.token || t.strip_prefix("Bot ") == Some(self.token.as_str())
    }

    fn identify(&self, conn: u64, tx: &mpsc::UnboundedSender<Ws>, d: Value) {
        let mut i = self.lock();
        let mut recorded = d.clone();
        recorded["token"] = json!(if self.token_ok(&d["token"]) {
            "[the right token]"
        } else {
            "[a wrong token]"
        });
        i.gw.identifies.push(recorded);
        if !self.token_ok(&d["token"]) {
            let _ = tx.send(Ws::Close(Some(CloseFrame {
                code: CloseCode::Library(4004),
                reason: "Authentication failed.".into(),
            })));
            return;
        }
        if i.message_content_disallowed && d["intents"].as_u64().unwrap_or(0) & (1 << 15) != 0 {
            let _ = tx.send(Ws::Close(Some(CloseFrame {
                code: CloseCode::Library(4014),
                reason: "Disallowed intent(s).".into(),
            })));
            return;
        }
        let gw = &mut i.gw;
        let session = format!("session-{conn}");
        gw.session_id = Some(session.clone());
        gw.seq += 1;
        let ready = json!({"op": 0, "t": "READY", "s": gw.seq, "d": {
            "v": 10, "user": bot_user(), "guilds": [{"id": "5000", "unavailable": true}],
            "session_id": session, "resume_gateway_url": self.gateway_url,
            "application": {"id": APP_ID.to_string(), "flags": 0},
        }});
        // READY is not replayed on a RESUME.
        gw.log.push((gw.seq, json!(null)));
        let _ = tx.send(Ws::Text(ready.to_string()));
        // What was dispatched before the bot first connected (tests write right after
        // the start). A later new session, as on Discord, starts from now: what was sent
        // while no session was live never comes over the gateway.
        if !gw.identified_before {
            for (_, frame) in gw
                .log
                .iter()
                .filter(|(s, f)| *s > gw.sent_upto && !f.is_null())
            {
                let _ = tx.send(Ws::Text(frame.to_string()));
            }
        }
        gw.identified_before = true;
        gw.sent_upto = gw.seq;
        gw.live = Some((conn, tx.clone()));
    }

    fn resume(&self, conn: u64, tx: &mpsc::UnboundedSender<Ws>, d: Value) {
        let mut i = self.lock();
        let gw = &mut i.gw;
        let mut recorded = d.clone();
        recorded["token"] = json!(if self.token_ok(&d["token"]) {
            "[the right token]"
        } else {
            "[a wrong token]"
        });
        gw.resumes.push(recorded);
        let same = d["session_id"].as_str() == gw.session_id.as_deref();
        if !same || !self.token_ok(&d["token"]) {
            // Invalid session, not resumable: the bot identifies anew.
            let _ = tx.send(Ws::Text(
                json!({"op": 9, "s": null, "t": null, "d": false}).to_string(),
            ));
            return;
        }
        let from = d["seq"].as_u64().unwrap_or(0);
        let extra = std::mem::take(&mut gw.replay_extra);
        let replay: Vec<&(u64, Value)> = gw
            .log
            .iter()
            .filter(|(s, f)| !f.is_null() && *s <= from)
            .rev()
            .take(extra)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .chain(gw.log.iter().filter(|(s, f)| !f.is_null() && *s > from))
            .collect();
        for (_, frame) in replay {
            let _ = tx.send(Ws::Text(frame.to_string()));
        }
        let _ = tx.send(Ws::Text(
            json!({"op": 0, "t": "RESUMED", "s": gw.seq, "d": null}).to_string(),
        ));
        gw.sent_upto = gw.seq;
        gw.live = Some((conn, tx.clone()));
    }

    // ---- REST ----

    fn created(&self, channel: u64, body: &Value) -> Value {
        let id = self.new_id();
        let content = body["content"].as_str().unwrap_or("").to_string();
        let m = message_json(id, channel, None, bot_user(), &content, vec![], None);
        self.lock()
            .history
            .entry(channel)
            .or_default()
            .push(m.clone());
        let now = Instant::now();
        self.lock().sent.push(Sent {
            id,
            channel,
            created: now,
            versions: vec![(now, content)],
            reactions: vec![],
            body: m.clone(),
        });
        m
    }

    fn edited(&self, channel: u64, id: u64, body: &Value) -> Option<Value> {
        let mut i = self.lock();
        let s = i
            .sent
            .iter_mut()
            .find(|s| s.id == id && s.channel == channel)?;
        if let Some(c) = body["content"].as_str() {
            s.versions.push((Instant::now(), c.to_string()));
        }
        let mut m = s.body.clone();
        m["content"] = json!(s.text());
        m["edited_timestamp"] = json!(TIMESTAMP);
        Some(m)
    }
}

fn json_response(status: u16, body: Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

async fn rest_call(
    State(fake): State<FakeDiscord>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let full = uri.path().to_string();
    let Some(path) = full.strip_prefix("/api/v10") else {
        return json_response(404, json!({"message": "404: Not Found", "code": 0}));
    };
    let path = path.to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let method = method.as_str().to_string();
    let authorized = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h == format!("Bot {}", fake.token));
    let forced = {
        let mut i = fake.lock();
        let at = i
            .inject
            .iter()
            .position(|(m, p, _, _, _)| *m == method && path.contains(p.as_str()));
        at.and_then(|n| i.inject.remove(n))
    };
    let record = |status: u16| {
        fake.lock().calls.push(Call {
            method: method.clone(),
            path: path.clone(),
            body: body.clone(),
            at: Instant::now(),
            status,
        });
    };
    if !authorized && !path.starts_with("/interactions/") {
        record(401);
        return json_response(401, json!({"message": "401: Unauthorized", "code": 0}));
    }
    let (forced, effect) = match forced {
        Some((_, _, status, answer, true)) => (None, Some((status, answer))),
        Some((_, _, status, answer, false)) => (Some((status, answer)), None),
        None => (None, None),
    };
    if let Some((status, answer)) = forced {
        record(status);
        let mut r = json_response(status, answer);
        if status == 429 {
            let h = r.headers_mut();
            h.insert("retry-after", "1".parse().unwrap());
            h.insert("x-ratelimit-scope", "user".parse().unwrap());
            h.insert("x-ratelimit-remaining", "0".parse().unwrap());
            h.insert("x-ratelimit-reset-after", "0.3".parse().unwrap());
        }
        return r;
    }
    let delay = fake.lock().rest_delay;
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let id = |n: usize| {
        parts
            .get(n)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (status, answer) = match (method.as_str(), parts.as_slice()) {
        ("GET", ["gateway"]) => (200, json!({"url": fake.gateway_url})),
        ("GET", ["gateway", "bot"]) => (
            200,
            json!({"url": fake.gateway_url, "shards": 1,
                   "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}}),
        ),
        ("GET", ["users", "@me"]) => (200, bot_user()),
        ("PUT", ["applications", _, "commands"])
        | ("PUT", ["applications", _, "guilds", _, "commands"]) => {
            let guild = (parts.len() == 5).then(|| parts[3].to_string());
            let list: Vec<Value> = body
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(n, c)| {
                    json!({"id": (500 + n).to_string(), "type": 1, "application_id": APP_ID.to_string(),
                           "guild_id": guild, "name": c["name"], "description": c["description"],
                           "version": "1", "default_member_permissions": null})
                })
                .collect();
            (200, Value::Array(list))
        }
        ("POST", ["channels", _, "typing"]) => (204, Value::Null),
        // A channel's history after a message, newest first as Discord answers; REST
        // message objects carry no guild_id or member.
        ("GET", ["channels", _, "messages"]) => {
            let q: HashMap<String, String> = uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let wait = fake.lock().history_delay;
            if let Some(d) = wait {
                tokio::time::sleep(d).await;
            }
            let after: u64 = q.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
            let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(50);
            let i = fake.lock();
            let mut found: Vec<Value> = i
                .history
                .get(&id(1))
                .into_iter()
                .flatten()
                .filter(|m| {
                    m["id"]
                        .as_str()
                        .and_then(|x| x.parse::<u64>().ok())
                        .unwrap_or(0)
                        > after
                })
                .cloned()
                .map(|mut m| {
                    if let Some(o) = m.as_object_mut() {
                        o.remove("guild_id");
                        o.remove("member");
                    }
                    m
                })
                .collect();
            found.sort_by_key(|m| m["id"].as_str().and_then(|x| x.parse::<u64>().ok()));
            found.truncate(limit);
            found.reverse();
            (200, Value::Array(found))
        }
        ("POST", ["channels", _, "messages"]) => {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            // With `enforce_nonce`, the same nonce from the bot within minutes is the same
            // message: Discord returns the one it created.
            let nonce = body["nonce"]
                .as_str()
                .map(str::to_string)
                .or_else(|| body["nonce"].as_u64().map(|n| n.to_string()))
                .filter(|_| body["enforce_nonce"] == true);
            let earlier = nonce.as_ref().and_then(|n| {
                let i = fake.lock();
                let (mid, at) = i.nonces.get(&(id(1), n.clone()))?;
                (at.elapsed() < Duration::from_secs(300)).then_some(*mid)
            });
            match earlier.and_then(|m| fake.sent_message(m)) {
                Some(m) => (200, m.body),
                None => {
                    let m = fake.created(id(1), &body);
                    if let Some(n) = nonce {
                        let mid = m["id"].as_str().unwrap().parse().unwrap();
                        fake.lock().nonces.insert((id(1), n), (mid, Instant::now()));
                    }
                    (200, m)
                }
            }
        }
        ("PATCH", ["channels", _, "messages", _]) => {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            match fake.edited(id(1), id(3), &body) {
                Some(m) => (200, m),
                None => (404, json!({"message": "Unknown Message", "code": 10008})),
            }
        }
        ("PUT", ["channels", _, "messages", _, "reactions", emoji, "@me"]) => {
            let emoji = percent_decode(emoji);
            let found = {
                let mut i = fake.lock();
                match i.sent.iter_mut().find(|s| s.id == id(3)) {
                    Some(s) => {
                        // One reaction per emoji and user, as on Discord.
                        if !s.reactions.contains(&emoji) {
                            s.reactions.push(emoji.clone());
                        }
                        true
                    }
                    None => false,
                }
            };
            if found {
                // Discord tells the bot of its own reactions too.
                fake.dispatch(
                    "MESSAGE_REACTION_ADD",
                    json!({"user_id": BOT_ID.to_string(), "channel_id": id(1).to_string(),
                           "message_id": id(3).to_string(), "emoji": {"id": null, "name": emoji},
                           "message_author_id": BOT_ID.to_string(), "burst": false, "type": 0}),
                );
                (204, Value::Null)
            } else {
                (404, json!({"message": "Unknown Message", "code": 10008}))
            }
        }
        // A thread started from a message has that message's id; a second one on the same
        // message is refused.
        ("POST", ["channels", _, "messages", _, "threads"])
            if fake.lock().threads.contains_key(&id(3)) =>
        {
            (
                400,
                json!({"message": "A thread has already been created for this message", "code": 160004}),
            )
        }
        ("POST", ["channels", _, "messages", _, "threads"]) => {
            let thread = id(3);
            let parent = id(1);
            let follow_up = {
                let mut i = fake.lock();
                i.threads.insert(thread, parent);
                i.follow_up.take()
            };
            if let Some((user, text)) = follow_up {
                let m = fake.guild_message(5000, thread, user, &text, false, None);
                fake.lock().follow_ups.push(m);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (
                201,
                json!({"id": thread.to_string(), "type": 11, "guild_id": "5000", "parent_id": parent.to_string(),
                       "owner_id": BOT_ID.to_string(), "name": body["name"], "last_message_id": null,
                       "thread_metadata": {"archived": false, "auto_archive_duration": 1440,
                                           "archive_timestamp": TIMESTAMP, "locked": false},
                       "message_count": 0, "member_count": 1, "rate_limit_per_user": 0, "flags": 0}),
            )
        }
        ("GET", ["guilds", _, "roles"]) => {
            let wait = fake.lock().roles_delay;
            if let Some(d) = wait {
                tokio::time::sleep(d).await;
            }
            let roles = fake.lock().roles.get(&id(1)).cloned().unwrap_or_default();
            let list: Vec<Value> = roles
                .iter()
                .enumerate()
                .map(|(n, (rid, name))| {
                    json!({"id": rid.to_string(), "name": name, "color": 0,
                           "colors": {"primary_color": 0, "secondary_color": null, "tertiary_color": null},
                           "hoist": false, "managed": false, "mentionable": false, "permissions": "0",
                           "position": n, "icon": null, "unicode_emoji": null, "flags": 0})
                })
                .collect();
            (200, Value::Array(list))
        }
        // The first answer to an interaction is taken within 3 s of it, and once.
        ("POST", ["interactions", _, _, "callback"]) => {
            let mut i = fake.lock();
            match i.interactions.remove(&id(1)) {
                Some(at) if at.elapsed() <= Duration::from_secs(3) => (204, Value::Null),
                _ => (
                    404,
                    json!({"message": "Unknown interaction", "code": 10062}),
                ),
            }
        }
        // An edit of an interaction's (deferred) response.
        ("PATCH", ["webhooks", app, _, "messages", "@original"]) if *app == APP_ID.to_string() => {
            let content = body["content"].as_str().unwrap_or("");
            let mut m = message_json(fake.new_id(), 1, None, bot_user(), content, vec![], None);
            m["webhook_id"] = json!(APP_ID.to_string());
            (200, m)
        }
        _ => (404, json!({"message": "404: Not Found", "code": 0})),
    };
    if let Some((status, answer)) = effect {
        record(status);
        if status == HANG {
            std::future::pending::<()>().await;
        }
        return json_response(status, answer);
    }
    record(status);
    if status == 204 {
        return StatusCode::NO_CONTENT.into_response();
    }
    json_response(status, answer)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
