//! The daemon as a child process: started on a socket, its CPU time read
//! from /proc, killed when dropped.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use super::FrontendError;

/// A running daemon process, killed (SIGKILL) when dropped.
pub struct DaemonProcess {
    child: Child,
    socket: PathBuf,
}

impl DaemonProcess {
    /// Spawns `command` (the daemon binary with all its arguments, among
    /// them `-s socket`) and waits until `socket` exists. Fails if the
    /// daemon exits first or `timeout` passes.
    pub fn spawn(
        mut command: Command,
        socket: &Path,
        timeout: Duration,
    ) -> Result<DaemonProcess, FrontendError> {
        let child = command.spawn().map_err(|e| {
            FrontendError::Daemon(format!(
                "cannot start {}: {e}",
                Path::new(command.get_program()).display()
            ))
        })?;
        let mut daemon = DaemonProcess {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + timeout;
        while !socket.exists() {
            match daemon.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(FrontendError::Daemon(format!("exited early: {status}")))
                }
                Ok(None) => {}
                Err(e) => return Err(FrontendError::Daemon(format!("cannot wait: {e}"))),
            }
            if Instant::now() >= deadline {
                return Err(FrontendError::Daemon(format!(
                    "did not create {} within {timeout:?}",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// CPU time (user + system, all threads) the daemon used so far.
    pub fn cpu_time(&self) -> io::Result<Duration> {
        process_cpu_time(self.pid())
    }

    /// The exit status, if it exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(io::Error::other)?;
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
        self.child.wait()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// utime + stime of process `pid` (all its threads, live and exited), from
/// `/proc/PID/stat`.
pub fn process_cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| {
            // SAFETY: sysconf has no memory-safety preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            let hz = if hz > 0 { hz as u64 } else { 100 };
            Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz)
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))
}

/// utime + stime in clock ticks: fields 14 and 15, counted after the
/// command name, which is in parentheses and may itself contain spaces and
/// parentheses.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Field 3 (state) is the first after the name; utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_an_awkward_name() {
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 99";
        assert_eq!(parse_cpu_ticks(stat), Some(22));
        assert_eq!(parse_cpu_ticks("12 (x) S 1"), None);
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(process_cpu_time(std::process::id()).is_ok());
    }
}
