//! Tokens: HS256 JWTs with a `kid` header, in three roles with three uses.
//!
//! - user tokens (no `role`, or `"user"`): QUIC only; `sub` is the user id
//!   in canonical decimal (> 0); an optional `convs` claim lists the only
//!   conversations the token may send to;
//! - publisher tokens (`role` = `"publisher"`): the `/v1` HTTP API only;
//!   `sub` names the backend (its idempotency scope);
//! - internal tokens (`role` = `"internal"`): edge-to-engine calls
//!   (`/internal/store`), signed with a secret of their own
//!   (`auth.internal_secret`) so that neither a user nor a publisher
//!   credential, nor the key that mints them, opens the raw store.
//!
//! Every token needs `exp`; `nbf` is honoured; a token living longer than
//! `auth.max_token_lifetime_s` from now is refused. Keys rotate without
//! downtime: new tokens are signed with the current key (`auth.kid`),
//! tokens are verified with whichever configured key their `kid` names
//! (`auth.verify_keys` keeps the previous one for a while). Errors say what
//! is wrong in the caller's terms (docs/security.md).

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

pub const PUBLISHER_ROLE: &str = "publisher";
pub const USER_ROLE: &str = "user";
pub const INTERNAL_ROLE: &str = "internal";

/// The key id of a single configured secret.
pub const DEFAULT_KID: &str = "k1";

/// Longest accepted lifetime unless configured: a week covers a device's
/// refresh cycle and a backend's deploy cycle; longer-lived bearer tokens
/// are a liability when they leak.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 7 * 24 * 3600;

/// Smallest secret accepted for HS256: 256 bits, the hash's own size.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// When present, the only conversations this token may send to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convs: Option<Vec<u64>>,
}

/// Why a token was refused, in the caller's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token must be signed with HS256")]
    WrongAlgorithm,
    #[error("token has no key id (kid header)")]
    NoKeyId,
    #[error("token key id `{0}` is not a current key (rotated out?)")]
    UnknownKey(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token lacks the `{0}` claim")]
    MissingClaim(String),
    #[error("token lives longer than the {max_secs} s allowed")]
    TooLong { max_secs: u64 },
    #[error("token subject must be a user id in decimal, above 0")]
    BadSubject,
    #[error("a {got} token cannot be used here (a {want} token is needed)")]
    WrongRole { want: &'static str, got: String },
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
        convs_allow(self.convs.as_deref(), conv)
    }
}

/// Whether a token's `convs` claim (none: every conversation the user is a
/// member of) lets it send to `conv`. Membership is checked apart, in the
/// store.
pub fn convs_allow(convs: Option<&[u64]>, conv: u64) -> bool {
    convs.is_none_or(|c| c.contains(&conv))
}

/// The keys tokens are signed and verified with. Cheap to clone (shared):
/// the HTTP API's state holds one, and axum clones the state for every
/// request.
#[derive(Clone)]
pub struct TokenKeys {
    inner: std::sync::Arc<Keys>,
}

struct Keys {
    kid: String,
    encoding: EncodingKey,
    decoding: HashMap<String, DecodingKey>,
    validation: Validation,
    max_lifetime_secs: u64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("kid", &self.inner.kid)
            .field(
                "verify_kids",
                &self.inner.decoding.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl TokenKeys {
    /// One key (`kid` [`DEFAULT_KID`]) that signs and verifies.
    pub fn new(secret: &[u8]) -> Self {
        Self::with_keys(DEFAULT_KID, secret, &[], DEFAULT_MAX_LIFETIME_SECS)
    }

    /// Signs with `secret` as `kid`; verifies tokens of that key and of
    /// `others` (`(kid, secret)`), each by the key its `kid` names.
    pub fn with_keys(
        kid: &str,
        secret: &[u8],
        others: &[(String, Vec<u8>)],
        max_lifetime_secs: u64,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        let mut decoding: HashMap<String, DecodingKey> = others
            .iter()
            .map(|(k, s)| (k.clone(), DecodingKey::from_secret(s)))
            .collect();
        decoding.insert(kid.to_owned(), DecodingKey::from_secret(secret));
        Self {
            inner: std::sync::Arc::new(Keys {
                kid: kid.to_owned(),
                encoding: EncodingKey::from_secret(secret),
                decoding,
                validation,
                max_lifetime_secs,
            }),
        }
    }

    pub fn kid(&self) -> &str {
        &self.inner.kid
    }

    pub fn mint(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.inner.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.inner.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    fn claims(sub: String, role: Option<&str>, now_unix: u64, ttl_secs: u64) -> Claims {
        Claims {
            sub,
            exp: now_unix + ttl_secs,
            iat: now_unix,
            nbf: None,
            role: role.map(str::to_owned),
            convs: None,
        }
    }

    /// A client token for `user` valid for `ttl_secs` from `now_unix`.
    pub fn mint_user(&self, user: u64, now_unix: u64, ttl_secs: u64) -> String {
        self.mint(&Self::claims(user.to_string(), None, now_unix, ttl_secs))
    }

    pub fn mint_publisher(&self, name: &str, now_unix: u64, ttl_secs: u64) -> String {
        self.mint(&Self::claims(
            name.to_owned(),
            Some(PUBLISHER_ROLE),
            now_unix,
            ttl_secs,
        ))
    }

    pub fn mint_internal(&self, name: &str, now_unix: u64, ttl_secs: u64) -> String {
        self.mint(&Self::claims(
            name.to_owned(),
            Some(INTERNAL_ROLE),
            now_unix,
            ttl_secs,
        ))
    }

    /// Verifies signature, key id, `exp`, `nbf` and lifetime (any role).
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::WrongAlgorithm);
        }
        let kid = header.kid.ok_or(AuthError::NoKeyId)?;
        let key = self
            .inner
            .decoding
            .get(&kid)
            .ok_or_else(|| AuthError::UnknownKey(printable(&kid)))?;
        // Into plain JSON first, so the standard checks (required claims,
        // exp, nbf) run and name what is missing before our own shape does.
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, key, &self.inner.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm
                }
                ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(printable(c)),
                _ => AuthError::Malformed,
            })?;
        let claims: Claims = serde_json::from_value(claims).map_err(|_| AuthError::Malformed)?;
        if claims.exp > now_unix().saturating_add(self.inner.max_lifetime_secs) {
            return Err(AuthError::TooLong {
                max_secs: self.inner.max_lifetime_secs,
            });
        }
        Ok(claims)
    }

    /// A user token (refused for any other role).
    pub fn verify_user(&self, token: &str) -> Result<Identity, AuthError> {
        let c = self.verify(token)?;
        match c.role.as_deref() {
            None | Some(USER_ROLE) => {}
            Some(other) => {
                return Err(AuthError::WrongRole {
                    want: USER_ROLE,
                    got: printable(other),
                });
            }
        }
        Ok(Identity {
            user: parse_user_id(&c.sub).ok_or(AuthError::BadSubject)?,
            convs: c.convs,
            expires_unix: c.exp,
        })
    }

    pub fn verify_publisher(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_role(token, PUBLISHER_ROLE)
    }

    pub fn verify_internal(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_role(token, INTERNAL_ROLE)
    }

    fn verify_role(&self, token: &str, want: &'static str) -> Result<Claims, AuthError> {
        let c = self.verify(token)?;
        if c.role.as_deref() != Some(want) {
            return Err(AuthError::WrongRole {
                want,
                got: printable(c.role.as_deref().unwrap_or(USER_ROLE)),
            });
        }
        if c.sub.is_empty() || c.sub.len() > 128 || c.sub.chars().any(char::is_control) {
            return Err(AuthError::MissingClaim("sub".into()));
        }
        Ok(c)
    }
}

/// A user id in canonical decimal: digits only, no sign, no leading zero,
/// above 0 and within 64 bits. ("+1", "01", "0" and " 1" are refused, so one
/// user has exactly one spelling.)
pub fn parse_user_id(s: &str) -> Option<u64> {
    let canonical = !s.is_empty()
        && s.len() <= 20
        && s.bytes().all(|b| b.is_ascii_digit())
        && !s.starts_with('0');
    canonical.then(|| s.parse().ok()).flatten()
}

/// A caller-given string cut and cleaned for an error message.
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}

pub fn now_unix() -> u64 {
    crate::snowflake::now_unix_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &[u8] = b"secret-one-secret-one-secret-one";
    const TWO: &[u8] = b"secret-two-secret-two-secret-two";

    #[test]
    fn round_trip_expiry_and_wrong_key() {
        let keys = TokenKeys::new(ONE);
        let now = now_unix();
        let t = keys.mint_user(42, now, 60);
        assert_eq!(keys.verify_user(&t).unwrap().user, 42);

        let expired = keys.mint_user(42, now - 120, 60);
        assert_eq!(keys.verify_user(&expired), Err(AuthError::Expired));

        let other = TokenKeys::new(TWO);
        assert_eq!(other.verify_user(&t), Err(AuthError::BadSignature));
        assert_eq!(keys.verify_user("not.a.jwt"), Err(AuthError::Malformed));
        assert_eq!(keys.verify_user(""), Err(AuthError::Malformed));
    }

    #[test]
    fn roles_do_not_cross() {
        let keys = TokenKeys::new(ONE);
        let now = now_unix();
        let publisher = keys.mint_publisher("backend", now, 60);
        assert!(keys.verify_publisher(&publisher).is_ok());
        assert!(matches!(
            keys.verify_publisher(&keys.mint_user(1, now, 60)),
            Err(AuthError::WrongRole {
                want: "publisher",
                ..
            })
        ));
        assert!(matches!(
            keys.verify_user(&publisher),
            Err(AuthError::WrongRole { want: "user", .. })
        ));
        // A publisher token whose subject looks like a user id is still not
        // a user token.
        let numeric = keys.mint_publisher("7", now, 60);
        assert!(matches!(
            keys.verify_user(&numeric),
            Err(AuthError::WrongRole { .. })
        ));
        assert!(matches!(
            keys.verify_internal(&publisher),
            Err(AuthError::WrongRole {
                want: "internal",
                ..
            })
        ));
        assert!(
            keys.verify_internal(&keys.mint_internal("edge", now, 60))
                .is_ok()
        );
    }

    #[test]
    fn subjects_are_canonical_user_ids() {
        for bad in [
            "0",
            "+1",
            "01",
            " 1",
            "1 ",
            "-1",
            "",
            "1e3",
            "18446744073709551616",
        ] {
            assert_eq!(parse_user_id(bad), None, "{bad:?}");
        }
        assert_eq!(parse_user_id("1"), Some(1));
        assert_eq!(parse_user_id("18446744073709551615"), Some(u64::MAX));
        let keys = TokenKeys::new(ONE);
        let now = now_unix();
        for sub in ["0", "+1", "01"] {
            let t = keys.mint(&Claims {
                sub: sub.into(),
                exp: now + 60,
                iat: now,
                nbf: None,
                role: None,
                convs: None,
            });
            assert_eq!(keys.verify_user(&t), Err(AuthError::BadSubject), "{sub}");
        }
    }

    #[test]
    fn nbf_lifetime_and_missing_exp() {
        let keys = TokenKeys::with_keys("k1", ONE, &[], 3600);
        let now = now_unix();
        let early = keys.mint(&Claims {
            sub: "1".into(),
            exp: now + 600,
            iat: now,
            nbf: Some(now + 300),
            role: None,
            convs: None,
        });
        assert_eq!(keys.verify_user(&early), Err(AuthError::NotYetValid));
        let long = keys.mint_user(1, now, 7200);
        assert_eq!(
            keys.verify_user(&long),
            Err(AuthError::TooLong { max_secs: 3600 })
        );
        // No exp at all.
        let header = Header {
            kid: Some("k1".into()),
            ..Header::new(Algorithm::HS256)
        };
        let no_exp = jsonwebtoken::encode(
            &header,
            &serde_json::json!({"sub": "1"}),
            &EncodingKey::from_secret(ONE),
        )
        .unwrap();
        assert_eq!(
            keys.verify_user(&no_exp),
            Err(AuthError::MissingClaim("exp".into()))
        );
    }

    #[test]
    fn keys_rotate_by_kid() {
        let now = now_unix();
        let old = TokenKeys::with_keys("k1", ONE, &[], 3600);
        let old_token = old.mint_user(5, now, 60);
        // The rotation: k2 signs, k1 still verifies.
        let during = TokenKeys::with_keys("k2", TWO, &[("k1".into(), ONE.to_vec())], 3600);
        assert_eq!(during.verify_user(&old_token).unwrap().user, 5);
        let new_token = during.mint_user(5, now, 60);
        assert_eq!(during.verify_user(&new_token).unwrap().user, 5);
        // k1 retired.
        let after = TokenKeys::with_keys("k2", TWO, &[], 3600);
        assert_eq!(
            after.verify_user(&old_token),
            Err(AuthError::UnknownKey("k1".into()))
        );
        // A token without a kid.
        let bare = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &TokenKeys::claims("5".into(), None, now, 60),
            &EncodingKey::from_secret(TWO),
        )
        .unwrap();
        assert_eq!(after.verify_user(&bare), Err(AuthError::NoKeyId));
        // A token signed by k1's secret but claiming k2.
        let forged = TokenKeys::with_keys("k2", ONE, &[], 3600).mint_user(5, now, 60);
        assert_eq!(after.verify_user(&forged), Err(AuthError::BadSignature));
    }
}
