//! The commands that talk to a running berth's admin API (besides `cache ls` and `cache rm`,
//! which live in main.rs).

pub mod pins;
