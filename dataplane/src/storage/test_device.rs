//! The device the storage engine's tests run on: memory by default; with the `spdk` feature and
//! `ENGINE_TEST_BACKEND=spdk-malloc` or `spdk-aio`, a fresh window of an SPDK malloc bdev or of
//! an SPDK aio bdev over a file (`scripts/spdk-tests` runs both). Everything a test does to
//! the medium directly (read it whole, damage a byte, start from an image) goes through the
//! [`Bdev`] trait, so every test runs unchanged on every backend.

use std::rc::Rc;

use super::bdev::{AnyBdev, Bdev, MemBdev};

/// Block size of every test device.
const BLOCK: u32 = 4096;
/// DMA pool bound of every test device.
const POOL: usize = 64 << 20;

/// Which backend the tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TestBackend {
    Memory,
    #[cfg(feature = "spdk")]
    SpdkMalloc,
    #[cfg(feature = "spdk")]
    SpdkAio,
}

/// The backend `ENGINE_TEST_BACKEND` names (memory when unset).
pub(crate) fn backend() -> TestBackend {
    match std::env::var("ENGINE_TEST_BACKEND").as_deref() {
        Err(_) | Ok("" | "mem" | "memory") => TestBackend::Memory,
        #[cfg(feature = "spdk")]
        Ok("spdk-malloc") => TestBackend::SpdkMalloc,
        #[cfg(feature = "spdk")]
        Ok("spdk-aio") => TestBackend::SpdkAio,
        Ok(other) => panic!(
            "ENGINE_TEST_BACKEND={other}: expected mem, or spdk-malloc or spdk-aio in a build \
             with the spdk feature"
        ),
    }
}

#[cfg(feature = "spdk")]
mod spdk {
    use std::rc::Rc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    use super::super::bdev::{AnyBdev, Bdev};

    /// Room of each SPDK test bdev, handed out in windows.
    pub(super) const ROOM: u64 = 1 << 30;
    static NEXT: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();

    /// Starts SPDK once for the test process, with a malloc bdev and an aio bdev over a
    /// sparse file, each of [`ROOM`] bytes.
    pub(super) fn start() {
        let started = STARTED.get_or_init(|| {
            let file =
                std::env::temp_dir().join(format!("engine-tests-aio-{}.img", std::process::id()));
            let handle = std::fs::File::create(&file).map_err(|e| e.to_string())?;
            handle.set_len(ROOM).map_err(|e| e.to_string())?;
            let json = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create", "params": {
                    "name": "TestMalloc", "num_blocks": ROOM / 4096, "block_size": 4096}},
                {"method": "bdev_aio_create", "params": {
                    "name": "TestAio", "filename": file.display().to_string(), "block_size": 4096}},
            ]}]});
            ffi::spdk::start(&ffi::spdk::EnvOptions {
                name: "engine-tests".into(),
                hugepages: false,
                mem_size_mb: 3072,
                pci: false,
                json_config: json.to_string(),
            })
            .map_err(|e| e.to_string())
        });
        if let Err(error) = started {
            panic!("SPDK for the engine tests: {error}");
        }
    }

    /// (bdev, offset, size, the device using it).
    type Window = (usize, u64, u64, std::rc::Weak<AnyBdev>);

    thread_local! {
        /// Windows handed out on this thread: (bdev, offset, size, device). A window whose
        /// device is gone is handed out again, zeroed first. (Devices are `Rc`s: a window
        /// never leaves the thread that took it, so a per-thread list is enough, and the
        /// offsets come from one shared counter.)
        static WINDOWS: std::cell::RefCell<Vec<Window>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    /// A fresh, zeroed window of `size` bytes on bdev `which` (0: malloc, 1: aio).
    pub(super) fn window(which: usize, size: u64) -> Rc<AnyBdev> {
        start();
        let name = ["TestMalloc", "TestAio"][which];
        let reused = WINDOWS.with(|w| {
            let mut windows = w.borrow_mut();
            let free = windows
                .iter()
                .position(|(b, _, s, d)| *b == which && *s == size && d.strong_count() == 0)?;
            Some(windows.swap_remove(free).1)
        });
        let offset = match reused {
            Some(offset) => offset,
            None => {
                let offset = NEXT[which].fetch_add(size, Ordering::Relaxed);
                assert!(
                    offset + size <= ROOM,
                    "the SPDK test bdev is used up ({ROOM} bytes in live devices); raise ROOM"
                );
                offset
            }
        };
        let uri = format!("spdk://{name}?offset={offset}&size={size}");
        let bdev = Rc::new(
            futures_lite::future::block_on(super::super::bdev::open(&uri, super::POOL)).unwrap(),
        );
        if reused.is_some() {
            futures_lite::future::block_on(bdev.write_zeroes(0, size)).unwrap();
        }
        WINDOWS.with(|w| {
            w.borrow_mut()
                .push((which, offset, size, Rc::downgrade(&bdev)))
        });
        bdev
    }
}

/// A fresh, zeroed device of `size` bytes.
pub(crate) fn device(size: u64) -> Rc<AnyBdev> {
    let bdev = match backend() {
        TestBackend::Memory => AnyBdev::Mem(MemBdev::new(size, BLOCK, POOL).unwrap()),
        #[cfg(feature = "spdk")]
        TestBackend::SpdkMalloc | TestBackend::SpdkAio => {
            return spdk::window(usize::from(backend() == TestBackend::SpdkAio), size);
        }
    };
    Rc::new(bdev)
}

/// The device's whole contents.
pub(crate) async fn image(bdev: &AnyBdev) -> Vec<u8> {
    let mut image = Vec::with_capacity(bdev.capacity() as usize);
    let step = 1 << 20;
    let mut offset = 0;
    while offset < bdev.capacity() {
        let len = step.min(bdev.capacity() - offset);
        let piece = bdev.read_new(offset, len as usize).await.unwrap();
        image.extend_from_slice(piece.as_slice());
        offset += len;
    }
    image
}

/// Writes `image` over the device's whole contents.
pub(crate) async fn write_image(bdev: &AnyBdev, image: &[u8]) {
    let step = 1 << 20;
    for (i, piece) in image.chunks(step).enumerate() {
        let buf = bdev.pool().alloc_copy(piece).unwrap();
        bdev.write((i * step) as u64, buf).await.unwrap();
    }
    bdev.flush().await.unwrap();
}

/// A fresh device of the test backend holding `image`.
pub(crate) async fn from_image(image: &[u8]) -> Rc<AnyBdev> {
    let bdev = device(image.len() as u64);
    write_image(&bdev, image).await;
    bdev
}

/// Changes the device's contents in place through `change`.
pub(crate) async fn modify(bdev: &AnyBdev, change: impl FnOnce(&mut [u8])) {
    let mut contents = image(bdev).await;
    change(&mut contents);
    write_image(bdev, &contents).await;
}

/// A fresh device holding `bdev`'s contents changed by `change`.
pub(crate) async fn changed_copy(bdev: &AnyBdev, change: impl FnOnce(&mut [u8])) -> Rc<AnyBdev> {
    let mut contents = image(bdev).await;
    change(&mut contents);
    from_image(&contents).await
}
