//! The host's HTTP API (bearer token on everything but `/healthz`). Error answers are an
//! `ErrorBody` with a machine code and whether a retry can help; 5xx bodies stay generic.

use crate::cloud_api::{CloudApi, WebhookError};
use crate::provider::DeviceRef;
use crate::service::{Host, SendError};
use crate::simulator::Simulator;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use shared::config::Secret;
use shared::domain::{DeviceStatus, PhoneE164, ProviderKind};
use shared::host_api::{
    code, DeviceStatusBody, ErrorBody, PairRequest, SendBatchRequest, SendBatchResponse,
    SendItemResult, SendRequest, SendResponse, SimInboundRequest, MAX_BATCH,
};
use std::sync::Arc;
use uuid::Uuid;

#[derive(Clone)]
pub struct AppState {
    pub host: Arc<Host>,
    pub simulator: Option<Arc<Simulator>>,
    pub cloud: Option<Arc<CloudApi>>,
    pub token: Secret,
}

impl IntoResponse for SendError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(ErrorBody {
                error: self.code.to_string(),
                message: self.message,
                retryable: self.retryable,
            }),
        )
            .into_response()
    }
}

fn bad_request(message: impl Into<String>) -> SendError {
    SendError {
        status: 400,
        code: code::INVALID_PAYLOAD,
        message: message.into(),
        retryable: false,
    }
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/send", post(send))
        .route("/v1/send-batch", post(send_batch))
        .route("/v1/devices/{id}/status", get(status))
        .route("/v1/devices/{id}/pair", post(pair))
        .route("/v1/devices/{id}/connect", post(connect))
        .route("/v1/devices/{id}/logout", post(logout))
        .route("/v1/devices/{id}/qr.svg", get(qr_svg))
        .route("/v1/sim/devices/{id}/inbound", post(simulate_inbound))
        .route("/v1/sim/devices/{id}/{action}", post(simulate))
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    // Meta calls the webhook without our token: it is authenticated by its HMAC signature.
    Router::new()
        .route("/healthz", get(health))
        .route(
            "/v1/webhooks/cloud-api",
            get(cloud_webhook_verify).post(cloud_webhook),
        )
        .merge(api)
        .with_state(state)
}

async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| state.token.matches(t));
    if !ok {
        return SendError {
            status: 401,
            code: code::UNAUTHORIZED,
            message: "missing or wrong bearer token".into(),
            retryable: false,
        }
        .into_response();
    }
    next.run(req).await
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "host_id": state.host.host_id,
        "devices": state.host.device_count(),
        // Send outcomes the database has not taken yet (written again in the background).
        "unrecorded_outcomes": state.host.unrecorded_outcomes(),
    }))
}

async fn send(
    State(state): State<AppState>,
    body: Result<Json<SendRequest>, JsonRejection>,
) -> Result<Json<shared::host_api::SendResponse>, SendError> {
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let (_, mut results) = send_to_the_end(&state.host, vec![req]).await?;
    results
        .pop()
        .unwrap_or_else(|| Err(SendError::internal("empty batch result")))
        .map(Json)
}

/// Runs the sends on a task of their own, to their end: a requester that stops waiting (its
/// timeout, a reset connection) drops this handler, and would otherwise cut an attempt in half,
/// the provider called and its outcome never recorded. Run to the end, the send record says
/// `sent` or `failed`, and the worker's rescuer, or a repeated request, finds it there.
async fn send_to_the_end(
    host: &Arc<Host>,
    reqs: Vec<SendRequest>,
) -> Result<(Vec<SendRequest>, Vec<Result<SendResponse, SendError>>), SendError> {
    let host = host.clone();
    tokio::spawn(async move {
        let results = host.send_batch(&reqs).await;
        (reqs, results)
    })
    .await
    .map_err(SendError::internal)
}

async fn send_batch(
    State(state): State<AppState>,
    body: Result<Json<SendBatchRequest>, JsonRejection>,
) -> Result<Json<SendBatchResponse>, SendError> {
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    if req.messages.is_empty() || req.messages.len() > MAX_BATCH {
        return Err(bad_request(format!(
            "a batch holds 1 to {MAX_BATCH} messages"
        )));
    }
    let (messages, results) = send_to_the_end(&state.host, req.messages).await?;
    Ok(Json(SendBatchResponse {
        results: messages
            .iter()
            .zip(results)
            .map(|(m, r)| match r {
                Ok(sent) => SendItemResult {
                    message_id: m.message_id,
                    sent: Some(sent),
                    error: None,
                },
                Err(e) => SendItemResult {
                    message_id: m.message_id,
                    sent: None,
                    error: Some(ErrorBody {
                        error: e.code.to_string(),
                        message: e.message,
                        retryable: e.retryable,
                    }),
                },
            })
            .collect(),
    }))
}

#[derive(Deserialize)]
struct TenantQuery {
    tenant_id: Uuid,
}

async fn status(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeviceStatusBody>, SendError> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let (status, reason) = state.host.status(q.tenant_id, id).await?;
    Ok(Json(DeviceStatusBody {
        device_id: id,
        status: status.to_string(),
        reason,
    }))
}

async fn connect(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeviceStatusBody>, SendError> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let (status, reason) = state.host.reconnect(q.tenant_id, id).await?;
    Ok(Json(DeviceStatusBody {
        device_id: id,
        status: status.to_string(),
        reason,
    }))
}

/// The status reason of a device a person logged out.
const LOGGED_OUT_BY_USER: &str = "logged out by the user";

async fn logout(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeviceStatusBody>, SendError> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let device = state.host.device(q.tenant_id, id).await?;
    let provider = state
        .host
        .provider(device.provider)
        .ok_or_else(|| bad_request("provider not served by this host"))?;
    provider
        .logout(&device, LOGGED_OUT_BY_USER)
        .await
        .map_err(|e| bad_request(e.to_string()))?;
    Ok(Json(DeviceStatusBody {
        device_id: id,
        status: DeviceStatus::LoggedOut.to_string(),
        reason: Some(LOGGED_OUT_BY_USER.into()),
    }))
}

/// The current pairing QR code as an SVG image (starts QR pairing when none is on show).
async fn qr_svg(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, SendError> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let device = state.host.device(q.tenant_id, id).await?;
    let provider = state
        .host
        .provider(device.provider)
        .ok_or_else(|| bad_request("provider not served by this host"))?;
    let pairing = provider
        .start_pairing(&device, None)
        .await
        .map_err(|e| SendError {
            status: 409,
            code: code::PROVIDER_ERROR,
            message: e.to_string(),
            retryable: true,
        })?;
    let svg = pairing
        .svg
        .ok_or_else(|| bad_request("this device pairs without a QR code"))?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "image/svg+xml"),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        svg,
    )
        .into_response())
}

async fn pair(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    body: Result<Json<PairRequest>, JsonRejection>,
) -> Result<Json<shared::host_api::PairingBody>, SendError> {
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let phone = req
        .phone
        .as_deref()
        .map(PhoneE164::parse)
        .transpose()
        .map_err(|e| bad_request(e.to_string()))?;
    let device = state.host.device(req.tenant_id, id).await?;
    let provider = state
        .host
        .provider(device.provider)
        .ok_or_else(|| bad_request("provider not served by this host"))?;
    provider
        .start_pairing(&device, phone.as_ref())
        .await
        .map(Json)
        .map_err(|e| SendError {
            status: 409,
            code: code::PROVIDER_ERROR,
            message: e.to_string(),
            retryable: true,
        })
}

/// The tenant's device and this host's simulator, for the simulator-only endpoints.
async fn simulator_device(
    state: &AppState,
    tenant: Uuid,
    id: Uuid,
) -> Result<(&Simulator, DeviceRef), SendError> {
    let sim = state
        .simulator
        .as_deref()
        .ok_or_else(|| bad_request("this host runs no simulator"))?;
    let device: DeviceRef = state.host.device(tenant, id).await?;
    if device.provider != ProviderKind::Simulator {
        return Err(bad_request("not a simulator device"));
    }
    Ok((sim, device))
}

async fn simulate(
    State(state): State<AppState>,
    Path((id, action)): Path<(Uuid, String)>,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeviceStatusBody>, SendError> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let online = match action.as_str() {
        "online" => true,
        "offline" => false,
        other => {
            return Err(bad_request(format!(
                "unknown action {other:?}; use online or offline"
            )))
        }
    };
    let (sim, device) = simulator_device(&state, q.tenant_id, id).await?;
    let status: DeviceStatus = sim
        .set_online(&device, online)
        .map_err(SendError::internal)?;
    Ok(Json(DeviceStatusBody {
        device_id: id,
        status: status.to_string(),
        reason: None,
    }))
}

/// A simulator device's session receives a contact's text (see `Simulator::receive_text`).
async fn simulate_inbound(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    body: Result<Json<SimInboundRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, SendError> {
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let from = PhoneE164::parse(&req.from).map_err(|e| bad_request(e.to_string()))?;
    if req.text.len() > 4_096 {
        return Err(bad_request("text: longer than 4,096 bytes"));
    }
    let (sim, device) = simulator_device(&state, req.tenant_id, id).await?;
    sim.receive_text(&device, from, req.text)
        .map_err(|e| SendError {
            status: 409,
            code: code::DEVICE_OFFLINE,
            message: e.to_string(),
            retryable: true,
        })?;
    Ok(Json(serde_json::json!({ "received": true })))
}

#[derive(Deserialize)]
struct HubVerify {
    #[serde(rename = "hub.mode", default)]
    mode: String,
    #[serde(rename = "hub.verify_token", default)]
    verify_token: String,
    #[serde(rename = "hub.challenge", default)]
    challenge: String,
}

/// Meta's subscription check: echo the challenge when the verify token matches.
async fn cloud_webhook_verify(
    State(state): State<AppState>,
    Query(q): Query<HubVerify>,
) -> Response {
    match state
        .cloud
        .as_ref()
        .and_then(|c| c.verify_subscription(&q.mode, &q.verify_token, &q.challenge))
    {
        Some(challenge) => (StatusCode::OK, challenge).into_response(),
        None => (StatusCode::FORBIDDEN, "verification failed").into_response(),
    }
}

/// Statuses and inbound messages, signed with the app secret.
async fn cloud_webhook(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(cloud) = state.cloud.as_ref() else {
        return (StatusCode::NOT_FOUND, "no Cloud API provider").into_response();
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    match cloud.handle_webhook(signature, &body).await {
        Ok(report) => (StatusCode::OK, Json(report)).into_response(),
        Err(e @ WebhookError::BadSignature) => {
            tracing::warn!("webhook delivery with a bad signature refused");
            (StatusCode::UNAUTHORIZED, e.to_string()).into_response()
        }
        Err(e @ WebhookError::NotConfigured) => {
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
        }
        Err(e @ WebhookError::Malformed(_)) => {
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
        Err(e @ WebhookError::Unavailable(_)) => {
            // Meta retries a delivery that did not get a 200.
            tracing::warn!(error = %e, "webhook delivery not applied");
            (StatusCode::SERVICE_UNAVAILABLE, "try again later").into_response()
        }
    }
}
