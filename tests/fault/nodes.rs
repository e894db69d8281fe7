//! The three `chunkserver run` processes: started (inside their namespaces when there are
//! namespaces), killed with SIGKILL, paused with SIGSTOP and resumed, watched for exits nobody
//! asked for, and killed on drop, also when the test fails.

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
        let binary = env!("CARGO_BIN_EXE_chunkserver");
        let mut command = match self.prefixes[index].split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        // `ip netns exec` execs the server, so the child's pid is the server's.
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

    /// Brings every node back: resumed if paused, started if down.
    pub fn restore_all(&mut self) {
        for index in 0..self.children.len() {
            if let Err(e) = self.resume(index) {
                eprintln!("resume node {}: {e}", index + 1);
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
