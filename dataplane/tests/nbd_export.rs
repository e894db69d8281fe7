//! The NBD export against the tools people use: qemu-io, qemu-img and fio's nbd engine, plus a
//! hand-written client for what those tools never send (bad magic, unknown exports, ranges past
//! the end). Every server listens on 127.0.0.1 and stops when the test raises its shutdown.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use common::{run, tool};
use dataplane::nbd::protocol::{self, command, errno, option, reply};
use dataplane::nbd::{bind, serve, Exports, MemExport, NbdConfig};
use dataplane::shard::ShutdownSignal;
use glommio::{LocalExecutorBuilder, Placement};

struct Server {
    addr: SocketAddr,
    shutdown: ShutdownSignal,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

impl Server {
    /// Exports `vol` (64 MiB) and `ro` (1 MiB, read-only).
    fn start() -> Server {
        let shutdown = ShutdownSignal::new();
        let (tx, rx) = mpsc::channel();
        let stop = shutdown.clone();
        let thread = LocalExecutorBuilder::new(Placement::Unbound)
            .name("nbd-test")
            .spawn(move || async move {
                let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let mut exports = Exports::new();
                exports.insert("vol", Rc::new(MemExport::new(64 << 20, false)));
                exports.insert("ro", Rc::new(MemExport::new(1 << 20, true)));
                serve(listener, Rc::new(exports), NbdConfig::default(), stop)
                    .await
                    .unwrap();
            })
            .unwrap();
        let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Server {
            addr,
            shutdown,
            thread: Some(thread),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.raise();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn qemu_io_writes_and_reads_back_patterns() {
    if !tool("qemu-io") {
        return;
    }
    let server = Server::start();
    let uri = server.uri("vol");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1M 4k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "flush",
            "-c",
            "write -f -P 0x11 5M 4k",
        ],
    );
    assert!(out.contains("wrote 1048576/1048576"), "{out}");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 4k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "read -P 0x11 5M 4k",
            "-c",
            "read -P 0 63M 1M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(out.contains("read 1048576/1048576"), "{out}");
}

#[test]
fn qemu_img_sees_the_size_and_converts_an_image_through_the_export() {
    if !tool("qemu-img") {
        return;
    }
    let server = Server::start();
    let info = run("qemu-img", &["info", "-f", "raw", &server.uri("vol")]);
    assert!(
        info.contains("64 MiB") || info.contains("67108864"),
        "{info}"
    );

    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.raw");
    let mut data = vec![0u8; 4 << 20];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (i / 4096) as u8 ^ (i % 251) as u8;
    }
    std::fs::write(&source, &data).unwrap();
    let source = source.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            source,
            &server.uri("vol"),
        ],
    );
    let compared = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            source,
            &server.uri("vol"),
        ],
    );
    // The export is bigger than the image; compare checks that the rest reads as zeroes.
    assert!(compared.contains("Images are identical"), "{compared}");
    let bench = run(
        "qemu-img",
        &[
            "bench",
            "-f",
            "raw",
            "-c",
            "2000",
            "-d",
            "8",
            "-w",
            "-s",
            "4k",
            &server.uri("vol"),
        ],
    );
    assert!(bench.contains("Run completed"), "{bench}");
}

#[test]
fn fio_nbd_engine_verifies_what_it_wrote() {
    if !tool("fio") {
        return;
    }
    let server = Server::start();
    let out = run(
        "fio",
        &[
            "--name=nbd",
            "--ioengine=nbd",
            &format!("--uri={}", server.uri("vol")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8m",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--randrepeat=1",
        ],
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "{out}");
}

/// A minimal client for the cases real tools never produce.
struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    fn connect(addr: SocketAddr) -> RawClient {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        stream
            .write_all(
                &(protocol::CLIENT_FLAG_FIXED_NEWSTYLE | protocol::CLIENT_FLAG_NO_ZEROES)
                    .to_be_bytes(),
            )
            .unwrap();
        RawClient { stream }
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        out.extend_from_slice(&protocol::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.stream.write_all(&out).unwrap();
    }

    /// Reads one option reply: (type, data).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header).unwrap();
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).unwrap();
        (kind, data)
    }

    fn go(&mut self, name: &str) -> Result<u64, u32> {
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(option::GO, &data);
        let mut size = 0;
        loop {
            let (kind, data) = self.option_reply();
            match kind {
                reply::INFO => size = u64::from_be_bytes(data[2..10].try_into().unwrap()),
                reply::ACK => return Ok(size),
                error => return Err(error),
            }
        }
    }

    /// Sends a request and reads its simple reply: (error, data read).
    fn request(&mut self, command: u16, offset: u64, len: u32, data: &[u8]) -> (u32, Vec<u8>) {
        let request = protocol::Request {
            flags: 0,
            command,
            handle: 42,
            offset,
            len,
        };
        self.stream
            .write_all(&protocol::encode_request(&request))
            .unwrap();
        self.stream.write_all(data).unwrap();
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply).unwrap();
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 42);
        let mut payload = vec![
            0u8;
            if error == 0 && command == command::READ {
                len as usize
            } else {
                0
            }
        ];
        self.stream.read_exact(&mut payload).unwrap();
        (error, payload)
    }

    fn is_closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }
}

#[test]
fn an_unknown_export_is_refused_and_the_client_may_try_another() {
    let server = Server::start();
    let mut client = RawClient::connect(server.addr);
    assert_eq!(client.go("nope"), Err(reply::ERR_UNKNOWN));
    client.send_option(99, &[]);
    assert_eq!(client.option_reply().0, reply::ERR_UNSUP);
    assert_eq!(client.go("vol"), Ok(64 << 20));
}

#[test]
fn requests_past_the_end_or_writes_to_a_read_only_export_get_errors_and_change_nothing() {
    let server = Server::start();
    let mut client = RawClient::connect(server.addr);
    assert_eq!(client.go("ro"), Ok(1 << 20));
    assert_eq!(
        client.request(command::READ, (1 << 20) - 512, 1024, &[]).0,
        errno::EINVAL
    );
    assert_eq!(
        client.request(command::WRITE, 0, 4, &[1, 2, 3, 4]).0,
        errno::EPERM
    );
    let (error, data) = client.request(command::READ, 0, 4, &[]);
    assert_eq!((error, data), (0, vec![0, 0, 0, 0]));
    assert_eq!(
        client.request(command::READ, u64::MAX - 1, 4, &[]).0,
        errno::EINVAL
    );
}

#[test]
fn a_bad_request_magic_closes_only_that_connection() {
    let server = Server::start();
    let mut bad = RawClient::connect(server.addr);
    assert!(bad.go("vol").is_ok());
    bad.stream
        .write_all(&[0xffu8; protocol::REQUEST_LEN])
        .unwrap();
    assert!(bad.is_closed_by_server());

    let mut good = RawClient::connect(server.addr);
    assert!(good.go("vol").is_ok());
    assert_eq!(good.request(command::WRITE, 4096, 4, b"abcd").0, 0);
    assert_eq!(
        good.request(command::READ, 4096, 4, &[]),
        (0, b"abcd".to_vec())
    );
}

#[test]
fn a_client_without_fixed_newstyle_is_cut_off() {
    let server = Server::start();
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    stream.write_all(&0u32.to_be_bytes()).unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(stream.read(&mut byte), Ok(0) | Err(_)));
}
