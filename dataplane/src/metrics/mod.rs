//! Metrics: collected per shard without locks, merged only when scraped, exposed in the
//! Prometheus text format over HTTP.
//!
//! A shard owns a [`Registry`] of [`Counter`]s, [`Gauge`]s and [`Latency`] histograms (plain
//! `Cell`s and `RefCell`s: only the shard's executor touches them). A scrape asks every shard
//! for a [`Snapshot`] — a plain, `Send` value — merges them (counters add, gauges add,
//! histograms merge) and renders the text. Nothing on the data path takes a lock or crosses a
//! core for metrics.

pub mod http;
pub mod text;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Labels of one series, sorted by name.
pub type Labels = Vec<(String, String)>;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(Cell<u64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.set(self.0.get().wrapping_add(n));
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(Cell<i64>);

impl Gauge {
    /// Sets it.
    pub fn set(&self, value: i64) {
        self.0.set(value);
    }

    /// Adds `delta` (negative to subtract).
    pub fn add(&self, delta: i64) {
        self.0.set(self.0.get().saturating_add(delta));
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.get()
    }
}

/// Latencies in nanoseconds, from 1 ns to one minute at three significant digits.
#[derive(Debug)]
pub struct Latency(RefCell<Histogram<u64>>);

fn new_latency_histogram() -> Histogram<u64> {
    // Constant, valid bounds: failing here is a programming error, not an input error.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

impl Default for Latency {
    fn default() -> Self {
        Latency(RefCell::new(new_latency_histogram()))
    }
}

impl Latency {
    /// Records one latency.
    pub fn record(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.0.borrow_mut().saturating_record(nanos);
    }

    /// How many were recorded.
    pub fn count(&self) -> u64 {
        self.0.borrow().len()
    }
}

/// The quantiles every latency summary shows.
pub const QUANTILES: [f64; 3] = [0.5, 0.99, 0.999];

/// What a metric is, for the `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Quantiles, sum and count.
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
        }
    }
}

#[derive(Debug)]
enum Instrument {
    Counter(Rc<Counter>),
    Gauge(Rc<Gauge>),
    Latency(Rc<Latency>),
}

/// A shard's metrics. Registering the same name and labels twice returns the same instrument.
#[derive(Debug, Default)]
pub struct Registry {
    help: RefCell<BTreeMap<String, (Kind, String)>>,
    series: RefCell<BTreeMap<(String, Labels), Instrument>>,
    /// Labels added to every series of this registry (node, shard).
    constant_labels: Labels,
    /// Set when collection is off: every instrument handed out is one of these, recorded
    /// nowhere (the cost of metrics then is a reference count).
    disabled: Option<(Rc<Counter>, Rc<Gauge>, Rc<Latency>)>,
}

fn sorted(labels: &[(&str, &str)]) -> Labels {
    let mut labels: Labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    labels
}

impl Registry {
    /// A registry whose series all carry `constant_labels`.
    pub fn new(constant_labels: &[(&str, &str)]) -> Registry {
        Registry {
            constant_labels: sorted(constant_labels),
            ..Registry::default()
        }
    }

    /// A registry that collects nothing: its instruments count into the void and its
    /// snapshots are empty (`metrics.collect = false`).
    pub fn disabled() -> Registry {
        Registry {
            disabled: Some(Default::default()),
            ..Registry::default()
        }
    }

    fn key(&self, name: &str, kind: Kind, help: &str, labels: &[(&str, &str)]) -> (String, Labels) {
        assert!(
            text::valid_metric_name(name),
            "invalid metric name {name:?}"
        );
        let mut help_map = self.help.borrow_mut();
        let entry = help_map
            .entry(name.to_string())
            .or_insert_with(|| (kind, help.to_string()));
        assert_eq!(entry.0, kind, "metric {name} registered with two kinds");
        let mut all = sorted(labels);
        all.extend(self.constant_labels.iter().cloned());
        all.sort();
        (name.to_string(), all)
    }

    /// Drops every series labelled `label="value"` (a deleted copyset's gauges and counters,
    /// so that the exposition stops reporting it). Instruments handed out before keep
    /// counting into nothing.
    pub fn forget(&self, label: &str, value: &str) {
        self.series
            .borrow_mut()
            .retain(|(_, labels), _| !labels.iter().any(|(k, v)| k == label && v == value));
    }

    /// The counter `name{labels}`.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Rc<Counter> {
        if let Some((counter, _, _)) = &self.disabled {
            return Rc::clone(counter);
        }
        let key = self.key(name, Kind::Counter, help, labels);
        let mut series = self.series.borrow_mut();
        match series
            .entry(key)
            .or_insert_with(|| Instrument::Counter(Rc::default()))
        {
            Instrument::Counter(counter) => Rc::clone(counter),
            _ => unreachable!("kind checked by key()"),
        }
    }

    /// The gauge `name{labels}`.
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Rc<Gauge> {
        if let Some((_, gauge, _)) = &self.disabled {
            return Rc::clone(gauge);
        }
        let key = self.key(name, Kind::Gauge, help, labels);
        let mut series = self.series.borrow_mut();
        match series
            .entry(key)
            .or_insert_with(|| Instrument::Gauge(Rc::default()))
        {
            Instrument::Gauge(gauge) => Rc::clone(gauge),
            _ => unreachable!("kind checked by key()"),
        }
    }

    /// The latency summary `name{labels}` (seconds in the exposition, as Prometheus wants).
    pub fn latency(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Rc<Latency> {
        if let Some((_, _, latency)) = &self.disabled {
            return Rc::clone(latency);
        }
        let key = self.key(name, Kind::Summary, help, labels);
        let mut series = self.series.borrow_mut();
        match series
            .entry(key)
            .or_insert_with(|| Instrument::Latency(Rc::default()))
        {
            Instrument::Latency(latency) => Rc::clone(latency),
            _ => unreachable!("kind checked by key()"),
        }
    }

    /// Copies every series out, for a scrape.
    pub fn snapshot(&self) -> Snapshot {
        if self.disabled.is_some() {
            return Snapshot::default();
        }
        let mut snapshot = Snapshot::default();
        for (name, (kind, help)) in self.help.borrow().iter() {
            snapshot.help.insert(name.clone(), (*kind, help.clone()));
        }
        for ((name, labels), instrument) in self.series.borrow().iter() {
            let value = match instrument {
                Instrument::Counter(c) => Value::Counter(c.get()),
                Instrument::Gauge(g) => Value::Gauge(g.get()),
                Instrument::Latency(l) => Value::Latency(Box::new(l.0.borrow().clone())),
            };
            snapshot
                .series
                .insert((name.clone(), labels.clone()), value);
        }
        snapshot
    }
}

/// One series' value in a snapshot.
#[derive(Debug, Clone)]
pub enum Value {
    /// A counter.
    Counter(u64),
    /// A gauge.
    Gauge(i64),
    /// A latency histogram (nanoseconds).
    Latency(Box<Histogram<u64>>),
}

/// Every series of one or more registries, at one moment. `Send`, so shards hand it over.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Kind and help text by metric name.
    pub help: BTreeMap<String, (Kind, String)>,
    /// Values by (name, labels).
    pub series: BTreeMap<(String, Labels), Value>,
}

impl Snapshot {
    /// Adds another snapshot: counters and gauges of the same series add, histograms merge.
    /// Shards label their series with `shard`, so usually series are disjoint.
    pub fn merge(&mut self, other: Snapshot) {
        for (name, help) in other.help {
            self.help.entry(name).or_insert(help);
        }
        for (key, value) in other.series {
            match (self.series.get_mut(&key), value) {
                (None, value) => {
                    self.series.insert(key, value);
                }
                (Some(Value::Counter(a)), Value::Counter(b)) => *a = a.wrapping_add(b),
                (Some(Value::Gauge(a)), Value::Gauge(b)) => *a = a.saturating_add(b),
                (Some(Value::Latency(a)), Value::Latency(b)) => {
                    // Same bounds everywhere: adding cannot fail.
                    let _ = a.add(&*b);
                }
                // Kinds are fixed per name by the registries; a mismatch keeps the first.
                (Some(_), _) => {}
            }
        }
    }

    /// The value of a counter or gauge, for tests and `/status`.
    pub fn scalar(&self, name: &str, labels: &[(&str, &str)]) -> Option<i128> {
        let key = (name.to_string(), sorted(labels));
        match self.series.get(&key)? {
            Value::Counter(c) => Some(i128::from(*c)),
            Value::Gauge(g) => Some(i128::from(*g)),
            Value::Latency(h) => Some(i128::from(h.len())),
        }
    }

    /// Renders the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        text::render(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgotten_series_leave_the_snapshot() {
        let registry = Registry::new(&[("shard", "0")]);
        registry
            .gauge("chunkserver_copyset_term", "Term.", &[("copyset", "5")])
            .set(3);
        registry
            .gauge("chunkserver_copyset_term", "Term.", &[("copyset", "6")])
            .set(4);
        registry
            .counter("chunkserver_requests_total", "Requests.", &[])
            .add(1);
        registry.forget("copyset", "5");
        let text = format!("{:?}", registry.snapshot());
        assert!(!text.contains("\"5\""), "{text}");
        assert!(text.contains("\"6\""), "{text}");
        assert!(text.contains("chunkserver_requests_total"), "{text}");
    }

    #[test]
    fn instruments_are_shared_by_name_and_labels() {
        let registry = Registry::new(&[("shard", "0")]);
        let a = registry.counter("requests_total", "Requests.", &[("op", "write")]);
        let b = registry.counter("requests_total", "Requests.", &[("op", "write")]);
        let c = registry.counter("requests_total", "Requests.", &[("op", "read")]);
        a.inc();
        b.add(2);
        c.inc();
        let snapshot = registry.snapshot();
        assert_eq!(
            snapshot.scalar("requests_total", &[("op", "write"), ("shard", "0")]),
            Some(3)
        );
        assert_eq!(
            snapshot.scalar("requests_total", &[("op", "read"), ("shard", "0")]),
            Some(1)
        );
    }

    #[test]
    fn snapshots_of_two_shards_merge() {
        let shard0 = Registry::new(&[]);
        let shard1 = Registry::new(&[]);
        shard0.counter("bytes_total", "Bytes.", &[]).add(10);
        shard1.counter("bytes_total", "Bytes.", &[]).add(5);
        shard0
            .latency("op_seconds", "Latency.", &[])
            .record(Duration::from_micros(100));
        shard1
            .latency("op_seconds", "Latency.", &[])
            .record(Duration::from_micros(300));
        let mut merged = shard0.snapshot();
        merged.merge(shard1.snapshot());
        assert_eq!(merged.scalar("bytes_total", &[]), Some(15));
        assert_eq!(merged.scalar("op_seconds", &[]), Some(2));
    }

    #[test]
    #[should_panic(expected = "two kinds")]
    fn one_name_cannot_be_two_kinds() {
        let registry = Registry::new(&[]);
        registry.counter("x", "", &[]);
        registry.gauge("x", "", &[]);
    }
}
