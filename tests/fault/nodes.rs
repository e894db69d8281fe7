//! The three `chunkserver run` processes: started (inside their namespaces when there are
//! namespaces, and inside a time namespace when their clock is shifted), killed with SIGKILL,
//! paused with SIGSTOP and resumed, sent disk faults through `POST /fault`, watched for exits
//! nobody asked for, and killed on drop, also when the test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

fn signal(pid: u32, name: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .map_err(|e| format!("cannot run kill: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{name} {pid} failed: {status}"))
    }
}

pub struct Nodes {
    configs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    /// Command prefix per node (`ip netns exec NAME`), empty on loopback.
    prefixes: Vec<Vec<String>>,
    children: Vec<Option<Child>>,
    /// Invariant: `paused[i]` only while `children[i]` is Some.
    paused: Vec<bool>,
    /// Exits nobody caused: (node index, status).
    pub unexpected_exits: Vec<(usize, ExitStatus)>,
    /// Metrics endpoint (`host:port`) per node, where disk faults are armed; empty: none.
    control: Vec<String>,
    /// The exit status a node is expected to end with because of a fault armed on it (3: its
    /// device failed, 4: its power was cut); such a node stays down until restarted.
    expected_exit: Vec<Option<i32>>,
    /// Exits a fault caused: (node index, status code).
    pub fault_exits: Vec<(usize, i32)>,
    /// Offset in seconds of each node's monotonic and boot clocks (a time namespace).
    clock_shift: Vec<i64>,
}

/// Sends `POST target` to the HTTP server at `address` (`host:port`); the body on 200.
pub fn post(address: &str, target: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::time::Duration;
    let socket: std::net::SocketAddr = address
        .parse()
        .map_err(|e| format!("bad address {address}: {e}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(2))
        .map_err(|e| format!("connect to {address}: {e}"))?;
    let timeout = Some(Duration::from_secs(5));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| format!("socket options: {e}"))?;
    write!(
        stream,
        "POST {target} HTTP/1.1\r\nHost: fault\r\nContent-Length: 0\r\n\r\n"
    )
    .map_err(|e| format!("send to {address}: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("answer from {address}: {e}"))?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    if response.starts_with("HTTP/1.1 200") {
        Ok(body.trim().to_string())
    } else {
        Err(format!(
            "{target}: {}",
            response.lines().next().unwrap_or("no answer")
        ))
    }
}

impl Nodes {
    pub fn start(configs: Vec<PathBuf>, dir: &Path, prefixes: Vec<Vec<String>>) -> Nodes {
        let count = configs.len();
        let mut nodes = Nodes {
            logs: (1..=count)
                .map(|n| dir.join(format!("node{n}.log")))
                .collect(),
            configs,
            prefixes,
            children: (0..count).map(|_| None).collect(),
            paused: vec![false; count],
            unexpected_exits: Vec::new(),
            control: Vec::new(),
            expected_exit: vec![None; count],
            fault_exits: Vec::new(),
            clock_shift: vec![0; count],
        };
        for index in 0..count {
            nodes.spawn(index);
        }
        nodes
    }

    fn spawn(&mut self, index: usize) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.logs[index])
            .expect("open the node's log file");
        let binary = env!("CARGO_BIN_EXE_chunkserver").to_string();
        let mut words = self.prefixes[index].clone();
        let shift = self.clock_shift[index];
        if shift != 0 {
            // A new time namespace: the server's CLOCK_MONOTONIC and CLOCK_BOOTTIME read
            // `shift` seconds away from everyone else's.
            let shift = shift.to_string();
            words.extend(
                [
                    "unshare",
                    "--time",
                    "--monotonic",
                    &shift,
                    "--boottime",
                    &shift,
                ]
                .map(String::from),
            );
        }
        words.push(binary);
        let mut command = Command::new(&words[0]);
        command.args(&words[1..]);
        // `ip netns exec` and `unshare` exec the server, so the child's pid is the server's.
        let child = command
            .args(["run", "--config"])
            .arg(&self.configs[index])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chunkserver");
        self.children[index] = Some(child);
        self.paused[index] = false;
    }

    pub fn count(&self) -> usize {
        self.children.len()
    }

    /// SIGKILL; the node stays down until `restart`.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.children[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused[index] = false;
    }

    pub fn restart(&mut self, index: usize) {
        if self.children[index].is_none() {
            self.spawn(index);
        }
    }

    pub fn pause(&mut self, index: usize) -> Result<(), String> {
        if let Some(child) = &self.children[index] {
            signal(child.id(), "STOP")?;
            self.paused[index] = true;
        }
        Ok(())
    }

    pub fn resume(&mut self, index: usize) -> Result<(), String> {
        if let Some(child) = &self.children[index] {
            if self.paused[index] {
                signal(child.id(), "CONT")?;
            }
        }
        self.paused[index] = false;
        Ok(())
    }

    /// Records and restarts any node that exited without being killed.
    pub fn reap_unexpected(&mut self) {
        for index in 0..self.children.len() {
            let exited = match &mut self.children[index] {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                if let (Some(code), Some(expected)) = (status.code(), self.expected_exit[index]) {
                    if code == expected {
                        // A fault armed on it ended it, as it should; it stays down until the
                        // fault's end restarts it.
                        self.fault_exits.push((index, code));
                        self.children[index] = None;
                        self.expected_exit[index] = None;
                        continue;
                    }
                }
                eprintln!(
                    "node {} exited on its own: {status}; log tail:\n{}",
                    index + 1,
                    self.log_tail(index, 30)
                );
                self.unexpected_exits.push((index, status));
                self.children[index] = None;
                self.spawn(index);
            }
        }
    }

    /// Gives the metrics endpoints (`host:port` per node) where disk faults are armed.
    pub fn set_control(&mut self, control: Vec<String>) {
        self.control = control;
    }

    /// Whether node `index` is running (or paused).
    pub fn is_up(&self, index: usize) -> bool {
        self.children[index].is_some()
    }

    /// Arms a disk fault on node `index` (`query` as `POST /fault` takes it), expecting it to
    /// end with `exit` when the fault reaches it. The node's answer on success.
    pub fn disk_fault(
        &mut self,
        index: usize,
        query: &str,
        exit: Option<i32>,
    ) -> Result<String, String> {
        let address = self
            .control
            .get(index)
            .ok_or("no metrics endpoint to arm faults")?;
        self.expected_exit[index] = exit;
        // A node restarted a moment ago may not listen yet.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let address = address.clone();
        let answer = loop {
            let answer = post(&address, &format!("/fault?{query}"));
            if answer.is_ok() || std::time::Instant::now() >= deadline {
                break answer;
            }
            // The fault may have stopped the node before its answer went out: armed, then.
            if exit.is_some() && self.wait_fault_exit(index, std::time::Duration::from_secs(2)) {
                return Ok("the node stopped on the fault before it answered".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        if answer.is_err() {
            self.expected_exit[index] = None;
        }
        answer
    }

    /// Ends a disk fault on node `index`: turns it off where the node still runs, restarts
    /// the node where the fault ended it. Says which.
    pub fn disk_fault_end(&mut self, index: usize) -> Result<String, String> {
        self.reap_unexpected();
        if self.is_up(index) {
            let address = self
                .control
                .get(index)
                .ok_or("no metrics endpoint")?
                .clone();
            let answer = post(&address, "/fault?disk=off");
            // Until the node has taken the request, the fault may still stop it: that exit
            // is the fault's doing (found by the realistic profile, where a busy node takes
            // a while to answer).
            self.reap_unexpected();
            self.expected_exit[index] = None;
            if self.is_up(index) {
                answer.map(|_| "it rode the fault out".to_string())
            } else {
                self.spawn(index);
                Ok("it stopped on it as the fault ended and was restarted".to_string())
            }
        } else {
            self.expected_exit[index] = None;
            self.spawn(index);
            Ok("it stopped on it and was restarted".to_string())
        }
    }

    /// Waits up to `within` for node `index` to exit as expected; whether it did.
    pub fn wait_fault_exit(&mut self, index: usize, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            self.reap_unexpected();
            if !self.is_up(index) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    /// Kills node `index` and starts it again with its clocks `shift` seconds off.
    pub fn restart_clock_shifted(&mut self, index: usize, shift: i64) {
        self.kill(index);
        self.clock_shift[index] = shift;
        self.spawn(index);
    }

    /// Brings every node back: resumed if paused, started if down.
    pub fn restore_all(&mut self) {
        for index in 0..self.children.len() {
            self.expected_exit[index] = None;
            if let Err(e) = self.resume(index) {
                eprintln!("resume node {}: {e}", index + 1);
            }
            if self.is_up(index) && !self.control.is_empty() {
                if let Err(e) = post(&self.control[index], "/fault?disk=off") {
                    eprintln!("disarm node {}: {e}", index + 1);
                }
            }
            self.restart(index);
        }
    }

    /// SIGTERM to all; each must exit 0 within `within`. Returns the failures.
    pub fn stop_all(&mut self, within: std::time::Duration) -> Vec<String> {
        let mut failures = Vec::new();
        for child in self.children.iter().flatten() {
            if let Err(e) = signal(child.id(), "TERM") {
                failures.push(e);
            }
        }
        let deadline = std::time::Instant::now() + within;
        for index in 0..self.children.len() {
            let Some(mut child) = self.children[index].take() else {
                continue;
            };
            loop {
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => break,
                    Ok(Some(status)) => {
                        failures.push(format!("node {} exited {status} on SIGTERM", index + 1));
                        break;
                    }
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Ok(None) => {
                        failures.push(format!("node {} did not stop on SIGTERM", index + 1));
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Err(e) => {
                        failures.push(format!("wait for node {}: {e}", index + 1));
                        break;
                    }
                }
            }
        }
        failures
    }

    /// The last `lines` lines of node `index`'s log.
    pub fn log_tail(&self, index: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.logs[index]).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Lines of any node's log that report a panic.
    pub fn panics(&self) -> Vec<String> {
        let mut found = Vec::new();
        for (index, log) in self.logs.iter().enumerate() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("panicked")) {
                found.push(format!("node {}: {line}", index + 1));
            }
        }
        found
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
