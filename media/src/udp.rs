//! A leg's UDP socket, read on the leg's 20 ms clock rather than on each
//! datagram's arrival.
//!
//! A leg that waited on its socket woke once per packet as well as once per
//! tick, and with a thousand legs those wake-ups (the reactor's epoll, the
//! scheduler, the task's poll) cost more than the audio work itself. These
//! sockets are non-blocking and unknown to the runtime's reactor: the leg
//! drains them on each tick, just before the frame that needs the packets
//! is played, so audio is no later than before.
//!
//! Arrival times must stay exact, though: the interarrival jitter estimate
//! (RFC 3550 §6.4.1, A.8) sets the jitter buffer's delay, and arrivals rounded
//! to the tick would look like 20 ms of jitter. Each datagram therefore
//! carries the kernel's receive timestamp (`SO_TIMESTAMPNS`, socket(7)).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Instant, SystemTime};

/// Failed reads skipped in one [`TickSocket::recv`] before it gives up
/// until the next tick.
const MAX_ERRORS_PER_READ: usize = 4;

/// Waits until a socket just made can count on kernel timestamps. The kernel
/// stamps datagrams only while some socket asks for it, and turns that on a
/// moment after the first one does (deferred work); until then a datagram is
/// stamped when it is read. Tests' sockets come and go, so a test that
/// checks arrival times waits for its own request to take effect.
#[cfg(test)]
pub(crate) async fn timestamps_on() {
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// One datagram read off a [`TickSocket`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Datagram {
    pub len: usize,
    pub from: SocketAddr,
    /// When the kernel received it.
    pub arrival: Instant,
}

/// The wall clock and the monotonic clock read together once per drain, to
/// turn the kernel's wall-clock timestamps into `Instant`s.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    instant: Instant,
    wall: SystemTime,
}

impl Now {
    pub fn read() -> Self {
        Now { instant: Instant::now(), wall: SystemTime::now() }
    }

    pub fn instant(&self) -> Instant {
        self.instant
    }

    /// The `Instant` of a wall-clock time at or before now; a time after now
    /// (the wall clock stepped back) is taken as now.
    fn at(&self, wall: SystemTime) -> Instant {
        let ago = self.wall.duration_since(wall).unwrap_or_default();
        self.instant.checked_sub(ago).unwrap_or(self.instant)
    }
}

/// A non-blocking UDP socket read with receive timestamps.
#[derive(Debug)]
pub(crate) struct TickSocket {
    socket: UdpSocket,
    /// Reused room for the timestamp control message.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    cmsg: Vec<u8>,
}

impl TickSocket {
    /// Takes the socket out of the runtime's reactor and turns on receive
    /// timestamps.
    pub fn new(socket: tokio::net::UdpSocket) -> io::Result<Self> {
        let socket = socket.into_std()?;
        socket.set_nonblocking(true)?;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use nix::sys::socket::{setsockopt, sockopt};
            setsockopt(&socket, sockopt::ReceiveTimestampns, &true)?;
            Ok(TickSocket { socket, cmsg: nix::cmsg_space!(nix::sys::time::TimeSpec) })
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        Ok(TickSocket { socket })
    }

    #[cfg(test)]
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The next datagram already received into `buf`, or `None` when none
    /// is waiting. Read errors are skipped (an ICMP error for something we
    /// sent is queued on the socket and gone once read), a few at a time so
    /// that a socket that only fails cannot hold the leg.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub fn recv(&mut self, buf: &mut [u8], now: &Now) -> Option<Datagram> {
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;
        use std::time::{Duration, UNIX_EPOCH};

        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};

        for _ in 0..MAX_ERRORS_PER_READ {
            let mut iov = [IoSliceMut::new(buf)];
            let msg = match recvmsg::<SockaddrStorage>(self.socket.as_raw_fd(), &mut iov, Some(&mut self.cmsg), MsgFlags::MSG_DONTWAIT) {
                Ok(msg) => msg,
                Err(nix::errno::Errno::EAGAIN) => return None,
                Err(_) => continue,
            };
            let from = msg.address.as_ref().and_then(|a| {
                a.as_sockaddr_in()
                    .map(|a| SocketAddr::V4((*a).into()))
                    .or_else(|| a.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into())))
            });
            // No IP source: skipped like a failed read, not taken for "drained".
            let Some(from) = from else { continue };
            let stamp = msg.cmsgs().ok().and_then(|mut cmsgs| {
                cmsgs.find_map(|c| match c {
                    ControlMessageOwned::ScmTimestampns(ts) => {
                        let (secs, nanos) = (u64::try_from(ts.tv_sec()).ok()?, u32::try_from(ts.tv_nsec()).ok()?);
                        Some(UNIX_EPOCH + Duration::new(secs, nanos))
                    }
                    _ => None,
                })
            });
            let arrival = stamp.map_or(now.instant(), |wall| now.at(wall));
            return Some(Datagram { len: msg.bytes, from, arrival });
        }
        None
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub fn recv(&mut self, buf: &mut [u8], now: &Now) -> Option<Datagram> {
        for _ in 0..MAX_ERRORS_PER_READ {
            match self.socket.recv_from(buf) {
                Ok((len, from)) => return Some(Datagram { len, from, arrival: now.instant() }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(_) => continue,
            }
        }
        None
    }

    /// Sends without waiting: a datagram the kernel has no room for now
    /// would be late anyway, so it is an error, not a wait.
    pub fn send_to(&self, buf: &[u8], dest: SocketAddr) -> io::Result<usize> {
        self.socket.send_to(buf, dest)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A socket with receive timestamps on.
    async fn bound() -> TickSocket {
        let socket = TickSocket::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        timestamps_on().await;
        socket
    }

    #[tokio::test]
    async fn a_datagram_read_later_keeps_the_time_it_arrived() {
        let mut socket = bound().await;
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 64];
        assert!(socket.recv(&mut buf, &Now::read()).is_none(), "nothing sent yet");
        let sent = Instant::now();
        peer.send_to(b"hello", socket.local_addr().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        let now = Now::read();
        let d = socket.recv(&mut buf, &now).expect("the datagram");
        assert_eq!(&buf[..d.len], b"hello");
        assert_eq!(d.from, peer.local_addr().unwrap());
        // Read 60 ms after it was sent, yet stamped when it arrived: well
        // before the read (a scheduler hiccup on a loaded machine may
        // shrink the margin, not close it).
        assert!(d.arrival >= sent - Duration::from_millis(5), "arrival {:?} before the send", sent - d.arrival);
        assert!(now.instant() - d.arrival >= Duration::from_millis(30), "arrival taken at the read, not from the kernel");
        assert!(socket.recv(&mut buf, &now).is_none(), "drained");
    }

    /// A socket with ECONNREFUSED queued on it (connected to a closed port,
    /// it hears the ICMP port unreachable for what it sent there), then
    /// connected to `peer`, which has sent it a datagram behind the error.
    async fn refused_then_reached(peer: &std::net::UdpSocket) -> tokio::net::UdpSocket {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let gone = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gone_addr = gone.local_addr().unwrap();
        drop(gone);
        socket.connect(gone_addr).await.unwrap();
        socket.send(b"x").await.unwrap();
        std::thread::sleep(Duration::from_millis(20));
        socket.connect(peer.local_addr().unwrap()).await.unwrap();
        peer.send_to(b"after", socket.local_addr().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        socket
    }

    #[tokio::test]
    async fn an_error_queued_on_the_socket_does_not_hide_the_datagram_behind_it() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 64];
        // A plain read meets the error first: the setup does queue one.
        let plain = refused_then_reached(&peer).await.into_std().unwrap();
        let first = plain.recv_from(&mut buf).expect_err("an error queued first");
        assert_eq!(first.kind(), io::ErrorKind::ConnectionRefused);
        let mut socket = TickSocket::new(refused_then_reached(&peer).await).unwrap();
        let d = socket.recv(&mut buf, &Now::read()).expect("the datagram after the error");
        assert_eq!(&buf[..d.len], b"after");
    }

    #[test]
    fn a_wall_time_after_now_is_taken_as_now() {
        let now = Now::read();
        assert_eq!(now.at(now.wall + Duration::from_secs(3)), now.instant());
        assert_eq!(now.at(now.wall - Duration::from_millis(7)), now.instant() - Duration::from_millis(7));
    }
}
