//! Bearer tokens: generation, hashing, and the per-call check.
//!
//! A token is `trib_` + 32 random bytes in hex. Only its sha256 goes on the log
//! (`TokenIssued`), so neither the log nor a backup of it holds a usable secret. Lookups hash
//! the presented token and find it in the [`Directory`]; comparing hashes by map lookup leaks
//! nothing useful about the secret.

use sha2::{Digest, Sha256};
use tonic::{Request, Status};
use tributary_projections::directory::{Directory, TokenKind};

/// Who is calling.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub tenant: String,
    pub kind: TokenKind,
    /// The token's name (for `who` in events).
    pub name: String,
}

/// A fresh random token and its sha256 (hex).
pub fn new_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("trib_{}", hex::encode(bytes));
    let sha = sha256_hex(&token);
    (token, sha)
}

pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of an `Authorization` header value `Bearer <token>`: the one parser of bearer
/// headers, for gRPC calls ([`authenticate`]) and HTTP requests (`web::session::token_in`).
pub fn bearer(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Authenticates a call: `authorization: Bearer <token>` must name a live token.
pub fn authenticate<T>(directory: &Directory, request: &Request<T>) -> Result<Principal, Status> {
    let header = request.metadata().get("authorization").ok_or_else(|| {
        Status::unauthenticated(
            "missing token: pass --token or set TRIBUTARY_TOKEN (the admin token is in \
             <data>/admin.token)",
        )
    })?;
    let value = header
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not valid text"))?;
    let token = bearer(value)
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
    principal_of(directory, token)
}

/// The principal of a live token (a token presented by any means: header or cookie).
pub fn principal_of(directory: &Directory, token: &str) -> Result<Principal, Status> {
    let found = directory
        .token(&sha256_hex(token))
        .ok_or_else(|| Status::unauthenticated("unknown or revoked token"))?;
    Ok(Principal {
        tenant: found.tenant.clone(),
        kind: found.kind,
        name: found.name.clone(),
    })
}

impl Principal {
    /// People and tools: user and admin tokens.
    pub fn require_user(&self) -> Result<(), Status> {
        match self.kind {
            TokenKind::User | TokenKind::Admin => Ok(()),
            _ => Err(Status::permission_denied(format!(
                "a {} token cannot call this; use a user token",
                self.kind.name()
            ))),
        }
    }

    pub fn require_admin(&self) -> Result<(), Status> {
        if self.kind == TokenKind::Admin {
            Ok(())
        } else {
            Err(Status::permission_denied("this call needs the admin token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let (a, sha_a) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("trib_") && a.len() == 5 + 64);
        assert_eq!(sha256_hex(&a), sha_a);
    }

    #[test]
    fn bearer_headers_name_a_token() {
        assert_eq!(bearer("Bearer trib_x"), Some("trib_x"));
        assert_eq!(bearer("Bearer  trib_x "), Some("trib_x"));
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Basic dXNlcg=="), None);
        assert_eq!(bearer("trib_x"), None);
    }
}
