//! `gpuwatch-bench compare`: two daemon builds, the same figures, one run.
//!
//! Why it exists: absolute figures move from machine to machine and with
//! whatever else the machine is doing, so a performance change is stated as
//! a ratio of two builds measured side by side. This module owns that: it
//! runs each named figure once per build per round, alternating which build
//! goes first (A B, B A, A B …) so that a drift in the machine's load falls
//! on both, and prints every metric's median for each build with the ratio
//! after / before and whether the change is for the better where the
//! metric's target says which way that is.

use std::path::PathBuf;

use clap::Args;

use crate::{
    FigureFn,
    report::{Figure, Target, number},
    stats::Spread,
};

/// Options of `compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// The other build's daemon: "before" (--server is "after").
    #[arg(long, value_name = "PATH")]
    pub against: PathBuf,
    /// Figures to compare (subcommand names, e.g. fanout polling idle),
    /// each with its default options.
    #[arg(required = true, value_name = "FIGURE")]
    pub figures: Vec<String>,
}

/// One figure measured with both builds.
#[derive(Debug)]
pub struct Comparison {
    pub before: Figure,
    pub after: Figure,
}

/// The figures `compare` can run, by name (those of `all`).
pub fn names(list: &[FigureFn<'_>]) -> Vec<String> {
    list.iter().map(|(n, _)| (*n).to_owned()).collect()
}

/// Runs `name` from `before_list` and `after_list` (the same figures made
/// for each build's [`Common`]) `rounds` times each, alternating.
pub fn compare_one(
    name: &str,
    before_list: &[FigureFn<'_>],
    after_list: &[FigureFn<'_>],
    rounds: u32,
) -> anyhow::Result<Comparison> {
    let find = |list: &[FigureFn<'_>]| -> anyhow::Result<usize> {
        list.iter().position(|(n, _)| *n == name).ok_or_else(|| {
            anyhow::anyhow!(
                "no figure named \"{name}\"; compare can run: {}",
                names(list).join(", ")
            )
        })
    };
    let (b, a) = (find(before_list)?, find(after_list)?);
    let mut before: Option<Figure> = None;
    let mut after: Option<Figure> = None;
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_before in order {
            let (label, f) = if is_before {
                ("before", &before_list[b].1)
            } else {
                ("after", &after_list[a].1)
            };
            eprintln!("  round {}/{rounds}: {label}", round + 1);
            let fig = f()?;
            let slot = if is_before { &mut before } else { &mut after };
            match slot {
                Some(acc) => acc.absorb(fig),
                None => *slot = Some(fig),
            }
        }
    }
    match (before, after) {
        (Some(before), Some(after)) => Ok(Comparison { before, after }),
        _ => anyhow::bail!("compare needs at least one round"),
    }
}

impl Comparison {
    /// The before/after table.
    pub fn to_text(&self, before_bin: &str, after_bin: &str) -> String {
        let load = |(b, a): (Option<f64>, Option<f64>)| {
            let f = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.2}"));
            format!("{}–{}", f(b), f(a))
        };
        let mut out = format!(
            "\ncompare {} — {}\n  {} run(s) per build, alternating; before = {before_bin}, after = {after_bin}\n  load average (1 min) {} (before's runs), {} (after's runs)\n",
            self.after.id,
            self.after.title,
            self.after.runs,
            load(self.before.loads()),
            load(self.after.loads()),
        );
        let width = self
            .after
            .metrics
            .iter()
            .map(|m| m.name.len())
            .max()
            .unwrap_or(0)
            .max(6);
        out.push_str(&format!(
            "  {:width$}  {:>10}  {:>10}  {:<8} {:>12}\n",
            "metric", "before", "after", "unit", "after/before"
        ));
        for m in &self.after.metrics {
            let b = self
                .before
                .metrics
                .iter()
                .find(|x| x.name == m.name)
                .and_then(|x| Spread::of(&x.values))
                .map(|s| s.median);
            let a = Spread::of(&m.values).map(|s| s.median);
            let ratio = match (b, a) {
                (Some(b), Some(a)) if b != 0.0 => Some(a / b),
                _ => None,
            };
            let verdict = match (m.target, ratio) {
                (Some(Target::AtMost(_)), Some(r)) if r < 0.97 => "  better",
                (Some(Target::AtMost(_)), Some(r)) if r > 1.03 => "  worse",
                (Some(Target::AtLeast(_)), Some(r)) if r > 1.03 => "  better",
                (Some(Target::AtLeast(_)), Some(r)) if r < 0.97 => "  worse",
                _ => "",
            };
            let cell = |v: Option<f64>| v.map_or("n/a".to_owned(), number);
            out.push_str(&format!(
                "  {:width$}  {:>10}  {:>10}  {:<8} {:>12}{verdict}\n",
                m.name,
                cell(b),
                cell(a),
                m.unit,
                ratio.map_or("n/a".to_owned(), |r| format!("{r:.3}")),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn figure(value: f64) -> Figure {
        let mut f = Figure::new("x", "test", 1, false);
        f.record("cpu", "%", Some(Target::AtMost(10.0)), value);
        f.record("rate", "req/s", Some(Target::AtLeast(1.0)), value * 100.0);
        f.finish()
    }

    #[test]
    fn builds_alternate_and_the_table_gives_ratios() {
        let order = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let calls_b = Cell::new(0.0);
        let o1 = order.clone();
        let before: Vec<FigureFn<'_>> = vec![(
            "x",
            Box::new(|| {
                o1.borrow_mut().push('b');
                calls_b.set(calls_b.get() + 1.0);
                Ok(figure(4.0 + calls_b.get()))
            }),
        )];
        let o2 = order.clone();
        let after: Vec<FigureFn<'_>> = vec![(
            "x",
            Box::new(move || {
                o2.borrow_mut().push('a');
                Ok(figure(3.0))
            }),
        )];
        let c = compare_one("x", &before, &after, 3).expect("compare");
        assert_eq!(*order.borrow(), ['b', 'a', 'a', 'b', 'b', 'a']);
        assert_eq!(c.before.runs, 3);
        assert_eq!(c.before.metrics[0].values, [5.0, 6.0, 7.0]);
        let text = c.to_text("old", "new");
        // cpu: median 6 before, 3 after: 0.5, lower is better.
        assert!(text.contains("0.500  better"), "{text}");
        // rate: 600 before, 300 after, higher is better.
        assert!(
            text.lines()
                .any(|l| l.contains("rate") && l.contains("0.500  worse")),
            "{text}"
        );
        let err = compare_one("nope", &before, &after, 1).expect_err("unknown figure");
        assert!(err.to_string().contains("compare can run: x"), "{err}");
    }
}
