//! Ids in JSON: written as strings of decimal digits, read from either a
//! string or a number. Snowflake ids pass 2^53 within the first days of the
//! epoch, and JavaScript (and every JSON library that reads numbers as
//! doubles) silently rounds them there; a string survives every parser.
//!
//! Use with `#[serde(with = "crate::ids_json::id")]` (one id),
//! `..::opt_id` (an optional one) and `..::ids` (a list).

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serializer};

/// An id as a JSON number or string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Number(u64),
    Text(String),
}

impl Raw {
    fn id<E: de::Error>(self) -> Result<u64, E> {
        match self {
            Raw::Number(n) => Ok(n),
            Raw::Text(s) => parse(&s).ok_or_else(|| {
                E::custom(format!(
                    "`{}` is not an id (decimal digits, below 2^64)",
                    s.chars().take(32).collect::<String>()
                ))
            }),
        }
    }
}

/// An id in decimal digits only (no sign, no spaces).
pub fn parse(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

pub mod id {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        Raw::deserialize(d)?.id()
    }
}

pub mod opt_id {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<Raw>::deserialize(d)?.map(Raw::id).transpose()
    }
}

pub mod ids {
    use super::*;
    use serde::ser::SerializeSeq;

    pub fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for id in v {
            seq.serialize_element(&id.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        Vec::<Raw>::deserialize(d)?
            .into_iter()
            .map(Raw::id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct T {
        #[serde(with = "super::id")]
        a: u64,
        #[serde(with = "super::opt_id", default)]
        b: Option<u64>,
        #[serde(with = "super::ids", default)]
        c: Vec<u64>,
    }

    #[test]
    fn ids_above_2_pow_53_survive_as_strings() {
        let big = (1u64 << 53) + 1;
        let t = T {
            a: big,
            b: Some(u64::MAX),
            c: vec![1, big],
        };
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(
            text,
            format!(r#"{{"a":"{big}","b":"18446744073709551615","c":["1","{big}"]}}"#)
        );
        assert_eq!(serde_json::from_str::<T>(&text).unwrap(), t);
        // Numbers are read too (exact when the sender wrote them exactly).
        let n: T = serde_json::from_str(&format!(r#"{{"a":{big},"c":[2]}}"#)).unwrap();
        assert_eq!((n.a, n.b, n.c), (big, None, vec![2]));
    }

    #[test]
    fn bad_ids_are_refused() {
        for bad in [
            r#""-1""#,
            r#""1e3""#,
            r#""""#,
            r#"" 1""#,
            r#""18446744073709551616""#,
            "-1",
            "1.5",
        ] {
            let text = format!(r#"{{"a":{bad}}}"#);
            assert!(serde_json::from_str::<T>(&text).is_err(), "{bad}");
        }
    }
}
