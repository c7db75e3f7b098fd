//! The crate's one error type. Every error ends the connection (a violation by the peer, a
//! refusal during the handshake, or a misuse by the caller); a failed command is not an error
//! of the connection but a [`CommandError`] in its reply.

use crate::wire;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The peer broke the protocol (bad magic, a reply for a request never made, a chunk
    /// outside its request, a length past a limit...). The connection must be dropped.
    Protocol(String),
    /// The server refused a handshake option it needed (an unknown export, TLS required).
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    /// The peer lacks something this side needs (fixed newstyle, a transmission flag).
    Unsupported(String),
    /// The caller asked for something the negotiated export does not allow (a write to a
    /// read-only export, a range past its end, more requests than the in-flight bound).
    Invalid(String),
    /// The client ended the handshake (NBD_OPT_ABORT) or disconnected (NBD_CMD_DISC).
    Disconnected,
}

impl Error {
    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::Protocol(message.into())
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Protocol(m) => write!(f, "NBD protocol violation by the peer: {m}"),
            Error::Refused {
                option,
                reply,
                message,
            } => {
                write!(
                    f,
                    "server refused {}: {}",
                    wire::option_name(*option),
                    wire::reply_name(*reply)
                )?;
                if !message.is_empty() {
                    write!(f, " ({message})")?;
                }
                Ok(())
            }
            Error::Unsupported(m) => write!(f, "NBD peer does not support {m}"),
            Error::Invalid(m) => f.write_str(m),
            Error::Disconnected => f.write_str("the NBD client disconnected"),
        }
    }
}

impl std::error::Error for Error {}

/// A command the server failed: the NBD error value and the server's message, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub errno: u32,
    pub message: String,
}

impl CommandError {
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        CommandError {
            errno,
            message: message.into(),
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(wire::errno_name(self.errno))?;
        if !self.message.is_empty() {
            write!(f, " ({})", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for CommandError {}
