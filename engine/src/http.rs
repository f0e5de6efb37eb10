//! The engine's HTTP/JSON API for backend publishers, and `/metrics`.
//!
//! Every `/v1` route needs `Authorization: Bearer <publisher token>` (a JWT
//! with `role: "publisher"`, minted by `tiercast token --publisher`). Errors
//! are `{"error": {"code": "...", "message": "..."}}` with the wire code's
//! name (docs/protocol.md) and a matching HTTP status.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::wire::{ErrorCode, Message};
use tokio::net::TcpListener;

use crate::auth::TokenKeys;
use crate::engine::{Engine, EngineError, Outgoing};

#[derive(Clone)]
pub struct HttpState {
    pub engine: Arc<Engine>,
    pub keys: TokenKeys,
    pub registry: Arc<Registry>,
}

/// An API error: a wire code, an HTTP status and a one-line message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            EngineError::UnknownConversation(_) => StatusCode::NOT_FOUND,
            EngineError::Forbidden { .. } => StatusCode::FORBIDDEN,
            EngineError::ConversationExists(_) => StatusCode::CONFLICT,
            EngineError::TooManyDevices { .. }
            | EngineError::Invalid(_)
            | EngineError::NotPending { .. } => StatusCode::BAD_REQUEST,
            EngineError::Clock(_) | EngineError::Store(_) | EngineError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code.name(), "message": self.message }
        });
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateConversation {
    pub id: Option<u64>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub members: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConversationView {
    pub id: u64,
    pub name: String,
    pub members: Vec<u64>,
    pub tier: u8,
    pub pinned_tier: Option<u8>,
    pub created_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinTier {
    /// 1, 2 or 3 to pin; null to let the planner choose by size.
    pub tier: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMembers {
    pub users: Vec<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The message body (UTF-8 text).
    pub body: String,
    /// Send as this user (0 or absent: a system message).
    #[serde(default)]
    pub sender: u64,
    /// Retries with the same id return the first message id.
    #[serde(default)]
    pub client_msg_id: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Published {
    pub id: u64,
    pub duplicate: bool,
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    pub before: u64,
    #[serde(default)]
    pub after: u64,
    #[serde(default = "default_limit")]
    pub limit: u32,
}

fn default_limit() -> u32 {
    50
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MessageView {
    pub id: u64,
    pub conversation: u64,
    pub sender: u64,
    pub sender_client: u64,
    pub body: String,
}

impl From<Message> for MessageView {
    fn from(m: Message) -> Self {
        Self {
            id: m.id,
            conversation: m.conversation,
            sender: m.sender,
            sender_client: m.sender_client,
            body: String::from_utf8_lossy(&m.body).into_owned(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HistoryView {
    pub messages: Vec<MessageView>,
    pub more: bool,
}

/// The router; [`serve`] runs it.
pub fn router(state: HttpState) -> Router {
    let api = Router::new()
        .route("/v1/conversations", post(create_conversation))
        .route("/v1/conversations/{id}", get(get_conversation))
        .route("/v1/conversations/{id}/members", post(add_members))
        .route("/v1/conversations/{id}/tier", put(pin_tier))
        .route("/internal/store", post(store_call))
        .route(
            "/v1/conversations/{id}/members/{user}",
            delete(remove_member),
        )
        .route(
            "/v1/conversations/{id}/messages",
            post(publish).get(history),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_publisher,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .merge(api)
        .layer(DefaultBodyLimit::max(1024 * 1024))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn require_publisher(
    State(state): State<HttpState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            "missing `Authorization: Bearer <publisher token>`",
        )
        .into_response();
    };
    match state.keys.verify_publisher(token) {
        Ok(_) => next.run(req).await,
        Err(crate::auth::AuthError::Expired) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::TokenExpired,
            "token expired",
        )
        .into_response(),
        Err(e) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            e.to_string(),
        )
        .into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(&state.registry),
    )
}

async fn view(engine: &Engine, id: u64) -> ApiResult<ConversationView> {
    let (conv, members) = engine.conversation(id).await?;
    Ok(ConversationView {
        id: conv.id,
        name: conv.name,
        members,
        tier: conv.tier,
        pinned_tier: conv.pinned_tier,
        created_ms: conv.created_ms,
    })
}

async fn create_conversation(
    State(state): State<HttpState>,
    Json(req): Json<CreateConversation>,
) -> ApiResult<(StatusCode, Json<ConversationView>)> {
    if req.members.contains(&0) {
        return Err(EngineError::Invalid("user id 0 is reserved".into()).into());
    }
    let conv = state
        .engine
        .create_conversation(req.id, req.name, &req.members)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(view(&state.engine, conv.id).await?),
    ))
}

async fn get_conversation(
    State(state): State<HttpState>,
    Path(id): Path<u64>,
) -> ApiResult<Json<ConversationView>> {
    Ok(Json(view(&state.engine, id).await?))
}

async fn add_members(
    State(state): State<HttpState>,
    Path(id): Path<u64>,
    Json(req): Json<AddMembers>,
) -> ApiResult<Json<ConversationView>> {
    state.engine.add_members(id, &req.users).await?;
    Ok(Json(view(&state.engine, id).await?))
}

/// The engine's store, for edge processes (`store::remote`).
async fn store_call(
    State(state): State<HttpState>,
    Json(call): Json<crate::store::remote::Call>,
) -> Response {
    match crate::store::remote::serve(state.engine.store().as_ref(), call).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, Json(e)).into_response(),
    }
}

async fn pin_tier(
    State(state): State<HttpState>,
    Path(id): Path<u64>,
    Json(req): Json<PinTier>,
) -> ApiResult<Json<ConversationView>> {
    let tier = match req.tier {
        None => None,
        Some(t) => Some(Tier::from_u8(t).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                "tier must be 1, 2, 3 or null",
            )
        })?),
    };
    state.engine.pin_tier(id, tier).await?;
    Ok(Json(view(&state.engine, id).await?))
}

async fn remove_member(
    State(state): State<HttpState>,
    Path((id, user)): Path<(u64, u64)>,
) -> ApiResult<StatusCode> {
    if state.engine.remove_member(id, user).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::InvalidRequest,
            format!("user {user} is not a member of conversation {id}"),
        ))
    }
}

async fn publish(
    State(state): State<HttpState>,
    Path(id): Path<u64>,
    Json(req): Json<Publish>,
) -> ApiResult<(StatusCode, Json<Published>)> {
    let receipt = state
        .engine
        .send(Outgoing {
            conversation: id,
            sender: req.sender,
            sender_client: 0,
            client_msg_id: req.client_msg_id,
            body: Bytes::from(req.body),
            check_membership: req.sender != 0,
        })
        .await?;
    let status = if receipt.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(Published {
            id: receipt.message_id,
            duplicate: receipt.duplicate,
        }),
    ))
}

async fn history(
    State(state): State<HttpState>,
    Path(id): Path<u64>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<Json<HistoryView>> {
    state.engine.conversation(id).await?;
    let (messages, more) = state.engine.history(id, q.before, q.after, q.limit).await?;
    Ok(Json(HistoryView {
        messages: messages.into_iter().map(MessageView::from).collect(),
        more,
    }))
}
