//! Reading typed configuration from the environment, once, at start-up. Each binary declares its
//! own `Config` from these helpers; handlers never read the environment.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("missing environment variable {0}")]
    Missing(&'static str),
    #[error("environment variable {name} = {value:?} is invalid: {problem}")]
    Invalid {
        name: &'static str,
        value: String,
        problem: String,
    },
}

/// A required variable.
pub fn required(name: &'static str) -> Result<String, ConfigError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ConfigError::Missing(name)),
    }
}

/// A required secret: never printed by `Debug` or `Display`.
pub fn secret(name: &'static str) -> Result<Secret, ConfigError> {
    required(name).map(Secret)
}

/// An optional variable parsed as `T`, with a default.
pub fn parsed_or<T>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid {
                name,
                value: v,
                problem: e.to_string(),
            })
        }
        _ => Ok(default),
    }
}

/// An optional count that must be at least one (a claim size, a batch size), with a default.
pub fn count_or(name: &'static str, default: i64) -> Result<i64, ConfigError> {
    at_least_one(name, parsed_or(name, default)?)
}

fn at_least_one(name: &'static str, n: i64) -> Result<i64, ConfigError> {
    if n < 1 {
        return Err(ConfigError::Invalid {
            name,
            value: n.to_string(),
            problem: "must be at least 1".into(),
        });
    }
    Ok(n)
}

/// An optional string variable with a default.
pub fn string_or(name: &'static str, default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => default.to_string(),
    }
}

/// A string that must not appear in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares a presented value with the secret in constant time, so it cannot be guessed
    /// byte by byte (bearer tokens, webhook verify tokens).
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (given.as_bytes(), self.0.as_bytes());
        let mut diff = a.len() ^ b.len();
        for i in 0..a.len().max(b.len()) {
            diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn secret_comparison() {
        let s = Secret::new("abc");
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(!s.matches(""));
    }

    use super::*;

    #[test]
    fn counts_below_one_are_refused() {
        for bad in [0, -3] {
            let err = at_least_one("CLAIM_PER_DEVICE", bad)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("CLAIM_PER_DEVICE") && err.contains("at least 1"),
                "{err}"
            );
        }
        assert_eq!(at_least_one("CLAIM_PER_DEVICE", 1).unwrap(), 1);
        // unset: the default
        assert_eq!(count_or("WABCAST_NEVER_SET_IN_TESTS", 5).unwrap(), 5);
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert_eq!(s.expose(), "hunter2");
    }
}
