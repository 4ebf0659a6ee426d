//! Subcommands of the `berth` binary that have a module of their own.

pub mod pins;
pub(crate) mod warm;
