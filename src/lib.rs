//! herald: a Kubernetes operator that runs Knock-style notification workflows
//! declared as custom resources.

pub mod core;
pub mod crds;
pub mod resources;
