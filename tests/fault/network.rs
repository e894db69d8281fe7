//! One network namespace per node, each joined to a bridge in the test's namespace by a veth
//! pair, with addresses from 198.18.0.0/15 (the benchmarking range, RFC 2544) used only on
//! the links this module creates. Partitions are blackhole routes inside the namespaces:
//! a route to a peer's address in a node's namespace drops everything that node sends it.
//! Everything is removed on drop, also when the test fails.

use std::process::{Command, Output};

fn ip(args: &[&str]) -> Result<Output, String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Removes the namespaces and bridge of earlier runs whose process is gone (a run killed with
/// SIGKILL cannot clean up after itself). Names are `fs<pid>n<node>` and `fs<pid>b`.
fn remove_leftovers() {
    let Ok(listing) = ip(&["netns", "list"]) else {
        return;
    };
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for name in listing.split_whitespace() {
        let Some(rest) = name.strip_prefix("fs") else {
            continue;
        };
        let Some((pid, node)) = rest.split_once('n') else {
            continue;
        };
        let numeric = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !numeric(pid) || !numeric(node) || std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            continue;
        }
        eprintln!("fault suite: removing namespace {name} left by process {pid}");
        let _ = ip(&["netns", "del", name]);
        let _ = Command::new("ip")
            .args(["link", "del", &format!("fs{pid}b")])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The namespaces, links and addresses of one run.
pub struct Network {
    bridge: String,
    /// Namespace of node i+1 at index i.
    namespaces: Vec<String>,
    /// Address of node i+1 at index i.
    pub hosts: Vec<String>,
    /// Host ends of the veth pairs (gone with their namespace; deleted in case one is not).
    links: Vec<String>,
    /// Blackhole routes in place: (from node index, to node index).
    cuts: Vec<(usize, usize)>,
}

impl Network {
    /// Creates `count` namespaces joined by a bridge, or says why it cannot.
    pub fn create(count: usize) -> Result<Network, String> {
        if std::env::var_os("FAULT_LOOPBACK").is_some() {
            return Err("FAULT_LOOPBACK is set".into());
        }
        remove_leftovers();
        let tag = std::process::id();
        let existing = String::from_utf8_lossy(&ip(&["-o", "addr"])?.stdout).into_owned()
            + &String::from_utf8_lossy(&ip(&["route"])?.stdout);
        let third = (0..200u32)
            .map(|k| 20 + (tag % 200 + k) % 200)
            .find(|k| !existing.contains(&format!("198.18.{k}.")))
            .ok_or("no free /24 in 198.18.0.0/16")?;
        let mut network = Network {
            bridge: format!("fs{tag}b"),
            namespaces: Vec::new(),
            hosts: Vec::new(),
            links: Vec::new(),
            cuts: Vec::new(),
        };
        // From here on, drop removes whatever was made.
        ip(&["link", "add", &network.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("198.18.{third}.254/24"),
            "dev",
            &network.bridge,
        ])?;
        ip(&["link", "set", &network.bridge, "up"])?;
        for i in 0..count {
            let namespace = format!("fs{tag}n{}", i + 1);
            let outside = format!("fs{tag}v{}", i + 1);
            let inside = format!("fs{tag}p{}", i + 1);
            let host = format!("198.18.{third}.{}", i + 1);
            ip(&["netns", "add", &namespace])?;
            network.namespaces.push(namespace.clone());
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ])?;
            network.links.push(outside.clone());
            ip(&["link", "set", &inside, "netns", &namespace])?;
            ip(&["link", "set", &outside, "master", &network.bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            let inside_ns = |args: &[&str]| {
                let mut all = vec!["-n", namespace.as_str()];
                all.extend_from_slice(args);
                ip(&all)
            };
            inside_ns(&["link", "set", "lo", "up"])?;
            inside_ns(&["addr", "add", &format!("{host}/24"), "dev", &inside])?;
            inside_ns(&["link", "set", &inside, "up"])?;
            network.hosts.push(host);
        }
        Ok(network)
    }

    /// The command prefix that runs a program inside node `index`'s namespace.
    pub fn exec_prefix(&self, index: usize) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.namespaces[index].clone(),
        ]
    }

    /// Drops everything node `from` sends to node `to` (one direction).
    pub fn cut(&mut self, from: usize, to: usize) -> Result<(), String> {
        ip(&[
            "-n",
            &self.namespaces[from],
            "route",
            "add",
            "blackhole",
            &format!("{}/32", self.hosts[to]),
        ])?;
        self.cuts.push((from, to));
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&mut self) -> Result<(), String> {
        let mut first_error = Ok(());
        for (from, to) in std::mem::take(&mut self.cuts) {
            let outcome = ip(&[
                "-n",
                &self.namespaces[from],
                "route",
                "del",
                "blackhole",
                &format!("{}/32", self.hosts[to]),
            ]);
            if first_error.is_ok() {
                first_error = outcome.map(|_| ());
            }
        }
        first_error
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and so the pair.
        for namespace in &self.namespaces {
            if let Err(e) = ip(&["netns", "del", namespace]) {
                eprintln!("fault suite cleanup: {e}");
            }
        }
        for link in &self.links {
            let _ = Command::new("ip")
                .args(["link", "del", link])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            eprintln!("fault suite cleanup: {e}");
        }
    }
}
