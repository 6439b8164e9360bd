//! The Channel reconciler: reports whether a Channel can be used, as its
//! `Ready` condition, with a reason and a message naming the problem (email
//! without smtp, an unparseable url, a missing Secret or Secret key...).
//!
//! Deliveries do not depend on this status (the Deliverer runs the same
//! checks itself), so a stale condition never blocks or lets through a send.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{conditions, Context, Error, MANAGER};
use crate::delivery::config::{self, ChannelProblem};
use crate::resources::channel::{Channel, ChannelStatus};

/// How soon a Channel whose Secret is wrong is checked again: herald may only
/// `get` Secrets (least privilege), so it cannot watch for the fix.
pub const SECRET_RECHECK: Duration = Duration::from_secs(15);
/// How often a Ready Channel with a Secret is checked again (the Secret may
/// be deleted or lose a key).
pub const READY_RECHECK: Duration = Duration::from_secs(300);

/// The verdict on a Channel: a summary when it is usable, or the problem.
pub async fn check(ctx: &Context, namespace: &str, channel: &Channel) -> Result<String, ChannelProblem> {
    let smtp = config::check_spec(&channel.spec)?;
    if let Some(reference) = &channel.spec.secret_ref {
        let lookup = ctx.deliverer.secrets().refresh(namespace, &reference.name).await.map_err(|e| ChannelProblem::SecretUnreadable {
            secret: reference.name.clone(),
            message: match &e {
                kube::Error::Api(s) => s.message.clone(),
                other => other.to_string(),
            },
        })?;
        config::check_secret(&channel.spec, &reference.name, lookup.as_deref())?;
    }
    Ok(config::summary(&channel.spec, smtp.as_ref()))
}

pub async fn reconcile(channel: Arc<Channel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = channel.namespace().ok_or(Error::MissingMetadata)?;
    if channel.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let generation = channel.metadata.generation;
    let current = channel.status.clone().unwrap_or_default();
    let mut status = ChannelStatus { observed_generation: generation, conditions: current.conditions.clone() };
    let verdict = check(&ctx, &namespace, &channel).await;
    let action = match &verdict {
        Ok(summary) => {
            conditions::set(&mut status.conditions, "Ready", conditions::TRUE, "Ready", summary, generation);
            if channel.spec.secret_ref.is_some() {
                Action::requeue(READY_RECHECK)
            } else {
                Action::await_change()
            }
        }
        Err(problem) => {
            conditions::set(&mut status.conditions, "Ready", conditions::FALSE, problem.reason(), &problem.to_string(), generation);
            if problem.is_about_the_secret() {
                Action::requeue(SECRET_RECHECK)
            } else {
                Action::await_change()
            }
        }
    };
    if status != current {
        let api: Api<Channel> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "status": status});
        api.patch_status(&channel.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.metrics.write("Channel");
        if let Err(problem) = &verdict {
            tracing::warn!(channel = %channel.name_any(), namespace = %namespace, reason = problem.reason(), "channel not ready: {problem}");
        }
    }
    Ok(action)
}
