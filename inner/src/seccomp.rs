//! The inner's seccomp filter: Docker's default allowlist, compiled once
//! by hulld, passed to every init in the
//! [`InnerSpec`](crate::InnerSpec) and installed by the init before it
//! drops its capabilities, so the init and everything it starts (execs,
//! services, consoles, on every start of the inner) run under it.
//!
//! What the allowlist leaves out fails with EPERM, as under Docker's
//! default action; nothing is killed. That covers the calls Docker grants
//! only with capabilities the inner does not have (mount, bpf,
//! perf_event_open, kexec, open_by_handle_at, ...), the kernel keyrings
//! (not namespaced: the inner's root would share root's keys in the root
//! namespace), io_uring (unless allowed), userfaultfd, AF_VSOCK sockets
//! (the VM's vsock ports are global) and namespace flags to clone and
//! unshare (unless nested user namespaces are allowed). Two kinds of call
//! answer ENOSYS instead: clone3, whose flags are out of a filter's reach
//! (ENOSYS makes glibc fall back to clone), and any call newer than the
//! list, so programs fall back as on an older kernel.
//!
//! The filter is one program: the architecture check, then a binary
//! search on the call number (sorted ranges of numbers with one answer
//! each), then, for the few calls whose arguments matter (clone, unshare,
//! personality, socket), a program `seccompiler` (rust-vmm's, the compiler
//! firecracker uses) builds from rules by name. seccompiler's own output
//! for the whole list is a chain with one comparison per call, some 1,600
//! instructions the kernel walks up to once per call number as it installs
//! the filter (to find the calls always allowed, which it then lets through
//! without running the filter): 0.6 ms of the inner's start, against
//! 0.05 ms for the search's 200 instructions. seccompiler still resolves
//! each name to its number on the architecture.

use std::collections::HashMap;

use seccompiler::{sock_filter, BpfProgram, TargetArch};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What the filter lets through beyond Docker's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeccompOptions {
    /// io_uring_setup, io_uring_enter and io_uring_register.
    pub io_uring: bool,
    /// clone, clone3 and unshare with namespace flags, setns, and what a
    /// container in a nested user namespace does with its capabilities
    /// there (`unshare -r`, rootless containers): the mount calls, old and
    /// new, and sethostname. The kernel still checks each against the
    /// namespace's owner, so none reaches the inner's own mounts or name.
    /// Off, CLONE_NEWUSER fails with EPERM: a user namespace hands a full
    /// capability set over the kernel's namespaced code.
    pub nested_user_namespaces: bool,
}

/// A compiled filter as it travels in the [`InnerSpec`](crate::InnerSpec):
/// BPF programs installed in order, each instruction as
/// `code | jt << 16 | jf << 24 | k << 32`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompFilter {
    programs: Vec<Vec<u64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filters are not built for the architecture {0}")]
    Arch(String),
    #[error("cannot compile the inner's seccomp filter {name}")]
    Compile {
        name: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("seccompiler gave no number for the system call {0}")]
    Number(&'static str),
    #[error("the inner's seccomp filter {0} has more instructions than the kernel takes")]
    TooLong(usize),
    #[error("seccomp(SECCOMP_SET_MODE_FILTER) refused filter {index}")]
    Install {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Every call Docker's default profile allows unconditionally on 64-bit
/// architectures that seccompiler names, less what hull denies on top:
/// none of the keyring, io_uring, userfaultfd or capability-gated calls
/// is here.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "adjtimex",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chroot",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "dup",
    "dup3",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_pwait2",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_requeue",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "getcpu",
    "getcwd",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "kcmp",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lgetxattr",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdirat",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "openat",
    "openat2",
    "pidfd_getfd",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_madvise",
    "process_mrelease",
    "process_vm_readv",
    "process_vm_writev",
    "pselect6",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_tid_address",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd4",
    "socketpair",
    "splice",
    "statfs",
    "statx",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlinkat",
    "utimensat",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
];

/// x86_64's older calls, which aarch64 never had (its libc uses the *at
/// forms above), and its own.
const ALLOWED_X86_64: &[&str] = &[
    "access",
    "alarm",
    "arch_prctl",
    "chmod",
    "chown",
    "creat",
    "dup2",
    "epoll_create",
    "epoll_wait",
    "eventfd",
    "fork",
    "futimesat",
    "getdents",
    "getpgrp",
    "inotify_init",
    "lchown",
    "link",
    "lstat",
    "mkdir",
    "mknod",
    "modify_ldt",
    "open",
    "pause",
    "pipe",
    "poll",
    "readlink",
    "rename",
    "rmdir",
    "select",
    "signalfd",
    "stat",
    "symlink",
    "time",
    "unlink",
    "utime",
    "utimes",
    "vfork",
];

const IO_URING: &[&str] = &["io_uring_setup", "io_uring_enter", "io_uring_register"];

/// The namespace flags of clone(2) and unshare(2): NEWNS, NEWCGROUP,
/// NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (and NEWTIME, which Docker's
/// mask predates).
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | 0x80) as u64;

/// personality(2) values Docker allows: PER_LINUX, UNAME26, PER_LINUX32,
/// PER_LINUX32|UNAME26 and the query 0xffffffff.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

const AF_VSOCK: u64 = libc::AF_VSOCK as u64;

fn rule(name: &str) -> Value {
    json!({ "syscall": name })
}

fn rule_if(name: &str, index: u8, op: Value, val: u64) -> Value {
    json!({
        "syscall": name,
        "args": [{ "index": index, "type": "qword", "op": op, "val": val }],
    })
}

/// What a container in a nested user namespace needs (see
/// [`SeccompOptions::nested_user_namespaces`]).
const NESTED_USER_NAMESPACES: &[&str] = &[
    "clone",
    "clone3",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "sethostname",
    "setdomainname",
];

/// The calls allowed whatever their arguments.
fn unconditional(options: SeccompOptions, arch: TargetArch) -> Vec<&'static str> {
    let mut names = ALLOWED.to_vec();
    if arch == TargetArch::x86_64 {
        names.extend(ALLOWED_X86_64);
    }
    if options.io_uring {
        names.extend(IO_URING);
    }
    if options.nested_user_namespaces {
        names.extend(NESTED_USER_NAMESPACES);
    }
    names
}

/// The calls allowed for some arguments only, as seccompiler rules.
fn conditional(options: SeccompOptions) -> Vec<(&'static str, Value)> {
    let mut rules = Vec::new();
    if !options.nested_user_namespaces {
        // The flags are clone's first argument on both architectures
        // (x86_64's CLONE_BACKWARDS order puts the stack second).
        for name in ["clone", "unshare"] {
            rules.push((
                name,
                rule_if(name, 0, json!({ "masked_eq": NAMESPACE_FLAGS }), 0),
            ));
        }
    }
    for value in PERSONALITIES {
        rules.push(("personality", rule_if("personality", 0, json!("eq"), value)));
    }
    // Every family but AF_VSOCK: the VM's vsock ports are not namespaced.
    rules.push(("socket", rule_if("socket", 0, json!("ne"), AF_VSOCK)));
    rules
}

/// The newest call the allowlist knows of: futex_requeue (Linux 6.7).
/// Since Linux 5.1 a new call has the same number on every architecture.
const NEWEST_KNOWN: u32 = 456;

/// AUDIT_ARCH_* of linux/audit.h, which seccompiler keeps to itself.
fn audit_arch(arch: TargetArch) -> u32 {
    match arch {
        TargetArch::x86_64 => 0xc000_003e,
        TargetArch::aarch64 => 0xc000_00b7,
        TargetArch::riscv64 => 0xc000_00f3,
    }
}

/// The architecture hulld runs on, as seccompiler names it.
pub fn native_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH.to_string()))
}

const LD_W_ABS: u16 = 0x20;
const JA: u16 = 0x05;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;
// struct seccomp_data: nr at 0, arch at 4.
const NR: u32 = 0;
const ARCH: u32 = 4;
const RET_EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
const RET_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn compile_one(
    name: &'static str,
    filter: Value,
    arch: TargetArch,
) -> Result<Vec<sock_filter>, SeccompError> {
    let text = json!({ name: filter }).to_string();
    let mut map: HashMap<String, BpfProgram> =
        seccompiler::compile_from_json(text.as_bytes(), arch)
            .map_err(|source| SeccompError::Compile { name, source })?;
    Ok(map
        .remove(name)
        .unwrap_or_default()
        .into_iter()
        .map(without_kill)
        .collect())
}

/// Each call's number on `arch`. seccompiler keeps its tables to itself,
/// so a one-rule filter per call (all compiled at once) gives it away: its
/// first comparison after loading the number is against the call's.
fn numbers(names: &[&'static str], arch: TargetArch) -> Result<Vec<u32>, SeccompError> {
    let filters: serde_json::Map<String, Value> = names
        .iter()
        .map(|name| {
            let filter = json!({
                "mismatch_action": "allow",
                "match_action": { "errno": libc::EPERM },
                "filter": [rule(name)],
            });
            ((*name).to_string(), filter)
        })
        .collect();
    let text = Value::Object(filters).to_string();
    let map: HashMap<String, BpfProgram> = seccompiler::compile_from_json(text.as_bytes(), arch)
        .map_err(|source| SeccompError::Compile {
            name: "syscall numbers",
            source,
        })?;
    names
        .iter()
        .map(|name| {
            let program = map.get(*name).ok_or(SeccompError::Number(name))?;
            let load = program
                .iter()
                .position(|i| i.code == LD_W_ABS && i.k == NR)
                .ok_or(SeccompError::Number(name))?;
            program
                .get(load + 1)
                .filter(|i| i.code == JEQ_K)
                .map(|i| i.k)
                .ok_or(SeccompError::Number(name))
        })
        .collect()
}

/// What the filter answers for a range of call numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Ret(u32),
    /// The call is allowed for some arguments only: the program that
    /// checks them decides.
    Arguments,
}

enum Insn {
    Bpf(sock_filter),
    ToArguments,
}

/// A binary search over the ranges (each from its first number up to the
/// next's), so that the kernel walks a dozen instructions per call, when
/// it runs the filter and when, as it installs it, it runs the filter for
/// every call number to find those always allowed. A chain with one
/// comparison per call walked hundreds each time: installing it took
/// longer than the rest of the inner's start.
fn search(ranges: &[(u32, Leaf)]) -> Vec<Insn> {
    if let [(_, leaf)] = ranges {
        return vec![match leaf {
            Leaf::Ret(k) => Insn::Bpf(insn(RET_K, 0, 0, *k)),
            Leaf::Arguments => Insn::ToArguments,
        }];
    }
    let mid = ranges.len() / 2;
    let below = search(&ranges[..mid]);
    let above = search(&ranges[mid..]);
    let first_above = ranges[mid].0;
    let mut out = Vec::with_capacity(below.len() + above.len() + 2);
    match u8::try_from(below.len()) {
        Ok(jt) => out.push(Insn::Bpf(insn(JGE_K, jt, 0, first_above))),
        // A conditional jump reaches 255 instructions; JA reaches any.
        Err(_) => {
            out.push(Insn::Bpf(insn(JGE_K, 0, 1, first_above)));
            let skip = u32::try_from(below.len()).unwrap_or(u32::MAX);
            out.push(Insn::Bpf(insn(JA, 0, 0, skip)));
        }
    }
    out.extend(below);
    out.extend(above);
    out
}

/// Builds the one program of the inner's filter for `arch`: the
/// architecture check, the binary search on the call number, and
/// seccompiler's program for the calls whose arguments matter.
fn program(options: SeccompOptions, arch: TargetArch) -> Result<Vec<sock_filter>, SeccompError> {
    let last = usize::try_from(NEWEST_KNOWN).unwrap_or(usize::MAX);
    let mut leaves = vec![Leaf::Ret(RET_EPERM); last + 1];
    // A number past NEWEST_KNOWN stays out of `leaves`: ENOSYS, newer
    // than the list, whatever the list says.
    let mut set = |nr: u32, leaf| {
        if let Some(l) = usize::try_from(nr).ok().and_then(|n| leaves.get_mut(n)) {
            *l = leaf;
        }
    };
    for nr in numbers(&unconditional(options, arch), arch)? {
        set(nr, Leaf::Ret(libc::SECCOMP_RET_ALLOW));
    }
    let conditional = conditional(options);
    let names: Vec<&'static str> = conditional.iter().map(|(name, _)| *name).collect();
    for nr in numbers(&names, arch)? {
        set(nr, Leaf::Arguments);
    }
    if !options.nested_user_namespaces {
        // clone3's flags sit in a struct a filter cannot read: ENOSYS, so
        // that glibc falls back to clone, whose flags are checked.
        for nr in numbers(&["clone3"], arch)? {
            set(nr, Leaf::Ret(RET_ENOSYS));
        }
    }
    // Calls newer than the list answer ENOSYS, as on an older kernel, so
    // that a program (or a newer libc) that tries one falls back to what
    // it used before, where EPERM would be an error.
    let mut ranges: Vec<(u32, Leaf)> = Vec::new();
    let newer = std::iter::once((NEWEST_KNOWN + 1, Leaf::Ret(RET_ENOSYS)));
    for (nr, leaf) in (0..=NEWEST_KNOWN).zip(leaves).chain(newer) {
        if ranges.last().map(|(_, l)| *l) != Some(leaf) {
            ranges.push((nr, leaf));
        }
    }
    let arguments = compile_one(
        "arguments",
        json!({
            "mismatch_action": { "errno": libc::EPERM },
            "match_action": "allow",
            "filter": conditional.into_iter().map(|(_, rule)| rule).collect::<Vec<_>>(),
        }),
        arch,
    )?;

    let mut out = vec![
        insn(LD_W_ABS, 0, 0, ARCH),
        // Another architecture's numbers (x86_64's 32-bit entry points,
        // for one) mean other calls: EPERM like any call not in the list.
        insn(JEQ_K, 1, 0, audit_arch(arch)),
        insn(RET_K, 0, 0, RET_EPERM),
        insn(LD_W_ABS, 0, 0, NR),
    ];
    let search = search(&ranges);
    let arguments_at = out.len() + search.len();
    for step in search {
        out.push(match step {
            Insn::Bpf(bpf) => bpf,
            Insn::ToArguments => {
                let skip = arguments_at - (out.len() + 1);
                insn(JA, 0, 0, u32::try_from(skip).unwrap_or(u32::MAX))
            }
        });
    }
    out.extend(arguments);
    Ok(out)
}

/// Compiles the inner's filter for `arch`.
pub fn compile(options: SeccompOptions, arch: TargetArch) -> Result<SeccompFilter, SeccompError> {
    let program = program(options, arch)?;
    if program.len() > usize::from(u16::MAX) {
        return Err(SeccompError::TooLong(program.len()));
    }
    Ok(SeccompFilter {
        programs: vec![program.into_iter().map(encode).collect()],
    })
}

/// seccompiler kills a process whose call comes from another architecture;
/// hull's calls never kill, so they get EPERM like any call not in the
/// list.
fn without_kill(mut insn: sock_filter) -> sock_filter {
    if insn.code == RET_K && insn.k == libc::SECCOMP_RET_KILL_PROCESS {
        insn.k = RET_EPERM;
    }
    insn
}

fn encode(insn: sock_filter) -> u64 {
    u64::from(insn.code)
        | u64::from(insn.jt) << 16
        | u64::from(insn.jf) << 24
        | u64::from(insn.k) << 32
}

fn decode(word: u64) -> libc::sock_filter {
    // Each field is cut back out of the bits `encode` put it in.
    #[allow(clippy::cast_possible_truncation)]
    libc::sock_filter {
        code: word as u16,
        jt: (word >> 16) as u8,
        jf: (word >> 24) as u8,
        k: (word >> 32) as u32,
    }
}

impl SeccompFilter {
    /// Installs every program on the calling thread. Without
    /// PR_SET_NO_NEW_PRIVS (the caller must hold CAP_SYS_ADMIN): setuid
    /// and file-capability programs in the inner (su, sudo, ping) keep
    /// working, as under Docker.
    pub fn install(&self) -> Result<(), SeccompError> {
        for (index, words) in self.programs.iter().enumerate() {
            let program: Vec<libc::sock_filter> = words.iter().map(|w| decode(*w)).collect();
            let len =
                u16::try_from(program.len()).map_err(|_| SeccompError::TooLong(program.len()))?;
            let fprog = libc::sock_fprog {
                len,
                filter: program.as_ptr().cast_mut(),
            };
            // SAFETY: `fprog` points at `program`, alive across the call; the
            // kernel copies the instructions and keeps no pointer.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &fprog as *const libc::sock_fprog,
                )
            };
            if rc != 0 {
                return Err(SeccompError::Install {
                    index,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// BPF instructions in all, for the log.
    pub fn instructions(&self) -> usize {
        self.programs.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_for_x86_64_and_aarch64_with_every_option() {
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            for io_uring in [false, true] {
                for nested_user_namespaces in [false, true] {
                    let options = SeccompOptions {
                        io_uring,
                        nested_user_namespaces,
                    };
                    let filter = compile(options, arch)
                        .unwrap_or_else(|e| panic!("{arch:?} {options:?}: {e:?}"));
                    let programs = programs(&filter);
                    let calls = numbers(&["getpid", "keyctl"], arch).unwrap();
                    let answer = |nr| verdict(&programs, nr, audit_arch(arch), &[0; 6]);
                    assert_eq!(answer(calls[0]), libc::SECCOMP_RET_ALLOW);
                    assert_eq!(answer(calls[1]), RET_EPERM);
                }
            }
        }
    }

    #[test]
    fn no_instruction_kills() {
        let filter = compile(SeccompOptions::default(), TargetArch::x86_64).unwrap();
        for word in filter.programs.iter().flatten() {
            let insn = decode(*word);
            assert!(
                !(insn.code == 0x06 && insn.k == libc::SECCOMP_RET_KILL_PROCESS),
                "a kill is left in the filter"
            );
        }
    }

    #[test]
    fn denied_calls_are_not_in_the_allowlist() {
        for denied in [
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "userfaultfd",
            "kexec_load",
            "kexec_file_load",
            "open_by_handle_at",
            "mount",
            "setns",
        ] {
            assert!(!ALLOWED.contains(&denied), "{denied}");
            assert!(!ALLOWED_X86_64.contains(&denied), "{denied}");
        }
    }

    /// In a child (with no_new_privs, so no privilege is needed): what the
    /// installed filter answers.
    #[test]
    fn the_installed_filter_answers_eperm_enosys_or_lets_through() {
        let filter = compile(SeccompOptions::default(), native_arch().unwrap()).unwrap();
        let errno = |rc: libc::c_long| {
            if rc < 0 {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                0
            }
        };
        // SAFETY: the child only makes system calls and exits; glibc's fork
        // leaves malloc usable in it.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: plain prctl and system calls with null or bad
                // arguments; nothing is written to this process's memory.
                let code = unsafe {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    if filter.install().is_err() {
                        libc::_exit(10);
                    }
                    let checks = [
                        (errno(libc::syscall(libc::SYS_getppid)), 0),
                        (
                            errno(libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0)),
                            libc::EPERM,
                        ),
                        (
                            errno(libc::syscall(libc::SYS_bpf, 0xffff, 0, 0)),
                            libc::EPERM,
                        ),
                        (
                            errno(libc::syscall(libc::SYS_socket, libc::AF_VSOCK, 1, 0)),
                            libc::EPERM,
                        ),
                        (
                            errno(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)),
                            libc::EPERM,
                        ),
                        (errno(libc::syscall(libc::SYS_clone3, 0, 0)), libc::ENOSYS),
                        (errno(libc::syscall(462, 0, 0, 0)), libc::ENOSYS),
                        (errno(libc::syscall(1000)), libc::ENOSYS),
                    ];
                    let wrong = checks.iter().position(|(got, want)| got != want);
                    wrong.map_or(0, |i| 20 + i32::try_from(i).unwrap_or(99))
                };
                // SAFETY: ends the child without running the parent's atexit.
                unsafe { libc::_exit(code) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "the child was killed: {status:#x}");
                assert_eq!(
                    libc::WEXITSTATUS(status),
                    0,
                    "10: install failed, 20+i: check i"
                );
            }
        }
    }

    /// The filter as it was compiled before the binary search: seccompiler's
    /// chain with one comparison per call, then clone3's ENOSYS, then the
    /// ENOSYS for calls newer than the list, three programs.
    fn linear(options: SeccompOptions, arch: TargetArch) -> Vec<Vec<sock_filter>> {
        let mut rules: Vec<Value> = unconditional(options, arch)
            .iter()
            .map(|n| rule(n))
            .collect();
        rules.extend(conditional(options).into_iter().map(|(_, r)| r));
        let allowlist = json!({
            "mismatch_action": { "errno": libc::EPERM },
            "match_action": "allow",
            "filter": rules,
        });
        let mut programs = vec![compile_one("allowlist", allowlist, arch).unwrap()];
        if !options.nested_user_namespaces {
            let clone3 = json!({
                "mismatch_action": "allow",
                "match_action": { "errno": libc::ENOSYS },
                "filter": [rule("clone3")],
            });
            programs.push(compile_one("clone3", clone3, arch).unwrap());
        }
        const JGT_K: u16 = 0x25;
        programs.push(vec![
            insn(LD_W_ABS, 0, 0, ARCH),
            insn(JEQ_K, 0, 3, audit_arch(arch)),
            insn(LD_W_ABS, 0, 0, NR),
            insn(JGT_K, 0, 1, NEWEST_KNOWN),
            insn(RET_K, 0, 0, RET_ENOSYS),
            insn(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ]);
        programs
    }

    /// A classic BPF interpreter for what seccomp programs use, over
    /// struct seccomp_data (little-endian, as on both architectures).
    fn run(program: &[sock_filter], nr: u32, arch: u32, args: &[u64; 6]) -> u32 {
        let word = |k: u32| -> u32 {
            match k {
                NR => nr,
                ARCH => arch,
                16..=63 if k.is_multiple_of(4) => {
                    let arg = args[usize::try_from((k - 16) / 8).unwrap()];
                    let half = if k.is_multiple_of(8) {
                        arg & 0xffff_ffff
                    } else {
                        arg >> 32
                    };
                    u32::try_from(half).unwrap()
                }
                _ => panic!("load of seccomp_data offset {k}"),
            }
        };
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = &program[pc];
            pc += 1;
            let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            match i.code {
                LD_W_ABS => a = word(i.k),
                0x54 => a &= i.k,
                JA => pc += usize::try_from(i.k).unwrap(),
                JEQ_K => pc += jump(a == i.k),
                0x25 => pc += jump(a > i.k),
                JGE_K => pc += jump(a >= i.k),
                0x45 => pc += jump(a & i.k != 0),
                RET_K => return i.k,
                code => panic!("instruction {code:#x} at {}", pc - 1),
            }
        }
    }

    /// As the kernel combines the programs on a thread: the newest first,
    /// and a later one's answer only if its action comes first in order.
    fn verdict(programs: &[Vec<sock_filter>], nr: u32, arch: u32, args: &[u64; 6]) -> u32 {
        let action = |ret: u32| (ret & libc::SECCOMP_RET_ACTION_FULL) as i32;
        let mut ret = libc::SECCOMP_RET_ALLOW;
        for program in programs.iter().rev() {
            let got = run(program, nr, arch, args);
            if action(got) < action(ret) {
                ret = got;
            }
        }
        ret
    }

    fn programs(filter: &SeccompFilter) -> Vec<Vec<sock_filter>> {
        filter
            .programs
            .iter()
            .map(|p| {
                p.iter()
                    .map(|w| {
                        let i = decode(*w);
                        insn(i.code, i.jt, i.jf, i.k)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_search_answers_every_call_as_the_chain_did() {
        let values: Vec<u64> = vec![
            0,
            1,
            libc::SIGCHLD as u64,
            libc::AF_INET as u64,
            AF_VSOCK,
            AF_VSOCK | 1 << 32,
            (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND) as u64
                | (libc::CLONE_THREAD | libc::CLONE_SETTLS) as u64,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64,
            libc::CLONE_NEWNS as u64,
            (libc::CLONE_NEWNET | libc::CLONE_VM) as u64,
            0x80,
            NAMESPACE_FLAGS,
            0x8,
            0x2_0000,
            0x2_0008,
            0x2_0001,
            0xffff_ffff,
            1 << 32,
            0x1_0000_0008,
            u64::MAX,
        ];
        let mut patterns = vec![[0; 6]];
        for v in &values {
            patterns.push([*v, 0, 0, 0, 0, 0]);
            patterns.push([0, *v, 0, 0, 0, 0]);
            patterns.push([*v; 6]);
        }
        let mut numbers: Vec<u32> = (0..=512).collect();
        numbers.extend([0x4000_0000, 0x4000_0000 + 56, 0x4000_0000 + 435, u32::MAX]);
        let mut answers = std::collections::HashSet::new();
        let options = [false, true].into_iter().flat_map(|io_uring| {
            [false, true].map(|nested_user_namespaces| SeccompOptions {
                io_uring,
                nested_user_namespaces,
            })
        });
        let builds = options.flat_map(|o| [(TargetArch::x86_64, o), (TargetArch::aarch64, o)]);
        for (arch, options) in builds {
            let old = linear(options, arch);
            let new = programs(&compile(options, arch).unwrap());
            assert_eq!(new.len(), 1);
            let archs = [
                audit_arch(arch),
                audit_arch(TargetArch::riscv64),
                0x4000_0003,
            ];
            for audit in archs {
                for &nr in &numbers {
                    for args in &patterns {
                        let want = verdict(&old, nr, audit, args);
                        let got = verdict(&new, nr, audit, args);
                        assert_eq!(
                            got, want,
                            "{arch:?} {options:?} arch {audit:#x} call {nr} args {args:x?}"
                        );
                        answers.insert(got);
                    }
                }
            }
        }
        // Every kind of answer was compared, not only one.
        let kinds = [libc::SECCOMP_RET_ALLOW, RET_EPERM, RET_ENOSYS];
        assert!(kinds.iter().all(|k| answers.contains(k)), "{answers:x?}");
    }

    #[test]
    fn the_search_is_a_fraction_of_the_chain() {
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let options = SeccompOptions::default();
            let chain: usize = linear(options, arch).iter().map(Vec::len).sum();
            let search = compile(options, arch).unwrap().instructions();
            assert!(search * 3 < chain, "{arch:?}: {search} against {chain}");
        }
    }

    #[test]
    fn encoding_round_trips() {
        let insn = sock_filter {
            code: 0x15,
            jt: 3,
            jf: 200,
            k: 0xc000_003e,
        };
        let back = decode(encode(insn.clone()));
        assert_eq!(
            (back.code, back.jt, back.jf, back.k),
            (insn.code, insn.jt, insn.jf, insn.k)
        );
    }
}
