//! A local stand-in for Meta's Graph API (WhatsApp Cloud API) that speaks its documented request,
//! response and error shapes: `GET /{phone-number-id}`, `POST /{phone-number-id}/messages`
//! (text and image), `POST /{phone-number-id}/media` (multipart). It records every request and
//! answers a recipient with a scripted error code when told to.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub authorization: String,
    /// The JSON body of a message send; for a media upload, the form's text fields.
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, String>,
    requests: Vec<Recorded>,
    /// recipient (digits) → error codes to answer, one per attempt; empty afterwards.
    errors: HashMap<String, Vec<i64>>,
    uploads: usize,
    sent: usize,
}

#[derive(Clone, Default)]
pub struct FakeGraph {
    inner: Arc<Mutex<Inner>>,
    pub base_url: String,
}

impl FakeGraph {
    pub async fn start() -> Self {
        let mut graph = FakeGraph::default();
        let app = Router::new()
            .route("/v21.0/{pnid}", get(phone_number))
            .route("/v21.0/{pnid}/messages", post(messages))
            .route("/v21.0/{pnid}/media", post(media))
            .with_state(graph.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        graph.base_url = format!("http://{}/v21.0", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        graph
    }

    /// Accepts `token` for `phone_number_id`.
    pub fn allow(&self, phone_number_id: &str, token: &str) {
        self.inner
            .lock()
            .unwrap()
            .tokens
            .insert(phone_number_id.into(), token.into());
    }

    pub fn revoke(&self, phone_number_id: &str) {
        self.inner.lock().unwrap().tokens.remove(phone_number_id);
    }

    /// The next sends to `to` (E.164) answer these error codes, in order.
    pub fn fail_next(&self, to: &str, codes: &[i64]) {
        self.inner
            .lock()
            .unwrap()
            .errors
            .insert(to.trim_start_matches('+').into(), codes.to_vec());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Accepted message sends.
    pub fn sent(&self) -> usize {
        self.inner.lock().unwrap().sent
    }

    pub fn uploads(&self) -> usize {
        self.inner.lock().unwrap().uploads
    }

    fn authorized(&self, pnid: &str, headers: &HeaderMap) -> Result<String, Box<Response>> {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let ok = self
            .inner
            .lock()
            .unwrap()
            .tokens
            .get(pnid)
            .is_some_and(|t| auth == format!("Bearer {t}"));
        if ok {
            Ok(auth)
        } else {
            Err(Box::new(graph_error(
                StatusCode::UNAUTHORIZED,
                190,
                "Invalid OAuth access token - Cannot parse access token",
                None,
            )))
        }
    }
}

/// The documented error envelope.
fn graph_error(status: StatusCode, code: i64, message: &str, details: Option<&str>) -> Response {
    let mut error = serde_json::json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AbCdEfGh123",
    });
    if let Some(d) = details {
        error["error_data"] = serde_json::json!({ "messaging_product": "whatsapp", "details": d });
    }
    (status, Json(serde_json::json!({ "error": error }))).into_response()
}

fn message_for(code: i64) -> (&'static str, &'static str) {
    match code {
        130429 => ("Rate limit hit", "Cloud API message throughput has been reached."),
        131026 => ("Message undeliverable", "Unable to deliver message."),
        131047 => (
            "Re-engagement message",
            "More than 24 hours have passed since the recipient last replied.",
        ),
        131048 => (
            "Spam rate limit hit",
            "Message failed to send because there are restrictions on how many messages can be sent from this phone number.",
        ),
        _ => ("Error", "Something went wrong."),
    }
}

async fn phone_number(
    State(g): State<FakeGraph>,
    Path(pnid): Path<String>,
    headers: HeaderMap,
) -> Response {
    match g.authorized(&pnid, &headers) {
        Ok(_) => Json(serde_json::json!({
            "id": pnid,
            "display_phone_number": "+60 12-345 6789",
        }))
        .into_response(),
        Err(r) => *r,
    }
}

async fn messages(
    State(g): State<FakeGraph>,
    Path(pnid): Path<String>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let auth = match g.authorized(&pnid, &headers) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let mut inner = g.inner.lock().unwrap();
    inner.requests.push(Recorded {
        path: format!("/{pnid}/messages"),
        authorization: auth,
        body: body.clone(),
    });
    let to = body["to"].as_str().unwrap_or_default().to_string();
    let shape_ok = body["messaging_product"] == "whatsapp"
        && !to.is_empty()
        && to.bytes().all(|b| b.is_ascii_digit())
        && match body["type"].as_str() {
            Some("text") => body["text"]["body"].is_string(),
            Some("image") => body["image"]["id"].is_string() || body["image"]["link"].is_string(),
            Some("template") => {
                let t = &body["template"];
                t["name"].is_string()
                    && t["language"]["code"].is_string()
                    && t["components"].as_array().is_none_or(|cs| {
                        cs.iter().all(|c| {
                            matches!(c["type"].as_str(), Some("header" | "body"))
                                && c["parameters"].is_array()
                        })
                    })
            }
            _ => false,
        };
    if !shape_ok {
        drop(inner);
        return graph_error(
            StatusCode::BAD_REQUEST,
            100,
            "(#100) Invalid parameter",
            Some("the request does not match the messages API"),
        );
    }
    if let Some(codes) = inner.errors.get_mut(&to) {
        if !codes.is_empty() {
            let code = codes.remove(0);
            drop(inner);
            let (title, details) = message_for(code);
            let status = if code == 130429 {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::BAD_REQUEST
            };
            return graph_error(status, code, title, Some(details));
        }
    }
    inner.sent += 1;
    let n = inner.sent;
    Json(serde_json::json!({
        "messaging_product": "whatsapp",
        "contacts": [{ "input": to, "wa_id": to }],
        "messages": [{ "id": format!("wamid.HBgL{n:08}") }],
    }))
    .into_response()
}

async fn media(
    State(g): State<FakeGraph>,
    Path(pnid): Path<String>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Response {
    let auth = match g.authorized(&pnid, &headers) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let mut fields = serde_json::Map::new();
    let mut file_len = 0usize;
    while let Ok(Some(field)) = form.next_field().await {
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            let ct = field.content_type().unwrap_or_default().to_string();
            fields.insert("file_content_type".into(), ct.into());
            file_len = field.bytes().await.map(|b| b.len()).unwrap_or(0);
        } else {
            fields.insert(name, field.text().await.unwrap_or_default().into());
        }
    }
    fields.insert("file_len".into(), file_len.into());
    let mut inner = g.inner.lock().unwrap();
    inner.requests.push(Recorded {
        path: format!("/{pnid}/media"),
        authorization: auth,
        body: serde_json::Value::Object(fields.clone()),
    });
    if fields.get("messaging_product").and_then(|v| v.as_str()) != Some("whatsapp") || file_len == 0
    {
        drop(inner);
        return graph_error(
            StatusCode::BAD_REQUEST,
            100,
            "(#100) Invalid parameter",
            None,
        );
    }
    inner.uploads += 1;
    Json(serde_json::json!({ "id": format!("media-{}", inner.uploads) })).into_response()
}
