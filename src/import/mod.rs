//! Importers: other engines' workflow definitions turned into herald
//! `Workflow`s. Pure transformations over files on disk (no cluster, no
//! network); the `herald import` subcommand prints or writes their output.

pub mod knock;
