//! Values a render builds are capped like its output, at
//! [`MAX_OUTPUT_BYTES`]: the loop budget bounds time, not memory, and a
//! value can double at every iteration (`{% capture x %}{{x}}{{x}}{% endcapture %}`,
//! `{% assign x = x | append: x %}`), or grow by its square in one filter
//! (`replace` with a long replacement, `join` with a long separator). So:
//!
//! - `capture` and `ifchanged` (the blocks that render into a buffer of
//!   their own) render into a capped, deadline-checked buffer, as the
//!   output is ([`CappedOutput`]); these are liquid's blocks, rewritten
//!   around that buffer.
//! - `append`, `prepend`, `replace`, `replace_first`, `join` and `concat`
//!   (the filters whose result can be larger than what they are given)
//!   compute their result's size before building it and refuse one past
//!   the cap; then liquid's own filter runs. They also check the render's
//!   deadline.
//!
//! Other filters keep sizes within a small factor of their input (`escape`,
//! `url_encode`...), and their input is capped. A single filter call cannot
//! be interrupted: `uniq` compares every pair of items, so it is refused
//! above [`MAX_UNIQ_ITEMS`]; `sort` and the rest are at most `n log n`.

use std::fmt;
use std::io::Write;

use liquid_core::error::ResultLiquidExt;
use liquid_core::model::{KString, Value, ValueView};
use liquid_core::parser::FilterArguments;
use liquid_core::{BlockReflection, Expression, Filter, FilterReflection, Language, ParseBlock, ParseFilter, Renderable, Runtime, TagBlock, TagTokenIter, Template};

use super::budget;
use super::limits::{too_large, CappedOutput, MAX_OUTPUT_BYTES};

/// The most items `uniq` takes (it compares each with every kept one).
pub const MAX_UNIQ_ITEMS: i64 = 10_000;

/// Registers the capped blocks and filters, over liquid's.
pub fn register(builder: liquid::ParserBuilder) -> liquid::ParserBuilder {
    use liquid_lib::stdlib;
    builder
        .block(CaptureBlock)
        .block(IfChangedBlock)
        .filter(Capped(stdlib::Append, Check::Append))
        .filter(Capped(stdlib::Prepend, Check::Prepend))
        .filter(Capped(stdlib::Replace, Check::Replace))
        .filter(Capped(stdlib::ReplaceFirst, Check::ReplaceFirst))
        .filter(Capped(stdlib::Join, Check::Join))
        .filter(Capped(stdlib::Concat, Check::Concat))
        .filter(Capped(stdlib::Uniq, Check::Uniq))
}

/// Renders `template` into a capped buffer; `what` names it in the error.
fn render_capped(template: &Template, runtime: &dyn Runtime, what: impl FnOnce() -> String) -> liquid_core::Result<String> {
    let mut buffer = CappedOutput::default();
    if let Err(e) = template.render_to(&mut buffer, runtime) {
        // liquid replaces the writer's error with its own "Failed to render".
        return Err(if buffer.overflowed { liquid_core::Error::with_msg(too_large(&what())) } else { e });
    }
    String::from_utf8(buffer.bytes).map_err(|_| liquid_core::Error::with_msg(format!("{} is not UTF-8", what())))
}

/// `{% capture name %}...{% endcapture %}`, as liquid's, into a capped buffer.
#[derive(Debug, Clone, Copy, Default)]
struct CaptureBlock;

impl BlockReflection for CaptureBlock {
    fn start_tag(&self) -> &str {
        "capture"
    }
    fn end_tag(&self) -> &str {
        "endcapture"
    }
    fn description(&self) -> &str {
        "Renders its body into a variable (at most 1 MiB)."
    }
}

impl ParseBlock for CaptureBlock {
    fn parse(&self, mut arguments: TagTokenIter<'_>, mut tokens: TagBlock<'_, '_>, options: &Language) -> liquid_core::Result<Box<dyn Renderable>> {
        let id: KString = arguments.expect_next("Identifier expected")?.expect_identifier().into_result()?.to_owned().into();
        arguments.expect_nothing()?;
        let template = Template::new(tokens.parse_all(options).trace_with(|| format!("{{% capture {id} %}}").into())?);
        tokens.assert_empty();
        Ok(Box::new(Capture { id, template }))
    }
    fn reflection(&self) -> &dyn BlockReflection {
        self
    }
}

#[derive(Debug)]
struct Capture {
    id: KString,
    template: Template,
}

impl Renderable for Capture {
    fn render_to(&self, _writer: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let captured = render_capped(&self.template, runtime, || format!("`capture {}`", self.id)).trace_with(|| format!("{{% capture {} %}}", self.id).into())?;
        runtime.set_global(self.id.clone(), Value::scalar(captured));
        Ok(())
    }
}

/// `{% ifchanged %}...{% endifchanged %}`, as liquid's, into a capped buffer.
#[derive(Debug, Clone, Copy, Default)]
struct IfChangedBlock;

impl BlockReflection for IfChangedBlock {
    fn start_tag(&self) -> &str {
        "ifchanged"
    }
    fn end_tag(&self) -> &str {
        "endifchanged"
    }
    fn description(&self) -> &str {
        "Renders its body unless it renders the same as the last time."
    }
}

impl ParseBlock for IfChangedBlock {
    fn parse(&self, mut arguments: TagTokenIter<'_>, mut tokens: TagBlock<'_, '_>, options: &Language) -> liquid_core::Result<Box<dyn Renderable>> {
        arguments.expect_nothing()?;
        let body = Template::new(tokens.parse_all(options)?);
        tokens.assert_empty();
        Ok(Box::new(IfChanged { body }))
    }
    fn reflection(&self) -> &dyn BlockReflection {
        self
    }
}

#[derive(Debug)]
struct IfChanged {
    body: Template,
}

/// The last output of an `ifchanged` in this render.
#[derive(Debug, Default)]
struct LastChanged(Option<String>);

impl Renderable for IfChanged {
    fn render_to(&self, writer: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let rendered = render_capped(&self.body, runtime, || "`ifchanged`".to_string()).trace("{% ifchanged %}")?;
        let mut last = runtime.registers().get_mut::<LastChanged>();
        if last.0.as_deref() != Some(rendered.as_str()) {
            writer.write_all(rendered.as_bytes()).map_err(|e| liquid_core::Error::with_msg(format!("Failed to render: {e}")))?;
            last.0 = Some(rendered);
        }
        Ok(())
    }
}

/// What a filter is checked for: how its result can grow past its input.
#[derive(Debug, Clone, Copy)]
enum Check {
    Append,
    Prepend,
    Replace,
    ReplaceFirst,
    Join,
    Concat,
    /// Not size but time: every item is compared with every kept one.
    Uniq,
}

/// One of liquid's filters, checked before it runs (see the module docs).
#[derive(Clone)]
struct Capped<P>(P, Check);

impl<P: ParseFilter + Clone + 'static> ParseFilter for Capped<P> {
    fn parse(&self, arguments: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        // Kept to size the result before the filter runs; liquid's filter gets the same.
        let positional: Vec<Expression> = arguments.positional.collect();
        let inner = self.0.parse(FilterArguments { positional: Box::new(positional.clone().into_iter()), keyword: arguments.keyword })?;
        Ok(Box::new(CappedFilter { inner, check: self.1, positional }))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self.0.reflection()
    }
}

#[derive(Debug)]
struct CappedFilter {
    inner: Box<dyn Filter>,
    check: Check,
    positional: Vec<Expression>,
}

impl fmt::Display for CappedFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl Filter for CappedFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<Value> {
        budget::check_time_liquid()?;
        let argument = |i: usize| self.positional.get(i).map(|e| e.evaluate(runtime)).transpose();
        let text = |v: Option<&dyn ValueView>| v.map_or(0, |v| v.to_kstr().len());
        let size = match self.check {
            Check::Append | Check::Prepend => text(Some(input)) + text(argument(0)?.as_ref().map(|v| v.as_view())),
            Check::ReplaceFirst => text(Some(input)) + text(argument(1)?.as_ref().map(|v| v.as_view())),
            Check::Replace => {
                let input = input.to_kstr();
                let search = argument(0)?.map(|v| v.to_kstr().into_owned()).unwrap_or_default();
                let with = text(argument(1)?.as_ref().map(|v| v.as_view()));
                input.len().saturating_add(input.matches(search.as_str()).count().saturating_mul(with))
            }
            Check::Join => match input.as_array() {
                Some(items) => {
                    let separator = argument(0)?.map_or(1, |v| v.to_kstr().len());
                    let items_len = items.values().fold(0usize, |n, v| n.saturating_add(v.to_kstr().len()));
                    items_len.saturating_add(usize::try_from(items.size()).unwrap_or(usize::MAX).saturating_mul(separator))
                }
                None => 0,
            },
            Check::Concat => approx_size(input).saturating_add(argument(0)?.map_or(0, |v| approx_size(v.as_view()))),
            Check::Uniq => {
                let items = input.as_array().map_or(0, |a| a.size());
                if items > MAX_UNIQ_ITEMS {
                    return Err(liquid_core::Error::with_msg(format!("`uniq` takes at most {MAX_UNIQ_ITEMS} items (it was given {items})")));
                }
                0
            }
        };
        if size > MAX_OUTPUT_BYTES {
            return Err(liquid_core::Error::with_msg(format!("`{}` would make a value of {size} bytes; at most {MAX_OUTPUT_BYTES} are allowed", self.check.name())));
        }
        self.inner.evaluate(input, runtime)
    }
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::Append => "append",
            Check::Prepend => "prepend",
            Check::Replace => "replace",
            Check::ReplaceFirst => "replace_first",
            Check::Join => "join",
            Check::Concat => "concat",
            Check::Uniq => "uniq",
        }
    }
}

/// Roughly the bytes a value holds: its scalars' text, one per item.
fn approx_size(value: &dyn ValueView) -> usize {
    if let Some(array) = value.as_array() {
        array.values().fold(0usize, |n, v| n.saturating_add(1).saturating_add(approx_size(v)))
    } else if let Some(object) = value.as_object() {
        object.iter().fold(0usize, |n, (k, v)| n.saturating_add(k.len()).saturating_add(approx_size(v)))
    } else {
        value.to_kstr().len()
    }
}
