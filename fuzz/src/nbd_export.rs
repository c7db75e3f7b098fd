//! What the `nbd_export` fuzz target runs: the export server of `serve --nbd` as a whole — its
//! mio loop, the connection code (handshake, request loop, limits) and its disk work on the
//! worker pool — fed arbitrary client bytes over a real Unix socket. fdstream/tests includes
//! this file with `#[path]`, so replaying the corpus exercises exactly the fuzzed code.
//!
//! One server per process, writable, exporting a pool with one small file; every input is one
//! client connection. Invariants: the server answers (or closes) within a time limit after the
//! client stops sending, never panics, and still greets the next client.

use engine::Address;
use fdstream::export::{ExportConfig, ExportServer, Exports};
use nbd::wire::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Sizes of the pieces the input is sent in, so messages arrive split at many points.
pub const PIECES: &[usize] = &[1, 7, 20, 3, 16, 4096, 2, 28];
/// The exported volume's name and size.
pub const VOLUME: &str = "vol";
pub const VOLUME_SIZE: u64 = 1 << 20;
/// How long the server may take to finish a connection whose client stopped sending.
const LIMIT: Duration = Duration::from_secs(10);

/// Where this process's server keeps its pool and socket (a test removes it when done).
pub fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("volstream-fuzz-export-{}", std::process::id()))
}

/// The server's socket, started once.
fn server() -> &'static PathBuf {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let dir = scratch_dir();
        let pool = dir.join("pool");
        std::fs::create_dir_all(&pool).unwrap();
        let file = std::fs::File::create(pool.join(VOLUME)).unwrap();
        file.set_len(VOLUME_SIZE).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a; 4096], 8192).unwrap();
        let sock = dir.join("s");
        let _ = std::fs::remove_file(&sock);
        let config = ExportConfig {
            max_connections: 4,
            timeout: LIMIT / 2,
            ..ExportConfig::default()
        };
        let exports = Exports::new(&pool, true).unwrap();
        let mut server = ExportServer::bind(&Address::Unix(sock.clone()), exports, config).unwrap();
        std::thread::spawn(move || server.run().expect("the export loop failed"));
        sock
    })
}

/// What one client connection got back.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The server's greeting was the fixed newstyle one.
    pub greeted: bool,
    /// The server answered a request of the transmission phase (a simple or structured reply
    /// magic after the handshake).
    pub replied: bool,
}

/// Sends `data` as one client's bytes, in `pieces`, then ends the client's side and reads
/// until the server closes. Panics if the server hangs or stops greeting new clients.
pub fn drive_export(data: &[u8], pieces: &[usize]) -> Outcome {
    let sock = server();
    let mut c = UnixStream::connect(sock).expect("the export stopped accepting");
    c.set_read_timeout(Some(LIMIT)).unwrap();
    c.set_write_timeout(Some(LIMIT)).unwrap();
    let reader = {
        let mut r = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return Ok(got),
                    // The server closed on a client it had not read all of.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e),
                }
            }
        })
    };
    let (mut at, mut piece) = (0, 0);
    while at < data.len() {
        let n = pieces[piece % pieces.len()].min(data.len() - at);
        piece += 1;
        if c.write_all(&data[at..at + n]).is_err() {
            break; // closed by the server: what it says is read below
        }
        at += n;
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
    let got = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the export did not finish the connection: {e}"));
    let greeting = [&NBDMAGIC.to_be_bytes()[..], &IHAVEOPT.to_be_bytes()[..]].concat();
    let replied = got.windows(4).any(|w| {
        w == SIMPLE_REPLY_MAGIC.to_be_bytes() || w == STRUCTURED_REPLY_MAGIC.to_be_bytes()
    });
    // Whatever that client did, the next one is greeted.
    let mut next = UnixStream::connect(sock).expect("the export stopped accepting");
    next.set_read_timeout(Some(LIMIT)).unwrap();
    let mut hello = [0u8; 16];
    next.read_exact(&mut hello)
        .expect("the export stopped greeting clients");
    assert_eq!(&hello[..], &greeting[..]);
    Outcome {
        greeted: got.starts_with(&greeting),
        replied,
    }
}

/// Client bytes for seeds: the fixed newstyle client flags, options and requests.
pub mod build {
    use super::*;

    pub fn flags() -> Vec<u8> {
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec()
    }

    pub fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// OPT_SET_META_CONTEXT or OPT_GO's body for `name`.
    pub fn meta_context(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }

    pub fn go(name: &str) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        option(OPT_GO, &v)
    }

    /// A handshake to the transmission phase with structured replies and base:allocation.
    pub fn negotiated() -> Vec<u8> {
        [
            flags(),
            option(OPT_STRUCTURED_REPLY, &[]),
            option(
                OPT_SET_META_CONTEXT,
                &meta_context(VOLUME, &[CONTEXT_BASE_ALLOCATION]),
            ),
            go(VOLUME),
        ]
        .concat()
    }

    pub fn request(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }
}
