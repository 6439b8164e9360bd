//! The CPU budget of one render: at most [`MAX_LOOP_ITERATIONS`] loop
//! iterations and [`MAX_RENDER_TIME`] of wall-clock time per rendered field.
//! A render over budget fails that step for that recipient
//! (`RenderBudgetExceeded`); what can be known to exceed it from the
//! template alone is refused when the Workflow is applied
//! ([`super::limits::check_loop_iterations`]).
//!
//! Why both: counted ranges are capped (1,000 items) but nest, so three
//! loops run a billion iterations; and a body can be slow without looping
//! much. The iteration count is exact and the same on every machine, so a
//! template fails or passes the same way everywhere; the time covers all
//! other work. In a release build 100,000 iterations take about 10 ms with
//! an empty body and 50 ms with a body writing two values, so the count is
//! what ordinary loops reach first, and the time what heavy bodies reach.
//! Wall-clock time is stricter on a loaded machine, but 250 ms is hundreds
//! of times what an ordinary notification template takes.
//!
//! How: the liquid crate renders to completion and cannot be interrupted.
//! So when a template is compiled, herald inserts a tag of its own,
//! `{% __herald_tick %}`, as the first element of every `for` and `tablerow`
//! body ([`instrument`]). Every iteration runs it; it counts the iteration
//! and checks the time, and fails the render once either is spent. The
//! tick renders nothing and carries the loop tag's whitespace control
//! (`-%}`), so the output is unchanged; templates are parsed as written
//! first, so errors point at the author's text. Elsewhere the time is
//! checked where rendering does work without looping: every write of output
//! or of a `capture` ([`super::limits::CappedOutput`]), every filter that can
//! build large values, and every variable looked up in the render context.
//!
//! Insertion reads the source with a small lexer ([`super::markup`]); liquid
//! then confirms it: every loop liquid parses must have its own tick, and
//! every tick must be parsed as a tag (not left as text in a `raw` block),
//! else the template is refused, so no loop can go uncounted.
//!
//! The budget lives in a thread-local for the duration of one render
//! ([`metered`]): liquid renders synchronously on the calling thread, and
//! neither its writers nor its value views can carry state of ours.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::time::{Duration, Instant};

use liquid_core::{BlockReflection, Language, ParseBlock, ParseTag, Renderable, Runtime, TagBlock, TagReflection, TagTokenIter};

use super::markup;

/// The most loop iterations (of all loops together) one field's render may run.
pub const MAX_LOOP_ITERATIONS: u64 = 100_000;

/// The most wall-clock time one field's render may take.
pub const MAX_RENDER_TIME: Duration = Duration::from_millis(250);

/// The name of the inserted tag (a name no template has reason to use; it is
/// refused in templates as an unknown tag).
const TICK: &str = "__herald_tick";

/// The loop blocks whose bodies get a tick.
const LOOPS: [&str; 2] = ["for", "tablerow"];

/// The limits of one render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub iterations: u64,
    pub time: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { iterations: MAX_LOOP_ITERATIONS, time: MAX_RENDER_TIME }
    }
}

/// Which limit a render ran out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Iterations(u64),
    Time(Duration),
}

impl Exceeded {
    pub fn message(self) -> String {
        match self {
            Exceeded::Iterations(n) => format!("rendering exceeded its budget of {n} loop iterations"),
            Exceeded::Time(t) => format!("rendering exceeded its budget of {} ms", t.as_millis()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Meter {
    budget: Budget,
    iterations: u64,
    /// Checks so far: the clock is read at every [`CLOCK_EVERY`]th.
    checks: u64,
    deadline: Instant,
    /// Sticky: once spent, every later check fails at once, so the render unwinds.
    exceeded: Option<Exceeded>,
}

/// Reading the clock at every check took a third of a tight loop's render;
/// every 16th keeps the overshoot to 16 checks' worth of work.
const CLOCK_EVERY: u64 = 16;

thread_local! {
    static METER: Cell<Option<Meter>> = const { Cell::new(None) };
}

/// Runs `render` on this thread under `budget`; returns its result and
/// whether the budget ran out (then the result is an error or cut short).
pub fn metered<T>(budget: Budget, render: impl FnOnce() -> T) -> (T, Option<Exceeded>) {
    struct Restore(Option<Meter>);
    impl Drop for Restore {
        fn drop(&mut self) {
            METER.set(self.0);
        }
    }
    let deadline = Instant::now().checked_add(budget.time).unwrap_or_else(|| Instant::now() + MAX_RENDER_TIME);
    let _restore = Restore(METER.replace(Some(Meter { budget, iterations: 0, checks: 0, deadline, exceeded: None })));
    let result = render();
    let exceeded = METER.get().and_then(|m| m.exceeded);
    (result, exceeded)
}

fn check(count_iteration: bool) -> Result<(), Exceeded> {
    let Some(mut meter) = METER.get() else {
        return Ok(());
    };
    if let Some(exceeded) = meter.exceeded {
        return Err(exceeded);
    }
    if count_iteration {
        meter.iterations += 1;
        if meter.iterations > meter.budget.iterations {
            meter.exceeded = Some(Exceeded::Iterations(meter.budget.iterations));
        }
    }
    meter.checks += 1;
    if meter.exceeded.is_none() && meter.checks % CLOCK_EVERY == 1 && Instant::now() >= meter.deadline {
        meter.exceeded = Some(Exceeded::Time(meter.budget.time));
    }
    METER.set(Some(meter));
    meter.exceeded.map_or(Ok(()), Err)
}

/// Fails once the render's time is spent (always passes outside [`metered`]).
pub fn check_time() -> Result<(), Exceeded> {
    check(false)
}

/// Counts one loop iteration; fails once the iterations or the time are spent.
fn tick() -> Result<(), Exceeded> {
    check(true)
}

/// [`check_time`] as a liquid error.
pub fn check_time_liquid() -> liquid_core::Result<()> {
    check_time().map_err(|e| liquid_core::Error::with_msg(e.message()))
}

/// `source` with a tick after every `for` and `tablerow` tag, and how many were inserted.
pub fn instrument(source: &str) -> (String, usize) {
    let mut out = String::with_capacity(source.len() + 64);
    let mut copied = 0;
    let mut inserted = 0;
    for tag in markup::tags(source).into_iter().filter(|t| LOOPS.contains(&t.name)) {
        out.push_str(&source[copied..tag.end]);
        // With `-%}` the loop tag drops the whitespace after it: the tick, now after it, must.
        out.push_str(if tag.trims_right { "{% __herald_tick -%}" } else { "{% __herald_tick %}" });
        copied = tag.end;
        inserted += 1;
    }
    out.push_str(&source[copied..]);
    (out, inserted)
}

/// The message when liquid and [`markup`] read a template differently.
pub const UNCOUNTABLE: &str = "herald cannot count this template's loop iterations (is there unbalanced markup inside a `raw` block?)";

/// Parses `source` (already known to parse as written) with its loops
/// instrumented, using a parser that has [`TickTag`] and [`Ticked`] loops;
/// checks that every loop got its tick.
pub fn parse_instrumented(parser: &liquid::Parser, source: &str) -> Result<liquid::Template, String> {
    let (instrumented, inserted) = instrument(source);
    PARSING.with(|p| p.replace(Parsing::default()));
    let parsed = parser.parse(&instrumented);
    let parsing = PARSING.with(|p| p.take());
    match parsed {
        Ok(template) if parsing.ticks == inserted => Ok(template),
        Ok(_) => Err(UNCOUNTABLE.to_string()),
        Err(e) if e.to_string().contains(UNCOUNTABLE) => Err(UNCOUNTABLE.to_string()),
        Err(e) => Err(format!("{UNCOUNTABLE}: {e}")),
    }
}

/// What parsing an instrumented template has seen.
#[derive(Debug, Default)]
struct Parsing {
    /// One entry per loop being parsed: whether its tick was seen.
    open_loops: Vec<bool>,
    ticks: usize,
}

thread_local! {
    static PARSING: RefCell<Parsing> = RefCell::default();
}

/// The `{% __herald_tick %}` tag: one loop iteration.
#[derive(Debug, Clone, Copy, Default)]
pub struct TickTag;

impl TagReflection for TickTag {
    fn tag(&self) -> &str {
        TICK
    }
    fn description(&self) -> &str {
        "Counts a loop iteration against herald's render budget (inserted by herald)."
    }
}

impl ParseTag for TickTag {
    fn parse(&self, mut arguments: TagTokenIter<'_>, _options: &Language) -> liquid_core::Result<Box<dyn Renderable>> {
        arguments.expect_nothing()?;
        PARSING.with(|p| {
            let mut p = p.borrow_mut();
            p.ticks += 1;
            if let Some(ticked) = p.open_loops.last_mut() {
                *ticked = true;
            }
        });
        Ok(Box::new(Tick))
    }
    fn reflection(&self) -> &dyn TagReflection {
        self
    }
}

#[derive(Debug)]
struct Tick;

impl Renderable for Tick {
    fn render_to(&self, _writer: &mut dyn Write, _runtime: &dyn Runtime) -> liquid_core::Result<()> {
        tick().map_err(|e| liquid_core::Error::with_msg(e.message()))
    }
}

/// A loop block (liquid's `for` or `tablerow`) that must contain a tick.
#[derive(Clone)]
pub struct Ticked<B>(pub B);

impl<B: ParseBlock + Clone + 'static> ParseBlock for Ticked<B> {
    fn parse(&self, arguments: TagTokenIter<'_>, block: TagBlock<'_, '_>, options: &Language) -> liquid_core::Result<Box<dyn Renderable>> {
        PARSING.with(|p| p.borrow_mut().open_loops.push(false));
        let parsed = self.0.parse(arguments, block, options);
        let ticked = PARSING.with(|p| p.borrow_mut().open_loops.pop()).unwrap_or(false);
        let parsed = parsed?;
        if !ticked {
            return Err(liquid_core::Error::with_msg(UNCOUNTABLE));
        }
        Ok(parsed)
    }
    fn reflection(&self) -> &dyn BlockReflection {
        self.0.reflection()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_go_after_every_loop_tag_keeping_its_trimming() {
        let (out, n) = instrument("a{% for i in x %}{{ i }}{%- endfor %} {%- tablerow c in y -%}\n {{ c }}{% endtablerow %}");
        assert_eq!(n, 2);
        assert_eq!(out, "a{% for i in x %}{% __herald_tick %}{{ i }}{%- endfor %} {%- tablerow c in y -%}{% __herald_tick -%}\n {{ c }}{% endtablerow %}");
        // Not in text, strings or raw blocks.
        let source = "for {{ \"{% for a in b %}\" }}{% raw %}{% for a in b %}{% endraw %}";
        assert_eq!(instrument(source), (source.to_string(), 0));
    }

    #[test]
    fn the_meter_counts_iterations_and_time() {
        let budget = Budget { iterations: 3, time: Duration::from_secs(3600) };
        let (results, exceeded) = metered(budget, || (0..5).map(|_| tick()).collect::<Vec<_>>());
        assert_eq!(results, [Ok(()), Ok(()), Ok(()), Err(Exceeded::Iterations(3)), Err(Exceeded::Iterations(3))]);
        assert_eq!(exceeded, Some(Exceeded::Iterations(3)));
        // The clock is read at the first check, then at every 16th.
        let late = Budget { iterations: 3, time: Duration::ZERO };
        let (result, exceeded) = metered(late, check_time);
        assert_eq!((result, exceeded), (Err(Exceeded::Time(Duration::ZERO)), Some(Exceeded::Time(Duration::ZERO))));
        let soon = Budget { iterations: 1000, time: Duration::from_millis(50) };
        let (results, _) = metered(soon, || {
            let start = Instant::now();
            let first = check_time();
            // Until the deadline has passed (polled, not slept).
            while start.elapsed() < soon.time {
                std::hint::spin_loop();
            }
            (first, (0..20).map(|_| check_time().is_ok()).collect::<Vec<_>>())
        });
        assert_eq!(results.0, Ok(()));
        assert_eq!(results.1.iter().take_while(|ok| **ok).count(), 15, "{results:?}");
        // Outside a metered render nothing is counted, and each render starts afresh.
        assert_eq!(tick(), Ok(()));
        assert_eq!(metered(budget, tick), (Ok(()), None));
    }
}
