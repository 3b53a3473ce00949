//! A minimal W3C WebDriver client over reqwest: the dozen commands the browser test
//! uses. (A full client crate pulled in enough dependencies with different feature sets
//! to make CI compile most of the tree twice.)
#![allow(dead_code)]

use serde_json::{Value, json};

/// The W3C key under which an element reference is returned.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Session {
    http: reqwest::Client,
    base: String,
}

#[derive(Clone)]
pub struct Element {
    id: String,
}

#[derive(Debug)]
pub struct WdError(pub String);

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, WdError>;

impl Session {
    /// Open a session on the WebDriver server at `driver` (e.g. `http://127.0.0.1:9515`).
    pub async fn new(driver: &str, capabilities: Value) -> Result<Self> {
        let http = reqwest::Client::new();
        let v = call(
            &http,
            reqwest::Method::POST,
            &format!("{driver}/session"),
            Some(json!({"capabilities": {"alwaysMatch": capabilities}})),
        )
        .await?;
        let id = v["sessionId"]
            .as_str()
            .ok_or_else(|| WdError(format!("no session id in {v}")))?;
        Ok(Self {
            http,
            base: format!("{driver}/session/{id}"),
        })
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        call(&self.http, method, &format!("{}{path}", self.base), body).await
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await
            .map(|_| ())
    }

    pub async fn current_url(&self) -> Result<String> {
        Ok(self
            .cmd(reqwest::Method::GET, "/url", None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    pub async fn find(&self, css: &str) -> Result<Element> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        v[ELEMENT_KEY]
            .as_str()
            .map(|id| Element { id: id.to_string() })
            .ok_or_else(|| WdError(format!("no element {css}: {v}")))
    }

    pub async fn click(&self, e: &Element) -> Result<()> {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/click", e.id),
            Some(json!({})),
        )
        .await
        .map(|_| ())
    }

    pub async fn clear(&self, e: &Element) -> Result<()> {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/clear", e.id),
            Some(json!({})),
        )
        .await
        .map(|_| ())
    }

    pub async fn send_keys(&self, e: &Element, text: &str) -> Result<()> {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/value", e.id),
            Some(json!({"text": text})),
        )
        .await
        .map(|_| ())
    }

    pub async fn text(&self, e: &Element) -> Result<String> {
        Ok(self
            .cmd(
                reqwest::Method::GET,
                &format!("/element/{}/text", e.id),
                None,
            )
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    pub async fn attr(&self, e: &Element, name: &str) -> Result<Option<String>> {
        Ok(self
            .cmd(
                reqwest::Method::GET,
                &format!("/element/{}/attribute/{name}", e.id),
                None,
            )
            .await?
            .as_str()
            .map(str::to_string))
    }

    /// Run `script` (a function body; `arguments` holds `args`) and return its value.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Choose the `<option>` with this value in a `<select>` and fire `change`.
    pub async fn select_value(&self, select_css: &str, value: &str) -> Result<()> {
        self.execute(
            "const s = document.querySelector(arguments[0]); s.value = arguments[1]; s.dispatchEvent(new Event('change', {bubbles: true})); return s.value;",
            vec![json!(select_css), json!(value)],
        )
        .await
        .and_then(|v| if v == json!(value) { Ok(()) } else { Err(WdError(format!("{select_css} has no option {value}"))) })
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        use base64::Engine as _;
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await?;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .map_err(|e| WdError(format!("screenshot: {e}")))
    }

    pub async fn set_window_size(&self, width: u32, height: u32) -> Result<()> {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await
        .map(|_| ())
    }

    pub async fn close(self) -> Result<()> {
        self.cmd(reqwest::Method::DELETE, "", None)
            .await
            .map(|_| ())
    }
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value> {
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| WdError(format!("{url}: {e}")))?;
    let status = resp.status();
    let v: Value = resp
        .json()
        .await
        .map_err(|e| WdError(format!("{url}: {e}")))?;
    if !status.is_success() {
        return Err(WdError(format!(
            "{url}: {status}: {}",
            v["value"]["message"]
        )));
    }
    Ok(v["value"].clone())
}
