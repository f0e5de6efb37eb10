//! What the demo and loadgen simulate the same way: devices (a user and
//! its place among the user's devices) and message bodies stamped with
//! their send time, so a receiver measures latency from the body alone.

use bytes::{BufMut, Bytes, BytesMut};

/// One simulated device: user `user`'s device number `slot` (1-based, at
/// most the per-user device limit). The edge issues the real device id;
/// this is the simulator's own name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SimDevice {
    pub user: u64,
    pub slot: u64,
}

impl SimDevice {
    /// Users 1..=`users`, each with devices 1..=`per_user`, in user order:
    /// device `i` is user `i / per_user + 1`.
    pub fn all(users: u64, per_user: u64) -> impl Iterator<Item = SimDevice> {
        (1..=users).flat_map(move |user| (1..=per_user).map(move |slot| SimDevice { user, slot }))
    }

    /// The user's first device sends for the user.
    pub fn sends(&self) -> bool {
        self.slot == 1
    }

    /// The device name given at connect (`prefix-user-slot`).
    pub fn label(&self, prefix: &str) -> String {
        format!("{prefix}-{}-{}", self.user, self.slot)
    }
}

/// The backend publishing `body` into `conversation` over the HTTP API at
/// `api` (`http://host:port`) with a publisher `token`; the message's id.
/// An error is the code a failed send is counted under: `http_STATUS`,
/// `http_unreachable`, or `bad_answer` (a 2xx without an id: the send is
/// not known to have happened).
pub async fn publish(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    conversation: u64,
    body: &[u8],
    client_msg_id: u64,
) -> Result<u64, String> {
    // As a backend publisher does: an answer that never came (the node
    // down, or restarting) or a 503 (draining) is retried with the same
    // `client_msg_id`, which the engine deduplicates, for up to 30 s with
    // a capped backoff; anything else is the answer.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        let r = http
            .post(format!("{api}/v1/conversations/{conversation}/messages"))
            .bearer_auth(token)
            .json(&serde_json::json!({
                "body": String::from_utf8_lossy(body),
                "client_msg_id": client_msg_id.to_string(),
            }))
            .send()
            .await;
        let error = match r {
            Ok(r) if r.status().is_success() => {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                return v["id"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| "bad_answer".to_owned());
            }
            Ok(r) if r.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                return Err(format!("http_{}", r.status().as_u16()));
            }
            Ok(_) => "http_503".to_owned(),
            Err(_) => "http_unreachable".to_owned(),
        };
        if tokio::time::Instant::now() + backoff > deadline {
            return Err(error);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
    }
}

/// Width of the send-time stamp at the start of a body.
pub const STAMP_BYTES: usize = 16;

/// A body of `len` bytes (at least [`STAMP_BYTES`]) that starts with
/// `sent_us` in hex, padded with dots: text, so it goes through the HTTP
/// API as it is.
pub fn stamped_body(sent_us: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len.max(STAMP_BYTES));
    b.put_slice(format!("{sent_us:016x}").as_bytes());
    while b.len() < len {
        b.put_u8(b'.');
    }
    b.freeze()
}

/// The send time a [`stamped_body`] carries.
pub fn stamp_of(body: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(body.get(..STAMP_BYTES)?).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_carries_its_stamp() {
        let b = stamped_body(0x1234_5678_9abc, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(stamp_of(&b), Some(0x1234_5678_9abc));
        assert_eq!(stamp_of(b"short"), None);
    }

    #[test]
    fn devices_are_enumerated_in_user_order() {
        let all: Vec<_> = SimDevice::all(2, 3).collect();
        assert_eq!(all.len(), 6);
        assert_eq!(all[4], SimDevice { user: 2, slot: 2 });
        assert_eq!(all.iter().filter(|d| d.sends()).count(), 2);
        assert_eq!(all[0].label("demo"), "demo-1-1");
    }
}
