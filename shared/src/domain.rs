//! Domain types: validated newtypes made at the edge (`PhoneE164::parse`, `Niche::parse`) and the
//! state enums that map 1:1 to database values. Nothing here talks to I/O.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why a piece of input was refused. The message is meant for the person who typed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub problem: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// A phone number in E.164 form (`+` then 7 to 15 digits, no leading zero).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneE164(String);

impl PhoneE164 {
    /// Accepts the ways people write numbers (`+60 12-345 6789`, `0060123456789`, `(60)12...`)
    /// and refuses anything with letters or the wrong number of digits. A number without a
    /// country code (leading single `0`) is refused rather than guessed.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(InvalidInput::new("phone", "is empty"));
        }
        let mut digits = String::with_capacity(16);
        for (i, ch) in trimmed.chars().enumerate() {
            match ch {
                '0'..='9' => digits.push(ch),
                '+' if i == 0 => {}
                ' ' | '-' | '.' | '(' | ')' => {}
                _ => {
                    return Err(InvalidInput::new(
                        "phone",
                        format!("{raw:?} contains {ch:?}; only digits, spaces, dashes, dots, brackets and a leading + are allowed"),
                    ))
                }
            }
        }
        let has_plus = trimmed.starts_with('+');
        let digits = if !has_plus && digits.starts_with("00") {
            digits[2..].to_string()
        } else if !has_plus && digits.starts_with('0') {
            return Err(InvalidInput::new(
                "phone",
                format!("{raw:?} has no country code; write it as +<country><number>"),
            ));
        } else {
            digits
        };
        if !(7..=15).contains(&digits.len()) {
            return Err(InvalidInput::new(
                "phone",
                format!("{raw:?} has {} digits; E.164 allows 7 to 15", digits.len()),
            ));
        }
        if digits.starts_with('0') {
            return Err(InvalidInput::new(
                "phone",
                format!("{raw:?}: a country code never starts with 0"),
            ));
        }
        Ok(Self(format!("+{digits}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PhoneE164 {
    type Error = InvalidInput;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<PhoneE164> for String {
    fn from(value: PhoneE164) -> Self {
        value.0
    }
}

impl fmt::Display for PhoneE164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One exact token of a niche or trigger set: lowercase letters, digits, `_` and `-`.
/// Matching is by equality of tokens, never by substring ("car" does not match "carpet").
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Token(String);

impl Token {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let t = raw.trim().to_lowercase();
        if t.is_empty() || t.len() > 64 {
            return Err(InvalidInput::new(
                "token",
                format!("{raw:?} must be 1 to 64 characters"),
            ));
        }
        if !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(InvalidInput::new(
                "token",
                format!("{raw:?} may contain only letters, digits, '_' and '-'"),
            ));
        }
        Ok(Self(t))
    }

    /// A set of tokens from a list separated by commas, semicolons, `|` or spaces, deduplicated.
    pub fn parse_set(raw: &str) -> Result<Vec<Self>, InvalidInput> {
        let mut out: Vec<Self> = raw
            .split([',', ';', '|', ' '])
            .filter(|s| !s.trim().is_empty())
            .map(Self::parse)
            .collect::<Result<_, _>>()?;
        out.sort();
        out.dedup();
        Ok(out)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Token {
    type Error = InvalidInput;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Token> for String {
    fn from(value: Token) -> Self {
        value.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest lead name we keep, in characters: it goes into messages through `{name}`.
pub const MAX_LEAD_NAME_CHARS: usize = 100;

/// A lead's name as messages greet it (`{name}`, `{first_name}`): runs of white space (a line
/// break or a tab inside a spreadsheet cell among them) become one space, ends trimmed; any
/// other control character (a terminal escape, a bell, a NUL) is refused, as is a name longer
/// than [`MAX_LEAD_NAME_CHARS`]. Empty is allowed: templates fall back for it.
pub fn parse_lead_name(raw: &str) -> Result<String, InvalidInput> {
    let folded = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    printable_text("name", &folded, MAX_LEAD_NAME_CHARS)?;
    Ok(folded)
}

/// Refuses text that holds a control character or is longer than `max` characters.
fn printable_text(field: &'static str, text: &str, max: usize) -> Result<(), InvalidInput> {
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(InvalidInput::new(
            field,
            format!("holds the control character U+{:04X}", u32::from(c)),
        ));
    }
    let n = text.chars().count();
    if n > max {
        return Err(InvalidInput::new(
            field,
            format!("is {n} characters long; at most {max}"),
        ));
    }
    Ok(())
}

/// The longest device label, in characters.
pub const MAX_DEVICE_LABEL_CHARS: usize = 64;

/// A device's label, how people and lead files name the device: trimmed, not empty, at most
/// [`MAX_DEVICE_LABEL_CHARS`], without control characters (it is printed in every report and
/// typed as `--device`).
pub fn parse_device_label(raw: &str) -> Result<String, InvalidInput> {
    let label = raw.trim();
    if label.is_empty() {
        return Err(InvalidInput::new("label", "is empty"));
    }
    printable_text("label", label, MAX_DEVICE_LABEL_CHARS)?;
    Ok(label.to_string())
}

/// Declares a string-backed enum whose variants map 1:1 to database values.
macro_rules! db_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = InvalidInput;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.trim().to_lowercase().as_str() {
                    $($text => Ok($name::$variant),)+
                    other => Err(InvalidInput::new(
                        stringify!($name),
                        format!("{other:?} is not one of: {}", [$($text),+].join(", ")),
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

db_enum!(
    /// The state of one `broadcast_messages` row (DESIGN.md §2).
    MessageStatus {
        Pending => "pending",
        Queued => "queued",
        Sending => "sending",
        Sent => "sent",
        Failed => "failed",
        Skipped => "skipped",
        Cancelled => "cancelled",
    }
);

impl MessageStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Sent | Self::Failed | Self::Skipped | Self::Cancelled
        )
    }
}

db_enum!(
    CampaignStatus {
        Scheduled => "scheduled",
        Running => "running",
        Paused => "paused",
        Completed => "completed",
        Cancelled => "cancelled",
    }
);

db_enum!(
    /// A sequence (drip campaign): `draft` until first activated.
    SequenceStatus {
        Draft => "draft",
        Active => "active",
        Paused => "paused",
        Cancelled => "cancelled",
    }
);

db_enum!(
    /// One vocabulary for a device's connection, shared by every provider.
    DeviceStatus {
        Connecting => "connecting",
        AwaitingPairing => "awaiting_pairing",
        Online => "online",
        Reconnecting => "reconnecting",
        Offline => "offline",
        LoggedOut => "logged_out",
        Restricted => "restricted",
        Stopped => "stopped",
        Deleted => "deleted",
    }
);

db_enum!(
    ProviderKind {
        Simulator => "simulator",
        Web => "web",
        CloudApi => "cloud_api",
    }
);

db_enum!(
    /// A lead's own status.
    LeadStatus {
        Prospect => "prospect",
        Customer => "customer",
    }
);

db_enum!(
    /// Which leads a campaign addresses.
    TargetStatus {
        Prospect => "prospect",
        Customer => "customer",
        All => "all",
    }
);

/// Machine-readable reasons carried by terminal rows.
pub mod reason {
    pub const ACCEPTED: &str = "accepted";
    pub const DEVICE_OFFLINE: &str = "device_offline";
    pub const DEVICE_DELETED: &str = "device_deleted";
    /// The device's host held its lease but the workers could not reach it for longer than the
    /// offline grace (`hosts.unreachable_since`).
    pub const HOST_UNREACHABLE: &str = "host_unreachable";
    pub const CAMPAIGN_CANCELLED: &str = "campaign_cancelled";
    pub const SEQUENCE_CANCELLED: &str = "sequence_cancelled";
    pub const NOT_ON_WHATSAPP: &str = "not_on_whatsapp";
    pub const INVALID_PAYLOAD: &str = "invalid_payload";
    pub const BAD_IMAGE: &str = "bad_image";
    pub const ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
    pub const LEAD_OPTED_OUT: &str = "lead_opted_out";
    /// The lead wrote back to a sequence that stops on a reply: its next steps are not sent.
    pub const LEAD_REPLIED: &str = "lead_replied";
    /// Cloud API 131047: outside the 24-hour window only a template message may be sent.
    pub const TEMPLATE_REQUIRED: &str = "template_required";
    /// The provider refused or failed the message for a reason of its own (detail in last_error).
    pub const PROVIDER_REJECTED: &str = "provider_rejected";
    /// A send whose host died mid-call, at a provider that cannot say whether it went out: failed
    /// rather than risk a second send (retry it deliberately).
    pub const OUTCOME_UNKNOWN: &str = "outcome_unknown";
}

/// Delay bounds in seconds, `0 <= min <= max`, at most a day.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DelayRange {
    pub min_s: f64,
    pub max_s: f64,
}

impl DelayRange {
    pub fn new(min_s: f64, max_s: f64) -> Result<Self, InvalidInput> {
        if !(min_s.is_finite() && max_s.is_finite()) || min_s < 0.0 || max_s < min_s {
            return Err(InvalidInput::new(
                "delay",
                format!("need 0 <= min <= max, got min={min_s} max={max_s}"),
            ));
        }
        if max_s > 86_400.0 {
            return Err(InvalidInput::new("delay", "max delay is at most 86400 s"));
        }
        Ok(Self { min_s, max_s })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_label_is_trimmed_and_printable() {
        assert_eq!(parse_device_label("  Ali's phone ").unwrap(), "Ali's phone");
        assert_eq!(
            parse_device_label(&"x".repeat(MAX_DEVICE_LABEL_CHARS))
                .unwrap()
                .len(),
            MAX_DEVICE_LABEL_CHARS
        );
        for bad in [
            "",
            " \t ",
            "a\u{1b}[2Jb",
            "a\nb",
            &"é".repeat(MAX_DEVICE_LABEL_CHARS + 1),
        ] {
            assert!(parse_device_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn phone_normalises_common_forms() {
        for (raw, want) in [
            ("+60 12-345 6789", "+60123456789"),
            ("0060123456789", "+60123456789"),
            ("60123456789", "+60123456789"),
            ("+1 (415) 555-0100", "+14155550100"),
        ] {
            assert_eq!(PhoneE164::parse(raw).unwrap().as_str(), want, "{raw}");
        }
    }

    #[test]
    fn phone_refuses_malformed() {
        for raw in [
            "",
            "abc",
            "+60 12 34x",
            "012-3456789",
            "+123",
            "+1234567890123456",
            "++60123456789",
            "+0123456789",
        ] {
            assert!(PhoneE164::parse(raw).is_err(), "{raw} should be refused");
        }
    }

    #[test]
    fn tokens_are_exact_and_normalised() {
        let set = Token::parse_set("Cars, property;cars |  loans").unwrap();
        let s: Vec<&str> = set.iter().map(Token::as_str).collect();
        assert_eq!(s, ["cars", "loans", "property"]);
        assert!(Token::parse("car pet").is_err());
        assert!(Token::parse("").is_err());
        assert!(Token::parse("drop'table").is_err());
    }

    #[test]
    fn enums_round_trip() {
        for s in MessageStatus::ALL {
            assert_eq!(s.as_str().parse::<MessageStatus>().unwrap(), *s);
        }
        assert!("paused".parse::<MessageStatus>().is_err());
        assert!(MessageStatus::Sent.is_terminal());
        assert!(!MessageStatus::Sending.is_terminal());
    }

    #[test]
    fn delay_range_validates() {
        assert!(DelayRange::new(1.0, 2.0).is_ok());
        assert!(DelayRange::new(2.0, 1.0).is_err());
        assert!(DelayRange::new(-1.0, 1.0).is_err());
        assert!(DelayRange::new(0.0, f64::NAN).is_err());
    }
}
