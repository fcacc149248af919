//! Collectives across processes on libtorch's own distributed engine, c10d:
//! rendezvous through a `TCPStore` from torchrun's environment, a Gloo
//! process group, and allreduce / broadcast / barrier with a timeout on
//! every call. tch binds none of c10d, so `shim/c10d.cpp` (compiled against
//! the same libtorch) is the way in.
//!
//! A lost peer is an error naming it, never a hang: every collective waits
//! at most the group's timeout, and each rank keeps a heartbeat counter in
//! the store, so after a failure the survivors tell which ranks stopped.

use std::ffi::{CString, c_char, c_void};
use std::sync::OnceLock;
use std::time::Duration;
use tch::Tensor;

unsafe extern "C" {
    fn mz_c10d_new(
        host: *const c_char,
        port: u16,
        rank: i32,
        world: i32,
        host_store: bool,
        timeout_ms: i64,
        beat_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
    fn mz_c10d_free(group: *mut c_void);
    fn mz_c10d_allreduce_sum(
        group: *mut c_void,
        t: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn mz_c10d_broadcast(
        group: *mut c_void,
        t: *mut c_void,
        root: i32,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn mz_c10d_barrier(group: *mut c_void, err: *mut c_char, len: usize) -> i32;
    fn mz_c10d_send(
        group: *mut c_void,
        t: *mut c_void,
        dst: i32,
        tag: i32,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn mz_c10d_recv(
        group: *mut c_void,
        t: *mut c_void,
        src: i32,
        tag: i32,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn mz_c10d_heartbeats(
        group: *mut c_void,
        counts: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
}

/// How often each rank bumps its heartbeat, and how long survivors watch
/// the counters after a failure (three beats).
const BEAT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(
        "{var} = {value:?} is not valid: {problem} (set by torchrun or srun; see the README's \
         distributed section)"
    )]
    Env {
        var: &'static str,
        value: String,
        problem: &'static str,
    },
    #[error(
        "rank {rank}/{world}: no rendezvous with the other ranks at {addr}:{port} within \
         {timeout:?}: {detail}"
    )]
    Rendezvous {
        rank: usize,
        world: usize,
        addr: String,
        port: u16,
        timeout: Duration,
        detail: String,
    },
    #[error("rank {rank}/{world}: {op} failed: {lost}; c10d said: {detail}")]
    Collective {
        op: &'static str,
        rank: usize,
        world: usize,
        lost: String,
        detail: String,
    },
    #[error("{0}")]
    Usage(String),
}

/// torchrun's (and the README's srun recipe's) view of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub addr: String,
    pub port: u16,
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE`):
    /// every rank connects to it, rank 0 included.
    pub agent_store: bool,
}

impl Launch {
    /// The launch this process is part of, from `MASTER_ADDR`, `MASTER_PORT`,
    /// `RANK`, `WORLD_SIZE` and `LOCAL_RANK`; `None` when `WORLD_SIZE` is
    /// unset or 1 (one process, no group).
    pub fn from_env() -> Result<Option<Launch>, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>, DistError> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let world = number("WORLD_SIZE", &world)?;
        if world == 0 {
            return Err(DistError::Env {
                var: "WORLD_SIZE",
                value: "0".into(),
                problem: "must be at least 1",
            });
        }
        if world == 1 {
            return Ok(None);
        }
        let need = |k: &'static str| {
            var(k).ok_or(DistError::Env {
                var: k,
                value: String::new(),
                problem: "is unset while WORLD_SIZE > 1",
            })
        };
        let rank = number("RANK", &need("RANK")?)?;
        if rank >= world {
            return Err(DistError::Env {
                var: "RANK",
                value: rank.to_string(),
                problem: "must be below WORLD_SIZE",
            });
        }
        let port = need("MASTER_PORT")?;
        let port = port.parse::<u16>().map_err(|_| DistError::Env {
            var: "MASTER_PORT",
            value: port.clone(),
            problem: "is not a port number",
        })?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", &v)?,
            None => 0,
        };
        Ok(Some(Launch {
            addr: need("MASTER_ADDR")?,
            port,
            rank,
            world,
            local_rank,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
        }))
    }
}

fn number(var: &'static str, value: &str) -> Result<usize, DistError> {
    value.trim().parse().map_err(|_| DistError::Env {
        var,
        value: value.into(),
        problem: "is not a non-negative integer",
    })
}

/// One process's membership of a Gloo process group.
pub struct Group {
    raw: *mut c_void,
    rank: usize,
    world: usize,
    timeout: Duration,
}

// c10d process groups are built for use from any thread; medzero calls
// collectives from the learner thread alone, in the same order on every rank.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Drop for Group {
    fn drop(&mut self) {
        unsafe { mz_c10d_free(self.raw) }
    }
}

const ERR_LEN: usize = 4096;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim().to_string()
}

impl Group {
    /// Joins the group `launch` describes; rank 0 hosts the store. Every
    /// rank must call this within `timeout` of the others.
    pub fn connect(launch: &Launch, timeout: Duration) -> Result<Group, DistError> {
        let host = CString::new(launch.addr.as_str())
            .map_err(|_| DistError::Usage("MASTER_ADDR holds a NUL byte".into()))?;
        let mut err = vec![0u8; ERR_LEN];
        let raw = unsafe {
            mz_c10d_new(
                host.as_ptr(),
                launch.port,
                launch.rank as i32,
                launch.world as i32,
                launch.rank == 0 && !launch.agent_store,
                timeout.as_millis() as i64,
                BEAT.as_millis() as i64,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        if raw.is_null() {
            return Err(DistError::Rendezvous {
                rank: launch.rank,
                world: launch.world,
                addr: launch.addr.clone(),
                port: launch.port,
                timeout,
                detail: message(&err),
            });
        }
        Ok(Group {
            raw,
            rank: launch.rank,
            world: launch.world,
            timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sums `t` over the ranks, in place (same shape and dtype everywhere).
    pub fn allreduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR_LEN];
        let rc = unsafe {
            mz_c10d_allreduce_sum(
                self.raw,
                t.as_mut_ptr().cast(),
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        self.check("allreduce", rc, &err)
    }

    /// Overwrites `t` with rank `root`'s `t`.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR_LEN];
        let rc = unsafe {
            mz_c10d_broadcast(
                self.raw,
                t.as_mut_ptr().cast(),
                root as i32,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        self.check("broadcast", rc, &err)
    }

    /// Sends `t` to rank `dst` under `tag` (a matching [`Group::recv`] there),
    /// waiting at most the group's timeout for the receiver to take it.
    pub fn send(&self, t: &Tensor, dst: usize, tag: i32) -> Result<(), DistError> {
        self.send_waiting(t, dst, tag, Some(self.timeout))
    }

    /// [`Group::send`] with its own bound on the wait: Gloo hands the data
    /// over only once the receiver has posted its receive, so a sender that
    /// may finish long before its receiver is ready passes `None`, which
    /// waits as long as the receiver lives (as [`Group::recv`] does).
    pub fn send_waiting(
        &self,
        t: &Tensor,
        dst: usize,
        tag: i32,
        timeout: Option<Duration>,
    ) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR_LEN];
        let mut t = t.shallow_clone();
        let timeout_ms = timeout.map_or(-1, |d| d.as_millis() as i64);
        let rc = unsafe {
            mz_c10d_send(
                self.raw,
                t.as_mut_ptr().cast(),
                dst as i32,
                tag,
                timeout_ms,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        self.check("send", rc, &err)
    }

    /// Receives into `t` (its shape and dtype must be the sender's) from
    /// rank `src` under `tag`. `None` waits as long as the sender lives: a
    /// peer that exits resets the connection, which fails the wait at once.
    pub fn recv(
        &self,
        t: &mut Tensor,
        src: usize,
        tag: i32,
        timeout: Option<Duration>,
    ) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR_LEN];
        let timeout_ms = timeout.map_or(-1, |d| d.as_millis() as i64);
        let rc = unsafe {
            mz_c10d_recv(
                self.raw,
                t.as_mut_ptr().cast(),
                src as i32,
                tag,
                timeout_ms,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        self.check("recv", rc, &err)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<(), DistError> {
        let mut err = vec![0u8; ERR_LEN];
        let rc = unsafe { mz_c10d_barrier(self.raw, err.as_mut_ptr().cast(), ERR_LEN) };
        self.check("barrier", rc, &err)
    }

    fn check(&self, op: &'static str, rc: i32, err: &[u8]) -> Result<(), DistError> {
        if rc == 0 {
            return Ok(());
        }
        Err(DistError::Collective {
            op,
            rank: self.rank,
            world: self.world,
            lost: self.lost_ranks(),
            detail: message(err),
        })
    }

    /// Which peers stopped: those whose heartbeat does not move over three
    /// beats (or the store's host, rank 0, when the store cannot be read).
    fn lost_ranks(&self) -> String {
        let read = || {
            let mut counts = vec![0i64; self.world];
            let mut err = vec![0u8; ERR_LEN];
            let rc = unsafe {
                mz_c10d_heartbeats(
                    self.raw,
                    counts.as_mut_ptr(),
                    err.as_mut_ptr().cast(),
                    ERR_LEN,
                )
            };
            (rc == 0).then_some(counts)
        };
        let Some(before) = read() else {
            return "rank 0 (the rendezvous store's host) is unreachable".into();
        };
        std::thread::sleep(3 * BEAT);
        let Some(after) = read() else {
            return "rank 0 (the rendezvous store's host) stopped".into();
        };
        let lost: Vec<String> = (0..self.world)
            .filter(|&r| r != self.rank && (after[r] < 0 || after[r] == before[r]))
            .map(|r| r.to_string())
            .collect();
        match lost.len() {
            0 => "every peer is still alive (a mismatched collective or a network fault)".into(),
            1 => format!("rank {} stopped responding", lost[0]),
            _ => format!("ranks {} stopped responding", lost.join(", ")),
        }
    }
}

static WORLD: OnceLock<Group> = OnceLock::new();

/// Makes `group` this process's group for [`world`]; once per process.
pub fn init(group: Group) -> Result<&'static Group, DistError> {
    WORLD
        .set(group)
        .map_err(|_| DistError::Usage("the process group is already initialised".into()))?;
    Ok(WORLD.get().expect("just set"))
}

/// The process group set by [`init`], if this process is one of several.
pub fn world() -> Option<&'static Group> {
    WORLD.get()
}
