//! One call leg's RTP session: a task that owns the UDP sockets, the jitter
//! buffer and the codecs, and runs on a drift-free 20 ms clock.
//!
//! Each tick it applies the commands that came since the last one, reads
//! the packets that arrived (the task wakes only on its clock, and the
//! kernel stamps each packet's arrival), plays one frame out of the jitter
//! buffer (decoded, resampled to 16 kHz, handed to the speech pipeline
//! through a bounded channel) and sends one frame from the outgoing queue
//! (or silence, so NATs and SBCs keep the stream alive). A flush (barge-in)
//! empties the outgoing queue before the next frame goes out.
//! RTP is symmetric: the session sends to where the far end's packets come
//! from once it has latched onto a source (RFC 4961); packets from any other
//! source are ignored afterwards. RTCP sender/receiver reports with loss and
//! jitter go out every 5 s (RFC 3550 §6.4.1).
//!
//! The task never blocks on anything but its clock; the rest of the system
//! talks to it through [`MediaHandle`].

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use webrtc_util::marshal::{Marshal, MarshalSize, Unmarshal};

use crate::dtmf::{self, Digit, DtmfReceiver, ToneDetector};
use crate::error::MediaError;
use crate::g711::Law;
use crate::jitter::{JitterBuffer, JitterConfig, JitterStats, Playout};
use crate::resample::{frame_len, FrameResampler};
use crate::sdp::{Codec, Direction, RemoteMedia};
use crate::udp::{Datagram, Now, TickSocket};

/// The rate of the PCM frames exchanged with the speech pipeline.
pub const PIPELINE_RATE: u32 = 16_000;
const TICK: Duration = Duration::from_millis(20);
/// RTCP reports go out every 5 s (250 ticks).
const RTCP_EVERY_TICKS: u32 = 250;
/// Incoming RTCP is read every 100 ms: its loss reports tune Opus FEC, which
/// needs no faster reaction, and most reads would find nothing.
const RTCP_READ_EVERY_TICKS: u32 = 5;
/// Packets read from a socket per tick, at most: a far end sends one to
/// four in 20 ms (up to 10 ms packets, a burst after a stall), a sender of
/// more than 3,000 a second is flooding.
const MAX_PACKETS_PER_TICK: usize = 64;
/// Room in a leg's command channel, and the most commands applied per tick.
const CONTROL_CAPACITY: usize = 256;
/// Stats are published every 100 ms: fresh enough for monitoring and
/// timeouts, and a clone and a wake-up less on most ticks.
const STATS_EVERY_TICKS: u32 = 5;

/// Hands out even RTP ports (RTCP on the odd one above) from a range.
#[derive(Debug)]
pub struct PortRange {
    ip: IpAddr,
    min: u16,
    max: u16,
    next: AtomicU16,
}

impl PortRange {
    pub fn new(ip: IpAddr, min: u16, max: u16) -> Self {
        let min = min + (min % 2);
        PortRange { ip, min, max: max.max(min + 1), next: AtomicU16::new(min) }
    }

    /// Binds the next free RTP/RTCP pair.
    pub async fn bind(&self) -> Result<(UdpSocket, UdpSocket), MediaError> {
        let pairs = u32::from((self.max - self.min) / 2).max(1);
        for _ in 0..pairs {
            let port = self
                .next
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                    Some(if p + 2 >= self.max { self.min } else { p + 2 })
                })
                .unwrap_or(self.min);
            let Ok(rtp) = UdpSocket::bind(SocketAddr::new(self.ip, port)).await else { continue };
            let Ok(rtcp) = UdpSocket::bind(SocketAddr::new(self.ip, port + 1)).await else { continue };
            return Ok((rtp, rtcp));
        }
        Err(MediaError::Io(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free RTP port pair in range")))
    }
}

/// 20 ms of caller audio at 16 kHz, with the time it was handed over.
#[derive(Debug, Clone)]
pub struct AudioFrame {
    pub pcm: Vec<i16>,
    /// When it was handed over (None for concealment/silence): for RTP and
    /// WebRTC legs the tick that played its packet out of the jitter buffer
    /// (the packet's arrival plus its wait there, up to the buffer's target
    /// delay); for WebSocket legs, which have no jitter buffer, the arrival
    /// of the message carrying it.
    pub received_at: Option<Instant>,
    /// When the packet carrying it reached this host (the kernel's receive
    /// time), before any wait in a jitter buffer: its time on the wire, for
    /// a far end that measures latency there. `None` as for `received_at`;
    /// for WebSocket legs the same as `received_at`.
    pub arrived_at: Option<Instant>,
}

/// Things the session reports besides audio.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaEvent {
    Dtmf(Digit),
    /// No RTP for the configured time.
    Timeout,
    /// The first packet of agent audio left after a quiet period.
    PlayoutStarted { at: Instant },
    /// The last packet of queued audio left: the queue ran dry (a flush
    /// ends a spurt without this event).
    PlayoutEnded { at: Instant },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionStats {
    pub jitter: JitterStats,
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Packets from a source other than the latched one.
    pub ignored_packets: u64,
    /// Frames dropped because the pipeline did not keep up.
    pub dropped_frames: u64,
    pub remote: Option<SocketAddr>,
    /// Loss the far end reports about our stream (RTCP), in percent.
    pub remote_loss_percent: Option<f64>,
    /// Lost Opus packets rebuilt from the in-band FEC of the next one.
    pub fec_recovered: u64,
    /// No RTP has arrived for the configured media timeout.
    pub timed_out: bool,
}

pub(crate) enum Control {
    Play(Vec<i16>),
    Flush,
    Dtmf(char),
    Remote(RemoteMedia),
    Direction(Direction),
    /// End the leg from our side (a WebSocket stream sends its close frame).
    Close,
}

/// A cloneable remote control of a running session.
#[derive(Clone)]
pub struct MediaControl {
    control: mpsc::Sender<Control>,
    stats: watch::Receiver<SessionStats>,
    /// Our RTP address; `None` for legs that are not RTP.
    local: Option<SocketAddr>,
}

/// What the rest of the system holds to use a running session: its
/// control, and the streams of caller audio and events. Dropping it (or
/// calling [`MediaHandle::stop`]) ends the task.
pub struct MediaHandle {
    pub control: MediaControl,
    pub incoming: mpsc::Receiver<AudioFrame>,
    pub events: mpsc::Receiver<MediaEvent>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// No RTP for this long raises [`MediaEvent::Timeout`].
    pub media_timeout: Duration,
    /// Latch onto the first source even if it differs from the SDP address
    /// (the far end is behind NAT).
    pub latch_any_source: bool,
    pub jitter: JitterConfig,
    /// Opus encoder complexity, when Opus is negotiated.
    pub opus_complexity: OpusComplexity,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            media_timeout: Duration::from_secs(30),
            latch_any_source: true,
            jitter: JitterConfig::default(),
            opus_complexity: OpusComplexity::default(),
        }
    }
}

impl MediaControl {
    pub(crate) fn new(control: mpsc::Sender<Control>, stats: watch::Receiver<SessionStats>, local: Option<SocketAddr>) -> Self {
        MediaControl { control, stats, local }
    }

    /// Where we receive RTP (for our SDP); `None` for a WebSocket stream.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Ends a WebSocket stream with a close frame; RTP legs end with their
    /// signalling (BYE) instead, so for them this does nothing.
    pub async fn close(&self) {
        let _ = self.control.send(Control::Close).await;
    }

    /// Queues 16 kHz PCM to send, after whatever is queued.
    pub async fn play(&self, pcm: Vec<i16>) {
        let _ = self.control.send(Control::Play(pcm)).await;
    }

    /// Drops everything queued (barge-in); takes effect at the next tick.
    pub async fn flush(&self) {
        let _ = self.control.send(Control::Flush).await;
    }

    pub async fn send_dtmf(&self, digit: char) -> Result<(), MediaError> {
        dtmf::event_of(digit).ok_or_else(|| MediaError::Sdp(format!("'{digit}' is not a DTMF key")))?;
        let _ = self.control.send(Control::Dtmf(digit)).await;
        Ok(())
    }

    /// Applies a new remote description (answer, early media, re-INVITE).
    pub async fn set_remote(&self, remote: RemoteMedia) {
        let _ = self.control.send(Control::Remote(remote)).await;
    }

    /// Our direction (hold: `SendOnly`/`Inactive` stop what we send or receive).
    pub async fn set_direction(&self, d: Direction) {
        let _ = self.control.send(Control::Direction(d)).await;
    }

    pub fn stats(&self) -> SessionStats {
        self.stats.borrow().clone()
    }
}

impl MediaHandle {
    pub(crate) fn new(
        control: MediaControl,
        incoming: mpsc::Receiver<AudioFrame>,
        events: mpsc::Receiver<MediaEvent>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        MediaHandle { control, incoming, events, task: Some(task) }
    }

    /// Ends the session and waits for its task.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for MediaHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts a session on a bound socket pair. `remote` may be unknown until
/// the answer arrives (then call [`MediaHandle::set_remote`]).
pub fn start(
    sockets: (UdpSocket, UdpSocket),
    remote: Option<RemoteMedia>,
    config: SessionConfig,
) -> Result<MediaHandle, MediaError> {
    let local = sockets.0.local_addr()?;
    let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
    let (incoming_tx, incoming_rx) = mpsc::channel(50);
    let (events_tx, events_rx) = mpsc::channel(64);
    let (stats_tx, stats_rx) = watch::channel(SessionStats::default());
    let leg = Leg::new(sockets, remote, config, incoming_tx, events_tx, stats_tx)?;
    let task = tokio::spawn(leg.run(control_rx));
    Ok(MediaHandle::new(MediaControl::new(control_tx, stats_rx, Some(local)), incoming_rx, events_rx, task))
}

/// Opus encoder complexity, 0 to 10 (libopus' default is 10).
///
/// Measured on speech (`scripts/bench-opus`, docs/BENCHMARKS.md): encode +
/// decode per 20 ms frame costs ~270 µs at 10 (PESQ-WB 4.25), ~130 µs at 3
/// (3.5) and ~80-95 µs at 1 (3.38, as good as G.711's 3.33 over the same
/// path). The default, 1, is the cheapest setting that keeps a caller's
/// audio at least as good as the telephone network's, at 200+ streams per
/// core; raise it where quality matters more than density.
/// Read from configuration as a number, checked there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct OpusComplexity(u8);

impl OpusComplexity {
    pub const MAX: u8 = 10;

    pub fn new(level: u8) -> Result<Self, MediaError> {
        if level > Self::MAX {
            return Err(MediaError::Codec(format!("opus complexity must be 0 to {}, not {level}", Self::MAX)));
        }
        Ok(OpusComplexity(level))
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for OpusComplexity {
    fn default() -> Self {
        OpusComplexity(1)
    }
}

impl TryFrom<u8> for OpusComplexity {
    type Error = MediaError;

    fn try_from(level: u8) -> Result<Self, MediaError> {
        OpusComplexity::new(level)
    }
}

impl From<OpusComplexity> for u8 {
    fn from(c: OpusComplexity) -> u8 {
        c.0
    }
}

/// The negotiated codec's state. G.711 is coded at 8 kHz and resampled to
/// and from the pipeline's 16 kHz; Opus is coded at 16 kHz directly (its
/// RTP clock stays 48 kHz, RFC 7587 §4.1) and conceals loss itself.
enum CodecState {
    G711(Law),
    Opus { encoder: Box<opus::Encoder>, decoder: Box<opus::Decoder> },
}

pub(crate) struct Codecs {
    codec: Codec,
    state: CodecState,
    /// Rate of the PCM the codec takes and gives.
    pcm_rate: u32,
    decode_rs: FrameResampler,
    encode_rs: FrameResampler,
}

impl Codecs {
    pub(crate) fn new(codec: Codec, opus_complexity: OpusComplexity) -> Result<Self, MediaError> {
        let opus_err = |e: opus::Error| MediaError::Codec(format!("opus: {e}"));
        let (state, pcm_rate) = match codec {
            Codec::Pcmu => (CodecState::G711(Law::Ulaw), 8000),
            Codec::Pcma => (CodecState::G711(Law::Alaw), 8000),
            Codec::Opus => {
                let mut encoder = opus::Encoder::new(PIPELINE_RATE, opus::Channels::Mono, opus::Application::Voip).map_err(opus_err)?;
                // Wideband speech at 24 kb/s. In-band FEC is allowed; libopus
                // codes it once an expected loss is set (`set_expected_loss`,
                // from the far end's RTCP reports).
                encoder.set_bitrate(opus::Bitrate::Bits(24_000)).map_err(opus_err)?;
                encoder.set_inband_fec(true).map_err(opus_err)?;
                encoder.set_complexity(i32::from(opus_complexity.get())).map_err(opus_err)?;
                let decoder = opus::Decoder::new(PIPELINE_RATE, opus::Channels::Mono).map_err(opus_err)?;
                (CodecState::Opus { encoder: Box::new(encoder), decoder: Box::new(decoder) }, PIPELINE_RATE)
            }
        };
        Ok(Codecs {
            codec,
            state,
            pcm_rate,
            decode_rs: FrameResampler::new(pcm_rate, PIPELINE_RATE)?,
            encode_rs: FrameResampler::new(PIPELINE_RATE, pcm_rate)?,
        })
    }

    /// Appends the decoded payload; an empty payload asks for concealment
    /// of `conceal` samples.
    pub(crate) fn decode(&mut self, payload: &[u8], conceal: usize, out: &mut Vec<i16>) {
        match &mut self.state {
            CodecState::G711(law) if !payload.is_empty() => law.decode(payload, out),
            // G.711 has no concealment of its own: silence is the honest fill.
            CodecState::G711(_) => out.resize(out.len() + conceal, 0),
            CodecState::Opus { decoder, .. } => {
                // A packet holds up to 120 ms; for concealment libopus takes the
                // length to fill from the buffer, so give it exactly `conceal`.
                let room = if payload.is_empty() { conceal } else { frame_len(PIPELINE_RATE) * 6 };
                let start = out.len();
                out.resize(start + room, 0);
                let n = decoder.decode(payload, &mut out[start..], false).unwrap_or(0);
                // An undecodable packet is replaced by silence of the usual length.
                out.truncate(start + if n == 0 { conceal } else { n });
            }
        }
    }

    /// Fills the place of a lost packet of `conceal` samples: from the copy
    /// of it that Opus's in-band FEC carries in the packet after it (`next`;
    /// RFC 6716 §2.1.7, the LBRR frames of §4.2.4), else by concealment.
    /// Returns whether the lost audio came from FEC.
    pub(crate) fn recover(&mut self, next: Option<&[u8]>, conceal: usize, out: &mut Vec<i16>) -> bool {
        if let (CodecState::Opus { decoder, .. }, Some(next)) = (&mut self.state, next) {
            if has_lbrr(next) {
                let start = out.len();
                out.resize(start + conceal, 0);
                // libopus decodes the FEC copy into exactly the buffer's length.
                if decoder.decode(next, &mut out[start..], true).is_ok_and(|n| n == conceal) {
                    return true;
                }
                out.truncate(start);
            }
        }
        self.decode(&[], conceal, out);
        false
    }

    /// Takes the next packet from `jitter` and appends its audio to `out`
    /// (nothing while buffering); `conceal` is the length of a lost packet.
    pub(crate) fn pull(&mut self, jitter: &mut JitterBuffer<Bytes>, conceal: usize, out: &mut Vec<i16>) -> Pulled {
        match jitter.pop() {
            Playout::Frame(payload) => {
                self.decode(&payload, conceal, out);
                Pulled::Packet
            }
            Playout::Lost if self.recover(jitter.peek().map(|p| &p[..]), conceal, out) => Pulled::Recovered,
            Playout::Lost => Pulled::Concealed,
            Playout::Buffering => Pulled::Buffering,
        }
    }

    /// Tells the encoder how much of its stream the far end loses (RTCP),
    /// in percent: libopus spends bits on in-band FEC in proportion, none
    /// at 0 %.
    pub(crate) fn set_expected_loss(&mut self, percent: f64) {
        if let CodecState::Opus { encoder, .. } = &mut self.state {
            let _ = encoder.set_packet_loss_perc(percent.ceil().clamp(0.0, 100.0) as i32);
        }
    }

    pub(crate) fn encode(&mut self, pcm: &[i16], out: &mut Vec<u8>) {
        match &mut self.state {
            CodecState::G711(law) => law.encode(pcm, out),
            CodecState::Opus { encoder, .. } => {
                let mut buf = [0u8; 400];
                if let Ok(n) = encoder.encode(pcm, &mut buf) {
                    out.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
}

/// What one `Codecs::pull` appended.
pub(crate) enum Pulled {
    Packet,
    /// A lost packet, rebuilt from the FEC in the one after it.
    Recovered,
    /// A lost packet, concealed.
    Concealed,
    /// Playout has not started: nothing was appended.
    Buffering,
}

/// The share of our stream the far end says it lost, in percent, from the
/// last report about `ssrc` (any stream's when `None`) in RTCP sender or
/// receiver reports (RFC 3550 §6.4: `fraction lost` in 1/256).
pub(crate) fn reported_loss(packets: &[Box<dyn rtcp::packet::Packet + Send + Sync>], ssrc: Option<u32>) -> Option<f64> {
    let mut loss = None;
    for p in packets {
        let reports = if let Some(sr) = p.as_any().downcast_ref::<rtcp::sender_report::SenderReport>() {
            &sr.reports
        } else if let Some(rr) = p.as_any().downcast_ref::<rtcp::receiver_report::ReceiverReport>() {
            &rr.reports
        } else {
            continue;
        };
        if let Some(r) = reports.iter().rfind(|r| ssrc.is_none_or(|s| s == r.ssrc)) {
            loss = Some(f64::from(r.fraction_lost) * 100.0 / 256.0);
        }
    }
    loss
}

/// Moves the first `n` samples of `queue` (all of them if it holds fewer)
/// into `out`, which is cleared first: two slice copies, not a loop over
/// the ring buffer's elements.
fn take_front(queue: &mut VecDeque<i16>, n: usize, out: &mut Vec<i16>) {
    let n = n.min(queue.len());
    let (a, b) = queue.as_slices();
    let from_a = n.min(a.len());
    out.clear();
    out.extend_from_slice(&a[..from_a]);
    out.extend_from_slice(&b[..n - from_a]);
    queue.drain(..n);
}

/// The jitter buffer's settings for a stream in `codec`.
pub(crate) fn jitter_for(codec: Codec, base: JitterConfig) -> JitterConfig {
    JitterConfig { clock_rate: codec.clock_rate(), wait_for_fec: codec == Codec::Opus, ..base }
}

/// Whether an Opus packet carries FEC (LBRR) for the packet before it.
fn has_lbrr(packet: &[u8]) -> bool {
    // libopus reads the TOC byte before it looks at the length: an empty
    // payload (the far end may send one) must not reach it.
    if packet.is_empty() {
        return false;
    }
    let Ok(len) = i32::try_from(packet.len()) else { return false };
    // SAFETY: the slice holds at least the TOC byte, and past it libopus
    // reads at most `len` bytes from its pointer.
    unsafe { opusic_sys::opus_packet_has_lbrr(packet.as_ptr(), len) > 0 }
}

struct Leg {
    rtp: TickSocket,
    rtcp: TickSocket,
    remote: Option<RemoteMedia>,
    codecs: Option<Codecs>,
    direction: Direction,
    config: SessionConfig,
    latched: Option<SocketAddr>,
    jitter: JitterBuffer<Bytes>,
    dtmf_rx: DtmfReceiver,
    tones: ToneDetector,
    outgoing: VecDeque<i16>,
    /// Decoded caller audio at the codec rate, cut into 20 ms frames: the far
    /// end's packets may be 10, 20, 30 ms or longer.
    pcm_in: VecDeque<i16>,
    /// Samples in the far end's last packet, to conceal a lost one.
    packet_samples: usize,
    /// Reused decode buffer.
    scratch: Vec<i16>,
    /// Reused per-tick buffers (a call sends and receives 50 frames a
    /// second, and allocating them showed in profiles): one 20 ms frame at
    /// the codec's rate, one at the pipeline's, a coded payload and a wire
    /// packet. They grow to their size on the first tick.
    coded: Vec<i16>,
    frame: Vec<i16>,
    payload: Vec<u8>,
    wire: Vec<u8>,
    dtmf_out: VecDeque<(bool, [u8; 4])>,
    dtmf_ts: Option<u32>,
    ssrc: u32,
    seq: u16,
    ts: u32,
    remote_ssrc: Option<u32>,
    last_rx: Instant,
    timed_out: bool,
    was_playing: bool,
    ticks: u32,
    stats: SessionStats,
    octets_sent: u32,
    incoming: mpsc::Sender<AudioFrame>,
    events: mpsc::Sender<MediaEvent>,
    stats_tx: watch::Sender<SessionStats>,
}

impl Leg {
    fn new(
        (rtp, rtcp): (UdpSocket, UdpSocket),
        remote: Option<RemoteMedia>,
        config: SessionConfig,
        incoming: mpsc::Sender<AudioFrame>,
        events: mpsc::Sender<MediaEvent>,
        stats_tx: watch::Sender<SessionStats>,
    ) -> Result<Self, MediaError> {
        let codecs = remote.as_ref().map(|r| Codecs::new(r.codec, config.opus_complexity)).transpose()?;
        let codec = remote.as_ref().map_or(Codec::Pcmu, |r| r.codec);
        Ok(Leg {
            rtp: TickSocket::new(rtp)?,
            rtcp: TickSocket::new(rtcp)?,
            codecs,
            direction: remote.as_ref().map_or(Direction::SendRecv, |r| r.direction.reversed()),
            remote,
            jitter: JitterBuffer::new(jitter_for(codec, config.jitter)),
            config,
            latched: None,
            dtmf_rx: DtmfReceiver::new(8000),
            tones: ToneDetector::new(PIPELINE_RATE),
            outgoing: VecDeque::new(),
            pcm_in: VecDeque::new(),
            packet_samples: frame_len(8000),
            scratch: Vec::with_capacity(960),
            coded: Vec::new(),
            frame: Vec::new(),
            payload: Vec::new(),
            wire: Vec::new(),
            dtmf_out: VecDeque::new(),
            dtmf_ts: None,
            ssrc: rand::random::<u32>(),
            seq: rand::random::<u16>(),
            ts: rand::random::<u32>(),
            remote_ssrc: None,
            last_rx: Instant::now(),
            timed_out: false,
            was_playing: false,
            ticks: 0,
            stats: SessionStats::default(),
            octets_sent: 0,
            incoming,
            events,
            stats_tx,
        })
    }

    async fn run(mut self, mut control: mpsc::Receiver<Control>) {
        let mut tick = tokio::time::interval(TICK);
        // Burst: a late tick is caught up, so the stream never drifts from wall time.
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut buf = vec![0u8; 2048];
        loop {
            tick.tick().await;
            for _ in 0..CONTROL_CAPACITY {
                match control.try_recv() {
                    Ok(msg) => self.on_control(msg),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            // Bounded reads: a flood on the ports waits in (and overflows)
            // the kernel's buffer instead of holding the worker thread.
            let now = Now::read();
            for _ in 0..MAX_PACKETS_PER_TICK {
                let Some(d) = self.rtp.recv(&mut buf, &now) else { break };
                self.on_rtp(&buf[..d.len], d);
            }
            if self.ticks.is_multiple_of(RTCP_READ_EVERY_TICKS) {
                for _ in 0..MAX_PACKETS_PER_TICK {
                    let Some(d) = self.rtcp.recv(&mut buf, &now) else { break };
                    self.on_rtcp(&buf[..d.len]);
                }
            }
            if self.on_tick(now.instant()).is_err() {
                return;
            }
            if self.ticks.is_multiple_of(RTCP_EVERY_TICKS) {
                self.send_rtcp();
            }
        }
    }

    fn on_control(&mut self, msg: Control) {
        match msg {
            Control::Play(pcm) => self.outgoing.extend(pcm),
            Control::Flush => self.outgoing.clear(),
            Control::Dtmf(digit) => {
                if let Some(packets) = dtmf::event_packets(digit, 100, 20, 8000) {
                    self.dtmf_out.extend(packets);
                }
            }
            Control::Remote(remote) => {
                let codec_changed = self.remote.as_ref().is_none_or(|r| r.codec != remote.codec);
                if codec_changed {
                    match Codecs::new(remote.codec, self.config.opus_complexity) {
                        Ok(c) => {
                            self.jitter = JitterBuffer::new(jitter_for(remote.codec, self.config.jitter));
                            self.pcm_in.clear();
                            self.codecs = Some(c);
                        }
                        Err(e) => tracing::warn!(error = %e, "remote codec not usable"),
                    }
                }
                // A new address (re-INVITE moving the stream) releases the latch.
                if self.remote.as_ref().map(|r| r.rtp) != Some(remote.rtp) {
                    self.latched = None;
                }
                self.direction = remote.direction.reversed();
                self.remote = Some(remote);
            }
            Control::Direction(d) => self.direction = d,
            Control::Close => {}
        }
    }

    fn on_rtp(&mut self, data: &[u8], Datagram { from, arrival, .. }: Datagram) {
        let Some(remote) = self.remote.as_ref() else { return };
        let mut raw = data;
        let Ok(packet) = rtp::packet::Packet::unmarshal(&mut raw) else { return };
        let pt = packet.header.payload_type;
        let ours = pt == remote.payload_type || Some(pt) == remote.dtmf_payload_type;
        match self.latched {
            Some(addr) if addr != from => {
                self.stats.ignored_packets += 1;
                return;
            }
            Some(_) => {}
            None => {
                // Latch onto the SDP address, or (behind NAT) the first source
                // sending our negotiated payload types.
                if Some(from) == remote.rtp || (self.config.latch_any_source && ours) {
                    self.latched = Some(from);
                    self.stats.remote = Some(from);
                } else {
                    self.stats.ignored_packets += 1;
                    return;
                }
            }
        }
        if !ours {
            return;
        }
        self.last_rx = arrival;
        self.timed_out = false;
        self.remote_ssrc = Some(packet.header.ssrc);
        self.stats.packets_received += 1;
        if Some(pt) == remote.dtmf_payload_type {
            if let Some(d) = self.dtmf_rx.push(packet.header.timestamp, &packet.payload) {
                let _ = self.events.try_send(MediaEvent::Dtmf(d));
            }
            return;
        }
        if self.direction.we_receive() {
            self.jitter.push(packet.header.sequence_number, packet.header.timestamp, self.last_rx, packet.payload);
        }
    }

    fn on_rtcp(&mut self, data: &[u8]) {
        let mut raw = data;
        let Ok(packets) = rtcp::packet::unmarshal(&mut raw) else { return };
        if let Some(percent) = reported_loss(&packets, Some(self.ssrc)) {
            self.stats.remote_loss_percent = Some(percent);
            if let Some(codecs) = self.codecs.as_mut() {
                codecs.set_expected_loss(percent);
            }
        }
    }

    /// One 20 ms step: play one frame in, send one frame out.
    fn on_tick(&mut self, now: Instant) -> Result<(), ()> {
        let mut publish = self.ticks.is_multiple_of(STATS_EVERY_TICKS);
        self.ticks = self.ticks.wrapping_add(1);
        if !self.timed_out && now.saturating_duration_since(self.last_rx) >= self.config.media_timeout {
            self.timed_out = true;
            publish = true;
            let _ = self.events.try_send(MediaEvent::Timeout);
        }
        self.play_in(now);
        self.send_out();
        if publish {
            self.stats.jitter = self.jitter.stats();
            self.stats.timed_out = self.timed_out;
            self.stats_tx.send_replace(self.stats.clone());
        }
        if self.incoming.is_closed() {
            return Err(());
        }
        Ok(())
    }

    fn play_in(&mut self, now: Instant) {
        let Some(codecs) = self.codecs.as_mut() else { return };
        let codec_frame = frame_len(codecs.pcm_rate);
        let (mut received_at, mut arrived_at) = (None, None);
        // Pull packets as the 20 ms frame needs them, whatever their length.
        while self.pcm_in.len() < codec_frame {
            self.scratch.clear();
            match codecs.pull(&mut self.jitter, self.packet_samples, &mut self.scratch) {
                Pulled::Packet => {
                    self.packet_samples = self.scratch.len().max(1);
                    received_at = Some(now);
                    arrived_at = self.jitter.played_arrival();
                }
                Pulled::Recovered => self.stats.fec_recovered += 1,
                Pulled::Concealed => {}
                Pulled::Buffering => self.scratch.resize(codec_frame - self.pcm_in.len(), 0),
            }
            self.pcm_in.extend(self.scratch.iter().copied());
        }
        take_front(&mut self.pcm_in, codec_frame, &mut self.coded);
        let mut pcm = Vec::with_capacity(frame_len(PIPELINE_RATE));
        if codecs.decode_rs.process(&self.coded, &mut pcm).is_err() {
            return;
        }
        // In-band detection only when the far end did not negotiate RFC 4733.
        let in_band_dtmf = self.remote.as_ref().is_some_and(|r| r.dtmf_payload_type.is_none());
        if received_at.is_some() && in_band_dtmf {
            let floats: Vec<f32> = pcm.iter().map(|s| f32::from(*s) * (1.0 / 32768.0)).collect();
            for key in self.tones.push(&floats) {
                let _ = self.events.try_send(MediaEvent::Dtmf(Digit { digit: key, duration_ms: 0 }));
            }
        }
        if self.incoming.try_send(AudioFrame { pcm, received_at, arrived_at }).is_err() {
            self.stats.dropped_frames += 1;
        }
    }

    fn send_out(&mut self) {
        let Some((remote_rtp, payload_type, dtmf_payload_type)) =
            self.remote.as_ref().map(|r| (r.rtp, r.payload_type, r.dtmf_payload_type))
        else {
            return;
        };
        let Some(dest) = self.latched.or(remote_rtp) else { return };
        let Some(codecs) = self.codecs.as_mut() else { return };
        // RTP timestamp units per 20 ms (48 kHz for Opus whatever it codes at).
        let samples = frame_len(codecs.codec.clock_rate()) as u32;
        if let (Some((marker, payload)), Some(pt)) = (self.dtmf_out.front().copied(), dtmf_payload_type) {
            self.dtmf_out.pop_front();
            let event_ts = *self.dtmf_ts.get_or_insert(self.ts);
            self.send_packet(dest, pt, marker, event_ts, &payload);
            if self.dtmf_out.is_empty() || self.dtmf_out.front().is_some_and(|p| p.0) {
                self.dtmf_ts = None;
            }
            self.ts = self.ts.wrapping_add(samples);
            return;
        }
        self.dtmf_out.clear();
        let frame16 = frame_len(PIPELINE_RATE);
        let have = self.outgoing.len().min(frame16);
        let speaking = have > 0;
        take_front(&mut self.outgoing, have, &mut self.frame);
        self.frame.resize(frame16, 0);
        self.coded.clear();
        if codecs.encode_rs.process(&self.frame, &mut self.coded).is_err() {
            return;
        }
        self.payload.clear();
        codecs.encode(&self.coded, &mut self.payload);
        if self.direction.we_send() {
            // Marker on the first packet of a talk spurt (RFC 3551 §4.1).
            let marker = speaking && !self.was_playing;
            if marker {
                let _ = self.events.try_send(MediaEvent::PlayoutStarted { at: Instant::now() });
            }
            let ts = self.ts;
            let payload = std::mem::take(&mut self.payload);
            self.send_packet(dest, payload_type, marker, ts, &payload);
            self.payload = payload;
            if speaking && self.outgoing.is_empty() {
                let _ = self.events.try_send(MediaEvent::PlayoutEnded { at: Instant::now() });
            }
        }
        self.was_playing = speaking;
        self.ts = self.ts.wrapping_add(samples);
    }

    fn send_packet(&mut self, dest: SocketAddr, pt: u8, marker: bool, ts: u32, payload: &[u8]) {
        let header = rtp::header::Header {
            version: 2,
            marker,
            payload_type: pt,
            sequence_number: self.seq,
            timestamp: ts,
            ssrc: self.ssrc,
            ..Default::default()
        };
        self.seq = self.seq.wrapping_add(1);
        // The header is marshalled into a reused buffer and the payload put
        // after it: the same bytes as `Packet::marshal`, without a new
        // buffer for each packet.
        self.wire.clear();
        self.wire.resize(header.marshal_size(), 0);
        if header.marshal_to(&mut self.wire).is_err() {
            return;
        }
        self.wire.extend_from_slice(payload);
        if self.rtp.send_to(&self.wire, dest).is_ok() {
            self.stats.packets_sent += 1;
            self.octets_sent = self.octets_sent.wrapping_add(payload.len() as u32);
        }
    }

    fn send_rtcp(&mut self) {
        let Some(dest) = self.remote.as_ref().and_then(|r| r.rtcp) else { return };
        let js = self.jitter.stats();
        let clock = self.remote.as_ref().map_or(8000, |r| r.codec.clock_rate());
        let reports = self
            .remote_ssrc
            .map(|ssrc| rtcp::reception_report::ReceptionReport {
                ssrc,
                fraction_lost: (js.loss_percent * 256.0 / 100.0).clamp(0.0, 255.0) as u8,
                total_lost: js.lost.min(0x7F_FFFF) as u32,
                last_sequence_number: 0,
                jitter: (js.jitter_ms * f64::from(clock) / 1000.0) as u32,
                last_sender_report: 0,
                delay: 0,
            })
            .into_iter()
            .collect();
        let sr = rtcp::sender_report::SenderReport {
            ssrc: self.ssrc,
            ntp_time: ntp_now(),
            rtp_time: self.ts,
            packet_count: self.stats.packets_sent as u32,
            octet_count: self.octets_sent,
            reports,
            profile_extensions: Bytes::new(),
        };
        if let Ok(bytes) = sr.marshal() {
            let _ = self.rtcp.send_to(&bytes, dest);
        }
    }
}

/// NTP timestamp (RFC 3550 §4): seconds since 1900 in the high 32 bits.
fn ntp_now() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() + 2_208_988_800;
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdp::TELEPHONE_EVENT_PT;

    #[test]
    fn take_front_moves_samples_in_order_across_the_ring_buffers_wrap() {
        let mut queue: VecDeque<i16> = VecDeque::with_capacity(8);
        let mut out = vec![99];
        // Fill, drop from the front and refill: the samples wrap round the
        // end of the ring buffer, so they sit in two slices.
        queue.extend(0..6);
        queue.drain(..4);
        queue.extend(6..12);
        assert!(!queue.as_slices().1.is_empty(), "the test needs a wrapped queue");
        take_front(&mut queue, 5, &mut out);
        assert_eq!(out, [4, 5, 6, 7, 8]);
        assert_eq!(queue, [9, 10, 11]);
        // Asked for more than it holds: all of it, and the queue is empty.
        take_front(&mut queue, 10, &mut out);
        assert_eq!(out, [9, 10, 11]);
        assert!(queue.is_empty());
        take_front(&mut queue, 3, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn opus_complexity_is_0_to_10_and_every_level_codes_speech_band_audio() {
        assert!(OpusComplexity::new(11).is_err());
        for level in [0, 1, 5, 10] {
            let mut codecs = Codecs::new(Codec::Opus, OpusComplexity::new(level).unwrap()).unwrap();
            let tone: Vec<i16> = (0..320 * 25).map(|n| (8000.0 * (2.0 * std::f32::consts::PI * 440.0 * n as f32 / 16_000.0).sin()) as i16).collect();
            let mut decoded = Vec::new();
            for frame in tone.chunks(320) {
                let mut packet = Vec::new();
                codecs.encode(frame, &mut packet);
                assert!(!packet.is_empty(), "complexity {level} encodes");
                codecs.decode(&packet, 320, &mut decoded);
            }
            // Past the codec's start-up, the tone comes back at about its level.
            let tail = &decoded[decoded.len() / 2..];
            let rms = (tail.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / tail.len() as f64).sqrt();
            assert!((4000.0..7000.0).contains(&rms), "complexity {level}: rms {rms}");
        }
    }

    /// espeak-ng speech at the pipeline's rate (scripts/setup installs
    /// espeak-ng and sox).
    fn speech() -> Vec<i16> {
        let text = "Thank you for calling. Our opening hours are nine to five, Monday to Friday.";
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("espeak-ng -v en-us --stdout '{text}' | sox -t wav - -r 16000 -c 1 -b 16 -e signed-integer -t raw -")])
            .output()
            .expect("espeak-ng and sox");
        assert!(out.status.success() && out.stdout.len() > 32_000, "espeak-ng | sox: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect()
    }

    /// Codes speech with Opus told to expect `loss_percent` loss, loses every
    /// fifth packet, and plays the rest through a jitter buffer as a call
    /// does, rebuilding lost packets from FEC (`fec`) or concealing them.
    /// Returns the SNR in dB of the lost packets' 20 ms against the same
    /// stream decoded without loss, and how many were rebuilt.
    fn opus_through_loss(speech: &[i16], loss_percent: f64, fec: bool) -> (f64, u64) {
        let opus = || Codecs::new(Codec::Opus, OpusComplexity::default()).unwrap();
        let (mut tx, mut clean, mut rx) = (opus(), opus(), opus());
        tx.set_expected_loss(loss_percent);
        let packets: Vec<Vec<u8>> = speech
            .chunks_exact(320)
            .map(|frame| {
                let mut p = Vec::new();
                tx.encode(frame, &mut p);
                p
            })
            .collect();
        let mut reference = Vec::new();
        for p in &packets {
            clean.decode(p, 320, &mut reference);
        }
        let lost = |i: usize| i % 5 == 2;
        let mut jitter = JitterBuffer::new(JitterConfig { clock_rate: 48_000, min_delay: Duration::from_millis(40), ..JitterConfig::default() });
        let t0 = Instant::now();
        let (mut played, mut rebuilt) = (Vec::new(), 0);
        for tick in 0..packets.len() + 3 {
            if played.len() >= reference.len() {
                break;
            }
            if tick < packets.len() && !lost(tick) {
                jitter.push(tick as u16, tick as u32 * 960, t0 + TICK * tick as u32, Bytes::from(packets[tick].clone()));
            }
            match jitter.pop() {
                Playout::Frame(p) => rx.decode(&p, 320, &mut played),
                Playout::Lost if fec => rebuilt += u64::from(rx.recover(jitter.peek().map(|p| &p[..]), 320, &mut played)),
                Playout::Lost => rx.decode(&[], 320, &mut played),
                Playout::Buffering => {}
            }
        }
        assert_eq!(played.len(), reference.len(), "every packet played or filled in, in order");
        let (mut signal, mut error) = (0.0, 0.0);
        for i in (0..packets.len()).filter(|i| lost(*i)) {
            for n in i * 320..(i + 1) * 320 {
                signal += f64::from(reference[n]).powi(2);
                error += (f64::from(reference[n]) - f64::from(played[n])).powi(2);
            }
        }
        (10.0 * (signal / error.max(1.0)).log10(), rebuilt)
    }

    #[test]
    fn an_empty_or_garbage_packet_after_a_lost_one_is_concealed_not_read_for_fec() {
        let mut codecs = Codecs::new(Codec::Opus, OpusComplexity::default()).unwrap();
        for next in [&[][..], &[0xFF][..], &[0x0B, 0xFF, 0xFF][..]] {
            let mut out = Vec::new();
            assert!(!codecs.recover(Some(next), 320, &mut out), "{next:?}");
            assert_eq!(out.len(), 320, "the lost packet is concealed at its length");
        }
    }

    #[test]
    fn opus_fec_rebuilds_lost_speech_that_concealment_only_guesses() {
        let speech = speech();
        let lost = (speech.len() / 320).div_ceil(5) as u64;
        let (fec_snr, rebuilt) = opus_through_loss(&speech, 20.0, true);
        let (plc_snr, _) = opus_through_loss(&speech, 20.0, false);
        let (_, none) = opus_through_loss(&speech, 0.0, true);
        eprintln!("lost {lost} of {} packets; SNR of the lost audio: FEC {fec_snr:.1} dB ({rebuilt} rebuilt), concealment {plc_snr:.1} dB", speech.len() / 320);
        assert!(rebuilt >= lost / 2, "the speech's lost packets come back from FEC: {rebuilt} of {lost}");
        assert!(fec_snr >= plc_snr + 6.0, "FEC {fec_snr:.1} dB vs concealment {plc_snr:.1} dB");
        assert_eq!(none, 0, "an encoder told of no loss sends no FEC, and the receiver conceals");
    }

    fn remote_for(addr: SocketAddr) -> RemoteMedia {
        remote_with(addr, Codec::Pcmu)
    }

    fn remote_with(addr: SocketAddr, codec: Codec) -> RemoteMedia {
        RemoteMedia {
            rtp: Some(addr),
            rtcp: Some(SocketAddr::new(addr.ip(), addr.port() + 1)),
            codec,
            payload_type: codec.default_payload_type(),
            dtmf_payload_type: Some(TELEPHONE_EVENT_PT),
            direction: Direction::SendRecv,
            ptime_ms: 20,
        }
    }

    async fn pair() -> (MediaHandle, MediaHandle) {
        pair_with(Codec::Pcmu).await
    }

    async fn pair_with(codec: Codec) -> (MediaHandle, MediaHandle) {
        let ports = PortRange::new("127.0.0.1".parse().unwrap(), 41000, 42000);
        let a_sock = ports.bind().await.unwrap();
        let b_sock = ports.bind().await.unwrap();
        let (a_addr, b_addr) = (a_sock.0.local_addr().unwrap(), b_sock.0.local_addr().unwrap());
        assert_eq!(a_addr.port() % 2, 0);
        let a = start(a_sock, Some(remote_with(b_addr, codec)), SessionConfig::default()).unwrap();
        let b = start(b_sock, Some(remote_with(a_addr, codec)), SessionConfig::default()).unwrap();
        (a, b)
    }

    fn tone(ms: u32) -> Vec<i16> {
        (0..PIPELINE_RATE * ms / 1000)
            .map(|n| (8000.0 * (2.0 * std::f32::consts::PI * 1000.0 * n as f32 / PIPELINE_RATE as f32).sin()) as i16)
            .collect()
    }

    /// A PCMU session on a port from `first_port` on, whose far end is a
    /// plain socket of the test's; and the session's RTP address.
    async fn facing_a_socket(first_port: u16) -> (MediaHandle, UdpSocket, SocketAddr) {
        let ports = PortRange::new("127.0.0.1".parse().unwrap(), first_port, first_port + 1000);
        let far = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let h = start(ports.bind().await.unwrap(), Some(remote_for(far.local_addr().unwrap())), SessionConfig::default()).unwrap();
        let dest = h.control.local_addr().unwrap();
        (h, far, dest)
    }

    async fn collect(h: &mut MediaHandle, ms: u64) -> Vec<i16> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(Some(f)) = tokio::time::timeout_at(deadline, h.incoming.recv()).await {
            out.extend(f.pcm);
        }
        out
    }

    fn loud_samples(x: &[i16]) -> usize {
        x.iter().filter(|s| s.unsigned_abs() > 2000).count()
    }

    #[tokio::test]
    async fn a_tone_crosses_the_wire_without_loss() {
        tone_crosses_the_wire(Codec::Pcmu).await;
    }

    #[tokio::test]
    async fn a_tone_crosses_the_wire_in_opus() {
        tone_crosses_the_wire(Codec::Opus).await;
    }

    async fn tone_crosses_the_wire(codec: Codec) {
        let (a, mut b) = pair_with(codec).await;
        a.control.play(tone(1000)).await;
        let got = collect(&mut b, 1400).await;
        let loud: Vec<i16> = got.iter().copied().skip_while(|s| s.unsigned_abs() < 2000).take(PIPELINE_RATE as usize / 2).collect();
        assert_eq!(loud.len(), PIPELINE_RATE as usize / 2, "half a second of tone arrived");
        // 1 kHz: 20 rising zero crossings per 20 ms frame. The median frame
        // decides, so one frame concealed on a busy machine does not.
        let mut per_frame: Vec<usize> = loud.chunks(320).map(|f| f.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count()).collect();
        per_frame.sort_unstable();
        let median = per_frame[per_frame.len() / 2];
        assert!((19..=21).contains(&median), "{median} rising zero crossings in the median 20 ms frame: {per_frame:?}");
        let stats = b.control.stats();
        assert_eq!(stats.jitter.lost, 0);
        assert!(stats.packets_received >= 60, "{stats:?}");
        assert_eq!(stats.remote, Some(a.control.local_addr().unwrap()));
        assert!(a.control.stats().packets_sent >= 60);
    }

    #[tokio::test]
    async fn a_spurt_reports_its_first_and_last_packet() {
        let (mut a, _b) = pair().await;
        a.control.play(tone(400)).await;
        let mut started = None;
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(2), a.events.recv()).await.expect("events").expect("open") {
                MediaEvent::PlayoutStarted { at } => started = Some(at),
                MediaEvent::PlayoutEnded { at } => break at,
                _ => {}
            }
        };
        let spurt = ended - started.expect("start before end");
        assert!(spurt >= Duration::from_millis(360) && spurt < Duration::from_millis(600), "20 packets of 20 ms took {spurt:?}");
    }

    #[tokio::test]
    async fn rtcp_reports_tell_the_sender_what_the_receiver_lost() {
        let (a, mut b) = pair().await;
        assert_eq!(a.control.stats().remote_loss_percent, None);
        // Reports go out every 5 s; wait for the first.
        let _ = collect(&mut b, 5700).await;
        assert_eq!(a.control.stats().remote_loss_percent, Some(0.0), "B's report about A's stream reached A");
        assert_eq!(b.control.stats().remote_loss_percent, Some(0.0));
    }

    /// Reads `n` RTP packets at `far`; returns how many carry Opus FEC and
    /// the sender's SSRC.
    async fn count_fec(far: &UdpSocket, n: usize) -> (usize, u32) {
        let (mut buf, mut with_fec, mut ssrc) = (vec![0u8; 1500], 0, 0);
        for _ in 0..n {
            let len = tokio::time::timeout(Duration::from_secs(2), far.recv(&mut buf)).await.expect("RTP keeps coming").unwrap();
            let packet = rtp::packet::Packet::unmarshal(&mut &buf[..len]).unwrap();
            ssrc = packet.header.ssrc;
            with_fec += usize::from(has_lbrr(&packet.payload));
        }
        (with_fec, ssrc)
    }

    #[tokio::test]
    async fn packets_leave_in_sequence_with_one_ssrc_and_a_marker_on_the_spurts_first() {
        let (ours, far, _) = facing_a_socket(44000).await;
        async fn next(far: &UdpSocket) -> rtp::packet::Packet {
            let mut buf = [0u8; 1500];
            let len = tokio::time::timeout(Duration::from_secs(2), far.recv(&mut buf)).await.expect("RTP keeps coming").unwrap();
            rtp::packet::Packet::unmarshal(&mut &buf[..len]).unwrap()
        }
        let first = next(&far).await;
        ours.control.play(tone(100)).await;
        let mut packets = vec![first];
        for _ in 0..20 {
            packets.push(next(&far).await);
        }
        for pair in packets.windows(2) {
            let (a, b) = (&pair[0].header, &pair[1].header);
            assert_eq!(b.sequence_number, a.sequence_number.wrapping_add(1));
            assert_eq!(b.timestamp, a.timestamp.wrapping_add(160), "20 ms of 8 kHz");
            assert_eq!(b.ssrc, a.ssrc);
        }
        assert!(packets.iter().all(|p| p.header.version == 2 && p.header.payload_type == 0 && p.payload.len() == 160));
        // Silence, then the tone's five packets (a sixth may carry the
        // resampler's 2 ms tail), the first of them marked.
        let loud: Vec<usize> = (0..packets.len())
            .filter(|&i| {
                let mut pcm = Vec::new();
                Law::Ulaw.decode(&packets[i].payload, &mut pcm);
                pcm.iter().any(|s| s.unsigned_abs() > 500)
            })
            .collect();
        assert!((5..=6).contains(&loud.len()) && loud.windows(2).all(|w| w[1] == w[0] + 1), "one spurt: {loud:?}");
        let marked: Vec<usize> = (0..packets.len()).filter(|&i| packets[i].header.marker).collect();
        assert_eq!(marked, [loud[0]], "the marker is on the spurt's first packet only");
    }

    #[tokio::test]
    async fn a_loss_report_turns_opus_fec_on_and_a_receiver_rebuilds_lost_packets_from_it() {
        let speech = speech();
        // The far end is the test's socket, a phone that reports loss.
        let far = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ports = PortRange::new("127.0.0.1".parse().unwrap(), 43000, 44000);
        let sockets = ports.bind().await.unwrap();
        let (rtp_at, rtcp_at) = (sockets.0.local_addr().unwrap(), sockets.1.local_addr().unwrap());
        let mut ours = start(sockets, Some(remote_with(far.local_addr().unwrap(), Codec::Opus)), SessionConfig::default()).unwrap();
        ours.control.play(speech.clone()).await;
        let (before, ssrc) = count_fec(&far, 50).await;
        assert_eq!(before, 0, "no loss reported, no FEC sent");
        let report = rtcp::receiver_report::ReceiverReport {
            ssrc: 7,
            reports: vec![rtcp::reception_report::ReceptionReport { ssrc, fraction_lost: 51, ..Default::default() }],
            ..Default::default()
        };
        far.send_to(&report.marshal().unwrap(), rtcp_at).await.unwrap();
        let (after, _) = count_fec(&far, 75).await;
        eprintln!("packets with FEC: {before} of 50 before the loss report, {after} of 75 after");
        assert!(after >= 25, "20 % loss reported: FEC in {after} of 75 packets of speech");

        // The other way: the phone codes FEC, every fifth packet is lost.
        let mut phone = Codecs::new(Codec::Opus, OpusComplexity::default()).unwrap();
        phone.set_expected_loss(20.0);
        let mut tick = tokio::time::interval(TICK);
        for (i, frame) in speech.chunks_exact(320).take(150).enumerate() {
            let mut payload = Vec::new();
            phone.encode(frame, &mut payload);
            tick.tick().await;
            if i % 5 == 2 {
                continue;
            }
            let header = rtp::header::Header { version: 2, payload_type: Codec::Opus.default_payload_type(), sequence_number: i as u16, timestamp: i as u32 * 960, ssrc: 9, ..Default::default() };
            far.send_to(&rtp::packet::Packet { header, payload: Bytes::from(payload) }.marshal().unwrap(), rtp_at).await.unwrap();
            let _ = ours.incoming.try_recv();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stats = ours.control.stats();
        eprintln!("of 30 lost packets, {} rebuilt from FEC", stats.fec_recovered);
        assert!(stats.fec_recovered >= 15, "of 30 lost packets of speech, rebuilt: {stats:?}");
    }

    #[tokio::test]
    async fn flush_stops_the_agent_at_once() {
        let (a, mut b) = pair().await;
        a.control.play(tone(5000)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.control.flush().await;
        let got = collect(&mut b, 1500).await;
        let seconds_of_tone = loud_samples(&got) as f64 / f64::from(PIPELINE_RATE);
        assert!(seconds_of_tone < 0.6, "{seconds_of_tone} s of tone after a flush at 0.3 s");
    }

    #[tokio::test]
    async fn dtmf_is_sent_and_received_as_telephone_events() {
        let (a, mut b) = pair().await;
        for d in ['4', '2', '#'] {
            a.control.send_dtmf(d).await.unwrap();
        }
        assert!(a.control.send_dtmf('x').await.is_err());
        let mut digits = String::new();
        while digits.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(3), b.events.recv()).await {
                Ok(Some(MediaEvent::Dtmf(d))) => digits.push(d.digit),
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        assert_eq!(digits, "42#");
    }

    #[tokio::test]
    async fn packets_from_a_stranger_are_ignored_after_latching() {
        let (a, mut b) = pair().await;
        a.control.play(tone(200)).await;
        let _ = collect(&mut b, 300).await;
        let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let packet = rtp::packet::Packet {
            header: rtp::header::Header { version: 2, payload_type: 0, ssrc: 7, ..Default::default() },
            payload: Bytes::from(vec![0u8; 160]),
        };
        for _ in 0..5 {
            stranger.send_to(&packet.marshal().unwrap(), b.control.local_addr().unwrap()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(b.control.stats().ignored_packets, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_frame_tells_when_its_packet_arrived_before_the_jitter_buffers_wait() {
        let (mut h, far, dest) = facing_a_socket(45000).await;
        crate::udp::timestamps_on().await;
        let sender = tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut tick = tokio::time::interval(TICK);
            for i in 0..25u16 {
                tick.tick().await;
                let mut payload = Vec::new();
                Law::Ulaw.encode(&[1000; 160], &mut payload);
                let packet = rtp::packet::Packet {
                    header: rtp::header::Header { version: 2, payload_type: 0, sequence_number: i, timestamp: u32::from(i) * 160, ssrc: 7, ..Default::default() },
                    payload: Bytes::from(payload),
                };
                sent.push(Instant::now());
                far.send_to(&packet.marshal().unwrap(), dest).await.unwrap();
            }
            sent
        });
        let mut played = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(900);
        while let Ok(Some(f)) = tokio::time::timeout_at(deadline, h.incoming.recv()).await {
            if let Some(received) = f.received_at {
                played.push((f.arrived_at.expect("a played packet's arrival"), received));
            }
        }
        let sent = sender.await.unwrap();
        assert_eq!(played.len(), 25, "every packet played once");
        for (i, (arrived, received)) in played.iter().enumerate() {
            // Packet i's own arrival: after it was sent, before the next was.
            assert!(*arrived >= sent[i], "frame {i}: arrival before its packet was sent");
            assert!(sent.get(i + 1).is_none_or(|next| arrived < next), "frame {i}: arrival after the next packet was sent");
            assert!(arrived <= received, "frame {i}: arrival after the tick that played it");
        }
        // Before the tick that played it: a packet that lands between the
        // tick's clock reading and its read of the socket is stamped with the
        // tick's time, so a few may tie, not most.
        let earlier = played.iter().filter(|(arrived, received)| arrived < received).count();
        assert!(earlier >= 20, "only {earlier} of 25 arrivals before their tick: the tick's time was taken");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thirty_ms_packets_are_cut_into_twenty_ms_frames_without_losing_audio() {
        let (mut h, far, dest) = facing_a_socket(43000).await;
        // 1 s of a 1 kHz tone at 8 kHz in 30 ms PCMU packets, paced in real time.
        let tone8: Vec<i16> = (0..8000).map(|n| (8000.0 * (2.0 * std::f32::consts::PI * 1000.0 * n as f32 / 8000.0).sin()) as i16).collect();
        let sender = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(30));
            for (i, chunk) in tone8.chunks(240).enumerate() {
                tick.tick().await;
                let mut payload = Vec::new();
                Law::Ulaw.encode(chunk, &mut payload);
                let packet = rtp::packet::Packet {
                    header: rtp::header::Header { version: 2, payload_type: 0, sequence_number: i as u16, timestamp: i as u32 * 240, ssrc: 9, ..Default::default() },
                    payload: Bytes::from(payload),
                };
                far.send_to(&packet.marshal().unwrap(), dest).await.unwrap();
            }
        });
        let got = collect(&mut h, 1800).await;
        sender.await.unwrap();
        // All of the 1 s tone's energy is played (16,000 samples of amplitude
        // 8,000 at 16 kHz), whatever the phase the resampler lands on. The
        // buffer may stretch playout by a packet or two while it adapts to
        // 30 ms packets; that inserts silence but loses nothing.
        let energy: f64 = got.iter().map(|s| f64::from(*s).powi(2)).sum();
        let ratio = energy / (16_000.0 * 8000f64.powi(2) / 2.0);
        assert!((0.9..1.05).contains(&ratio), "{ratio:.3} of the tone's energy arrived");
        // The pitch, over the middle half second of the tone (the filter
        // rings at its start and end), from the spacing of rising zero
        // crossings where the tone is unbroken: a packet the busy sender
        // paced late is concealed and played a frame later (no loss), a gap
        // in the tone rather than a change of its pitch.
        let start = got.iter().position(|s| s.unsigned_abs() > 2000).expect("tone arrived");
        let middle = &got[start + 4000..start + 12_000];
        let rising: Vec<usize> = middle.windows(2).enumerate().filter(|(_, w)| w[0] < 0 && w[1] >= 0).map(|(i, _)| i).collect();
        let periods: Vec<usize> = rising.windows(2).map(|r| r[1] - r[0]).filter(|p| (12..=20).contains(p)).collect();
        assert!(periods.len() >= 400, "at least 0.4 s of the 0.5 unbroken: {} periods", periods.len());
        let freq = 16_000.0 * periods.len() as f64 / periods.iter().sum::<usize>() as f64;
        assert!((994.0..=1006.0).contains(&freq), "tone at {freq} Hz");
        let stats = h.control.stats().jitter;
        assert_eq!((stats.lost, stats.late), (0, 0), "{stats:?}");
    }

    proptest::proptest! {
        /// RTP parsing never panics on arbitrary bytes, and what we send
        /// parses back to the same header.
        #[test]
        fn rtp_headers_round_trip_and_garbage_never_panics(
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            pt in 0u8..128, seq in proptest::prelude::any::<u16>(), ts in proptest::prelude::any::<u32>(),
            ssrc in proptest::prelude::any::<u32>(), marker in proptest::prelude::any::<bool>(),
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let mut raw = garbage.as_slice();
            let _ = rtp::packet::Packet::unmarshal(&mut raw);
            let mut raw = garbage.as_slice();
            let _ = rtcp::packet::unmarshal(&mut raw);
            let sent = rtp::packet::Packet {
                header: rtp::header::Header { version: 2, marker, payload_type: pt, sequence_number: seq, timestamp: ts, ssrc, ..Default::default() },
                payload: Bytes::from(payload),
            };
            let bytes = sent.marshal().unwrap();
            let mut raw = &bytes[..];
            let back = rtp::packet::Packet::unmarshal(&mut raw).unwrap();
            proptest::prop_assert_eq!(back, sent);
        }
    }

    #[tokio::test]
    async fn garbage_on_the_media_ports_changes_nothing() {
        let (a, mut b) = pair().await;
        let junk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = b.control.local_addr().unwrap();
        let rtcp_target = SocketAddr::new(target.ip(), target.port() + 1);
        for len in [0usize, 1, 11, 12, 13, 100, 1400] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            junk.send_to(&bytes, target).await.unwrap();
            junk.send_to(&bytes, rtcp_target).await.unwrap();
        }
        a.control.play(tone(500)).await;
        let got = collect(&mut b, 900).await;
        assert!(loud_samples(&got) > 5000, "audio still flows after garbage");
    }

    #[tokio::test]
    async fn silence_from_the_far_end_times_out() {
        let ports = PortRange::new("127.0.0.1".parse().unwrap(), 42000, 43000);
        let sock = ports.bind().await.unwrap();
        let nobody: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let config = SessionConfig { media_timeout: Duration::from_millis(300), ..SessionConfig::default() };
        let mut h = start(sock, Some(remote_for(nobody)), config).unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match h.events.recv().await {
                    Some(MediaEvent::Timeout) => return true,
                    Some(_) => continue,
                    None => return false,
                }
            }
        });
        let drain = async { while h.incoming.recv().await.is_some() {} };
        tokio::select! { r = ev => assert!(r.unwrap()), _ = drain => panic!("session ended") }
    }
}
