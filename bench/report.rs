//! A measured figure and how it is reported: the median and spread of each
//! metric over the runs, its target and whether the median meets it, notes
//! on what was measured, and the load average before and after — as text
//! for people and as one JSON line for BENCHMARKS.md tables and reruns.

use std::{fs::OpenOptions, io::Write, path::Path};

use anyhow::Context;
use serde_json::json;

use crate::{
    machine::{Machine, load_average},
    stats::Spread,
};

/// A bound a metric's median should keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    fn met_by(self, value: f64) -> bool {
        match self {
            Target::AtMost(t) => value <= t,
            Target::AtLeast(t) => value >= t,
        }
    }

    fn text(self) -> String {
        match self {
            Target::AtMost(t) => format!("<= {t}"),
            Target::AtLeast(t) => format!(">= {t}"),
        }
    }
}

/// One metric of a figure: a value per run.
#[derive(Debug, Clone)]
pub struct Metric {
    pub name: String,
    pub unit: &'static str,
    pub values: Vec<f64>,
    pub target: Option<Target>,
}

/// One figure of BENCHMARKS.md.
#[derive(Debug, Clone)]
pub struct Figure {
    pub id: &'static str,
    pub title: String,
    pub runs: u32,
    pub metrics: Vec<Metric>,
    pub notes: Vec<String>,
    pub quick: bool,
    /// Which build was measured, in `compare` ("before: PATH").
    pub build: Option<String>,
    load_before: Option<[f64; 3]>,
    load_after: Option<[f64; 3]>,
}

impl Figure {
    pub fn new(id: &'static str, title: impl Into<String>, runs: u32, quick: bool) -> Self {
        Self {
            id,
            title: title.into(),
            runs,
            metrics: Vec::new(),
            notes: Vec::new(),
            quick,
            build: None,
            load_before: load_average(),
            load_after: None,
        }
    }

    /// Adds one run's value of a metric (declaring the metric on first use).
    pub fn record(&mut self, name: &str, unit: &'static str, target: Option<Target>, value: f64) {
        match self.metrics.iter_mut().find(|m| m.name == name) {
            Some(m) => m.values.push(value),
            None => self.metrics.push(Metric {
                name: name.to_owned(),
                unit,
                values: vec![value],
                target,
            }),
        }
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Adds `other`'s runs (the same figure, measured again) to this one.
    pub fn absorb(&mut self, other: Figure) {
        self.runs += other.runs;
        for m in other.metrics {
            match self.metrics.iter_mut().find(|x| x.name == m.name) {
                Some(x) => x.values.extend(m.values),
                None => self.metrics.push(m),
            }
        }
        for n in other.notes {
            if !self.notes.contains(&n) {
                self.notes.push(n);
            }
        }
        self.load_after = other.load_after;
    }

    /// The load average (1 min) before the first run and after the last.
    pub fn loads(&self) -> (Option<f64>, Option<f64>) {
        (
            self.load_before.map(|l| l[0]),
            self.load_after.map(|l| l[0]),
        )
    }

    /// The figure is complete: notes the load average now.
    pub fn finish(mut self) -> Self {
        self.load_after = load_average();
        self
    }

    pub fn to_text(&self) -> String {
        let load = |l: Option<[f64; 3]>| l.map_or("?".to_owned(), |l| format!("{:.2}", l[0]));
        let mut out = format!(
            "\n{} — {}\n  {} run(s){}; load average (1 min) {} before, {} after\n",
            self.id,
            self.title,
            self.runs,
            if self.quick {
                " (--quick: proves the harness works; not a figure)"
            } else {
                ""
            },
            load(self.load_before),
            load(self.load_after)
        );
        let width = self.metrics.iter().map(|m| m.name.len()).max().unwrap_or(0);
        for m in &self.metrics {
            let Some(s) = Spread::of(&m.values) else {
                out.push_str(&format!("  {:width$}  (no value)\n", m.name));
                continue;
            };
            let verdict = m.target.map_or(String::new(), |t| {
                format!(
                    "  target {} {} {}",
                    t.text(),
                    m.unit,
                    if t.met_by(s.median) { "MET" } else { "MISSED" }
                )
            });
            out.push_str(&format!(
                "  {:width$}  {:>10} {:<8} [{} – {}]{}\n",
                m.name,
                number(s.median),
                m.unit,
                number(s.min),
                number(s.max),
                verdict
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        out
    }

    /// Appends this figure as one JSON line to `path`.
    pub fn append_json(&self, path: &Path, machine: &Machine) -> anyhow::Result<()> {
        let metrics: Vec<_> = self
            .metrics
            .iter()
            .map(|m| {
                let s = Spread::of(&m.values);
                json!({
                    "name": m.name,
                    "unit": m.unit,
                    "median": s.map(|s| s.median),
                    "min": s.map(|s| s.min),
                    "max": s.map(|s| s.max),
                    "values": m.values.iter().map(|v| if v.is_finite() { Some(*v) } else { None }).collect::<Vec<_>>(),
                    "target": m.target.map(Target::text),
                    "met": match (m.target, s) {
                        (Some(t), Some(s)) => Some(t.met_by(s.median)),
                        _ => None,
                    },
                })
            })
            .collect();
        let line = json!({
            "figure": self.id,
            "title": self.title,
            "invocation": std::env::args().collect::<Vec<_>>().join(" "),
            "runs": self.runs,
            "quick": self.quick,
            "build": self.build,
            "machine": machine,
            "load_before": self.load_before,
            "load_after": self.load_after,
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            "metrics": metrics,
            "notes": self.notes,
        });
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {} for the results", path.display()))?;
        writeln!(file, "{line}").with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A number with sensible precision for a table.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_owned();
    }
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_collect_runs_and_judge_the_median() {
        let mut f = Figure::new("x", "test", 3, false);
        for v in [1.0, 5.0, 2.0] {
            f.record("cpu", "%", Some(Target::AtMost(3.0)), v);
        }
        f.record("rate", "req/s", Some(Target::AtLeast(10.0)), 4.0);
        assert_eq!(f.metrics[0].values, [1.0, 5.0, 2.0]);
        let text = f.finish().to_text();
        assert!(text.contains("<= 3 % MET"), "{text}");
        assert!(text.contains(">= 10 req/s MISSED"), "{text}");
        assert!(text.contains("[1.00 – 5.00]"), "{text}");
    }

    #[test]
    fn json_lines_append() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("r.jsonl");
        let mut f = Figure::new("x", "test", 1, true);
        f.record("cpu", "%", None, 1.5);
        let machine = Machine::describe();
        f.append_json(&path, &machine).expect("first");
        f.append_json(&path, &machine).expect("second");
        let text = std::fs::read_to_string(&path).expect("read back");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["metrics"][0]["median"], 1.5);
        assert_eq!(lines[1]["figure"], "x");
    }
}
