//! An [`EngineSnapshot`] in the Prometheus text exposition format (version 0.0.4), for a host
//! that serves `GET /metrics` (the CLI's `serve --metrics` does).
//!
//! Three levels, each metric family once with its samples together as the format requires:
//! `volstream_*` totals over every connection the engine has had (counters never go backwards
//! when connections end), `volstream_connection_*` per open connection (labels `conn`, `peer`,
//! `side`), and `volstream_stream_*` per open stream (labels `conn`, `stream`, `op`, `volume`,
//! `direction` = send or recv, `origin` = local or peer). Frame types and reasons are labelled
//! with their docs/PROTOCOL.md names.

use crate::event_loop::{ConnectionSnapshot, EngineSnapshot, StreamSnapshot};
use crate::proto::{ConnStats, Op, Side};
use std::fmt::{Display, Write};

/// The `Content-Type` of what [`prometheus`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest request head a scraper may send; a real one is a few hundred bytes.
pub const MAX_REQUEST: usize = 8 * 1024;

/// What the bytes a scraper sent so far ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The head has not ended yet: read more.
    Incomplete,
    /// `GET /metrics` (any query string ignored).
    Metrics,
    /// A GET for another path.
    NotFound,
    /// Another method, or a request line that is none.
    MethodNotAllowed,
    /// `MAX_REQUEST` bytes and no end of the head.
    TooLong,
}

/// Reads an HTTP/1.x request head (everything up to the blank line) from a peer's bytes. Only
/// the request line matters; headers are skipped unread.
pub fn request(head: &[u8]) -> Request {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if head.len() >= MAX_REQUEST {
            Request::TooLong
        } else {
            Request::Incomplete
        };
    };
    if end > MAX_REQUEST {
        return Request::TooLong;
    }
    let line = head[..end]
        .split(|&b| b == b'\r')
        .next()
        .unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next(), words.next());
    match (method, target) {
        (Some(b"GET"), Some(target)) => {
            let path = target.split(|&b| b == b'?').next().unwrap_or_default();
            if path == b"/metrics" {
                Request::Metrics
            } else {
                Request::NotFound
            }
        }
        _ => Request::MethodNotAllowed,
    }
}

/// The snapshot as Prometheus text.
pub fn prometheus(snapshot: &EngineSnapshot) -> String {
    let mut w = Writer(String::with_capacity(4096 + 2048 * stream_count(snapshot)));
    totals(&mut w, snapshot);
    connections(&mut w, &snapshot.connections);
    streams(&mut w, &snapshot.connections);
    w.0
}

fn stream_count(snapshot: &EngineSnapshot) -> usize {
    snapshot.connections.iter().map(|c| c.streams.len()).sum()
}

struct Writer(String);

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.0, "# HELP {name} ");
        escape(&mut self.0, help, false);
        let _ = writeln!(self.0, "\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                self.0.push_str(key);
                self.0.push_str("=\"");
                escape(&mut self.0, value, true);
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Label values escape backslash, double quote and line feed; HELP text only the first and
/// the last. A volume name is the peer's choice and may hold any of them.
fn escape(out: &mut String, value: &str, quote: bool) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' if quote => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The samples every counter set has, under `prefix` and with `labels` in front.
fn counters(w: &mut Writer, prefix: &str, scope: &str, items: &[(&[(&str, &str)], &ConnStats)]) {
    let name = format!("{prefix}bytes_total");
    w.family(
        &name,
        "counter",
        &format!("Bytes read (in) and written (out), {scope}."),
    );
    for (labels, s) in items {
        for (direction, value) in [("in", s.bytes_in), ("out", s.bytes_out)] {
            w.sample(&name, &with(labels, &[("direction", direction)]), value);
        }
    }
    let name = format!("{prefix}frames_total");
    w.family(
        &name,
        "counter",
        &format!("Frames received and sent, by type, {scope}."),
    );
    for (labels, s) in items {
        for (direction, frames) in [("in", &s.frames_in), ("out", &s.frames_out)] {
            for (kind, value) in frames.iter() {
                let extra = [("direction", direction), ("type", kind)];
                w.sample(&name, &with(labels, &extra), value);
            }
        }
    }
    let name = format!("{prefix}content_bytes_total");
    let help = format!("Logical content bytes received and sent as DATA or HOLE, {scope}.");
    w.family(&name, "counter", &help);
    for (labels, s) in items {
        for (direction, kind, value) in [
            ("in", "data", s.data_bytes_in),
            ("in", "hole", s.hole_bytes_in),
            ("out", "data", s.data_bytes_out),
            ("out", "hole", s.hole_bytes_out),
        ] {
            let extra = [("direction", direction), ("kind", kind)];
            w.sample(&name, &with(labels, &extra), value);
        }
    }
    let name = format!("{prefix}streams_completed_total");
    let help = format!("Streams completed, verified on both sides, {scope}.");
    w.family(&name, "counter", &help);
    for (labels, s) in items {
        w.sample(&name, labels, s.streams_completed);
    }
    let name = format!("{prefix}streams_aborted_total");
    let help = format!("Streams rejected or aborted, by reason, {scope}.");
    w.family(&name, "counter", &help);
    for (labels, s) in items {
        for (reason, value) in s.aborts.iter() {
            let reason = reason.and_then(|r| r.name()).unwrap_or("OTHER");
            w.sample(&name, &with(labels, &[("reason", reason)]), value);
        }
    }
    let name = format!("{prefix}credit_stalls_total");
    let help = format!("Times a stream had content queued but waited for credit, {scope}.");
    w.family(&name, "counter", &help);
    for (labels, s) in items {
        w.sample(&name, labels, s.credit_stalls);
    }
}

fn with<'a>(
    labels: &[(&'a str, &'a str)],
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    labels.iter().chain(extra).copied().collect()
}

fn totals(w: &mut Writer, snapshot: &EngineSnapshot) {
    w.family("volstream_connections", "gauge", "Connections open.");
    w.sample("volstream_connections", &[], snapshot.connections.len());
    let name = "volstream_connections_ended_total";
    let help = "Connections that have ended, by reason: GOING_AWAY when closed gracefully.";
    w.family(name, "counter", help);
    for (reason, value) in snapshot.ended_connections.iter() {
        let reason = reason.and_then(|r| r.name()).unwrap_or("OTHER");
        w.sample(name, &[("reason", reason)], value);
    }
    let totals = snapshot.totals();
    counters(w, "volstream_", "all connections", &[(&[], &totals)]);
}

fn side(side: Side) -> &'static str {
    match side {
        Side::Client => "client",
        Side::Server => "server",
    }
}

fn connections(w: &mut Writer, conns: &[ConnectionSnapshot]) {
    let ids: Vec<String> = conns.iter().map(|c| c.id.to_string()).collect();
    let labels: Vec<[(&str, &str); 3]> = conns
        .iter()
        .zip(&ids)
        .map(|(c, id)| {
            [
                ("conn", id.as_str()),
                ("peer", c.peer.as_str()),
                ("side", side(c.side)),
            ]
        })
        .collect();
    let items: Vec<(&[(&str, &str)], &ConnStats)> = labels
        .iter()
        .zip(conns)
        .map(|(l, c)| (&l[..], &c.stats))
        .collect();
    counters(w, "volstream_connection_", "per connection", &items);
    let table: [Gauge<ConnectionSnapshot>; 7] = [
        ("established", "1 once the handshake is done.", |c| {
            Some(c.established as u8 as f64)
        }),
        ("age_seconds", "Time since the connection was made.", |c| {
            Some(c.age.as_secs_f64())
        }),
        ("streams", "Streams open, both directions.", |c| {
            Some(c.streams.len() as f64)
        }),
        (
            "recv_window_in_use_bytes",
            "Credit-bearing bytes received and not yet consumed by sinks.",
            |c| Some(c.stats.recv_buffered as f64),
        ),
        (
            "send_window_in_use_bytes",
            "Connection credit spent and not yet granted back by the peer.",
            |c| Some(c.stats.send_window_in_use as f64),
        ),
        (
            "queued_bytes",
            "Bytes waiting to be sent: control frames, stream queues, transmit queue.",
            |c| Some((c.stats.send_queued + c.transmit_queued) as f64),
        ),
        (
            "rtt_seconds",
            "Round trip of the last PING answered.",
            |c| c.stats.rtt.map(|d| d.as_secs_f64()),
        ),
    ];
    let items: Vec<_> = conns.iter().zip(labels.iter().map(|l| &l[..])).collect();
    gauges(w, "volstream_connection_", &table, &items);
}

/// A gauge family: its name after the prefix, its help, and an item's value (`None`: the item
/// has no sample).
type Gauge<T> = (&'static str, &'static str, fn(&T) -> Option<f64>);

/// Every family of `table`, with a sample for each item that has a value.
fn gauges<T>(w: &mut Writer, prefix: &str, table: &[Gauge<T>], items: &[(&T, &[(&str, &str)])]) {
    for (suffix, help, value) in table {
        let name = format!("{prefix}{suffix}");
        w.family(&name, "gauge", help);
        for (item, labels) in items {
            if let Some(v) = value(item) {
                w.sample(&name, labels, v);
            }
        }
    }
}

fn op(op: Op) -> &'static str {
    match op {
        Op::Read => "READ",
        Op::Write => "WRITE",
        Op::List => "LIST",
        Op::Extents => "EXTENTS",
        Op::Digests => "DIGESTS",
    }
}

fn streams(w: &mut Writer, conns: &[ConnectionSnapshot]) {
    let mut all: Vec<(String, String, &StreamSnapshot)> = Vec::new();
    for c in conns {
        for s in &c.streams {
            all.push((c.id.to_string(), s.view.id.0.to_string(), s));
        }
    }
    let labels: Vec<[(&str, &str); 6]> = all
        .iter()
        .map(|(conn, id, s)| {
            [
                ("conn", conn.as_str()),
                ("stream", id.as_str()),
                ("op", op(s.view.op)),
                ("volume", s.name.as_str()),
                ("direction", if s.view.sending { "send" } else { "recv" }),
                ("origin", if s.local { "local" } else { "peer" }),
            ]
        })
        .collect();
    type Value = fn(&StreamSnapshot) -> Option<f64>;
    type Kinds<'k> = &'k [(&'k str, Value)];
    let counters: [(&str, &str, Kinds); 4] = [
        (
            "content_bytes_total",
            "Logical content bytes moved, as DATA or as HOLE.",
            &[
                ("data", |s| Some(s.view.stats.data_bytes as f64)),
                ("hole", |s| Some(s.view.stats.hole_bytes as f64)),
            ],
        ),
        (
            "frames_total",
            "DATA and HOLE frames moved.",
            &[
                ("data", |s| Some(s.view.stats.data_frames as f64)),
                ("hole", |s| Some(s.view.stats.hole_frames as f64)),
            ],
        ),
        (
            "wire_bytes_total",
            "Frame bytes moved, headers included.",
            &[("", |s| Some(s.view.stats.wire_bytes as f64))],
        ),
        (
            "credit_stalls_total",
            "Times the stream had content queued but waited for credit.",
            &[("", |s| Some(s.view.stats.credit_stalls as f64))],
        ),
    ];
    for (suffix, help, kinds) in counters {
        let name = format!("volstream_stream_{suffix}");
        w.family(&name, "counter", help);
        for (kind, value) in kinds {
            for (s, l) in all.iter().zip(&labels) {
                let Some(v) = value(s.2) else { continue };
                if kind.is_empty() {
                    w.sample(&name, l, v);
                } else {
                    w.sample(&name, &with(l, &[("kind", kind)]), v);
                }
            }
        }
    }
    let table: [Gauge<StreamSnapshot>; 6] = [
        (
            "size_bytes",
            "The content's logical length (0 until known).",
            |s| Some(s.view.size as f64),
        ),
        (
            "window_in_use_bytes",
            "Sending: credit spent, not yet granted back. Receiving: received, not yet consumed.",
            |s| Some(s.view.window_in_use as f64),
        ),
        (
            "queued_chunks",
            "Sending: chunks waiting to go out. Receiving: chunks at the sink, unfinished.",
            |s| Some(s.view.queued_chunks as f64),
        ),
        (
            "queued_bytes",
            "Sending: payload bytes waiting to go out. Receiving: credit held at the sink.",
            |s| Some(s.view.queued_bytes as f64),
        ),
        ("age_seconds", "Time since the stream started.", |s| {
            Some(s.age.as_secs_f64())
        }),
        (
            "first_byte_seconds",
            "Time from the start until the first content moved through the stream.",
            |s| s.first_byte.map(|d| d.as_secs_f64()),
        ),
    ];
    let items: Vec<_> = all
        .iter()
        .map(|s| s.2)
        .zip(labels.iter().map(|l| &l[..]))
        .collect();
    gauges(w, "volstream_stream_", &table, &items);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut w = Writer(String::new());
        w.sample("m", &[("volume", "a\"b\\c\nd")], 1);
        assert_eq!(w.0, "m{volume=\"a\\\"b\\\\c\\nd\"} 1\n");
        let mut w = Writer(String::new());
        w.family("m", "gauge", "a \"b\" c\\d\ne");
        assert_eq!(w.0, "# HELP m a \"b\" c\\\\d\\ne\n# TYPE m gauge\n");
    }

    #[test]
    fn requests_are_read_from_their_line_once_the_head_ends() {
        let get = |line: &str| request(format!("{line}\r\nHost: x\r\n\r\n").as_bytes());
        assert_eq!(get("GET /metrics HTTP/1.1"), Request::Metrics);
        assert_eq!(get("GET /metrics?x=1 HTTP/1.0"), Request::Metrics);
        assert_eq!(get("GET / HTTP/1.1"), Request::NotFound);
        assert_eq!(get("GET /metricsx HTTP/1.1"), Request::NotFound);
        assert_eq!(get("POST /metrics HTTP/1.1"), Request::MethodNotAllowed);
        assert_eq!(get("GET"), Request::MethodNotAllowed);
        assert_eq!(get(""), Request::MethodNotAllowed);
        assert_eq!(request(b"GET /metrics HTTP/1.1\r\n"), Request::Incomplete);
        assert_eq!(request(&[b'a'; MAX_REQUEST]), Request::TooLong);
        let mut long = vec![b'a'; MAX_REQUEST + 1];
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(request(&long), Request::TooLong);
    }

    #[test]
    fn an_idle_engine_has_every_total_and_no_connection_samples() {
        let text = prometheus(&EngineSnapshot::default());
        assert!(text.contains("volstream_connections 0\n"));
        assert!(text.contains("volstream_frames_total{direction=\"out\",type=\"GOAWAY\"} 0\n"));
        assert!(text.contains("volstream_streams_aborted_total{reason=\"NOT_FOUND\"} 0\n"));
        assert!(!text.contains("volstream_connection_bytes_total{"));
        // Every family is declared once.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut unique = types.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(types.len(), unique.len());
    }
}
