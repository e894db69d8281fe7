//! The metrics endpoint: a deliberately small HTTP/1.1 server on the shard's executor that
//! answers `GET /metrics` (Prometheus text) and `GET /status` (JSON), one request per
//! connection; with fault injection on, also `POST /fault?…`. Requests are bounded in size and
//! time; anything else gets 400, 404 or 405.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::shard::ShutdownSignal;

/// A page's body, produced on demand (a scrape gathers snapshots from every shard).
pub type Page = Pin<Box<dyn Future<Output = String>>>;

/// What the endpoint serves.
pub struct Pages {
    /// `GET /metrics`: the Prometheus text.
    pub metrics: Box<dyn Fn() -> Page>,
    /// `GET /status`: a JSON document.
    pub status: Box<dyn Fn() -> Page>,
    /// `POST /fault?QUERY`, only with fault injection on: arms a fault, given the query.
    pub fault: Option<FaultControl>,
    /// With `[auth]`: the bearer tokens a request must carry (`Authorization: Bearer HEX`);
    /// none, nothing is asked.
    pub tokens: Option<Tokens>,
}

/// The bearer tokens of an authenticating endpoint: role keys as hex (`net::handshake`).
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Accepted for `GET` (the client or the admin key).
    pub read: Vec<String>,
    /// Required for `POST /fault` (the admin key).
    pub admin: String,
}

impl Tokens {
    /// Whether `head` carries a token that allows the request (`admin`: the admin's).
    fn allow(&self, head: &str, admin: bool) -> bool {
        let Some(token) = bearer(head) else {
            return false;
        };
        let matches = |wanted: &str| {
            wanted.len() == token.len()
                && wanted
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        };
        if admin {
            matches(&self.admin)
        } else {
            self.read.iter().any(|t| matches(t))
        }
    }
}

/// The token of the request head's `Authorization: Bearer` header.
fn bearer(head: &str) -> Option<&str> {
    head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let value = value.trim();
        value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
    })
}

/// Arms a fault given the query of `POST /fault?QUERY`.
pub type FaultControl = Box<dyn Fn(&str) -> FaultAnswer>;

/// What `POST /fault` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultAnswer {
    /// Whether the query was understood and the fault armed.
    pub ok: bool,
    /// The text of the answer.
    pub text: String,
    /// End the process with this status once the answer is sent (a power cut).
    pub exit: Option<i32>,
}

/// The longest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the endpoint's listener.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    crate::listen::listen(addr)
}

/// Serves until `shutdown` is raised.
pub async fn serve(listener: TcpListener, pages: Rc<Pages>, shutdown: ShutdownSignal) {
    crate::listen::accept_until(&listener, shutdown, |accepted| match accepted {
        Ok(stream) => {
            let pages = Rc::clone(&pages);
            glommio::spawn_local(async move {
                if let Err(error) = answer(stream, &pages).await {
                    tracing::debug!(%error, "metrics endpoint: request failed");
                }
            })
            .detach();
        }
        Err(error) => tracing::warn!(%error, "metrics endpoint: accept failed"),
    })
    .await;
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST {
            return Ok(None);
        }
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "request cut short",
            ));
        }
        head.extend_from_slice(&buffer[..n]);
    }
    Ok(Some(head))
}

async fn answer(mut stream: TcpStream, pages: &Pages) -> io::Result<()> {
    let head = futures_lite::future::or(read_head(&mut stream), async {
        glommio::timer::sleep(REQUEST_TIMEOUT).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request not received in time",
        ))
    })
    .await?;
    let mut exit = None;
    let (status, content_type, body) = match head {
        None => (
            "400 Bad Request",
            "text/plain",
            "request too large\n".to_string(),
        ),
        Some(head) => {
            let text = String::from_utf8_lossy(&head);
            let mut words = text.lines().next().unwrap_or("").split(' ');
            let (method, target) = (words.next(), words.next());
            let refused = pages
                .tokens
                .as_ref()
                .filter(|tokens| !tokens.allow(&text, method == Some("POST")));
            if refused.is_some() {
                let body = "this endpoint asks for `Authorization: Bearer KEY`: the client key \
                            (GET) or the admin key (POST), from `chunkctl auth derive-key`\n";
                return send(stream, "401 Unauthorized", "text/plain", body.into(), None).await;
            }
            match (method, target) {
                (Some("GET"), Some("/metrics")) => (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    (pages.metrics)().await,
                ),
                (Some("GET"), Some("/status")) => {
                    ("200 OK", "application/json", (pages.status)().await)
                }
                (Some("POST"), Some(target)) if target.split('?').next() == Some("/fault") => {
                    match &pages.fault {
                        None => (
                            "404 Not Found",
                            "text/plain",
                            "fault injection is off ([fault] injection = true turns it on)\n"
                                .into(),
                        ),
                        Some(fault) => {
                            let answer = fault(target.split_once('?').map_or("", |(_, q)| q));
                            exit = answer.exit;
                            let status = if answer.ok {
                                "200 OK"
                            } else {
                                "400 Bad Request"
                            };
                            (status, "text/plain", answer.text + "\n")
                        }
                    }
                }
                (Some("GET"), Some(_)) => (
                    "404 Not Found",
                    "text/plain",
                    "try /metrics or /status\n".into(),
                ),
                (Some(_), Some(_)) => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
                _ => (
                    "400 Bad Request",
                    "text/plain",
                    "malformed request line\n".into(),
                ),
            }
        }
    };
    send(stream, status, content_type, body, exit).await
}

/// Sends the response and closes; ends the process after it when `exit` says so.
async fn send(
    mut stream: TcpStream,
    status: &str,
    content_type: &str,
    body: String,
    exit: Option<i32>,
) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await?;
    let closed = stream.close().await;
    if let Some(code) = exit {
        tracing::error!(code, "ending the process as fault injection asked");
        std::process::exit(code);
    }
    closed
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::mpsc;

    use glommio::{LocalExecutorBuilder, Placement};

    use super::*;
    use crate::metrics::{text, Registry};

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    /// Serves the pages `make` builds (on the endpoint's executor) on a fresh port: the address,
    /// the signal that stops it, and its thread.
    fn start(
        make: impl FnOnce() -> Pages + Send + 'static,
    ) -> (SocketAddr, ShutdownSignal, glommio::ExecutorJoinHandle<()>) {
        let shutdown = ShutdownSignal::new();
        let stop = shutdown.clone();
        let (tx, rx) = mpsc::channel();
        let server = LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || async move {
                let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                serve(listener, Rc::new(make()), stop).await;
            })
            .unwrap();
        let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        (addr, shutdown, server)
    }

    #[test]
    fn the_endpoint_serves_parseable_metrics_and_refuses_the_rest() {
        let (addr, shutdown, server) = start(|| {
            let registry = Rc::new(Registry::new(&[("shard", "0")]));
            let scrapes = registry.counter("scrapes_total", "Scrapes served.", &[]);
            Pages {
                metrics: Box::new(move || {
                    scrapes.inc();
                    let text = registry.snapshot().render();
                    Box::pin(async move { text })
                }),
                status: Box::new(|| Box::pin(async { "{\"healthy\":true}".to_string() })),
                fault: None,
                tokens: None,
            }
        });

        let first = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let second = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
        let body = second.split("\r\n\r\n").nth(1).unwrap();
        let samples = text::parse(body).unwrap();
        let scrapes = samples.iter().find(|s| s.name == "scrapes_total").unwrap();
        assert_eq!(scrapes.value, 2.0, "the counter moved between scrapes");

        let status = get(addr, "GET /status HTTP/1.1\r\n\r\n");
        assert!(status.contains("application/json") && status.ends_with("{\"healthy\":true}"));
        assert!(get(addr, "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
        assert!(get(addr, &huge).starts_with("HTTP/1.1 400"));

        shutdown.raise();
        server.join().unwrap();
    }

    #[test]
    fn with_tokens_a_request_without_the_right_one_is_refused() {
        let (addr, shutdown, server) = start(|| Pages {
            metrics: Box::new(|| Box::pin(async { "m 1\n".to_string() })),
            status: Box::new(|| Box::pin(async { "{}".to_string() })),
            fault: Some(Box::new(|_| FaultAnswer {
                ok: true,
                text: "armed".into(),
                exit: None,
            })),
            tokens: Some(Tokens {
                read: vec!["c1".into(), "a1".into()],
                admin: "a1".into(),
            }),
        });
        let with = |request: &str, token: &str| {
            get(
                addr,
                &format!("{request} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n"),
            )
        };
        assert!(get(addr, "GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 401"));
        assert!(with("GET /metrics", "zz").starts_with("HTTP/1.1 401"));
        assert!(with("GET /metrics", "c1").starts_with("HTTP/1.1 200"));
        assert!(with("GET /status", "a1").starts_with("HTTP/1.1 200"));
        assert!(with("POST /fault?x", "c1").starts_with("HTTP/1.1 401"));
        assert!(with("POST /fault?x", "a1").starts_with("HTTP/1.1 200"));
        shutdown.raise();
        server.join().unwrap();
    }
}
