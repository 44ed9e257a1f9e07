//! Adaptive jitter buffer: turns RTP packets that arrive early, late, out of
//! order, twice or never into one frame per 20 ms tick.
//!
//! Packets are keyed by their extended sequence number (RFC 3550 A.1), so
//! reordering and 16-bit wrap-around are handled. The playout delay adapts to
//! the measured interarrival jitter (RFC 3550 §6.4.1, A.8) between a minimum
//! and a maximum (default 20-200 ms). Each `pop` yields the next frame, or
//! `Lost` when it is missing (the caller conceals it), or `Buffering` before
//! playout has started. Packets that arrive after their turn are dropped as
//! late; duplicates are dropped; if the buffer grows past its maximum the
//! oldest frames are dropped to catch up.
//!
//! The buffer holds payloads of any type `T` (encoded frames, so that a codec
//! with its own concealment can use it) and takes arrival times from the
//! caller, so it needs no clock and is tested deterministically.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct JitterConfig {
    /// Expected packet duration until the stream shows its own.
    pub frame: Duration,
    /// RTP clock rate of the stream, for the jitter estimate.
    pub clock_rate: u32,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// The codec can rebuild a lost packet from the one after it (Opus's
    /// in-band FEC): a packet found lost after its tick was concealed is
    /// still played, one tick late, from the next packet, so the delay
    /// grows by the one packet that FEC needs to be in time from then on.
    pub wait_for_fec: bool,
}

impl Default for JitterConfig {
    fn default() -> Self {
        JitterConfig {
            frame: Duration::from_millis(20),
            clock_rate: 8000,
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            wait_for_fec: false,
        }
    }
}

/// What one playout tick yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout<T> {
    Frame(T),
    /// The frame for this tick is missing: conceal it.
    Lost,
    /// Playout has not started (or restarted after a long gap): play silence.
    Buffering,
}

/// Counters a call exposes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JitterStats {
    pub received: u64,
    pub played: u64,
    pub duplicates: u64,
    /// Arrived with a lower sequence number than one already received.
    pub out_of_order: u64,
    /// Arrived after their playout time and were dropped.
    pub late: u64,
    /// Ticks that had no frame while playing (concealed).
    pub concealed: u64,
    /// Dropped to keep the delay under the maximum.
    pub overflow_dropped: u64,
    /// Packets never received: expected (from sequence numbers) minus received.
    pub lost: u64,
    /// `lost / expected` in percent.
    pub loss_percent: f64,
    /// Interarrival jitter estimate in milliseconds.
    pub jitter_ms: f64,
    /// Current target playout delay.
    pub target_delay_ms: u32,
    /// Frames waiting now.
    pub depth_frames: usize,
}

pub struct JitterBuffer<T> {
    cfg: JitterConfig,
    /// Each packet with its arrival.
    frames: BTreeMap<u64, (Instant, T)>,
    /// Highest extended sequence number seen.
    highest: Option<u64>,
    /// First extended sequence number seen, for the expected count.
    base: Option<u64>,
    /// Next sequence number to play; `None` while buffering.
    next: Option<u64>,
    /// Consecutive ticks without a frame while playing.
    misses: u32,
    /// Ticks spent buffering with at least one frame waiting.
    waited: usize,
    /// The frame at `next` was already concealed once while we waited for it.
    held: bool,
    /// (arrival, rtp timestamp) of the previous packet, for the jitter estimate.
    last_transit: Option<(Instant, u32)>,
    /// RFC 3550 A.8 jitter in RTP timestamp units, scaled by 16.
    jitter_q4: u64,
    /// Duration of one packet, learnt from consecutive timestamps (the far
    /// end may send 10, 20, 30 ms or longer); depths are counted in it.
    packet: Duration,
    /// (extended sequence number, timestamp) of the newest packet.
    newest: Option<(u64, u32)>,
    stats: JitterStats,
    /// When the packet the last `Frame` played arrived.
    played_arrival: Option<Instant>,
}

/// Consecutive misses after which the buffer stops and rebuffers: the far
/// end went quiet (silence suppression, hold) rather than losing packets.
const MAX_MISSES: u32 = 10;

impl<T> JitterBuffer<T> {
    pub fn new(cfg: JitterConfig) -> Self {
        JitterBuffer {
            cfg,
            frames: BTreeMap::new(),
            played_arrival: None,
            highest: None,
            base: None,
            next: None,
            misses: 0,
            waited: 0,
            held: false,
            last_transit: None,
            jitter_q4: 0,
            packet: cfg.frame,
            newest: None,
            stats: JitterStats::default(),
        }
    }

    /// RFC 3550 A.1: the 16-bit sequence number extended with the number of
    /// wrap-arounds, choosing the candidate closest to the highest seen.
    /// The first packet starts in cycle 1, so a late packet from before a
    /// wrap at the very start still has a cycle to fall back to.
    fn extend(&self, seq: u16) -> u64 {
        let Some(highest) = self.highest else { return (1 << 16) + u64::from(seq) };
        let cycle = highest & !0xFFFF;
        [cycle - (1 << 16), cycle, cycle + (1 << 16)]
            .into_iter()
            .map(|c| c + u64::from(seq))
            .min_by_key(|c| c.abs_diff(highest))
            .unwrap_or(cycle + u64::from(seq))
    }

    /// Adds a packet that arrived at `arrival`.
    pub fn push(&mut self, seq: u16, timestamp: u32, arrival: Instant, payload: T) {
        let ext = self.extend(seq);
        self.update_jitter(arrival, timestamp);
        if self.highest.is_some_and(|h| ext < h) {
            self.stats.out_of_order += 1;
        }
        if self.next.is_some_and(|next| ext < next) {
            self.stats.late += 1;
            return;
        }
        if self.frames.contains_key(&ext) {
            self.stats.duplicates += 1;
            return;
        }
        self.stats.received += 1;
        if let Some((prev_ext, prev_ts)) = self.newest {
            if ext == prev_ext + 1 {
                let units = timestamp.wrapping_sub(prev_ts);
                // Plausible packet lengths only: 5 ms up to 200 ms.
                let rate = self.cfg.clock_rate.max(1);
                if units >= rate / 200 && units <= rate / 5 {
                    self.packet = Duration::from_secs_f64(f64::from(units) / f64::from(rate));
                }
            }
        }
        if self.newest.is_none_or(|(n, _)| ext > n) {
            self.newest = Some((ext, timestamp));
        }
        self.highest = Some(self.highest.map_or(ext, |h| h.max(ext)));
        self.base = Some(self.base.map_or(ext, |b| b.min(ext)));
        self.frames.insert(ext, (arrival, payload));
        // Keep the delay bounded: drop the oldest frames beyond the maximum.
        let max_frames = self.frames_for(self.cfg.max_delay).max(1);
        while self.frames.len() > max_frames {
            if let Some((dropped, _)) = self.frames.pop_first() {
                self.stats.overflow_dropped += 1;
                if self.next.is_some() {
                    self.next = Some(dropped + 1);
                }
            }
        }
    }

    fn update_jitter(&mut self, arrival: Instant, timestamp: u32) {
        if let Some((prev_arrival, prev_ts)) = self.last_transit {
            // D = (Rj - Ri) - (Sj - Si), in timestamp units.
            let arrival_delta = if arrival >= prev_arrival {
                (arrival - prev_arrival).as_secs_f64()
            } else {
                -(prev_arrival - arrival).as_secs_f64()
            };
            let arrival_units = arrival_delta * f64::from(self.cfg.clock_rate);
            let send_units = f64::from(timestamp.wrapping_sub(prev_ts) as i32);
            let d = (arrival_units - send_units).abs().min(f64::from(u32::MAX)) as u64;
            // J += (|D| - J) / 16, kept as J*16 in integers (A.8).
            self.jitter_q4 = self.jitter_q4 + d - ((self.jitter_q4 + 8) >> 4);
        }
        self.last_transit = Some((arrival, timestamp));
    }

    fn jitter(&self) -> Duration {
        let units = (self.jitter_q4 >> 4) as f64;
        Duration::from_secs_f64(units / f64::from(self.cfg.clock_rate.max(1)))
    }

    /// The playout delay aimed for: twice the jitter plus a packet, bounded.
    pub fn target_delay(&self) -> Duration {
        (self.jitter() * 2 + self.packet).clamp(self.cfg.min_delay, self.cfg.max_delay)
    }

    /// How many packets make up `d`.
    fn frames_for(&self, d: Duration) -> usize {
        let packet = self.packet.as_nanos().max(1);
        d.as_nanos().div_ceil(packet) as usize
    }

    /// One playout tick.
    pub fn pop(&mut self) -> Playout<T> {
        let Some(next) = self.next else {
            // Start once the target depth is buffered, or once the first
            // frame has waited the target delay (a short talk spurt).
            let target = self.frames_for(self.target_delay()).max(1);
            if let Some((&first, _)) = self.frames.first_key_value() {
                self.waited += 1;
                if self.frames.len() >= target || self.waited >= target {
                    self.next = Some(first);
                    self.waited = 0;
                    return self.pop();
                }
            }
            return Playout::Buffering;
        };
        // Above target (jitter went down, or a burst came in): skip one stale
        // frame per tick so latency shrinks without an audible jump.
        let target_frames = self.frames_for(self.target_delay()).max(1);
        if self.frames.len() > target_frames * 2 {
            if let Some((dropped, _)) = self.frames.pop_first() {
                self.stats.overflow_dropped += 1;
                self.next = Some(dropped + 1);
                return self.pop();
            }
        }
        match self.frames.remove(&next) {
            Some((arrival, frame)) => {
                self.played_arrival = Some(arrival);
                self.next = Some(next + 1);
                self.misses = 0;
                self.held = false;
                self.stats.played += 1;
                Playout::Frame(frame)
            }
            None if self.frames.is_empty() => {
                // Underrun: conceal, but hold the position, so a packet that is
                // merely late still plays (one frame later) instead of being
                // dropped; the delay grows by a frame only when needed.
                self.misses += 1;
                if self.misses > MAX_MISSES {
                    self.next = None;
                    self.misses = 0;
                    self.held = false;
                    return Playout::Buffering;
                }
                self.held = true;
                self.stats.concealed += 1;
                Playout::Lost
            }
            None if self.held => {
                // Already concealed while waiting for it, and later frames are
                // here: it is lost. A codec with FEC rebuilds it from the next
                // packet in this tick (the delay grows by it); otherwise the
                // next one plays now.
                self.held = false;
                self.next = Some(next + 1);
                if self.cfg.wait_for_fec {
                    self.stats.concealed += 1;
                    Playout::Lost
                } else {
                    self.pop()
                }
            }
            None => {
                self.next = Some(next + 1);
                self.misses += 1;
                self.stats.concealed += 1;
                Playout::Lost
            }
        }
    }

    /// When the packet of the last [`Playout::Frame`] arrived: its time on
    /// the wire, before its wait here.
    pub fn played_arrival(&self) -> Option<Instant> {
        self.played_arrival
    }

    /// The frame the next `pop` plays, if it is here. Right after a `Lost`
    /// it is the packet that follows the lost one, which carries Opus's
    /// in-band copy of the lost audio.
    pub fn peek(&self) -> Option<&T> {
        self.next.and_then(|n| self.frames.get(&n)).map(|(_, frame)| frame)
    }

    /// Drops everything buffered (e.g. on a codec change or resume).
    pub fn reset(&mut self) {
        self.frames.clear();
        self.next = None;
        self.misses = 0;
        self.waited = 0;
        self.held = false;
    }

    pub fn stats(&self) -> JitterStats {
        let expected = match (self.base, self.highest) {
            (Some(b), Some(h)) => h - b + 1,
            _ => 0,
        };
        let lost = expected.saturating_sub(self.stats.received);
        JitterStats {
            lost,
            loss_percent: if expected == 0 { 0.0 } else { lost as f64 * 100.0 / expected as f64 },
            jitter_ms: self.jitter().as_secs_f64() * 1000.0,
            target_delay_ms: self.target_delay().as_millis() as u32,
            depth_frames: self.frames.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FRAME: Duration = Duration::from_millis(20);

    /// Drives the buffer as a call does: at each 20 ms tick, the packets
    /// that arrive in that tick are pushed, then one frame is popped.
    /// `packets` are (sequence number, send tick, arrival tick); the RTP
    /// timestamp follows the send tick and the payload is the sequence number.
    fn simulate(jb: &mut JitterBuffer<u16>, packets: &[(u16, usize, usize)], ticks: usize) -> Vec<Playout<u16>> {
        let t0 = Instant::now();
        let mut out = Vec::new();
        for tick in 0..ticks {
            for (seq, sent, _) in packets.iter().filter(|p| p.2 == tick) {
                jb.push(*seq, *sent as u32 * 160, t0 + FRAME * tick as u32, *seq);
            }
            out.push(jb.pop());
        }
        out
    }

    fn on_time(seqs: impl Iterator<Item = u16>) -> Vec<(u16, usize, usize)> {
        seqs.enumerate().map(|(i, s)| (s, i, i)).collect()
    }

    fn frames(out: &[Playout<u16>]) -> Vec<u16> {
        out.iter().filter_map(|p| if let Playout::Frame(f) = p { Some(*f) } else { None }).collect()
    }

    #[test]
    fn in_order_stream_plays_in_order_after_the_minimum_delay() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let out = simulate(&mut jb, &on_time(0..50u16), 55);
        assert_eq!(out[0], Playout::Frame(0), "20 ms minimum delay: the first tick plays");
        assert_eq!(frames(&out), (0..50).collect::<Vec<_>>());
        let s = jb.stats();
        assert_eq!((s.lost, s.late, s.duplicates, s.out_of_order), (0, 0, 0, 0));
        assert!(s.jitter_ms < 0.5, "{s:?}");
        assert_eq!(s.target_delay_ms, 20);
    }

    #[test]
    fn sequence_numbers_wrap_around() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let packets = on_time((0..20u32).map(|i| (65530 + i) as u16));
        let out = frames(&simulate(&mut jb, &packets, 25));
        assert_eq!(out, packets.iter().map(|p| p.0).collect::<Vec<_>>());
        assert_eq!(jb.stats().lost, 0);
    }

    #[test]
    fn a_missing_packet_is_concealed_and_a_late_one_dropped() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        // Packet 3 arrives 4 ticks late, after its turn.
        let packets = [(0, 0, 0), (1, 1, 1), (2, 2, 2), (4, 4, 4), (5, 5, 5), (3, 3, 7)];
        let out = simulate(&mut jb, &packets, 8);
        assert_eq!(&out[..6], &[Playout::Frame(0), Playout::Frame(1), Playout::Frame(2), Playout::Lost, Playout::Frame(4), Playout::Frame(5)]);
        let s = jb.stats();
        assert_eq!((s.concealed, s.late, s.lost), (1 + 2, 1, 1), "{s:?}");
        assert_eq!(s.out_of_order, 1, "packet 3 came after 5");
    }

    #[test]
    fn after_a_lost_packet_peek_shows_the_one_that_follows_it() {
        let mut jb = JitterBuffer::new(JitterConfig { min_delay: Duration::from_millis(60), ..JitterConfig::default() });
        let t0 = Instant::now();
        for seq in [0u16, 1, 3, 4] {
            jb.push(seq, u32::from(seq) * 160, t0, seq);
        }
        assert_eq!(jb.peek(), None, "buffering: nothing is due yet");
        assert_eq!((jb.pop(), jb.pop()), (Playout::Frame(0), Playout::Frame(1)));
        assert_eq!(jb.peek(), None, "packet 2 never came");
        assert_eq!(jb.pop(), Playout::Lost);
        assert_eq!(jb.peek(), Some(&3));
        assert_eq!(jb.pop(), Playout::Frame(3), "peeking takes nothing");
    }

    #[test]
    fn with_fec_a_packet_lost_on_a_shallow_buffer_is_still_rebuilt_and_the_buffer_deepens() {
        let mut jb = JitterBuffer::new(JitterConfig { wait_for_fec: true, ..JitterConfig::default() });
        // 20 ms deep: packet 3 is missed in its tick before 4 comes, then
        // packet 7 is lost too.
        let packets: Vec<_> = (0..12u16).filter(|s| *s != 3 && *s != 7).map(|s| (s, usize::from(s), usize::from(s))).collect();
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut peeked = Vec::new();
        for tick in 0..14 {
            for (seq, sent, _) in packets.iter().filter(|p| p.2 == tick) {
                jb.push(*seq, *sent as u32 * 160, t0 + FRAME * tick as u32, *seq);
            }
            let p = jb.pop();
            if p == Playout::Lost {
                peeked.push(jb.peek().copied());
            }
            out.push(p);
        }
        assert_eq!(frames(&out), [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]);
        // Packet 3: concealed while nothing followed it, then rebuilt from 4
        // a tick late; packet 7: rebuilt in its own tick, 8 being there.
        assert_eq!(peeked, [None, Some(4), Some(8), None], "the last is the end of the stream");
        assert_eq!(&out[3..6], &[Playout::Lost, Playout::Lost, Playout::Frame(4)]);
    }

    #[test]
    fn a_packet_that_slips_behind_its_tick_is_played_late_not_dropped() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        // From packet 5 on, every packet arrives one tick later than before.
        let packets: Vec<_> = (0..20u16).map(|i| (i, usize::from(i), usize::from(i) + usize::from(i >= 5))).collect();
        let out = simulate(&mut jb, &packets, 25);
        assert_eq!(frames(&out), (0..20).collect::<Vec<_>>());
        let s = jb.stats();
        assert_eq!((s.late, s.lost, s.concealed), (0, 0, 1 + 4), "one tick stretched, then the tail after the last packet: {s:?}");
    }

    #[test]
    fn each_frame_played_tells_when_its_packet_arrived() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let t0 = Instant::now();
        assert_eq!(jb.played_arrival(), None);
        // Packets 0 and 1 arrive together (a burst) at tick 0, packet 2 at
        // tick 3 (late: tick 2 is concealed while waiting for it).
        jb.push(0, 0, t0, 0u16);
        jb.push(1, 160, t0 + Duration::from_millis(1), 1);
        let mut played = Vec::new();
        for tick in 0..4u32 {
            if tick == 3 {
                jb.push(2, 320, t0 + FRAME * 3, 2);
            }
            if let Playout::Frame(f) = jb.pop() {
                played.push((f, jb.played_arrival().unwrap() - t0));
            }
        }
        assert_eq!(played, [(0, Duration::ZERO), (1, Duration::from_millis(1)), (2, FRAME * 3)]);
    }

    #[test]
    fn a_long_silence_rebuffers_instead_of_concealing_forever() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let mut packets = on_time(0..5u16);
        packets.extend((5..10u16).map(|i| (i, usize::from(i) + 100, usize::from(i) + 100)));
        let out = simulate(&mut jb, &packets, 120);
        assert!(out[20..100].iter().all(|p| *p == Playout::Buffering));
        assert_eq!(frames(&out), (0..10).collect::<Vec<_>>());
    }

    proptest! {
        /// Reordered (by up to 3 packets), duplicated and lost packets:
        /// every received frame plays once, in order, and the counters add up.
        #[test]
        fn reorder_duplicate_and_loss_keep_order_and_counts(
            n in 5usize..200,
            delays in proptest::collection::vec(0usize..4, 200),
            dups in proptest::collection::vec(0usize..200, 0..20),
            drops in proptest::collection::btree_set(1usize..200, 0..20),
        ) {
            let cfg = JitterConfig { min_delay: Duration::from_millis(100), ..JitterConfig::default() };
            let mut jb = JitterBuffer::new(cfg);
            let mut packets: Vec<(u16, usize, usize)> = (0..n)
                .filter(|i| !drops.contains(i) || *i == n - 1)
                .map(|i| (i as u16, i, i + delays[i]))
                .collect();
            let dup_count = dups.len() as u64;
            for d in dups {
                let (seq, sent, at) = packets[d % packets.len()];
                packets.push((seq, sent, at + 1));
            }
            let out = simulate(&mut jb, &packets, n + 20);
            let expected: Vec<u16> = packets.iter().map(|p| p.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            prop_assert_eq!(frames(&out), expected.clone());
            let s = jb.stats();
            prop_assert_eq!(s.received as usize, expected.len());
            prop_assert_eq!(s.late + s.duplicates, dup_count, "every copy is dropped as a duplicate or as late");
            let missing = n - expected.len();
            prop_assert_eq!(s.lost as usize, missing);
            prop_assert!(s.concealed as usize >= missing);
        }

        /// Jittery arrival raises the target delay, within its bounds.
        #[test]
        fn target_delay_follows_jitter_within_bounds(spread_ms in 0u64..400) {
            let t0 = Instant::now();
            let mut jb = JitterBuffer::new(JitterConfig::default());
            for i in 0..200u64 {
                let wobble = if i % 2 == 0 { 0 } else { spread_ms };
                jb.push(i as u16, i as u32 * 160, t0 + Duration::from_millis(20 * i + wobble), i);
                let _ = jb.pop();
            }
            let target = jb.target_delay();
            prop_assert!(target >= Duration::from_millis(20) && target <= Duration::from_millis(200));
            if spread_ms >= 100 {
                prop_assert_eq!(target, Duration::from_millis(200));
            }
            if spread_ms == 0 {
                prop_assert_eq!(target, Duration::from_millis(20));
            }
        }
    }
}
