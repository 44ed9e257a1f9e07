//! SDP offer/answer for telephone calls (RFC 3264 over RFC 4566): one audio
//! stream, PCMU (0), PCMA (8), opus/48000/2 and telephone-event/8000, 20 ms
//! packets.
//!
//! Parsing uses the `sdp` crate; this module decides what an offer says, which
//! codec an answer chose, where to send RTP and RTCP (`c=` at media or session
//! level, `a=rtcp`), and the stream's direction (hold is `sendonly` or
//! `inactive`, RFC 3264 §8.4).

use std::fmt::Write as _;
use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};

use sdp::description::media::MediaDescription;
use sdp::SessionDescription;

use crate::error::MediaError;

/// Audio codecs voxgate speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Pcmu,
    Pcma,
    Opus,
}

impl Codec {
    /// The payload type voxgate offers for it.
    pub fn default_payload_type(self) -> u8 {
        match self {
            Codec::Pcmu => 0,
            Codec::Pcma => 8,
            Codec::Opus => 111,
        }
    }

    pub fn clock_rate(self) -> u32 {
        match self {
            Codec::Pcmu | Codec::Pcma => 8000,
            Codec::Opus => 48000,
        }
    }

    fn rtpmap(self) -> &'static str {
        match self {
            Codec::Pcmu => "PCMU/8000",
            Codec::Pcma => "PCMA/8000",
            Codec::Opus => "opus/48000/2",
        }
    }

    /// From an `a=rtpmap` encoding name and rate, or a static payload type.
    fn from_rtpmap(name: &str, rate: u32) -> Option<Codec> {
        match (name.to_ascii_lowercase().as_str(), rate) {
            ("pcmu", 8000) => Some(Codec::Pcmu),
            ("pcma", 8000) => Some(Codec::Pcma),
            ("opus", 48000) => Some(Codec::Opus),
            _ => None,
        }
    }

    fn from_static(pt: u8) -> Option<Codec> {
        match pt {
            0 => Some(Codec::Pcmu),
            8 => Some(Codec::Pcma),
            _ => None,
        }
    }
}

pub const TELEPHONE_EVENT_PT: u8 = 101;

/// RFC 3264 §5.1 stream direction, from our point of view once negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    fn attr(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    /// The direction to answer with when the peer offered `self`.
    pub fn reversed(self) -> Direction {
        match self {
            Direction::SendOnly => Direction::RecvOnly,
            Direction::RecvOnly => Direction::SendOnly,
            d => d,
        }
    }

    pub fn we_send(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    pub fn we_receive(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }
}

/// What the far end's SDP says about its audio stream.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteMedia {
    /// Where to send RTP (None when the port is 0 or the address is 0.0.0.0: no media).
    pub rtp: Option<SocketAddr>,
    /// Where to send RTCP (`a=rtcp`, else RTP port + 1).
    pub rtcp: Option<SocketAddr>,
    /// The chosen codec and its payload type in this session.
    pub codec: Codec,
    pub payload_type: u8,
    /// The telephone-event payload type, when the far end supports RFC 4733.
    pub dtmf_payload_type: Option<u8>,
    /// The far end's direction attribute, as written (its point of view).
    pub direction: Direction,
    pub ptime_ms: u32,
}

/// Our side: where we receive and what we accept, in order of preference.
#[derive(Debug, Clone)]
pub struct LocalMedia {
    pub ip: IpAddr,
    pub rtp_port: u16,
    pub codecs: Vec<Codec>,
    pub session_id: u64,
    pub session_version: u64,
    pub direction: Direction,
}

fn write_sdp(local: &LocalMedia, codecs: &[(Codec, u8)], dtmf_pt: Option<u8>, direction: Direction) -> String {
    let ip_ver = if local.ip.is_ipv4() { "IP4" } else { "IP6" };
    let mut pts: Vec<String> = codecs.iter().map(|(_, pt)| pt.to_string()).collect();
    pts.extend(dtmf_pt.map(|p| p.to_string()));
    let mut s = String::new();
    // RFC 4566 field order: v, o, s, c, t, m, then media attributes.
    let _ = write!(
        s,
        "v=0\r\no=voxgate {} {} IN {ip_ver} {ip}\r\ns=voxgate\r\nc=IN {ip_ver} {ip}\r\nt=0 0\r\nm=audio {} RTP/AVP {}\r\n",
        local.session_id,
        local.session_version,
        local.rtp_port,
        pts.join(" "),
        ip = local.ip,
    );
    for (codec, pt) in codecs {
        let _ = write!(s, "a=rtpmap:{pt} {}\r\n", codec.rtpmap());
        if *codec == Codec::Opus {
            let _ = write!(s, "a=fmtp:{pt} useinbandfec=1;minptime=20\r\n");
        }
    }
    if let Some(pt) = dtmf_pt {
        let _ = write!(s, "a=rtpmap:{pt} telephone-event/8000\r\na=fmtp:{pt} 0-15\r\n");
    }
    let _ = write!(s, "a=ptime:20\r\na=rtcp:{}\r\na={}\r\n", u32::from(local.rtp_port) + 1, direction.attr());
    s
}

/// Our offer: every local codec with its default payload type, plus DTMF.
pub fn offer(local: &LocalMedia) -> String {
    let codecs: Vec<(Codec, u8)> = local.codecs.iter().map(|c| (*c, c.default_payload_type())).collect();
    write_sdp(local, &codecs, Some(TELEPHONE_EVENT_PT), local.direction)
}

/// Reads the far end's answer to our offer.
pub fn parse_answer(sdp: &str, local: &LocalMedia) -> Result<RemoteMedia, MediaError> {
    remote_media(sdp, &local.codecs)
}

/// Answers an offer (an inbound INVITE or a re-INVITE): picks the first of
/// the offerer's codecs that we support (the offerer's preference, §6.1),
/// and mirrors the direction (hold stays hold).
pub fn answer(offer_sdp: &str, local: &LocalMedia) -> Result<(String, RemoteMedia), MediaError> {
    let remote = remote_media(offer_sdp, &local.codecs)?;
    let direction = match (remote.direction.reversed(), local.direction) {
        (_, Direction::Inactive) | (Direction::Inactive, _) => Direction::Inactive,
        (d, Direction::SendRecv) => d,
        (Direction::SendRecv, ours) => ours,
        (theirs, ours) if theirs == ours => ours,
        _ => Direction::Inactive,
    };
    let sdp = write_sdp(local, &[(remote.codec, remote.payload_type)], remote.dtmf_payload_type, direction);
    Ok((sdp, remote))
}

fn parse(sdp: &str) -> Result<SessionDescription, MediaError> {
    // The parser wants CRLF or LF consistently and a final newline.
    let mut text = sdp.replace("\r\n", "\n");
    if !text.ends_with('\n') {
        text.push('\n');
    }
    SessionDescription::unmarshal(&mut Cursor::new(text.into_bytes())).map_err(|e| MediaError::Sdp(e.to_string()))
}

fn attr<'a>(m: &'a MediaDescription, key: &str) -> impl Iterator<Item = &'a str> {
    let key = key.to_owned();
    m.attributes.iter().filter(move |a| a.key == key).filter_map(|a| a.value.as_deref())
}

fn remote_media(sdp: &str, supported: &[Codec]) -> Result<RemoteMedia, MediaError> {
    let session = parse(sdp)?;
    let audio = session
        .media_descriptions
        .iter()
        .find(|m| m.media_name.media == "audio")
        .ok_or_else(|| MediaError::Sdp("no audio stream (m=audio)".into()))?;
    if !audio.media_name.protos.iter().any(|p| p == "RTP") || !audio.media_name.protos.iter().any(|p| p == "AVP") {
        return Err(MediaError::Sdp(format!("unsupported transport {}", audio.media_name.protos.join("/"))));
    }
    // rtpmap: pt -> (name, rate)
    let mut rtpmap = std::collections::HashMap::new();
    for v in attr(audio, "rtpmap") {
        if let Some((pt, enc)) = v.split_once(' ') {
            let mut parts = enc.split('/');
            let name = parts.next().unwrap_or_default().to_owned();
            let rate = parts.next().and_then(|r| r.parse::<u32>().ok()).unwrap_or(0);
            if let Ok(pt) = pt.parse::<u8>() {
                rtpmap.insert(pt, (name, rate));
            }
        }
    }
    let formats: Vec<u8> = audio.media_name.formats.iter().filter_map(|f| f.parse().ok()).collect();
    let codec_of = |pt: u8| match rtpmap.get(&pt) {
        Some((name, rate)) => Codec::from_rtpmap(name, *rate),
        None => Codec::from_static(pt),
    };
    let chosen = formats
        .iter()
        .find_map(|pt| codec_of(*pt).filter(|c| supported.contains(c)).map(|c| (c, *pt)))
        .ok_or_else(|| MediaError::NoCommonCodec {
            offered: formats
                .iter()
                .map(|pt| rtpmap.get(pt).map_or(pt.to_string(), |(n, r)| format!("{n}/{r}")))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let dtmf_payload_type = formats.iter().copied().find(|pt| {
        rtpmap.get(pt).is_some_and(|(n, r)| n.eq_ignore_ascii_case("telephone-event") && *r == 8000)
    });
    let conn = audio.connection_information.as_ref().or(session.connection_information.as_ref());
    let ip: Option<IpAddr> = conn.and_then(|c| c.address.as_ref()).and_then(|a| a.address.parse().ok());
    let port = u16::try_from(audio.media_name.port.value).map_err(|_| MediaError::Sdp("media port out of range".into()))?;
    let rtp = match ip {
        Some(ip) if port != 0 && !ip.is_unspecified() => Some(SocketAddr::new(ip, port)),
        Some(_) => None,
        None => return Err(MediaError::Sdp("no connection address (c=)".into())),
    };
    // a=rtcp:port [IN IP4 addr] (RFC 3605)
    let rtcp = match attr(audio, "rtcp").next() {
        Some(v) => {
            let mut parts = v.split_whitespace();
            let port: Option<u16> = parts.next().and_then(|p| p.parse().ok());
            let addr: Option<IpAddr> = parts.nth(2).and_then(|a| a.parse().ok());
            match (port, addr.or(rtp.map(|r| r.ip()))) {
                (Some(p), Some(ip)) => Some(SocketAddr::new(ip, p)),
                _ => None,
            }
        }
        None => rtp.map(|r| SocketAddr::new(r.ip(), r.port().saturating_add(1))),
    };
    let direction_of = |m: &MediaDescription| {
        ["sendonly", "recvonly", "inactive", "sendrecv"].into_iter().find(|d| m.attributes.iter().any(|a| a.key == *d))
    };
    let direction = match direction_of(audio).or_else(|| {
        ["sendonly", "recvonly", "inactive", "sendrecv"].into_iter().find(|d| session.attributes.iter().any(|a| a.key == *d))
    }) {
        Some("sendonly") => Direction::SendOnly,
        Some("recvonly") => Direction::RecvOnly,
        Some("inactive") => Direction::Inactive,
        _ => Direction::SendRecv,
    };
    let ptime_ms = attr(audio, "ptime").next().and_then(|p| p.trim().parse().ok()).unwrap_or(20);
    Ok(RemoteMedia { rtp, rtcp, codec: chosen.0, payload_type: chosen.1, dtmf_payload_type, direction, ptime_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn local() -> LocalMedia {
        LocalMedia {
            ip: "127.0.0.1".parse().unwrap(),
            rtp_port: 20000,
            codecs: vec![Codec::Pcmu, Codec::Pcma, Codec::Opus],
            session_id: 42,
            session_version: 1,
            direction: Direction::SendRecv,
        }
    }

    /// SIPp's uas scenario answer, verbatim shape.
    const SIPP_ANSWER: &str = "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

    #[test]
    fn our_offer_lists_every_codec_and_dtmf() {
        let o = offer(&local());
        assert!(o.contains("m=audio 20000 RTP/AVP 0 8 111 101\r\n"), "{o}");
        for line in ["a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000", "a=rtpmap:111 opus/48000/2", "a=rtpmap:101 telephone-event/8000", "a=ptime:20", "a=rtcp:20001", "a=sendrecv", "c=IN IP4 127.0.0.1"] {
            assert!(o.contains(line), "{line} missing in {o}");
        }
        // Our own parser reads it back.
        let r = remote_media(&o, &[Codec::Pcmu]).unwrap();
        assert_eq!((r.codec, r.payload_type, r.dtmf_payload_type), (Codec::Pcmu, 0, Some(101)));
    }

    #[test]
    fn reads_a_sipp_answer() {
        let r = parse_answer(SIPP_ANSWER, &local()).unwrap();
        assert_eq!(r.rtp, Some("127.0.0.1:6000".parse().unwrap()));
        assert_eq!(r.rtcp, Some("127.0.0.1:6001".parse().unwrap()));
        assert_eq!((r.codec, r.payload_type, r.dtmf_payload_type, r.direction, r.ptime_ms), (Codec::Pcmu, 0, None, Direction::SendRecv, 20));
    }

    #[test]
    fn dynamic_payload_types_media_level_connection_and_rtcp_attribute() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 7078 RTP/AVP 96 97\r\nc=IN IP4 192.0.2.7\r\na=rtpmap:96 opus/48000/2\r\na=rtpmap:97 telephone-event/8000\r\na=rtcp:9000 IN IP4 192.0.2.8\r\na=ptime:40\r\na=sendonly\r\n";
        let r = parse_answer(sdp, &local()).unwrap();
        assert_eq!((r.codec, r.payload_type, r.dtmf_payload_type), (Codec::Opus, 96, Some(97)));
        assert_eq!(r.rtp, Some("192.0.2.7:7078".parse().unwrap()));
        assert_eq!(r.rtcp, Some("192.0.2.8:9000".parse().unwrap()));
        assert_eq!((r.direction, r.ptime_ms), (Direction::SendOnly, 40));
    }

    #[test]
    fn answering_a_hold_offer_mirrors_it() {
        let hold = SIPP_ANSWER.replace("a=rtpmap:0 PCMU/8000\r\n", "a=rtpmap:0 PCMU/8000\r\na=sendonly\r\n");
        let (sdp, r) = answer(&hold, &local()).unwrap();
        assert_eq!(r.direction, Direction::SendOnly);
        assert!(sdp.contains("a=recvonly"), "{sdp}");
        assert!(sdp.contains("m=audio 20000 RTP/AVP 0\r\n"), "only the chosen codec: {sdp}");
        let inactive = SIPP_ANSWER.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0");
        let (_, r) = answer(&inactive, &local()).unwrap();
        assert_eq!(r.rtp, None, "0.0.0.0 means no media (RFC 3264 §8.4)");
    }

    #[test]
    fn unsupported_answers_are_refused_clearly() {
        let g729 = SIPP_ANSWER.replace("RTP/AVP 0", "RTP/AVP 18").replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:18 G729/8000");
        let err = parse_answer(&g729, &local()).unwrap_err().to_string();
        assert!(err.contains("G729/8000"), "{err}");
        let srtp = SIPP_ANSWER.replace("RTP/AVP", "RTP/SAVP");
        assert!(parse_answer(&srtp, &local()).unwrap_err().to_string().contains("transport"));
        let video = SIPP_ANSWER.replace("m=audio", "m=video");
        assert!(parse_answer(&video, &local()).unwrap_err().to_string().contains("audio"));
        assert!(parse_answer("garbage", &local()).is_err());
        let no_c = SIPP_ANSWER.replace("c=IN IP4 127.0.0.1\r\n", "");
        assert!(parse_answer(&no_c, &local()).unwrap_err().to_string().contains("c="));
    }

    proptest! {
        /// Arbitrary input never panics the parser.
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
            let _ = parse_answer(&s, &local());
        }

        /// Arbitrary lines inside an otherwise valid SDP never panic.
        #[test]
        fn mutated_sdp_never_panics(extra in "[a-z]=[ -~]{0,60}", port in any::<u32>(), pts in "[0-9 ]{0,20}") {
            let sdp = format!("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\nm=audio {port} RTP/AVP {pts}\r\n{extra}\r\n");
            let _ = parse_answer(&sdp, &local());
        }
    }
}
