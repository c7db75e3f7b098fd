//! What a handshake settles: the export's size, transmission flags, size constraints and the
//! metadata contexts both sides agreed on.

use crate::wire;

/// Size constraints (`NBD_INFO_BLOCK_SIZE`), or the protocol's defaults when none were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Offsets and lengths of requests are multiples of this.
    pub minimum: u32,
    /// Requests aligned to this avoid read-modify-write at the server.
    pub preferred: u32,
    /// The largest READ or WRITE payload the server takes.
    pub maximum: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: wire::DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl BlockSize {
    /// Checks the rules of the specification's "Size constraints" section.
    pub fn validate(&self) -> Result<(), String> {
        let BlockSize {
            minimum,
            preferred,
            maximum,
        } = *self;
        if !minimum.is_power_of_two() || minimum > 1 << 16 {
            return Err(format!(
                "minimum block size {minimum} is not a power of two up to 65536"
            ));
        }
        if !preferred.is_power_of_two() || preferred < minimum.max(512) {
            return Err(format!(
                "preferred block size {preferred} is not a power of two of at least {}",
                minimum.max(512)
            ));
        }
        if maximum < preferred {
            return Err(format!(
                "maximum payload {maximum} is below the preferred block size {preferred}"
            ));
        }
        Ok(())
    }
}

/// A metadata context as the server numbered it for this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub id: u32,
    pub name: String,
}

/// An export as negotiated, seen from either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    pub size: u64,
    /// Transmission flags (`wire::FLAG_*`).
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The selected metadata contexts (empty without structured replies).
    pub contexts: Vec<Context>,
    pub block_size: BlockSize,
}

impl Export {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    pub fn read_only(&self) -> bool {
        self.has(wire::FLAG_READ_ONLY)
    }
    pub fn can_flush(&self) -> bool {
        self.has(wire::FLAG_SEND_FLUSH)
    }
    pub fn can_fua(&self) -> bool {
        self.has(wire::FLAG_SEND_FUA)
    }
    pub fn can_trim(&self) -> bool {
        self.has(wire::FLAG_SEND_TRIM)
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.has(wire::FLAG_SEND_WRITE_ZEROES)
    }
    pub fn can_fast_zero(&self) -> bool {
        self.can_write_zeroes() && self.has(wire::FLAG_SEND_FAST_ZERO)
    }
    pub fn can_df(&self) -> bool {
        self.structured && self.has(wire::FLAG_SEND_DF)
    }
    pub fn can_multi_conn(&self) -> bool {
        self.has(wire::FLAG_CAN_MULTI_CONN)
    }
    /// The id of a selected metadata context.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.name == name).map(|c| c.id)
    }
}
