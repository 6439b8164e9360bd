//! herald: a Kubernetes operator that runs Knock-style notification workflows
//! declared as custom resources.

pub mod controller;
pub mod core;
pub mod crds;
pub mod delivery;
pub mod http;
pub mod import;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod resources;
pub mod settings;
pub mod store;
pub mod telemetry;
