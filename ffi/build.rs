//! Finds the C libraries behind the optional features and fails with a readable line when one
//! is asked for but missing, rather than with a linker error a page long.

use std::env;
use std::path::PathBuf;
use std::process::exit;

fn main() {
    println!("cargo:rerun-if-env-changed=SPDK_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    if env::var_os("CARGO_FEATURE_RDMA").is_some() {
        probe_rdma();
    }
    if env::var_os("CARGO_FEATURE_SPDK").is_some() {
        probe_spdk();
    }
}

fn probe_rdma() {
    for (lib, package) in [
        ("libibverbs", "libibverbs-dev"),
        ("librdmacm", "librdmacm-dev"),
    ] {
        if pkg_config::Config::new()
            .cargo_metadata(false)
            .probe(lib)
            .is_err()
        {
            fail(&format!(
                "feature `rdma` needs {lib}, which pkg-config cannot find: \
                 install the Debian package {package} (scripts/test installs it)"
            ));
        }
    }
}

fn probe_spdk() {
    if let Some(dir) = env::var_os("SPDK_DIR") {
        let dir = PathBuf::from(dir);
        let header = dir.join("include/spdk/bdev.h");
        if !header.exists() {
            fail(&format!(
                "feature `spdk`: SPDK_DIR={} has no include/spdk/bdev.h; point SPDK_DIR at a \
                 built SPDK tree",
                dir.display()
            ));
        }
        return;
    }
    for lib in ["spdk_bdev", "spdk_env_dpdk"] {
        if pkg_config::Config::new()
            .cargo_metadata(false)
            .probe(lib)
            .is_err()
        {
            fail(&format!(
                "feature `spdk` needs SPDK and pkg-config cannot find {lib}: set SPDK_DIR to a \
                 built SPDK tree, or PKG_CONFIG_PATH to its build/lib/pkgconfig"
            ));
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    println!("cargo:warning={message}");
    exit(1);
}
