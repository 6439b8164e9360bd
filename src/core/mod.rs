//! The pure core: herald's decisions, with no Kubernetes or HTTP types, so
//! they can be tested without a cluster.

pub mod batch;
pub mod conditions;
pub mod execution;
pub mod expansion;
pub mod fair;
pub mod feed;
pub mod functions;
pub mod history;
pub mod ids;
pub mod model;
pub mod path;
pub mod preferences;
pub mod schedule;
pub mod status;
pub mod templates;
pub mod throttle;
pub mod validation;
pub mod windows;

/// `s` cut to at most `max` characters (on a char boundary), marked with `…`:
/// messages in conditions, Events and step status must stay small.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}
