//! `herald import knock DIR`: Knock workflows, as `knock pull` / `knock
//! workflow pull` write them, turned into herald `Workflow`s.
//!
//! What Knock's CLI writes (knock-cli `src/lib/marshal/workflow`): one
//! directory per workflow, `workflows/<key>/workflow.json`, whose keys ending
//! in `@` hold a path (relative to the workflow directory) to a file beside it
//! holding that field's content (`"html_body@": "email_1/html_body.html"`);
//! `visual_blocks.json` is itself JSON whose `@` paths are relative to it. If
//! both `x` and `x@` are present, the inline `x` wins. The key, `active` and
//! `valid` sit under `__readonly`. Email layouts are `layouts/<key>/layout.json`
//! beside `workflows/`.
//!
//! The import is strict: whatever herald cannot reproduce faithfully is a
//! [`Problem`] (one per thing, naming the workflow and the step). The caller
//! fails on any, or (`--lossy`) prints them as warnings and keeps the
//! best-effort [`Imported::workflow`], which says in each problem what was
//! dropped or kept. Nothing is left out silently: every field of the input is
//! either mapped, known to make no difference, or reported.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use kube::api::ObjectMeta;
use serde_json::{Map, Value};

use crate::core::templates::CompiledTemplates;
use crate::resources::workflow::{
    AllOf, AnyOf, BatchMode, BatchStep, Branch, ConditionItem, Conditions, Delay, DurationValue, FetchStep, SendWindow, Step, StepCondition, StepTemplate, StepType, ThrottleStep,
    TriggerFrequency, TriggerWorkflowStep, WindowType,
};
use crate::resources::{Workflow, WorkflowSpec};

/// The file Knock's CLI writes for each workflow.
pub const WORKFLOW_JSON: &str = "workflow.json";
/// How deep `@` references go (workflow.json → visual_blocks.json → block content), as in Knock's CLI.
const MAX_EXTRACTION_LEVEL: usize = 2;
/// Files that are read as JSON when a `@` reference points at them; all others are text.
const DECODABLE_JSON_FILES: &[&str] = &["visual_blocks.json"];
/// herald's channel types.
const HERALD_CHANNEL_TYPES: &[&str] = &["http", "chat", "email", "in_app_feed"];
/// Context roots a Knock condition argument may name (a dynamic argument).
const CONTEXT_PREFIXES: &[&str] = &["data.", "recipient.", "actor.", "tenant.", "vars.", "workflow.", "run.", "refs.", "current_message."];

/// An input the importer cannot read at all (not a [`Problem`] with a workflow).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: no {WORKFLOW_JSON} found (give a Knock `workflows` directory, the Knock directory holding it, a project with knock.json, or one workflow's directory)", path.display())]
    NoWorkflows { path: PathBuf },
    #[error("{}: two workflows would be named `{name}`", path.display())]
    DuplicateName { path: PathBuf, name: String },
}

/// Something herald cannot reproduce faithfully, in one workflow (and step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The Knock workflow key.
    pub workflow: String,
    /// The step ref, when the problem is in a step.
    pub step: Option<String>,
    /// What, and (for `--lossy`) what the import does about it.
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.step {
            Some(step) => write!(f, "workflow `{}` step `{}`: {}", self.workflow, step, self.what),
            None => write!(f, "workflow `{}`: {}", self.workflow, self.what),
        }
    }
}

/// How Knock's channels become herald's.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Knock channel key → herald Channel name (default: the same name).
    pub channels: BTreeMap<String, String>,
    /// Knock channel key → channel type (`email`, `chat`, `http`, `in_app_feed`, ...),
    /// for workflow.json files that do not say (`channel_type`) and whose
    /// templates do not tell.
    pub channel_types: BTreeMap<String, String>,
}

/// An email layout pulled with the workflows (`layouts/<key>/layout.json`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layout {
    pub html: Option<String>,
    pub text: Option<String>,
    /// Problems reading it (a bad `@` path), reported where it is used.
    pub problems: Vec<String>,
}

/// One workflow read from disk: its key and workflow.json with every `@` file inlined.
#[derive(Clone, Debug)]
pub struct Source {
    pub key: String,
    pub json: Value,
    /// `@` references that could not be followed.
    pub problems: Vec<Problem>,
}

/// What was read from a directory.
#[derive(Clone, Debug, Default)]
pub struct Bundle {
    pub workflows: Vec<Source>,
    pub layouts: BTreeMap<String, Layout>,
}

/// One imported workflow and what could not be carried over.
#[derive(Clone, Debug)]
pub struct Imported {
    pub key: String,
    /// The herald Workflow (what `--lossy` writes when there are problems).
    pub workflow: Workflow,
    pub problems: Vec<Problem>,
}

/// Reads every workflow under `dir` and converts it. `Err` only for input that
/// cannot be read; every difference is in the [`Imported::problems`].
pub fn import(dir: &Path, options: &Options) -> Result<Vec<Imported>, ImportError> {
    let bundle = read(dir)?;
    let imported: Vec<Imported> = bundle.workflows.iter().map(|source| convert(source, &bundle.layouts, options)).collect();
    let mut names = BTreeSet::new();
    for i in &imported {
        let name = i.workflow.metadata.name.clone().unwrap_or_default();
        if !names.insert(name.clone()) {
            return Err(ImportError::DuplicateName { path: dir.to_path_buf(), name });
        }
    }
    Ok(imported)
}

// ---------------------------------------------------------------------------
// Reading what Knock's CLI wrote.

/// Finds the workflows under `dir`: one workflow's directory (it holds
/// workflow.json), a `workflows` directory, a Knock directory holding
/// `workflows/`, or a project whose knock.json names its `knockDir`.
pub fn read(dir: &Path) -> Result<Bundle, ImportError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Read { path, source }
    };
    let mut bundle = Bundle::default();
    let workflow_dirs: Vec<PathBuf>;
    let layouts_dir: Option<PathBuf>;
    if dir.join(WORKFLOW_JSON).is_file() {
        workflow_dirs = vec![dir.to_path_buf()];
        layouts_dir = dir.parent().and_then(Path::parent).map(|knock| knock.join("layouts"));
    } else {
        let knock_dir = knock_dir(dir)?;
        let (workflows, layouts) = if knock_dir.join("workflows").is_dir() {
            (knock_dir.join("workflows"), Some(knock_dir.join("layouts")))
        } else {
            (knock_dir.clone(), knock_dir.parent().map(|p| p.join("layouts")))
        };
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir(&workflows).map_err(read_err(&workflows))? {
            let path = entry.map_err(read_err(&workflows))?.path();
            if path.join(WORKFLOW_JSON).is_file() {
                dirs.push(path);
            }
        }
        dirs.sort();
        workflow_dirs = dirs;
        layouts_dir = layouts;
    }
    if workflow_dirs.is_empty() {
        return Err(ImportError::NoWorkflows { path: dir.to_path_buf() });
    }
    for wf_dir in workflow_dirs {
        bundle.workflows.push(read_workflow(&wf_dir)?);
    }
    if let Some(layouts) = layouts_dir.filter(|l| l.is_dir()) {
        for entry in std::fs::read_dir(&layouts).map_err(read_err(&layouts))? {
            let path = entry.map_err(read_err(&layouts))?.path();
            let file = path.join("layout.json");
            if file.is_file() {
                let key = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
                bundle.layouts.insert(key, read_layout(&path, &file)?);
            }
        }
    }
    Ok(bundle)
}

/// `dir`, or the `knockDir` its knock.json names.
fn knock_dir(dir: &Path) -> Result<PathBuf, ImportError> {
    let config = dir.join("knock.json");
    if !config.is_file() {
        return Ok(dir.to_path_buf());
    }
    let json = read_json(&config)?;
    Ok(match json.get("knockDir").and_then(Value::as_str) {
        Some(sub) => dir.join(sub),
        None => dir.to_path_buf(),
    })
}

fn read_json(path: &Path) -> Result<Value, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| ImportError::Json { path: path.to_path_buf(), source })
}

/// One workflow directory: workflow.json, its `@` files inlined.
pub fn read_workflow(dir: &Path) -> Result<Source, ImportError> {
    let mut json = read_json(&dir.join(WORKFLOW_JSON))?;
    let key = json
        .pointer("/__readonly/key")
        .or_else(|| json.get("key"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| dir.file_name().unwrap_or_default().to_string_lossy().into_owned());
    let mut failures = Vec::new();
    inline_files(&mut json, dir, dir, Path::new(""), 1, &mut failures);
    let problems = failures
        .into_iter()
        .map(|(at, what)| Problem { workflow: key.clone(), step: step_ref_at(&json, &at), what: format!("`{}`: {what} (dropped)", field_label(&at)) })
        .collect();
    Ok(Source { key, json, problems })
}

fn read_layout(dir: &Path, file: &Path) -> Result<Layout, ImportError> {
    let mut json = read_json(file)?;
    let mut failures = Vec::new();
    inline_files(&mut json, dir, dir, Path::new(""), 1, &mut failures);
    let problems = failures.into_iter().map(|(at, what)| format!("`{}`: {what}", at.display())).collect();
    let text = |k: &str| json.get(k).and_then(Value::as_str).map(str::to_string);
    let mut layout = Layout { html: text("html_layout"), text: text("text_layout"), problems };
    if json.get("footer_links").and_then(Value::as_array).is_some_and(|l| !l.is_empty()) && layout.html.as_deref().is_some_and(|h| h.contains("footer_links")) {
        layout.problems.push("its `footer_links` (herald does not provide the `footer_links` variable)".into());
    }
    Ok(layout)
}

/// Inlines every `x@` reference under `value` whose `x` is not already there:
/// the path is relative to `base` (the directory of the file holding it),
/// must stay inside `root` (the workflow's directory), and is read as text, or
/// as JSON for visual_blocks.json (whose own references are followed, up to
/// [`MAX_EXTRACTION_LEVEL`]). `at` is the JSON path for messages.
fn inline_files(value: &mut Value, root: &Path, base: &Path, at: &Path, level: usize, failures: &mut Vec<(PathBuf, String)>) {
    match value {
        Value::Object(map) => {
            let refs: Vec<(String, String)> =
                map.iter().filter_map(|(k, v)| Some((k.strip_suffix('@')?.to_string(), v.as_str()?.to_string()))).filter(|(field, _)| !map.contains_key(field)).collect();
            for (k, v) in map.iter_mut() {
                if !k.ends_with('@') {
                    inline_files(v, root, base, &at.join(k), level, failures);
                }
            }
            for (field, rel) in refs {
                let label = at.join(format!("{field}@"));
                match resolve(root, base, &rel) {
                    Err(why) => failures.push((label, why)),
                    Ok(path) => match std::fs::read_to_string(&path) {
                        Err(e) => failures.push((label, format!("cannot read `{rel}`: {e}"))),
                        Ok(text) => {
                            let name = path.file_name().unwrap_or_default().to_string_lossy().to_lowercase();
                            let content = if DECODABLE_JSON_FILES.contains(&name.as_str()) {
                                match serde_json::from_str::<Value>(&text) {
                                    Ok(mut parsed) => {
                                        if level < MAX_EXTRACTION_LEVEL {
                                            let dir = path.parent().unwrap_or(root).to_path_buf();
                                            inline_files(&mut parsed, root, &dir, &at.join(&field), level + 1, failures);
                                        }
                                        parsed
                                    }
                                    Err(e) => {
                                        failures.push((label, format!("`{rel}` is not JSON: {e}")));
                                        continue;
                                    }
                                }
                            } else {
                                Value::String(text)
                            };
                            map.insert(field, content);
                        }
                    },
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                inline_files(item, root, base, &at.join(i.to_string()), level, failures);
            }
        }
        _ => {}
    }
}

/// The ref of the innermost step on the JSON path `at` (`steps/3/branches/0/steps/1/template/x@`).
fn step_ref_at(json: &Value, at: &Path) -> Option<String> {
    let mut node = json;
    let mut found = None;
    for part in at.iter() {
        let part = part.to_string_lossy();
        node = match node {
            Value::Object(map) => map.get(part.as_ref())?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return found,
        };
        if let Some(r) = node.get("ref").and_then(Value::as_str) {
            found = Some(r.to_string());
        }
    }
    found
}

/// `template.html_body@` for a path inside a step, else the whole path.
fn field_label(at: &Path) -> String {
    let parts: Vec<String> = at.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last_step = parts.iter().rposition(|p| p == "steps").map(|i| i + 2).unwrap_or(0);
    parts[last_step.min(parts.len())..].join(".")
}

/// `rel` (relative to `base`) as a path inside `root`, or why not.
fn resolve(root: &Path, base: &Path, rel: &str) -> Result<PathBuf, String> {
    let rel_path = Path::new(rel);
    if rel.is_empty() || rel_path.is_absolute() || rel_path.components().any(|c| matches!(c, Component::Prefix(_) | Component::RootDir)) {
        return Err(format!("`{rel}` is not a relative path"));
    }
    // Lexically first: `..` may not climb out of the workflow's directory.
    let base_in_root = base.strip_prefix(root).unwrap_or(Path::new(""));
    let mut parts: Vec<&std::ffi::OsStr> = base_in_root.iter().collect();
    for c in rel_path.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(format!("`{rel}` points outside the workflow's directory"));
                }
            }
            _ => return Err(format!("`{rel}` is not a relative path")),
        }
    }
    let path = parts.iter().fold(root.to_path_buf(), |p, part| p.join(part));
    // Then for real: a symbolic link may not lead out either.
    let (Ok(real), Ok(real_root)) = (path.canonicalize(), root.canonicalize()) else {
        return Err(format!("`{rel}` does not exist"));
    };
    if !real.starts_with(&real_root) {
        return Err(format!("`{rel}` points outside the workflow's directory"));
    }
    Ok(path)
}

// ---------------------------------------------------------------------------
// Converting.

/// Converts one workflow. Always yields a Workflow (the `--lossy` one); it is
/// faithful when there are no problems.
pub fn convert(source: &Source, layouts: &BTreeMap<String, Layout>, options: &Options) -> Imported {
    let mut c = Converter { key: source.key.clone(), options, layouts, problems: source.problems.clone(), step: None };
    let workflow = c.workflow(&source.json);
    // Last, herald's own check: what the Workflow reconciler would say.
    if let Err(e) = crate::controller::workflow::compile(&workflow.spec) {
        c.step = None;
        c.problem(format!("herald would not accept the result: {e}"));
    }
    Imported { key: source.key.clone(), workflow, problems: c.problems }
}

struct Converter<'a> {
    key: String,
    options: &'a Options,
    layouts: &'a BTreeMap<String, Layout>,
    problems: Vec<Problem>,
    /// The step being converted, for problems.
    step: Option<String>,
}

/// An object's fields, remembering which were read, so that anything not
/// understood is reported instead of dropped.
struct Fields<'v> {
    map: Option<&'v Map<String, Value>>,
    read: BTreeSet<String>,
}

impl<'v> Fields<'v> {
    fn new(value: Option<&'v Value>) -> Self {
        Fields { map: value.and_then(Value::as_object), read: BTreeSet::new() }
    }

    /// A field, `None` when absent or null.
    fn get(&mut self, key: &str) -> Option<&'v Value> {
        self.read.insert(key.to_string());
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    fn str(&mut self, key: &str) -> Option<&'v str> {
        self.get(key).and_then(Value::as_str)
    }

    /// Marks fields as known to make no difference to what is sent.
    fn ignore(&mut self, keys: &[&str]) {
        self.read.extend(keys.iter().map(|k| k.to_string()));
    }

    /// Fields present (not null, not an `@` reference, not empty) and never read.
    fn unread(&self) -> Vec<String> {
        let Some(map) = self.map else { return Vec::new() };
        map.iter().filter(|(k, v)| !self.read.contains(k.as_str()) && !k.ends_with('@') && !k.starts_with("__") && !is_empty(v)).map(|(k, _)| k.clone()).collect()
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl Converter<'_> {
    fn problem(&mut self, what: impl Into<String>) {
        self.problems.push(Problem { workflow: self.key.clone(), step: self.step.clone(), what: what.into() });
    }

    fn unknown(&mut self, fields: &Fields, what: &str) {
        for k in fields.unread() {
            self.problem(format!("{what} `{k}` is not something herald knows (dropped)"));
        }
    }

    fn workflow(&mut self, json: &Value) -> Workflow {
        let mut f = Fields::new(Some(json));
        f.ignore(&["$schema", "key", "active", "valid", "environment", "sha", "created_at", "updated_at", "deleted_at"]);
        let mut annotations = BTreeMap::new();
        if let Some(name) = f.str("name") {
            annotations.insert("herald.dev/knock-name".to_string(), name.to_string());
        }
        if let Some(description) = f.str("description") {
            annotations.insert("herald.dev/knock-description".to_string(), description.to_string());
        }
        if let Some(tags) = f.get("tags").and_then(Value::as_array) {
            let tags: Vec<&str> = tags.iter().filter_map(Value::as_str).collect();
            if !tags.is_empty() {
                annotations.insert("herald.dev/knock-tags".to_string(), tags.join(","));
            }
        }
        let active = json.pointer("/__readonly/active").or_else(|| json.get("active")).and_then(Value::as_bool).unwrap_or(true);
        let categories = f.get("categories").and_then(Value::as_array).map(|c| c.iter().filter_map(Value::as_str).map(str::to_string).collect()).unwrap_or_default();
        let data_schema = match f.get("trigger_data_json_schema") {
            None => None,
            Some(Value::Object(schema)) if schema.is_empty() => None,
            Some(Value::Object(schema)) => Some(schema.clone()),
            Some(_) => {
                self.problem("`trigger_data_json_schema` is not a JSON object (dropped)");
                None
            }
        };
        let mut settings = Fields::new(f.get("settings"));
        let override_preferences = settings.get("override_preferences").and_then(Value::as_bool).unwrap_or(false);
        if settings.get("is_commercial").and_then(Value::as_bool) == Some(true) {
            self.problem("`settings.is_commercial`: herald has no commercial (unsubscribe) handling (dropped)");
        }
        self.unknown(&settings, "workflow setting");
        let trigger_frequency = match f.str("trigger_frequency") {
            None | Some("every_trigger") => TriggerFrequency::EveryTrigger,
            Some("once_per_recipient") => TriggerFrequency::OncePerRecipient,
            Some("once_per_recipient_per_tenant") => TriggerFrequency::OncePerRecipientPerTenant,
            Some(other) => {
                self.problem(format!("`trigger_frequency: {other}` is unknown (every trigger kept)"));
                TriggerFrequency::EveryTrigger
            }
        };
        let conditions = f.get("conditions").map(|c| self.conditions(c)).unwrap_or_default();
        let steps = f.get("steps").map(|s| self.steps(s)).unwrap_or_default();
        self.unknown(&f, "workflow field");
        Workflow {
            metadata: ObjectMeta { name: Some(crate::core::ids::name_for_id(&self.key)), annotations: (!annotations.is_empty()).then_some(annotations), ..Default::default() },
            spec: WorkflowSpec { key: Some(self.key.clone()), active, categories, data_schema, override_preferences, steps, conditions, trigger_frequency, ..Default::default() },
            status: None,
        }
    }

    fn steps(&mut self, steps: &Value) -> Vec<Step> {
        let Some(list) = steps.as_array() else {
            self.problem("`steps` is not a list (no steps)");
            return Vec::new();
        };
        let outer = self.step.clone();
        let steps = list.iter().filter_map(|s| self.step(s)).collect();
        self.step = outer;
        steps
    }

    /// One step; `None` when it is dropped (`--lossy`).
    fn step(&mut self, json: &Value) -> Option<Step> {
        let mut f = Fields::new(Some(json));
        f.ignore(&["name", "description"]);
        let step_ref = f.str("ref").unwrap_or_default().to_string();
        self.step = Some(step_ref.clone());
        let kind = f.str("type").unwrap_or_default().to_string();
        let conditions = f.get("conditions").map(|c| self.conditions(c)).unwrap_or_default();
        let mut step = Step { step_ref, conditions, ..Default::default() };
        let kept = match kind.as_str() {
            "channel" => self.channel(&mut f, &mut step),
            "delay" => self.delay(&mut f, &mut step),
            "batch" => self.batch(&mut f, &mut step),
            "throttle" => self.throttle(&mut f, &mut step),
            "http_fetch" | "fetch" => self.fetch(&mut f, &mut step),
            "branch" => self.branch(&mut f, &mut step),
            "trigger_workflow" => self.trigger_workflow(&mut f, &mut step),
            other => {
                self.problem(format!("step type `{other}`: herald has no such step (step dropped)"));
                return None;
            }
        };
        if kept {
            self.unknown(&f, "step field");
        }
        kept.then_some(step)
    }

    fn channel(&mut self, f: &mut Fields, step: &mut Step) -> bool {
        step.step_type = StepType::Channel;
        let template = f.get("template");
        let mut t = Fields::new(template);
        if let Some(group) = f.str("channel_group_key") {
            self.problem(format!("channel group `{group}`: herald has no channel groups (step dropped)"));
            return false;
        }
        let Some(channel_key) = f.str("channel_key") else {
            self.problem("a channel step without `channel_key` (step dropped)");
            return false;
        };
        let kind = match self.channel_type(f.str("channel_type"), channel_key, &step.step_ref, template) {
            Ok(kind) => kind,
            Err(why) => {
                self.problem(format!("{why} (step dropped)"));
                return false;
            }
        };
        if !HERALD_CHANNEL_TYPES.contains(&kind.as_str()) {
            self.problem(format!("channel `{channel_key}` is a `{kind}` channel: herald has no `{kind}` channels (step dropped)"));
            return false;
        }
        let channel = self.options.channels.get(channel_key).cloned().unwrap_or_else(|| channel_key.to_string());
        if !crate::core::ids::is_dns_subdomain(&channel) {
            self.problem(format!("channel `{channel}` is not a valid Channel name; map it with --channel {channel_key}=NAME (kept as is)"));
        }
        step.channel = Some(channel);
        if f.get("channel_overrides").is_some_and(|o| !is_empty(o)) {
            self.problem("`channel_overrides`: herald takes channel settings from the Channel alone (dropped)");
        }
        if let Some(windows) = f.get("send_windows") {
            step.send_windows = self.send_windows(windows);
        }
        let mut out = StepTemplate::default();
        match kind.as_str() {
            "email" => self.email(&mut t, &mut out),
            "chat" => self.chat(&mut t, &mut out),
            "http" => self.webhook(&mut t, &mut out),
            _ => self.in_app(&mut t, &mut out),
        }
        self.unknown(&t, &format!("{kind} template field"));
        step.template = Some(out);
        true
    }

    /// The Knock channel type of a step: as written, as given with
    /// --channel-type, from the template's fields, or from the step ref's
    /// Knock default (`email_1`).
    fn channel_type(&self, written: Option<&str>, channel_key: &str, step_ref: &str, template: Option<&Value>) -> Result<String, String> {
        if let Some(kind) = written.or(self.options.channel_types.get(channel_key).map(String::as_str)) {
            return Ok(normalize_channel_type(kind));
        }
        let has = |k: &str| template.and_then(|t| t.get(k)).is_some_and(|v| !v.is_null());
        let by_fields = if has("html_body") || has("subject") || has("visual_blocks") {
            Some("email")
        } else if has("json_body") || has("summary") {
            Some("chat")
        } else if has("action_url") || has("action_buttons") {
            Some("in_app_feed")
        } else if has("title") {
            Some("push")
        } else if has("url") || has("method") || has("query_params") || has("headers") || has("body") {
            Some("http")
        } else {
            None
        };
        if let Some(kind) = by_fields {
            return Ok(kind.to_string());
        }
        let prefix = step_ref.trim_end_matches(|c: char| c.is_ascii_digit()).trim_end_matches(['_', '-']);
        match prefix {
            "email" | "chat" | "sms" | "push" | "in_app_feed" | "in_app_guide" | "http" => Ok(prefix.to_string()),
            "webhook" => Ok("http".to_string()),
            _ => Err(format!("cannot tell what type of channel `{channel_key}` is; say it with --channel-type {channel_key}=email|chat|http|in_app_feed")),
        }
    }

    fn email(&mut self, t: &mut Fields, out: &mut StepTemplate) {
        out.subject = t.str("subject").and_then(|s| self.liquid("template.subject", s));
        let mut html = t.str("html_body").map(str::to_string);
        let mut text = t.str("text_body").map(str::to_string);
        if t.get("visual_blocks").is_some_and(|v| !is_empty(v)) {
            self.problem("email `visual_blocks`: herald has no visual blocks (dropped; write the HTML in html_body)");
        }
        if t.get("is_mjml").and_then(Value::as_bool) == Some(true) {
            self.problem("an MJML email: herald sends html_body as HTML, not MJML (sent as written)");
        }
        let mut settings = Fields::new(t.get("settings"));
        if let Some(key) = settings.str("layout_key") {
            match self.layouts.get(key) {
                Some(layout) => {
                    for why in layout.problems.clone() {
                        self.problem(format!("email layout `{key}`: {why}"));
                    }
                    // Knock renders the template, then puts it where the layout says `{{ content }}`.
                    html = wrap(layout.html.as_deref(), html);
                    text = wrap(layout.text.as_deref(), text);
                }
                None => self.problem(format!(
                    "email layout `{key}`: not found beside the workflows (pull it with `knock layout pull --all` and import the Knock directory); the body is sent without it"
                )),
            }
        }
        if settings.str("pre_content").is_some_and(|p| !p.is_empty()) {
            self.problem("email `settings.pre_content` (preview text): herald does not add it (dropped)");
        }
        if settings.str("attachment_key").is_some_and(|p| !p.is_empty()) {
            self.problem("email attachments (`settings.attachment_key`): herald sends no attachments (dropped)");
        }
        self.unknown(&settings, "email setting");
        out.html = html.and_then(|s| self.liquid("template.html", &s));
        out.text = text.and_then(|s| self.liquid("template.text", &s));
    }

    fn chat(&mut self, t: &mut Fields, out: &mut StepTemplate) {
        let summary = t.str("summary");
        if let Some(json_body) = t.str("json_body") {
            match blocks_of(json_body) {
                Some(blocks) => out.blocks = self.liquid("template.blocks", &blocks),
                None => self.problem("chat `json_body` is not `{\"blocks\": [...]}`: herald sends `text` and `blocks` only (dropped)"),
            }
            out.text = summary.and_then(|s| self.liquid("template.text", s));
        } else if let Some(markdown) = t.str("markdown_body") {
            if let Some(what) = markdown_differs_in_slack(markdown) {
                self.problem(format!("chat `markdown_body` uses {what}, which Knock converts to Slack's mrkdwn and herald sends as written (kept)"));
            }
            out.text = self.liquid("template.text", markdown);
        }
    }

    fn webhook(&mut self, t: &mut Fields, out: &mut StepTemplate) {
        out.method = t.str("method").map(str::to_ascii_uppercase);
        let mut url = t.str("url").map(str::to_string);
        if let Some(params) = t.get("query_params") {
            match self.pairs("query_params", params) {
                Some(params) if !params.is_empty() => url = Some(with_query(url.as_deref().unwrap_or(""), &params)),
                _ => {}
            }
        }
        out.url = url.and_then(|u| self.liquid("template.url", &u));
        if let Some(headers) = t.get("headers") {
            for (name, value) in self.pairs("headers", headers).unwrap_or_default() {
                if let Some(v) = self.liquid(&format!("template.headers.{name}"), &value) {
                    out.headers.insert(name, v);
                }
            }
        }
        out.body = t.str("body").and_then(|b| self.liquid("template.body", b));
    }

    fn in_app(&mut self, t: &mut Fields, out: &mut StepTemplate) {
        out.markdown_body = t.str("markdown_body").and_then(|s| self.liquid("template.markdownBody", s));
        out.action_url = t.str("action_url").and_then(|s| self.liquid("template.actionUrl", s));
        if t.get("action_buttons").is_some_and(|b| !is_empty(b)) {
            self.problem("in-app `action_buttons`: herald's feed items have no buttons (dropped)");
        }
    }

    /// Knock's `[{key, value}]` lists (headers, query parameters) as pairs.
    fn pairs(&mut self, what: &str, value: &Value) -> Option<Vec<(String, String)>> {
        match value {
            Value::Array(items) => Some(
                items.iter().filter_map(|item| Some((item.get("key")?.as_str()?.to_string(), item.get("value").and_then(Value::as_str).unwrap_or_default().to_string()))).collect(),
            ),
            Value::String(s) => {
                self.problem(format!("`{what}` is a template (`{}`): herald needs a fixed list of names (dropped)", shorten(s)));
                None
            }
            _ => {
                self.problem(format!("`{what}` is neither a list nor a template (dropped)"));
                None
            }
        }
    }

    fn send_windows(&mut self, windows: &Value) -> Vec<SendWindow> {
        let mut out = Vec::new();
        for w in windows.as_array().into_iter().flatten() {
            let text = |k: &str| w.get(k).and_then(Value::as_str).map(str::to_string);
            out.push(SendWindow { day: text("day").unwrap_or_default(), window_type: text("type").unwrap_or_else(|| "send".into()), from: text("from"), until: text("until") });
        }
        if let Err(e) = crate::core::windows::check_send_windows(&out) {
            self.problem(format!("send windows: {e} (dropped)"));
            return Vec::new();
        }
        out
    }

    fn delay(&mut self, f: &mut Fields, step: &mut Step) -> bool {
        step.step_type = StepType::Delay;
        let mut s = Fields::new(f.get("settings"));
        let duration = s.get("delay_for").and_then(|d| self.duration("delay_for", d));
        let window_from = s.str("delay_until_field_path").map(|p| self.field_path("delay_until_field_path", p));
        let mut delay = Delay { duration, window_from, until: None };
        if delay.duration.is_some() && delay.window_from.is_some() {
            self.problem("a delay with both `delay_for` and `delay_until_field_path` (an offset from a timestamp): herald waits until the timestamp alone (offset dropped)");
            delay.duration = None;
        }
        self.unknown(&s, "delay setting");
        step.delay = Some(delay);
        true
    }

    fn batch(&mut self, f: &mut Fields, step: &mut Step) -> bool {
        step.step_type = StepType::Batch;
        let mut s = Fields::new(f.get("settings"));
        s.ignore(&["workflow_version_mode"]);
        let mut batch = BatchStep {
            window: s.get("batch_window").and_then(|d| self.duration("batch_window", d)),
            window_from: s.str("batch_until_field_path").map(|p| self.field_path("batch_until_field_path", p)),
            key: s.str("batch_key").filter(|k| !k.is_empty()).and_then(|k| self.liquid("batch.key", &key_template(k))),
            max_window: s.get("batch_window_extension_limit").and_then(|d| self.duration("batch_window_extension_limit", d)),
            ..Default::default()
        };
        if batch.window.is_some() && batch.window_from.is_some() {
            self.problem("a batch with both `batch_window` and `batch_until_field_path`: herald uses the field's window alone (`batch_window` dropped)");
            batch.window = None;
        }
        match s.str("batch_window_type") {
            None | Some("fixed") => {}
            Some("sliding") => batch.window_type = WindowType::Sliding,
            Some(other) => self.problem(format!("`batch_window_type: {other}` is unknown (fixed kept)")),
        }
        match s.str("batch_order") {
            None | Some("asc") => {}
            Some("desc") => self.problem("`batch_order: desc` (render the newest activities): herald renders the oldest (asc kept)"),
            Some(other) => self.problem(format!("`batch_order: {other}` is unknown (asc kept)")),
        }
        batch.max_activities = s.get("batch_items_max_limit").and_then(|n| self.count("batch_items_max_limit", n));
        batch.render_limit = s.get("batch_items_render_limit").and_then(|n| self.count("batch_items_render_limit", n));
        match s.str("batch_execution_mode") {
            None | Some("accumulate") => {}
            Some("flush_leading") => batch.mode = BatchMode::FlushLeading,
            Some(other) => self.problem(format!("`batch_execution_mode: {other}` is unknown (accumulate kept)")),
        }
        self.unknown(&s, "batch setting");
        step.batch = Some(batch);
        true
    }

    fn throttle(&mut self, f: &mut Fields, step: &mut Step) -> bool {
        step.step_type = StepType::Throttle;
        let mut s = Fields::new(f.get("settings"));
        let mut throttle = ThrottleStep {
            window: s.get("throttle_window").and_then(|d| self.duration("throttle_window", d)),
            window_from: s.str("throttle_window_field_path").map(|p| self.field_path("throttle_window_field_path", p)),
            key: s.str("throttle_key").filter(|k| !k.is_empty()).and_then(|k| self.liquid("throttle.key", &key_template(k))),
            limit: 1,
        };
        if let Some(n) = s.get("throttle_limit") {
            throttle.limit = self.count("throttle_limit", n).unwrap_or(1);
        }
        if throttle.window.is_some() && throttle.window_from.is_some() {
            self.problem("a throttle with both `throttle_window` and `throttle_window_field_path`: herald uses the field's window alone (`throttle_window` dropped)");
            throttle.window = None;
        }
        self.unknown(&s, "throttle setting");
        step.throttle = Some(throttle);
        true
    }

    fn fetch(&mut self, f: &mut Fields, step: &mut Step) -> bool {
        step.step_type = StepType::Fetch;
        let mut s = Fields::new(f.get("settings"));
        let mut fetch = FetchStep {
            method: s.str("method").map(str::to_ascii_uppercase),
            url: s.str("url").and_then(|u| self.liquid("fetch.url", u)).unwrap_or_default(),
            body: s.str("body").and_then(|b| self.liquid("fetch.body", b)),
            response_path: s.str("response_path").map(str::to_string),
            ..Default::default()
        };
        if let Some(headers) = s.get("headers") {
            for (name, value) in self.pairs("headers", headers).unwrap_or_default() {
                if let Some(v) = self.liquid(&format!("fetch.headers.{name}"), &value) {
                    fetch.headers.insert(name, v);
                }
            }
        }
        if let Some(params) = s.get("query_params") {
            for (name, value) in self.pairs("query_params", params).unwrap_or_default() {
                if let Some(v) = self.liquid(&format!("fetch.query.{name}"), &value) {
                    fetch.query.insert(name, v);
                }
            }
        }
        if s.str("signing_key").is_some_and(|k| !k.is_empty()) {
            self.problem("`signing_key`: herald signs fetches with a Secret (`fetch.secretRef`) and its own X-Herald-Signature header, not Knock's x-knock-signature (dropped)");
        }
        self.unknown(&s, "fetch setting");
        step.fetch = Some(fetch);
        true
    }

    fn branch(&mut self, f: &mut Fields, step: &mut Step) -> bool {
        step.step_type = StepType::Branch;
        let me = self.step.clone();
        for b in f.get("branches").and_then(Value::as_array).into_iter().flatten() {
            let mut bf = Fields::new(Some(b));
            self.step = me.clone();
            let name = bf.str("name").unwrap_or_default().to_string();
            let conditions = bf.get("conditions").map(|c| self.conditions(c)).unwrap_or_default();
            let terminates = bf.get("terminates").and_then(Value::as_bool).unwrap_or(false);
            let steps = bf.get("steps").map(|s| self.steps(s)).unwrap_or_default();
            self.step = me.clone();
            self.unknown(&bf, &format!("branch `{name}` field"));
            step.branches.push(Branch { name, conditions, terminates, steps });
        }
        self.step = me;
        true
    }

    fn trigger_workflow(&mut self, f: &mut Fields, step: &mut Step) -> bool {
        step.step_type = StepType::TriggerWorkflow;
        let mut s = Fields::new(f.get("settings"));
        let Some(workflow) = s.str("workflow_key").filter(|w| !w.is_empty()) else {
            self.problem("a trigger_workflow step without `workflow_key` (step dropped)");
            return false;
        };
        if has_markup(workflow) {
            self.problem(format!("`workflow_key` is a template (`{workflow}`): herald needs a fixed workflow key (step dropped)"));
            return false;
        }
        // Knock's defaults, which herald's match.
        let default = |value: Option<&str>, default: &str| value.filter(|v| squash(v) != squash(default)).map(str::to_string);
        if let Some(recipients) = default(s.str("recipients"), "{{ recipient.id }}") {
            self.problem(format!("`recipients: {recipients}`: herald starts the workflow for this recipient only (kept: this recipient)"));
        }
        let data = default(s.str("data"), "{{ data | json }}").and_then(|d| self.liquid("triggerWorkflow.data", &d));
        let actor = default(s.str("actor"), "{{ actor.id }}").and_then(|a| self.liquid("triggerWorkflow.actor", &a));
        let tenant = default(s.str("tenant"), "{{ tenant.id }}").and_then(|t| self.liquid("triggerWorkflow.tenant", &t));
        let cancellation_key = match s.str("cancellation_key") {
            Some(k) if !k.contains("workflow.cancellation_key") => {
                if k.is_empty() {
                    None
                } else {
                    self.liquid("triggerWorkflow.cancellationKey", k)
                }
            }
            _ => {
                self.problem(
                    "the new run's cancellation key: Knock passes this run's (`{{ workflow.cancellation_key }}`), which herald's templates cannot see (the new run gets none; set `cancellation_key` to import)",
                );
                None
            }
        };
        self.unknown(&s, "trigger_workflow setting");
        step.trigger_workflow = Some(TriggerWorkflowStep { workflow: workflow.to_string(), data, actor, tenant, cancellation_key });
        true
    }

    /// Knock's `{unit, value}` Duration.
    fn duration(&mut self, what: &str, d: &Value) -> Option<DurationValue> {
        let unit = d.get("unit").and_then(Value::as_str);
        let value = d.get("value").and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())));
        match (unit, value) {
            (Some(unit), Some(value)) => {
                let duration = DurationValue::Unit { unit: unit.to_string(), value };
                match crate::core::windows::duration(&duration) {
                    Ok(_) => Some(duration),
                    Err(e) => {
                        self.problem(format!("`{what}`: {e} (dropped)"));
                        None
                    }
                }
            }
            _ => {
                self.problem(format!("`{what}` is not a `{{unit, value}}` duration (dropped)"));
                None
            }
        }
    }

    fn count(&mut self, what: &str, n: &Value) -> Option<i32> {
        match n.as_u64().or_else(|| n.as_str().and_then(|s| s.trim().parse().ok())) {
            Some(n) if n <= i32::MAX as u64 => Some(n as i32),
            _ => {
                self.problem(format!("`{what}` is not a whole number (dropped)"));
                None
            }
        }
    }

    /// A path into the run's context (`data.remind_at`).
    fn field_path(&mut self, what: &str, path: &str) -> String {
        if path.starts_with("vars.") {
            self.problem(format!("`{what}: {path}`: herald has no environment variables (`vars`); the step will be skipped (InvalidWindow)"));
        }
        path.to_string()
    }

    // -- Conditions ----------------------------------------------------------

    fn conditions(&mut self, value: &Value) -> Conditions {
        let conditions = match value {
            Value::Object(o) if o.contains_key("all") => Conditions::All(AllOf { all: self.condition_items(o.get("all")) }),
            Value::Object(o) if o.contains_key("any") => Conditions::Any(AnyOf { any: self.condition_items(o.get("any")) }),
            Value::Array(_) => Conditions::List(self.condition_items(Some(value))),
            Value::Null => Conditions::default(),
            Value::Object(o) if o.is_empty() => Conditions::default(),
            _ => {
                self.problem(format!("conditions `{}` are neither `{{all: [...]}}` nor `{{any: [...]}}` (dropped)", shorten(&value.to_string())));
                Conditions::default()
            }
        };
        if let Err(e) = crate::core::conditions::check(&conditions) {
            self.problem(format!("conditions: {e}"));
        }
        conditions
    }

    fn condition_items(&mut self, items: Option<&Value>) -> Vec<ConditionItem> {
        let mut out = Vec::new();
        for item in items.and_then(Value::as_array).into_iter().flatten() {
            if let Some(all) = item.get("all") {
                out.push(ConditionItem::All(AllOf { all: self.condition_items(Some(all)) }));
            } else if let Some(any) = item.get("any") {
                out.push(ConditionItem::Any(AnyOf { any: self.condition_items(Some(any)) }));
            } else if let Some(c) = self.condition(item) {
                out.push(ConditionItem::Condition(c));
            }
        }
        out
    }

    fn condition(&mut self, item: &Value) -> Option<StepCondition> {
        let mut f = Fields::new(Some(item));
        let variable = f.str("variable").unwrap_or_default().to_string();
        let operator = f.str("operator").unwrap_or_default().to_string();
        let argument = f.get("argument").map(|a| self.argument(&variable, a));
        self.unknown(&f, "condition field");
        self.context_path(&format!("condition on `{variable}`"), &variable);
        Some(StepCondition { variable, operator, argument })
    }

    /// A condition argument: Knock's are strings holding JSON (`"5"`, `"true"`,
    /// `"[\"a\"]"`), decoded as Knock decodes them; `$message.*` kept; a path
    /// into the context (a dynamic argument) or Liquid is a problem, as herald
    /// compares arguments as written.
    fn argument(&mut self, variable: &str, a: &Value) -> Value {
        let Value::String(s) = a else { return a.clone() };
        if s.starts_with("$message.") {
            return a.clone();
        }
        if CONTEXT_PREFIXES.iter().any(|p| s.starts_with(p)) {
            self.problem(format!("condition on `{variable}`: the argument `{s}` names a value of the run (a dynamic argument); herald compares with the text as written (kept)"));
            return a.clone();
        }
        if has_markup(s) {
            self.problem(format!("condition on `{variable}`: the argument `{s}` is Liquid; herald compares with the text as written (kept)"));
            return a.clone();
        }
        serde_json::from_str(s).unwrap_or_else(|_| a.clone())
    }

    /// A variable path (`vars.x`, `workflow.id`) herald's context lacks.
    fn context_path(&mut self, what: &str, path: &str) {
        if let Some(missing) = missing_variable(path) {
            self.problem(format!("{what}: {missing}"));
        }
    }

    // -- Liquid --------------------------------------------------------------

    /// Checks one Liquid field the way herald will run it: Knock features
    /// herald lacks (partials, translations, Knock-only variables) and then
    /// herald's own compiler (filters it does not have, syntax). `None` when
    /// the field cannot be kept (`--lossy` drops it).
    fn liquid(&mut self, field: &str, source: &str) -> Option<String> {
        let mut source = source.to_string();
        let mut partials = Vec::new();
        let mut translated = false;
        for m in markup(&source) {
            let inner = m.inner.trim();
            if m.tag {
                let name = inner.split_whitespace().next().unwrap_or("");
                if name == "render" || name == "include" {
                    partials.push(inner.to_string());
                }
                if name == "t" || name == "endt" {
                    translated = true;
                }
            } else if inner.starts_with('>') {
                partials.push(inner.to_string());
            }
            if !m.tag || !m.inner.trim_start().starts_with("comment") {
                for filter in filters(m.inner) {
                    if filter == "t" {
                        translated = true;
                    }
                }
                for var in variables(m.inner) {
                    if let Some(missing) = missing_variable(&var) {
                        self.problem(format!("{field}: {missing}"));
                    }
                }
            }
        }
        if !partials.is_empty() {
            self.problem(format!("{field}: uses partials ({}); herald has no partials (removed)", partials.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")));
            source = remove_markup(&source, |m| {
                let inner = m.inner.trim();
                (m.tag && matches!(inner.split_whitespace().next(), Some("render" | "include"))) || (!m.tag && inner.starts_with('>'))
            });
        }
        if translated {
            self.problem(format!("{field}: uses translations (`{{% t %}}` or the `t` filter); herald has none (the default-locale text is kept)"));
            source = remove_markup(&source, |m| m.tag && matches!(m.inner.split_whitespace().next(), Some("t" | "endt")));
        }
        let probe = Step {
            step_ref: self.step.clone().unwrap_or_default(),
            step_type: StepType::Channel,
            channel: Some("probe".into()),
            template: Some(StepTemplate { body: Some(source.clone()), ..Default::default() }),
            ..Default::default()
        };
        if let Err(e) = CompiledTemplates::compile(&[probe]) {
            match unknown_filter(&e.message) {
                // Already said: translations.
                Some("t") if translated => {}
                Some(filter) => self.problem(format!("{field}: the Liquid filter `{filter}` is not one herald has (field dropped)")),
                None => self.problem(format!("{field}: herald's Liquid does not take it: {} (field dropped)", e.message)),
            }
            return None;
        }
        Some(source)
    }
}

/// The filter named by liquid's "Unknown filter" error.
fn unknown_filter(message: &str) -> Option<&str> {
    let rest = message.split("requested filter=").nth(1)?;
    Some(rest.split(|c: char| c.is_whitespace() || c == ',').next().unwrap_or(rest))
}

fn normalize_channel_type(kind: &str) -> String {
    match kind {
        "webhook" => "http".into(),
        other => other.to_string(),
    }
}

/// Knock's batch and throttle keys: a data path (`page_id` means
/// `{{ data.page_id }}`) or Liquid, kept as it is.
fn key_template(key: &str) -> String {
    if has_markup(key) {
        key.to_string()
    } else {
        format!("{{{{ data.{} }}}}", key.trim())
    }
}

/// The inside of a Knock chat `json_body` of the form `{"blocks": [...]}`
/// (Liquid allowed inside the list), or of a bare list.
fn blocks_of(json_body: &str) -> Option<String> {
    let trimmed = json_body.trim();
    if trimmed.starts_with('[') {
        return Some(trimmed.to_string());
    }
    let inner = trimmed.strip_prefix('{')?.strip_suffix('}')?.trim();
    let rest = inner.strip_prefix("\"blocks\"")?.trim_start().strip_prefix(':')?.trim();
    // The only key: the list runs to the end.
    (rest.starts_with('[') && rest.ends_with(']')).then(|| rest.to_string())
}

/// Markdown that Slack's mrkdwn reads otherwise (Knock converts it; herald does not).
fn markdown_differs_in_slack(markdown: &str) -> Option<&'static str> {
    let text = remove_markup(markdown, |_| true);
    if text.contains("**") || text.contains("__") {
        return Some("Markdown bold (`**`)");
    }
    if text.contains("](") {
        return Some("Markdown links (`[text](url)`)");
    }
    if text.lines().any(|l| l.trim_start().starts_with('#')) {
        return Some("Markdown headings");
    }
    if text.contains("~~") {
        return Some("Markdown strike-through (`~~`)");
    }
    if text.contains('*') {
        return Some("Markdown emphasis (`*`)");
    }
    None
}

/// `url` with Knock's query parameters added (values are Liquid: each is captured and URL-encoded).
fn with_query(url: &str, params: &[(String, String)]) -> String {
    let mut captures = String::new();
    let mut query = String::new();
    for (i, (name, value)) in params.iter().enumerate() {
        let sep = if i == 0 && !url.contains('?') { '?' } else { '&' };
        let name: String = serde_urlencoded::to_string([(name.as_str(), "")]).unwrap_or_default().trim_end_matches('=').to_string();
        if has_markup(value) {
            captures.push_str(&format!("{{% capture knock_query_{i} %}}{value}{{% endcapture %}}"));
            query.push_str(&format!("{sep}{name}={{{{ knock_query_{i} | url_encode }}}}"));
        } else {
            let encoded = serde_urlencoded::to_string([("", value.as_str())]).unwrap_or_default();
            query.push_str(&format!("{sep}{name}{encoded}"));
        }
    }
    format!("{captures}{url}{query}")
}

/// A template put where a layout says `{{ content }}`: rendered first, as Knock does.
fn wrap(layout: Option<&str>, body: Option<String>) -> Option<String> {
    match (layout, body) {
        (Some(layout), Some(body)) => Some(format!("{{% capture content %}}{body}{{% endcapture %}}{layout}")),
        (_, body) => body,
    }
}

/// Whitespace-free form, for comparing Liquid defaults.
fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

fn shorten(s: &str) -> String {
    crate::core::truncate(s, 60)
}

fn has_markup(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// A variable of Knock's context that herald's does not have, and what it means.
fn missing_variable(path: &str) -> Option<String> {
    let root = path.split(['.', '[']).next().unwrap_or("");
    match root {
        "vars" => Some(format!("`{path}`: herald has no environment variables (`vars`; it renders empty)")),
        "current_message" => Some(format!("`{path}`: herald has no `current_message` (it renders empty)")),
        "timestamp" if path == "timestamp" => Some("`timestamp` (now): herald has no such variable (it renders empty)".to_string()),
        "workflow" => {
            let field = path.strip_prefix("workflow.").map(|f| f.split(['.', '[']).next().unwrap_or(""));
            match field {
                None | Some("key" | "categories") => None,
                Some(f) => Some(format!("`workflow.{f}`: herald's `workflow` has `key` and `categories` only (it renders empty)")),
            }
        }
        _ => None,
    }
}

/// One `{{ ... }}` or `{% ... %}` in a template.
struct Markup<'s> {
    start: usize,
    end: usize,
    tag: bool,
    inner: &'s str,
}

/// The Liquid markup of a template, in order (inside `{% raw %}` too: close enough for checks).
fn markup(source: &str) -> Vec<Markup<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(found) = source[at..].find('{') {
        let start = at + found;
        let rest = &source[start..];
        let (tag, close) = if rest.starts_with("{{") {
            (false, "}}")
        } else if rest.starts_with("{%") {
            (true, "%}")
        } else {
            at = start + 1;
            continue;
        };
        match rest[2..].find(close) {
            Some(len) => {
                let inner = rest[2..2 + len].trim_start_matches('-').trim_end_matches('-');
                out.push(Markup { start, end: start + 2 + len + 2, tag, inner });
                at = start + 2 + len + 2;
            }
            None => break,
        }
    }
    out
}

/// `source` without the markup `drop` picks.
fn remove_markup(source: &str, drop: impl Fn(&Markup) -> bool) -> String {
    let mut out = String::new();
    let mut at = 0;
    for m in markup(source) {
        if drop(&m) {
            out.push_str(&source[at..m.start]);
            at = m.end;
        }
    }
    out.push_str(&source[at..]);
    out
}

/// `inner` with string literals blanked.
fn without_strings(inner: &str) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    for c in inner.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                out.push(' ');
            }
            Some(_) => {}
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                out.push(' ');
            }
            None => out.push(c),
        }
    }
    out
}

/// The filter names used in one piece of markup.
fn filters(inner: &str) -> Vec<String> {
    without_strings(inner).split('|').skip(1).filter_map(|f| f.split(|c: char| c == ':' || c.is_whitespace()).find(|s| !s.is_empty()).map(str::to_string)).collect()
}

/// The words that may be variable paths (`data.x`, `vars.y`) in one piece of markup.
fn variables(inner: &str) -> Vec<String> {
    without_strings(inner)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
        .map(|w| w.trim_end_matches('.').to_string())
        .collect()
}

/// A Workflow as YAML, without the empty status.
pub fn to_yaml(workflow: &Workflow) -> Result<String, serde_yaml::Error> {
    let mut value = serde_json::to_value(workflow).map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
    }
    serde_yaml::to_string(&value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(json: Value) -> Imported {
        run_with(json, &Options::default())
    }

    fn run_with(json: Value, options: &Options) -> Imported {
        convert(&Source { key: "wf".into(), json, problems: Vec::new() }, &BTreeMap::new(), options)
    }

    fn one_step(step: Value) -> (Step, Vec<String>) {
        let imported = run(json!({"steps": [step]}));
        let problems = imported.problems.iter().map(|p| p.to_string()).collect();
        (imported.workflow.spec.steps.into_iter().next().unwrap_or_default(), problems)
    }

    #[test]
    fn workflow_fields_map() {
        let imported = run(json!({
            "name": "New comment", "categories": ["a"], "trigger_frequency": "once_per_recipient_per_tenant",
            "settings": {"override_preferences": true},
            "trigger_data_json_schema": {"type": "object"},
            "conditions": {"all": [{"variable": "recipient.plan", "operator": "equal_to", "argument": "pro"}]},
            "steps": [],
            "__readonly": {"key": "new_comment", "active": false, "valid": true}
        }));
        assert!(imported.problems.is_empty(), "{:?}", imported.problems);
        let wf = imported.workflow;
        assert_eq!(wf.metadata.name.as_deref(), Some(crate::core::ids::name_for_id("wf").as_str()));
        assert_eq!(wf.spec.key.as_deref(), Some("wf"));
        assert!(!wf.spec.active);
        assert!(wf.spec.override_preferences);
        assert_eq!(wf.spec.categories, vec!["a".to_string()]);
        assert_eq!(wf.spec.trigger_frequency, TriggerFrequency::OncePerRecipientPerTenant);
        assert_eq!(wf.spec.data_schema, Some(json!({"type": "object"}).as_object().unwrap().clone()));
        assert_eq!(serde_json::to_value(&wf.spec.conditions).unwrap(), json!({"all": [{"variable": "recipient.plan", "operator": "equal_to", "argument": "pro"}]}));
    }

    #[test]
    fn arguments_are_decoded_as_knock_decodes_them() {
        let (step, problems) = one_step(json!({"ref": "d", "type": "delay", "settings": {"delay_for": {"unit": "seconds", "value": 5}},
        "conditions": {"any": [
            {"variable": "data.n", "operator": "greater_than", "argument": "5"},
            {"variable": "data.b", "operator": "equal_to", "argument": "true"},
            {"variable": "data.s", "operator": "equal_to", "argument": "pro"},
            {"variable": "data.l", "operator": "contains_all", "argument": "[\"a\",\"b\"]"},
            {"all": [{"variable": "refs.x.engagement_status", "operator": "contains", "argument": "$message.seen"}, {"variable": "data.e", "operator": "exists"}]}
        ]}}));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            serde_json::to_value(&step.conditions).unwrap(),
            json!({"any": [
                {"variable": "data.n", "operator": "greater_than", "argument": 5},
                {"variable": "data.b", "operator": "equal_to", "argument": true},
                {"variable": "data.s", "operator": "equal_to", "argument": "pro"},
                {"variable": "data.l", "operator": "contains_all", "argument": ["a", "b"]},
                {"all": [{"variable": "refs.x.engagement_status", "operator": "contains", "argument": "$message.seen"}, {"variable": "data.e", "operator": "exists"}]}
            ]})
        );
    }

    #[test]
    fn dynamic_arguments_and_vars_are_problems() {
        let (_, problems) = one_step(json!({"ref": "d", "type": "delay", "settings": {"delay_for": {"unit": "seconds", "value": 5}},
            "conditions": {"all": [{"variable": "data.plan", "operator": "equal_to", "argument": "recipient.plan"}, {"variable": "vars.flag", "operator": "exists"}]}}));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("step `d`: condition on `data.plan`: the argument `recipient.plan`"), "{problems:?}");
        assert!(problems[1].contains("`vars.flag`"), "{problems:?}");
    }

    #[test]
    fn delay_maps_duration_and_field_path() {
        let (step, problems) = one_step(json!({"ref": "d", "type": "delay", "settings": {"delay_for": {"unit": "minutes", "value": 5}}}));
        assert!(problems.is_empty());
        assert_eq!(step.delay.unwrap().duration, Some(DurationValue::Unit { unit: "minutes".into(), value: 5 }));
        let (step, problems) = one_step(json!({"ref": "d", "type": "delay", "settings": {"delay_until_field_path": "data.remind_at"}}));
        assert!(problems.is_empty());
        assert_eq!(step.delay.unwrap().window_from.as_deref(), Some("data.remind_at"));
        let (_, problems) = one_step(json!({"ref": "d", "type": "delay", "settings": {"delay_for": {"unit": "minutes", "value": 5}, "delay_until_field_path": "data.at"}}));
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn batch_settings_map() {
        let (step, problems) = one_step(json!({"ref": "b", "type": "batch", "settings": {
            "batch_key": "page_id", "batch_order": "asc", "batch_window": {"unit": "seconds", "value": 30},
            "batch_window_type": "sliding", "batch_window_extension_limit": {"unit": "minutes", "value": 10},
            "batch_items_max_limit": 50, "batch_items_render_limit": 20, "batch_execution_mode": "flush_leading"}}));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            step.batch.unwrap(),
            BatchStep {
                window: Some(DurationValue::Unit { unit: "seconds".into(), value: 30 }),
                window_from: None,
                key: Some("{{ data.page_id }}".into()),
                window_type: WindowType::Sliding,
                max_window: Some(DurationValue::Unit { unit: "minutes".into(), value: 10 }),
                max_activities: Some(50),
                render_limit: Some(20),
                mode: BatchMode::FlushLeading,
            }
        );
        let (step, problems) =
            one_step(json!({"ref": "b", "type": "batch", "settings": {"batch_key": "{{ data.a }}-{{ actor.id }}", "batch_until_field_path": "data.until", "batch_order": "desc"}}));
        assert_eq!(problems, vec!["workflow `wf` step `b`: `batch_order: desc` (render the newest activities): herald renders the oldest (asc kept)".to_string()]);
        let batch = step.batch.unwrap();
        assert_eq!(batch.key.as_deref(), Some("{{ data.a }}-{{ actor.id }}"));
        assert_eq!(batch.window_from.as_deref(), Some("data.until"));
    }

    #[test]
    fn throttle_settings_map() {
        let (step, problems) =
            one_step(json!({"ref": "t", "type": "throttle", "settings": {"throttle_window": {"unit": "hours", "value": 1}, "throttle_limit": 3, "throttle_key": "alert_id"}}));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            step.throttle.unwrap(),
            ThrottleStep { window: Some(DurationValue::Unit { unit: "hours".into(), value: 1 }), window_from: None, limit: 3, key: Some("{{ data.alert_id }}".into()) }
        );
    }

    #[test]
    fn fetch_settings_map() {
        let (step, problems) = one_step(json!({"ref": "f", "type": "http_fetch", "settings": {
            "method": "post", "url": "https://x.example/{{ data.id }}", "body": "{\"a\": 1}", "response_path": "build",
            "headers": [{"key": "Accept", "value": "application/json"}], "query_params": [{"key": "q", "value": "{{ data.q }}"}]}}));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(step.step_type, StepType::Fetch);
        let fetch = step.fetch.unwrap();
        assert_eq!(fetch.method.as_deref(), Some("POST"));
        assert_eq!(fetch.url, "https://x.example/{{ data.id }}");
        assert_eq!(fetch.headers, BTreeMap::from([("Accept".to_string(), "application/json".to_string())]));
        assert_eq!(fetch.query, BTreeMap::from([("q".to_string(), "{{ data.q }}".to_string())]));
        assert_eq!(fetch.body.as_deref(), Some("{\"a\": 1}"));
        assert_eq!(fetch.response_path.as_deref(), Some("build"));
        let (_, problems) = one_step(json!({"ref": "f", "type": "http_fetch", "settings": {"method": "get", "url": "https://x.example", "headers": "{{ data.headers }}"}}));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("`headers` is a template"));
    }

    #[test]
    fn channel_templates_map_per_type() {
        let options = Options { channels: BTreeMap::from([("postmark".to_string(), "mail".to_string())]), ..Default::default() };
        let imported = run_with(
            json!({"steps": [
                {"ref": "email_1", "type": "channel", "channel_key": "postmark", "template": {"subject": "Hi", "html_body": "<p>{{ data.x }}</p>", "text_body": "{{ data.x }}"}},
                {"ref": "chat_1", "type": "channel", "channel_key": "slack", "template": {"json_body": "{\"blocks\": [{\"type\": \"divider\"}]}", "summary": "s"}},
                {"ref": "chat_2", "type": "channel", "channel_key": "slack", "channel_type": "chat", "template": {"markdown_body": "hello {{ data.x }}"}},
                {"ref": "webhook_1", "type": "channel", "channel_key": "hooks", "template": {"method": "put", "url": "https://h.example/a", "headers": [{"key": "X-A", "value": "{{ data.a }}"}], "query_params": [{"key": "k", "value": "{{ data.k }}"}], "body": "{}"}},
                {"ref": "in_app_feed_1", "type": "channel", "channel_key": "feed", "template": {"markdown_body": "**hi**", "action_url": "https://a.example"}}
            ]}),
            &options,
        );
        assert!(imported.problems.is_empty(), "{:?}", imported.problems);
        let steps = imported.workflow.spec.steps;
        assert_eq!(steps[0].channel.as_deref(), Some("mail"));
        let email = steps[0].template.clone().unwrap();
        assert_eq!((email.subject.as_deref(), email.html.as_deref(), email.text.as_deref()), (Some("Hi"), Some("<p>{{ data.x }}</p>"), Some("{{ data.x }}")));
        let chat = steps[1].template.clone().unwrap();
        assert_eq!((chat.blocks.as_deref(), chat.text.as_deref()), (Some("[{\"type\": \"divider\"}]"), Some("s")));
        assert_eq!(steps[2].template.clone().unwrap().text.as_deref(), Some("hello {{ data.x }}"));
        let http = steps[3].template.clone().unwrap();
        assert_eq!(http.method.as_deref(), Some("PUT"));
        assert_eq!(http.url.as_deref(), Some("{% capture knock_query_0 %}{{ data.k }}{% endcapture %}https://h.example/a?k={{ knock_query_0 | url_encode }}"));
        assert_eq!(http.headers.get("X-A").map(String::as_str), Some("{{ data.a }}"));
        assert_eq!(http.body.as_deref(), Some("{}"));
        let feed = steps[4].template.clone().unwrap();
        assert_eq!((feed.markdown_body.as_deref(), feed.action_url.as_deref()), (Some("**hi**"), Some("https://a.example")));
    }

    #[test]
    fn channels_herald_lacks_are_refused() {
        let imported = run(json!({"steps": [
            {"ref": "sms_1", "type": "channel", "channel_key": "twilio", "template": {"text_body": "hi"}},
            {"ref": "p", "type": "channel", "channel_key": "apns", "template": {"title": "t", "text_body": "hi"}},
            {"ref": "x", "type": "channel", "channel_key": "mystery", "template": {"markdown_body": "hi"}},
            {"ref": "c", "type": "channel", "channel_key": "slack", "channel_type": "chat", "template": {"markdown_body": "**bold**"}},
            {"ref": "g", "type": "channel", "channel_group_key": "all", "template": {}}
        ]}));
        let problems: Vec<String> = imported.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems[0].contains("`sms` channel"));
        assert!(problems[1].contains("`push` channel"));
        assert!(problems[2].contains("--channel-type mystery="));
        assert!(problems[3].contains("mrkdwn"));
        assert!(problems[4].contains("channel groups"));
        // Lossy: the refused steps are gone, the chat step kept as written.
        let refs: Vec<&str> = imported.workflow.spec.steps.iter().map(|s| s.step_ref.as_str()).collect();
        assert_eq!(refs, vec!["c"]);
        // --channel-type settles what the template does not say.
        let options = Options { channel_types: BTreeMap::from([("mystery".to_string(), "in_app_feed".to_string())]), ..Default::default() };
        let imported = run_with(json!({"steps": [{"ref": "x", "type": "channel", "channel_key": "mystery", "template": {"markdown_body": "hi"}}]}), &options);
        assert!(imported.problems.is_empty(), "{:?}", imported.problems);
        assert_eq!(imported.workflow.spec.steps[0].template.clone().unwrap().markdown_body.as_deref(), Some("hi"));
    }

    #[test]
    fn liquid_herald_cannot_run_is_reported() {
        let (step, problems) = one_step(json!({"ref": "email_1", "type": "channel", "channel_key": "mail", "template": {
            "subject": "{{ vars.app_name }} news",
            "html_body": "{% t %}Hello{% endt %} {{ recipient.name }}{% render 'footer' %}{{> header }}",
            "text_body": "{{ data.amount | no_such_filter }}"}}));
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("template.subject: `vars.app_name`"), "{problems:?}");
        assert!(problems[1].contains("template.html: uses partials (`render 'footer'`, `> header`)"), "{problems:?}");
        assert!(problems[2].contains("template.html: uses translations"), "{problems:?}");
        assert!(problems[3].contains("template.text: the Liquid filter `no_such_filter` is not one herald has"), "{problems:?}");
        let template = step.template.unwrap();
        assert_eq!(template.html.as_deref(), Some("Hello {{ recipient.name }}"));
        assert_eq!(template.text, None);
    }

    #[test]
    fn trigger_workflow_maps_and_knock_defaults_are_herald_defaults() {
        let (step, problems) = one_step(json!({"ref": "t", "type": "trigger_workflow", "settings": {
            "workflow_key": "other", "recipients": "{{ recipient.id }}", "actor": "{{actor.id}}", "tenant": "{{ tenant.id }}", "data": "{{ data | json }}", "cancellation_key": "{{ data.k }}"}}));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            step.trigger_workflow.unwrap(),
            TriggerWorkflowStep { workflow: "other".into(), data: None, actor: None, tenant: None, cancellation_key: Some("{{ data.k }}".into()) }
        );
        let (_, problems) = one_step(json!({"ref": "t", "type": "trigger_workflow", "settings": {"workflow_key": "other", "recipients": "{{ data.users }}"}}));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("`recipients: {{ data.users }}`"));
        assert!(problems[1].contains("cancellation key"));
    }

    #[test]
    fn branches_nest_and_keep_their_steps() {
        let (step, problems) = one_step(json!({"ref": "b1", "type": "branch", "branches": [
            {"name": "A", "terminates": true, "conditions": {"all": [{"variable": "data.a", "operator": "equal_to", "argument": "1"}]},
             "steps": [{"ref": "b2", "type": "branch", "branches": [
                 {"name": "B", "terminates": false, "conditions": {"any": [{"variable": "data.b", "operator": "exists"}]}, "steps": [{"ref": "d", "type": "delay", "settings": {"delay_for": {"unit": "seconds", "value": 1}}}]},
                 {"name": "Default", "terminates": false, "steps": []}]}]},
            {"name": "Default", "terminates": false, "steps": [{"ref": "w", "type": "wait_for_event", "settings": {}}]}
        ]}));
        assert_eq!(problems, vec!["workflow `wf` step `w`: step type `wait_for_event`: herald has no such step (step dropped)".to_string()]);
        assert_eq!(step.branches.len(), 2);
        assert!(step.branches[0].terminates);
        assert_eq!(step.branches[0].steps[0].branches[0].steps[0].step_ref, "d");
        assert!(step.branches[1].steps.is_empty());
    }

    #[test]
    fn unknown_fields_are_reported_not_dropped_silently() {
        let (_, problems) = one_step(json!({"ref": "d", "type": "delay", "settings": {"delay_for": {"unit": "seconds", "value": 5}, "delay_mode": "x"}, "new_knock_thing": true}));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("delay setting `delay_mode`")));
        assert!(problems.iter().any(|p| p.contains("step field `new_knock_thing`")));
    }

    #[test]
    fn at_paths_stay_inside_the_workflow_directory() {
        let root = std::env::temp_dir().join(format!("herald-knock-{}", std::process::id()));
        std::fs::create_dir_all(root.join("wf/email_1")).unwrap();
        std::fs::write(root.join("wf/email_1/html_body.html"), "<p>hi</p>").unwrap();
        std::fs::write(root.join("outside.txt"), "secret").unwrap();
        let wf = root.join("wf");
        assert_eq!(resolve(&wf, &wf, "email_1/html_body.html").unwrap(), wf.join("email_1/html_body.html"));
        assert_eq!(resolve(&wf, &wf, "email_1/../email_1/html_body.html").unwrap(), wf.join("email_1/html_body.html"));
        assert!(resolve(&wf, &wf, "../outside.txt").unwrap_err().contains("outside"));
        assert!(resolve(&wf, &wf, "/etc/passwd").unwrap_err().contains("not a relative path"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.join("outside.txt"), wf.join("link.txt")).unwrap();
            assert!(resolve(&wf, &wf, "link.txt").unwrap_err().contains("outside"));
        }
        std::fs::write(
            wf.join(WORKFLOW_JSON),
            r#"{"steps": [{"ref": "email_1", "type": "channel", "channel_key": "m", "template": {"subject": "s", "html_body@": "email_1/html_body.html", "text_body@": "../outside.txt", "subject@": "x.txt"}}]}"#,
        )
        .unwrap();
        let source = read_workflow(&wf).unwrap();
        assert_eq!(source.key, "wf");
        assert_eq!(source.json.pointer("/steps/0/template/html_body"), Some(&json!("<p>hi</p>")));
        // The inline `subject` wins over `subject@`; the escaping path is a problem.
        assert_eq!(source.json.pointer("/steps/0/template/subject"), Some(&json!("s")));
        assert_eq!(source.problems.len(), 1, "{:?}", source.problems);
        assert_eq!(source.problems[0].step.as_deref(), Some("email_1"));
        assert!(source.problems[0].what.contains("`template.text_body@`: `../outside.txt` points outside"), "{:?}", source.problems);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn helpers() {
        assert_eq!(key_template("page_id"), "{{ data.page_id }}");
        assert_eq!(key_template("{{ data.a }}"), "{{ data.a }}");
        assert_eq!(blocks_of(" {\n \"blocks\": [1, {% if x %}2{% endif %}]\n}\n").as_deref(), Some("[1, {% if x %}2{% endif %}]"));
        assert_eq!(blocks_of("[1]").as_deref(), Some("[1]"));
        assert_eq!(blocks_of("{\"text\": \"x\", \"blocks\": []}"), None);
        assert_eq!(with_query("https://a/b", &[("x y".into(), "1 2".into()), ("z".into(), "3".into())]), "https://a/b?x+y=1+2&z=3");
        assert_eq!(markdown_differs_in_slack("plain {{ data.x | default: '*' }}"), None);
        assert!(markdown_differs_in_slack("[a](b)").is_some());
        assert_eq!(missing_variable("workflow.key"), None);
        assert!(missing_variable("workflow.id").is_some());
        assert!(missing_variable("timestamp").is_some());
        assert_eq!(unknown_filter("liquid: Unknown filter with: requested filter=pluralize available filters=abs"), Some("pluralize"));
    }
}
