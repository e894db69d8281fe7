//! netbench: round-trip latency (p50/p99) and pipelined throughput of the message transports
//! on loopback, for 64 B, 4 KiB and 128 KiB messages, every transport in the same run and
//! printed side by side. TCP is the baseline the RDMA transports are read against.
//!
//! The server runs on its own executor thread, the client on another; every request is a
//! PING whose payload the server echoes. Bounded: a fixed number of round trips per size for
//! latency and a fixed time per size for throughput.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use dataplane::config::{Endpoint, Transport};
use dataplane::net::{connect, Connection, Listener, Message, NetContext, Opcode};
use hdrhistogram::Histogram;

/// Transport benchmark: latency and throughput over loopback, side by side.
#[derive(Parser, Debug, Clone)]
#[command(name = "netbench")]
struct Args {
    /// Transports to compare, comma separated: tcp, softrdma, rdma (rdma needs --features rdma
    /// and a device).
    #[arg(long, default_value = "tcp,softrdma")]
    transports: String,
    /// Round trips per size for the latency figures.
    #[arg(long, default_value_t = 2000)]
    round_trips: u32,
    /// Seconds per size for the throughput figures.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Requests in flight for the throughput figures.
    #[arg(long, default_value_t = 16)]
    depth: u32,
    /// IP address to listen on (the RDMA device's address for rdma).
    #[arg(long, default_value = "127.0.0.1")]
    ip: std::net::IpAddr,
}

const SIZES: [usize; 3] = [64, 4096, 128 * 1024];

#[derive(Debug, Clone, Copy)]
struct Figures {
    p50_us: f64,
    p99_us: f64,
    round_trips_per_s: f64,
    mib_per_s: f64,
}

fn parse_transport(name: &str) -> Result<Transport, String> {
    match name.trim() {
        "tcp" => Ok(Transport::Tcp),
        "softrdma" => Ok(Transport::SoftRdma),
        "rdma" => Ok(Transport::Rdma),
        other => Err(format!("unknown transport `{other}` (tcp, softrdma, rdma)")),
    }
}

fn context() -> NetContext {
    let mut context = NetContext::default();
    context.connection.max_payload = 1 << 20;
    context.rdma.landing_slot_size = 1 << 20;
    context.rdma.landing_slots = 8;
    context
}

/// Starts the echo servers on their own executor thread; returns their endpoints.
fn start_servers(transports: &[Transport], ip: std::net::IpAddr) -> Result<Vec<Endpoint>, String> {
    let (sender, receiver) = mpsc::channel();
    let transports = transports.to_vec();
    glommio::LocalExecutorBuilder::default()
        .name("netbench-server")
        .spawn(move || async move {
            let context = context();
            let mut endpoints = Vec::new();
            for transport in transports {
                let endpoint = Endpoint {
                    transport,
                    addr: SocketAddr::new(ip, 0),
                };
                let listener = match Listener::bind(&endpoint, &context).await {
                    Ok(listener) => listener,
                    Err(error) => {
                        let _ = sender.send(Err(format!("{endpoint}: {error}")));
                        return;
                    }
                };
                match listener.local_endpoint() {
                    Ok(endpoint) => endpoints.push(endpoint),
                    Err(error) => {
                        let _ = sender.send(Err(error.to_string()));
                        return;
                    }
                }
                glommio::spawn_local(async move {
                    while let Ok(connection) = listener.accept().await {
                        glommio::spawn_local(serve(connection)).detach();
                    }
                })
                .detach();
            }
            let _ = sender.send(Ok(endpoints));
            // Serve until the process exits.
            futures_lite::future::pending::<()>().await;
        })
        .map_err(|e| format!("start the server executor: {e}"))?;
    receiver.recv().map_err(|e| format!("server thread: {e}"))?
}

async fn serve(connection: Connection) {
    while let Some(incoming) = connection.next_incoming().await {
        let echo = incoming.message.clone();
        let _ = incoming.respond(echo).await;
    }
}

async fn measure(endpoint: Endpoint, size: usize, args: &Args) -> Result<Figures, String> {
    let context = context();
    let connection = connect(&endpoint, &context)
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let payload = Bytes::from(vec![0x5Au8; size]);
    let request = || Message::new(Opcode::PING, 0, payload.clone());
    // Warm-up: connection buffers, allocator, caches.
    for _ in 0..50 {
        connection
            .call(request())
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let round_trips = if size >= 65536 {
        args.round_trips / 4
    } else {
        args.round_trips
    };
    for _ in 0..round_trips.max(1) {
        let start = Instant::now();
        connection
            .call(request())
            .await
            .map_err(|e| e.to_string())?;
        let _ = histogram.record(start.elapsed().as_nanos().max(1) as u64);
    }
    // Throughput: `depth` callers, each with one request in flight, for a fixed time.
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let completed = Rc::new(std::cell::Cell::new(0u64));
    let start = Instant::now();
    let callers: Vec<_> = (0..args.depth.max(1))
        .map(|_| {
            let connection = connection.clone();
            let payload = payload.clone();
            let completed = Rc::clone(&completed);
            glommio::spawn_local(async move {
                while Instant::now() < deadline {
                    let message = Message::new(Opcode::PING, 0, payload.clone());
                    if connection.call(message).await.is_err() {
                        return false;
                    }
                    completed.set(completed.get() + 1);
                }
                true
            })
        })
        .collect();
    for caller in callers {
        if !caller.await {
            return Err(format!("{endpoint}: a throughput call failed"));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let round_trips_per_s = completed.get() as f64 / elapsed;
    Ok(Figures {
        p50_us: histogram.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        round_trips_per_s,
        mib_per_s: round_trips_per_s * size as f64 / (1024.0 * 1024.0),
    })
}

fn main() {
    let args = Args::parse();
    let transports: Result<Vec<Transport>, String> =
        args.transports.split(',').map(parse_transport).collect();
    let transports = match transports {
        Ok(transports) if !transports.is_empty() => transports,
        Ok(_) => {
            eprintln!("netbench: no transport given");
            std::process::exit(2);
        }
        Err(error) => {
            eprintln!("netbench: {error}");
            std::process::exit(2);
        }
    };
    let endpoints = match start_servers(&transports, args.ip) {
        Ok(endpoints) => endpoints,
        Err(error) => {
            eprintln!("netbench: {error}");
            std::process::exit(1);
        }
    };
    let client_args = args.clone();
    let client = glommio::LocalExecutorBuilder::default()
        .name("netbench-client")
        .spawn(move || async move {
            let mut rows = Vec::new();
            for size in SIZES {
                let mut row = Vec::new();
                for endpoint in &endpoints {
                    row.push(measure(*endpoint, size, &client_args).await);
                }
                rows.push((size, row));
            }
            rows
        });
    let rows = match client.map(|handle| handle.join()) {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => {
            eprintln!("netbench: client executor failed: {error}");
            std::process::exit(1);
        }
        Err(error) => {
            eprintln!("netbench: start the client executor: {error}");
            std::process::exit(1);
        }
    };
    println!(
        "netbench: loopback echo, {} round trips per size for latency, {} s and depth {} for \
         throughput (MiB/s of request payload; the echo carries as much back)",
        args.round_trips, args.seconds, args.depth
    );
    print!("{:>8}", "size");
    for transport in &transports {
        let name = transport.scheme();
        print!(
            " | {:>9} {:>9} {:>9} {:>9}",
            format!("{name} p50"),
            "p99 µs",
            "rt/s",
            "MiB/s"
        );
    }
    println!();
    let mut failed = false;
    for (size, row) in &rows {
        print!("{:>8}", human(*size));
        for figures in row {
            match figures {
                Ok(f) => print!(
                    " | {:>9.1} {:>9.1} {:>9.0} {:>9.1}",
                    f.p50_us, f.p99_us, f.round_trips_per_s, f.mib_per_s
                ),
                Err(error) => {
                    failed = true;
                    print!(" | failed: {error}");
                }
            }
        }
        println!();
    }
    // Each RDMA transport beside the TCP baseline of the same run.
    if let Some(tcp) = transports.iter().position(|t| *t == Transport::Tcp) {
        for (index, transport) in transports.iter().enumerate() {
            if index == tcp {
                continue;
            }
            for (size, row) in &rows {
                if let (Some(Ok(base)), Some(Ok(other))) = (row.get(tcp), row.get(index)) {
                    println!(
                        "{} vs tcp at {:>6}: p50 latency {:.2}x, throughput {:.2}x",
                        transport.scheme(),
                        human(*size),
                        other.p50_us / base.p50_us,
                        other.round_trips_per_s / base.round_trips_per_s
                    );
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

fn human(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}
