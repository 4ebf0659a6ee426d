//! Subcommands of the `berth` binary that have a module of their own.

pub(crate) mod warm;
