//! A2A errors as tether problems: the HTTP status the A2A spec gives each error, with the
//! A2A error's name and JSON-RPC code as Problem+JSON extension members (`a2aError`,
//! `a2aCode`), so the bus and the HTTP bridge report the same thing.

use a2a::error_code;
use tether_bus::Problem;

/// Extension member naming the A2A error (e.g. `TaskNotFound`).
pub const A2A_ERROR: &str = "a2aError";
/// Extension member carrying the A2A error's JSON-RPC code (e.g. -32001).
pub const A2A_CODE: &str = "a2aCode";

/// The A2A errors the gateway answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum A2aError {
    TaskNotFound,
    TaskNotCancelable,
    PushNotificationNotSupported,
    UnsupportedOperation,
    ContentTypeNotSupported,
    InvalidAgentResponse,
    ExtendedAgentCardNotConfigured,
    VersionNotSupported,
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    Internal,
}

impl A2aError {
    pub fn name(self) -> &'static str {
        match self {
            A2aError::TaskNotFound => "TaskNotFound",
            A2aError::TaskNotCancelable => "TaskNotCancelable",
            A2aError::PushNotificationNotSupported => "PushNotificationNotSupported",
            A2aError::UnsupportedOperation => "UnsupportedOperation",
            A2aError::ContentTypeNotSupported => "ContentTypeNotSupported",
            A2aError::InvalidAgentResponse => "InvalidAgentResponse",
            A2aError::ExtendedAgentCardNotConfigured => "ExtendedAgentCardNotConfigured",
            A2aError::VersionNotSupported => "VersionNotSupported",
            A2aError::ParseError => "ParseError",
            A2aError::InvalidRequest => "InvalidRequest",
            A2aError::MethodNotFound => "MethodNotFound",
            A2aError::InvalidParams => "InvalidParams",
            A2aError::Internal => "InternalError",
        }
    }

    /// The JSON-RPC code.
    pub fn code(self) -> i32 {
        match self {
            A2aError::TaskNotFound => error_code::TASK_NOT_FOUND,
            A2aError::TaskNotCancelable => error_code::TASK_NOT_CANCELABLE,
            A2aError::PushNotificationNotSupported => error_code::PUSH_NOTIFICATION_NOT_SUPPORTED,
            A2aError::UnsupportedOperation => error_code::UNSUPPORTED_OPERATION,
            A2aError::ContentTypeNotSupported => error_code::CONTENT_TYPE_NOT_SUPPORTED,
            A2aError::InvalidAgentResponse => error_code::INVALID_AGENT_RESPONSE,
            A2aError::ExtendedAgentCardNotConfigured => error_code::EXTENDED_CARD_NOT_CONFIGURED,
            A2aError::VersionNotSupported => error_code::VERSION_NOT_SUPPORTED,
            A2aError::ParseError => error_code::PARSE_ERROR,
            A2aError::InvalidRequest => error_code::INVALID_REQUEST,
            A2aError::MethodNotFound => error_code::METHOD_NOT_FOUND,
            A2aError::InvalidParams => error_code::INVALID_PARAMS,
            A2aError::Internal => error_code::INTERNAL_ERROR,
        }
    }

    /// The HTTP status the A2A spec gives the error.
    pub fn status(self) -> u16 {
        match self {
            A2aError::TaskNotFound | A2aError::MethodNotFound => 404,
            A2aError::TaskNotCancelable => 409,
            A2aError::ContentTypeNotSupported => 415,
            A2aError::InvalidAgentResponse | A2aError::Internal => 500,
            _ => 400,
        }
    }

    /// The problem a caller sees.
    pub fn problem(self, detail: impl Into<String>) -> Problem {
        self.with_status(self.status(), detail)
    }

    /// The problem with another status (e.g. 413 for an oversize message, still
    /// InvalidRequest to an A2A client).
    pub fn with_status(self, status: u16, detail: impl Into<String>) -> Problem {
        Problem::new(status, detail)
            .with_extension(A2A_ERROR, self.name())
            .with_extension(A2A_CODE, self.code())
    }

    /// The A2A error a problem names (for the bridge), else one derived from its status.
    pub fn of(p: &Problem) -> (i32, &str) {
        let code = p
            .extensions
            .get(A2A_CODE)
            .and_then(|v| v.as_i64())
            .and_then(|c| i32::try_from(c).ok());
        match code {
            Some(c) => (c, a2a::error_reason(c)),
            None => match p.status {
                404 => (error_code::METHOD_NOT_FOUND, "METHOD_NOT_FOUND"),
                400 | 401 | 403 | 413 | 422 => (error_code::INVALID_REQUEST, "INVALID_REQUEST"),
                _ => (error_code::INTERNAL_ERROR, "INTERNAL_ERROR"),
            },
        }
    }
}

pub fn not_found(task_id: &str) -> Problem {
    A2aError::TaskNotFound.problem(format!("no task {task_id:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_the_a2a_error() {
        let p = not_found("t1");
        assert_eq!(p.status, 404);
        assert_eq!(p.extensions[A2A_ERROR], "TaskNotFound");
        assert_eq!(p.extensions[A2A_CODE], -32001);
        assert_eq!(A2aError::of(&p), (-32001, "TASK_NOT_FOUND"));
        assert_eq!(A2aError::TaskNotCancelable.problem("x").status, 409);
        assert_eq!(
            A2aError::of(&Problem::unauthorized("no token")).0,
            error_code::INVALID_REQUEST
        );
    }
}
