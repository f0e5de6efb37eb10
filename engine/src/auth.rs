//! Tokens: HS256 JWTs. A client token says who the user is (`sub`, the user
//! id in decimal) until when (`exp`); a publisher token (`role` =
//! `"publisher"`) lets a backend use the engine's HTTP API.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

pub const PUBLISHER_ROLE: &str = "publisher";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// When present, the only conversations this token may send to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convs: Option<Vec<u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token subject is not a user id")]
    BadSubject,
    #[error("token lacks the publisher role")]
    NotPublisher,
}

/// A verified client identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: u64,
    pub convs: Option<Vec<u64>>,
    pub expires_unix: u64,
}

impl Identity {
    pub fn may_send_to(&self, conv: u64) -> bool {
        self.convs.as_ref().is_none_or(|c| c.contains(&conv))
    }
}

#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn mint(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// A client token for `user` valid for `ttl_secs` from `now_unix`.
    pub fn mint_user(&self, user: u64, now_unix: u64, ttl_secs: u64) -> String {
        self.mint(&Claims {
            sub: user.to_string(),
            exp: now_unix + ttl_secs,
            iat: now_unix,
            role: None,
            convs: None,
        })
    }

    pub fn mint_publisher(&self, name: &str, now_unix: u64, ttl_secs: u64) -> String {
        self.mint(&Claims {
            sub: name.to_owned(),
            exp: now_unix + ttl_secs,
            iat: now_unix,
            role: Some(PUBLISHER_ROLE.to_owned()),
            convs: None,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })
    }

    pub fn verify_user(&self, token: &str) -> Result<Identity, AuthError> {
        let c = self.verify(token)?;
        let user = c.sub.parse().map_err(|_| AuthError::BadSubject)?;
        Ok(Identity {
            user,
            convs: c.convs,
            expires_unix: c.exp,
        })
    }

    pub fn verify_publisher(&self, token: &str) -> Result<Claims, AuthError> {
        let c = self.verify(token)?;
        if c.role.as_deref() != Some(PUBLISHER_ROLE) {
            return Err(AuthError::NotPublisher);
        }
        Ok(c)
    }
}

pub fn now_unix() -> u64 {
    crate::snowflake::now_unix_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_expiry_and_wrong_key() {
        let keys = TokenKeys::new(b"secret-one");
        let now = now_unix();
        let t = keys.mint_user(42, now, 60);
        assert_eq!(keys.verify_user(&t).unwrap().user, 42);

        let expired = keys.mint_user(42, now - 120, 60);
        assert_eq!(keys.verify_user(&expired), Err(AuthError::Expired));

        let other = TokenKeys::new(b"secret-two");
        assert!(matches!(other.verify_user(&t), Err(AuthError::Invalid(_))));
        assert!(matches!(
            keys.verify_user("not.a.jwt"),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn publisher_role_is_required_for_the_api() {
        let keys = TokenKeys::new(b"s");
        let now = now_unix();
        assert!(
            keys.verify_publisher(&keys.mint_publisher("backend", now, 60))
                .is_ok()
        );
        assert_eq!(
            keys.verify_publisher(&keys.mint_user(1, now, 60)),
            Err(AuthError::NotPublisher)
        );
        let named = keys.mint_publisher("backend", now, 60);
        assert_eq!(keys.verify_user(&named), Err(AuthError::BadSubject));
    }
}
