//! The outbound policy for URLs an upstream hands back (output downloads, job status URLs): which scheme, host and
//! port easel may fetch, the DNS filter that keeps names off link-local addresses, and the redirect checks.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::Url;

use crate::config::{BackendConfig, BackendKind, HostPattern};

/// Redirect hops followed at most.
const MAX_REDIRECTS: usize = 5;

/// Scheme, host (lowercase, no brackets) and port of a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Origin {
    pub fn of(url: &Url) -> Option<Self> {
        let host = url.host_str()?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        Some(Self { scheme: url.scheme().to_owned(), host, port: url.port_or_known_default()? })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

/// Why a URL may not be fetched. Its message is what the client sees.
#[derive(Debug, Clone)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Where a backend's output URLs may point.
#[derive(Debug, Clone)]
pub struct Policy {
    backend: String,
    /// The backend's own origin (`None` for `simulated`).
    origin: Option<Origin>,
    /// `allow_output_hosts` plus the kind's built-in hosts.
    allow: Vec<HostPattern>,
}

/// Hosts a kind's real service returns output URLs on, allowed without configuration.
fn kind_defaults(kind: BackendKind) -> &'static [&'static str] {
    match kind {
        // DALL-E URLs: https://oaidalleapiprodscus.blob.core.windows.net/private/...
        BackendKind::OpenAi => &["*.blob.core.windows.net"],
        BackendKind::Fal => &["fal.media", "*.fal.media"],
        BackendKind::Replicate => &["replicate.delivery", "*.replicate.delivery"],
        _ => &[],
    }
}

impl Policy {
    pub fn new(cfg: &BackendConfig) -> Self {
        let mut allow = cfg.allow_output_hosts.clone();
        allow.extend(kind_defaults(cfg.kind).iter().filter_map(|p| HostPattern::parse(p)));
        Self { backend: cfg.name.clone(), origin: cfg.url.as_ref().and_then(Origin::of), allow }
    }

    /// Whether `url` is on the backend's own origin (where its headers and key may go).
    pub fn is_own_origin(&self, url: &Url) -> bool {
        self.origin.is_some() && Origin::of(url) == self.origin
    }

    /// Checks one URL (the first request or a redirect hop) against the policy.
    pub fn check(&self, url: &Url) -> Result<(), Refused> {
        let scheme = url.scheme();
        if scheme != "http" && scheme != "https" {
            return Err(Refused(format!(
                "the URL scheme `{scheme}` is not allowed for an output (only http and https)"
            )));
        }
        let Some(origin) = Origin::of(url) else {
            return Err(Refused("the output URL has no host".into()));
        };
        if let Ok(ip) = origin.host.parse::<IpAddr>()
            && is_link_local(ip)
        {
            return Err(Refused(format!(
                "{} is a link-local (cloud metadata) address, which easel never fetches",
                origin.host
            )));
        }
        if self.origin.as_ref() == Some(&origin) || self.allow.iter().any(|p| p.matches(&origin.host, origin.port)) {
            return Ok(());
        }
        let own = self.origin.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string);
        Err(Refused(format!(
            "the output host {}:{} is not the backend's origin ({own}) and not in `allow_output_hosts` of backend `{}`",
            origin.host, origin.port, self.backend
        )))
    }

    /// A redirect policy that re-checks every hop against `check`.
    pub fn redirects(self: &Arc<Self>) -> reqwest::redirect::Policy {
        let policy = Arc::clone(self);
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(Refused(format!("more than {MAX_REDIRECTS} redirects")));
            }
            match policy.check(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(r) => {
                    let to = attempt.url().clone();
                    attempt.error(Refused(format!("a redirect to {to} was refused: {r}")))
                }
            }
        })
    }

    /// A redirect policy for API calls: only within the backend's own origin.
    pub fn api_redirects(self: &Arc<Self>) -> reqwest::redirect::Policy {
        let policy = Arc::clone(self);
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(Refused(format!("more than {MAX_REDIRECTS} redirects")));
            }
            if policy.is_own_origin(attempt.url()) {
                attempt.follow()
            } else {
                let to = attempt.url().clone();
                attempt.error(Refused(format!(
                    "the backend redirected to {to}, outside its own origin; easel follows API redirects only within it"
                )))
            }
        })
    }
}

/// Link-local addresses (169.254.0.0/16, fe80::/10, and IPv4 ones mapped into IPv6) and the other well-known cloud
/// metadata addresses (Alibaba's 100.100.100.200, AWS's IPv6 fd00:ec2::254): where metadata services answer.
pub fn is_link_local(ip: IpAddr) -> bool {
    const ALIBABA: std::net::Ipv4Addr = std::net::Ipv4Addr::new(100, 100, 100, 200);
    const AWS_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4 == ALIBABA,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4.is_link_local() || v4 == ALIBABA;
            }
            (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == AWS_V6
        }
    }
}

/// Drops link-local addresses from a name's addresses; a name with nothing else left is refused.
pub fn filter_addrs(name: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
    let kept: Vec<SocketAddr> = addrs.into_iter().filter(|a| !is_link_local(a.ip())).collect();
    if kept.is_empty() {
        return Err(Refused(format!(
            "{name} resolves only to link-local (cloud metadata) addresses, which easel never fetches"
        )));
    }
    Ok(kept)
}

/// The system resolver with [`filter_addrs`] applied.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = filter_addrs(&host, addrs)?;
            let addrs: Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// The policy refusal somewhere in an error's chain, if that is what stopped the call.
pub fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(kind: BackendKind, url: &str, allow: &[&str]) -> Policy {
        Policy {
            backend: "b".into(),
            origin: Url::parse(url).ok().as_ref().and_then(Origin::of),
            allow: allow
                .iter()
                .copied()
                .chain(kind_defaults(kind).iter().copied())
                .filter_map(HostPattern::parse)
                .collect(),
        }
    }

    fn ok(p: &Policy, url: &str) -> bool {
        p.check(&Url::parse(url).unwrap()).is_ok()
    }

    #[test]
    fn same_origin_by_default_and_allow_list_widens_it() {
        let p = policy(BackendKind::Template, "http://127.0.0.1:8000/api", &["127.0.0.1:9000", "*.cdn.test"]);
        assert!(ok(&p, "http://127.0.0.1:8000/out.png"));
        assert!(!ok(&p, "https://127.0.0.1:8000/out.png"));
        assert!(!ok(&p, "http://127.0.0.1:8001/out.png"));
        assert!(ok(&p, "http://127.0.0.1:9000/x"));
        assert!(ok(&p, "https://a.cdn.test/x"));
        assert!(!ok(&p, "https://cdn.test/x"));
        assert!(!ok(&p, "file:///etc/passwd"));
        let fal = policy(BackendKind::Fal, "https://queue.fal.run", &[]);
        assert!(ok(&fal, "https://v3.fal.media/files/x.jpg"));
        let openai = policy(BackendKind::OpenAi, "https://api.openai.com/v1", &[]);
        assert!(ok(&openai, "https://oaidalleapiprodscus.blob.core.windows.net/private/x.png"));
        assert!(!ok(&openai, "https://example.com/x.png"));
    }

    #[test]
    fn link_local_is_refused_even_when_allowed() {
        for ip in ["100.100.100.200", "fd00:ec2::254", "169.254.169.254", "::ffff:169.254.1.1"] {
            assert!(is_link_local(ip.parse().unwrap()), "{ip}");
        }
        assert!(!is_link_local("127.0.0.1".parse().unwrap()));
        let p = policy(BackendKind::Template, "http://169.254.169.254", &["169.254.169.254", "[fe80::1]"]);
        assert!(!ok(&p, "http://169.254.169.254/latest/meta-data/"));
        assert!(!ok(&p, "http://[fe80::1]/"));
        assert!(!ok(&p, "http://[::ffff:169.254.169.254]/"));
    }

    #[test]
    fn resolver_filter_drops_link_local_addresses() {
        let meta: SocketAddr = "169.254.169.254:0".parse().unwrap();
        let v6: SocketAddr = "[fe80::1]:0".parse().unwrap();
        let public: SocketAddr = "93.184.216.34:0".parse().unwrap();
        let err = filter_addrs("meta.test", vec![meta, v6]).unwrap_err();
        assert!(err.0.contains("meta.test") && err.0.contains("link-local"), "{err}");
        assert_eq!(filter_addrs("mixed.test", vec![meta, public]).unwrap(), vec![public]);
    }
}
