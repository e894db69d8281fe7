//! SPDK through bindgen (feature `spdk`): the environment, one SPDK thread per shard, bdev
//! handles, DMA memory, and the bridge from SPDK's completion callbacks to futures.
//!
//! The model (../shared/DESIGN.md): glommio owns each core, so SPDK runs no reactors of its
//! own. [`start`] brings the environment up once per process on a thread of its own, which
//! becomes SPDK's app thread: it initializes the subsystems, loads the JSON config that defines
//! the bdevs, and then polls the app thread for the process's life (management messages, not
//! I/O). Each shard creates an [`SpdkThread`] on its own OS thread and polls it from a task of
//! its executor; I/O is submitted and completed on that thread only, through the shard's
//! [`BdevHandle`].
//!
//! Drop order, which SPDK requires: a [`BdevHandle`] gives its I/O channel back and closes its
//! descriptor on the thread that opened them, while that [`SpdkThread`] still exists; the
//! handle therefore holds the thread (`Rc`), and the thread is exited and destroyed when the
//! last holder goes.

/// The generated bindings.
#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]
pub mod sys {
    include!(concat!(env!("OUT_DIR"), "/spdk.rs"));
}

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void, CStr, CString};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// What SPDK operations fail with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpdkError {
    /// The environment or the subsystems could not start.
    Start(String),
    /// [`start`] has not run (or failed) in this process.
    NotStarted,
    /// An SPDK thread could not be created.
    Thread(String),
    /// The bdev could not be opened.
    Open {
        /// The bdev's name.
        bdev: String,
        /// Why.
        reason: String,
    },
    /// An I/O channel could not be had.
    Channel(String),
    /// A request could not be submitted (the bdev layer's return code).
    Submit {
        /// Which operation.
        op: IoKind,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The negated errno SPDK returned.
        rc: i32,
    },
    /// The bdev completed the request with a failure.
    Failed {
        /// Which operation.
        op: IoKind,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// SPDK's DMA allocator has no memory left.
    NoMemory {
        /// Bytes asked for.
        len: usize,
    },
}

impl fmt::Display for SpdkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpdkError::Start(reason) => write!(f, "SPDK did not start: {reason}"),
            SpdkError::NotStarted => f.write_str("the SPDK environment is not started"),
            SpdkError::Thread(reason) => write!(f, "SPDK thread: {reason}"),
            SpdkError::Open { bdev, reason } => write!(f, "cannot open bdev {bdev}: {reason}"),
            SpdkError::Channel(reason) => write!(f, "no I/O channel: {reason}"),
            SpdkError::Submit {
                op,
                offset,
                len,
                rc,
            } => write!(
                f,
                "{op} of {len} bytes at {offset} could not be submitted (rc {rc})"
            ),
            SpdkError::Failed { op, offset, len } => {
                write!(f, "{op} of {len} bytes at {offset} failed on the bdev")
            }
            SpdkError::NoMemory { len } => write!(f, "SPDK DMA memory exhausted ({len} bytes)"),
        }
    }
}

impl std::error::Error for SpdkError {}

/// The kinds of I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A write of zeroes.
    WriteZeroes,
    /// A flush.
    Flush,
}

impl fmt::Display for IoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::WriteZeroes => "write-zeroes",
            IoKind::Flush => "flush",
        })
    }
}

/// How the environment starts.
#[derive(Debug, Clone)]
pub struct EnvOptions {
    /// The process name SPDK and DPDK know it by.
    pub name: String,
    /// Use hugepages (`false`: the no-huge test mode, ordinary memory, no physical addresses,
    /// enough for malloc, aio and uring bdevs but not for NVMe).
    pub hugepages: bool,
    /// Memory SPDK reserves, in MiB (DMA buffers, malloc bdevs, the bdev layer's pools).
    pub mem_size_mb: u32,
    /// Scan and claim PCI devices (NVMe). Off for tests: nothing on the bus is touched.
    pub pci: bool,
    /// The SPDK JSON config that defines the bdevs (`{"subsystems": [...]}`).
    pub json_config: String,
}

/// The running environment: started once per process.
struct Env {
    /// The options it started with (a second [`start`] must ask for the same).
    options: String,
}

static ENV: OnceLock<Result<Env, SpdkError>> = OnceLock::new();

/// Starts SPDK once per process: the environment, the subsystems, the bdevs of the JSON config.
/// Later calls with the same options return at once; with other options they fail (SPDK's
/// environment cannot restart within a process).
pub fn start(options: &EnvOptions) -> Result<(), SpdkError> {
    let key = format!("{options:?}");
    let env = ENV.get_or_init(|| {
        start_app_thread(options).map(|()| Env {
            options: key.clone(),
        })
    });
    match env {
        Ok(env) if env.options == key => Ok(()),
        Ok(_) => Err(SpdkError::Start(
            "SPDK already runs in this process with other options".into(),
        )),
        Err(error) => Err(error.clone()),
    }
}

/// Whether [`start`] succeeded in this process.
pub fn started() -> bool {
    matches!(ENV.get(), Some(Ok(_)))
}

/// The version of the SPDK headers the bindings were made from (`26.09`).
pub fn version() -> String {
    format!(
        "{}.{:02}{}",
        sys::SPDK_VERSION_MAJOR,
        sys::SPDK_VERSION_MINOR,
        match sys::SPDK_VERSION_PATCH {
            0 => String::new(),
            patch => format!(".{patch}"),
        }
    )
}

/// A flag an SPDK callback sets: `Some(rc)` once called.
struct Done(Cell<Option<i32>>);

extern "C" fn init_done(rc: c_int, arg: *mut c_void) {
    // SAFETY: `arg` is the `Done` that `poll_until` keeps alive until this has run.
    let done = unsafe { &*(arg as *const Done) };
    done.0.set(Some(rc));
}

/// Polls `thread` until `done` is set; its value.
fn poll_until(thread: *mut sys::spdk_thread, done: &Done) -> i32 {
    loop {
        if let Some(rc) = done.0.get() {
            return rc;
        }
        // SAFETY: `thread` is a live SPDK thread, current on this OS thread.
        let work = unsafe { sys::spdk_thread_poll(thread, 0, 0) };
        if work == 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Raised when the process exits: no SPDK thread is polled from then on.
static EXITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set by the app thread once it has stopped polling for good.
static APP_STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs at process exit, before the environment's own destructors unmap its memory (those
/// were registered when the library loaded, earlier than this): stops every poller first.
extern "C" fn stop_polling_at_exit() {
    use std::sync::atomic::Ordering;
    EXITING.store(true, Ordering::SeqCst);
    for _ in 0..1000 {
        if APP_STOPPED.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn start_app_thread(options: &EnvOptions) -> Result<(), SpdkError> {
    let (tx, rx) = mpsc::channel();
    let options = options.clone();
    std::thread::Builder::new()
        .name("spdk-app".into())
        .spawn(move || app_thread(options, tx))
        .map_err(|e| SpdkError::Start(format!("cannot spawn the SPDK app thread: {e}")))?;
    rx.recv()
        .map_err(|_| SpdkError::Start("the SPDK app thread ended while starting".into()))?
}

/// The app thread: starts everything, reports, then polls SPDK's app thread for good.
fn app_thread(options: EnvOptions, report: mpsc::Sender<Result<(), SpdkError>>) {
    let app = match start_env(&options) {
        Ok(app) => app,
        Err(error) => {
            let _ = report.send(Err(error));
            return;
        }
    };
    // SAFETY: registers a plain function with no arguments; atexit keeps only the pointer.
    if unsafe { libc::atexit(stop_polling_at_exit) } != 0 {
        let _ = report.send(Err(SpdkError::Start("atexit registration failed".into())));
        return;
    }
    let _ = report.send(Ok(()));
    use std::sync::atomic::Ordering;
    while !EXITING.load(Ordering::SeqCst) {
        // SAFETY: `app` is the app thread created by `start_env`, current on this OS thread;
        // it is never destroyed (it lives as long as the process).
        let work = unsafe { sys::spdk_thread_poll(app, 0, 0) };
        if work == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    APP_STOPPED.store(true, Ordering::SeqCst);
    // Park for good: the process is exiting, and this thread must not touch SPDK again.
    loop {
        std::thread::park();
    }
}

fn start_env(options: &EnvOptions) -> Result<*mut sys::spdk_thread, SpdkError> {
    let fail = |what: &str, rc: i32| SpdkError::Start(format!("{what} failed (rc {rc})"));
    // The strings SPDK keeps pointers to live for the process.
    let name: &'static CStr = Box::leak(
        CString::new(options.name.clone())
            .map_err(|_| SpdkError::Start("the process name holds a NUL byte".into()))?
            .into_boxed_c_str(),
    );
    let app_name: &'static CStr = c"app";
    let mut opts = sys::spdk_env_opts {
        opts_size: std::mem::size_of::<sys::spdk_env_opts>(),
        ..Default::default()
    };
    // SAFETY: `opts` is a valid, writable spdk_env_opts whose opts_size says its size.
    unsafe { sys::spdk_env_opts_init(&mut opts) };
    opts.name = name.as_ptr();
    opts.no_huge = !options.hugepages;
    opts.mem_size = i32::try_from(options.mem_size_mb)
        .map_err(|_| SpdkError::Start("mem_size is too large".into()))?;
    opts.no_pci = !options.pci;
    // SAFETY: `opts` was initialized by spdk_env_opts_init; the strings it points to are
    // 'static.
    let rc = unsafe { sys::spdk_env_init(&opts) };
    if rc != 0 {
        return Err(fail(
            "spdk_env_init (hugepages configured? memory size available?)",
            rc,
        ));
    }
    // SAFETY: plain setters of the log library, callable any time.
    unsafe {
        sys::spdk_log_open(None);
        sys::spdk_log_set_print_level(sys::spdk_log_level_SPDK_LOG_WARN);
    }
    // SAFETY: called once, after the environment, before any SPDK thread exists.
    let rc = unsafe { sys::spdk_thread_lib_init(None, 0) };
    if rc != 0 {
        return Err(fail("spdk_thread_lib_init", rc));
    }
    // SAFETY: the thread library is initialized; the first thread created is the app thread.
    let app = unsafe { sys::spdk_thread_create(app_name.as_ptr(), std::ptr::null()) };
    if app.is_null() {
        return Err(SpdkError::Start("cannot create the SPDK app thread".into()));
    }
    // SAFETY: `app` is a live thread; making it current on this OS thread is what SPDK's
    // initialization functions require ("call from the app thread").
    unsafe { sys::spdk_set_thread(app) };
    let done = Done(Cell::new(None));
    // SAFETY: called on the app thread; `done` outlives the callback (poll_until waits).
    unsafe { sys::spdk_subsystem_init(Some(init_done), &done as *const Done as *mut c_void) };
    let rc = poll_until(app, &done);
    if rc != 0 {
        return Err(fail("spdk_subsystem_init", rc));
    }
    // SAFETY: a setter of the RPC library, on the app thread.
    unsafe { sys::spdk_rpc_set_state(sys::SPDK_RPC_RUNTIME) };
    let mut json = options.json_config.clone().into_bytes();
    let done = Done(Cell::new(None));
    // SAFETY: on the app thread; SPDK copies the JSON before returning ("JSON data will be
    // copied"), and `done` outlives the callback.
    unsafe {
        sys::spdk_subsystem_load_config(
            json.as_mut_ptr() as *mut c_void,
            json.len() as isize,
            Some(init_done),
            &done as *const Done as *mut c_void,
            true,
        )
    };
    let rc = poll_until(app, &done);
    if rc != 0 {
        return Err(fail(
            "loading the JSON config (a bdev in it could not be created; SPDK's log says which)",
            rc,
        ));
    }
    Ok(app)
}

/// An SPDK thread owned by one OS thread (a shard), polled by its owner.
#[derive(Debug)]
pub struct SpdkThread {
    thread: NonNull<sys::spdk_thread>,
}

impl SpdkThread {
    /// Creates an SPDK thread and makes it current on this OS thread.
    pub fn create(name: &str) -> Result<Rc<SpdkThread>, SpdkError> {
        if !started() {
            return Err(SpdkError::NotStarted);
        }
        let name = CString::new(name).map_err(|_| SpdkError::Thread("NUL in name".into()))?;
        // SAFETY: the thread library is initialized (started() holds); SPDK copies the name.
        let raw = unsafe { sys::spdk_thread_create(name.as_ptr(), std::ptr::null()) };
        let thread = NonNull::new(raw)
            .ok_or_else(|| SpdkError::Thread("spdk_thread_create returned nothing".into()))?;
        // SAFETY: `thread` is live; this OS thread owns and polls it from now on.
        unsafe { sys::spdk_set_thread(thread.as_ptr()) };
        Ok(Rc::new(SpdkThread { thread }))
    }

    /// Runs the thread's messages and pollers once; how much work it did (nothing once the
    /// process is exiting).
    pub fn poll(&self) -> i32 {
        if EXITING.load(std::sync::atomic::Ordering::SeqCst) {
            return 0;
        }
        // SAFETY: the thread is live (destroyed only in drop) and owned by this OS thread
        // (SpdkThread is neither Send nor Sync).
        unsafe {
            sys::spdk_set_thread(self.thread.as_ptr());
            sys::spdk_thread_poll(self.thread.as_ptr(), 0, 0)
        }
    }
}

impl Drop for SpdkThread {
    fn drop(&mut self) {
        let thread = self.thread.as_ptr();
        // SAFETY: the thread is live and owned here; exiting it, polling it until its pending
        // messages and channel releases are done, then destroying it is SPDK's documented
        // sequence. Nothing references it afterwards (handles hold an Rc of this).
        unsafe {
            sys::spdk_set_thread(thread);
            sys::spdk_thread_exit(thread);
            for _ in 0..100_000 {
                if sys::spdk_thread_is_exited(thread) {
                    break;
                }
                sys::spdk_thread_poll(thread, 0, 0);
            }
            if sys::spdk_thread_is_exited(thread) {
                sys::spdk_thread_destroy(thread);
            }
            sys::spdk_set_thread(std::ptr::null_mut());
        }
    }
}

/// Memory from SPDK's DMA allocator (pinned, and registered for devices), freed on drop.
#[derive(Debug)]
pub struct DmaBlock {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the block is the only owner of its memory; spdk_dma_free may be called from any
// thread.
unsafe impl Send for DmaBlock {}
// SAFETY: shared access only reads through `as_ptr` by contract of its users.
unsafe impl Sync for DmaBlock {}

impl DmaBlock {
    /// `len` bytes aligned to `align`, zeroed or not.
    pub fn new(len: usize, align: usize, zeroed: bool) -> Result<DmaBlock, SpdkError> {
        if !started() {
            return Err(SpdkError::NotStarted);
        }
        // SAFETY: the environment is up; a null physical-address pointer is allowed.
        let raw = unsafe {
            if zeroed {
                sys::spdk_dma_zmalloc(len, align, std::ptr::null_mut())
            } else {
                sys::spdk_dma_malloc(len, align, std::ptr::null_mut())
            }
        };
        let ptr = NonNull::new(raw as *mut u8).ok_or(SpdkError::NoMemory { len })?;
        Ok(DmaBlock { ptr, len })
    }

    /// The start of the memory.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Its size.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: SPDK refuses zero-length allocations).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DmaBlock {
    fn drop(&mut self) {
        // SAFETY: the pointer came from spdk_dma_(z)malloc and is freed once, here.
        unsafe { sys::spdk_dma_free(self.ptr.as_ptr() as *mut c_void) };
    }
}

/// A buffer the bdev may read from or write into until the I/O completes.
///
/// # Safety
/// `io_ptr` must point to `io_len` bytes that stay valid, at the same address, for as long as
/// the value lives (moves included), and nothing else may write them meanwhile;
/// `io_mut_ptr`, where it gives a pointer, must also allow writes there.
pub unsafe trait IoBuffer: 'static {
    /// The bytes a write sends.
    fn io_ptr(&self) -> *const u8;
    /// The bytes a read fills; `None` for a read-only buffer.
    fn io_mut_ptr(&mut self) -> Option<*mut u8>;
    /// Their number.
    fn io_len(&self) -> usize;
}

/// The state one request shares between its future and SPDK's callback.
struct Request<B> {
    result: Cell<Option<bool>>,
    waker: Cell<Option<Waker>>,
    buffer: RefCell<Option<B>>,
}

extern "C" fn io_done<B: IoBuffer>(
    bdev_io: *mut sys::spdk_bdev_io,
    success: bool,
    arg: *mut c_void,
) {
    // SAFETY: SPDK hands back the bdev_io it allocated for this request; it must be freed.
    unsafe { sys::spdk_bdev_free_io(bdev_io) };
    // SAFETY: `arg` is the `Rc::into_raw` of `submit`, given to SPDK once, and SPDK calls
    // this once: the reference it held comes back here.
    let request = unsafe { Rc::from_raw(arg as *const Request<B>) };
    request.result.set(Some(success));
    if let Some(waker) = request.waker.take() {
        waker.wake();
    }
}

/// A submitted request; resolves to its buffer (or the failure) when SPDK completes it. A
/// dropped future leaves the buffer with the request until SPDK is done with it.
///
/// It drives itself: each poll polls the SPDK thread (which reaps completions) and, while the
/// request is outstanding, asks to be polled again. So it completes under any executor —
/// glommio on a shard, a plain `block_on` in tests — and spins the core while I/O is in
/// flight, as SPDK's own reactors do.
pub struct Completion<B> {
    request: Rc<Request<B>>,
    thread: Rc<SpdkThread>,
    /// Whether it was polled before: the first poll only lets other tasks run, as a request
    /// in flight does, so that what they submit meanwhile can join the same batch.
    polled: Cell<bool>,
    op: IoKind,
    offset: u64,
    len: u64,
}

impl<B> Future for Completion<B> {
    type Output = Result<Option<B>, SpdkError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.polled.replace(true) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.request.result.get().is_none() {
            self.thread.poll();
        }
        match self.request.result.get() {
            Some(true) => Poll::Ready(Ok(self.request.buffer.borrow_mut().take())),
            Some(false) => Poll::Ready(Err(SpdkError::Failed {
                op: self.op,
                offset: self.offset,
                len: self.len,
            })),
            None => {
                self.request.waker.set(Some(cx.waker().clone()));
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

extern "C" fn bdev_event(
    kind: sys::spdk_bdev_event_type,
    _bdev: *mut sys::spdk_bdev,
    _ctx: *mut c_void,
) {
    // Removal and resize are not handled: a removed bdev fails its I/O, and the shard stops.
    eprintln!("spdk: bdev event {kind} (not handled; I/O to a removed bdev fails)");
}

/// A bdev opened for writing on one shard's SPDK thread, with that thread's I/O channel.
#[derive(Debug)]
pub struct BdevHandle {
    desc: NonNull<sys::spdk_bdev_desc>,
    channel: NonNull<sys::spdk_io_channel>,
    name: String,
    block_size: u32,
    block_count: u64,
    buf_align: usize,
    /// Dropped after the channel and descriptor (see the module's drop order).
    thread: Rc<SpdkThread>,
}

impl BdevHandle {
    /// Opens bdev `name` for reading and writing on `thread`, which must be current on this
    /// OS thread.
    pub fn open(name: &str, thread: Rc<SpdkThread>) -> Result<BdevHandle, SpdkError> {
        let open_error = |reason: String| SpdkError::Open {
            bdev: name.to_string(),
            reason,
        };
        let cname = CString::new(name).map_err(|_| open_error("NUL in the name".into()))?;
        let mut desc: *mut sys::spdk_bdev_desc = std::ptr::null_mut();
        // SAFETY: `thread` is current on this OS thread (the caller's contract, and
        // SpdkThread::create made it so); `desc` is a valid out-pointer; the callback is a
        // plain function that ignores its context.
        let rc = unsafe {
            sys::spdk_set_thread(thread.thread.as_ptr());
            sys::spdk_bdev_open_ext(
                cname.as_ptr(),
                true,
                Some(bdev_event),
                std::ptr::null_mut(),
                &mut desc,
            )
        };
        if rc != 0 {
            return Err(open_error(if rc == -libc::ENODEV {
                "no such bdev (is it in the SPDK JSON config?)".into()
            } else {
                format!("spdk_bdev_open_ext returned {rc}")
            }));
        }
        let desc = NonNull::new(desc).ok_or_else(|| open_error("no descriptor".into()))?;
        // SAFETY: `desc` is an open descriptor; the bdev outlives it.
        let (block_size, block_count, buf_align) = unsafe {
            let bdev = sys::spdk_bdev_desc_get_bdev(desc.as_ptr());
            (
                sys::spdk_bdev_get_block_size(bdev),
                sys::spdk_bdev_get_num_blocks(bdev),
                sys::spdk_bdev_get_buf_align(bdev),
            )
        };
        // SAFETY: on the thread that opened `desc`.
        let channel = unsafe { sys::spdk_bdev_get_io_channel(desc.as_ptr()) };
        let Some(channel) = NonNull::new(channel) else {
            // SAFETY: closing the descriptor opened above, on the same thread.
            unsafe { sys::spdk_bdev_close(desc.as_ptr()) };
            return Err(SpdkError::Channel(format!("bdev {name}")));
        };
        Ok(BdevHandle {
            desc,
            channel,
            name: name.to_string(),
            block_size,
            block_count,
            buf_align,
            thread,
        })
    }

    /// The bdev's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Its number of blocks.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }
    /// The alignment its buffers need.
    pub fn buf_align(&self) -> usize {
        self.buf_align.max(1)
    }
    /// The SPDK thread it runs on.
    pub fn thread(&self) -> &Rc<SpdkThread> {
        &self.thread
    }

    /// Submits `op` over `len` bytes at `offset` with `buffer` (none for write-zeroes and
    /// flush). Submission failures come back at once, the buffer with them.
    pub fn submit<B: IoBuffer>(
        &self,
        op: IoKind,
        offset: u64,
        len: u64,
        mut buffer: Option<B>,
    ) -> Result<Completion<B>, (SpdkError, Option<B>)> {
        let submit_error = |rc: i32| SpdkError::Submit {
            op,
            offset,
            len,
            rc,
        };
        let pointer = match (&op, buffer.as_mut()) {
            (IoKind::Read, Some(b)) if b.io_len() as u64 >= len => match b.io_mut_ptr() {
                Some(p) => p as *mut c_void,
                None => return Err((submit_error(-libc::EROFS), buffer)),
            },
            (IoKind::Write, Some(b)) if b.io_len() as u64 >= len => b.io_ptr() as *mut c_void,
            (IoKind::Read | IoKind::Write, _) => return Err((submit_error(-libc::EINVAL), buffer)),
            _ => std::ptr::null_mut(),
        };
        let request = Rc::new(Request {
            result: Cell::new(None),
            waker: Cell::new(None),
            buffer: RefCell::new(buffer),
        });
        let arg = Rc::into_raw(Rc::clone(&request)) as *mut c_void;
        let (desc, channel) = (self.desc.as_ptr(), self.channel.as_ptr());
        // SAFETY: `desc` and `channel` are live and belong to this thread's SPDK thread, which
        // is current (set below). `pointer`, for reads and writes, points into the buffer
        // `request` owns, valid for `len` bytes until the callback has run (IoBuffer's
        // contract; the request keeps the buffer alive even if the future is dropped). `arg`
        // is one strong reference that the callback takes back.
        let rc = unsafe {
            sys::spdk_set_thread(self.thread.thread.as_ptr());
            match op {
                IoKind::Read => sys::spdk_bdev_read(
                    desc,
                    channel,
                    pointer,
                    offset,
                    len,
                    Some(io_done::<B>),
                    arg,
                ),
                IoKind::Write => sys::spdk_bdev_write(
                    desc,
                    channel,
                    pointer,
                    offset,
                    len,
                    Some(io_done::<B>),
                    arg,
                ),
                IoKind::WriteZeroes => {
                    sys::spdk_bdev_write_zeroes(desc, channel, offset, len, Some(io_done::<B>), arg)
                }
                IoKind::Flush => {
                    sys::spdk_bdev_flush(desc, channel, offset, len, Some(io_done::<B>), arg)
                }
            }
        };
        if rc != 0 {
            // SAFETY: the submission failed, so SPDK will not call back: the reference given
            // as `arg` comes back here.
            drop(unsafe { Rc::from_raw(arg as *const Request<B>) });
            let buffer = request.buffer.borrow_mut().take();
            return Err((submit_error(rc), buffer));
        }
        Ok(Completion {
            request,
            thread: Rc::clone(&self.thread),
            polled: Cell::new(false),
            op,
            offset,
            len,
        })
    }

    /// Whether the bdev supports write-zeroes natively or by emulation.
    pub fn supports_write_zeroes(&self) -> bool {
        // SAFETY: the descriptor is open; the bdev outlives it.
        unsafe {
            let bdev = sys::spdk_bdev_desc_get_bdev(self.desc.as_ptr());
            sys::spdk_bdev_io_type_supported(
                bdev,
                sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_WRITE_ZEROES,
            )
        }
    }

    /// Whether the bdev takes flushes (a malloc bdev has nothing to flush).
    pub fn supports_flush(&self) -> bool {
        // SAFETY: as above.
        unsafe {
            let bdev = sys::spdk_bdev_desc_get_bdev(self.desc.as_ptr());
            sys::spdk_bdev_io_type_supported(bdev, sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_FLUSH)
        }
    }
}

impl Drop for BdevHandle {
    fn drop(&mut self) {
        // SAFETY: the channel and the descriptor were made on `self.thread`, which is still
        // alive (held by self) and made current here; each is released once. The channel's
        // release completes through a message the thread's drop polls out.
        unsafe {
            sys::spdk_set_thread(self.thread.thread.as_ptr());
            sys::spdk_put_io_channel(self.channel.as_ptr());
            sys::spdk_bdev_close(self.desc.as_ptr());
        }
        // Let the release messages run while the thread still exists.
        for _ in 0..16 {
            self.thread.poll();
        }
    }
}
