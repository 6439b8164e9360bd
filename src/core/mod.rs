//! The pure core: herald's decisions, with no Kubernetes or HTTP types, so
//! they can be tested without a cluster.

pub mod ids;
pub mod model;
pub mod status;
pub mod expansion;
pub mod execution;
pub mod conditions;
pub mod preferences;
pub mod templates;
pub mod validation;
