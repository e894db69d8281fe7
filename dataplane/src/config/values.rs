//! The value types of the configuration that are not sections: transports and endpoints
//! (`tcp://127.0.0.1:7100`), core specifications and the cpulist syntax, with their `serde`
//! impls.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A transport named by an address scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// Verbs semantics emulated in user space over a socket.
    SoftRdma,
    /// Real ibverbs (needs the `rdma` feature).
    Rdma,
}

impl Transport {
    /// The URI scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::SoftRdma => "softrdma",
            Transport::Rdma => "rdma",
        }
    }
}

/// A listener or peer address: `tcp://127.0.0.1:7100`, `softrdma://…`, `rdma://…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The transport.
    pub transport: Transport,
    /// IP address and base port.
    pub addr: SocketAddr,
}

impl Endpoint {
    /// The address of shard `shard`: the base port plus the shard index.
    pub fn for_shard(&self, shard: u32) -> Option<SocketAddr> {
        let port = u32::from(self.addr.port()).checked_add(shard)?;
        let port = u16::try_from(port).ok()?;
        Some(SocketAddr::new(self.addr.ip(), port))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.transport.scheme(), self.addr)
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            format!(
                "`{text}` is not an address of the form tcp://IP:PORT, softrdma://… or rdma://…"
            )
        })?;
        let transport = match scheme {
            "tcp" => Transport::Tcp,
            "softrdma" => Transport::SoftRdma,
            "rdma" => Transport::Rdma,
            other => {
                return Err(format!(
                    "unknown transport `{other}` in `{text}` (expected tcp, softrdma or rdma)"
                ))
            }
        };
        let addr = rest
            .parse::<SocketAddr>()
            .map_err(|_| format!("`{rest}` in `{text}` is not an IP:PORT socket address"))?;
        Ok(Endpoint { transport, addr })
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The cores to run on: a list (`[0, 1]`), a Linux cpulist string (`"0-7,16-23"`), or `"numa"`
/// for every online core of `node.numa_node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreSpec {
    /// Explicit core ids.
    List(Vec<u32>),
    /// Every online core of the configured NUMA node.
    Numa,
}

impl Serialize for CoreSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            CoreSpec::List(cores) => cores.serialize(serializer),
            CoreSpec::Numa => serializer.serialize_str("numa"),
        }
    }
}

impl<'de> Deserialize<'de> for CoreSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<u32>),
            Text(String),
        }
        let raw = Raw::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "expected a list of core ids, a cpulist such as \"0-3\", or \"numa\"",
            )
        })?;
        match raw {
            Raw::List(cores) => Ok(CoreSpec::List(cores)),
            Raw::Text(text) if text == "numa" => Ok(CoreSpec::Numa),
            Raw::Text(text) => parse_cpulist(&text)
                .map(CoreSpec::List)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses the Linux cpulist syntax: `0-3,8,10-11`.
pub fn parse_cpulist(text: &str) -> Result<Vec<u32>, String> {
    let mut cores = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.trim().is_empty()) {
        let bad = || format!("`{text}` is not a cpulist such as \"0-3,8\"");
        match part.split_once('-') {
            Some((low, high)) => {
                let low: u32 = low.trim().parse().map_err(|_| bad())?;
                let high: u32 = high.trim().parse().map_err(|_| bad())?;
                if low > high || high - low > 4096 {
                    return Err(bad());
                }
                cores.extend(low..=high);
            }
            None => cores.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    Ok(cores)
}
