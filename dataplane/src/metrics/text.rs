//! The Prometheus text exposition format, version 0.0.4: rendering, and a strict parser that
//! the tests use to prove the output is well formed (and that `chunkctl` can read back).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{Kind, Labels, Snapshot, Value, QUANTILES};

/// Whether `name` matches `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn label_set(labels: &[(String, String)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label_value(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn float(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

/// Renders a snapshot. Latency summaries are exposed in seconds.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let mut by_name: BTreeMap<&str, Vec<(&Labels, &Value)>> = BTreeMap::new();
    for ((name, labels), value) in &snapshot.series {
        by_name
            .entry(name.as_str())
            .or_default()
            .push((labels, value));
    }
    for (name, series) in by_name {
        let (kind, help) = snapshot
            .help
            .get(name)
            .cloned()
            .unwrap_or((Kind::Gauge, String::new()));
        let _ = writeln!(out, "# HELP {name} {}", escape_help(&help));
        let _ = writeln!(out, "# TYPE {name} {}", kind.as_str());
        for (labels, value) in series {
            match value {
                Value::Counter(c) => {
                    let _ = writeln!(out, "{name}{} {c}", label_set(labels, None));
                }
                Value::Gauge(g) => {
                    let _ = writeln!(out, "{name}{} {g}", label_set(labels, None));
                }
                Value::Latency(h) => {
                    for q in QUANTILES {
                        let seconds = if h.is_empty() {
                            f64::NAN
                        } else {
                            h.value_at_quantile(q) as f64 / 1e9
                        };
                        let labels = label_set(labels, Some(("quantile", q.to_string())));
                        let _ = writeln!(out, "{name}{labels} {}", float(seconds));
                    }
                    let sum = h.mean() * h.len() as f64 / 1e9;
                    let _ = writeln!(out, "{name}_sum{} {}", label_set(labels, None), float(sum));
                    let _ = writeln!(out, "{name}_count{} {}", label_set(labels, None), h.len());
                }
            }
        }
    }
    out
}

/// One parsed sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_sum`/`_count` suffixes as written).
    pub name: String,
    /// Labels, in the order written.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

/// Parses text in the exposition format strictly: every sample's family has a `# TYPE` line
/// before it, names and labels are well formed, values are numbers. Returns the samples or
/// the first offending line.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", number + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), _) if valid_metric_name(name) => {}
                (Some("TYPE"), Some(name), Some(kind)) if valid_metric_name(name) => {
                    if !["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind) {
                        return Err(bad("unknown type"));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(bad("second TYPE line for one family"));
                    }
                }
                (Some("HELP"), _, _) | (Some("TYPE"), _, _) => return Err(bad("malformed")),
                _ => {} // other comments are allowed
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad("value is not a number"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| bad("unclosed label set"))?;
                (name, parse_labels(body).map_err(|why| bad(&why))?)
            }
        };
        if !valid_metric_name(name) {
            return Err(bad("invalid metric name"));
        }
        let family = ["_sum", "_count", "_bucket"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| types.contains_key(*base))
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(bad("sample before its TYPE line"));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(samples)
}

fn parse_labels(body: &str) -> Result<Vec<(String, String)>, String> {
    let mut labels = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").ok_or("label without =\"")?;
        if !valid_label_name(name) {
            return Err(format!("invalid label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("bad escape in label value".into()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::Registry;
    use super::*;

    #[test]
    fn rendered_output_parses_and_carries_the_values() {
        let registry = Registry::new(&[("node", "1"), ("shard", "0")]);
        registry
            .counter(
                "chunkserver_requests_total",
                "Requests.",
                &[("op", "write")],
            )
            .add(7);
        registry
            .gauge("chunkserver_queue_depth", "Queue depth.", &[])
            .set(-2);
        let latency = registry.latency("chunkserver_request_seconds", "Latency.", &[]);
        for micros in 1..=1000 {
            latency.record(Duration::from_micros(micros));
        }
        registry.latency("chunkserver_idle_seconds", "Never recorded.", &[]);
        let text = registry.snapshot().render();
        let samples = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let find = |name: &str, quantile: Option<&str>| {
            samples
                .iter()
                .find(|s| {
                    s.name == name
                        && quantile
                            .is_none_or(|q| s.labels.contains(&("quantile".into(), q.into())))
                })
                .map(|s| s.value)
        };
        assert_eq!(find("chunkserver_requests_total", None), Some(7.0));
        assert_eq!(find("chunkserver_queue_depth", None), Some(-2.0));
        assert_eq!(
            find("chunkserver_request_seconds_count", None),
            Some(1000.0)
        );
        let median = find("chunkserver_request_seconds", Some("0.5")).unwrap();
        assert!((median - 0.0005).abs() < 0.00001, "{median}");
        assert!(find("chunkserver_idle_seconds", Some("0.5"))
            .unwrap()
            .is_nan());
    }

    #[test]
    fn label_values_are_escaped_and_read_back() {
        let registry = Registry::new(&[]);
        registry
            .counter(
                "x_total",
                "Help with \\ and\nnewline.",
                &[("path", "a\"b\\c\nd")],
            )
            .inc();
        let text = registry.snapshot().render();
        let samples = parse(&text).unwrap();
        assert_eq!(
            samples[0].labels,
            vec![("path".to_string(), "a\"b\\c\nd".to_string())]
        );
    }

    #[test]
    fn the_parser_rejects_malformed_text() {
        assert!(parse("x 1\n").is_err(), "no TYPE line");
        assert!(parse("# TYPE x counter\nx{a=\"1} 1\n").is_err());
        assert!(parse("# TYPE x counter\nx one\n").is_err());
        assert!(parse("# TYPE x countr\nx 1\n").is_err());
        assert!(parse("# TYPE 1x counter\n").is_err());
        assert!(parse("# TYPE x counter\nx{1a=\"v\"} 1\n").is_err());
    }
}
