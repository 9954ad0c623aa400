//! The example configuration `deploy/gpuwatch.toml` can never drift from the
//! schema in `server/config.rs`.
//!
//! The schema's keys are not listed by hand: they are read from the schema
//! itself, by asking `gpuwatch_server::config::load` about a key that does not exist
//! in each table (serde's `deny_unknown_fields` answers with every field the
//! table has), and descending into each field that turns out to be a table or
//! a list of tables. Adding a key to `Config` without documenting it in the
//! example file fails `every_schema_key_is_in_the_example`.
//!
//! The example's conventions (stated at its top): `#key = value` is a setting
//! shown commented out, `# text` is an explanation. The file must load as it
//! is, and also with every setting uncommented, so the example values are
//! valid too.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::PathBuf,
};

use config::{File, FileFormat, Value, ValueKind};
use gpuwatch_server::config::{Config, ConfigError, Overrides, load};

const PROBE: &str = "zz_probe_key";

fn example_path() -> PathBuf {
    gpuwatch_testkit::repo_root().join("deploy/gpuwatch.toml")
}

fn example_text() -> String {
    std::fs::read_to_string(example_path()).expect("deploy/gpuwatch.toml is readable")
}

fn load_text(toml: &str) -> Result<Config, ConfigError> {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(toml.as_bytes()).expect("write temp config");
    load(Some(file.path()), Vec::new(), &Overrides::default())
}

/// One step of a key path: a table field, or a field holding a list of tables.
#[derive(Clone, Debug)]
struct Segment {
    name: String,
    list: bool,
}

fn path_string(path: &[Segment]) -> String {
    path.iter()
        .map(|s| {
            if s.list {
                format!("{}[]", s.name)
            } else {
                s.name.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// A TOML document that puts `leaf` at `path`, e.g. `a = { b = [ LEAF ] }`.
fn document_at(path: &[Segment], leaf: &str) -> String {
    let Some((first, rest)) = path.split_first() else {
        return leaf
            .trim_start_matches('{')
            .trim_end_matches('}')
            .to_owned();
    };
    let mut value = leaf.to_owned();
    for seg in rest.iter().rev() {
        let inner = if seg.list {
            format!("[ {value} ]")
        } else {
            value
        };
        value = format!("{{ {} = {inner} }}", seg.name);
    }
    if first.list {
        value = format!("[ {value} ]");
    }
    format!("{} = {value}\n", first.name)
}

/// The fields serde lists when it meets the probe key in the table at `path`,
/// or `None` when `path` is not a table.
fn fields_of(path: &[Segment]) -> Option<Vec<String>> {
    let doc = document_at(path, &format!("{{ {PROBE} = 1 }}"));
    let err = load_text(&doc).expect_err("a probe key is never valid");
    let msg = err.to_string();
    if !msg.contains(&format!("unknown field `{PROBE}`")) {
        return None;
    }
    if msg.contains("there are no fields") {
        return Some(Vec::new());
    }
    let (_, expected) = msg
        .split_once(", expected")
        .unwrap_or_else(|| panic!("serde's unknown-field message changed: {msg}"));
    let expected = expected.split(" for key ").next().unwrap_or(expected);
    Some(
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    )
}

/// Every key path of the schema, e.g. `sampler.interval`,
/// `simulator.gpus[].demand[].watts`.
fn schema_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut todo = vec![Vec::<Segment>::new()];
    while let Some(table) = todo.pop() {
        let fields = fields_of(&table)
            .unwrap_or_else(|| panic!("{} should be a table", path_string(&table)));
        for name in fields {
            let mut as_table = table.clone();
            as_table.push(Segment {
                name: name.clone(),
                list: false,
            });
            let mut as_list = table.clone();
            as_list.push(Segment { name, list: true });
            if fields_of(&as_table).is_some() {
                todo.push(as_table);
            } else if fields_of(&as_list).is_some() {
                todo.push(as_list);
            } else {
                keys.insert(path_string(&as_table));
            }
        }
    }
    keys
}

/// A line of the example, classified by the file's conventions.
enum Line<'a> {
    Blank,
    Prose,
    /// `[a.b]` or `[[a.b]]`, active or commented out.
    Table {
        path: Vec<Segment>,
    },
    /// `key = value`, active or commented out (the text without `#`).
    Setting(&'a str),
}

fn classify(line: &str) -> Line<'_> {
    let line = line.trim_end();
    let body = match line.strip_prefix('#') {
        None => line,
        Some(rest) if rest.is_empty() || rest.starts_with([' ', '#']) => return Line::Prose,
        Some(rest) => rest,
    };
    if body.trim().is_empty() {
        return Line::Blank;
    }
    if let Some(name) = body.strip_prefix("[[").and_then(|b| b.strip_suffix("]]")) {
        let mut path: Vec<Segment> = name
            .split('.')
            .map(|n| Segment {
                name: n.trim().to_owned(),
                list: false,
            })
            .collect();
        if let Some(last) = path.last_mut() {
            last.list = true;
        }
        return Line::Table { path };
    }
    if let Some(name) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')) {
        let path = name
            .split('.')
            .map(|n| Segment {
                name: n.trim().to_owned(),
                list: false,
            })
            .collect();
        return Line::Table { path };
    }
    Line::Setting(body)
}

fn collect_paths(prefix: &str, value: &Value, out: &mut BTreeSet<String>) {
    match &value.kind {
        ValueKind::Table(map) => {
            for (k, v) in map {
                collect_paths(&format!("{prefix}.{k}"), v, out);
            }
        }
        ValueKind::Array(items) if items.iter().any(|i| matches!(i.kind, ValueKind::Table(_))) => {
            for item in items {
                collect_paths(&format!("{prefix}[]"), item, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

/// The key paths each setting line of the example defines, by line number
/// (1-based). Each setting line must be a whole TOML document on its own.
fn example_settings(text: &str) -> BTreeMap<usize, BTreeSet<String>> {
    let mut table: Vec<Segment> = Vec::new();
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        match classify(raw) {
            Line::Table { path } => table = path,
            Line::Setting(body) => {
                let parsed: BTreeMap<String, Value> = config::Config::builder()
                    .add_source(File::from_str(body, FileFormat::Toml))
                    .build()
                    .and_then(|c| c.try_deserialize())
                    .unwrap_or_else(|e| {
                        panic!(
                            "deploy/gpuwatch.toml:{}: a setting must fit on one line: {e}",
                            i + 1
                        )
                    });
                let mut paths = BTreeSet::new();
                for (key, value) in &parsed {
                    let prefix = if table.is_empty() {
                        key.clone()
                    } else {
                        format!("{}.{key}", path_string(&table))
                    };
                    collect_paths(&prefix, value, &mut paths);
                }
                out.insert(i + 1, paths);
            }
            Line::Blank | Line::Prose => {}
        }
    }
    out
}

fn uncomment_all(text: &str) -> String {
    text.lines()
        .map(|line| match classify(line) {
            Line::Table { .. } | Line::Setting(_) => line.trim_start_matches('#'),
            Line::Blank | Line::Prose => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_loads_as_shipped() {
    load(Some(&example_path()), Vec::new(), &Overrides::default())
        .expect("deploy/gpuwatch.toml loads through gpuwatch_server::config::load");
}

#[test]
fn the_example_loads_with_every_setting_uncommented() {
    let text = uncomment_all(&example_text());
    if let Err(e) = load_text(&text) {
        panic!("deploy/gpuwatch.toml with every setting uncommented is invalid: {e}");
    }
}

#[test]
fn every_schema_key_is_in_the_example() {
    let schema = schema_keys();
    // The probe must have found the schema, or this test proves nothing.
    for known in [
        "server.listen",
        "sampler.interval",
        "simulator.gpus[].preset",
        "simulator.gpus[].demand[].watts",
        "controller.gpus[].uuid",
        "log.format",
    ] {
        assert!(
            schema.contains(known),
            "schema probe missed {known}: {schema:?}"
        );
    }
    let documented: BTreeSet<String> = example_settings(&example_text())
        .into_values()
        .flatten()
        .collect();
    let missing: Vec<_> = schema.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "config keys missing from deploy/gpuwatch.toml (add each with a comment): {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&schema).collect();
    assert!(
        unknown.is_empty(),
        "deploy/gpuwatch.toml documents keys the schema does not have: {unknown:?}"
    );
}

#[test]
fn every_setting_is_explained_by_the_comment_above_it() {
    let text = example_text();
    let lines: Vec<&str> = text.lines().collect();
    let mut seen = BTreeSet::new();
    for (number, paths) in example_settings(&text) {
        let first_time = paths.iter().any(|p| !seen.contains(p));
        seen.extend(paths.iter().cloned());
        if !first_time {
            continue;
        }
        let above = lines[..number - 1]
            .iter()
            .rev()
            .take_while(|l| matches!(classify(l), Line::Prose))
            .count();
        assert!(
            above > 0,
            "deploy/gpuwatch.toml:{number}: `{}` has no explanation directly above it",
            lines[number - 1]
        );
    }
}
