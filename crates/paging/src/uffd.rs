//! A thin wrapper over Linux userfaultfd: open, register, and the few ioctls
//! the pager uses (copy, write-protect, wake, poison).
//!
//! The `userfaultfd` crate needs libclang to build and lacks poison and the
//! newer features, so the handful of ioctls are declared here. Their numbers
//! are the kernel's `_IOWR(0xAA, nr, struct)` values, checked in the tests
//! against the arithmetic that produces them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The size of the pages userfaultfd works in on this platform.
pub const PAGE: usize = 4096;

const UFFD_API: u64 = 0xAA;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xAA << 8) | nr
}

const USERFAULTFD_IOC_NEW: u64 = 0xAA << 8;
const UFFDIO_API: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, 24);
const UFFDIO_POISON: u64 = iowr(0x08, 32);

const REGISTER_MODE_MISSING: u64 = 1;
const REGISTER_MODE_WP: u64 = 2;
const COPY_MODE_WP: u64 = 2;
const WRITEPROTECT_MODE_WP: u64 = 1;

/// Fault flags in a page-fault message.
const FLAG_WRITE: u64 = 1;
const FLAG_WP: u64 = 2;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

const FEATURE_POISON: u64 = 1 << 14;

#[repr(C)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct WriteProtectArg {
    range: Range,
    mode: u64,
}

#[repr(C)]
struct PoisonArg {
    range: Range,
    mode: u64,
    updated: i64,
}

/// What a userfaultfd read returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a missing page (`wp == false`) or wrote to a
    /// write-protected one (`wp == true`). `write` is set for write accesses.
    Fault { addr: usize, write: bool, wp: bool },
    /// Pages in `[start, end)` were dropped by `madvise` from outside the pager.
    Remove { start: usize, end: usize },
    /// The range was unmapped or moved; the pager stops serving it.
    Unmap { start: usize, end: usize },
    /// Another event (fork, for instance), which the pager does not request.
    Other(u8),
}

/// An open userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    poison: bool,
}

fn ioctl<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every `req` used in this module is paired with the `#[repr(C)]`
    // struct whose size is encoded in it, and `arg` is a live exclusive
    // reference to that struct for the duration of the call.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd that also receives faults raised inside the kernel
    /// (a `read(2)` into a far buffer): through `/dev/userfaultfd` when it can
    /// be opened, else the syscall (which needs `CAP_SYS_PTRACE` or the
    /// `vm.unprivileged_userfaultfd` sysctl for kernel faults).
    pub fn open() -> io::Result<Uffd> {
        // UFFDIO_API succeeds once per descriptor: ask on one what the kernel
        // offers, then enable the one optional feature used on a fresh one.
        let probe = Self::new_fd()?;
        let mut api = ApiArg {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(probe.as_raw_fd(), UFFDIO_API, &mut api)?;
        let poison = api.features & FEATURE_POISON != 0;
        drop(probe);
        let fd = Self::new_fd()?;
        let mut api = ApiArg {
            api: UFFD_API,
            features: if poison { FEATURE_POISON } else { 0 },
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
        Ok(Uffd { fd, poison })
    }

    /// A new non-blocking descriptor: `/dev/userfaultfd`, else the syscall.
    fn new_fd() -> io::Result<OwnedFd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        Self::open_dev(flags).or_else(|dev_err| {
            // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
            let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            if r < 0 {
                let sys_err = io::Error::last_os_error();
                return Err(io::Error::new(
                    sys_err.kind(),
                    format!(
                        "userfaultfd is unavailable: /dev/userfaultfd: {dev_err}; \
                         userfaultfd(2): {sys_err} (run as root, or set vm.unprivileged_userfaultfd=1)"
                    ),
                ));
            }
            // SAFETY: a non-negative return from userfaultfd(2) is a new fd we own.
            Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
        })
    }

    fn open_dev(flags: i32) -> io::Result<OwnedFd> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                USERFAULTFD_IOC_NEW as libc::c_ulong,
                flags as libc::c_long,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(r) })
    }

    /// Registers `[start, start + len)` for missing and write-protect faults.
    pub fn register(&self, start: usize, len: usize) -> io::Result<()> {
        let mut arg = RegisterArg {
            range: Range {
                start: start as u64,
                len: len as u64,
            },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut arg)
    }

    /// Installs `len` bytes from `src` at the missing pages at `dst` and wakes
    /// the threads waiting on them. With `protect` the pages are installed
    /// write-protected, so the first write raises a fault.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes; `dst` must be page-aligned
    /// inside a range registered on this descriptor.
    pub unsafe fn copy(
        &self,
        dst: usize,
        src: *const u8,
        len: usize,
        protect: bool,
    ) -> io::Result<()> {
        let mut arg = CopyArg {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: if protect { COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut arg)
    }

    /// Write-protects (`protect`) or unprotects a range; unprotecting wakes
    /// the writers waiting on it.
    pub fn write_protect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        let mut arg = WriteProtectArg {
            range: Range {
                start: start as u64,
                len: len as u64,
            },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut arg)
    }

    /// Wakes threads waiting on faults in a range (they retry the access).
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut arg = Range {
            start: start as u64,
            len: len as u64,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut arg)
    }

    /// Marks missing pages poisoned: touching them raises `SIGBUS`. Returns
    /// false if the kernel lacks the feature.
    pub fn poison(&self, start: usize, len: usize) -> io::Result<bool> {
        if !self.poison {
            return Ok(false);
        }
        let mut arg = PoisonArg {
            range: Range {
                start: start as u64,
                len: len as u64,
            },
            mode: 0,
            updated: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_POISON, &mut arg).map(|_| true)
    }

    /// Reads the next event if one is queued (the descriptor is non-blocking:
    /// several handler threads poll it, and another may take the message
    /// first), else `Ok(None)`.
    pub fn next_event(&self) -> io::Result<Option<Event>> {
        let mut msg = [0u8; 32];
        loop {
            // SAFETY: msg is a writable 32-byte buffer, the size of `struct uffd_msg`.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return Ok(None),
                    _ => return Err(e),
                }
            }
            if r == 0 {
                return Ok(None);
            }
            if r as usize != msg.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short userfaultfd read",
                ));
            }
            return Ok(Some(decode(&msg)));
        }
    }

    /// Polls with a timeout; true if an event is ready.
    pub fn wait_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: p is one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(r > 0 && p.revents & libc::POLLIN != 0)
    }
}

/// A per-thread wait on the descriptor. Several handler threads share one
/// userfaultfd; with `poll` every message would wake all of them, and all but
/// one would find nothing to read. Each waiter is an epoll instance holding
/// the descriptor with `EPOLLEXCLUSIVE`, so a message wakes one handler.
#[derive(Debug)]
pub struct Waiter {
    epoll: OwnedFd,
}

impl Uffd {
    /// A waiter for one handler thread.
    pub fn waiter(&self) -> io::Result<Waiter> {
        // SAFETY: epoll_create1 takes flags and returns a new fd or -1.
        let e = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if e < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: e is a new fd we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(e) };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            u64: 0,
        };
        // SAFETY: valid epoll fd, valid uffd, ev lives across the call.
        let r = unsafe { libc::epoll_ctl(e, libc::EPOLL_CTL_ADD, self.fd.as_raw_fd(), &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waiter { epoll })
    }
}

impl Waiter {
    /// Waits up to `timeout_ms` for a message; true if one may be ready.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: one writable epoll_event.
        let r = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut ev, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(r > 0)
    }
}

fn word(msg: &[u8; 32], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[at..at + 8]);
    u64::from_ne_bytes(b)
}

/// Decodes a `struct uffd_msg`: the event byte, then its argument at offset 8.
fn decode(msg: &[u8; 32]) -> Event {
    match msg[0] {
        EVENT_PAGEFAULT => {
            let flags = word(msg, 8);
            Event::Fault {
                addr: word(msg, 16) as usize,
                write: flags & FLAG_WRITE != 0,
                wp: flags & FLAG_WP != 0,
            }
        }
        EVENT_REMOVE => Event::Remove {
            start: word(msg, 8) as usize,
            end: word(msg, 16) as usize,
        },
        EVENT_UNMAP => Event::Unmap {
            start: word(msg, 8) as usize,
            end: word(msg, 16) as usize,
        },
        EVENT_REMAP => Event::Unmap {
            start: word(msg, 8) as usize,
            end: word(msg, 8) as usize + word(msg, 24) as usize,
        },
        other => Event::Other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(UFFDIO_POISON, 0xC020_AA08);
        assert_eq!(std::mem::size_of::<CopyArg>(), 40);
        assert_eq!(std::mem::size_of::<RegisterArg>(), 32);
        assert_eq!(std::mem::size_of::<WriteProtectArg>(), 24);
        assert_eq!(std::mem::size_of::<PoisonArg>(), 32);
    }

    #[test]
    fn decodes_fault_messages() {
        let mut m = [0u8; 32];
        m[0] = EVENT_PAGEFAULT;
        m[8..16].copy_from_slice(&(FLAG_WRITE | FLAG_WP).to_ne_bytes());
        m[16..24].copy_from_slice(&0x7000_1000u64.to_ne_bytes());
        assert_eq!(
            decode(&m),
            Event::Fault {
                addr: 0x7000_1000,
                write: true,
                wp: true
            }
        );
        m[0] = EVENT_REMOVE;
        m[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        m[16..24].copy_from_slice(&0x3000u64.to_ne_bytes());
        assert_eq!(
            decode(&m),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
    }
}
