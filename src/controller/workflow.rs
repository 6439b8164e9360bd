//! The Workflow reconciler: compiles a workflow's data schema and templates
//! once per generation (cached for the TriggerRun reconciler) and reports
//! `Ready` with the compiler's message when something does not compile.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use super::{conditions, Context, Error, MANAGER};
use crate::core::templates::CompiledTemplates;
use crate::core::validation::DataSchema;
use crate::resources::channel::ChannelType;
use crate::resources::workflow::{StepType, MAX_STEPS, MAX_STEP_REF_CHARS};
use crate::resources::{Workflow, WorkflowSpec, WorkflowStatus};

/// A workflow ready to run.
pub struct CompiledWorkflow {
    pub schema: Option<DataSchema>,
    pub templates: CompiledTemplates,
}

/// Compiles a workflow spec: the data schema, every template, and the shape of
/// the steps. The error names what is wrong.
pub fn compile(spec: &WorkflowSpec) -> Result<CompiledWorkflow, String> {
    // The CRD says so too; checked here for apiservers that skip it.
    if spec.steps.len() > MAX_STEPS {
        return Err(format!("{} steps; a workflow has at most {MAX_STEPS}", spec.steps.len()));
    }
    let mut refs = HashSet::new();
    for (i, step) in spec.steps.iter().enumerate() {
        if step.step_ref.is_empty() {
            return Err(format!("steps[{i}]: `ref` must not be empty"));
        }
        if step.step_ref.chars().count() > MAX_STEP_REF_CHARS {
            return Err(format!("steps[{i}]: `ref` is longer than {MAX_STEP_REF_CHARS} characters"));
        }
        if !refs.insert(step.step_ref.as_str()) {
            return Err(format!("steps[{i}]: ref `{}` is used twice", step.step_ref));
        }
        match step.step_type {
            StepType::Channel if step.channel.as_deref().unwrap_or("").is_empty() => {
                return Err(format!("step `{}`: a channel step needs `channel`", step.step_ref));
            }
            StepType::Delay if step.delay.is_none() => {
                return Err(format!("step `{}`: a delay step needs `delay`", step.step_ref));
            }
            _ => {}
        }
    }
    let schema = match &spec.data_schema {
        Some(schema) => Some(DataSchema::compile(&Value::Object(schema.clone())).map_err(|e| e.to_string())?),
        None => None,
    };
    let templates = CompiledTemplates::compile(&spec.steps).map_err(|e| e.to_string())?;
    Ok(CompiledWorkflow { schema, templates })
}

type Entry = (i64, Arc<Result<CompiledWorkflow, String>>);

/// Compiled workflows by uid, recompiled when the generation changes.
#[derive(Default)]
pub struct Compiled {
    cache: Mutex<HashMap<String, Entry>>,
}

impl Compiled {
    /// The compiled form of this generation of the workflow.
    pub fn get(&self, workflow: &Workflow) -> Arc<Result<CompiledWorkflow, String>> {
        let uid = workflow.uid().unwrap_or_default();
        let generation = workflow.metadata.generation.unwrap_or_default();
        let mut cache = self.cache.lock().expect("compiled workflow cache poisoned");
        if let Some((g, compiled)) = cache.get(&uid) {
            if *g == generation {
                return compiled.clone();
            }
        }
        let compiled = Arc::new(compile(&workflow.spec));
        cache.insert(uid, (generation, compiled.clone()));
        compiled
    }

    fn forget(&self, uid: &str) {
        self.cache.lock().expect("compiled workflow cache poisoned").remove(uid);
    }
}

/// The Workflow with this key in the namespace (from the cache).
pub fn find_by_key(ctx: &Context, namespace: &str, key: &str) -> Option<Arc<Workflow>> {
    // Runs for every trigger over every cached Workflow: compare in place,
    // without the copies `namespace()` and `key()` make.
    ctx.stores
        .workflows
        .find(|w| w.metadata.namespace.as_deref() == Some(namespace) && w.spec.key.as_deref().unwrap_or_else(|| w.metadata.name.as_deref().unwrap_or_default()) == key)
}

pub async fn reconcile(workflow: Arc<Workflow>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = workflow.namespace().ok_or(Error::MissingMetadata)?;
    if workflow.metadata.deletion_timestamp.is_some() {
        ctx.workflows.forget(&workflow.uid().unwrap_or_default());
        return Ok(Action::await_change());
    }
    let generation = workflow.metadata.generation;
    let current = workflow.status.clone().unwrap_or_default();
    let mut status =
        WorkflowStatus { key: Some(workflow.key()), steps: Some(workflow.spec.steps.len() as i32), observed_generation: generation, conditions: current.conditions.clone() };
    // In-app steps store their messages: without a history store they cannot run.
    let feed_steps: Vec<&str> = crate::core::path::all_steps(&workflow.spec.steps)
        .into_iter()
        .filter(|s| s.channel.as_deref().and_then(|c| ctx.stores.channels.get(&namespace, c)).is_some_and(|c| c.spec.channel_type == ChannelType::InAppFeed))
        .map(|s| s.step_ref.as_str())
        .collect();
    match ctx.workflows.get(&workflow).as_ref() {
        Ok(_) if !feed_steps.is_empty() && ctx.history.is_none() => {
            let message = format!("in_app_feed steps ({}) need the history store: start herald with --database-url", feed_steps.join(", "));
            conditions::set(&mut status.conditions, "Ready", conditions::FALSE, crate::controller::in_app::STORE_REQUIRED, &message, generation)
        }
        // Once-only workflows remember who ran them in the store.
        Ok(_) if workflow.spec.trigger_frequency != crate::resources::workflow::TriggerFrequency::EveryTrigger && ctx.history.is_none() => {
            let message = "triggerFrequency other than everyTrigger needs the history store: start herald with --database-url";
            conditions::set(&mut status.conditions, "Ready", conditions::FALSE, crate::controller::in_app::STORE_REQUIRED, message, generation)
        }
        Ok(_) => conditions::set(&mut status.conditions, "Ready", conditions::TRUE, "Compiled", "data schema and templates compile", generation),
        Err(message) => conditions::set(&mut status.conditions, "Ready", conditions::FALSE, "InvalidWorkflow", message, generation),
    }
    if status != current {
        let api: Api<Workflow> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "status": status});
        api.patch_status(&workflow.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    // Channels are not watched here: look again now and then, for one made or retyped since.
    Ok(Action::requeue(std::time::Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::workflow::Step;

    fn step(r: &str, t: StepType) -> Step {
        Step { step_ref: r.into(), step_type: t, channel: Some("c".into()), ..Default::default() }
    }

    #[test]
    fn rejects_malformed_steps_and_schemas() {
        let mut spec = WorkflowSpec { steps: vec![step("a", StepType::Channel), step("a", StepType::Channel)], ..Default::default() };
        assert!(compile(&spec).err().unwrap().contains("used twice"));
        spec.steps = vec![step("d", StepType::Delay)];
        assert!(compile(&spec).err().unwrap().contains("needs `delay`"));
        spec.steps = vec![];
        spec.data_schema = Some(json!({"type": 12}).as_object().unwrap().clone());
        assert!(compile(&spec).is_err());
        spec.data_schema = Some(json!({"type": "object"}).as_object().unwrap().clone());
        assert!(compile(&spec).is_ok());
    }

    #[test]
    fn bounds_steps_and_refs() {
        let mut spec = WorkflowSpec { steps: (0..MAX_STEPS).map(|i| step(&format!("s{i}"), StepType::Channel)).collect(), ..Default::default() };
        assert!(compile(&spec).is_ok());
        spec.steps.push(step("one-too-many", StepType::Channel));
        assert!(compile(&spec).err().unwrap().contains("at most 50"));
        spec.steps = vec![step(&"r".repeat(MAX_STEP_REF_CHARS), StepType::Channel)];
        assert!(compile(&spec).is_ok());
        spec.steps = vec![step(&"é".repeat(MAX_STEP_REF_CHARS + 1), StepType::Channel)];
        assert!(compile(&spec).err().unwrap().contains("longer than 64"));
    }
}
