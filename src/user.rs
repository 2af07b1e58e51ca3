//! The validated user identity. Every path from a client string to a container goes through
//! `UserId::parse`, so nothing unvalidated can reach a Docker name, label or workspace path.

use std::fmt;

/// A user id: 1–32 characters of `a-z0-9` (numeric ids are the common case).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("user id must be 1-32 characters of a-z and 0-9")]
pub struct InvalidUserId;

impl UserId {
    pub fn parse(s: &str) -> Result<Self, InvalidUserId> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidUserId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_numeric_and_lowercase() {
        assert!(UserId::parse("42").is_ok());
        assert!(UserId::parse("abc123").is_ok());
        assert!(UserId::parse(&"a".repeat(32)).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", "A", "a-b", "a.b", "../x", "a b", "é", &"a".repeat(33)] {
            assert_eq!(UserId::parse(bad), Err(InvalidUserId), "{bad:?}");
        }
    }
}
