//! Errors as the API returns them: a status and a JSON body that says what
//! was wrong and what to do.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// A policy that does not parse: where, and why.
    #[error("line {line}: {message}")]
    Policy { line: usize, message: String },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The device flow's "not yet": the person has not approved the code.
    #[error("authorization_pending")]
    Pending,
    #[error("too many requests: slow down and retry in a minute")]
    TooMany,
    #[error("{0}")]
    Internal(String),
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        let unique = [
            rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE,
            rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY,
        ];
        if matches!(&e, rusqlite::Error::SqliteFailure(f, _) if unique.contains(&f.extended_code)) {
            return ApiError::Conflict(format!("{e}: changed at the same time, retry"));
        }
        ApiError::Internal(format!("database: {e}"))
    }
}

impl From<postgres::Error> for ApiError {
    fn from(e: postgres::Error) -> Self {
        let message = crate::db::postgres_message(&e);
        if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
            // Two server instances did the same thing at once.
            return ApiError::Conflict(format!("{message}: changed at the same time, retry"));
        }
        ApiError::Internal(format!("database: {message}"))
    }
}

impl ApiError {
    /// The HTTP status it answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::Policy { .. } | ApiError::Pending => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooMany => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(m) = &self {
            tracing::error!("{m}");
        }
        let mut body = json!({ "error": self.to_string() });
        if let ApiError::Policy { line, .. } = &self {
            body["line"] = json!(line);
        }
        if let ApiError::Pending = &self {
            body["error"] = json!("authorization_pending");
        }
        (status, axum::Json(body)).into_response()
    }
}
