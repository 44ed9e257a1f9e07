//! The SSRF guard: the one place that decides whether voxgate may connect to
//! a URL a user supplied.
//!
//! A URL is accepted when it is `https`, carries no credentials, names no
//! internal host (`localhost`, `*.internal`, single-label names, ...) and
//! every address it resolves to is public unicast: not loopback, private,
//! link-local, CGNAT, benchmarking, documentation, multicast, reserved, IPv6
//! ULA/link-local/site-local, nor an IPv4-mapped, -compatible, NAT64 or 6to4
//! form of any of those. IPv4 literals in decimal, octal and hex forms are
//! normalised by the URL parser first, so `https://2130706433/` is 127.0.0.1.
//!
//! Checking at configuration time is not enough (DNS can change between the
//! check and the connect, and redirects go elsewhere), so [`SsrfGuard::client`]
//! builds an HTTP client whose resolver refuses blocked addresses at connect
//! time and whose redirect policy re-checks every hop.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use url::{Host, Url};

use crate::{Error, Result};

/// Resolves host names; swappable so tests need no DNS.
pub trait Resolver: Send + Sync + 'static {
    fn lookup(&self, host: String, port: u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>;
}

/// The operating system's resolver.
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup(&self, host: String, port: u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.map(|a| a.ip()).collect()) })
    }
}

/// A URL that passed the guard, with the addresses it resolved to.
#[derive(Debug, Clone)]
pub struct CheckedUrl {
    pub url: Url,
    pub addrs: Vec<SocketAddr>,
}

#[derive(Clone)]
pub struct SsrfGuard {
    resolver: Arc<dyn Resolver>,
    lookup_timeout: Duration,
    exceptions: Arc<Exceptions>,
}

/// Networks the operator trusts (`[ssrf]` in the config); empty by default.
#[derive(Debug, Default)]
struct Exceptions {
    networks: Vec<ipnet::IpNet>,
    allow_http: bool,
}

const MAX_URL_LEN: usize = 2048;
const MAX_REDIRECTS: usize = 5;

impl SsrfGuard {
    pub fn new(resolver: Arc<dyn Resolver>) -> Self {
        SsrfGuard { resolver, lookup_timeout: Duration::from_secs(5), exceptions: Arc::default() }
    }

    /// Trusts `networks` (an internal webhook receiver, say); with
    /// `allow_http`, plain `http` URLs are accepted when every address they
    /// resolve to is in those networks.
    pub fn with_exceptions(mut self, networks: Vec<ipnet::IpNet>, allow_http: bool) -> Self {
        self.exceptions = Arc::new(Exceptions { networks, allow_http });
        self
    }

    /// Why `ip` must not be contacted, unless the operator trusts it.
    fn blocked(&self, ip: IpAddr) -> Option<&'static str> {
        if self.exceptions.networks.iter().any(|n| n.contains(&ip)) {
            None
        } else {
            blocked_ip(ip)
        }
    }

    pub fn system() -> Self {
        Self::new(Arc::new(SystemResolver))
    }

    /// Parses and checks `raw`; errors name `field`.
    pub async fn check_url(&self, field: &str, raw: &str) -> Result<CheckedUrl> {
        let url = check_static(field, raw, self.exceptions.allow_http)?;
        let host = url.host().ok_or_else(|| Error::bad_request(format!("{field} must have a host")))?;
        let port = url.port_or_known_default().unwrap_or(443);
        let ips = match host {
            Host::Ipv4(ip) => vec![IpAddr::V4(ip)],
            Host::Ipv6(ip) => vec![IpAddr::V6(ip)],
            Host::Domain(name) => {
                let lookup = self.resolver.lookup(name.to_owned(), port);
                match tokio::time::timeout(self.lookup_timeout, lookup).await {
                    Ok(Ok(ips)) if !ips.is_empty() => ips,
                    _ => return Err(Error::bad_request(format!("{field}: host '{name}' does not resolve"))),
                }
            }
        };
        for ip in &ips {
            if let Some(why) = self.blocked(*ip) {
                return Err(Error::bad_request(format!("{field} resolves to a {why} address ({ip}), which is not allowed")));
            }
        }
        let trusted = |ip: &IpAddr| self.exceptions.networks.iter().any(|n| n.contains(ip));
        if url.scheme() == "http" && !ips.iter().all(trusted) {
            return Err(Error::bad_request(format!("{field} must be an https URL")));
        }
        Ok(CheckedUrl { url, addrs: ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect() })
    }

    /// An HTTP client for user-supplied URLs: resolved addresses are checked
    /// at connect time, redirects are re-checked, and requests time out.
    pub fn client(&self, timeout: Duration) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedDns(self.clone())))
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                match check_redirect(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e.to_string()),
                }
            }))
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
    }
}

/// The checks that need no DNS: scheme, credentials, length, host names.
fn check_static(field: &str, raw: &str, allow_http: bool) -> Result<Url> {
    if raw.len() > MAX_URL_LEN {
        return Err(Error::bad_request(format!("{field} must be at most {MAX_URL_LEN} characters")));
    }
    let url = Url::parse(raw.trim()).map_err(|e| Error::bad_request(format!("{field} is not a valid URL: {e}")))?;
    if url.scheme() != "https" && !(allow_http && url.scheme() == "http") {
        return Err(Error::bad_request(format!("{field} must be an https URL")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::bad_request(format!("{field} must not contain credentials")));
    }
    match url.host() {
        None => return Err(Error::bad_request(format!("{field} must have a host"))),
        Some(Host::Domain(name)) => {
            if let Some(why) = blocked_name(name) {
                return Err(Error::bad_request(format!("{field} names {why} ('{name}'), which is not allowed")));
            }
        }
        Some(_) => {}
    }
    Ok(url)
}

/// A redirect target gets the static checks, and its host is checked here
/// when it is an IP literal (literals never reach the guarded resolver).
fn check_redirect(url: &Url) -> Result<()> {
    check_static("redirect", url.as_str(), false)?;
    let ip = match url.host() {
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        _ => return Ok(()),
    };
    match blocked_ip(ip) {
        Some(why) => Err(Error::bad_request(format!("redirect to a {why} address ({ip}) is not allowed"))),
        None => Ok(()),
    }
}

/// Why a host name is internal, if it is.
fn blocked_name(name: &str) -> Option<&'static str> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    const INTERNAL_SUFFIXES: [&str; 6] = [".localhost", ".local", ".internal", ".localdomain", ".home.arpa", ".lan"];
    if name == "localhost" || name.is_empty() {
        Some("a loopback host")
    } else if INTERNAL_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        Some("an internal host")
    } else if !name.contains('.') {
        Some("a single-label (internal) host")
    } else {
        None
    }
}

/// Why an address must not be contacted, if it must not.
pub fn blocked_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn v4net(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len).expect("static prefix length")
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let table: [(Ipv4Net, &'static str); 15] = [
        (v4net(0, 0, 0, 0, 8), "\"this network\""),
        (v4net(10, 0, 0, 0, 8), "private"),
        (v4net(100, 64, 0, 0, 10), "carrier-grade NAT"),
        (v4net(127, 0, 0, 0, 8), "loopback"),
        (v4net(169, 254, 0, 0, 16), "link-local (cloud metadata)"),
        (v4net(172, 16, 0, 0, 12), "private"),
        (v4net(192, 0, 0, 0, 24), "IETF protocol"),
        (v4net(192, 0, 2, 0, 24), "documentation"),
        (v4net(192, 88, 99, 0, 24), "6to4 relay"),
        (v4net(192, 168, 0, 0, 16), "private"),
        (v4net(198, 18, 0, 0, 15), "benchmarking"),
        (v4net(198, 51, 100, 0, 24), "documentation"),
        (v4net(203, 0, 113, 0, 24), "documentation"),
        (v4net(224, 0, 0, 0, 4), "multicast"),
        (v4net(240, 0, 0, 0, 4), "reserved or broadcast"),
    ];
    table.iter().find(|(net, _)| net.contains(&ip)).map(|(_, why)| *why)
}

fn v6net(s: &str) -> Ipv6Net {
    s.parse().expect("static IPv6 prefix")
}

fn embedded_v4(ip: Ipv6Addr, byte_offset: usize) -> Ipv4Addr {
    let o = ip.octets();
    Ipv4Addr::new(o[byte_offset], o[byte_offset + 1], o[byte_offset + 2], o[byte_offset + 3])
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // Forms that carry an IPv4 address: judge the IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return blocked_v4(v4);
    }
    if v6net("::/96").contains(&ip) {
        return Some("IPv4-compatible (deprecated)");
    }
    if v6net("64:ff9b::/96").contains(&ip) {
        return blocked_v4(embedded_v4(ip, 12));
    }
    if v6net("2002::/16").contains(&ip) {
        return blocked_v4(embedded_v4(ip, 2));
    }
    let table: [(&str, &'static str); 9] = [
        ("64:ff9b:1::/48", "local NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol (Teredo and others)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ];
    table.iter().find(|(net, _)| v6net(net).contains(&ip)).map(|(_, why)| *why)
}

/// The client's resolver: resolves, then refuses if any address is blocked
/// (a name that resolves to both public and private addresses is refused).
struct GuardedDns(SsrfGuard);

impl reqwest::dns::Resolve for GuardedDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            if let Some(why) = blocked_name(&host) {
                return Err(format!("refusing to connect to {why} '{host}'").into());
            }
            let ips = tokio::time::timeout(guard.lookup_timeout, guard.resolver.lookup(host.clone(), 0))
                .await
                .map_err(|_| format!("DNS lookup of '{host}' timed out"))??;
            if let Some(ip) = ips.iter().find(|ip| guard.blocked(**ip).is_some()) {
                return Err(format!("refusing to connect to '{host}': it resolves to {ip}").into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeDns(HashMap<&'static str, Vec<IpAddr>>);

    impl Resolver for FakeDns {
        fn lookup(&self, host: String, _port: u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
            let r = self.0.get(host.as_str()).cloned().ok_or_else(|| std::io::Error::other("NXDOMAIN"));
            Box::pin(async move { r })
        }
    }

    fn guard() -> SsrfGuard {
        let mut m = HashMap::new();
        m.insert("public.example.com", vec!["93.184.215.14".parse().unwrap()]);
        m.insert("rebind.example.com", vec!["10.1.2.3".parse().unwrap()]);
        m.insert("mixed.example.com", vec!["93.184.215.14".parse().unwrap(), "fd00::1".parse().unwrap()]);
        m.insert("meta.example.com", vec!["169.254.169.254".parse().unwrap()]);
        SsrfGuard::new(Arc::new(FakeDns(m)))
    }

    #[tokio::test]
    async fn refuses_names_that_resolve_to_internal_addresses() {
        let g = guard();
        for url in ["https://rebind.example.com/h", "https://mixed.example.com/h", "https://meta.example.com/h"] {
            let err = g.check_url("webhookUrl", url).await.unwrap_err().to_string();
            assert!(err.contains("not allowed"), "{url}: {err}");
        }
        let err = g.check_url("webhookUrl", "https://nx.example.com/").await.unwrap_err().to_string();
        assert!(err.contains("does not resolve"), "{err}");
    }

    #[tokio::test]
    async fn accepts_a_public_https_name() {
        let ok = guard().check_url("webhookUrl", "https://public.example.com/hooks?x=1").await.unwrap();
        assert_eq!(ok.addrs, vec!["93.184.215.14:443".parse::<std::net::SocketAddr>().unwrap()]);
    }

    #[test]
    fn embedded_ipv4_forms_are_judged_by_their_ipv4_address() {
        for ip in ["::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:c0a8:0101::1", "::127.0.0.1"] {
            assert!(blocked_ip(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in ["::ffff:93.184.215.14", "64:ff9b::5db8:d70e", "2606:4700:4700::1111"] {
            assert!(blocked_ip(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }

    #[test]
    fn redirects_to_internal_targets_are_refused() {
        for target in [
            "http://93.184.215.14/",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::ffff:10.0.0.1]/",
            "https://localhost/admin",
            "https://0x7f000001/",
        ] {
            assert!(check_redirect(&Url::parse(target).unwrap()).is_err(), "{target}");
        }
        assert!(check_redirect(&Url::parse("https://93.184.215.14/next").unwrap()).is_ok());
        assert!(check_redirect(&Url::parse("https://cdn.example.com/next").unwrap()).is_ok());
    }

    #[tokio::test]
    async fn the_guarded_client_refuses_to_connect_to_names_that_resolve_internally() {
        let client = guard().client(Duration::from_secs(5)).unwrap();
        let err = client.get("https://rebind.example.com/hook").send().await.unwrap_err();
        let chain = format!("{:?}", err);
        assert!(chain.contains("refusing to connect"), "{chain}");
        let err = client.get("https://api.localhost/hook").send().await.unwrap_err();
        assert!(format!("{:?}", err).contains("refusing to connect"));
    }

    #[test]
    fn internal_names_are_refused_without_dns() {
        for url in [
            "https://localhost/",
            "https://LOCALHOST./",
            "https://api.localhost/",
            "https://metadata.google.internal/",
            "https://printer.local/",
            "https://intranet/",
        ] {
            assert!(check_static("u", url, false).is_err(), "{url}");
        }
        assert!(check_static("u", "http://example.com/", false).is_err());
        assert!(check_static("u", "https://user:pw@example.com/", false).is_err());
        assert!(check_static("u", "https://example.com/", false).is_ok());
    }

    #[tokio::test]
    async fn operator_exceptions_trust_only_their_networks() {
        let guard = SsrfGuard::new(Arc::new(FakeDns(HashMap::new())))
            .with_exceptions(vec!["127.0.0.1/32".parse().unwrap()], true);
        assert!(guard.check_url("u", "http://127.0.0.1:9000/hook").await.is_ok());
        assert!(guard.check_url("u", "https://127.0.0.1/hook").await.is_ok());
        let err = guard.check_url("u", "http://127.0.0.2/hook").await.unwrap_err().to_string();
        assert!(err.contains("loopback"), "{err}");
        assert!(guard.check_url("u", "http://169.254.169.254/").await.is_err());
        let strict = SsrfGuard::new(Arc::new(FakeDns(HashMap::new())));
        assert!(strict.check_url("u", "http://127.0.0.1:9000/hook").await.is_err());
    }

}
