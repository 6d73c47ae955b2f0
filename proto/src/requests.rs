//! Requests as hulld reads them, and the one answer to "who may ask for
//! this": [`RequestKind`] names a request without its payload,
//! [`needed_scope`] says which API token scope it takes, and [`Scope`]
//! says what each endpoint grants.
//!
//! A frame is checked in three steps before a [`ClientMsg`] exists:
//! 1. its kind is read from the frame's first bytes (payloads skipped,
//!    nothing allocated), and a request the endpoint does not permit is
//!    refused there;
//! 2. its shape is walked ([`check_shape`]): no array or map past
//!    [`MAX_ITEMS`] entries, no nesting past [`MAX_DEPTH`], and the memory
//!    its decoded form takes estimated and held under the endpoint's
//!    bound, since MessagePack packs an empty string in one byte and a
//!    `String` takes 24 and an allocation;
//! 3. only then it is decoded.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use futures::Stream;
use tokio::io::AsyncRead;
use tokio_util::codec::{Decoder, FramedRead};

use crate::frames::FRAME_HEAD_LEN;
use crate::{ClientMsg, FileRequest, FrameDecoder, ServiceRequest, SessionRequest, TokenScope};

/// The most entries an array or map of a request may hold: an exec's argv
/// or environment, a service's `--after` names. Linux itself fits at most
/// about 2 MiB of argv and environment together.
pub const MAX_ITEMS: usize = 65_536;

/// The deepest nesting of a request's values; the deepest real one is a
/// few levels.
pub const MAX_DEPTH: usize = 16;

/// What a request's decoded form may take, as estimated before decoding.
pub const MAX_DECODED: usize = 4 * 1024 * 1024;

/// What a request is, without its payload: enough to decide whether its
/// caller may ask for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Hello,
    Status,
    Exec,
    Stdin,
    StdinEof,
    Resize,
    Signal,
    Bounce,
    CheckpointCreate,
    CheckpointRestore,
    CheckpointList,
    CheckpointDelete,
    CheckpointPush,
    /// A service request that changes something: add, remove, start,
    /// stop, restart, signal.
    ServicesChange,
    /// `List` and `Show`.
    ServicesRead,
    Logs,
    Shutdown,
    Ports,
    Ingress,
    Tokens,
    NetworkPolicyGet,
    NetworkPolicySet,
    SessionsList,
    SessionsAttach,
    SessionsWatch,
    SessionsKill,
    Detach,
    /// A file's entry, or a directory's entries.
    FilesStat,
    /// A file's contents.
    FilesRead,
    /// Changes under a directory, as they happen.
    FilesWatch,
    /// Changing files: a write (the request and the bytes that follow
    /// it), a directory made, a delete, rename, copy or chmod.
    FilesWrite,
}

/// What a connection may ask for, by the endpoint it came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The control socket and vsock: everything.
    Control,
    /// The socket mounted into the inner: the service API and the
    /// read-only ports and ingress reports (without the ingress token), so
    /// the user's code can register services and learn its URLs but cannot
    /// exec, bounce, restore, read logs or stop hulld.
    InnerServices,
    /// The HTTP API's connections, with the scope of the token they came
    /// with: never making tokens (a token cannot mint a better one) or
    /// stopping hulld.
    Api(TokenScope),
}

impl Scope {
    pub fn permits(self, kind: RequestKind) -> bool {
        use RequestKind as K;
        match self {
            Scope::Control => true,
            Scope::Api(granted) => needed_scope(kind).is_some_and(|needed| granted >= needed),
            Scope::InnerServices => matches!(
                kind,
                K::Hello | K::ServicesChange | K::ServicesRead | K::Ports | K::Ingress
            ),
        }
    }

    /// Whether this caller sees secrets: service environments in full.
    /// A read token sees their names, not their values.
    pub fn sees_secrets(self) -> bool {
        match self {
            Scope::Control | Scope::InnerServices => true,
            Scope::Api(granted) => granted >= TokenScope::Exec,
        }
    }
}

/// The token scope a request needs over the HTTP API; `None`: never
/// served there. `read` is status and lists; whatever shows what a
/// program printed or holds (exec output, logs, a session's scrollback,
/// file contents) takes `exec`; changing the sandbox takes `admin`.
pub fn needed_scope(kind: RequestKind) -> Option<TokenScope> {
    use RequestKind as K;
    match kind {
        K::Tokens | K::Shutdown => None,
        K::Hello
        | K::Status
        | K::Ports
        | K::Ingress
        | K::CheckpointList
        | K::NetworkPolicyGet
        | K::SessionsList
        | K::ServicesRead
        | K::FilesStat
        | K::FilesWatch => Some(TokenScope::Read),
        K::Exec
        | K::Logs
        | K::SessionsAttach
        | K::SessionsWatch
        | K::SessionsKill
        | K::Detach
        | K::Stdin
        | K::StdinEof
        | K::Resize
        | K::Signal
        | K::FilesRead
        | K::FilesWrite => Some(TokenScope::Exec),
        K::Bounce
        | K::CheckpointCreate
        | K::CheckpointRestore
        | K::CheckpointDelete
        | K::CheckpointPush
        | K::NetworkPolicySet
        | K::ServicesChange => Some(TokenScope::Admin),
    }
}

impl RequestKind {
    /// The message's name, for logs.
    pub fn name(self) -> &'static str {
        use RequestKind as K;
        match self {
            K::Hello => "Hello",
            K::Status => "Status",
            K::Exec => "Exec",
            K::Stdin => "Stdin",
            K::StdinEof => "StdinEof",
            K::Resize => "Resize",
            K::Signal => "Signal",
            K::Bounce => "Bounce",
            K::CheckpointCreate => "CheckpointCreate",
            K::CheckpointRestore => "CheckpointRestore",
            K::CheckpointList => "CheckpointList",
            K::CheckpointDelete => "CheckpointDelete",
            K::CheckpointPush => "CheckpointPush",
            K::ServicesChange | K::ServicesRead => "Services",
            K::Logs => "Logs",
            K::Shutdown => "Shutdown",
            K::Ports => "Ports",
            K::Ingress => "Ingress",
            K::Tokens => "Tokens",
            K::NetworkPolicyGet | K::NetworkPolicySet => "NetworkPolicy",
            K::SessionsList | K::SessionsAttach | K::SessionsWatch | K::SessionsKill => "Sessions",
            K::Detach => "Detach",
            K::FilesStat | K::FilesRead | K::FilesWatch | K::FilesWrite => "Files",
        }
    }

    /// The command a user typed to send it, for refusals.
    pub fn command(self) -> &'static str {
        use RequestKind as K;
        match self {
            K::Status => "hull status",
            K::Exec => "hull exec",
            K::Bounce => "hull bounce",
            K::Shutdown => "hull down",
            K::CheckpointCreate
            | K::CheckpointRestore
            | K::CheckpointList
            | K::CheckpointDelete
            | K::CheckpointPush => "hull checkpoint",
            K::ServicesChange | K::ServicesRead => "hull services",
            K::Logs => "hull logs",
            K::Ports => "hull ports",
            K::Ingress => "hull ingress",
            K::Tokens => "hull token",
            K::NetworkPolicyGet | K::NetworkPolicySet => "the network policy",
            K::SessionsList | K::SessionsAttach | K::SessionsKill => "hull sessions",
            K::SessionsWatch => "watching a session",
            K::FilesStat | K::FilesRead | K::FilesWrite => "hull cp",
            K::FilesWatch => "watching files",
            other => other.name(),
        }
    }
}

impl ClientMsg {
    /// What this request is; the same answer [`peek_kind`] gives from its
    /// encoded frame.
    pub fn kind(&self) -> RequestKind {
        use RequestKind as K;
        match self {
            ClientMsg::Hello(_) => K::Hello,
            ClientMsg::Status => K::Status,
            ClientMsg::Exec(_) => K::Exec,
            ClientMsg::Stdin(_) => K::Stdin,
            ClientMsg::StdinEof => K::StdinEof,
            ClientMsg::Resize(_) => K::Resize,
            ClientMsg::Signal(_) => K::Signal,
            ClientMsg::Bounce { .. } => K::Bounce,
            ClientMsg::CheckpointCreate { .. } => K::CheckpointCreate,
            ClientMsg::CheckpointRestore { .. } => K::CheckpointRestore,
            ClientMsg::CheckpointList => K::CheckpointList,
            ClientMsg::CheckpointDelete { .. } => K::CheckpointDelete,
            ClientMsg::CheckpointPush { .. } => K::CheckpointPush,
            ClientMsg::Services(ServiceRequest::List | ServiceRequest::Show(_)) => K::ServicesRead,
            ClientMsg::Services(_) => K::ServicesChange,
            ClientMsg::Logs { .. } => K::Logs,
            ClientMsg::Shutdown { .. } => K::Shutdown,
            ClientMsg::Ports => K::Ports,
            ClientMsg::Ingress => K::Ingress,
            ClientMsg::Tokens(_) => K::Tokens,
            ClientMsg::NetworkPolicy(None) => K::NetworkPolicyGet,
            ClientMsg::NetworkPolicy(Some(_)) => K::NetworkPolicySet,
            ClientMsg::Sessions(SessionRequest::List) => K::SessionsList,
            ClientMsg::Sessions(SessionRequest::Attach { watch: true, .. }) => K::SessionsWatch,
            ClientMsg::Sessions(SessionRequest::Attach { .. }) => K::SessionsAttach,
            ClientMsg::Sessions(SessionRequest::Kill { .. }) => K::SessionsKill,
            ClientMsg::Detach => K::Detach,
            ClientMsg::Files(FileRequest::Stat { .. } | FileRequest::List { .. }) => K::FilesStat,
            ClientMsg::Files(FileRequest::Read { .. }) => K::FilesRead,
            ClientMsg::Files(FileRequest::Watch { .. }) => K::FilesWatch,
            ClientMsg::Files(
                FileRequest::Write { .. }
                | FileRequest::MakeDir { .. }
                | FileRequest::Symlink { .. }
                | FileRequest::Delete { .. }
                | FileRequest::Rename { .. }
                | FileRequest::Copy { .. }
                | FileRequest::Chmod { .. },
            )
            | ClientMsg::FileData(_)
            | ClientMsg::FileEnd => K::FilesWrite,
        }
    }
}

/// Why `scope` does not serve `kind`, as its user reads it.
pub fn refusal(scope: Scope, kind: RequestKind) -> String {
    let command = kind.command();
    match (scope, needed_scope(kind)) {
        (Scope::Api(granted), Some(needed)) => format!(
            "{command} needs an API token with scope {needed}; this one has {granted}"
        ),
        (Scope::Api(_), None) => {
            format!("{command} is not available over the HTTP API; run it in the VM")
        }
        _ => format!(
            "{command} is not available from inside the inner: the socket there serves `hull services`, `hull ports` and `hull ingress` only; run it from the VM"
        ),
    }
}

/// A reader of the first values of a frame: a request's kind is in its
/// first few bytes (MessagePack, enums by name: a unit variant is its
/// name, any other a map of one entry from its name to its payload), so
/// it is read there, whatever the payload after it weighs.
struct Peek<'a> {
    frame: &'a [u8],
    at: usize,
}

impl<'a> Peek<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.frame.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }

    fn byte(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }

    fn len(&mut self, width: usize) -> Option<usize> {
        let bytes = self.bytes(width)?;
        Some(bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b)))
    }

    fn str(&mut self) -> Option<&'a str> {
        let n = match self.byte()? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.len(1)?,
            0xda => self.len(2)?,
            0xdb => self.len(4)?,
            _ => return None,
        };
        std::str::from_utf8(self.bytes(n)?).ok()
    }

    /// A variant's name; the cursor is then at its payload, if it has one.
    fn variant(&mut self) -> Option<&'a str> {
        match self.frame.get(self.at)? {
            0x81 => {
                self.at += 1;
                self.str()
            }
            _ => self.str(),
        }
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0xc2 => Some(false),
            0xc3 => Some(true),
            _ => None,
        }
    }

    /// Steps over an integer, a bool or nil.
    fn scalar(&mut self) -> Option<()> {
        let extra = match self.byte()? {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
            0xcc | 0xd0 => 1,
            0xcd | 0xd1 => 2,
            0xce | 0xd2 => 4,
            0xcf | 0xd3 => 8,
            _ => return None,
        };
        self.bytes(extra).map(|_| ())
    }

    /// `Attach { id, writer, watch }`'s `watch`: the third of an array,
    /// or the value of the key `watch` in a map; false when absent.
    fn attach_watch(&mut self) -> Option<bool> {
        match self.byte()? {
            m @ 0x90..=0x9f => {
                let n = usize::from(m & 0x0f);
                self.scalar()?;
                self.scalar()?;
                if n >= 3 {
                    self.bool()
                } else {
                    Some(false)
                }
            }
            m @ 0x80..=0x8f => {
                for _ in 0..(m & 0x0f) {
                    if self.str()? == "watch" {
                        return self.bool();
                    }
                    self.scalar()?;
                }
                Some(false)
            }
            _ => None,
        }
    }
}

fn kind_of(peek: &mut Peek<'_>) -> Option<RequestKind> {
    use RequestKind as K;
    Some(match peek.variant()? {
        "Hello" => K::Hello,
        "Status" => K::Status,
        "Exec" => K::Exec,
        "Stdin" => K::Stdin,
        "StdinEof" => K::StdinEof,
        "Resize" => K::Resize,
        "Signal" => K::Signal,
        "Bounce" => K::Bounce,
        "CheckpointCreate" => K::CheckpointCreate,
        "CheckpointRestore" => K::CheckpointRestore,
        "CheckpointList" => K::CheckpointList,
        "CheckpointDelete" => K::CheckpointDelete,
        "CheckpointPush" => K::CheckpointPush,
        "Services" => match peek.variant()? {
            "List" | "Show" => K::ServicesRead,
            "Add" | "Remove" | "Start" | "Stop" | "StopWithin" | "Restart" | "Signal" => {
                K::ServicesChange
            }
            _ => return None,
        },
        "Logs" => K::Logs,
        "Shutdown" => K::Shutdown,
        "Ports" => K::Ports,
        "Ingress" => K::Ingress,
        "Tokens" => K::Tokens,
        "NetworkPolicy" => match peek.byte()? {
            0xc0 => K::NetworkPolicyGet,
            _ => K::NetworkPolicySet,
        },
        "Sessions" => match peek.variant()? {
            "List" => K::SessionsList,
            "Kill" => K::SessionsKill,
            "Attach" if peek.attach_watch()? => K::SessionsWatch,
            "Attach" => K::SessionsAttach,
            _ => return None,
        },
        "Detach" => K::Detach,
        "Files" => match peek.variant()? {
            "Stat" | "List" => K::FilesStat,
            "Read" => K::FilesRead,
            "Watch" => K::FilesWatch,
            "Write" | "MakeDir" | "Symlink" | "Delete" | "Rename" | "Copy" | "Chmod" => {
                K::FilesWrite
            }
            _ => return None,
        },
        "FileData" | "FileEnd" => K::FilesWrite,
        _ => return None,
    })
}

/// What was wrong with a frame, found before it was decoded.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{}", refusal(*.scope, *.kind))]
    NotPermitted { scope: Scope, kind: RequestKind },
    #[error("the frame does not begin with a request hulld knows")]
    UnknownRequest,
    #[error("the frame ends inside a value")]
    Truncated,
    #[error("the frame holds a MessagePack marker no request uses (0xc1)")]
    ReservedMarker,
    #[error("a list of {items} entries; a request may hold at most {max}")]
    TooManyItems { items: usize, max: usize },
    #[error("values nested deeper than {max} levels")]
    TooDeep { max: usize },
    #[error(
        "the request would take more than {} KiB once decoded, the most hulld takes from this endpoint",
        .max / 1024
    )]
    TooLarge { estimate: usize, max: usize },
    #[error("cannot decode the request")]
    Decode(#[source] rmp_serde::decode::Error),
}

impl RequestError {
    /// The request error inside an error a [`RequestReader`] yielded.
    pub fn of(e: &io::Error) -> Option<&RequestError> {
        e.get_ref()?.downcast_ref::<RequestError>()
    }

    fn into_io(self) -> io::Error {
        let kind = match self {
            RequestError::NotPermitted { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// What a frame's kind is, from its first bytes: nothing after them is
/// read, so this costs the same for any payload.
pub fn peek_kind(frame: &[u8]) -> Result<RequestKind, RequestError> {
    kind_of(&mut Peek { frame, at: 0 }).ok_or(RequestError::UnknownRequest)
}

/// Walks one MessagePack value without decoding it: refuses arrays and
/// maps past [`MAX_ITEMS`], nesting past [`MAX_DEPTH`], and a value whose
/// decoded form would take more than `max_decoded` bytes by this estimate:
/// a string or byte string its length and 32 (a `String`'s 24 and its
/// allocation's overhead), a list 32, anything else 8.
pub fn check_shape(frame: &[u8], max_decoded: usize) -> Result<(), RequestError> {
    let mut at = 0usize;
    // How many values each open list still holds.
    let mut open: Vec<usize> = Vec::with_capacity(MAX_DEPTH);
    let mut estimate = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], RequestError> {
        let end = at.checked_add(n).ok_or(RequestError::Truncated)?;
        let bytes = frame.get(*at..end).ok_or(RequestError::Truncated)?;
        *at = end;
        Ok(bytes)
    };
    let len = |bytes: &[u8]| bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b));
    loop {
        let marker = take(&mut at, 1)?[0];
        // What the value costs decoded, how many entries it declares, and
        // how many values each entry is (a map's are pairs).
        let (cost, entries, values_each) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (8, 0, 1),
            0xc1 => return Err(RequestError::ReservedMarker),
            0x80..=0x8f => (32, usize::from(marker & 0x0f), 2),
            0x90..=0x9f => (32, usize::from(marker & 0x0f), 1),
            0xa0..=0xbf => {
                let n = usize::from(marker & 0x1f);
                take(&mut at, n)?;
                (n + 32, 0, 1)
            }
            0xcc | 0xd0 => (take(&mut at, 1).map(|_| 8)?, 0, 1),
            0xcd | 0xd1 => (take(&mut at, 2).map(|_| 8)?, 0, 1),
            0xca | 0xce | 0xd2 => (take(&mut at, 4).map(|_| 8)?, 0, 1),
            0xcb | 0xcf | 0xd3 => (take(&mut at, 8).map(|_| 8)?, 0, 1),
            // str 8/16/32 and bin 8/16/32
            0xd9 | 0xda | 0xdb | 0xc4 | 0xc5 | 0xc6 => {
                let width = match marker {
                    0xd9 | 0xc4 => 1,
                    0xda | 0xc5 => 2,
                    _ => 4,
                };
                let n = len(take(&mut at, width)?);
                take(&mut at, n)?;
                (n.saturating_add(32), 0, 1)
            }
            // fixext 1/2/4/8/16: a type byte and the data
            0xd4..=0xd8 => {
                take(&mut at, 1 + (1usize << (marker - 0xd4)))?;
                (8, 0, 1)
            }
            // ext 8/16/32
            0xc7..=0xc9 => {
                let width = 1usize << (marker - 0xc7);
                let n = len(take(&mut at, width)?);
                take(&mut at, n.saturating_add(1))?;
                (n.saturating_add(32), 0, 1)
            }
            // array 16/32, then map 16/32
            0xdc..=0xdf => {
                let width = if marker & 1 == 0 { 2 } else { 4 };
                let n = len(take(&mut at, width)?);
                (32, n, if marker >= 0xde { 2 } else { 1 })
            }
        };
        if entries > MAX_ITEMS {
            return Err(RequestError::TooManyItems {
                items: entries,
                max: MAX_ITEMS,
            });
        }
        let items = entries * values_each;
        estimate = estimate.saturating_add(cost);
        if estimate > max_decoded {
            return Err(RequestError::TooLarge {
                estimate,
                max: max_decoded,
            });
        }
        if items > 0 {
            if open.len() == MAX_DEPTH {
                return Err(RequestError::TooDeep { max: MAX_DEPTH });
            }
            open.push(items);
            continue;
        }
        // A value ended: close every list it completed.
        loop {
            match open.last_mut() {
                None => return Ok(()),
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

/// How many of a frame's first bytes its kind is read from: every
/// request's kind (two variant names and an attach's three small fields)
/// fits in far fewer.
const PEEK_LEN: usize = 64;

/// A frame of requests as [`RequestDecoder`] yields it.
#[derive(Debug)]
pub enum RequestFrame {
    /// A request the scope permits, whole, not yet decoded.
    Whole(BytesMut),
    /// A request the scope does not permit, known from its first bytes:
    /// the rest of it is read past and dropped as it arrives, never kept.
    Refused(RequestKind),
}

/// Frames of requests: a frame's kind is read from its first bytes, and a
/// request the scope does not permit is refused there, before the rest of
/// it is buffered or takes from the large-frame budget; a permitted one
/// is read whole by the [`FrameDecoder`].
#[derive(Debug)]
pub struct RequestDecoder {
    frames: FrameDecoder,
    scope: Scope,
    /// Bytes of a refused frame still to drop.
    skip: usize,
    /// The current frame's kind was read and permitted.
    permitted: bool,
}

impl RequestDecoder {
    pub fn new(frames: FrameDecoder, scope: Scope) -> Self {
        RequestDecoder {
            frames,
            scope,
            skip: 0,
            permitted: false,
        }
    }

    fn drop_skipped(&mut self, src: &mut BytesMut) {
        let n = self.skip.min(src.len());
        src.advance(n);
        self.skip -= n;
    }
}

impl Decoder for RequestDecoder {
    type Item = RequestFrame;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<RequestFrame>> {
        self.drop_skipped(src);
        if self.skip > 0 {
            return Ok(None);
        }
        if !self.permitted {
            let Some(len) = self.frames.next_len(src)? else {
                return Ok(None);
            };
            let peek = len.min(PEEK_LEN);
            let Some(head) = src.get(FRAME_HEAD_LEN..FRAME_HEAD_LEN + peek) else {
                return Ok(None);
            };
            let kind = peek_kind(head).map_err(RequestError::into_io)?;
            if !self.scope.permits(kind) {
                self.skip = FRAME_HEAD_LEN + len;
                self.drop_skipped(src);
                return Ok(Some(RequestFrame::Refused(kind)));
            }
            self.permitted = true;
        }
        let frame = self.frames.decode(src)?;
        if frame.is_some() {
            self.permitted = false;
        }
        Ok(frame.map(RequestFrame::Whole))
    }
}

/// The requests of one connection, read by a [`RequestDecoder`]: each
/// checked for `scope` from its first bytes and for its shape before it
/// is decoded. A request the scope does not permit comes out as an error
/// of kind `PermissionDenied` holding [`RequestError::NotPermitted`]; the
/// connection may go on after it.
pub struct RequestReader<R> {
    frames: FramedRead<R, RequestDecoder>,
    scope: Scope,
    max_decoded: usize,
}

impl<R: AsyncRead> RequestReader<R> {
    pub fn new(io: R, decoder: FrameDecoder, scope: Scope, max_decoded: usize) -> Self {
        RequestReader {
            frames: FramedRead::new(io, RequestDecoder::new(decoder, scope)),
            scope,
            max_decoded,
        }
    }

    /// Whether part of a frame has arrived and waits for the rest (or a
    /// refused frame's rest is being dropped).
    pub fn mid_frame(&self) -> bool {
        !self.frames.read_buffer().is_empty() || self.frames.decoder().skip > 0
    }

    fn decode(&self, frame: RequestFrame) -> Result<ClientMsg, RequestError> {
        let frame = match frame {
            RequestFrame::Refused(kind) => {
                return Err(RequestError::NotPermitted {
                    scope: self.scope,
                    kind,
                })
            }
            RequestFrame::Whole(frame) => frame,
        };
        check_shape(&frame, self.max_decoded)?;
        rmp_serde::from_slice(&frame).map_err(RequestError::Decode)
    }
}

impl<R: AsyncRead + Unpin> Stream for RequestReader<R> {
    type Item = io::Result<ClientMsg>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = match std::task::ready!(Pin::new(&mut self.frames).poll_next(cx)) {
            Some(Ok(frame)) => Some(self.decode(frame).map_err(RequestError::into_io)),
            Some(Err(e)) => Some(Err(e)),
            None => None,
        };
        Poll::Ready(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExecRequest, ExecSpec, Hello, ServiceSpec, TokenRequest, WinSize};

    fn every_request() -> Vec<ClientMsg> {
        let spec = ExecSpec {
            argv: vec!["true".into()],
            env: vec![("A".into(), "b".into())],
            cwd: Some("/".into()),
            user: None,
            tty: Some(WinSize { rows: 1, cols: 2 }),
        };
        let service = ServiceSpec {
            name: "web".into(),
            cmd: "x".into(),
            env: vec![("K".into(), "V".into())],
            cwd: None,
            user: None,
            http_port: Some(80),
            restart: Default::default(),
            after: vec!["db".into()],
        };
        vec![
            ClientMsg::Hello(Hello::new("t")),
            ClientMsg::Status,
            ClientMsg::Exec(ExecRequest::from(spec)),
            ClientMsg::Stdin(b"abc".to_vec()),
            ClientMsg::StdinEof,
            ClientMsg::Resize(WinSize { rows: 3, cols: 4 }),
            ClientMsg::Signal(15),
            ClientMsg::Bounce { grace_ms: 1 },
            ClientMsg::CheckpointCreate { comment: None },
            ClientMsg::CheckpointRestore { id: "v1".into() },
            ClientMsg::CheckpointList,
            ClientMsg::CheckpointDelete { id: "v1".into() },
            ClientMsg::CheckpointPush { id: None },
            ClientMsg::Services(ServiceRequest::Add(service)),
            ClientMsg::Services(ServiceRequest::Remove("a".into())),
            ClientMsg::Services(ServiceRequest::Start("a".into())),
            ClientMsg::Services(ServiceRequest::Stop("a".into())),
            ClientMsg::Services(ServiceRequest::StopWithin {
                name: "a".into(),
                timeout_ms: 1,
            }),
            ClientMsg::Services(ServiceRequest::Restart("a".into())),
            ClientMsg::Services(ServiceRequest::List),
            ClientMsg::Services(ServiceRequest::Show("a".into())),
            ClientMsg::Services(ServiceRequest::Signal {
                name: "a".into(),
                signal: 1,
            }),
            ClientMsg::Logs {
                source: "web".into(),
                follow: true,
                tail: Some(3),
                stream: None,
                since_ms: None,
                exec_id: Some(2),
            },
            ClientMsg::Shutdown { grace_ms: 2 },
            ClientMsg::Ports,
            ClientMsg::Ingress,
            ClientMsg::Tokens(TokenRequest::List),
            ClientMsg::NetworkPolicy(None),
            ClientMsg::NetworkPolicy(Some("{}".into())),
            ClientMsg::Sessions(SessionRequest::List),
            ClientMsg::Sessions(SessionRequest::Attach {
                id: 1,
                writer: true,
                watch: false,
            }),
            ClientMsg::Sessions(SessionRequest::Attach {
                id: 1,
                writer: false,
                watch: true,
            }),
            ClientMsg::Sessions(SessionRequest::Kill {
                id: 1,
                signal: 15,
                timeout_ms: 5,
            }),
            ClientMsg::Detach,
            ClientMsg::Files(FileRequest::Stat { path: "/a".into() }),
            ClientMsg::Files(FileRequest::List { path: "/a".into() }),
            ClientMsg::Files(FileRequest::Read { path: "/a".into() }),
            ClientMsg::Files(FileRequest::Watch {
                path: "/a".into(),
                recursive: true,
            }),
            ClientMsg::Files(FileRequest::Write {
                path: "/a".into(),
                mode: 0o644,
                make_parents: true,
            }),
            ClientMsg::Files(FileRequest::Symlink {
                path: "/a".into(),
                target: "../b".into(),
            }),
            ClientMsg::Files(FileRequest::MakeDir {
                path: "/a".into(),
                mode: 0o755,
            }),
            ClientMsg::Files(FileRequest::Delete {
                path: "/a".into(),
                recursive: true,
            }),
            ClientMsg::Files(FileRequest::Rename {
                from: "/a".into(),
                to: "/b".into(),
            }),
            ClientMsg::Files(FileRequest::Copy {
                from: "/a".into(),
                to: "/b".into(),
                recursive: false,
            }),
            ClientMsg::Files(FileRequest::Chmod {
                path: "/a".into(),
                mode: 0o700,
                recursive: true,
            }),
            ClientMsg::FileData(vec![0; 100]),
            ClientMsg::FileEnd,
        ]
    }

    #[test]
    fn every_request_kind_reads_the_same_from_its_frame() {
        for msg in every_request() {
            let frame = rmp_serde::to_vec(&msg).unwrap();
            assert_eq!(peek_kind(&frame).unwrap(), msg.kind(), "{msg:?}");
            check_shape(&frame, MAX_DECODED).unwrap();
        }
    }

    #[test]
    fn the_estimate_counts_what_empty_strings_cost_once_decoded() {
        // The frame is about 100 KB; its decoded form would be over 3 MB.
        let argv = vec![String::new(); 100_000];
        let msg = ClientMsg::Exec(ExecRequest::from(ExecSpec {
            argv,
            env: vec![],
            cwd: None,
            user: None,
            tty: None,
        }));
        let frame = rmp_serde::to_vec(&msg).unwrap();
        assert!(frame.len() < 110_000, "{}", frame.len());
        match check_shape(&frame, MAX_DECODED) {
            Err(RequestError::TooManyItems { items, max }) => {
                assert_eq!((items, max), (100_000, MAX_ITEMS))
            }
            other => panic!("{other:?}"),
        }
        let argv = vec![String::new(); 60_000];
        let msg = ClientMsg::Exec(ExecRequest::from(ExecSpec {
            argv,
            env: vec![],
            cwd: None,
            user: None,
            tty: None,
        }));
        let frame = rmp_serde::to_vec(&msg).unwrap();
        match check_shape(&frame, 1024 * 1024) {
            Err(RequestError::TooLarge { estimate, .. }) => assert!(estimate > 1024 * 1024),
            other => panic!("{other:?}"),
        }
        check_shape(&frame, MAX_DECODED).unwrap();
    }

    #[test]
    fn deep_truncated_and_reserved_values_are_refused() {
        let deep = [0x91u8; 40];
        assert!(matches!(
            check_shape(&deep, MAX_DECODED),
            Err(RequestError::TooDeep { .. })
        ));
        let truncated = [0x92u8, 0xa3, b'a'];
        assert!(matches!(
            check_shape(&truncated, MAX_DECODED),
            Err(RequestError::Truncated)
        ));
        assert!(matches!(
            check_shape(&[0xc1], MAX_DECODED),
            Err(RequestError::ReservedMarker)
        ));
        // A map of 2^32-1 pairs declared in a few bytes.
        let huge = [0xdfu8, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            check_shape(&huge, MAX_DECODED),
            Err(RequestError::TooManyItems { .. })
        ));
    }

    #[test]
    fn scopes_permit_what_the_table_says() {
        use RequestKind as K;
        let read = Scope::Api(TokenScope::Read);
        let exec = Scope::Api(TokenScope::Exec);
        let admin = Scope::Api(TokenScope::Admin);
        for kind in [
            K::Status,
            K::ServicesRead,
            K::SessionsList,
            K::CheckpointList,
        ] {
            assert!(read.permits(kind), "{kind:?}");
        }
        for kind in [K::Logs, K::SessionsWatch, K::Exec, K::Stdin] {
            assert!(!read.permits(kind) && exec.permits(kind), "{kind:?}");
        }
        for kind in [K::ServicesChange, K::Bounce, K::NetworkPolicySet] {
            assert!(!exec.permits(kind) && admin.permits(kind), "{kind:?}");
        }
        for kind in [K::Tokens, K::Shutdown] {
            assert!(!admin.permits(kind) && Scope::Control.permits(kind));
        }
        assert!(Scope::InnerServices.permits(K::ServicesChange));
        assert!(!Scope::InnerServices.permits(K::Exec));
        assert!(!read.sees_secrets() && exec.sees_secrets());
    }

    #[test]
    fn a_refused_frame_is_dropped_from_its_first_bytes_and_takes_no_budget() {
        let budget = crate::FrameBudget::new(1 << 20);
        let mut d = RequestDecoder::new(
            FrameDecoder::with_budget(crate::MAX_FRAME_LEN, budget.clone()),
            Scope::Api(TokenScope::Read),
        );
        let exec = ClientMsg::Exec(ExecRequest::from(ExecSpec {
            argv: vec!["x".repeat(1000); 2000],
            env: vec![],
            cwd: None,
            user: None,
            tty: None,
        }));
        let mut wire = frame_bytes(&exec);
        let big = wire.len();
        assert!(big > 1 << 20, "{big}");
        wire.extend_from_slice(&frame_bytes(&ClientMsg::Status));
        // Its first bytes are enough to refuse it; the budget is untouched
        // and the buffer holds no more than what came.
        let mut buf = BytesMut::from(&wire[..100]);
        match d.decode(&mut buf).unwrap() {
            Some(RequestFrame::Refused(RequestKind::Exec)) => {}
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
        assert_eq!(budget.free(), 1 << 20);
        // The rest of it is dropped as it comes; the next request reads.
        let mut got = None;
        for chunk in wire[100..].chunks(64 * 1024) {
            buf.extend_from_slice(chunk);
            if let Some(frame) = d.decode(&mut buf).unwrap() {
                got = Some(frame);
            }
            assert!(buf.len() <= 64 * 1024);
        }
        match got {
            Some(RequestFrame::Whole(f)) => {
                assert_eq!(
                    rmp_serde::from_slice::<ClientMsg>(&f).unwrap(),
                    ClientMsg::Status
                )
            }
            other => panic!("{other:?}"),
        }
    }

    fn frame_bytes(msg: &ClientMsg) -> Vec<u8> {
        let body = rmp_serde::to_vec(msg).unwrap();
        let mut out = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    #[tokio::test]
    async fn a_refused_request_is_never_decoded_and_the_reader_goes_on() {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut reader = RequestReader::new(
            server,
            FrameDecoder::new(crate::MAX_FRAME_LEN),
            Scope::Api(TokenScope::Read),
            MAX_DECODED,
        );
        // An exec that would be refused for its shape too: the scope is
        // what answers.
        let exec = ClientMsg::Exec(ExecRequest::from(ExecSpec {
            argv: vec![String::new(); 200_000],
            env: vec![],
            cwd: None,
            user: None,
            tty: None,
        }));
        for msg in [exec, ClientMsg::Status] {
            let body = rmp_serde::to_vec(&msg).unwrap();
            let len = u32::try_from(body.len()).unwrap();
            client.write_all(&len.to_be_bytes()).await.unwrap();
            client.write_all(&body).await.unwrap();
        }
        let refused = reader.next().await.unwrap().unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            matches!(
                RequestError::of(&refused),
                Some(RequestError::NotPermitted {
                    kind: RequestKind::Exec,
                    ..
                })
            ),
            "{refused}"
        );
        assert_eq!(
            refused.to_string(),
            "hull exec needs an API token with scope exec; this one has read"
        );
        assert_eq!(reader.next().await.unwrap().unwrap(), ClientMsg::Status);
    }
}
