//! [`ClientHandshake`]: the client's side of the fixed newstyle handshake.
//!
//! The client asks, one option at a time (the protocol forbids pipelining options):
//!
//! ```text
//!  greeting ──► STRUCTURED_REPLY ──► SET_META_CONTEXT ──► GO ──────────────► transmission
//!               (refused: simple      (skipped without     │ refused as unknown
//!                replies only)         structured replies)  └► EXPORT_NAME ──► transmission
//! ```
//!
//! Call order: `handle_input` with what the server sent (it consumes whole messages from the
//! front of the buffer), then send what `poll_transmit` gives, until `handle_input` returns the
//! negotiated [`Export`]. Bytes after the handshake stay in the buffer.

use crate::error::Error;
use crate::export::{BlockSize, Context, Export};
use crate::wire::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Option replies longer than this end the handshake: no reply we understand needs more than a
/// string of [`MAX_STRING`] bytes and a few fields.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// A server may send this many replies to one option (context lists, information items).
const MAX_REPLIES_PER_OPTION: u32 = 64;

/// What the client wants from the server.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The export to open ("" is the server's default export).
    pub export: String,
    /// Metadata contexts to select, such as [`CONTEXT_BASE_ALLOCATION`].
    pub contexts: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    /// Waiting for replies to this option.
    Option(u32),
    /// Waiting for the fixed-size reply to NBD_OPT_EXPORT_NAME.
    ExportName,
    Done,
    Failed,
}

pub struct ClientHandshake {
    options: ClientOptions,
    state: State,
    out: BytesMut,
    no_zeroes: bool,
    structured: bool,
    contexts: Vec<Context>,
    size_flags: Option<(u64, u16)>,
    block_size: Option<BlockSize>,
    replies: u32,
}

impl ClientHandshake {
    pub fn new(options: ClientOptions) -> Result<ClientHandshake, Error> {
        if options.export.len() > MAX_STRING {
            return Err(Error::invalid(format!(
                "export name of {} bytes (at most {MAX_STRING})",
                options.export.len()
            )));
        }
        if let Some(c) = options.contexts.iter().find(|c| c.len() > MAX_STRING) {
            return Err(Error::invalid(format!(
                "metadata context name of {} bytes (at most {MAX_STRING})",
                c.len()
            )));
        }
        Ok(ClientHandshake {
            options,
            state: State::Greeting,
            out: BytesMut::new(),
            no_zeroes: false,
            structured: false,
            contexts: Vec::new(),
            size_flags: None,
            block_size: None,
            replies: 0,
        })
    }

    /// Bytes to send to the server now.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// At least this many bytes must be in the input for the next step (a hint for a blocking
    /// reader; `handle_input` works with any amount).
    pub fn needed(&self, input: &BytesMut) -> usize {
        match self.state {
            State::Greeting => GREETING_LEN,
            State::ExportName if self.no_zeroes => 10,
            State::ExportName => EXPORT_NAME_REPLY_LEN,
            State::Option(_) if input.len() >= OPTION_REPLY_HEADER_LEN => {
                OPTION_REPLY_HEADER_LEN + be32(&input[16..20]) as usize
            }
            State::Option(_) => OPTION_REPLY_HEADER_LEN,
            State::Done | State::Failed => 0,
        }
    }

    /// Handles the server's messages at the front of `input`; the export once the handshake
    /// is complete.
    pub fn handle_input(&mut self, input: &mut BytesMut) -> Result<Option<Export>, Error> {
        let r = self.step_all(input);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn step_all(&mut self, input: &mut BytesMut) -> Result<Option<Export>, Error> {
        loop {
            match self.state {
                State::Greeting => {
                    if input.len() < GREETING_LEN {
                        return Ok(None);
                    }
                    self.greeting(input)?;
                }
                State::ExportName => {
                    let need = if self.no_zeroes {
                        10
                    } else {
                        EXPORT_NAME_REPLY_LEN
                    };
                    if input.len() < need {
                        return Ok(None);
                    }
                    let size = input.get_u64();
                    let flags = input.get_u16();
                    input.advance(need - 10);
                    self.size_flags = Some((size, flags));
                    return self.finish().map(Some);
                }
                State::Option(opt) => {
                    if input.len() < OPTION_REPLY_HEADER_LEN {
                        return Ok(None);
                    }
                    let magic = be64(&input[0..8]);
                    let ropt = be32(&input[8..12]);
                    let rtype = be32(&input[12..16]);
                    let len = be32(&input[16..20]);
                    if magic != OPTION_REPLY_MAGIC {
                        return Err(Error::protocol(format!(
                            "option reply magic {magic:#x}, expected {OPTION_REPLY_MAGIC:#x}"
                        )));
                    }
                    if ropt != opt {
                        return Err(Error::protocol(format!(
                            "reply for {} while {} was asked",
                            option_name(ropt),
                            option_name(opt)
                        )));
                    }
                    if len > MAX_OPTION_REPLY {
                        return Err(Error::protocol(format!(
                            "option reply of {len} bytes (at most {MAX_OPTION_REPLY})"
                        )));
                    }
                    if input.len() < OPTION_REPLY_HEADER_LEN + len as usize {
                        return Ok(None);
                    }
                    input.advance(OPTION_REPLY_HEADER_LEN);
                    let payload = input.split_to(len as usize).freeze();
                    self.replies += 1;
                    if self.replies > MAX_REPLIES_PER_OPTION {
                        return Err(Error::protocol(format!(
                            "more than {MAX_REPLIES_PER_OPTION} replies to {}",
                            option_name(opt)
                        )));
                    }
                    if let Some(export) = self.option_reply(opt, rtype, payload)? {
                        return Ok(Some(export));
                    }
                }
                State::Done => return Err(Error::invalid("the handshake is already complete")),
                State::Failed => return Err(Error::invalid("the handshake failed earlier")),
            }
        }
    }

    fn greeting(&mut self, input: &mut BytesMut) -> Result<(), Error> {
        let magic = input.get_u64();
        if magic != NBDMAGIC {
            return Err(Error::protocol(format!(
                "greeting magic {magic:#x} is not NBDMAGIC (not an NBD server?)"
            )));
        }
        let second = input.get_u64();
        if second == OLDSTYLE_MAGIC {
            return Err(Error::Unsupported(
                "the newstyle handshake (it speaks the oldstyle one)".into(),
            ));
        }
        if second != IHAVEOPT {
            return Err(Error::protocol(format!(
                "greeting magic {second:#x} is not IHAVEOPT"
            )));
        }
        let flags = input.get_u16();
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Error::Unsupported("the fixed newstyle handshake".into()));
        }
        self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let mut client = FLAG_C_FIXED_NEWSTYLE;
        if self.no_zeroes {
            client |= FLAG_C_NO_ZEROES;
        }
        self.out.put_u32(client);
        self.send_option(OPT_STRUCTURED_REPLY, &[]);
        Ok(())
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) {
        self.out.put_u64(IHAVEOPT);
        self.out.put_u32(opt);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
        self.state = State::Option(opt);
        self.replies = 0;
    }

    fn send_meta_or_go(&mut self) {
        if self.structured && !self.options.contexts.is_empty() {
            let mut data = BytesMut::new();
            put_string32(&mut data, &self.options.export);
            data.put_u32(self.options.contexts.len() as u32);
            for c in &self.options.contexts {
                put_string32(&mut data, c);
            }
            self.send_option(OPT_SET_META_CONTEXT, &data);
        } else {
            self.send_go();
        }
    }

    fn send_go(&mut self) {
        let mut data = BytesMut::new();
        put_string32(&mut data, &self.options.export);
        // Asking for the size constraints commits this side to honouring them; `Client`
        // checks every request against them.
        data.put_u16(1);
        data.put_u16(INFO_BLOCK_SIZE);
        self.send_option(OPT_GO, &data);
    }

    fn option_reply(
        &mut self,
        opt: u32,
        rtype: u32,
        mut payload: Bytes,
    ) -> Result<Option<Export>, Error> {
        let refused = |payload: &Bytes| Error::Refused {
            option: opt,
            reply: rtype,
            message: text(payload),
        };
        match (opt, rtype) {
            (OPT_STRUCTURED_REPLY, REP_ACK) => {
                self.structured = true;
                self.send_meta_or_go();
            }
            (OPT_STRUCTURED_REPLY, r) if r & REP_ERR_BIT != 0 => {
                log::debug!("server refused structured replies: {}", reply_name(r));
                self.send_meta_or_go();
            }
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT) => {
                if payload.len() < 4 {
                    return Err(Error::protocol("META_CONTEXT reply shorter than 4 bytes"));
                }
                let id = payload.get_u32();
                let name = String::from_utf8(payload.to_vec())
                    .map_err(|_| Error::protocol("metadata context name is not UTF-8"))?;
                if !self.options.contexts.contains(&name) {
                    return Err(Error::protocol(format!(
                        "server selected metadata context {name:?}, which was not asked for"
                    )));
                }
                if self.contexts.iter().any(|c| c.id == id || c.name == name) {
                    return Err(Error::protocol(format!(
                        "metadata context {name:?} (id {id}) selected twice"
                    )));
                }
                self.contexts.push(Context { id, name });
            }
            (OPT_SET_META_CONTEXT, REP_ACK) => self.send_go(),
            (OPT_SET_META_CONTEXT, r) if r & REP_ERR_BIT != 0 => {
                log::debug!("server refused metadata contexts: {}", reply_name(r));
                self.contexts.clear();
                self.send_go();
            }
            (OPT_GO, REP_INFO) => {
                if payload.len() < 2 {
                    return Err(Error::protocol("INFO reply shorter than 2 bytes"));
                }
                match payload.get_u16() {
                    INFO_EXPORT => {
                        if payload.len() != 10 {
                            return Err(Error::protocol(format!(
                                "INFO_EXPORT of {} bytes, expected 12",
                                payload.len() + 2
                            )));
                        }
                        self.size_flags = Some((payload.get_u64(), payload.get_u16()));
                    }
                    INFO_BLOCK_SIZE => {
                        if payload.len() != 12 {
                            return Err(Error::protocol(format!(
                                "INFO_BLOCK_SIZE of {} bytes, expected 14",
                                payload.len() + 2
                            )));
                        }
                        let bs = BlockSize {
                            minimum: payload.get_u32(),
                            preferred: payload.get_u32(),
                            maximum: payload.get_u32(),
                        };
                        bs.validate().map_err(Error::Protocol)?;
                        self.block_size = Some(bs);
                    }
                    // Names and descriptions are for people; others are unknown to us.
                    _ => {}
                }
            }
            (OPT_GO, REP_ACK) => return self.finish().map(Some),
            (OPT_GO, REP_ERR_UNSUP) => {
                // A server from before NBD_OPT_GO: the old way, which cannot report errors.
                self.out.put_u64(IHAVEOPT);
                self.out.put_u32(OPT_EXPORT_NAME);
                self.out.put_u32(self.options.export.len() as u32);
                self.out.put_slice(self.options.export.as_bytes());
                self.state = State::ExportName;
            }
            (_, r) if r & REP_ERR_BIT != 0 => return Err(refused(&payload)),
            (_, r) => {
                return Err(Error::protocol(format!(
                    "unexpected reply {} to {}",
                    reply_name(r),
                    option_name(opt)
                )))
            }
        }
        Ok(None)
    }

    fn finish(&mut self) -> Result<Export, Error> {
        let (size, flags) = self
            .size_flags
            .ok_or_else(|| Error::protocol("NBD_OPT_GO succeeded without INFO_EXPORT"))?;
        if flags & FLAG_HAS_FLAGS == 0 {
            return Err(Error::protocol(
                "transmission flags without NBD_FLAG_HAS_FLAGS",
            ));
        }
        if size > i64::MAX as u64 {
            return Err(Error::protocol(format!("export size {size} past 2^63")));
        }
        self.state = State::Done;
        Ok(Export {
            name: self.options.export.clone(),
            size,
            flags,
            structured: self.structured,
            contexts: std::mem::take(&mut self.contexts),
            block_size: self.block_size.unwrap_or_default(),
        })
    }
}
