//! Token verification (`TokenKeys::verify`, `verify_user`,
//! `verify_publisher`) on hostile tokens, with one key made by
//! `TokenKeys::new`. The first byte picks a mode:
//!
//! - even: the rest, as UTF-8, is the token itself. A forged token almost
//!   never carries a valid signature, so this exercises the parsing of the
//!   three parts, the header, the key lookup and the signature check.
//! - odd: the rest is the claims JSON (bit 1 set: `header JSON \n claims`),
//!   signed here with the right key, so the claim checks behind the
//!   signature (expiry, lifetime, subject, role) see hostile claims too.
//!   `$NOW` in the claims becomes the current time plus an hour.
//!
//! None may panic, and the entry points must agree with each other.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tiercast_engine::auth::{PUBLISHER_ROLE, TokenKeys, now_unix};
use tiercast_fuzz::{NOW_OFFSET_SECS, NOW_PLACEHOLDER, TOKEN_SECRET, signed_token, token_header};

fn check(keys: &TokenKeys, token: &str) {
    let claims = keys.verify(token);
    let user = keys.verify_user(token);
    let publisher = keys.verify_publisher(token);
    let Ok(c) = &claims else {
        assert!(user.is_err(), "verify refused, verify_user accepted");
        assert!(
            publisher.is_err(),
            "verify refused, verify_publisher accepted"
        );
        return;
    };
    if let Ok(id) = &user {
        assert_eq!(id.expires_unix, c.exp);
        assert_eq!(id.convs, c.convs);
        assert_ne!(c.role.as_deref(), Some(PUBLISHER_ROLE));
    }
    if let Ok(p) = &publisher {
        assert_eq!(p, c);
        assert_eq!(p.role.as_deref(), Some(PUBLISHER_ROLE));
    }
    // Minting the claims back gives a token that verifies to them (unless
    // they are about to expire).
    if c.exp > now_unix() + 60 {
        assert_eq!(keys.verify(&keys.mint(c)).as_ref(), Ok(c));
    }
}

fn header() -> &'static [u8] {
    static HEADER: OnceLock<Vec<u8>> = OnceLock::new();
    HEADER.get_or_init(token_header)
}

/// `claims` with each `$NOW` replaced by the time an hour from now.
fn with_now(claims: &[u8]) -> Vec<u8> {
    let now = (now_unix() + NOW_OFFSET_SECS).to_string();
    let mut out = Vec::with_capacity(claims.len() + 8);
    let mut rest = claims;
    while !rest.is_empty() {
        if rest.starts_with(NOW_PLACEHOLDER) {
            out.extend_from_slice(now.as_bytes());
            rest = &rest[NOW_PLACEHOLDER.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

fuzz_target!(
    init: tiercast_fuzz::write_seeds_if_asked(tiercast_fuzz::token_seeds),
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        let keys = TokenKeys::new(TOKEN_SECRET);
        if mode & 1 == 0 {
            if let Ok(token) = std::str::from_utf8(rest) {
                check(&keys, token);
            }
            return;
        }
        let split = (mode & 2 != 0)
            .then(|| rest.iter().position(|&b| b == b'\n'))
            .flatten();
        let token = match split {
            Some(i) => signed_token(&rest[..i], &with_now(&rest[i + 1..])),
            None => signed_token(header(), &with_now(rest)),
        };
        check(&keys, &token);
    }
);
