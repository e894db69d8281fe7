//! Probes the host and records what this binary has, for `chunkserver --version`: the git
//! commit and the backends (`uring mem softverbs tcp`, plus `rdma` and `spdk` when built with
//! those features, whose libraries `ffi/build.rs` finds or names the package to install).

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=SPDK_DIR");

    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .map(|out| !out.stdout.is_empty())
        .unwrap_or(false);
    let commit = if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    };

    let mut backends = vec!["uring", "mem", "softverbs", "tcp"];
    if env::var_os("CARGO_FEATURE_RDMA").is_some() {
        backends.push("rdma");
    }
    if env::var_os("CARGO_FEATURE_SPDK").is_some() {
        backends.push("spdk");
    }
    let ibverbs_on_host = pkg_config::Config::new()
        .cargo_metadata(false)
        .probe("libibverbs")
        .is_ok();
    let spdk_on_host = env::var_os("SPDK_DIR").is_some()
        || pkg_config::Config::new()
            .cargo_metadata(false)
            .probe("spdk_bdev")
            .is_ok();

    println!("cargo:rustc-env=CHUNKSERVER_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=CHUNKSERVER_BACKENDS={}",
        backends.join(" ")
    );
    println!(
        "cargo:rustc-env=CHUNKSERVER_HOST_PROBE=libibverbs {}, spdk {}",
        if ibverbs_on_host {
            "found"
        } else {
            "not found"
        },
        if spdk_on_host { "found" } else { "not found" }
    );
}
