//! Network edges: every URL a user gives us (webhooks, media URLs) goes
//! through [`ssrf::SsrfGuard`] before we connect to it, and [`client_ip`]
//! says who is at the other end of a request.

pub mod ssrf;

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client's address: the socket's peer, or, when the peer is one of
/// our `trusted` load balancers, the last address in `X-Forwarded-For`
/// that is not one of them (the ones before it are the client's to forge).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()))
        .collect::<Vec<_>>();
    let mut client = peer;
    for hop in forwarded.into_iter().rev() {
        match hop {
            // An unparsable hop: nothing before it can be trusted.
            Err(_) => break,
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn xff(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static(v));
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let lb: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer_lb: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        // The client's own header cannot make it someone else.
        assert_eq!(client_ip(stranger, &xff("10.1.1.1"), &lb), stranger);
        assert_eq!(client_ip(peer_lb, &xff("203.0.113.9"), &lb), "203.0.113.9".parse::<IpAddr>().unwrap());
        // Forged first hops are skipped: the last untrusted hop is the client.
        assert_eq!(client_ip(peer_lb, &xff("10.9.9.9, 203.0.113.9, 10.0.0.7"), &lb), "203.0.113.9".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(peer_lb, &HeaderMap::new(), &lb), peer_lb);
        assert_eq!(client_ip(peer_lb, &xff("junk"), &lb), peer_lb);
        assert_eq!(client_ip(stranger, &HeaderMap::new(), &[]), stranger);
    }
}
