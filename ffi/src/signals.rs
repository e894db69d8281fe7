//! Signal dispositions a command-line tool needs.

/// Restores the default action of `SIGPIPE` (end the process), which the Rust runtime sets to
/// "ignore" at start: a tool whose output goes into a pipe that closed early (`chunkctl
/// status | head`) then ends quietly, as a Unix tool does, instead of failing to print.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler (no code runs on the signal), and
    // changing a disposition of the whole process is what the caller asks for; it is called
    // before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
