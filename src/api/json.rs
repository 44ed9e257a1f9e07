//! Request and response bodies: `ApiJson` turns every way a JSON body can be
//! wrong (syntax, types, unknown fields, missing content type, too large)
//! into a 400 in the contract's shape; `Data` is the `{"data": ...}` envelope.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Error;

pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(Error::BadRequest(rejection_message(&rejection))),
        }
    }
}

fn rejection_message(r: &JsonRejection) -> String {
    match r {
        JsonRejection::JsonDataError(e) => {
            // serde's message names the field path and the expected type.
            let text = e.body_text();
            let detail = text.strip_prefix("Failed to deserialize the JSON body into the target type: ").unwrap_or(&text);
            format!("invalid request body: {detail}")
        }
        JsonRejection::JsonSyntaxError(e) => format!("malformed JSON: {}", e.body_text()),
        JsonRejection::MissingJsonContentType(_) => "Content-Type must be application/json".into(),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            "request body is too large".into()
        }
        other => format!("invalid request body: {}", other.body_text()),
    }
}

/// The success envelope `{"data": ...}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Data<T> {
    pub data: T,
}

/// 200 with `{"data": value}`.
pub fn ok<T: Serialize>(value: T) -> Response {
    Json(Data { data: value }).into_response()
}

/// 201 with `{"data": value}`.
pub fn created<T: Serialize>(value: T) -> Response {
    (StatusCode::CREATED, Json(Data { data: value })).into_response()
}

/// The page size of a list query: `default` when absent, else 1-100.
pub fn page_limit(limit: Option<u32>, default: u32) -> Result<u32, Error> {
    let limit = limit.unwrap_or(default);
    if !(1..=100).contains(&limit) {
        return Err(Error::bad_request(format!("limit must be 1-100 (got {limit})")));
    }
    Ok(limit)
}
