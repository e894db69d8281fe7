//! Request-path tracing: with `log.trace_every = N`, one service request in N gets a
//! `request` span whose events follow it through the shard — received, proposed, applied,
//! replied — and the others get none.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::{block, config, free_ports, with_client, Node};
use dataplane::ids::{ChunkId, CopysetId};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

/// Per traced request (its `trace` field), the messages of its events in order.
type Traces = Arc<Mutex<BTreeMap<u64, Vec<String>>>>;

struct Recorder(Traces);

#[derive(Default)]
struct Fields {
    trace: Option<u64>,
    message: Option<String>,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "trace" {
            self.trace = Some(value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = Some(format!("{value:?}"));
        }
    }
}

struct TraceId(u64);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "request" {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(trace), Some(span)) = (fields.trace, ctx.span(id)) {
            span.extensions_mut().insert(TraceId(trace));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let Some(trace) = span.extensions().get::<TraceId>().map(|t| t.0) else {
            return;
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let (Some(message), Ok(mut traces)) = (fields.message, self.0.lock()) {
            traces.entry(trace).or_default().push(message);
        }
    }
}

#[test]
fn one_request_in_n_is_followed_through_the_request_path() {
    let traces: Traces = Arc::default();
    tracing_subscriber::registry()
        .with(Recorder(Arc::clone(&traces)))
        .init();
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut config = config(id, &ports, dir.path(), "mem");
            config.log.trace_every = 4;
            Node::start(config)
        })
        .collect();
    const WRITES: u64 = 40;
    with_client(&ports, |client| {
        Box::pin(async move {
            let copyset = CopysetId(3);
            client
                .create_copyset(copyset, &[1, 2, 3])
                .await
                .expect("create copyset");
            for i in 0..WRITES {
                client
                    .write(copyset, ChunkId(1), i as u32 * 4096, block(i), 1)
                    .await
                    .expect("write");
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
    let traces = traces.lock().expect("traces").clone();
    let writes: Vec<&Vec<String>> = traces
        .values()
        .filter(|events| events.iter().any(|e| e == "applied"))
        .collect();
    // About one write in four on the leader (redirected attempts and copyset creation are
    // requests too, and other nodes count their own).
    assert!(
        writes.len() >= (WRITES / 4 - 2) as usize && writes.len() <= (WRITES / 4 + 2) as usize,
        "traced writes: {} of {WRITES}: {traces:?}",
        writes.len()
    );
    for events in writes {
        assert_eq!(
            events,
            &vec![
                "received".to_string(),
                "proposed".to_string(),
                "applied".to_string(),
                "replied".to_string()
            ]
        );
    }
    assert!(
        traces
            .values()
            .all(|events| events.first().map(String::as_str) == Some("received")),
        "{traces:?}"
    );
}
