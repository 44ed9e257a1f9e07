//! Digest algorithm names on the wire, between trunks and rsipstack.
//!
//! rsipstack computes MD5 and SHA-256 digests (and answers the challenge),
//! but spells SHA-256 `SHA256`, where RFC 7616 §6.1 and RFC 8760 (its use in
//! SIP) register `SHA-256`. Left alone, a trunk that challenges with
//! `algorithm=SHA-256` fails the call (rsipstack cannot parse the
//! challenge), and a strict one would refuse `algorithm=SHA256` in our
//! credentials. This inspector translates at the edge: challenges coming in,
//! credentials going out. It does not touch the digest itself: the algorithm
//! name is not part of the hashed values.
//!
//! A server may offer one challenge per algorithm, preferred first (RFC 8760
//! §2.4); rsipstack answers the first it finds, so of several challenges of
//! one kind only the first we can compute is kept. `SHA-512-256` is not
//! offered to rsipstack: its `SHA512` is the untruncated SHA-512, a
//! different hash.
//!
//! This does not own the digest computation (rsipstack does) nor the
//! credentials (the trunk config).

use rsipstack::sip::{Header, Headers, SipMessage};
use rsipstack::transaction::endpoint::MessageInspector;
use rsipstack::transport::SipAddr;

/// Translates digest algorithm names between RFC 7616 and rsipstack.
pub(crate) struct DigestAlgorithms;

impl MessageInspector for DigestAlgorithms {
    fn before_send(&self, mut msg: SipMessage, _dest: Option<&SipAddr>) -> SipMessage {
        if let SipMessage::Request(req) = &mut msg {
            for header in req.headers.iter_mut() {
                match header {
                    Header::Authorization(h) => {
                        let wire = to_wire(h.value());
                        h.replace(wire);
                    }
                    Header::ProxyAuthorization(h) => {
                        let wire = to_wire(h.value());
                        h.replace(wire);
                    }
                    _ => {}
                }
            }
        }
        msg
    }

    fn after_received(&self, mut msg: SipMessage, _from: Option<&SipAddr>) -> SipMessage {
        if let SipMessage::Response(resp) = &mut msg {
            if matches!(resp.status_code.code(), 401 | 407) {
                keep_computable_challenges(&mut resp.headers);
            }
        }
        msg
    }
}

/// The `algorithm` parameter of a Digest header value, if any.
fn algorithm(value: &str) -> Option<&str> {
    value.split(',').find_map(|part| {
        let (name, v) = part.split_once('=')?;
        let name = name.trim();
        let name = name.rsplit(char::is_whitespace).next().unwrap_or(name);
        name.eq_ignore_ascii_case("algorithm").then(|| v.trim().trim_matches('"'))
    })
}

/// `value` with its `algorithm` parameter replaced by `to`.
fn with_algorithm(value: &str, to: &str) -> String {
    value
        .split(',')
        .map(|part| match part.split_once('=') {
            Some((name, _)) if name.trim().rsplit(char::is_whitespace).next().is_some_and(|n| n.eq_ignore_ascii_case("algorithm")) => {
                format!("{name}={to}")
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// rsipstack's name for an algorithm it can compute, from any spelling;
/// `None` when it cannot.
fn stack_name(algorithm: &str) -> Option<&'static str> {
    let upper = algorithm.to_ascii_uppercase();
    match upper.as_str() {
        "MD5" => Some("MD5"),
        "MD5-SESS" => Some("MD5-sess"),
        "SHA-256" | "SHA256" => Some("SHA256"),
        "SHA-256-SESS" | "SHA256-SESS" => Some("SHA256-sess"),
        _ => None,
    }
}

/// A challenge as rsipstack reads it, or `None` when it names an algorithm
/// rsipstack cannot compute. No algorithm means MD5 (RFC 2617).
fn to_stack(value: &str) -> Option<String> {
    match algorithm(value) {
        None => Some(value.to_string()),
        Some(a) => stack_name(a).map(|name| with_algorithm(value, name)),
    }
}

/// Credentials as RFC 7616 spells them.
fn to_wire(value: &str) -> String {
    match algorithm(value).map(|a| a.to_ascii_uppercase()) {
        Some(a) if a == "SHA256" => with_algorithm(value, "SHA-256"),
        Some(a) if a == "SHA256-SESS" => with_algorithm(value, "SHA-256-sess"),
        _ => value.to_string(),
    }
}

/// Of the WWW-Authenticate challenges, and of the Proxy-Authenticate ones,
/// keeps the first rsipstack can answer, renamed for it. A kind with none
/// it can answer is left as it came (the call fails with the server's code).
fn keep_computable_challenges(headers: &mut Headers) {
    let mut www_kept = false;
    let mut proxy_kept = false;
    let www_any = headers.iter().any(|h| matches!(h, Header::WwwAuthenticate(v) if to_stack(v.value()).is_some()));
    let proxy_any = headers.iter().any(|h| matches!(h, Header::ProxyAuthenticate(v) if to_stack(v.value()).is_some()));
    headers.retain(|h| match h {
        Header::WwwAuthenticate(v) if www_any => {
            let keep = !www_kept && to_stack(v.value()).is_some();
            www_kept |= keep;
            keep
        }
        Header::ProxyAuthenticate(v) if proxy_any => {
            let keep = !proxy_kept && to_stack(v.value()).is_some();
            proxy_kept |= keep;
            keep
        }
        _ => true,
    });
    for header in headers.iter_mut() {
        match header {
            Header::WwwAuthenticate(h) => {
                if let Some(v) = to_stack(h.value()) {
                    h.replace(v);
                }
            }
            Header::ProxyAuthenticate(h) => {
                if let Some(v) = to_stack(h.value()) {
                    h.replace(v);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsipstack::sip::headers::{ProxyAuthenticate, WwwAuthenticate};

    const SHA: &str = r#"Digest realm="voxgate.test", nonce="abc", qop="auth", algorithm=SHA-256"#;
    const MD5: &str = r#"Digest realm="voxgate.test", nonce="abc", qop="auth", algorithm=MD5"#;
    const SHA512_256: &str = r#"Digest realm="voxgate.test", nonce="abc", qop="auth", algorithm=SHA-512-256"#;

    fn values(headers: &Headers) -> Vec<String> {
        headers.iter().map(|h| format!("{}: {}", h.name(), h.value())).collect()
    }

    #[test]
    fn a_sha256_challenge_is_renamed_for_the_stack_and_parses() {
        let mut headers = Headers(vec![WwwAuthenticate::new(SHA).into()]);
        keep_computable_challenges(&mut headers);
        let Some(Header::WwwAuthenticate(h)) = headers.iter().next() else { panic!("{:?}", values(&headers)) };
        let typed: rsipstack::sip::typed::WwwAuthenticate = h.clone().try_into().expect("rsipstack parses it");
        assert_eq!(typed.algorithm, Some(rsipstack::sip::headers::auth::Algorithm::Sha256));
    }

    #[test]
    fn the_first_computable_challenge_of_each_kind_is_kept() {
        let mut headers = Headers(vec![
            WwwAuthenticate::new(SHA512_256).into(),
            WwwAuthenticate::new(SHA).into(),
            WwwAuthenticate::new(MD5).into(),
            ProxyAuthenticate::new(MD5).into(),
        ]);
        keep_computable_challenges(&mut headers);
        let kept = values(&headers);
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept[0].starts_with("WWW-Authenticate") && kept[0].ends_with("algorithm=SHA256"), "{kept:?}");
        assert!(kept[1].starts_with("Proxy-Authenticate") && kept[1].ends_with("algorithm=MD5"), "{kept:?}");
    }

    #[test]
    fn only_uncomputable_challenges_are_left_as_they_came() {
        let mut headers = Headers(vec![WwwAuthenticate::new(SHA512_256).into()]);
        keep_computable_challenges(&mut headers);
        assert_eq!(values(&headers), vec![format!("WWW-Authenticate: {SHA512_256}")]);
    }

    #[test]
    fn no_algorithm_means_md5_and_is_kept() {
        let bare = r#"Digest realm="r", nonce="n""#;
        let mut headers = Headers(vec![WwwAuthenticate::new(bare).into()]);
        keep_computable_challenges(&mut headers);
        assert_eq!(values(&headers), vec![format!("WWW-Authenticate: {bare}")]);
    }

    #[test]
    fn credentials_go_out_spelled_as_rfc_7616_registers() {
        let creds = r#"Digest username="alice",realm="r",nonce="n",uri="sip:x@y",response="00",algorithm=SHA256,qop=auth,nc=00000001,cnonce="c""#;
        let wire = to_wire(creds);
        assert_eq!(algorithm(&wire), Some("SHA-256"));
        assert_eq!(wire.replace("SHA-256", "SHA256"), creds, "nothing else changes");
        assert_eq!(to_wire(MD5), MD5);
    }
}
