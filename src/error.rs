//! The CLI's errors: each prints as one line and maps to an exit code.

use std::fmt;

#[derive(Debug)]
pub enum CliError {
    /// Bad arguments (exit 2).
    Usage(String),
    /// The server could not be reached or the service could not start (exit 3).
    Connect(String),
    /// Transfers failed; each line was already printed (exit 1).
    Transfers { failed: usize, total: usize },
    /// Anything else (exit 1).
    Other(String),
    /// SIGINT or SIGTERM stopped the command after its transfers were cleaned up (exit
    /// 128 + the signal, as a shell reports a process the signal killed).
    Interrupted {
        signal: nix::sys::signal::Signal,
        stopped: usize,
        total: usize,
        /// Downloads with --resume keep their partials.
        kept: bool,
    },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Connect(_) => 3,
            CliError::Transfers { .. } | CliError::Other(_) => 1,
            CliError::Interrupted { signal, .. } => 128 + *signal as u8,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(m) => write!(f, "{m} (see --help)"),
            CliError::Connect(m) | CliError::Other(m) => f.write_str(m),
            CliError::Transfers { failed, total } => {
                write!(f, "{failed} of {total} transfers failed")
            }
            CliError::Interrupted {
                signal,
                stopped,
                total,
                kept: false,
            } => write!(
                f,
                "interrupted by {signal}: stopped {stopped} of {total} transfers and removed \
                 their temporary files"
            ),
            CliError::Interrupted {
                signal,
                stopped,
                total,
                kept: true,
            } => write!(
                f,
                "interrupted by {signal}: stopped {stopped} of {total} transfers and kept their \
                 partial files: run the same command (with --resume) to continue"
            ),
        }
    }
}
