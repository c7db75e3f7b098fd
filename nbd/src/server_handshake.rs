//! [`ServerHandshake`]: the server's side of the fixed newstyle handshake.
//!
//! ```text
//!  greeting sent ─► client flags ─► options ◄──────────────┐
//!                                    │ INFO, GO, EXPORT_NAME: Lookup event ─► answer ─┤
//!                                    │ LIST: List event ─► answer_list ───────────────┘
//!                                    │ GO or EXPORT_NAME answered with an export
//!                                    ▼
//!                                  Ready(export): transmission phase
//! ```
//!
//! Call order: send what `poll_transmit` gives (the greeting first); feed client bytes to
//! `handle_input` until it returns an event; answer a `Lookup` or `List` before calling
//! `handle_input` again (it does nothing while an answer is due). Export lookups are events,
//! not callbacks, because finding an export may need I/O that must not run where this state
//! machine runs.
//!
//! Limits against a hostile client: an option's data is at most [`MAX_OPTION_LEN`] bytes
//! (longer ones end the connection before they are buffered), and a client gets
//! [`MAX_OPTIONS`] options to reach the transmission phase.

use crate::error::Error;
use crate::export::{BlockSize, Context, Export};
use crate::wire::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The longest option data accepted: an export name and a few metadata context queries.
pub const MAX_OPTION_LEN: u32 = 4 * MAX_STRING as u32 + 64;
/// Options a client may send before it must enter transmission.
pub const MAX_OPTIONS: u32 = 64;
/// The id this server gives `base:allocation` (the only context it offers).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the host knows about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags to advertise (`wire::FLAG_*`; HAS_FLAGS is added).
    pub flags: u16,
    pub block_size: BlockSize,
}

/// Why a lookup failed, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupError {
    /// An NBD_REP_ERR_* value (usually [`REP_ERR_UNKNOWN`] or [`REP_ERR_POLICY`]).
    pub reply: u32,
    pub message: String,
}

/// What the host must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeEvent {
    /// Find the export `name` and call [`ServerHandshake::answer`].
    Lookup { name: String },
    /// List the exports with [`ServerHandshake::answer_list`].
    List,
    /// The transmission phase begins with this export (bytes after the handshake stay in the
    /// input buffer).
    Ready(Export),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    /// An answer to a Lookup for this option is due.
    Lookup {
        opt: u32,
        name: String,
        infos: Vec<u16>,
    },
    List,
    Done,
    Failed,
}

pub struct ServerHandshake {
    state: State,
    out: BytesMut,
    no_zeroes: bool,
    structured: bool,
    /// The export a SET_META_CONTEXT named, and whether it selected base:allocation.
    meta: Option<(String, bool)>,
    options: u32,
    offer_structured: bool,
}

impl Default for ServerHandshake {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerHandshake {
    /// Starts a handshake; the greeting is queued.
    pub fn new() -> ServerHandshake {
        let mut out = BytesMut::new();
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        ServerHandshake {
            state: State::ClientFlags,
            out,
            no_zeroes: false,
            structured: false,
            meta: None,
            options: 0,
            offer_structured: true,
        }
    }

    /// Refuses NBD_OPT_STRUCTURED_REPLY, so the client gets simple replies (and no block
    /// status), as from an old server.
    pub fn without_structured_replies(mut self) -> Self {
        self.offer_structured = false;
        self
    }

    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// Whether an answer is due (input is not looked at until then).
    pub fn awaiting_answer(&self) -> bool {
        matches!(self.state, State::Lookup { .. } | State::List)
    }

    /// Handles the client's messages at the front of `input` until one needs the host.
    /// `Err(Disconnected)` is a client's NBD_OPT_ABORT (its ACK is queued: send it, then
    /// close); any other error means: close now.
    pub fn handle_input(&mut self, input: &mut BytesMut) -> Result<Option<HandshakeEvent>, Error> {
        let r = self.step(input);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn step(&mut self, input: &mut BytesMut) -> Result<Option<HandshakeEvent>, Error> {
        loop {
            match &self.state {
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(None);
                    }
                    let flags = input.get_u32();
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return Err(Error::protocol(format!("unknown client flags {flags:#x}")));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => {
                    if input.len() < OPTION_HEADER_LEN {
                        return Ok(None);
                    }
                    let magic = be64(&input[0..8]);
                    let opt = be32(&input[8..12]);
                    let len = be32(&input[12..16]);
                    if magic != IHAVEOPT {
                        return Err(Error::protocol(format!(
                            "option magic {magic:#x} is not IHAVEOPT"
                        )));
                    }
                    if len > MAX_OPTION_LEN {
                        return Err(Error::protocol(format!(
                            "{} with {len} bytes of data (at most {MAX_OPTION_LEN})",
                            option_name(opt)
                        )));
                    }
                    if input.len() < OPTION_HEADER_LEN + len as usize {
                        return Ok(None);
                    }
                    self.options += 1;
                    if self.options > MAX_OPTIONS {
                        return Err(Error::protocol(format!(
                            "more than {MAX_OPTIONS} options without choosing an export"
                        )));
                    }
                    input.advance(OPTION_HEADER_LEN);
                    let data = input.split_to(len as usize).freeze();
                    if let Some(event) = self.option(opt, data)? {
                        return Ok(Some(event));
                    }
                }
                State::Lookup { .. } | State::List => return Ok(None),
                State::Done => return Err(Error::invalid("the handshake is already complete")),
                State::Failed => return Err(Error::invalid("the handshake failed earlier")),
            }
        }
    }

    fn reply(&mut self, opt: u32, rtype: u32, data: &[u8]) {
        self.out.put_u64(OPTION_REPLY_MAGIC);
        self.out.put_u32(opt);
        self.out.put_u32(rtype);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }

    fn error(&mut self, opt: u32, rtype: u32, message: &str) {
        let m = &message.as_bytes()[..message.len().min(MAX_STRING)];
        self.reply(opt, rtype, m);
    }

    fn option(&mut self, opt: u32, mut data: Bytes) -> Result<Option<HandshakeEvent>, Error> {
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data.to_vec())
                    .map_err(|_| Error::protocol("export name is not UTF-8"))?;
                if name.len() > MAX_STRING {
                    return Err(Error::protocol("export name longer than 4096 bytes"));
                }
                self.state = State::Lookup {
                    opt,
                    name: name.clone(),
                    infos: Vec::new(),
                };
                return Ok(Some(HandshakeEvent::Lookup { name }));
            }
            OPT_ABORT => {
                self.reply(opt, REP_ACK, &[]);
                return Err(Error::Disconnected);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    self.state = State::List;
                    return Ok(Some(HandshakeEvent::List));
                }
            }
            OPT_INFO | OPT_GO => match parse_info(&mut data) {
                Ok((name, infos)) => {
                    self.state = State::Lookup {
                        opt,
                        name: name.clone(),
                        infos,
                    };
                    return Ok(Some(HandshakeEvent::Lookup { name }));
                }
                Err(m) => self.error(opt, REP_ERR_INVALID, m),
            },
            OPT_STRUCTURED_REPLY => {
                if !self.offer_structured {
                    self.error(opt, REP_ERR_UNSUP, "");
                } else if !data.is_empty() {
                    self.error(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if self.structured {
                    self.error(
                        opt,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    self.structured = true;
                    self.reply(opt, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    self.meta = None;
                }
                if !self.structured {
                    self.error(opt, REP_ERR_INVALID, "negotiate structured replies first");
                } else {
                    match parse_meta(&mut data) {
                        Ok((name, queries)) => self.meta_context(opt, name, &queries),
                        Err(m) => self.error(opt, REP_ERR_INVALID, m),
                    }
                }
            }
            OPT_STARTTLS => self.error(opt, REP_ERR_UNSUP, "TLS is not offered"),
            _ => self.error(opt, REP_ERR_UNSUP, ""),
        }
        Ok(None)
    }

    fn meta_context(&mut self, opt: u32, name: String, queries: &[String]) {
        let set = opt == OPT_SET_META_CONTEXT;
        let matches = if set {
            queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION)
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| q == "base:" || q == CONTEXT_BASE_ALLOCATION)
        };
        if matches {
            let mut data = BytesMut::new();
            data.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
            data.put_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &data);
        }
        if set {
            self.meta = Some((name, matches));
        }
        self.reply(opt, REP_ACK, &[]);
    }

    /// Answers the pending `Lookup`. With an export, NBD_OPT_GO and NBD_OPT_EXPORT_NAME enter
    /// the transmission phase: the returned event is `Ready`. An error for NBD_OPT_EXPORT_NAME
    /// ends the connection (that option cannot report one): close after sending what is
    /// queued.
    pub fn answer(
        &mut self,
        result: Result<ExportInfo, LookupError>,
    ) -> Result<Option<HandshakeEvent>, Error> {
        let State::Lookup { opt, name, infos } = std::mem::replace(&mut self.state, State::Options)
        else {
            return Err(Error::invalid("no lookup is pending"));
        };
        let info = match result {
            Ok(info) => info,
            Err(e) if opt == OPT_EXPORT_NAME => {
                self.state = State::Failed;
                return Err(Error::Refused {
                    option: opt,
                    reply: e.reply,
                    message: e.message,
                });
            }
            Err(e) => {
                self.error(opt, e.reply | REP_ERR_BIT, &e.message);
                return Ok(None);
            }
        };
        let mut flags = info.flags | FLAG_HAS_FLAGS;
        if !self.structured {
            flags &= !FLAG_SEND_DF;
        }
        if flags & FLAG_SEND_WRITE_ZEROES == 0 {
            flags &= !FLAG_SEND_FAST_ZERO;
        }
        if opt == OPT_EXPORT_NAME {
            self.out.put_u64(info.size);
            self.out.put_u16(flags);
            if !self.no_zeroes {
                self.out.put_bytes(0, 124);
            }
        } else {
            let mut data = BytesMut::new();
            data.put_u16(INFO_EXPORT);
            data.put_u64(info.size);
            data.put_u16(flags);
            self.reply(opt, REP_INFO, &data);
            // Sent whether asked or not: a client that did not ask may ignore it.
            let mut data = BytesMut::new();
            data.put_u16(INFO_BLOCK_SIZE);
            data.put_u32(info.block_size.minimum);
            data.put_u32(info.block_size.preferred);
            data.put_u32(info.block_size.maximum);
            self.reply(opt, REP_INFO, &data);
            if infos.contains(&INFO_NAME) {
                let mut data = BytesMut::new();
                data.put_u16(INFO_NAME);
                data.put_slice(name.as_bytes());
                self.reply(opt, REP_INFO, &data);
            }
            self.reply(opt, REP_ACK, &[]);
            if opt == OPT_INFO {
                return Ok(None);
            }
        }
        let contexts = match &self.meta {
            // Selected contexts are promised when SET_META_CONTEXT is answered, before the
            // export is known: every export answers base:allocation (a host that cannot tell
            // reports everything as data, which the protocol allows).
            Some((meta_name, true)) if *meta_name == name => {
                vec![Context {
                    id: BASE_ALLOCATION_ID,
                    name: CONTEXT_BASE_ALLOCATION.into(),
                }]
            }
            _ => Vec::new(),
        };
        self.state = State::Done;
        Ok(Some(HandshakeEvent::Ready(Export {
            name,
            size: info.size,
            flags,
            structured: self.structured,
            contexts,
            block_size: info.block_size,
        })))
    }

    /// Answers the pending `List` with the export names.
    pub fn answer_list(&mut self, names: &[String]) -> Result<(), Error> {
        if self.state != State::List {
            return Err(Error::invalid("no list is pending"));
        }
        self.state = State::Options;
        for n in names {
            let mut data = BytesMut::new();
            put_string32(&mut data, n);
            self.reply(OPT_LIST, REP_SERVER, &data);
        }
        self.reply(OPT_LIST, REP_ACK, &[]);
        Ok(())
    }
}

fn get_string32(data: &mut Bytes, what: &'static str) -> Result<String, &'static str> {
    if data.len() < 4 {
        return Err(what);
    }
    let len = data.get_u32() as usize;
    if len > data.len() || len > MAX_STRING {
        return Err(what);
    }
    String::from_utf8(data.split_to(len).to_vec()).map_err(|_| what)
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO: a name and information requests.
fn parse_info(data: &mut Bytes) -> Result<(String, Vec<u16>), &'static str> {
    const BAD: &str = "malformed NBD_OPT_INFO/NBD_OPT_GO data";
    let name = get_string32(data, BAD)?;
    if data.len() < 2 {
        return Err(BAD);
    }
    let n = data.get_u16() as usize;
    if data.len() != 2 * n {
        return Err(BAD);
    }
    Ok((name, (0..n).map(|_| data.get_u16()).collect()))
}

/// The data of the META_CONTEXT options: a name and queries.
fn parse_meta(data: &mut Bytes) -> Result<(String, Vec<String>), &'static str> {
    const BAD: &str = "malformed metadata context option data";
    let name = get_string32(data, BAD)?;
    if data.len() < 4 {
        return Err(BAD);
    }
    let n = data.get_u32() as usize;
    // Each query takes at least its 4-byte length: a count that cannot fit is refused
    // before anything is allocated for it.
    if n > data.len() / 4 {
        return Err(BAD);
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(get_string32(data, BAD)?);
    }
    if !data.is_empty() {
        return Err(BAD);
    }
    Ok((name, queries))
}
