//! The library every wabcast function uses.
//!
//! - [`domain`]: validated newtypes (phone numbers, tokens) and state enums;
//! - [`repo`]: the data layer, all SQL, one module per table;
//! - [`queue`]: the work queue trait (SQS FIFO semantics) and its Redis implementation;
//! - [`pacing`]: gap and retry timing rules; [`render`]: templates and spintax;
//! - [`media`]: image validation and the SSRF-safe fetcher; [`tz`]: local time to UTC;
//! - [`host_api`]: the device host's HTTP contract and its client;
//! - [`config`], [`telemetry`], [`db`]: start-up plumbing.

pub mod config;
pub mod db;
pub mod domain;
pub mod host_api;
pub mod media;
pub mod pacing;
pub mod qr;
pub mod queue;
pub mod render;
pub mod repo;
pub mod telemetry;
pub mod tz;
