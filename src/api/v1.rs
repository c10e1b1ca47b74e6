//! `/api/v1`: the operator service as JSON over HTTP, the same on the Unix socket and on
//! the HTTP listener. Errors are `{"error": "...", "field": "...", "errors": [...]}` with
//! 400 (bad request, the field named), 404, 409 (the state machine refuses), 503.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;

use super::{operator_name, ApiState, Door};
use crate::operator::OpError;
use crate::outbox::{ListFilter, MessageId, State as MessageState};
use crate::rules::state::OrderContext;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/status", get(status))
        .route("/messages", get(list).post(send))
        .route("/messages/{id}", get(show))
        .route("/messages/{id}/retry", post(retry))
        .route("/messages/{id}/cancel", post(cancel))
        .route("/messages/{id}/resolve", post(resolve))
        .route("/lines", get(lines))
        .route(
            "/lines/{line}",
            axum::routing::put(set_line).delete(clear_line),
        )
        .route("/alerts", get(alerts))
        .route("/d365/unmatched", get(unmatched))
        .route("/reload", post(reload))
}

/// An operator error as an HTTP response.
#[derive(Debug)]
pub struct ApiError(pub OpError);

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = serde_json::json!({ "error": self.0.to_string() });
        match &self.0 {
            OpError::Invalid { field: Some(f), .. } => body["field"] = f.clone().into(),
            OpError::Config(errors) => body["errors"] = errors.clone().into(),
            _ => {}
        }
        (status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Who acts: the door and the name the client gives.
fn who(door: Door, headers: &HeaderMap) -> String {
    match (door, operator_name(headers)) {
        (Door::Socket, Some(n)) => format!("cli:{n}"),
        (Door::Socket, None) => "cli".into(),
        (Door::Http, Some(n)) => format!("api:{n}"),
        (Door::Http, None) => "api".into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitQuery {
    limit: Option<usize>,
}

/// D365's "message processed" events that matched no message, newest first.
async fn unmatched(
    State(s): State<ApiState>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<crate::operator::UnmatchedView> {
    Ok(Json(s.operator.unmatched(q.limit.unwrap_or(100)).await?))
}

async fn status(State(s): State<ApiState>) -> ApiResult<crate::operator::Status> {
    Ok(Json(s.operator.status().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<String>,
    order: Option<String>,
    #[serde(rename = "type")]
    message_type: Option<String>,
    line: Option<String>,
    since: Option<String>,
    until: Option<String>,
    cursor: Option<MessageId>,
    limit: Option<usize>,
    /// `true`: newest first.
    newest: Option<bool>,
}

fn bad(field: &str, message: String) -> ApiError {
    ApiError(OpError::Invalid {
        field: Some(field.into()),
        message,
    })
}

fn timestamp(field: &str, text: Option<String>) -> Result<Option<jiff::Timestamp>, ApiError> {
    text.map(|t| {
        t.parse::<jiff::Timestamp>().map_err(|e| {
            bad(
                field,
                format!(
                    "{field}={t:?}: expected an RFC 3339 time such as 2026-12-01T08:00:00Z: {e}"
                ),
            )
        })
    })
    .transpose()
}

async fn list(
    State(s): State<ApiState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::operator::MessagePage> {
    let Query(q) = query.map_err(|e| {
        ApiError(OpError::Invalid {
            field: None,
            message: e.body_text(),
        })
    })?;
    let state = q
        .state
        .map(|t| t.parse::<MessageState>().map_err(|e| bad("state", e)))
        .transpose()?;
    let filter = ListFilter {
        state,
        order: q.order.filter(|o| !o.is_empty()),
        message_type: q.message_type.filter(|t| !t.is_empty()),
        line: q.line.filter(|l| !l.is_empty()),
        since: timestamp("since", q.since)?,
        until: timestamp("until", q.until)?,
    };
    Ok(Json(
        s.operator
            .list(
                filter,
                q.cursor,
                q.limit.unwrap_or(100),
                q.newest.unwrap_or(false),
            )
            .await?,
    ))
}

async fn show(
    State(s): State<ApiState>,
    Path(id): Path<MessageId>,
) -> ApiResult<crate::outbox::Record> {
    Ok(Json(s.operator.show(id).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    /// The edited `_messageContent` object.
    content: Option<serde_json::Value>,
}

/// A JSON body that may be absent (an empty POST).
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError(OpError::Invalid {
            field: None,
            message: format!("body is not the expected JSON: {e}"),
        })
    })
}

async fn retry(
    State(s): State<ApiState>,
    Extension(door): Extension<Door>,
    headers: HeaderMap,
    Path(id): Path<MessageId>,
    body: axum::body::Bytes,
) -> ApiResult<crate::outbox::Record> {
    let body: RetryBody = optional_body(&body)?;
    Ok(Json(
        s.operator
            .retry(id, body.content, &who(door, &headers))
            .await?,
    ))
}

async fn cancel(
    State(s): State<ApiState>,
    Extension(door): Extension<Door>,
    headers: HeaderMap,
    Path(id): Path<MessageId>,
) -> ApiResult<crate::outbox::Record> {
    Ok(Json(s.operator.cancel(id, &who(door, &headers)).await?))
}

async fn resolve(
    State(s): State<ApiState>,
    Extension(door): Extension<Door>,
    headers: HeaderMap,
    Path(id): Path<MessageId>,
) -> ApiResult<crate::outbox::Record> {
    Ok(Json(s.operator.resolve(id, &who(door, &headers)).await?))
}

#[derive(Debug, Deserialize)]
pub struct SendQuery {
    /// The message type when the body is the content alone.
    #[serde(rename = "type")]
    message_type: Option<String>,
}

async fn send(
    State(s): State<ApiState>,
    Extension(door): Extension<Door>,
    headers: HeaderMap,
    Query(q): Query<SendQuery>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<crate::outbox::Record>), ApiError> {
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError(OpError::Invalid {
            field: None,
            message: format!("body is not JSON: {e}"),
        })
    })?;
    let record = s
        .operator
        .send(value, q.message_type.as_deref(), &who(door, &headers))
        .await?;
    Ok((StatusCode::CREATED, Json(record)))
}

async fn lines(State(s): State<ApiState>) -> ApiResult<crate::operator::LinesView> {
    Ok(Json(s.operator.lines().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineBody {
    order: String,
    item: Option<String>,
    operation: Option<String>,
    resource: Option<String>,
}

async fn set_line(
    State(s): State<ApiState>,
    Extension(door): Extension<Door>,
    headers: HeaderMap,
    Path(line): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<serde_json::Value> {
    let body: LineBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError(OpError::Invalid {
            field: None,
            message: format!(
                "body must be {{\"order\": …, \"item\", \"operation\", \"resource\"}}: {e}"
            ),
        })
    })?;
    let context = OrderContext {
        order: body.order,
        item: body.item.filter(|s| !s.is_empty()),
        operation: body.operation.filter(|s| !s.is_empty()),
        resource: body.resource.filter(|s| !s.is_empty()),
        since: None,
    };
    let previous = s
        .operator
        .set_line(&line, Some(context), &who(door, &headers))
        .await?;
    Ok(Json(
        serde_json::json!({ "line": line, "previous": previous }),
    ))
}

async fn clear_line(
    State(s): State<ApiState>,
    Extension(door): Extension<Door>,
    headers: HeaderMap,
    Path(line): Path<String>,
) -> ApiResult<serde_json::Value> {
    let previous = s
        .operator
        .set_line(&line, None, &who(door, &headers))
        .await?;
    Ok(Json(
        serde_json::json!({ "line": line, "previous": previous }),
    ))
}

async fn alerts(State(s): State<ApiState>) -> ApiResult<Vec<crate::alert::Alert>> {
    Ok(Json(s.alerts.open_alerts()))
}

async fn reload(
    State(s): State<ApiState>,
    Extension(door): Extension<Door>,
    headers: HeaderMap,
) -> ApiResult<serde_json::Value> {
    let summary = s.operator.reload(&who(door, &headers)).await?;
    Ok(Json(serde_json::json!({ "reloaded": summary })))
}
