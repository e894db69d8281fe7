//! Finds the C libraries behind the optional features and fails with a readable line when one
//! is asked for but missing, rather than with a linker error a page long.

use std::env;
#[cfg(feature = "spdk")]
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

/// The SPDK libraries the `spdk` feature links: the environment, threads, the bdev layer and
/// its subsystem, JSON config loading, and the malloc, aio and NVMe bdev modules.
///
/// Not SPDK's io_uring modules (the uring bdev, the uring sock): glommio links its own copy
/// of liburing statically, and SPDK's were compiled against the system's headers; two
/// liburing versions behind one set of symbols is not a risk to take. aio serves files.
#[cfg(feature = "spdk")]
const SPDK_PACKAGES: [&str; 12] = [
    "spdk_env_dpdk",
    "spdk_syslibs",
    "spdk_thread",
    "spdk_log",
    "spdk_json",
    "spdk_rpc",
    "spdk_init",
    "spdk_bdev",
    "spdk_event_bdev",
    "spdk_bdev_malloc",
    "spdk_bdev_aio",
    "spdk_bdev_nvme",
];

/// Finds SPDK (SPDK_DIR, an install prefix or a built source tree; else pkg-config's search
/// path), links it, and generates the bindings.
///
/// Linking follows what SPDK needs when linked statically: every `spdk_*` archive goes in whole
/// (modules and subsystems register themselves from constructors nothing else references, so
/// a plain static link drops them and bdev creation fails), and isa-l comes from SPDK's own
/// build, found before any system copy because SPDK's library directory is searched first.
/// DPDK and the system libraries link as shared libraries.
#[cfg(feature = "spdk")]
fn probe_spdk() {
    println!("cargo:rerun-if-changed=spdk/wrapper.h");
    if let Some(dir) = env::var_os("SPDK_DIR") {
        let dir = PathBuf::from(dir);
        let Some(pc) = ["lib/pkgconfig", "build/lib/pkgconfig"]
            .iter()
            .map(|sub| dir.join(sub))
            .find(|p| p.join("spdk_bdev.pc").exists())
        else {
            fail(&format!(
                "feature `spdk`: SPDK_DIR={} has neither lib/pkgconfig/spdk_bdev.pc (an install \
                 prefix) nor build/lib/pkgconfig/spdk_bdev.pc (a built source tree)",
                dir.display()
            ));
        };
        let joined = match env::var_os("PKG_CONFIG_PATH") {
            Some(old) => {
                let mut paths = vec![pc];
                paths.extend(env::split_paths(&old));
                env::join_paths(paths).unwrap_or_default()
            }
            None => pc.into_os_string(),
        };
        env::set_var("PKG_CONFIG_PATH", joined);
    }
    let mut libs: Vec<String> = Vec::new();
    let mut link_paths: Vec<PathBuf> = Vec::new();
    let mut include_paths: Vec<PathBuf> = Vec::new();
    for package in SPDK_PACKAGES {
        let library = match pkg_config::Config::new()
            .cargo_metadata(false)
            .statik(true)
            .probe(package)
        {
            Ok(library) => library,
            Err(error) => fail(&format!(
                "feature `spdk` needs SPDK and pkg-config cannot find {package}: set SPDK_DIR to \
                 a built SPDK (install prefix or source tree), or PKG_CONFIG_PATH to its \
                 pkgconfig directory ({error})"
            )),
        };
        for lib in library.libs {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
        for path in library.link_paths {
            if !link_paths.contains(&path) {
                link_paths.push(path);
            }
        }
        for path in library.include_paths {
            if !include_paths.contains(&path) {
                include_paths.push(path);
            }
        }
    }
    for path in &link_paths {
        println!("cargo:rustc-link-search=native={}", path.display());
    }
    let archive = |lib: &str| {
        link_paths
            .iter()
            .any(|p| p.join(format!("lib{lib}.a")).exists())
    };
    // SPDK's archives first (whole), then everything they need as shared libraries.
    const LEFT_OUT: [&str; 2] = ["spdk_sock_uring", "spdk_bdev_uring"];
    for lib in libs
        .iter()
        .filter(|l| l.starts_with("spdk_") && !LEFT_OUT.contains(&l.as_str()))
    {
        if !archive(lib) {
            fail(&format!(
                "feature `spdk`: lib{lib}.a is missing from {link_paths:?}; SPDK must be built \
                 with its static libraries (the default)"
            ));
        }
        println!("cargo:rustc-link-lib=static:+whole-archive,-bundle={lib}");
    }
    if archive("isal") {
        println!("cargo:rustc-link-lib=static:-bundle=isal");
    }
    for lib in libs
        .iter()
        .filter(|l| !l.starts_with("spdk_") && l.as_str() != "isal")
    {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_default());
    let bindings = bindgen::Builder::default()
        .header("spdk/wrapper.h")
        .clang_args(include_paths.iter().map(|p| format!("-I{}", p.display())))
        .allowlist_function("spdk_env_.*")
        .allowlist_function("spdk_dma_(malloc|zmalloc|free)")
        .allowlist_function("spdk_thread_.*")
        .allowlist_function("spdk_(set|get)_thread")
        .allowlist_function("spdk_put_io_channel")
        .allowlist_function("spdk_bdev_(open_ext|close|get_io_channel|get_by_name|desc_get_bdev|get_name|get_block_size|get_num_blocks|get_buf_align|read|write|write_zeroes|flush|free_io|io_type_supported|get_write_unit_size)")
        .allowlist_function("spdk_subsystem_(init|fini|load_config)")
        .allowlist_function("spdk_rpc_(set|get)_state")
        .allowlist_function("spdk_log_(set_print_level|set_level|open)")
        .allowlist_var("SPDK_VERSION_(MAJOR|MINOR|PATCH)")
        .allowlist_var("SPDK_RPC_(STARTUP|RUNTIME)")
        .allowlist_var("SPDK_LOG_.*")
        .opaque_type("spdk_bdev_io")
        .opaque_type("spdk_bdev")
        .opaque_type("spdk_thread")
        .opaque_type("spdk_io_channel")
        .opaque_type("spdk_bdev_desc")
        .opaque_type("spdk_nvme_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate();
    match bindings {
        Ok(bindings) => {
            if let Err(error) = bindings.write_to_file(out.join("spdk.rs")) {
                fail(&format!("feature `spdk`: writing the bindings: {error}"));
            }
        }
        Err(error) => fail(&format!(
            "feature `spdk`: bindgen could not read SPDK's headers (libclang-dev is needed; \
             include paths {include_paths:?}): {error}"
        )),
    }
}

#[cfg(not(feature = "spdk"))]
fn probe_spdk() {}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    println!("cargo:warning={message}");
    exit(1);
}
