//! Block status of an NBD export, asked one range at a time: `base:allocation` (hole, zero)
//! and, where the server has it, `qemu:allocation-depth` (which layer of a backing chain holds
//! a range).

use super::conn::Conn;
use crate::error::Error;
use engine::document::{ExtentEntry, ExtentKind, Layer};
use nbd::wire::{CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
use nbd::{Command, Descriptor, Reply, Uri};

/// Bytes asked about per BLOCK_STATUS request: the protocol caps a request below 4 GiB, and a
/// server answers a range at a time anyway.
pub const STATUS_RANGE: u64 = 1 << 30;

/// What block status says about `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub offset: u64,
    pub len: u64,
    /// `base:allocation` flags (`STATE_HOLE`, `STATE_ZERO`); 0 (data) when not negotiated.
    pub flags: u32,
    /// `qemu:allocation-depth`: 0 in no layer, 1 the top layer, 2 its backing file, ...
    pub depth: Option<u32>,
}

impl Status {
    /// Reads as zeroes without being read.
    pub fn zero(&self) -> bool {
        self.flags & STATE_ZERO != 0
    }
    /// Allocated (NBD_STATE_HOLE clear).
    pub fn data(&self) -> bool {
        self.flags & STATE_HOLE == 0
    }

    /// Allocated in some layer of the chain (known only with allocation depth).
    pub fn present(&self) -> Option<bool> {
        self.depth.map(|d| d > 0)
    }

    /// What the range is, in the words `volstream extents` uses: with allocation depth
    /// `data` (the top layer's), `backing` (a lower layer's), `zero` (allocated, reads as
    /// zero) or `unallocated` (in no layer); without it `data`, `zero` or `hole`.
    pub fn kind(&self) -> ExtentKind {
        match self.depth {
            Some(0) => ExtentKind::Unallocated,
            Some(_) if self.zero() => ExtentKind::Zero,
            Some(1) => ExtentKind::Data,
            Some(_) => ExtentKind::Backing,
            None if !self.data() => ExtentKind::Hole,
            None if self.zero() => ExtentKind::Zero,
            None => ExtentKind::Data,
        }
    }

    /// The range as an allocation map entry (see `Provider::open_extents`), with depth counted
    /// as `qemu-img map` does (0 the top layer) where it is known. `layers` is the chain's
    /// length, when known: qemu-img gives ranges in no layer the depth of the deepest one.
    pub fn entry(&self, layers: Option<u32>) -> ExtentEntry {
        let layer = self.depth.map(|d| Layer {
            depth: match d {
                0 => layers.map(|l| l.saturating_sub(1)),
                d => Some(d - 1),
            },
            present: d > 0,
            zero: self.zero(),
            data: self.data(),
        });
        ExtentEntry {
            layer,
            ..ExtentEntry::new(self.offset, self.len, self.kind())
        }
    }
}

/// Joins the replies of one BLOCK_STATUS request: consecutive statuses from `offset`, as far
/// as every context answered.
pub fn combine(offset: u64, base: &[Descriptor], depth: Option<&[Descriptor]>) -> Vec<Status> {
    let total = |d: &[Descriptor]| d.iter().map(|x| x.len as u64).sum::<u64>();
    let end = offset
        + match depth {
            Some(d) => total(base).min(total(d)),
            None => total(base),
        };
    let mut out: Vec<Status> = Vec::new();
    let (mut bi, mut di) = (0, 0);
    let (mut b_end, mut d_end) = (offset, offset);
    let mut pos = offset;
    while pos < end {
        while b_end <= pos {
            b_end += base[bi].len as u64;
            bi += 1;
        }
        let flags = base[bi - 1].flags;
        let mut stop = b_end;
        let mut level = None;
        if let Some(d) = depth {
            while d_end <= pos {
                d_end += d[di].len as u64;
                di += 1;
            }
            level = Some(d[di - 1].flags);
            stop = stop.min(d_end);
        }
        let stop = stop.min(end);
        match out.last_mut() {
            Some(s) if s.flags == flags && s.depth == level && s.offset + s.len == pos => {
                s.len += stop - pos
            }
            _ => out.push(Status {
                offset: pos,
                len: stop - pos,
                flags,
                depth: level,
            }),
        }
        pos = stop;
    }
    out
}

/// The replies to one BLOCK_STATUS, gathered until its Done.
#[derive(Default)]
pub struct Gather {
    pub base: Option<Vec<Descriptor>>,
    pub depth: Option<Vec<Descriptor>>,
}

impl Gather {
    /// Takes one reply piece for this request.
    pub fn take(&mut self, base_id: Option<u32>, depth_id: Option<u32>, r: Reply) {
        if let Reply::BlockStatus {
            context, extents, ..
        } = r
        {
            if Some(context) == base_id {
                self.base = Some(extents);
            } else if Some(context) == depth_id {
                self.depth = Some(extents);
            }
        }
    }
}

/// The allocation map of a whole export, asked a range at a time, with the server's
/// `qemu:allocation-depth` where it has one. Blocks the calling thread.
pub fn map(uri: &Uri) -> Result<Vec<Status>, Error> {
    map_as(uri, uri.to_string())
}

/// [`map`], calling the export `shown` in messages.
pub fn map_as(uri: &Uri, shown: String) -> Result<Vec<Status>, Error> {
    let contexts = [CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH];
    let mut conn = Conn::open_as(uri, shown, &contexts, 2)?;
    let export = conn.export().clone();
    let base_id = export.context(CONTEXT_BASE_ALLOCATION);
    let depth_id = export.context(CONTEXT_ALLOCATION_DEPTH);
    let mut out: Vec<Status> = Vec::new();
    let mut pos = 0;
    while pos < export.size {
        let statuses = match base_id {
            None => vec![Status {
                offset: pos,
                len: export.size - pos,
                flags: 0,
                depth: None,
            }],
            Some(_) => {
                let len = (export.size - pos).min(STATUS_RANGE) as u32;
                let cookie = conn.send(Command::BlockStatus {
                    offset: pos,
                    len,
                    req_one: false,
                })?;
                let mut g = Gather::default();
                loop {
                    match conn.recv()? {
                        Reply::Done { cookie: c, result } if c == cookie => {
                            result.map_err(|e| Error::NbdCommand {
                                context: format!("{}: block status at {pos}", conn.shown()),
                                source: e,
                            })?;
                            break;
                        }
                        r => g.take(base_id, depth_id, r),
                    }
                }
                let base = g.base.unwrap_or_default();
                combine(pos, &base, g.depth.as_deref())
                    .into_iter()
                    .map(|s| Status {
                        len: s.len.min(export.size - s.offset),
                        ..s
                    })
                    .filter(|s| s.len > 0)
                    .collect()
            }
        };
        // The client checked that a reply covers at least one byte.
        let end = statuses.last().map(|s| s.offset + s.len).unwrap_or(pos);
        if end <= pos {
            return Err(Error::Nbd {
                context: conn.shown().to_string(),
                source: nbd::Error::Protocol("block status made no progress".into()),
            });
        }
        for s in statuses {
            match out.last_mut() {
                Some(l) if l.flags == s.flags && l.depth == s.depth => l.len += s.len,
                _ => out.push(s),
            }
        }
        pos = end;
    }
    conn.disconnect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(len: u32, flags: u32) -> Descriptor {
        Descriptor { len, flags }
    }

    #[test]
    fn combines_two_contexts_to_where_both_answered() {
        let base = [d(100, 0), d(50, 3)];
        let depth = [d(40, 1), d(80, 2)];
        let got = combine(1000, &base, Some(&depth));
        let want = [(1000, 40, 0, 1), (1040, 60, 0, 2), (1100, 20, 3, 2)];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, (o, l, f, dep)) in got.iter().zip(want) {
            assert_eq!((g.offset, g.len, g.flags, g.depth), (o, l, f, Some(dep)));
        }
        let got = combine(0, &base, None);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].offset, 100);
        assert_eq!(got[1].len, 50);
    }
}
