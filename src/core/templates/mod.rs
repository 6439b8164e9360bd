//! Liquid templates of a workflow's steps, and delay durations.
//!
//! Templates are parsed once, when a Workflow is applied, so that a broken
//! template is reported on the Workflow rather than on every run.
//!
//! Missing variables: the liquid crate errors on an unknown variable and has no
//! lenient mode, while Knock (Shopify Liquid) renders it as nothing. Rendering
//! therefore goes through a lenient view of the JSON context ([`Node`]) in
//! which any missing key, at any depth, is `nil`: `{{ data.nope }}` and
//! `{{ nope.deeper }}` render as "", `{{ data.nope | default: "x" }}` renders
//! "x", and `{% if data.nope %}` is false. Limits: a variable made with
//! `{% assign %}` / `{% capture %}` lives in liquid's own (strict) model, so
//! `{% assign x = data.obj %}{{ x.missing }}` still errors; and filters that
//! need an array (`join`, `map`, ...) error on `nil` as they do on any non-array.
//!
//! Rendering is bounded ([`limits`]): counted ranges of at most 1,000 items
//! and at most 1 MiB of output per field; and each field's render has a CPU
//! [`budget`] of 100,000 loop iterations and 250 ms, past which that step
//! fails for that recipient (`RenderBudgetExceeded`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use liquid::model::{ArrayView, DisplayCow, KStringCow, ObjectView, ScalarCow, State, Value as LiquidValue, ValueView};
use serde_json::Value;

use super::conditions;
use super::truncate;

pub mod budget;
mod capped;
mod knock_filters;
pub mod limits;
mod markup;
use crate::resources::workflow::{Step, StepTemplate, StepType};

/// A template that does not parse or render, naming the step and the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("step `{step}` {field}: {message}")]
pub struct TemplateError {
    pub step: String,
    pub field: String,
    pub message: String,
    /// The render ran out of its CPU [`budget`] (the template may be fine
    /// for other data; the step's reason says so).
    pub over_budget: bool,
}

impl TemplateError {
    fn new(step: &str, field: &str, message: impl Into<String>) -> Self {
        TemplateError { step: step.into(), field: field.into(), message: message.into(), over_budget: false }
    }

    fn from_render(step: &str, field: &str, failure: RenderFailure) -> Self {
        match failure {
            RenderFailure::Failed(message) => Self::new(step, field, message),
            RenderFailure::OverBudget(message) => TemplateError { over_budget: true, ..Self::new(step, field, message) },
        }
    }
}

/// Why one field did not render.
enum RenderFailure {
    Failed(String),
    OverBudget(String),
}

/// `{{ value | json }}`: the value as JSON text, as Knock's `json` filter does,
/// so that http bodies embed data safely (`{"text": {{ data.message | json }}}`
/// quotes and escapes the string; `{{ data | json }}` writes the whole object).
/// Missing values are `null`.
#[derive(Clone, liquid_core::ParseFilter, liquid_core::FilterReflection)]
#[filter(name = "json", description = "Serializes the input as JSON.", parsed(JsonFilter))]
struct JsonFilterParser;

#[derive(Debug, Default, liquid_core::Display_filter)]
#[name = "json"]
struct JsonFilter;

impl liquid_core::Filter for JsonFilter {
    fn evaluate(&self, input: &dyn ValueView, _runtime: &dyn liquid_core::Runtime) -> liquid_core::Result<LiquidValue> {
        // A whole context can be serialized: that is work the deadline must see.
        budget::check_time_liquid()?;
        // liquid's Value serializes untagged: objects, arrays, strings, numbers, booleans, nil as null.
        // Escaping can make the text several times the value's size: written capped, as output is.
        let mut out = limits::CappedOutput::default();
        if let Err(e) = serde_json::to_writer(&mut out, &input.to_value()) {
            return Err(liquid_core::Error::with_msg(if out.overflowed { format!("json: {}", limits::too_large("the JSON text")) } else { format!("json: {e}") }));
        }
        Ok(LiquidValue::scalar(String::from_utf8(out.bytes).map_err(|_| liquid_core::Error::with_msg("json: not UTF-8"))?))
    }
}

/// Every template of a workflow, parsed once when the Workflow is applied.
/// `Send + Sync` (liquid's parsed templates are), so it can be shared via `Arc`.
pub struct CompiledTemplates {
    /// step ref → field name (`template.body`, `template.headers.X-Team`, `delay.until`) → template.
    steps: BTreeMap<String, BTreeMap<String, Field>>,
    /// Each field render's CPU budget.
    budget: budget::Budget,
}

/// One parsed field (its loops counted, see [`budget`]), with the counted
/// ranges to check before each render.
struct Field {
    template: liquid::Template,
    ranges: Vec<limits::CountedRange>,
}

impl Field {
    /// Renders within [`limits`] and the [`budget`]: ranges checked first,
    /// output capped, loop iterations and time counted.
    fn render(&self, globals: &ObjectNode, context: &Value, budget: budget::Budget) -> Result<String, RenderFailure> {
        limits::check_ranges(&self.ranges, context).map_err(RenderFailure::Failed)?;
        let mut out = limits::CappedOutput::default();
        let (rendered, exceeded) = budget::metered(budget, || self.template.render_to(&mut out, globals));
        // Over budget, whatever liquid made of it (an error, or loops cut short).
        if let Some(exceeded) = exceeded {
            return Err(RenderFailure::OverBudget(exceeded.message()));
        }
        rendered.map_err(|e| RenderFailure::Failed(if out.overflowed { limits::output_too_large() } else { one_line(&e) }))?;
        String::from_utf8(out.bytes).map_err(|_| RenderFailure::Failed("the rendered output is not UTF-8".to_string()))
    }
}

impl fmt::Debug for CompiledTemplates {
    // liquid::Template is not Debug; list what was compiled.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.steps.iter().map(|(step, fields)| (step, fields.keys().collect::<Vec<_>>()))).finish()
    }
}

/// liquid with herald's `json` filter and [`capped`] values; with
/// `count_loops`, also the loop counting of [`budget`].
fn parser(count_loops: bool) -> Result<liquid::Parser, liquid::Error> {
    let builder = knock_filters::register(capped::register(liquid::ParserBuilder::with_stdlib().filter(JsonFilterParser)));
    let builder = if count_loops {
        builder.tag(budget::TickTag).block(budget::Ticked(liquid_lib::stdlib::ForBlock)).block(budget::Ticked(liquid_lib::stdlib::TableRowBlock))
    } else {
        builder
    };
    builder.build()
}

/// The Liquid fields of a channel step's template, with their field names.
/// A step's Liquid fields by name (`template.body`, `fetch.url`, `batch.key`, ...),
/// after checking its other settings (durations, windows, branches).
fn step_sources(step: &Step) -> Result<Vec<(String, &str)>, TemplateError> {
    let step_ref = step.step_ref.as_str();
    let err = |field: &str, message: String| TemplateError::new(step_ref, field, message);
    let duration = |field: &str, d: &Option<crate::resources::workflow::DurationValue>| -> Result<(), TemplateError> {
        match d {
            Some(d) => crate::core::windows::duration(d).map(|_| ()).map_err(|e| err(field, e)),
            None => Ok(()),
        }
    };
    fn opt<'s>(name: &str, source: &'s Option<String>) -> Option<(String, &'s str)> {
        source.as_deref().map(|s| (name.to_string(), s))
    }
    let mut sources: Vec<(String, &str)> = Vec::new();
    match step.step_type {
        StepType::Channel => {
            crate::core::windows::check_send_windows(&step.send_windows).map_err(|e| err("sendWindows", e))?;
            if let Some(t) = &step.template {
                sources = template_fields(t);
            }
        }
        StepType::Delay => {
            if let Some(delay) = &step.delay {
                duration("delay.duration", &delay.duration)?;
                sources.extend(opt("delay.until", &delay.until));
            }
        }
        StepType::Batch => {
            let batch = step.batch.as_ref().ok_or_else(|| err("batch", "a batch step needs `batch`".into()))?;
            if batch.window.is_none() && batch.window_from.is_none() {
                return Err(err("batch.window", "a batch step needs `window` or `windowFrom`".into()));
            }
            duration("batch.window", &batch.window)?;
            duration("batch.maxWindow", &batch.max_window)?;
            if batch.window_type == crate::resources::workflow::WindowType::Sliding && batch.max_window.is_none() {
                return Err(err("batch.maxWindow", "a sliding window needs `maxWindow`".into()));
            }
            if batch.max_activities.is_some_and(|n| !(2..=1000).contains(&n)) {
                return Err(err("batch.maxActivities", "must be 2 to 1000".into()));
            }
            if batch.render_limit.is_some_and(|n| !(1..=100).contains(&n)) {
                return Err(err("batch.renderLimit", "must be 1 to 100".into()));
            }
            sources.extend(opt("batch.key", &batch.key));
        }
        StepType::Throttle => {
            let throttle = step.throttle.as_ref().ok_or_else(|| err("throttle", "a throttle step needs `throttle`".into()))?;
            if throttle.window.is_none() && throttle.window_from.is_none() {
                return Err(err("throttle.window", "a throttle step needs `window` or `windowFrom`".into()));
            }
            duration("throttle.window", &throttle.window)?;
            if throttle.limit == 0 {
                return Err(err("throttle.limit", "must be at least 1".into()));
            }
            sources.extend(opt("throttle.key", &throttle.key));
        }
        StepType::Fetch => {
            let fetch = step.fetch.as_ref().ok_or_else(|| err("fetch", "a fetch step needs `fetch`".into()))?;
            sources.push(("fetch.url".into(), fetch.url.as_str()));
            if let Some(m) = &fetch.method {
                sources.push(("fetch.method".into(), m.as_str()));
            }
            if let Some(b) = &fetch.body {
                sources.push(("fetch.body".into(), b.as_str()));
            }
            sources.extend(fetch.headers.iter().map(|(k, v)| (format!("fetch.headers.{k}"), v.as_str())));
            sources.extend(fetch.query.iter().map(|(k, v)| (format!("fetch.query.{k}"), v.as_str())));
        }
        StepType::Branch => {
            if step.branches.is_empty() {
                return Err(err("branches", "a branch step needs at least one branch".into()));
            }
            let mut names = std::collections::BTreeSet::new();
            for (i, branch) in step.branches.iter().enumerate() {
                if branch.name.is_empty() || !names.insert(branch.name.as_str()) {
                    return Err(err(&format!("branches[{i}].name"), "each branch needs a name, unique within the step".into()));
                }
                conditions::check(&branch.conditions).map_err(|e| err(&format!("branches[{i}].conditions"), e.to_string()))?;
                // A branch without conditions always matches: any after it could never run.
                if branch.conditions.is_empty() && i + 1 < step.branches.len() {
                    return Err(err(&format!("branches[{i}].conditions"), format!("branch `{}` has no conditions (a default branch) but is not the last", branch.name)));
                }
            }
        }
        StepType::TriggerWorkflow => {
            let t = step.trigger_workflow.as_ref().ok_or_else(|| err("triggerWorkflow", "a trigger_workflow step needs `triggerWorkflow`".into()))?;
            if t.workflow.is_empty() {
                return Err(err("triggerWorkflow.workflow", "names no workflow".into()));
            }
            sources.extend(opt("triggerWorkflow.data", &t.data));
            sources.extend(opt("triggerWorkflow.actor", &t.actor));
            sources.extend(opt("triggerWorkflow.tenant", &t.tenant));
            sources.extend(opt("triggerWorkflow.cancellationKey", &t.cancellation_key));
        }
    }
    Ok(sources)
}

fn template_fields(t: &StepTemplate) -> Vec<(String, &str)> {
    let mut fields: Vec<(String, &str)> = [
        ("template.method", &t.method),
        ("template.url", &t.url),
        ("template.body", &t.body),
        ("template.text", &t.text),
        ("template.blocks", &t.blocks),
        ("template.from", &t.from),
        ("template.to", &t.to),
        ("template.subject", &t.subject),
        ("template.html", &t.html),
        ("template.markdownBody", &t.markdown_body),
        ("template.actionUrl", &t.action_url),
    ]
    .into_iter()
    .filter_map(|(name, source)| source.as_deref().map(|s| (name.to_string(), s)))
    .collect();
    fields.extend(t.headers.iter().map(|(name, source)| (format!("template.headers.{name}"), source.as_str())));
    fields
}

impl CompiledTemplates {
    /// Parses every Liquid field of every channel step's `template` and every
    /// delay step's `delay.until`; checks each delay `duration` and each step's
    /// condition operators. The first error names the step and field
    /// (`template.body`, `template.headers.X-Team`, `delay.until`,
    /// `delay.duration`, `conditions`, or `ref` for a duplicate step ref).
    pub fn compile(steps: &[Step]) -> Result<Self, TemplateError> {
        let parser_error = |e: liquid::Error| TemplateError::new("", "", format!("cannot build the Liquid parser: {}", one_line(&e)));
        // Templates are parsed as written first, so that errors point at the
        // author's text; then with their loops counted (see [`budget`]).
        let as_written = parser(false).map_err(parser_error)?;
        let counting = parser(true).map_err(parser_error)?;
        let mut compiled: BTreeMap<String, BTreeMap<String, Field>> = BTreeMap::new();
        if crate::core::path::depth(steps) > crate::core::path::MAX_BRANCH_DEPTH {
            return Err(TemplateError::new("", "branches", format!("branches nest more than {} deep", crate::core::path::MAX_BRANCH_DEPTH)));
        }
        for step in crate::core::path::all_steps(steps) {
            let step_ref = step.step_ref.as_str();
            // Templates are looked up by ref, so a duplicate would silently shadow a step.
            if compiled.contains_key(step_ref) {
                return Err(TemplateError::new(step_ref, "ref", "duplicate step ref (refs are unique across the workflow, branches included)"));
            }
            conditions::check(&step.conditions).map_err(|e| TemplateError::new(step_ref, "conditions", e.to_string()))?;
            let sources = step_sources(step)?;

            let mut fields = BTreeMap::new();
            for (field, source) in sources {
                as_written.parse(source).map_err(|e| TemplateError::new(step_ref, &field, one_line(&e)))?;
                let template = budget::parse_instrumented(&counting, source).map_err(|e| TemplateError::new(step_ref, &field, short(&e)))?;
                let ranges = limits::counted_ranges(source).map_err(|e| TemplateError::new(step_ref, &field, e))?;
                limits::check_loop_iterations(source).map_err(|e| TemplateError::new(step_ref, &field, e))?;
                fields.insert(field, Field { template, ranges });
            }
            compiled.insert(step_ref.to_string(), fields);
        }
        Ok(CompiledTemplates { steps: compiled, budget: budget::Budget::default() })
    }

    /// The same templates rendered under another budget (tests use small ones).
    pub fn with_budget(self, budget: budget::Budget) -> Self {
        CompiledTemplates { budget, ..self }
    }

    /// Renders one field of one step (`template.body`, `template.headers.X-Team`,
    /// `delay.until`, ...) against a JSON object context such as
    /// `{"data": ..., "recipient": ..., "actor": ..., "tenant": ..., "workflow": ...}`.
    /// `Ok(None)` when the step does not have that field; an error for a step
    /// ref that was not compiled (a caller bug, not a missing field).
    pub fn render(&self, step_ref: &str, field: &str, context: &Value) -> Result<Option<String>, TemplateError> {
        let fields = self.fields(step_ref, field)?;
        let Some(template) = fields.get(field) else {
            return Ok(None);
        };
        let globals = globals(step_ref, field, context)?;
        template.render(&globals, context, self.budget).map(Some).map_err(|e| TemplateError::from_render(step_ref, field, e))
    }

    /// Renders every header template of a step: header name → value. Empty
    /// when the step has no headers.
    pub fn render_headers(&self, step_ref: &str, context: &Value) -> Result<BTreeMap<String, String>, TemplateError> {
        self.render_map(step_ref, "template.headers", context)
    }

    /// Renders every field named `<prefix>.<name>` (headers, query parameters): name → value.
    pub fn render_map(&self, step_ref: &str, prefix: &str, context: &Value) -> Result<BTreeMap<String, String>, TemplateError> {
        let fields = self.fields(step_ref, prefix)?;
        // Converted once for every field.
        let globals = globals(step_ref, prefix, context)?;
        let prefix = format!("{prefix}.");
        fields
            .iter()
            .filter_map(|(field, template)| field.strip_prefix(prefix.as_str()).map(|name| (field, name, template)))
            .map(|(field, name, template)| {
                template.render(&globals, context, self.budget).map(|value| (name.to_string(), value)).map_err(|e| TemplateError::from_render(step_ref, field, e))
            })
            .collect()
    }

    fn fields(&self, step_ref: &str, field: &str) -> Result<&BTreeMap<String, Field>, TemplateError> {
        self.steps.get(step_ref).ok_or_else(|| TemplateError::new(step_ref, field, "no such step in the compiled workflow"))
    }
}

/// The lenient render globals for a JSON object context.
fn globals(step_ref: &str, field: &str, context: &Value) -> Result<ObjectNode, TemplateError> {
    match context {
        Value::Object(map) => Ok(ObjectNode::root(map)),
        _ => Err(TemplateError::new(step_ref, field, "the render context must be a JSON object")),
    }
}

/// liquid's errors span several lines (message, then context); conditions and
/// Events need one, and short: some messages list every available filter or key.
fn one_line(e: &liquid::Error) -> String {
    short(&e.to_string())
}

/// `message` on one line, at most [`MAX_MESSAGE_CHARS`].
fn short(message: &str) -> String {
    truncate(&message.split_whitespace().collect::<Vec<_>>().join(" "), MAX_MESSAGE_CHARS)
}

/// Longest error message kept (liquid's can list every filter or object key).
const MAX_MESSAGE_CHARS: usize = 300;

/// Delays longer than this are refused, so adding one to a timestamp can
/// never overflow (chrono panics on `+` overflow).
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);
const DURATION_FORMAT: &str = "expected whole numbers with units ms, s, m, h or d, e.g. 30s, 5m, 1h30m, 2d, 250ms";

/// Parses `30s`, `5m`, `1h30m`, `2d`, `250ms` (sums of whole numbers with a
/// unit; surrounding whitespace is ignored).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let input = s.trim();
    if input.is_empty() {
        return Err(format!("empty duration: {DURATION_FORMAT}"));
    }
    if input.starts_with('-') {
        return Err(format!("duration `{input}` is negative: {DURATION_FORMAT}"));
    }
    let too_long = || format!("duration `{input}` is too long (at most 100 years)");
    let mut total = Duration::ZERO;
    let mut rest = input;
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(format!("invalid duration `{input}`: {DURATION_FORMAT}"));
        }
        let (digits, after) = rest.split_at(digits_end);
        let unit_end = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        // All digits, so the only possible parse failure is overflow.
        let n: u64 = digits.parse().map_err(|_| too_long())?;
        let seconds_per_unit = match unit {
            "ms" => None,
            "s" => Some(1),
            "m" => Some(60),
            "h" => Some(3_600),
            "d" => Some(86_400),
            "" => return Err(format!("duration `{input}` needs a unit after `{digits}`: {DURATION_FORMAT}")),
            u if u.starts_with('.') => return Err(format!("duration `{input}`: fractions are not supported (write 1h30m, not 1.5h)")),
            u => return Err(format!("duration `{input}` has an unknown unit `{u}`: {DURATION_FORMAT}")),
        };
        let part = match seconds_per_unit {
            None => Duration::from_millis(n),
            Some(k) => Duration::from_secs(n.checked_mul(k).ok_or_else(too_long)?),
        };
        total = total.checked_add(part).filter(|t| *t <= MAX_DURATION).ok_or_else(too_long)?;
        rest = next;
    }
    Ok(total)
}

// ---------------------------------------------------------------------------
// A lenient Liquid view of a JSON value: missing keys and out-of-range indexes
// are `nil` instead of errors (see the module docs).

/// `nil`, for JSON null and anything missing. It also acts as an empty object
/// whose every key is `nil`, so that `{{ a.b.c }}` is `nil` when `a` is missing.
#[derive(Debug)]
struct Nil;

static NIL: Nil = Nil;

/// A JSON value converted for liquid.
#[derive(Debug)]
enum Node {
    Null,
    Scalar(LiquidValue),
    Array(ArrayNode),
    Object(ObjectNode),
}

#[derive(Debug)]
struct ArrayNode(Vec<Node>);

#[derive(Debug)]
struct ObjectNode {
    entries: BTreeMap<String, Node>,
    /// The render globals claim every root variable, so that liquid asks them
    /// (and gets `nil`) instead of failing with "Unknown variable".
    root: bool,
}

impl Node {
    fn from_json(v: &Value) -> Node {
        match v {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Scalar(LiquidValue::scalar(*b)),
            Value::Number(n) => Node::Scalar(if let Some(i) = n.as_i64() {
                LiquidValue::scalar(i)
            } else if n.is_u64() {
                // Beyond i64 (liquid's widest integer): such numbers are ids far
                // more often than quantities, so keep every digit as text.
                LiquidValue::scalar(n.to_string())
            } else {
                LiquidValue::scalar(n.as_f64().unwrap_or(f64::NAN))
            }),
            Value::String(s) => Node::Scalar(LiquidValue::scalar(s.clone())),
            Value::Array(items) => Node::Array(ArrayNode(items.iter().map(Node::from_json).collect())),
            Value::Object(map) => Node::Object(ObjectNode::new(map, false)),
        }
    }

    fn view(&self) -> &dyn ValueView {
        match self {
            Node::Null => &NIL,
            Node::Scalar(v) => v,
            Node::Array(a) => a,
            Node::Object(o) => o,
        }
    }
}

impl ObjectNode {
    fn new(map: &serde_json::Map<String, Value>, root: bool) -> Self {
        ObjectNode { entries: map.iter().map(|(k, v)| (k.clone(), Node::from_json(v))).collect(), root }
    }

    fn root(map: &serde_json::Map<String, Value>) -> Self {
        Self::new(map, true)
    }
}

/// A missing key's value. `size` is left to liquid (None), which then reports
/// the object's size as Shopify does.
fn missing(index: &str) -> Option<&'static dyn ValueView> {
    if index == "size" {
        None
    } else {
        Some(&NIL)
    }
}

impl ValueView for Nil {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        DisplayCow::Borrowed(&"")
    }
    fn source(&self) -> DisplayCow<'_> {
        DisplayCow::Borrowed(&"nil")
    }
    fn type_name(&self) -> &'static str {
        "nil"
    }
    fn query_state(&self, state: State) -> bool {
        LiquidValue::Nil.query_state(state)
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        KStringCow::from_static("")
    }
    fn to_value(&self) -> LiquidValue {
        LiquidValue::Nil
    }
    fn as_object(&self) -> Option<&dyn ObjectView> {
        Some(self)
    }
    fn is_nil(&self) -> bool {
        true
    }
}

impl ObjectView for Nil {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        0
    }
    fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
        Box::new(std::iter::empty())
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        Box::new(std::iter::empty())
    }
    fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
        Box::new(std::iter::empty())
    }
    fn contains_key(&self, _index: &str) -> bool {
        false
    }
    fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
        missing(index)
    }
}

impl ValueView for Node {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        self.view().render()
    }
    fn source(&self) -> DisplayCow<'_> {
        self.view().source()
    }
    fn type_name(&self) -> &'static str {
        self.view().type_name()
    }
    fn query_state(&self, state: State) -> bool {
        self.view().query_state(state)
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        self.view().to_kstr()
    }
    fn to_value(&self) -> LiquidValue {
        self.view().to_value()
    }
    fn as_scalar(&self) -> Option<ScalarCow<'_>> {
        self.view().as_scalar()
    }
    fn as_array(&self) -> Option<&dyn ArrayView> {
        self.view().as_array()
    }
    fn as_object(&self) -> Option<&dyn ObjectView> {
        self.view().as_object()
    }
    fn as_state(&self) -> Option<State> {
        self.view().as_state()
    }
    fn is_nil(&self) -> bool {
        self.view().is_nil()
    }
}

impl ValueView for ArrayNode {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    // Rendering goes through liquid's own values so output matches liquid's.
    fn render(&self) -> DisplayCow<'_> {
        DisplayCow::Owned(Box::new(self.to_value().render().to_string()))
    }
    fn source(&self) -> DisplayCow<'_> {
        DisplayCow::Owned(Box::new(self.to_value().source().to_string()))
    }
    fn type_name(&self) -> &'static str {
        "array"
    }
    fn query_state(&self, state: State) -> bool {
        match state {
            State::Truthy => true,
            State::DefaultValue | State::Empty | State::Blank => self.0.is_empty(),
        }
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        KStringCow::from_string(self.to_value().render().to_string())
    }
    fn to_value(&self) -> LiquidValue {
        LiquidValue::Array(self.0.iter().map(ValueView::to_value).collect())
    }
    fn as_array(&self) -> Option<&dyn ArrayView> {
        Some(self)
    }
}

impl ArrayView for ArrayNode {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        i64::try_from(self.0.len()).unwrap_or(i64::MAX)
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        Box::new(self.0.iter().map(|n| n as &dyn ValueView))
    }
    fn contains_key(&self, index: i64) -> bool {
        self.position(index).is_some()
    }
    fn get(&self, index: i64) -> Option<&dyn ValueView> {
        // Out of range is nil, as in Shopify Liquid.
        Some(self.position(index).map_or(&NIL as &dyn ValueView, |i| &self.0[i]))
    }
}

impl ArrayNode {
    /// Liquid indexes: negative counts from the end.
    fn position(&self, index: i64) -> Option<usize> {
        let len = self.0.len();
        let i = if index < 0 { len.checked_sub(usize::try_from(index.unsigned_abs()).ok()?)? } else { usize::try_from(index).ok()? };
        (i < len).then_some(i)
    }
}

impl ValueView for ObjectNode {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        DisplayCow::Owned(Box::new(self.to_value().render().to_string()))
    }
    fn source(&self) -> DisplayCow<'_> {
        DisplayCow::Owned(Box::new(self.to_value().source().to_string()))
    }
    fn type_name(&self) -> &'static str {
        "object"
    }
    fn query_state(&self, state: State) -> bool {
        match state {
            State::Truthy => true,
            State::DefaultValue | State::Empty | State::Blank => self.entries.is_empty(),
        }
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        KStringCow::from_string(self.to_value().render().to_string())
    }
    fn to_value(&self) -> LiquidValue {
        LiquidValue::Object(self.entries.iter().map(|(k, v)| (k.clone().into(), v.to_value())).collect())
    }
    fn as_object(&self) -> Option<&dyn ObjectView> {
        Some(self)
    }
}

impl ObjectView for ObjectNode {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        i64::try_from(self.entries.len()).unwrap_or(i64::MAX)
    }
    fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
        Box::new(self.entries.keys().map(|k| KStringCow::from_ref(k.as_str())))
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        Box::new(self.entries.values().map(|n| n as &dyn ValueView))
    }
    fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
        Box::new(self.entries.iter().map(|(k, n)| (KStringCow::from_ref(k.as_str()), n as &dyn ValueView)))
    }
    fn contains_key(&self, index: &str) -> bool {
        self.root || self.entries.contains_key(index)
    }
    fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
        // Every variable lookup passes here, so a render that works without
        // looping meets its deadline too. Past it, the data is gone (nil), so
        // what is left of the render is cheap; the render then fails (liquid
        // cannot be told to stop from here: it would panic on a missing root).
        if budget::check_time().is_err() {
            return missing(index);
        }
        match self.entries.get(index) {
            Some(n) => Some(n),
            None => missing(index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::workflow::{Delay, StepCondition};
    use serde_json::json;

    fn channel_step(step_ref: &str, template: StepTemplate) -> Step {
        Step { step_ref: step_ref.into(), step_type: StepType::Channel, channel: Some("hooks".into()), template: Some(template), ..Default::default() }
    }

    fn delay_step(step_ref: &str, duration: Option<&str>, until: Option<&str>) -> Step {
        Step {
            step_ref: step_ref.into(),
            step_type: StepType::Delay,
            delay: Some(Delay { duration: duration.map(Into::into), until: until.map(Into::into), window_from: None }),
            ..Default::default()
        }
    }

    fn context() -> Value {
        json!({
            "data": {"comment_text": "Nice!", "count": 3, "ratio": 0.5, "items": [{"name": "a"}, {"name": "b"}],
                     "tags": ["x", "y"], "flag": false, "nothing": null, "remind_at": "2030-01-01T00:00:00Z"},
            "recipient": {"id": "user_1", "name": "Jane", "email": "jane@example.com"},
            "actor": {"id": "user_2"},
            "tenant": {"id": "acme"},
            "workflow": {"key": "new-comment"}
        })
    }

    fn compile_one(source: &str) -> CompiledTemplates {
        CompiledTemplates::compile(&[channel_step("s", StepTemplate { body: Some(source.into()), ..Default::default() })]).expect("template compiles")
    }

    /// The default budget without its deadline, for tests of the other
    /// limits (debug builds render several times slower than release).
    fn no_deadline() -> budget::Budget {
        budget::Budget { time: Duration::from_secs(3600), ..Default::default() }
    }

    fn render_one(source: &str) -> String {
        compile_one(source).render("s", "template.body", &context()).expect("renders").expect("field exists")
    }

    #[test]
    fn rendering_is_bounded() {
        // A literal range too large is refused when the Workflow is applied, naming the step and field.
        let steps = [channel_step("s", StepTemplate { body: Some("{% for i in (1..100000000000) %}x{% endfor %}".into()), ..Default::default() })];
        let err = CompiledTemplates::compile(&steps).unwrap_err();
        assert_eq!((err.step.as_str(), err.field.as_str()), ("s", "template.body"));
        assert!(err.message.contains("100000000000 items"), "{err}");
        // A range sized by the data is checked before rendering, for that recipient only.
        let t = compile_one("{% for i in (1..data.count) %}{{ i }}{% endfor %}");
        assert_eq!(t.render("s", "template.body", &context()).unwrap().as_deref(), Some("123"));
        let mut huge = context();
        huge["data"]["count"] = json!(10_000_000_000i64);
        let err = t.render("s", "template.body", &huge).unwrap_err();
        assert!(err.message.contains("has 10000000000 items; at most 1000"), "{err}");
        // A bound liquid does not take as a whole number is liquid's error, as before.
        let mut float = context();
        float["data"]["count"] = json!(1e10);
        let err = t.render("s", "template.body", &float).unwrap_err();
        assert!(err.message.contains("whole number"), "{err}");
        // Output is capped: 1,000 x 50 x 30 bytes is 1.5 MB (in 51,000 iterations, within the budget).
        let t = compile_one("{% for i in (1..1000) %}{% for j in (1..50) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}").with_budget(no_deadline());
        let err = t.render("s", "template.body", &context()).unwrap_err();
        assert!(err.message.contains("the rendered output passes 1024 KiB"), "{err}");
        // Headers go through the same limits.
        let steps = [channel_step("h", StepTemplate { headers: [("X-N".to_string(), "{% for i in (1..data.count) %}{% endfor %}".to_string())].into(), ..Default::default() })];
        assert!(CompiledTemplates::compile(&steps).unwrap().render_headers("h", &huge).is_err());
    }

    #[test]
    fn loops_known_to_exceed_the_budget_are_refused_when_compiled() {
        let three_deep = "{% for a in (1..1000) %}{% for b in (1..1000) %}{% for c in (1..1000) %}{% endfor %}{% endfor %}{% endfor %}";
        let steps = [channel_step("notify", StepTemplate { body: Some(three_deep.into()), ..Default::default() })];
        let err = CompiledTemplates::compile(&steps).unwrap_err();
        assert_eq!((err.step.as_str(), err.field.as_str()), ("notify", "template.body"));
        assert!(err.message.contains("would run 1001001000 iterations (`(1..1000)` inside `(1..1000)` inside `(1..1000)`)"), "{err}");
        assert!(err.message.contains("at most 100000"), "{err}");
        // Sizes written with `limit:`, and loops in comments (which never run), are taken into account.
        compile_one("{% for a in (1..1000) %}{% for b in (1..1000) limit: 5 %}{% endfor %}{% endfor %}");
        compile_one("{% comment %}{% for a in (1..1000) %}{% for b in (1..1000) %}{% endfor %}{% endfor %}{% endcomment %}");
        compile_one("{% for a in (1..1000) %}{% for b in (1..99) %}{% endfor %}{% endfor %}");
    }

    #[test]
    fn loops_sized_by_data_stop_at_the_iteration_budget() {
        let nested = "{% for a in (1..data.n) %}{% for b in (1..data.n) %}{% for c in (1..data.n) %}{% endfor %}{% endfor %}{% endfor %}done";
        let n = |n: i64| json!({"data": {"n": n}});
        // A million iterations: over budget, by iterations or (in slow debug builds) by time.
        let err = compile_one(nested).render("s", "template.body", &n(100)).unwrap_err();
        assert_eq!((err.step.as_str(), err.field.as_str()), ("s", "template.body"));
        assert!(err.message.starts_with("rendering exceeded its budget of "), "{err}");
        assert!(err.over_budget);
        let t = compile_one(nested).with_budget(no_deadline());
        assert_eq!(t.render("s", "template.body", &n(100)).unwrap_err().message, "rendering exceeded its budget of 100000 loop iterations");
        // Within the budget, the same template renders; a failure that is not about the budget says so.
        assert_eq!(t.render("s", "template.body", &n(40)).unwrap().as_deref(), Some("done"));
        let broken = compile_one("{% for a in (1..3) %}{{ a | divided_by: 0 }}{% endfor %}").render("s", "template.body", &context()).unwrap_err();
        assert!(!broken.over_budget, "{broken}");
        // Every loop counts: arrays, tablerow, loops in sequence.
        let tiny = |source: &str| compile_one(source).with_budget(budget::Budget { iterations: 5, ..Default::default() });
        let over = |source: &str| tiny(source).render("s", "template.body", &context()).unwrap_err().over_budget;
        assert!(over("{% for a in data.tags %}{% for b in data.tags %}{% for c in data.tags %}{% endfor %}{% endfor %}{% endfor %}"));
        assert!(over("{% tablerow a in (1..6) %}{% endtablerow %}"));
        assert!(over("{%- for a in (1..3) -%}{%- endfor -%}{% for b in (1..3) %}{% endfor %}"));
        assert_eq!(tiny("{% for a in (1..5) %}{{ a }}{% endfor %}").render("s", "template.body", &context()).unwrap().as_deref(), Some("12345"));
        // Headers too.
        let steps = [channel_step("h", StepTemplate { headers: [("X-N".to_string(), nested.to_string())].into(), ..Default::default() })];
        let err = CompiledTemplates::compile(&steps).unwrap().render_headers("h", &n(100)).unwrap_err();
        assert_eq!((err.field.as_str(), err.over_budget), ("template.headers.X-N", true));
    }

    #[test]
    fn renders_past_their_deadline_fail_with_or_without_loops() {
        // A zero deadline has passed at the first check, wherever it is: a
        // loop iteration, a variable lookup, a write of output.
        let late = |source: &str| compile_one(source).with_budget(budget::Budget { time: Duration::ZERO, ..Default::default() });
        for source in ["{% for a in (1..3) %}{% endfor %}", "{% assign x = data.count %}", "plain text", "{% capture c %}x{% endcapture %}"] {
            let err = late(source).render("s", "template.body", &context()).unwrap_err();
            assert_eq!(err.message, "rendering exceeded its budget of 0 ms", "{source}");
            assert!(err.over_budget, "{source}");
        }
        // The real deadline leaves ordinary templates alone.
        assert_eq!(render_one("{% for t in data.tags %}{{ t }}{% endfor %}"), "xy");
    }

    #[test]
    fn counting_loops_never_changes_what_renders() {
        let plain = liquid::ParserBuilder::with_stdlib().filter(JsonFilterParser).build().unwrap();
        // Against liquid as it is, with neither counting nor caps.
        let context = context();
        let globals = globals("s", "template.body", &context).unwrap();
        for source in [
            "no loops: {{ recipient.name }} {% if data.flag %}yes{% else %}no{% endif %}",
            "{% for t in data.tags %}[{{ t }}]{% endfor %}",
            "a {% for t in data.tags %} {{ t }} {% endfor %} b",
            "a {%- for t in data.tags -%}\n  {{ t }}  \n{%- endfor -%}\n b",
            "a {%- for t in data.tags %}\n  {{ t }}\n{% endfor -%} b",
            "{% for t in data.tags -%}   {{- t -}}   {%- endfor %}",
            "{% for t in data.missing %}x{% else %}  empty  {% endfor %}",
            "{% for i in (1..5) reversed limit: 3 %}{% if i == 4 %}{% continue %}{% endif %}{{ forloop.index }}:{{ i }}{% if forloop.last %}!{% endif %}{% endfor %}",
            "{% for i in (1..9) %}{% if i > 2 %}{% break %}{% endif %}{{ i }}{% endfor %}",
            "{% for a in (1..2) %}{% for b in data.tags %}{{ forloop.parentloop.index }}{{ b }}{% endfor %}{% endfor %}",
            "{% tablerow t in data.tags cols: 1 %} {{ t }} {% endtablerow %}",
            "{%- tablerow i in (1..3) -%}\n{{ i }}\n{%- endtablerow -%}",
            "{% raw %}{% for i in (1..3) %}{{ i }}{% endfor %}{% endraw %}",
            "{% comment %}{% for i in (1..3) %}{% endfor %}{% endcomment %}after",
            "{{ \"{% for i in (1..3) %}\" }}{% capture c %}{% for t in data.tags %}{{ t }}{% endfor %}{% endcapture %}{{ c }}",
            "{% for t in data.tags %}{% if t != \"%}\" %}{{ t }}{% endif %}{% endfor %}",
            // The capped blocks and filters, within their caps.
            "{% for i in (1..4) %}{% ifchanged %}{% if i < 3 %}a{% else %}b{% endif %}{% endifchanged %}{% endfor %}",
            "{% capture c %}{{ recipient.name | append: '!' | prepend: '<' }}{% endcapture %}[{{ c }}]",
            "{{ data.comment_text | replace: 'i', 'ii' | replace_first: 'N', '' }} {{ data.tags | join }} {{ data.tags | join: ', ' }}",
            "{{ data.tags | concat: data.tags | uniq | join: '' }} {{ data.items | map: 'name' | concat: data.tags | join: '/' }}",
        ] {
            let expected = plain.parse(source).unwrap().render(&globals).unwrap();
            assert_eq!(compile_one(source).render("s", "template.body", &context).unwrap().as_deref(), Some(expected.as_str()), "{source}");
        }
    }

    #[test]
    fn values_built_while_rendering_are_capped() {
        let fails = |source: &str, expected: &str| {
            let err = compile_one(source).with_budget(no_deadline()).render("s", "template.body", &context()).unwrap_err();
            assert!(err.message.contains(expected), "{source}: {err}");
            assert!(!err.over_budget, "{source}: {err}");
        };
        // Doubling a value 40 times would take a terabyte; it stops at 1 MiB.
        let doubling = "{% assign x = 'xxxxxxxx' %}{% for i in (1..40) %}";
        fails(&format!("{doubling}{{% capture x %}}{{{{ x }}}}{{{{ x }}}}{{% endcapture %}}{{% endfor %}}"), "`capture x` passes 1024 KiB");
        fails(&format!("{doubling}{{% assign x = x | append: x %}}{{% endfor %}}"), "`append` would make a value of 2097152 bytes; at most 1048576");
        fails(&format!("{doubling}{{% assign x = x | prepend: x %}}{{% endfor %}}"), "`prepend` would make a value of");
        fails("{% assign a = 'x' | split: ',' %}{% for i in (1..40) %}{% assign a = a | concat: a %}{% endfor %}", "`concat` would make a value of");
        fails(&format!("{doubling}{{% ifchanged %}}{{% capture x %}}{{{{ x }}}}{{{{ x }}}}{{% endcapture %}}{{% endifchanged %}}{{% endfor %}}"), "passes 1024 KiB");
        fails(&format!("{doubling}{{% assign x = x | replace_first: 'x', x %}}{{% endfor %}}"), "`replace_first` would make a value of");
        // Squaring in one call: checked before the value is built.
        let two_kib = "{% assign k = '' %}{% for i in (1..32) %}{% for j in (1..64) %}{% assign k = k | append: 'a' %}{% endfor %}{% endfor %}";
        fails(&format!("{two_kib}{{{{ k | replace: 'a', k | size }}}}"), "`replace` would make a value of 4196352 bytes");
        fails(&format!("{two_kib}{{% assign chars = k | split: '' %}}{{{{ chars | join: k | size }}}}"), "`join` would make a value of 4200448 bytes");
        // Sorting out duplicates compares every pair: refused on very long lists.
        let many = "{% assign many = '' %}{% for i in (1..1000) %}{% assign many = many | append: i | append: ',' %}{% endfor %}{% assign many = many | split: ',' %}";
        fails(
            &format!("{many}{{% for i in (1..4) %}}{{% assign many = many | concat: many %}}{{% endfor %}}{{{{ many | uniq | size }}}}"),
            "`uniq` takes at most 10000 items (it was given 16016)",
        );
        // Within the caps, the same filters work.
        let within = compile_one(&format!("{two_kib}{{{{ k | replace: 'a', 'bc' | size }}}} {{{{ k | split: '' | join: '-' | size }}}} {many}{{{{ many | uniq | size }}}}"));
        assert_eq!(within.with_budget(no_deadline()).render("s", "template.body", &context()).unwrap().as_deref(), Some("4096 4097 1001"));
    }

    #[test]
    fn loops_that_cannot_be_counted_are_refused() {
        // herald's lexer reads the `{{ ... }}` inside `raw` as one piece (its
        // string hides `endraw`), liquid as broken markup ending the raw block:
        // the loop after it is liquid's and got no tick, so it is refused.
        let err = CompiledTemplates::compile(&[channel_step(
            "s",
            StepTemplate { body: Some("{% raw %}{{ a @ \"}}{% endraw %}\" }}{% for i in (1..3) %}{% endfor %}".into()), ..Default::default() },
        )])
        .unwrap_err();
        assert!(err.message.starts_with(budget::UNCOUNTABLE), "{err}");
        // The tick tag is herald's, not the author's.
        let err = CompiledTemplates::compile(&[channel_step("s", StepTemplate { body: Some("{% __herald_tick %}".into()), ..Default::default() })]).unwrap_err();
        assert!(err.message.contains("__herald_tick"), "{err}");
    }

    #[test]
    fn renders_data_and_recipient_fields() {
        let steps = [channel_step(
            "email",
            StepTemplate {
                subject: Some("{{ actor.id }} commented".into()),
                to: Some("{{ recipient.email }}".into()),
                html: Some("<p>Hi {{ recipient.name }}: {{ data.comment_text }} ({{ data.count | plus: 1 }})</p>".into()),
                ..Default::default()
            },
        )];
        let t = CompiledTemplates::compile(&steps).expect("compiles");
        let ctx = context();
        assert_eq!(t.render("email", "template.subject", &ctx).unwrap().as_deref(), Some("user_2 commented"));
        assert_eq!(t.render("email", "template.to", &ctx).unwrap().as_deref(), Some("jane@example.com"));
        assert_eq!(t.render("email", "template.html", &ctx).unwrap().as_deref(), Some("<p>Hi Jane: Nice! (4)</p>"));
        // Fields the step does not have.
        assert_eq!(t.render("email", "template.body", &ctx), Ok(None));
        assert_eq!(t.render("email", "template.headers.X-Team", &ctx), Ok(None));
        // An unknown step is a caller error.
        assert!(t.render("nope", "template.body", &ctx).is_err());
        assert!(t.render("email", "template.subject", &json!([1])).is_err());
    }

    #[test]
    fn renders_structures_and_liquid_tags() {
        assert_eq!(render_one("{{ data.items[1].name }} {{ data.items.first.name }} {{ data.items.size }}"), "b a 2");
        assert_eq!(render_one("{% for t in data.tags %}[{{ t }}]{% endfor %}"), "[x][y]");
        assert_eq!(render_one("{{ data.tags | join: \",\" }} {{ data.ratio }} {{ tenant.id | upcase }}"), "x,y 0.5 ACME");
        assert_eq!(render_one("{% if data.count > 2 %}many{% else %}few{% endif %}"), "many");
        assert_eq!(render_one("{% if data.flag %}yes{% else %}no{% endif %}"), "no");
        assert_eq!(render_one("{% assign n = data.count | times: 2 %}{{ n }}"), "6");
        assert_eq!(render_one("{{ data.items[-1].name }}"), "b");
        let t = compile_one("{{ data.id }}");
        let ctx = json!({"data": {"id": 18446744073709551615u64}});
        assert_eq!(t.render("s", "template.body", &ctx).unwrap().as_deref(), Some("18446744073709551615"));
    }

    #[test]
    fn missing_variables_render_as_nothing() {
        assert_eq!(render_one("[{{ data.missing }}]"), "[]");
        assert_eq!(render_one("[{{ missing_root }}]"), "[]");
        assert_eq!(render_one("[{{ data.missing.deeper.still }}]"), "[]");
        assert_eq!(render_one("[{{ data.items[5].name }}]"), "[]");
        assert_eq!(render_one("[{{ data.nothing }}]"), "[]");
        assert_eq!(render_one("{{ data.missing | default: \"y\" }}"), "y");
        assert_eq!(render_one("{{ recipient.nickname | default: recipient.name }}"), "Jane");
        assert_eq!(render_one("{{ data.nothing | default: \"n\" }}"), "n");
        assert_eq!(render_one("{{ data.comment_text | default: \"unused\" }}"), "Nice!");
        assert_eq!(render_one("{% if data.missing %}yes{% else %}no{% endif %}"), "no");
        assert_eq!(render_one("{% if data.missing == nil %}nil{% endif %}"), "nil");
        assert_eq!(render_one("{% if data.missing.deeper > 3 %}yes{% else %}no{% endif %}"), "no");
        assert_eq!(render_one("{% for x in data.missing %}{{ x }}{% endfor %}done"), "done");
        assert_eq!(render_one("{{ data.missing | size }}"), "0");
        assert_eq!(render_one("{{ data.missing | upcase }}|{{ data.missing | append: \"!\" }}"), "|!");
    }

    #[test]
    fn headers_render() {
        let mut headers = BTreeMap::new();
        headers.insert("X-Team".to_string(), "{{ tenant.id }}".to_string());
        headers.insert("Authorization".to_string(), "Bearer {{ data.token | default: \"none\" }}".to_string());
        let steps = [channel_step(
            "hook",
            StepTemplate {
                method: Some("PUT".into()),
                url: Some("https://example.com/{{ recipient.id }}".into()),
                headers,
                body: Some("{\"text\": \"{{ data.comment_text }}\"}".into()),
                ..Default::default()
            },
        )];
        let t = CompiledTemplates::compile(&steps).expect("compiles");
        let ctx = context();
        assert_eq!(t.render("hook", "template.headers.X-Team", &ctx).unwrap().as_deref(), Some("acme"));
        assert_eq!(t.render("hook", "template.method", &ctx).unwrap().as_deref(), Some("PUT"));
        assert_eq!(t.render("hook", "template.url", &ctx).unwrap().as_deref(), Some("https://example.com/user_1"));
        assert_eq!(t.render("hook", "template.body", &ctx).unwrap().as_deref(), Some("{\"text\": \"Nice!\"}"));
        let all = t.render_headers("hook", &ctx).expect("headers render");
        assert_eq!(all.len(), 2);
        assert_eq!(all["X-Team"], "acme");
        assert_eq!(all["Authorization"], "Bearer none");
    }

    #[test]
    fn broken_templates_fail_compile_naming_step_and_field() {
        for source in ["{{ data.x ", "{% if %}yes{% endif %}", "{% for %}", "{{ data.x | no_such_filter }}", "{% endif %}"] {
            let steps = [
                channel_step("fine", StepTemplate { text: Some("ok".into()), ..Default::default() }),
                channel_step("broken", StepTemplate { subject: Some("ok".into()), body: Some(source.into()), ..Default::default() }),
            ];
            let err = CompiledTemplates::compile(&steps).expect_err(source);
            assert_eq!((err.step.as_str(), err.field.as_str()), ("broken", "template.body"), "{source}");
            assert!(!err.message.is_empty() && !err.message.contains('\n'), "{err}");
            assert!(err.to_string().starts_with("step `broken` template.body: "), "{err}");
            assert!(err.message.chars().count() <= MAX_MESSAGE_CHARS + 1, "{err}");
        }

        let mut headers = BTreeMap::new();
        headers.insert("X-Team".to_string(), "{{ oops".to_string());
        let err = CompiledTemplates::compile(&[channel_step("h", StepTemplate { headers, ..Default::default() })]).expect_err("bad header");
        assert_eq!(err.field, "template.headers.X-Team");

        let err = CompiledTemplates::compile(&[delay_step("wait", None, Some("{{ data.remind_at"))]).expect_err("bad until");
        assert_eq!((err.step.as_str(), err.field.as_str()), ("wait", "delay.until"));
    }

    #[test]
    fn compile_checks_durations_conditions_and_refs() {
        let err = CompiledTemplates::compile(&[delay_step("wait", Some("5 minutes"), None)]).expect_err("bad duration");
        assert_eq!((err.step.as_str(), err.field.as_str()), ("wait", "delay.duration"));

        let mut step = channel_step("s", StepTemplate::default());
        step.conditions = vec![StepCondition { variable: "data.x".into(), operator: "equals".into(), argument: Some(json!(1)) }].into();
        let err = CompiledTemplates::compile(&[step]).expect_err("bad operator");
        assert_eq!((err.step.as_str(), err.field.as_str()), ("s", "conditions"));
        assert!(err.message.contains("unknown operator `equals`"), "{err}");

        let err = CompiledTemplates::compile(&[delay_step("a", Some("1s"), None), delay_step("a", Some("2s"), None)]).expect_err("duplicate ref");
        assert_eq!((err.step.as_str(), err.field.as_str()), ("a", "ref"));
    }

    #[test]
    fn delay_until_renders() {
        let t = CompiledTemplates::compile(&[delay_step("wait", Some("1h"), Some("{{ data.remind_at }}"))]).expect("compiles");
        assert_eq!(t.render("wait", "delay.until", &context()).unwrap().as_deref(), Some("2030-01-01T00:00:00Z"));
        // A delay step's template fields are not compiled (it has none).
        assert_eq!(t.render("wait", "template.body", &context()), Ok(None));
    }

    #[test]
    fn json_filter_writes_json() {
        assert_eq!(render_one("{{ data.comment_text | json }}"), "\"Nice!\"");
        assert_eq!(render_one("{{ data.tags | json }}"), "[\"x\",\"y\"]");
        assert_eq!(render_one("{{ data.count | json }} {{ data.flag | json }} {{ data.missing | json }}"), "3 false null");
        let body = render_one("{\"items\": {{ data.items | json }}, \"who\": {{ recipient | json }}}");
        let parsed: Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(parsed["items"], json!([{"name": "a"}, {"name": "b"}]));
        assert_eq!(parsed["who"]["email"], "jane@example.com");
        // Quotes, backslashes and newlines in data cannot break out of the JSON string.
        let t = compile_one("{\"text\": {{ data.text | json }}}");
        let ctx = json!({"data": {"text": "say \"hi\"\\\n</script>"}});
        let body = t.render("s", "template.body", &ctx).unwrap().unwrap();
        let parsed: Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(parsed["text"], "say \"hi\"\\\n</script>");
        // Escaping grows text (a control character is 6 bytes): the JSON is capped like output.
        let ctx = json!({"data": {"text": "\u{1}".repeat(200_000)}});
        let err = t.render("s", "template.body", &ctx).unwrap_err();
        assert!(err.message.contains("json: the JSON text passes 1024 KiB"), "{err}");
    }

    #[test]
    fn compiled_templates_are_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CompiledTemplates>();
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s250ms"), Ok(Duration::from_millis(90_250)));
        assert_eq!(parse_duration(" 10s "), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_fail_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("-5m", "negative"),
            ("5", "needs a unit"),
            ("5w", "unknown unit `w`"),
            ("5 m", "unknown unit ` m`"),
            ("m", "invalid duration"),
            ("1.5h", "fractions"),
            ("99999999999999999999s", "too long"),
            ("18446744073709551615d", "too long"),
            ("36501d", "too long"),
        ];
        for (input, expected) in cases {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains(expected), "{input:?}: {err}");
        }
        assert!(parse_duration("36500d").is_ok());
    }
}
