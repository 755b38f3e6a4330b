//! The web multi-device WhatsApp provider of the device host, on `whatsapp-rust` 0.7.
//!
//! - [`supervisor`]: the connection state machine of one session (pure, no network);
//! - [`mapping`]: the library's events as supervisor inputs, pairing prompts, acks, receipts and
//!   inbound text (pure);
//! - [`sessions`]: one client per device with its SQLite session store, pairing (rotating QR and
//!   phone-number pair code), sends (typing presence, image uploaded once per device, message id
//!   chosen before the send), number checks, logout.
//!
//! This crate knows nothing of PostgreSQL: the host turns [`sessions::WebEvent`]s into rows, and
//! keeps contacts' text through its [`sessions::InboundKeeper`] before WhatsApp is told it arrived.

pub mod mapping;
pub mod sessions;
pub mod supervisor;

pub use sessions::{
    digits, new_message_id, InboundKeeper, InboundText, Prompt, WebConfig, WebError, WebEvent,
    WebImage, WebMessage, WebSessions,
};
pub use supervisor::{Action, Input, PairingKind, Supervisor};
