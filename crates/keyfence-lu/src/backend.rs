//! Block storage a logical unit sits on.
//!
//! A [`BlockBackend`] is byte addressed and synchronous; the LU converts
//! logical blocks to byte ranges. [`FileBackend`] serves a regular file
//! (created sparse when missing) or a block device with positional I/O, so
//! concurrent commands never share a file offset or a lock.
//! [`MemBackend`] keeps the data in memory for tests.
//!
//! The backing store of a clustered LU is served by several gateways,
//! possibly on different hosts that share no page cache, so it is opened
//! `O_DIRECT`: every read goes to the medium and every acknowledged write
//! has left this host's cache. A single-node LU configured `direct = true`
//! is opened the same way ([`FileBackend::open_direct`]). Direct I/O needs
//! buffers and file offsets aligned to what the file system asks (`statx`
//! `STATX_DIOALIGN`); the backend bounces through an aligned buffer and
//! refuses a block size smaller than the file offset alignment when the LU
//! is configured.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;

/// Errors opening a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a regular file or block device")]
    NotAFileOrDevice { path: PathBuf },
    /// Another process (or another open of this process) already serves it.
    #[error("{path}: in use by {}", holder_text(*.holder))]
    Locked { path: PathBuf, holder: Option<u32> },
    /// The kernel refused the exclusive open of a block device: it is
    /// mounted, part of a device-mapper or RAID device, or opened
    /// exclusively by another program.
    #[error("{path}: block device busy (mounted, in use by device-mapper or RAID, or opened exclusively by another program)")]
    DeviceBusy { path: PathBuf },
    #[error("{path}: size {size} is not a multiple of the block size {block_size}")]
    Unaligned {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    /// The file system cannot do direct I/O on it at all.
    #[error("{path}: its file system does not support uncached (O_DIRECT) I/O, which a clustered LU or one with direct = true needs: {source}")]
    NoDirectIo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Direct I/O on this file needs a coarser alignment than the LU's blocks.
    #[error("{path}: uncached (O_DIRECT) I/O on it needs offsets aligned to {align} bytes, more than the block size {block_size}")]
    DirectUnaligned {
        path: PathBuf,
        align: u32,
        block_size: u32,
    },
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("another process (pid {p}) that holds its lock"),
        None => "another process that holds its lock".to_string(),
    }
}

/// Take an advisory `flock` on `file` without blocking: exclusive, or
/// shared with `shared`. `Ok(false)` when another open file description
/// holds a conflicting lock. The lock lives as long as the open file.
pub fn try_flock(file: &File, shared: bool) -> io::Result<bool> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    loop {
        // SAFETY: flock only takes an fd, owned by `file` and open for the
        // duration of the call, and an integer operation.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// The pid of a process holding a `flock` on the inode of `file`, from
/// `/proc/locks` (other than this process), if one can be told.
pub fn flock_holder(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    // /proc/locks names the inode as MAJOR:MINOR:INODE (hex major/minor).
    let (maj, min) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let want = format!("{maj:02x}:{min:02x}:{}", meta.ino());
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let me = std::process::id();
    let mut fallback = None;
    for line in text.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = f.iter().position(|x| *x == "FLOCK") else {
            continue;
        };
        let (Some(pid), Some(id)) = (f.get(i + 3), f.get(i + 4)) else {
            continue;
        };
        if *id != want {
            continue;
        }
        match pid.parse::<u32>() {
            Ok(p) if p != me => return Some(p),
            Ok(p) => fallback = Some(p),
            Err(_) => {}
        }
    }
    fallback
}

/// Byte-addressed block storage. All methods may be called concurrently.
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True when the backend has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from byte `offset`. The range lies within `len()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Read `len` bytes from byte `offset` into a new buffer. The range
    /// lies within `len()`. The default zero-fills the buffer before
    /// [`BlockBackend::read_at`]; backends that can read into
    /// uninitialised memory skip that redundant pass.
    fn read_vec(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_at(&mut buf, offset)?;
        Ok(buf)
    }
    /// False when [`BlockBackend::try_read_nowait`] would always answer
    /// `None` (the backend has no cache, e.g. it does uncached I/O): the
    /// LU then does not try at all. The default, true, suits backends that
    /// only override `try_read_nowait`; one that overrides neither answers
    /// `None` at no cost.
    fn may_read_nowait(&self) -> bool {
        true
    }
    /// Read `len` bytes from byte `offset` only if that needs no waiting
    /// for the device, because every byte is in a cache: `Some(data)`, all
    /// of the range and never a part of it. `None` when the read would
    /// wait, the backend cannot read without waiting (the default), or the
    /// attempt failed; the caller then reads with
    /// [`BlockBackend::read_vec`], where waiting is allowed and errors are
    /// reported. The range lies within `len()`.
    fn try_read_nowait(&self, _len: usize, _offset: u64) -> Option<Vec<u8>> {
        None
    }
    /// Write `buf` at byte `offset`. The range lies within `len()`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Make the byte range read back as zeroes, preferably by deallocating
    /// it (hole punching); falls back to writing zeroes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The allocated (mapped) byte ranges intersecting `range`, in order,
    /// at most `limit` of them (the caller asks again past the last one).
    /// Backends that cannot tell report the whole range as mapped.
    fn mapped_ranges(&self, range: Range<u64>, limit: usize) -> io::Result<Vec<Range<u64>>>;
    /// True when writes are refused by the medium itself.
    fn is_read_only(&self) -> bool;
    /// True when a discarded range reads back as zeroes (LBPRZ).
    fn discard_zeroes(&self) -> bool {
        true
    }
    /// Start reading the byte range into the cache. Ok(true) when the
    /// backend has a cache the range was scheduled into.
    fn prefetch(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Extend the medium to `len` bytes (new bytes read as zeroes),
    /// durably. Backends of fixed size refuse.
    fn grow(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this backing store cannot grow",
        ))
    }
}

/// A regular file or a block device accessed with pread/pwrite.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    len: std::sync::atomic::AtomicU64,
    read_only: bool,
    is_block_device: bool,
    /// Opened `O_DIRECT` (clustered LUs): the alignment it requires.
    direct: Option<DirectAlign>,
    /// `RWF_NOWAIT` reads were refused as unsupported: do not try again.
    no_nowait: AtomicBool,
}

/// Alignment that `O_DIRECT` I/O on one file requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlign {
    /// Of the memory buffer's address.
    pub memory: usize,
    /// Of the file offset and the length.
    pub offset: u64,
}

impl DirectAlign {
    /// Ask the kernel (`statx` with `STATX_DIOALIGN`, Linux 6.1+). Older
    /// kernels and file systems that do not say get the conservative
    /// 4096 for both, which every Linux file system and device accepts.
    fn of(file: &File) -> Self {
        const FALLBACK: DirectAlign = DirectAlign {
            memory: 4096,
            offset: 4096,
        };
        // SAFETY: statx is plain old data; all-zero is a valid value.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is owned by `file`, the empty path with
        // AT_EMPTY_PATH names that fd, and `stx` is valid for writes of a
        // whole `statx`, which is all the kernel writes.
        let rc = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        if rc != 0
            || stx.stx_mask & libc::STATX_DIOALIGN == 0
            || stx.stx_dio_mem_align == 0
            || stx.stx_dio_offset_align == 0
        {
            return FALLBACK;
        }
        DirectAlign {
            memory: stx.stx_dio_mem_align as usize,
            offset: u64::from(stx.stx_dio_offset_align),
        }
    }
}

/// A heap buffer whose usable part starts at an address aligned to
/// `align` (a power of two): the vector is over-allocated and the slice
/// taken from the first aligned byte, so no unsafe allocation is needed.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize, align: usize) -> io::Result<Self> {
        let storage = vec![0u8; len.checked_add(align).ok_or(io::ErrorKind::InvalidInput)?];
        let start = storage.as_ptr().align_offset(align);
        if start > align {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        Ok(AlignedBuf {
            storage,
            start,
            len,
        })
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl FileBackend {
    /// Open `path`. A missing regular file is created sparse with `size`
    /// bytes (which is then required); an existing file or device keeps its
    /// size.
    ///
    /// The file is locked for as long as the backend lives, so that two
    /// targets never serve one medium (a split brain of the target
    /// itself): an exclusive `flock` when writable, a shared one when
    /// read-only (several read-only exports may share it, none alongside a
    /// writer). A writable block device is also opened `O_EXCL`, which the
    /// kernel refuses while the device is mounted or held exclusively by
    /// anyone else. A conflict is [`BackendError::Locked`], naming the
    /// holder's pid when `/proc/locks` tells it.
    pub fn open(path: &Path, size: Option<u64>, read_only: bool) -> Result<Self, BackendError> {
        Self::open_with(path, size, read_only, false, false)
    }

    /// [`FileBackend::open`] for uncached I/O (a single-node LU configured
    /// `direct = true`): locked and, for a block device, opened `O_EXCL`
    /// as `open` does, and opened `O_DIRECT` as a clustered LU's store is.
    /// A file system that refuses direct I/O is
    /// [`BackendError::NoDirectIo`].
    pub fn open_direct(
        path: &Path,
        size: Option<u64>,
        read_only: bool,
    ) -> Result<Self, BackendError> {
        Self::open_with(path, size, read_only, false, true)
    }

    /// Open the backing store of a clustered LU, which several gateways
    /// (processes) serve at once: the file is locked shared, so a
    /// single-node server holding it exclusively still conflicts, a
    /// block device is not opened O_EXCL, and the file is opened
    /// `O_DIRECT` (see the module documentation).
    pub fn open_clustered(
        path: &Path,
        size: Option<u64>,
        read_only: bool,
    ) -> Result<Self, BackendError> {
        Self::open_with(path, size, read_only, true, true)
    }

    /// `shared`: several processes serve the store (shared lock, no
    /// `O_EXCL`); `direct`: open it `O_DIRECT`.
    fn open_with(
        path: &Path,
        size: Option<u64>,
        read_only: bool,
        shared: bool,
        direct: bool,
    ) -> Result<Self, BackendError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io_err = |source| BackendError::Io {
            path: path.to_owned(),
            source,
        };
        let exists = path.exists();
        let is_dev = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let direct_flag = if direct { libc::O_DIRECT } else { 0 };
        let no_direct = |e: io::Error| {
            if direct && e.raw_os_error() == Some(libc::EINVAL) {
                BackendError::NoDirectIo {
                    path: path.to_owned(),
                    source: e,
                }
            } else {
                io_err(e)
            }
        };
        let file = if read_only {
            OpenOptions::new()
                .read(true)
                .custom_flags(direct_flag)
                .open(path)
                .map_err(no_direct)?
        } else {
            let mut o = OpenOptions::new();
            o.read(true)
                .write(true)
                .create(!exists && size.is_some())
                .truncate(false);
            if is_dev && !shared {
                o.custom_flags(libc::O_EXCL | direct_flag);
            } else {
                o.custom_flags(direct_flag);
            }
            o.open(path).map_err(|e| {
                if is_dev && e.raw_os_error() == Some(libc::EBUSY) {
                    BackendError::DeviceBusy {
                        path: path.to_owned(),
                    }
                } else {
                    no_direct(e)
                }
            })?
        };
        let meta = file.metadata().map_err(io_err)?;
        let ft = meta.file_type();
        let is_block_device = ft.is_block_device();
        if !ft.is_file() && !is_block_device {
            return Err(BackendError::NotAFileOrDevice {
                path: path.to_owned(),
            });
        }
        if !try_flock(&file, read_only || shared).map_err(io_err)? {
            return Err(BackendError::Locked {
                path: path.to_owned(),
                holder: flock_holder(&file),
            });
        }
        let len = if is_block_device {
            // The size of a block device is where SEEK_END lands.
            let mut f = &file;
            io::Seek::seek(&mut f, io::SeekFrom::End(0)).map_err(io_err)?
        } else if !exists || meta.len() == 0 {
            match size {
                Some(s) if !read_only => {
                    file.set_len(s).map_err(io_err)?;
                    s
                }
                _ => meta.len(),
            }
        } else {
            meta.len()
        };
        let direct = direct.then(|| DirectAlign::of(&file));
        let b = FileBackend {
            file,
            path: path.to_owned(),
            len: len.into(),
            read_only,
            is_block_device,
            direct,
            no_nowait: AtomicBool::new(false),
        };
        b.probe_direct()?;
        Ok(b)
    }

    /// Some file systems accept an `O_DIRECT` open and refuse the I/O
    /// itself (`EINVAL`): read the first direct-I/O unit once, so that
    /// shows when the LU is configured, not at the first READ.
    fn probe_direct(&self) -> Result<(), BackendError> {
        let Some(d) = self.direct else {
            return Ok(());
        };
        let len = usize::try_from(d.offset.min(self.len())).unwrap_or(0);
        if len == 0 {
            return Ok(());
        }
        let mut buf = vec![0u8; len];
        self.read_direct(d, &mut buf, 0).map_err(|source| {
            if source.raw_os_error() == Some(libc::EINVAL) {
                BackendError::NoDirectIo {
                    path: self.path.clone(),
                    source,
                }
            } else {
                BackendError::Io {
                    path: self.path.clone(),
                    source,
                }
            }
        })
    }

    /// Check that the size is a whole number of `block_size` blocks and,
    /// for direct I/O, that blocks are aligned as the file system needs.
    pub fn check_alignment(&self, block_size: u32) -> Result<(), BackendError> {
        let len = self.len();
        if block_size == 0 || len.rem_euclid(u64::from(block_size)) != 0 {
            return Err(BackendError::Unaligned {
                path: self.path.clone(),
                size: len,
                block_size,
            });
        }
        if let Some(d) = self.direct {
            if u64::from(block_size) % d.offset != 0 {
                return Err(BackendError::DirectUnaligned {
                    path: self.path.clone(),
                    align: u32::try_from(d.offset).unwrap_or(u32::MAX),
                    block_size,
                });
            }
        }
        Ok(())
    }

    /// The alignment direct I/O needs, when the file is opened `O_DIRECT`.
    pub fn direct_io(&self) -> Option<DirectAlign> {
        self.direct
    }

    /// Read through an aligned bounce buffer covering `offset..offset+len`
    /// rounded out to the offset alignment (reading more is harmless).
    fn read_direct(&self, d: DirectAlign, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.len()) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let start = offset - offset % d.offset;
        let end = offset
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(d.offset))
            .ok_or(io::ErrorKind::InvalidInput)?;
        let span = usize::try_from(end - start).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut bounce = AlignedBuf::zeroed(span, d.memory)?;
        read_exact_or_eof(
            &self.file,
            bounce.as_mut_slice(),
            start,
            end.min(self.len()) - start,
        )?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    /// Write through an aligned bounce buffer. A write that is not aligned
    /// to the file system's direct-I/O granularity is refused rather than
    /// done as read-modify-write, which another gateway could interleave
    /// with; the LU never issues one (its block size is checked against the
    /// alignment when it is configured).
    fn write_direct(&self, d: DirectAlign, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset % d.offset != 0 || buf.len() as u64 % d.offset != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "direct write of {} bytes at {offset} is not aligned to {}",
                    buf.len(),
                    d.offset
                ),
            ));
        }
        let mut bounce = AlignedBuf::zeroed(buf.len(), d.memory)?;
        bounce.as_mut_slice().copy_from_slice(buf);
        self.file.write_all_at(bounce.as_slice(), offset)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is
        // owned by `self.file` and stays open for the duration of the call.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Zero a range of a block device in the device itself (BLKZEROOUT:
    /// WRITE ZEROES / UNMAP with guaranteed zeroes where the device has
    /// them), instead of sending zero-filled buffers.
    fn zero_out_device(&self, offset: u64, len: u64) -> io::Result<()> {
        /// `_IO(0x12, 127)` from <linux/fs.h>.
        const BLKZEROOUT: u32 = 0x127f;
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads two u64 (start, length) through the
        // pointer, which points at `range` and is valid for the call; the
        // fd is owned by `self.file`.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek only reads its integer arguments on an fd owned by
        // `self.file`. Concurrent lseek calls only move the shared file
        // offset, which this backend never uses (all I/O is positional).
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if rc >= 0 {
            Ok(Some(rc as u64))
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// Fill `buf` from `offset`, where only the first `avail` bytes exist in
/// the file (a direct read rounded out past the end of the file comes back
/// short; the rest of the buffer stays zero).
fn read_exact_or_eof(file: &File, buf: &mut [u8], offset: u64, avail: u64) -> io::Result<()> {
    let want = usize::try_from(avail).map_or(buf.len(), |a| a.min(buf.len()));
    let mut done = 0;
    while done < want {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_zeroes(b: &dyn BlockBackend, mut offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zero = vec![0u8; CHUNK.min(len) as usize];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(CHUNK) as usize;
        b.write_at(&zero[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

impl BlockBackend for FileBackend {
    fn len(&self) -> u64 {
        self.len.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        if self.is_block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device has its own size",
            ));
        }
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the backing file is open read-only",
            ));
        }
        if len > self.len() {
            self.file.set_len(len)?;
            self.file.sync_all()?;
            self.len.store(len, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.direct {
            Some(d) => self.read_direct(d, buf, offset),
            None => self.file.read_exact_at(buf, offset),
        }
    }

    /// pread straight into the vector's spare capacity: a large read
    /// otherwise spends a few percent of its CPU time zeroing memory that
    /// the kernel overwrites at once.
    fn read_vec(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        if let Some(d) = self.direct {
            let mut buf = vec![0u8; len];
            self.read_direct(d, &mut buf, offset)?;
            return Ok(buf);
        }
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        while buf.len() < len {
            let filled = buf.len();
            let pos = u64::try_from(filled)
                .ok()
                .and_then(|f| offset.checked_add(f))
                .and_then(|p| libc::off_t::try_from(p).ok())
                .ok_or(io::ErrorKind::InvalidInput)?;
            let spare = buf
                .spare_capacity_mut()
                .get_mut(..len - filled)
                .ok_or(io::ErrorKind::InvalidInput)?;
            // SAFETY: `spare` is the vector's unused capacity, exclusively
            // borrowed and valid for writes of `spare.len()` bytes; pread
            // writes at most that many bytes there and nothing is read
            // from it.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    pos,
                )
            };
            match usize::try_from(n) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    debug_assert!(n <= len - filled);
                    // SAFETY: pread initialised the first `n` bytes of the
                    // spare capacity, right after the `filled` initialised
                    // ones, and `filled + n <= len <= capacity`.
                    unsafe { buf.set_len(filled + n.min(len - filled)) };
                }
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(buf)
    }

    /// Uncached (direct) I/O has no cache to serve a read from; neither
    /// has a kernel that refused `RWF_NOWAIT` once.
    fn may_read_nowait(&self) -> bool {
        self.direct.is_none() && !self.no_nowait.load(Ordering::Relaxed)
    }

    /// `preadv2(RWF_NOWAIT)`: served from the page cache or not at all.
    /// The kernel returns `EAGAIN` when the first page is not cached and a
    /// short count when a later one is not; the rest is tried again the
    /// same way, and if it is not all cached the bytes read so far are
    /// dropped (the caller reads the whole range where it may wait).
    fn try_read_nowait(&self, len: usize, offset: u64) -> Option<Vec<u8>> {
        if self.direct.is_some() || self.no_nowait.load(Ordering::Relaxed) {
            // Direct I/O has no cache to be served from.
            return None;
        }
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        while buf.len() < len {
            let filled = buf.len();
            let pos = u64::try_from(filled)
                .ok()
                .and_then(|f| offset.checked_add(f))
                .and_then(|p| libc::off_t::try_from(p).ok())?;
            let spare = buf.spare_capacity_mut().get_mut(..len - filled)?;
            let iov = libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            };
            // SAFETY: the one iovec points at the vector's unused capacity,
            // exclusively borrowed and valid for writes of `spare.len()`
            // bytes; preadv2 writes at most that many bytes there, nothing
            // reads from it, and the fd is owned by `self.file`.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, pos, libc::RWF_NOWAIT) };
            match usize::try_from(n) {
                // End of file: not ours to report here.
                Ok(0) => return None,
                Ok(n) => {
                    // SAFETY: preadv2 initialised the first `n` bytes of
                    // the spare capacity, right after the `filled`
                    // initialised ones, and `filled + n <= len <= capacity`.
                    unsafe { buf.set_len(filled + n.min(len - filled)) };
                }
                Err(_) => {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => {}
                        Some(libc::EOPNOTSUPP | libc::ENOSYS) => {
                            self.no_nowait.store(true, Ordering::Relaxed);
                            return None;
                        }
                        _ => return None,
                    }
                }
            }
        }
        Some(buf)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.direct {
            Some(d) => self.write_direct(d, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let offloaded = if self.is_block_device {
            self.zero_out_device(offset, len)
        } else {
            self.punch_hole(offset, len)
        };
        match offloaded {
            Ok(()) => Ok(()),
            // Not supported by this file system or device (or not for this
            // alignment): write the zeroes.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP)
                        | Some(libc::ENOSYS)
                        | Some(libc::EINVAL)
                        | Some(libc::ENOTTY)
                ) =>
            {
                write_zeroes(self, offset, len)
            }
            Err(e) => Err(e),
        }
    }

    fn mapped_ranges(&self, range: Range<u64>, limit: usize) -> io::Result<Vec<Range<u64>>> {
        let end = range.end.min(self.len());
        let mut out = Vec::new();
        if range.start >= end || limit == 0 {
            return Ok(out);
        }
        if self.is_block_device {
            out.push(range.start..end);
            return Ok(out);
        }
        let mut pos = range.start;
        while pos < end && out.len() < limit {
            let Some(data) = self.seek(pos, libc::SEEK_DATA)? else {
                break;
            };
            if data >= end {
                break;
            }
            let hole = self.seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            if hole <= data {
                // Defensive: the file system should never report this.
                out.push(data..end);
                break;
            }
            out.push(data..hole);
            pos = hole;
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn prefetch(&self, offset: u64, len: u64) -> io::Result<bool> {
        if self.direct.is_some() {
            // Direct I/O bypasses the page cache that read-ahead would fill.
            return Ok(false);
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(false);
        };
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is
        // owned by `self.file` and open for the duration of the call.
        let rc = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED)
        };
        if rc == 0 {
            Ok(true)
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
}

/// Memory-backed storage for tests: data in a `RwLock<Vec<u8>>`, with a
/// per-block allocation map so provisioning can be observed, and counters
/// of flushes.
#[derive(Debug)]
pub struct MemBackend {
    data: RwLock<Vec<u8>>,
    /// One flag per 4096-byte chunk: allocated or not.
    mapped: RwLock<Vec<bool>>,
    read_only: bool,
    flushes: AtomicU64,
}

const MEM_CHUNK: u64 = 4096;

impl MemBackend {
    pub fn new(len: u64) -> Self {
        Self::with_read_only(len, false)
    }

    pub fn with_read_only(len: u64, read_only: bool) -> Self {
        let chunks = len.div_ceil(MEM_CHUNK) as usize;
        MemBackend {
            data: RwLock::new(vec![0; len as usize]),
            mapped: RwLock::new(vec![false; chunks]),
            read_only,
            flushes: AtomicU64::new(0),
        }
    }

    /// How many times `flush` was called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
}

impl BlockBackend for MemBackend {
    fn len(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.read().map_err(|_| io::Error::other("poisoned"))?;
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let src = d
            .get(start..start.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self
            .data
            .write()
            .map_err(|_| io::Error::other("poisoned"))?;
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let dst = d
            .get_mut(start..start.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        dst.copy_from_slice(buf);
        drop(d);
        if !buf.is_empty() {
            let mut m = self
                .mapped
                .write()
                .map_err(|_| io::Error::other("poisoned"))?;
            let first = (offset / MEM_CHUNK) as usize;
            let last = ((offset + buf.len() as u64 - 1) / MEM_CHUNK) as usize;
            for f in m.iter_mut().take(last + 1).skip(first) {
                *f = true;
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        {
            let mut d = self
                .data
                .write()
                .map_err(|_| io::Error::other("poisoned"))?;
            let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
            let end = start.saturating_add(len as usize);
            d.get_mut(start..end)
                .ok_or(io::ErrorKind::UnexpectedEof)?
                .fill(0);
        }
        // Only whole chunks become unmapped, as with hole punching.
        let mut m = self
            .mapped
            .write()
            .map_err(|_| io::Error::other("poisoned"))?;
        let first = offset.div_ceil(MEM_CHUNK);
        let last = (offset + len) / MEM_CHUNK;
        for c in first..last {
            if let Some(f) = m.get_mut(c as usize) {
                *f = false;
            }
        }
        Ok(())
    }

    fn mapped_ranges(&self, range: Range<u64>, limit: usize) -> io::Result<Vec<Range<u64>>> {
        let m = self
            .mapped
            .read()
            .map_err(|_| io::Error::other("poisoned"))?;
        let len = self.len();
        let end = range.end.min(len);
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut c = range.start / MEM_CHUNK;
        while c * MEM_CHUNK < end {
            if m.get(c as usize).copied().unwrap_or(false) {
                let s = (c * MEM_CHUNK).max(range.start);
                let e = ((c + 1) * MEM_CHUNK).min(end);
                let n = out.len();
                match out.last_mut() {
                    Some(last) if last.end == s => last.end = e,
                    _ if n == limit => break,
                    _ => out.push(s..e),
                }
            }
            c += 1;
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Its `try_read_nowait` is the default: always `None`.
    fn may_read_nowait(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backing_file_is_served_by_one_backend_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.img");
        let a = FileBackend::open(&p, Some(1 << 20), false).unwrap();
        match FileBackend::open(&p, Some(1 << 20), false) {
            Err(BackendError::Locked { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()))
            }
            other => panic!("second writable open: {other:?}"),
        }
        let e = FileBackend::open(&p, None, true).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(a);
        // Released with the backend; read-only exports may share.
        let r1 = FileBackend::open(&p, None, true).unwrap();
        let r2 = FileBackend::open(&p, None, true).unwrap();
        assert!(matches!(
            FileBackend::open(&p, None, false),
            Err(BackendError::Locked { .. })
        ));
        drop((r1, r2));
        FileBackend::open(&p, None, false).unwrap();
    }

    #[test]
    fn file_backend_read_vec_matches_read_at() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(&dir.path().join("r.img"), Some(1 << 20), false).unwrap();
        let pattern: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        b.write_at(&pattern, 4096).unwrap();
        // Spans written data and the sparse tail.
        let got = b.read_vec(400_000, 4096).unwrap();
        assert_eq!(got.len(), 400_000);
        assert_eq!(&got[..pattern.len()], &pattern[..]);
        assert!(got[pattern.len()..].iter().all(|&x| x == 0));
        let mut via_read_at = vec![0xffu8; 400_000];
        b.read_at(&mut via_read_at, 4096).unwrap();
        assert_eq!(got, via_read_at);
        assert!(b.read_vec(0, 0).unwrap().is_empty());
        let last = b.read_vec(512, b.len() - 512).unwrap();
        assert_eq!(last, vec![0u8; 512]);
        let e = b.read_vec(1024, b.len() - 512).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// The open file's flags as the kernel reports them (octal).
    fn open_flags(f: &File) -> i32 {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd())).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap()
            .trim();
        i32::from_str_radix(flags, 8).unwrap()
    }

    #[test]
    fn clustered_backend_is_uncached_and_bounces_unaligned_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.img");
        let b = FileBackend::open_clustered(&p, Some(1 << 20), false).unwrap();
        assert_ne!(
            open_flags(&b.file) & libc::O_DIRECT,
            0,
            "not opened O_DIRECT"
        );
        let d = b.direct_io().unwrap();
        assert!(d.offset.is_power_of_two() && d.memory.is_power_of_two());
        assert!(!b.prefetch(0, 4096).unwrap());
        let plain = FileBackend::open(&dir.path().join("p.img"), Some(1 << 20), false).unwrap();
        assert_eq!(open_flags(&plain.file) & libc::O_DIRECT, 0);
        assert!(plain.direct_io().is_none());

        // A buffer at an odd address, at block offsets: data round-trips and
        // another (buffered) open of the file sees it at once.
        let blk = d.offset as usize;
        let mut storage: Vec<u8> = (0..3 * blk + 1).map(|i| (i % 253) as u8).collect();
        let odd = &mut storage[1..];
        b.write_at(odd, 2 * blk as u64).unwrap();
        let mut seen = vec![0u8; odd.len()];
        File::open(&p)
            .unwrap()
            .read_exact_at(&mut seen, 2 * blk as u64)
            .unwrap();
        assert_eq!(seen, odd);
        let mut back = vec![0u8; 3 * blk + 1];
        b.read_at(&mut back[1..], 2 * blk as u64).unwrap();
        assert_eq!(&back[1..], &*odd);
        assert_eq!(b.read_vec(blk, 3 * blk as u64).unwrap(), odd[blk..2 * blk]);
        // Reads inside a direct-I/O unit are widened, not refused.
        let mut part = vec![0u8; 100];
        b.read_at(&mut part, 2 * blk as u64 + 7).unwrap();
        assert_eq!(part, odd[7..107]);
        // No cache to read from without waiting: the data just written
        // went to the medium, and a nowait read says it would block.
        assert_eq!(b.try_read_nowait(blk, 2 * blk as u64), None);
        // Past the end: a short medium, as for buffered files.
        let e = b.read_vec(2 * blk, b.len() - blk as u64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // A write that would need read-modify-write is refused.
        let e = b.write_at(&[1u8; 100], 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // The block size must be a multiple of the offset alignment.
        b.check_alignment(d.offset as u32).unwrap();
        match b.check_alignment(256) {
            Err(BackendError::DirectUnaligned {
                align, block_size, ..
            }) => {
                assert_eq!((u64::from(align), block_size), (d.offset, 256))
            }
            other => panic!("block size 256: {other:?}"),
        }
        plain.check_alignment(256).unwrap();
        // Discard falls back to (aligned) zero writes or punches a hole.
        b.discard(2 * blk as u64, blk as u64).unwrap();
        assert!(b
            .read_vec(blk, 2 * blk as u64)
            .unwrap()
            .iter()
            .all(|&x| x == 0));
    }

    #[test]
    fn direct_backend_is_uncached_and_exclusive_and_reads_any_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let b = FileBackend::open_direct(&p, Some(1 << 20), false).unwrap();
        assert_ne!(
            open_flags(&b.file) & libc::O_DIRECT,
            0,
            "not opened O_DIRECT"
        );
        let d = b.direct_io().unwrap();
        // Single-node: locked exclusively, as a buffered open is.
        assert!(matches!(
            FileBackend::open(&p, None, false),
            Err(BackendError::Locked { .. })
        ));
        assert!(matches!(
            FileBackend::open_clustered(&p, None, false),
            Err(BackendError::Locked { .. })
        ));
        // No cache: never tried, and no syscall if it were.
        assert!(!b.may_read_nowait());
        assert!(
            FileBackend::open(&dir.path().join("b.img"), Some(1 << 20), false)
                .unwrap()
                .may_read_nowait()
        );

        // Whole units written are on the file at once, for another open.
        let blk = d.offset as usize;
        let data: Vec<u8> = (0..4 * blk).map(|i| (i % 241) as u8).collect();
        b.write_at(&data, blk as u64).unwrap();
        let mut seen = vec![0u8; data.len()];
        File::open(&p)
            .unwrap()
            .read_exact_at(&mut seen, blk as u64)
            .unwrap();
        assert_eq!(seen, data);
        assert_eq!(b.try_read_nowait(blk, blk as u64), None);
        // Reads at any offset and of any length, inside one unit, across
        // units, into the sparse tail and up to the end of the file.
        let lenf = b.len();
        for (off, len) in [
            (blk as u64, blk),
            (blk as u64 + 1, 1),
            (blk as u64 + 511, 1025),
            (2 * blk as u64 - 3, blk + 6),
            (blk as u64 + 17, 4 * blk - 17),
            (5 * blk as u64 - 100, 300),
            (lenf - 1, 1),
            (lenf - blk as u64 - 5, blk + 5),
        ] {
            let want: Vec<u8> = (off..off + len as u64)
                .map(|o| {
                    let i = o.wrapping_sub(blk as u64) as usize;
                    data.get(i).copied().unwrap_or(0)
                })
                .collect();
            assert_eq!(
                b.read_vec(len, off).unwrap(),
                want,
                "read_vec {len} at {off}"
            );
            let mut odd = vec![0xeeu8; len + 1];
            b.read_at(&mut odd[1..], off).unwrap();
            assert_eq!(&odd[1..], &want[..], "read_at {len} at {off}");
        }
        let e = b.read_vec(2, lenf - 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        b.flush().unwrap();
        drop(b);
        // Read-only direct exports share, as buffered ones do.
        let r1 = FileBackend::open_direct(&p, None, true).unwrap();
        let r2 = FileBackend::open(&p, None, true).unwrap();
        assert_eq!(r1.read_vec(blk, blk as u64).unwrap(), data[..blk]);
        drop((r1, r2));
    }

    #[test]
    fn a_file_system_without_direct_io_is_refused_in_one_line() {
        // procfs (as tmpfs before Linux 6.6) refuses O_DIRECT opens.
        let p = Path::new("/proc/version");
        assert!(std::fs::metadata(p).unwrap().is_file());
        for e in [
            FileBackend::open_direct(p, None, true).unwrap_err(),
            FileBackend::open_clustered(p, None, true).unwrap_err(),
        ] {
            assert!(matches!(e, BackendError::NoDirectIo { .. }), "{e:?}");
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(
                text.starts_with("/proc/version: ") && text.contains("direct = true"),
                "{text}"
            );
        }
        // Buffered, it opens.
        FileBackend::open(p, None, true).unwrap();
    }

    /// Set an access pattern advice on the backend's open file (the
    /// range 0..0 is the whole file).
    fn advise(b: &FileBackend, advice: libc::c_int) {
        // SAFETY: posix_fadvise only reads its integer arguments on an fd
        // owned by `b.file`.
        let rc = unsafe { libc::posix_fadvise(b.file.as_raw_fd(), 0, 0, advice) };
        assert_eq!(rc, 0, "posix_fadvise: {}", io::Error::from_raw_os_error(rc));
    }

    #[test]
    fn nowait_read_is_served_from_the_page_cache_and_never_in_part() {
        // A directory on the source tree's file system, which drops clean
        // pages on request (a tmpfs, as /tmp often is, never does).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let b = FileBackend::open(&dir.path().join("n.img"), Some(1 << 20), false).unwrap();
        // No read-ahead: a page read is the only page brought in.
        advise(&b, libc::POSIX_FADV_RANDOM);
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        b.write_at(&data, 0).unwrap();
        // Just written: cached, and read without waiting.
        let got = b.try_read_nowait(65536, 12288).expect("cached pages");
        assert_eq!(got, data[12288..12288 + 65536]);
        assert_eq!(b.try_read_nowait(0, 0), Some(Vec::new()));
        // Written back and dropped from the cache: it would wait.
        b.flush().unwrap();
        advise(&b, libc::POSIX_FADV_DONTNEED);
        assert!(b.try_read_nowait(4096, 0).is_none(), "read an evicted page");
        // The first page cached, the second not: the kernel returns the
        // first alone, which is not handed out as the data of both.
        let mut page = vec![0u8; 4096];
        b.read_at(&mut page, 0).unwrap();
        assert_eq!(page, data[..4096]);
        let part = b.try_read_nowait(8192, 0).map(|v| v.len());
        assert_eq!(part, None, "returned part of a range");
        // A waiting read brings the rest in; then it is served.
        assert_eq!(b.read_vec(8192, 0).unwrap(), data[..8192]);
        assert_eq!(b.try_read_nowait(8192, 0).as_deref(), Some(&data[..8192]));
        // The memory backend keeps the default: it would block.
        let m = MemBackend::new(8192);
        assert_eq!(m.try_read_nowait(4096, 0), None);
    }

    #[test]
    fn file_backend_sparse_punch_and_seek() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lu.img");
        let b = FileBackend::open(&p, Some(8 << 20), false).unwrap();
        assert_eq!(b.len(), 8 << 20);
        assert!(b.mapped_ranges(0..b.len(), 16).unwrap().is_empty());
        b.write_at(&[0xaa; 65536], 1 << 20).unwrap();
        let m = b.mapped_ranges(0..b.len(), 16).unwrap();
        assert_eq!(m.len(), 1);
        assert!(m[0].start <= 1 << 20 && m[0].end >= (1 << 20) + 65536);
        b.discard(1 << 20, 65536).unwrap();
        assert!(b.mapped_ranges(0..b.len(), 16).unwrap().is_empty());
        let mut buf = [1u8; 512];
        b.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        b.flush().unwrap();
        // Reopen keeps the size.
        drop(b);
        let b = FileBackend::open(&p, None, true).unwrap();
        assert_eq!(b.len(), 8 << 20);
        assert!(b.is_read_only());
        b.check_alignment(4096).unwrap();
    }

    #[test]
    fn mem_backend_maps_chunks() {
        let b = MemBackend::new(64 * 1024);
        b.write_at(&[1; 10], 5000).unwrap();
        assert_eq!(b.mapped_ranges(0..65536, 16).unwrap(), vec![4096..8192]);
        b.discard(4096, 4096).unwrap();
        assert!(b.mapped_ranges(0..65536, 16).unwrap().is_empty());
        assert!(b.read_at(&mut [0; 2], 65535).is_err());
        b.write_at(&[1], 0).unwrap();
        b.write_at(&[1], 3 * 4096).unwrap();
        assert_eq!(b.mapped_ranges(0..65536, 1).unwrap(), vec![0..4096]);
        assert_eq!(
            b.mapped_ranges(0..65536, 2).unwrap(),
            vec![0..4096, 12288..16384]
        );
    }
}
