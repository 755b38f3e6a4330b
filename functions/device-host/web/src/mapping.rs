//! From the library's events to what the host cares about: supervisor inputs, pairing prompts,
//! server acks and nacks of our messages, delivery and read receipts, inbound text. Pure
//! functions over the event values, so every mapping is tested without a network.

use crate::supervisor::{Input, PairingKind};
use chrono::{DateTime, Utc};
use std::time::Duration;
use whatsapp_rust::prelude::*;
use whatsapp_rust::wacore::types::events::ConnectFailureReason;
use whatsapp_rust::wacore::types::presence::ReceiptType;

/// One library event, as the session acts on it.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    Supervisor(Input),
    /// A pairing prompt to show (the QR payload, or the 8-character code) and how long it lasts.
    Prompt {
        kind: PairingKind,
        code: String,
        valid_for: Duration,
    },
    /// The server accepted (`nack = None`) or refused one of our messages.
    Ack {
        id: String,
        nack: Option<String>,
    },
    Receipt {
        ids: Vec<String>,
        read: bool,
        at: DateTime<Utc>,
    },
    /// Text someone sent to this device. `sender` is a phone JID or a LID; `sender_alt`, when
    /// present, the other form.
    Inbound {
        sender: Jid,
        sender_alt: Option<Jid>,
        text: String,
    },
    Ignore,
}

fn failure_text(reason: &ConnectFailureReason) -> String {
    match reason {
        ConnectFailureReason::LoggedOut => "logged out from the phone or device removed".into(),
        ConnectFailureReason::AccountLocked => "the account is locked by WhatsApp".into(),
        ConnectFailureReason::UnknownLogout => "logged out by WhatsApp".into(),
        ConnectFailureReason::TempBanned => "temporarily banned".into(),
        ConnectFailureReason::ClientOutdated => "client outdated".into(),
        ConnectFailureReason::ServiceUnavailable => "WhatsApp service unavailable".into(),
        other => format!("connect failure {other:?}"),
    }
}

/// How long to hold a ban whose end the server did not say.
const UNKNOWN_BAN: chrono::Duration = chrono::Duration::hours(24);

pub fn map_event(event: &Event, now: DateTime<Utc>) -> Signal {
    match event {
        Event::Connected(_) => Signal::Supervisor(Input::Connected),
        Event::Disconnected(d) => Signal::Supervisor(Input::Disconnected {
            reason: d.reason.to_string(),
        }),
        Event::PairingQrCode(q) => Signal::Prompt {
            kind: PairingKind::Qr,
            code: q.code.clone(),
            valid_for: q.timeout,
        },
        Event::PairingCode(c) => Signal::Prompt {
            kind: PairingKind::Code,
            code: c.code.clone(),
            valid_for: c.timeout,
        },
        Event::PairingQrCodesExhausted(_) => Signal::Supervisor(Input::PairingExhausted),
        Event::PairSuccess(_) => Signal::Supervisor(Input::Paired),
        Event::PairError(e) => Signal::Supervisor(Input::PairFailed {
            error: e.error.clone(),
        }),
        Event::PairingCodeError(_) => Signal::Supervisor(Input::PairFailed {
            error: "the pair code was refused".into(),
        }),
        Event::LoggedOut(l) => Signal::Supervisor(Input::LoggedOut {
            reason: failure_text(&l.reason),
        }),
        Event::StreamReplaced(_) => Signal::Supervisor(Input::Replaced),
        Event::TemporaryBan(b) => Signal::Supervisor(Input::TemporaryBan {
            until: now + b.expire,
            why: b.code.to_string(),
        }),
        Event::ClientOutdated(_) => Signal::Supervisor(Input::ClientOutdated),
        Event::ConnectFailure(f) => Signal::Supervisor(match f.reason {
            r if r.is_logged_out() => Input::LoggedOut {
                reason: failure_text(&r),
            },
            ConnectFailureReason::TempBanned => Input::TemporaryBan {
                until: now + UNKNOWN_BAN,
                why: f
                    .message
                    .clone()
                    .unwrap_or_else(|| "temporarily banned (no end given)".into()),
            },
            ConnectFailureReason::ClientOutdated => Input::ClientOutdated,
            r => Input::Disconnected {
                reason: failure_text(&r),
            },
        }),
        Event::ServerAck(a) if a.class.as_deref() == Some("message") => Signal::Ack {
            id: a.id.clone(),
            nack: a.error.clone(),
        },
        Event::Receipt(r) => {
            let read = match r.r#type {
                ReceiptType::Delivered => false,
                ReceiptType::Read | ReceiptType::Played => true,
                _ => return Signal::Ignore,
            };
            Signal::Receipt {
                ids: r.message_ids.iter().map(|id| id.to_string()).collect(),
                read,
                at: r.timestamp,
            }
        }
        // Inbound messages (`Event::Messages`) are not mapped here: the session's durability
        // hook keeps each one before it is acknowledged, and the session maps only the
        // placeholder recoveries that bypass the hook, one by one, through `map_inbound`.
        _ => Signal::Ignore,
    }
}

/// One inbound message: text (or an image caption) from someone else, in a one-to-one chat.
pub fn map_inbound(m: &InboundMessage) -> Signal {
    let source = &m.info.source;
    if source.is_from_me || source.is_group {
        return Signal::Ignore;
    }
    let base = m.message.get_base_message();
    let text = base.text_content().map(str::to_string).or_else(|| {
        base.image_message
            .as_option()
            .and_then(|i| i.caption.clone())
    });
    match text {
        Some(text) => Signal::Inbound {
            sender: source.sender.clone(),
            sender_alt: source.sender_alt.clone(),
            text,
        },
        None => Signal::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whatsapp_rust::wacore::types::events::{
        ConnectFailure, LoggedOut, PairingQrCode, PairingQrCodesExhausted, Receipt, ServerAck,
        StreamReplaced, TempBanReason, TemporaryBan,
    };
    use whatsapp_rust::wacore::types::message::MessageSource;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-25T08:00:00Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn acks_and_nacks_of_messages_only() {
        let nack = Event::ServerAck(
            ServerAck::builder()
                .id("3EB0AA".to_string())
                .class("message".to_string())
                .error("463".to_string())
                .build(),
        );
        assert_eq!(
            map_event(&nack, now()),
            Signal::Ack {
                id: "3EB0AA".into(),
                nack: Some("463".into())
            }
        );
        let ack = Event::ServerAck(
            ServerAck::builder()
                .id("3EB0AB".to_string())
                .class("message".to_string())
                .build(),
        );
        assert_eq!(
            map_event(&ack, now()),
            Signal::Ack {
                id: "3EB0AB".into(),
                nack: None
            }
        );
        // Acks of receipts or notifications are not about our messages.
        let other = Event::ServerAck(
            ServerAck::builder()
                .id("r-1".to_string())
                .class("receipt".to_string())
                .build(),
        );
        assert_eq!(map_event(&other, now()), Signal::Ignore);
    }

    #[test]
    fn receipts_by_message_id_whatever_names_the_recipient() {
        // The recipient may be named by a LID: correlation is by our message id only.
        let source = MessageSource {
            chat: Jid::lid("100000012345678"),
            sender: Jid::lid("100000012345678"),
            ..Default::default()
        };
        for (kind, read) in [(ReceiptType::Delivered, false), (ReceiptType::Read, true)] {
            let r = Event::Receipt(
                Receipt::builder()
                    .source(source.clone())
                    .message_ids(vec!["3EB0AA".to_string(), "3EB0AB".to_string()])
                    .timestamp(now())
                    .r#type(kind)
                    .offline(false)
                    .build(),
            );
            assert_eq!(
                map_event(&r, now()),
                Signal::Receipt {
                    ids: vec!["3EB0AA".into(), "3EB0AB".into()],
                    read,
                    at: now()
                }
            );
        }
        let retry = Event::Receipt(
            Receipt::builder()
                .source(source)
                .message_ids(vec!["3EB0AA".to_string()])
                .timestamp(now())
                .r#type(ReceiptType::Retry)
                .offline(false)
                .build(),
        );
        assert_eq!(map_event(&retry, now()), Signal::Ignore);
    }

    #[test]
    fn connection_events_become_supervisor_inputs() {
        let qr = Event::PairingQrCode(
            PairingQrCode::builder()
                .code("2@abc,def,ghi".to_string())
                .timeout(Duration::from_secs(20))
                .build(),
        );
        assert_eq!(
            map_event(&qr, now()),
            Signal::Prompt {
                kind: PairingKind::Qr,
                code: "2@abc,def,ghi".into(),
                valid_for: Duration::from_secs(20)
            }
        );
        assert_eq!(
            map_event(
                &Event::PairingQrCodesExhausted(
                    PairingQrCodesExhausted::builder()
                        .disconnected(true)
                        .build()
                ),
                now()
            ),
            Signal::Supervisor(Input::PairingExhausted)
        );
        assert_eq!(
            map_event(
                &Event::StreamReplaced(StreamReplaced::builder().build()),
                now()
            ),
            Signal::Supervisor(Input::Replaced)
        );
        let removed = Event::LoggedOut(
            LoggedOut::builder()
                .on_connect(false)
                .reason(ConnectFailureReason::LoggedOut)
                .build(),
        );
        assert!(matches!(
            map_event(&removed, now()),
            Signal::Supervisor(Input::LoggedOut { reason }) if reason.contains("removed")
        ));
        let ban = Event::TemporaryBan(
            TemporaryBan::builder()
                .code(TempBanReason::BlockedByUsers)
                .expire(chrono::Duration::hours(6))
                .build(),
        );
        assert_eq!(
            map_event(&ban, now()),
            Signal::Supervisor(Input::TemporaryBan {
                until: now() + chrono::Duration::hours(6),
                why: TempBanReason::BlockedByUsers.to_string()
            })
        );
        let locked = Event::ConnectFailure(
            ConnectFailure::builder()
                .reason(ConnectFailureReason::AccountLocked)
                .build(),
        );
        assert!(matches!(
            map_event(&locked, now()),
            Signal::Supervisor(Input::LoggedOut { .. })
        ));
        let unavailable = Event::ConnectFailure(
            ConnectFailure::builder()
                .reason(ConnectFailureReason::ServiceUnavailable)
                .build(),
        );
        assert!(matches!(
            map_event(&unavailable, now()),
            Signal::Supervisor(Input::Disconnected { .. })
        ));
    }
}
