//! `sqlx::migrate!` embeds `migrations/` at compile time, and cargo does not watch that folder
//! on its own: without this, a new or changed migration was missing from the next test build
//! until some source file of this crate changed.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
