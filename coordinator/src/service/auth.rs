//! Bearer-token checks: the server's interceptor, the client's header, and reading tokens.

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The environment variable a token may come from.
pub const TOKEN_ENV: &str = "LORASWEEP_TOKEN";

/// Why a token is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Empty, or with characters a header cannot carry.
    #[error(
        "invalid token from {origin}: expected 16 to 512 visible ASCII characters without spaces"
    )]
    Invalid {
        /// Where it came from.
        origin: String,
    },
}

/// Checks a token (surrounding whitespace removed): 16 to 512 visible ASCII characters.
pub fn validate_token(raw: &str, origin: &str) -> Result<String, TokenError> {
    let token = raw.trim();
    let visible = token.chars().all(|character| character.is_ascii_graphic());
    if token.len() < 16 || token.len() > 512 || !visible {
        return Err(TokenError::Invalid {
            origin: origin.to_string(),
        });
    }
    Ok(token.to_string())
}

/// Reads and checks a token file.
pub fn read_token_file(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.display().to_string(),
        source,
    })?;
    validate_token(&text, &path.display().to_string())
}

/// The token from `--token-file` if given, else from `LORASWEEP_TOKEN`, else none.
pub fn token_from(file: Option<&Path>) -> Result<Option<String>, TokenError> {
    if let Some(path) = file {
        return read_token_file(path).map(Some);
    }
    match std::env::var(TOKEN_ENV) {
        Ok(value) if !value.trim().is_empty() => validate_token(&value, TOKEN_ENV).map(Some),
        _ => Ok(None),
    }
}

/// A new random token (64 hex digits).
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// Server side: refuses a call without `authorization: Bearer <token>` when a token is set.
#[derive(Clone)]
pub struct RequireToken {
    expected: Option<Arc<str>>,
}

impl RequireToken {
    /// Checks for this token; with `None`, lets every call through.
    pub fn new(expected: Option<&str>) -> RequireToken {
        RequireToken {
            expected: expected.map(Arc::from),
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match given {
            Some(token) if constant_time_equal(token.as_bytes(), expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "wrong bearer token: use the coordinator's token (--token-file or LORASWEEP_TOKEN)",
            )),
            None => Err(Status::unauthenticated(
                "missing bearer token: this coordinator needs one (--token-file or LORASWEEP_TOKEN)",
            )),
        }
    }
}

/// Client side: adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct AttachToken {
    header: Option<MetadataValue<Ascii>>,
}

impl AttachToken {
    /// Attaches this token (already validated), or nothing.
    pub fn new(token: Option<&str>) -> Result<AttachToken, TokenError> {
        let header = match token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| TokenError::Invalid {
                        origin: "client token".to_string(),
                    })?,
            ),
            None => None,
        };
        Ok(AttachToken { header })
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_be_long_visible_ascii() {
        assert!(validate_token("  0123456789abcdef\n", "test").is_ok());
        assert!(validate_token("short", "test").is_err());
        assert!(validate_token("0123456789 abcdef", "test").is_err());
        assert_eq!(generate_token().len(), 64);
    }

    #[test]
    fn the_interceptor_accepts_only_the_right_token() {
        let mut check = RequireToken::new(Some("0123456789abcdef"));
        let mut attach = AttachToken::new(Some("0123456789abcdef")).unwrap();
        assert!(check.call(attach.call(Request::new(())).unwrap()).is_ok());
        let mut wrong = AttachToken::new(Some("fedcba9876543210")).unwrap();
        let refused = check
            .call(wrong.call(Request::new(())).unwrap())
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(refused.message().contains("wrong bearer token"));
        let missing = check.call(Request::new(())).unwrap_err();
        assert!(missing.message().contains("missing bearer token"));
        assert!(RequireToken::new(None).call(Request::new(())).is_ok());
    }
}
