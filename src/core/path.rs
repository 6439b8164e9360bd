//! A workflow's steps as a tree (branch steps hold branches of steps) and a
//! recipient's path through it. A recipient's step records are kept in the
//! order the steps ran; a branch step's record names the branch it took, so
//! replaying the records over the tree finds the next step without keeping a
//! separate cursor that could disagree with them.

use crate::core::status::StepStatus;
use crate::resources::workflow::{Step, StepType};

/// Branches nest at most this deep (Knock's limit).
pub const MAX_BRANCH_DEPTH: usize = 5;

/// Every step of the tree, depth first, in order (a branch step before its branches' steps).
pub fn all_steps(steps: &[Step]) -> Vec<&Step> {
    fn walk<'a>(steps: &'a [Step], out: &mut Vec<&'a Step>) {
        for step in steps {
            out.push(step);
            for branch in &step.branches {
                walk(&branch.steps, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(steps, &mut out);
    out
}

/// The step with this ref, anywhere in the tree.
pub fn find<'a>(steps: &'a [Step], step_ref: &str) -> Option<&'a Step> {
    all_steps(steps).into_iter().find(|s| s.step_ref == step_ref)
}

/// How deep branches nest (0 without branch steps).
pub fn depth(steps: &[Step]) -> usize {
    steps.iter().filter(|s| s.step_type == StepType::Branch).map(|s| 1 + s.branches.iter().map(|b| depth(&b.steps)).max().unwrap_or(0)).max().unwrap_or(0)
}

/// Where a recipient is in the tree, given its step records.
#[derive(Debug, PartialEq)]
pub enum Position<'a> {
    /// This step runs next.
    Next(&'a Step),
    /// Every step on the path has run.
    End,
    /// A branch with `terminates` finished: the run ends here.
    Terminated,
}

/// Replays the records (one per step that ran, in order) over the tree.
pub fn position<'a>(steps: &'a [Step], records: &[StepStatus]) -> Position<'a> {
    let mut records = records.iter();
    walk(steps, &mut records)
}

fn walk<'a>(steps: &'a [Step], records: &mut std::slice::Iter<'_, StepStatus>) -> Position<'a> {
    for step in steps {
        let Some(record) = records.next() else { return Position::Next(step) };
        if step.step_type != StepType::Branch {
            continue;
        }
        let Some(branch) = record.branch.as_deref().and_then(|name| step.branches.iter().find(|b| b.name == name)) else { continue };
        match walk(&branch.steps, records) {
            Position::End if branch.terminates => return Position::Terminated,
            Position::End => {}
            other => return other,
        }
    }
    Position::End
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::workflow::Branch;

    fn step(r: &str) -> Step {
        Step { step_ref: r.into(), ..Default::default() }
    }

    fn branch_step(r: &str, branches: Vec<Branch>) -> Step {
        Step { step_ref: r.into(), step_type: StepType::Branch, branches, ..Default::default() }
    }

    fn record(r: &str, branch: Option<&str>) -> StepStatus {
        StepStatus { step_ref: r.into(), branch: branch.map(str::to_string), ..Default::default() }
    }

    fn tree() -> Vec<Step> {
        vec![
            step("a"),
            branch_step(
                "route",
                vec![
                    Branch { name: "urgent".into(), terminates: true, steps: vec![step("page"), step("sms")], ..Default::default() },
                    Branch { name: "default".into(), steps: vec![step("mail")], ..Default::default() },
                ],
            ),
            step("z"),
        ]
    }

    #[test]
    fn replays_the_path_taken() {
        let steps = tree();
        let ref_of = |p: Position| match p {
            Position::Next(s) => s.step_ref.clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(ref_of(position(&steps, &[])), "a");
        assert_eq!(ref_of(position(&steps, &[record("a", None)])), "route");
        assert_eq!(ref_of(position(&steps, &[record("a", None), record("route", Some("urgent"))])), "page");
        assert_eq!(ref_of(position(&steps, &[record("a", None), record("route", Some("urgent")), record("page", None)])), "sms");
        assert_eq!(position(&steps, &[record("a", None), record("route", Some("urgent")), record("page", None), record("sms", None)]), Position::Terminated);
        assert_eq!(ref_of(position(&steps, &[record("a", None), record("route", Some("default")), record("mail", None)])), "z");
        // No branch taken (none matched, or the branch step was skipped): on after it.
        assert_eq!(ref_of(position(&steps, &[record("a", None), record("route", None)])), "z");
        assert_eq!(position(&steps, &[record("a", None), record("route", None), record("z", None)]), Position::End);
    }

    #[test]
    fn flattens_and_measures_the_tree() {
        let steps = tree();
        let refs: Vec<&str> = all_steps(&steps).iter().map(|s| s.step_ref.as_str()).collect();
        assert_eq!(refs, ["a", "route", "page", "sms", "mail", "z"]);
        assert_eq!(find(&steps, "mail").map(|s| s.step_ref.as_str()), Some("mail"));
        assert_eq!(depth(&steps), 1);
        let nested = vec![branch_step("outer", vec![Branch { name: "x".into(), steps: tree(), ..Default::default() }])];
        assert_eq!(depth(&nested), 2);
        assert_eq!(depth(&[step("a")]), 0);
    }
}
