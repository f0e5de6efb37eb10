//! The engine's HTTP/JSON API for backend publishers, the internal store API
//! for edge processes, and `/metrics`.
//!
//! Every `/v1` route needs `Authorization: Bearer <publisher token>` (role
//! `publisher`); `/internal/store` needs the internal credential (role
//! `internal`, its own secret). Every rejection, including a malformed body,
//! an unknown route and a bad id in the path, is
//! `{"error": {"code": "...", "message": "..."}}` with the wire code's name
//! (docs/protocol.md) and a matching HTTP status. Ids in JSON are strings of
//! decimal digits (numbers are accepted on input): see [`crate::ids_json`].
//!
//! Limits (docs/security.md): header and body read timeouts, a whole-request
//! timeout, a cap on connections and on body size, and the engine's caps on
//! members per call, names and conversation size; member lists come in
//! pages.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::wire::{ErrorCode, Message};
use tokio::net::TcpListener;

use crate::auth::{AuthError, TokenKeys};
use crate::engine::{Engine, EngineError, Outgoing, Sender};
use crate::ids_json;

/// The HTTP server's limits (`[http]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// A client has this long to send a request's headers: a slow client
    /// (slowloris) cannot hold a connection open for free.
    pub header_timeout_ms: u64,
    /// ... and this long to send its body.
    pub body_timeout_ms: u64,
    /// A whole request (read, handle, answer) past this is answered 503.
    pub request_timeout_ms: u64,
    /// Connections held at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Members listed in a conversation view (the first page).
    pub member_page: usize,
    /// Serve HTTPS with this PEM certificate chain and key (both or
    /// neither): what edges reach `/internal/store` over when it crosses a
    /// network.
    pub tls_cert_path: Option<std::path::PathBuf>,
    pub tls_key_path: Option<std::path::PathBuf>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout_ms: 5_000,
            body_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_connections: 10_000,
            max_body_bytes: 1024 * 1024,
            member_page: 100,
            tls_cert_path: None,
            tls_key_path: None,
        }
    }
}

impl HttpLimits {
    pub fn validate(&self) -> Result<(), crate::config::InvalidSetting> {
        use crate::config::InvalidSetting;
        for (name, v) in [
            ("http.header_timeout_ms", self.header_timeout_ms),
            ("http.body_timeout_ms", self.body_timeout_ms),
            ("http.request_timeout_ms", self.request_timeout_ms),
        ] {
            if !(100..=600_000).contains(&v) {
                return Err(InvalidSetting::new(name, "must be 100..=600000"));
            }
        }
        if self.max_connections == 0 {
            return Err(InvalidSetting::new(
                "http.max_connections",
                "must be positive",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(InvalidSetting::new(
                "http.max_body_bytes",
                "must be 1024..=67108864",
            ));
        }
        if !(1..=1000).contains(&self.member_page) {
            return Err(InvalidSetting::new("http.member_page", "must be 1..=1000"));
        }
        if self.tls_cert_path.is_some() != self.tls_key_path.is_some() {
            return Err(InvalidSetting::new(
                "http.tls_cert_path",
                "set both http.tls_cert_path and http.tls_key_path, or neither",
            ));
        }
        self.tls_acceptor()
            .map_err(|e| InvalidSetting::new("http.tls_cert_path", e))?;
        Ok(())
    }

    /// The TLS acceptor for `tls_cert_path`/`tls_key_path`, if set.
    pub fn tls_acceptor(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (Some(cert), Some(key)) = (&self.tls_cert_path, &self.tls_key_path) else {
            return Ok(None);
        };
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let chain = CertificateDer::pem_slice_iter(&read(cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no certificate", cert.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(key)?)
            .map_err(|e| format!("{}: {e}", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
    }
}

#[derive(Clone)]
pub struct HttpState {
    pub engine: Arc<Engine>,
    /// User and publisher tokens.
    pub keys: TokenKeys,
    /// The internal credential; `None`: no internal API.
    pub internal: Option<TokenKeys>,
    pub registry: Arc<Registry>,
    pub limits: HttpLimits,
    /// What `/readyz` answers from.
    pub ready: ReadyProbe,
}

/// Readiness: this process's store answers a read, its backplane takes a
/// publish, and it is not shutting down. One probe at a time, its answer
/// kept for [`READY_CACHE`], so that `/readyz` (no token) cannot be turned
/// into a stream of store reads.
#[derive(Clone, Debug)]
pub struct ReadyProbe {
    stopping: tokio::sync::watch::Receiver<bool>,
    last: Arc<tokio::sync::Mutex<Option<(std::time::Instant, Readiness)>>>,
}

/// What `/readyz` says, as JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Why not: `draining`, `store: ...`, `backplane: ...`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// How long one readiness answer is reused.
pub const READY_CACHE: Duration = Duration::from_millis(500);
/// How long the store and the backplane have to answer a probe.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// The channel a readiness probe publishes to (no one subscribes).
pub const READY_CHANNEL: &str = "tiercast:readyz";

impl ReadyProbe {
    /// `stopping` turns true when the process begins to shut down (an edge
    /// drains from then on).
    pub fn new(stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            stopping,
            last: Arc::default(),
        }
    }

    pub async fn check(&self, engine: &Engine) -> Readiness {
        if *self.stopping.borrow() {
            return Readiness {
                ready: false,
                reasons: vec!["draining".into()],
            };
        }
        let mut last = self.last.lock().await;
        if let Some((at, r)) = &*last
            && at.elapsed() < READY_CACHE
        {
            return r.clone();
        }
        let (store, backplane) = tokio::join!(
            tokio::time::timeout(READY_TIMEOUT, engine.store().conversation(0)),
            tokio::time::timeout(
                READY_TIMEOUT,
                engine.backplane().publish(READY_CHANNEL, Bytes::new())
            ),
        );
        let mut reasons = Vec::new();
        match store {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => reasons.push(format!("store: {e}")),
            Err(_) => reasons.push(format!("store: no answer within {READY_TIMEOUT:?}")),
        }
        match backplane {
            Ok(Ok(())) => {}
            Ok(Err(e)) => reasons.push(format!("backplane: {e}")),
            Err(_) => reasons.push(format!("backplane: no answer within {READY_TIMEOUT:?}")),
        }
        let r = Readiness {
            ready: reasons.is_empty(),
            reasons,
        };
        *last = Some((std::time::Instant::now(), r.clone()));
        r
    }
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

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }

    fn auth(e: AuthError) -> Self {
        let code = match e {
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::WrongRole { .. } => ErrorCode::Forbidden,
            _ => ErrorCode::Unauthenticated,
        };
        let status = if code == ErrorCode::Forbidden {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        Self::new(status, code, e.to_string())
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
            | EngineError::UnknownDevice(_) => StatusCode::BAD_REQUEST,
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

/// `Json<T>` whose rejections are the API's JSON error.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        ErrorCode::BodyTooLarge
    } else {
        ErrorCode::InvalidRequest
    };
    ApiError::new(status, code, r.body_text())
}

/// `Path<T>` whose rejections are the API's JSON error.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|r: PathRejection| {
                ApiError::invalid(format!(
                    "bad path (ids are decimal digits): {}",
                    r.body_text()
                ))
            })
    }
}

/// `Query<T>` whose rejections are the API's JSON error.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|r: QueryRejection| ApiError::invalid(r.body_text()))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateConversation {
    #[serde(default, with = "ids_json::opt_id")]
    pub id: Option<u64>,
    #[serde(default)]
    pub name: String,
    #[serde(default, with = "ids_json::ids")]
    pub members: Vec<u64>,
}

/// A conversation, with the first page of its members.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConversationView {
    #[serde(with = "ids_json::id")]
    pub id: u64,
    pub name: String,
    /// The first `http.member_page` members (ascending); the rest from
    /// `GET /v1/conversations/{id}/members?after=...`.
    #[serde(with = "ids_json::ids")]
    pub members: Vec<u64>,
    pub member_count: u64,
    /// Whether members beyond this page exist.
    pub members_more: bool,
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
    #[serde(with = "ids_json::ids")]
    pub users: Vec<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The message body (UTF-8 text).
    pub body: String,
    /// Send as this user (0 or absent: a system message).
    #[serde(default, with = "ids_json::opt_id")]
    pub sender: Option<u64>,
    /// Retries with the same id (from the same publisher, into the same
    /// conversation, within `engine.dedupe_ttl_ms`) return the first
    /// message id.
    #[serde(default, with = "ids_json::opt_id")]
    pub client_msg_id: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Published {
    #[serde(with = "ids_json::id")]
    pub id: u64,
    pub duplicate: bool,
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    #[serde(default, with = "ids_json::opt_id")]
    pub before: Option<u64>,
    #[serde(default, with = "ids_json::opt_id")]
    pub after: Option<u64>,
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct MembersQuery {
    #[serde(default, with = "ids_json::opt_id")]
    pub after: Option<u64>,
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MembersPage {
    #[serde(with = "ids_json::ids")]
    pub members: Vec<u64>,
    /// Pass as `after` for the next page; null on the last one.
    #[serde(with = "ids_json::opt_id")]
    pub next: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MessageView {
    #[serde(with = "ids_json::id")]
    pub id: u64,
    #[serde(with = "ids_json::id")]
    pub conversation: u64,
    #[serde(with = "ids_json::id")]
    pub sender: u64,
    #[serde(with = "ids_json::id")]
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

/// The verified publisher token's subject, for the handlers.
#[derive(Debug, Clone)]
struct Publisher(String);

/// The router; [`serve`] runs it.
pub fn router(state: HttpState) -> Router {
    let api = Router::new()
        .route("/v1/conversations", post(create_conversation))
        .route("/v1/conversations/{id}", get(get_conversation))
        .route(
            "/v1/conversations/{id}/members",
            post(add_members).get(list_members),
        )
        .route("/v1/conversations/{id}/tier", put(pin_tier))
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
    let internal = Router::new()
        .route("/internal/store", post(store_call))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_internal,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .merge(internal)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::InvalidRequest,
                "no such route",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::InvalidRequest,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            Duration::from_millis(state.limits.body_timeout_ms),
        ))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes: HTTP/1.1 with a
/// header read timeout and a cap on connections; each request within the
/// request timeout. In-flight requests finish (bounded) on shutdown.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let limits = state.limits.clone();
    let tls = limits.tls_acceptor().map_err(std::io::Error::other)?;
    let header_timeout = Duration::from_millis(limits.header_timeout_ms);
    let request_timeout = Duration::from_millis(limits.request_timeout_ms);
    let app = router(state).layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::SERVICE_UNAVAILABLE,
        request_timeout,
    ));
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_timeout_ms));
    tokio::pin!(shutdown);
    loop {
        // Wait for a free slot before accepting: past the cap, connections
        // wait in the kernel's backlog instead of costing us memory.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, usually: back off instead of
                    // spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        match &tls {
            None => {
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                // The TLS handshake within the header timeout too: a client
                // that stalls in it holds nothing for long.
                let (acceptor, http, watcher) =
                    (acceptor.clone(), http.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(header_timeout, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let conn = watcher.watch(http.serve_connection(TokioIo::new(stream), svc));
                    let _ = conn.await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after 5 s of shutdown; dropped");
    }
    Ok(())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

async fn require_publisher(
    State(state): State<HttpState>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(token) = bearer(&headers) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            "missing `Authorization: Bearer <publisher token>`",
        )
        .into_response();
    };
    match state.keys.verify_publisher(token) {
        Ok(claims) => {
            req.extensions_mut().insert(Publisher(claims.sub));
            next.run(req).await
        }
        Err(e) => ApiError::auth(e).into_response(),
    }
}

async fn require_internal(
    State(state): State<HttpState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(keys) = &state.internal else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "the internal API is off on this node (auth.internal_secret unset)",
        )
        .into_response();
    };
    let Some(token) = bearer(&headers) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            "missing `Authorization: Bearer <internal token>`",
        )
        .into_response();
    };
    match keys.verify_internal(token) {
        Ok(_) => next.run(req).await,
        Err(e) => ApiError::auth(e).into_response(),
    }
}

/// `/readyz`: 200 `{"ready":true}` when this process can serve, else 503
/// with the reasons (what load balancers and orchestrators check;
/// `/healthz` only says the process is alive).
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let r = state.ready.check(&state.engine).await;
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r))
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

async fn view(state: &HttpState, id: u64) -> ApiResult<ConversationView> {
    let conv = state.engine.conversation(id).await?;
    let (members, more) = state
        .engine
        .members_page(id, 0, state.limits.member_page)
        .await?;
    Ok(ConversationView {
        id: conv.id,
        name: conv.name,
        members,
        member_count: conv.member_count,
        members_more: more,
        tier: conv.tier.into(),
        pinned_tier: conv.pinned_tier.map(u8::from),
        created_ms: conv.created_ms,
    })
}

async fn create_conversation(
    State(state): State<HttpState>,
    ApiJson(req): ApiJson<CreateConversation>,
) -> ApiResult<(StatusCode, Json<ConversationView>)> {
    let conv = state
        .engine
        .create_conversation(req.id, req.name, &req.members)
        .await?;
    Ok((StatusCode::CREATED, Json(view(&state, conv.id).await?)))
}

async fn get_conversation(
    State(state): State<HttpState>,
    ApiPath(id): ApiPath<u64>,
) -> ApiResult<Json<ConversationView>> {
    Ok(Json(view(&state, id).await?))
}

async fn list_members(
    State(state): State<HttpState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<MembersQuery>,
) -> ApiResult<Json<MembersPage>> {
    state.engine.conversation(id).await?;
    let limit = q.limit.unwrap_or(state.limits.member_page);
    let (members, more) = state
        .engine
        .members_page(id, q.after.unwrap_or(0), limit)
        .await?;
    let next = if more { members.last().copied() } else { None };
    Ok(Json(MembersPage { members, next }))
}

async fn add_members(
    State(state): State<HttpState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<AddMembers>,
) -> ApiResult<Json<ConversationView>> {
    state.engine.add_members(id, &req.users).await?;
    Ok(Json(view(&state, id).await?))
}

/// The engine's store, for edge processes (`store::remote`).
async fn store_call(
    State(state): State<HttpState>,
    ApiJson(call): ApiJson<crate::store::remote::Call>,
) -> Response {
    state
        .engine
        .metrics()
        .internal_store_calls
        .get_or_create(&crate::metrics::OpLabel { op: call.op() })
        .inc();
    match crate::store::remote::serve(state.engine.store().as_ref(), call).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, Json(e)).into_response(),
    }
}

async fn pin_tier(
    State(state): State<HttpState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<PinTier>,
) -> ApiResult<Json<ConversationView>> {
    let tier = match req.tier {
        None => None,
        Some(t) => Some(
            Tier::from_u8(t).ok_or_else(|| ApiError::invalid("tier must be 1, 2, 3 or null"))?,
        ),
    };
    state.engine.pin_tier(id, tier).await?;
    Ok(Json(view(&state, id).await?))
}

async fn remove_member(
    State(state): State<HttpState>,
    ApiPath((id, user)): ApiPath<(u64, u64)>,
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
    Extension(Publisher(subject)): Extension<Publisher>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<Publish>,
) -> ApiResult<(StatusCode, Json<Published>)> {
    let receipt = state
        .engine
        .send(Outgoing {
            conversation: id,
            from: Sender::Publisher {
                subject,
                as_user: req.sender.unwrap_or(0),
            },
            client_msg_id: req.client_msg_id.unwrap_or(0),
            body: Bytes::from(req.body),
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
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<HistoryView>> {
    state.engine.conversation(id).await?;
    let (messages, more) = state
        .engine
        .history(
            id,
            q.before.unwrap_or(0),
            q.after.unwrap_or(0),
            q.limit.unwrap_or(50),
        )
        .await?;
    Ok(Json(HistoryView {
        messages: messages.into_iter().map(MessageView::from).collect(),
        more,
    }))
}
