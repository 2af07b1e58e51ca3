//! Host → route, as a pure function.
//!
//! The edge serves two kinds of hosts on one listener: the main host(s) (API + terminal) and
//! `user-<id>.<preview-domain>` (one user's dev server). Everything the proxy later does with a
//! user id starts here, so this module is strict: a Host that is not exactly one of the accepted
//! shapes is `NotFound`, never "close enough".

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::PREVIEW_PORT;
use crate::user::UserId;

/// The DNS limits (RFC 1035 §2.3.4) that `normalize_host` enforces.
const MAX_LABEL_LEN: usize = 63;
const MAX_NAME_LEN: usize = 253;

/// What the router needs to know. Values are compared after [`normalize_host`], so
/// `"LocalHost."` in a config file means `localhost`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// Hosts that serve the API and the terminal, e.g. `["localhost", "127.0.0.1", "::1"]`.
    pub main_hosts: Vec<String>,
    /// The domain under which `user-<id>.` hosts live, e.g. `preview.localhost`.
    pub preview_domain: String,
    /// Container ports besides [`PREVIEW_PORT`] reachable as `<port>-user-<id>.…`.
    pub extra_ports: Vec<u16>,
}

impl RouterConfig {
    /// Checks that every configured host normalizes, so a typo in the config is reported at
    /// start-up instead of silently turning into 404s (`route` treats an invalid configured
    /// host as one that never matches).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.main_hosts.is_empty() {
            anyhow::bail!("at least one main host is required");
        }
        for h in &self.main_hosts {
            if normalize_host(h).is_none() {
                anyhow::bail!("main host {h:?} is not a valid host name or IP address");
            }
        }
        let preview = normalize_host(&self.preview_domain).ok_or_else(|| {
            anyhow::anyhow!(
                "preview domain {:?} is not a valid host name",
                self.preview_domain
            )
        })?;
        if preview.parse::<IpAddr>().is_ok() {
            anyhow::bail!("preview domain {preview:?} must be a DNS name, not an IP address");
        }
        if self
            .main_hosts
            .iter()
            .any(|h| normalize_host(h).as_deref() == Some(preview.as_str()))
        {
            anyhow::bail!("preview domain {preview:?} must differ from the main hosts");
        }
        if self.extra_ports.contains(&0) {
            anyhow::bail!("extra preview port 0 is not a valid port");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The API and terminal host.
    Main,
    /// A user's preview: proxy to `port` of that user's container.
    Preview { user: UserId, port: u16 },
    /// Anything else, including a missing Host.
    NotFound,
}

/// Normalizes a Host header (or SNI, or a configured host) for comparison.
///
/// Lowercases, strips a `:port` (also after `[v6]`), strips ONE trailing dot, and returns IP
/// literals in their canonical form (IPv6 without brackets, so `[::1]:8443` → `::1`).
/// Returns `None` for anything that is not a plausible host: empty labels, labels over 63 or
/// names over 253 characters, characters outside `a-z 0-9 - .`, labels starting or ending with
/// `-`, an all-numeric last label that is not an IPv4 address (`127.1`), whitespace, control
/// characters, non-ASCII, userinfo (`a@b`), or a malformed port.
pub fn normalize_host(raw: &str) -> Option<String> {
    normalized(raw).map(Cow::into_owned)
}

/// [`normalize_host`] without an allocation when the host is already in normal form (a
/// lowercase name, with or without a port): the per-request form.
pub fn normalized(raw: &str) -> Option<Cow<'_, str>> {
    if let Some(name) = plain_name(raw) {
        return Some(Cow::Borrowed(name));
    }
    checked(raw)
}

/// [`normalized`] without the [`plain_name`] shortcut: every shape, every rejection.
fn checked(raw: &str) -> Option<Cow<'_, str>> {
    // Checked up front so no later branch has to think about CR/LF/space/NUL/UTF-8.
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        let lower = raw.to_ascii_lowercase();
        return normalize_lower(&lower).map(|n| Cow::Owned(n.into_owned()));
    }
    normalize_lower(raw)
}

/// The common shape of a Host, accepted in one pass over its bytes: a lowercase DNS name
/// (`a-z 0-9 - .`, labels of 1–63 bytes that neither start nor end with `-`, a last label that
/// is not all digits, at most 253 bytes), optionally one trailing dot and a `:port`. Returns
/// the name (a prefix of `raw`, so no allocation) only when `raw` is certainly such a host:
/// `None` means "not this shape", and [`normalized`] then runs the full check, which decides
/// every rejection. So this can only ever accept what the full check accepts, with the same
/// result (a unit test compares the two).
fn plain_name(raw: &str) -> Option<&str> {
    let b = raw.as_bytes();
    // The current label starts at `start`; `numeric`: it is all digits so far. `closed_numeric`:
    // whether the last label closed by a dot was all digits (for a trailing dot).
    let mut start = 0;
    let mut numeric = true;
    let mut closed_numeric = true;
    let mut i = 0;
    let name_end = loop {
        let Some(&c) = b.get(i) else {
            break i;
        };
        match c {
            b'a'..=b'z' | b'-' => numeric = false,
            b'0'..=b'9' => {}
            b'.' => {
                if !plain_label(&b[start..i]) {
                    return None;
                }
                start = i + 1;
                closed_numeric = numeric;
                numeric = true;
            }
            b':' => break i,
            _ => return None,
        }
        i += 1;
    };
    let name_len = if start == name_end {
        // An empty last label: one trailing dot after a label checked above, or no name at all
        // (a second trailing dot already failed, as an empty label).
        if name_end == 0 || closed_numeric {
            return None;
        }
        name_end - 1
    } else {
        if numeric || !plain_label(&b[start..name_end]) {
            return None;
        }
        name_end
    };
    if name_len > MAX_NAME_LEN {
        return None;
    }
    if name_end < b.len() {
        valid_port(raw.get(name_end + 1..)?)?;
    }
    raw.get(..name_len)
}

/// A label of [`plain_name`] (its bytes already checked): 1–63 bytes, no `-` at either end.
fn plain_label(l: &[u8]) -> bool {
    matches!((l.first(), l.last()), (Some(&f), Some(&e)) if f != b'-' && e != b'-')
        && l.len() <= MAX_LABEL_LEN
}

/// [`normalized`] of a host already in lowercase.
fn normalize_lower(lower: &str) -> Option<Cow<'_, str>> {
    if let Some(rest) = lower.strip_prefix('[') {
        // `[v6]` or `[v6]:port`: the only place brackets are allowed.
        let (inside, after) = rest.split_once(']')?;
        if !after.is_empty() {
            valid_port(after.strip_prefix(':')?)?;
        }
        // Zone ids (`%eth0`) fail to parse here, which is what we want: they have no meaning in
        // a Host header.
        let ip: Ipv6Addr = inside.parse().ok()?;
        return Some(Cow::Owned(ip.to_string()));
    }

    // A bare IPv6 literal (only from configuration; a Host header must bracket it). Two or more
    // colons cannot be `name:port`.
    if lower.bytes().filter(|&b| b == b':').count() >= 2 {
        let ip: Ipv6Addr = lower.parse().ok()?;
        return Some(Cow::Owned(ip.to_string()));
    }

    let name = match lower.split_once(':') {
        Some((name, port)) => {
            valid_port(port)?;
            name
        }
        None => lower,
    };
    let name = name.strip_suffix('.').unwrap_or(name);

    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Some(Cow::Owned(ip.to_string()));
    }
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    let mut labels = name.split('.').peekable();
    while let Some(label) = labels.next() {
        let ok = !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return None;
        }
        // An all-numeric top label is not a DNS name, and such hosts (`127.1`, `1.2.3.256`) are
        // the ones IP parsers disagree about; refuse rather than guess.
        if labels.peek().is_none() && label.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    Some(Cow::Borrowed(name))
}

/// A Host-header port: 1–5 ASCII digits, at most 65535. `0` is accepted here because it only
/// gets stripped; routing never uses it.
fn valid_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Maps a Host header to a route. See the module docs and [`RouterConfig`].
pub fn route(cfg: &RouterConfig, host: Option<&str>) -> Route {
    Router::new(cfg).route(host)
}

/// A [`RouterConfig`] with its hosts normalized once, so that routing a request normalizes
/// only the request's host. A configured host that does not normalize never matches.
#[derive(Debug, Clone)]
pub struct Router {
    main_hosts: Vec<String>,
    preview_domain: Option<String>,
    extra_ports: Vec<u16>,
}

impl Router {
    pub fn new(cfg: &RouterConfig) -> Router {
        Router {
            main_hosts: cfg
                .main_hosts
                .iter()
                .filter_map(|h| normalize_host(h))
                .collect(),
            preview_domain: normalize_host(&cfg.preview_domain),
            extra_ports: cfg.extra_ports.clone(),
        }
    }

    /// Maps a Host header to a route, as [`route`].
    pub fn route(&self, host: Option<&str>) -> Route {
        match host.and_then(normalized) {
            Some(host) => self.route_normal(&host),
            None => Route::NotFound,
        }
    }

    /// [`Router::route`] of a host already looked at ([`RequestHost::of`]).
    pub fn route_host(&self, host: &RequestHost) -> Route {
        match host.name() {
            Some(name) => self.route_normal(name),
            None => Route::NotFound,
        }
    }

    /// [`Router::route`] of a host in normal form.
    fn route_normal(&self, host: &str) -> Route {
        if self.main_hosts.iter().any(|m| m == host) {
            return Route::Main;
        }
        let Some(preview_domain) = self.preview_domain.as_deref() else {
            return Route::NotFound;
        };
        // Exactly one label in front of the preview domain: deeper names (`a.user-1.preview…`)
        // are not ours, and the bare preview domain has no user.
        let Some(label) = host
            .strip_suffix(preview_domain)
            .and_then(|rest| rest.strip_suffix('.'))
        else {
            return Route::NotFound;
        };
        if label.is_empty() || label.contains('.') {
            return Route::NotFound;
        }
        preview_label(label, &self.extra_ports).unwrap_or(Route::NotFound)
    }
}

/// `user-<id>` or `<port>-user-<id>`.
fn preview_label(label: &str, extra_ports: &[u16]) -> Option<Route> {
    if let Some(id) = label.strip_prefix("user-") {
        let user = UserId::parse(id).ok()?;
        return Some(Route::Preview {
            user,
            port: PREVIEW_PORT,
        });
    }
    let (port, rest) = label.split_once('-')?;
    let id = rest.strip_prefix("user-")?;
    // Decimal without a leading zero, so every port has exactly one spelling (`05173` would
    // otherwise be a second host name for the same origin).
    if port.starts_with('0') {
        return None;
    }
    let port = valid_port(port)?;
    if !extra_ports.contains(&port) {
        return None;
    }
    let user = UserId::parse(id).ok()?;
    Some(Route::Preview { user, port })
}

/// The host a request is for, as the client sent it: the URI authority when there is one
/// (HTTP/2 `:authority`, HTTP/1 absolute-form), else the `Host` header. This is the value to
/// hand to [`route`] and [`sni_matches_host`]; using one function for both keeps the 421 check
/// and the routing decision about the same string.
pub fn request_host<B>(req: &http::Request<B>) -> Option<&str> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str());
    }
    req.headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
}

/// A request's host ([`request_host`]) after [`normalized`], for a request whose host is
/// looked at more than once (the listener's 421 check, then the routing): it is normalized
/// once and handed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestHost {
    /// No URI authority and no (readable) Host header.
    Missing,
    /// One that does not normalize.
    Invalid,
    /// The normalized host.
    Name(String),
}

impl RequestHost {
    pub fn of<B>(req: &http::Request<B>) -> RequestHost {
        match request_host(req) {
            None => RequestHost::Missing,
            Some(raw) => match normalized(raw) {
                Some(name) => RequestHost::Name(name.into_owned()),
                None => RequestHost::Invalid,
            },
        }
    }

    /// The normalized host, when there is a valid one.
    pub fn name(&self) -> Option<&str> {
        match self {
            RequestHost::Name(n) => Some(n),
            RequestHost::Missing | RequestHost::Invalid => None,
        }
    }
}

/// [`sni_matches_host`] of a host already normalized.
pub fn sni_matches(sni: &str, host: &str) -> bool {
    // The SNI (as rustls reports it) is usually in normal form already, and normalizing is
    // idempotent, so a host equal to it matches without normalizing the SNI again.
    host == sni || normalized(sni).is_some_and(|s| s == host)
}

/// Whether a TLS SNI and an HTTP Host name the same host (both normalized first; a Host port is
/// ignored). The listener answers 421 Misdirected Request when they differ, which also makes
/// browsers retry on a fresh connection when they coalesced two hosts covered by one wildcard
/// certificate. Either side failing to normalize counts as a mismatch.
pub fn sni_matches_host(sni: &str, host: &str) -> bool {
    normalized(host).is_some_and(|h| sni_matches(sni, &h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RouterConfig {
        RouterConfig {
            main_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            preview_domain: "preview.localhost".into(),
            extra_ports: vec![3000, 8080],
        }
    }

    fn preview(id: &str, port: u16) -> Route {
        Route::Preview {
            user: UserId::parse(id).expect("test id is valid"),
            port,
        }
    }

    fn r(host: &str) -> Route {
        route(&cfg(), Some(host))
    }

    #[test]
    fn normalize_lowercases_and_strips_port_and_one_dot() {
        assert_eq!(normalize_host("LocalHost").as_deref(), Some("localhost"));
        assert_eq!(
            normalize_host("localhost:8443").as_deref(),
            Some("localhost")
        );
        assert_eq!(normalize_host("localhost.").as_deref(), Some("localhost"));
        assert_eq!(
            normalize_host("localhost.:80").as_deref(),
            Some("localhost")
        );
        assert_eq!(
            normalize_host("User-1.Preview.LOCALHOST.").as_deref(),
            Some("user-1.preview.localhost")
        );
        assert_eq!(normalize_host("localhost.."), None);
        assert_eq!(normalize_host(".localhost"), None);
        assert_eq!(normalize_host("."), None);
        assert_eq!(normalize_host(""), None);
    }

    #[test]
    fn normalize_ports() {
        assert_eq!(normalize_host("a.b:65535").as_deref(), Some("a.b"));
        assert_eq!(normalize_host("a.b:65536"), None);
        assert_eq!(normalize_host("a.b:"), None);
        assert_eq!(normalize_host("a.b:80:80"), None);
        assert_eq!(normalize_host("a.b:+80"), None);
        assert_eq!(normalize_host("a.b:123456"), None);
        assert_eq!(normalize_host("a.b: 80"), None);
    }

    #[test]
    fn normalized_borrows_when_it_can_and_agrees_with_normalize_host() {
        for h in [
            "user-1.preview.localhost",
            "user-1.preview.localhost:8080",
            "localhost.",
            "User-1.Preview.LOCALHOST.:80",
            "[::1]:8443",
            "::1",
            "127.0.0.1:80",
            "a..b",
            "-a.b",
            "127.1",
            "",
            "a b",
        ] {
            assert_eq!(normalized(h).map(Cow::into_owned), normalize_host(h), "{h}");
        }
        assert!(matches!(
            normalized("user-1.preview.localhost:8080"),
            Some(Cow::Borrowed("user-1.preview.localhost"))
        ));
        assert!(matches!(
            normalized("localhost."),
            Some(Cow::Borrowed("localhost"))
        ));
    }

    /// Hosts around the edges of every rule, for the shortcut-vs-full-check comparisons.
    fn corpus() -> Vec<String> {
        let label63 = "a".repeat(63);
        let mut hosts: Vec<String> = [
            "localhost",
            "localhost.",
            "localhost..",
            "localhost.:80",
            "localhost:8443",
            "localhost:0",
            "localhost:65536",
            "localhost:",
            "localhost:80:80",
            "localhost:+80",
            "LocalHost",
            "user-1.preview.localhost",
            "user-1.preview.localhost.:8443",
            "3000-user-1.preview.localhost",
            "a-b.c",
            "-a.b",
            "a-.b",
            "a.-b",
            "a.b-",
            "a..b",
            ".a",
            ".",
            ":80",
            "",
            "127.0.0.1",
            "127.0.0.1:80",
            "127.0.0.1.",
            "127.1",
            "1.2.3.256",
            "a.123",
            "a.123.",
            "123.a",
            "0x7f.0.0.1",
            "1a.2b",
            "[::1]:8443",
            "::1",
            "a_b.c",
            "a b",
            "a@b",
            "é.b",
        ]
        .iter()
        .map(|h| (*h).to_owned())
        .collect();
        hosts.push(format!("{label63}.b"));
        hosts.push(format!("{label63}a.b"));
        hosts.push(format!("b.{label63}a"));
        let name253 = format!("{label63}.{label63}.{label63}.{}", "a".repeat(61));
        hosts.push(name253.clone());
        hosts.push(format!("{name253}."));
        hosts.push(format!("{name253}.:443"));
        hosts.push(format!("{name253}a"));
        hosts.push(format!("{name253}a."));
        // Every string of up to 4 bytes over an alphabet that hits each branch.
        let alphabet = ['a', 'z', '0', '9', '-', '.', ':', 'A', '_'];
        let mut layer = vec![String::new()];
        for _ in 0..4 {
            layer = layer
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            hosts.extend(layer.iter().cloned());
        }
        hosts
    }

    #[test]
    fn the_plain_shortcut_accepts_only_what_the_full_check_accepts() {
        let mut accepted = 0;
        for h in corpus() {
            if let Some(name) = plain_name(&h) {
                accepted += 1;
                assert_eq!(checked(&h).as_deref(), Some(name), "{h:?}");
            }
            assert_eq!(normalized(&h), checked(&h), "{h:?}");
        }
        // And it does take the common shapes (the point of having it).
        assert!(accepted > 500, "{accepted}");
        for h in [
            "user-1.preview.localhost",
            "user-1.preview.localhost:8443",
            "localhost.",
            "3000-user-7.preview.example.com.:443",
        ] {
            assert!(plain_name(h).is_some(), "{h}");
        }
    }

    #[test]
    fn normalizing_is_idempotent() {
        // `sni_matches_host` relies on it: a host that normalizes to exactly the SNI matches.
        for h in corpus() {
            if let Some(n) = normalized(&h) {
                assert_eq!(normalized(&n).as_deref(), Some(&*n), "{h:?}");
                assert!(sni_matches_host(&n, &h), "{h:?}");
            }
        }
    }

    #[test]
    fn a_router_built_once_routes_as_route() {
        let c = cfg();
        let r = Router::new(&c);
        for h in [
            "localhost",
            "[::1]:8443",
            "user-7.preview.localhost",
            "3000-user-7.Preview.Localhost.",
            "9999-user-7.preview.localhost",
            "a.user-7.preview.localhost",
            "preview.localhost",
            "example.com",
        ] {
            assert_eq!(r.route(Some(h)), route(&c, Some(h)), "{h}");
        }
        assert_eq!(r.route(None), Route::NotFound);
    }

    #[test]
    fn normalize_ip_literals() {
        assert_eq!(normalize_host("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            normalize_host("127.0.0.1:8443").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(normalize_host("[::1]").as_deref(), Some("::1"));
        assert_eq!(normalize_host("[::1]:8443").as_deref(), Some("::1"));
        assert_eq!(normalize_host("::1").as_deref(), Some("::1"));
        assert_eq!(
            normalize_host("[0:0:0:0:0:0:0:1]").as_deref(),
            Some("::1"),
            "IPv6 comes back in canonical form"
        );
        assert_eq!(
            normalize_host("[2001:DB8::A]").as_deref(),
            Some("2001:db8::a")
        );
        assert_eq!(normalize_host("[::1"), None);
        assert_eq!(normalize_host("[::1]x"), None);
        assert_eq!(normalize_host("[::1]:"), None);
        assert_eq!(normalize_host("[fe80::1%eth0]"), None);
        assert_eq!(normalize_host("[localhost]"), None);
        assert_eq!(normalize_host("::1:8443x"), None);
        // Shapes that some parsers read as IPv4 and others as names.
        assert_eq!(normalize_host("127.1"), None);
        assert_eq!(normalize_host("1.2.3.256"), None);
        assert_eq!(normalize_host("0x7f.0.0.1"), None);
    }

    #[test]
    fn normalize_rejects_odd_bytes() {
        for bad in [
            "local host",
            "localhost\r\n",
            "localhost\nX-Evil: 1",
            "localhost\t",
            "local\0host",
            "lócalhost",
            "user_1.preview.localhost",
            "a@localhost",
            "localhost/x",
            "localhost?",
            "-a.localhost",
            "a-.localhost",
            "*.preview.localhost",
        ] {
            assert_eq!(normalize_host(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn normalize_length_limits() {
        let label63 = "a".repeat(63);
        let label64 = "a".repeat(64);
        assert!(normalize_host(&format!("{label63}.localhost")).is_some());
        assert_eq!(normalize_host(&format!("{label64}.localhost")), None);
        // 4 × 63 + 3 dots = 255 > 253.
        let long = [label63.as_str(); 4].join(".");
        assert_eq!(normalize_host(&long), None);
        let ok = format!("{}.{}.{}.{}", label63, label63, label63, "a".repeat(61));
        assert_eq!(ok.len(), 253);
        assert!(normalize_host(&ok).is_some());
        // The one trailing dot does not count towards the limit.
        assert!(normalize_host(&format!("{ok}.")).is_some());
    }

    #[test]
    fn main_hosts() {
        assert_eq!(r("localhost"), Route::Main);
        assert_eq!(r("LOCALHOST"), Route::Main);
        assert_eq!(r("localhost."), Route::Main);
        assert_eq!(r("localhost:8443"), Route::Main, "main host with a port");
        assert_eq!(r("127.0.0.1"), Route::Main);
        assert_eq!(r("127.0.0.1:8080"), Route::Main);
        assert_eq!(r("[::1]:8443"), Route::Main);
        assert_eq!(r("[::1]"), Route::Main);
        assert_eq!(r("127.0.0.2"), Route::NotFound);
        assert_eq!(r("api.localhost"), Route::NotFound);
        let public = RouterConfig {
            main_hosts: vec!["API.Example.com.".into()],
            preview_domain: "preview.example.com".into(),
            extra_ports: vec![],
        };
        assert_eq!(route(&public, Some("api.example.com:443")), Route::Main);
        assert_eq!(route(&public, Some("localhost")), Route::NotFound);
    }

    #[test]
    fn missing_or_invalid_host() {
        assert_eq!(route(&cfg(), None), Route::NotFound);
        assert_eq!(r(""), Route::NotFound);
        assert_eq!(r("localhost\r\n"), Route::NotFound);
    }

    #[test]
    fn preview_hosts() {
        assert_eq!(r("user-1.preview.localhost"), preview("1", 5173));
        assert_eq!(r("user-42.preview.localhost:8443"), preview("42", 5173));
        assert_eq!(r("USER-1.PREVIEW.LOCALHOST."), preview("1", 5173));
        assert_eq!(
            r("user-ABC.preview.localhost"),
            preview("abc", 5173),
            "ids are lowercased with the rest of the host"
        );
        let id32 = "a".repeat(32);
        assert_eq!(
            r(&format!("user-{id32}.preview.localhost")),
            preview(&id32, 5173)
        );
    }

    #[test]
    fn preview_rejects() {
        for bad in [
            "preview.localhost",
            ".preview.localhost",
            "user-1..preview.localhost",
            "a.user-1.preview.localhost",
            "user-1.a.preview.localhost",
            "user-.preview.localhost",
            "user-a_b.preview.localhost",
            "user-a-b.preview.localhost",
            "user1.preview.localhost",
            "users-1.preview.localhost",
            "xuser-1.preview.localhost",
            "user-1.preview.localhost.evil.com",
            "user-1.xpreview.localhost",
            "user-1-preview.localhost",
            "user-1.localhost",
        ] {
            assert_eq!(r(bad), Route::NotFound, "{bad:?}");
        }
        let id33 = "a".repeat(33);
        assert_eq!(
            r(&format!("user-{id33}.preview.localhost")),
            Route::NotFound
        );
    }

    #[test]
    fn preview_port_prefix() {
        assert_eq!(r("3000-user-1.preview.localhost"), preview("1", 3000));
        assert_eq!(r("8080-user-7.preview.localhost:443"), preview("7", 8080));
        for bad in [
            "3001-user-1.preview.localhost",
            "5173-user-1.preview.localhost",
            "0-user-1.preview.localhost",
            "05173-user-1.preview.localhost",
            "03000-user-1.preview.localhost",
            "65536-user-1.preview.localhost",
            "99999999-user-1.preview.localhost",
            "3000-user-.preview.localhost",
            "3000-user-a_b.preview.localhost",
            "3000user-1.preview.localhost",
            "3000-3000-user-1.preview.localhost",
            "x-user-1.preview.localhost",
            "3000-1.preview.localhost",
        ] {
            assert_eq!(r(bad), Route::NotFound, "{bad:?}");
        }
        let no_extra = RouterConfig {
            extra_ports: vec![],
            ..cfg()
        };
        assert_eq!(
            route(&no_extra, Some("3000-user-1.preview.localhost")),
            Route::NotFound
        );
    }

    #[test]
    fn preview_domain_that_is_a_subdomain_of_a_main_host() {
        // `preview.localhost` sits under `localhost`; only exact main hosts are Main.
        let c = RouterConfig {
            main_hosts: vec!["localhost".into()],
            preview_domain: "Preview.Localhost.".into(),
            extra_ports: vec![],
        };
        assert_eq!(route(&c, Some("localhost")), Route::Main);
        assert_eq!(route(&c, Some("preview.localhost")), Route::NotFound);
        assert_eq!(
            route(&c, Some("user-9.preview.localhost")),
            preview("9", 5173)
        );
        assert_eq!(route(&c, Some("user-9.localhost")), Route::NotFound);
    }

    #[test]
    fn invalid_config_never_matches() {
        let c = RouterConfig {
            main_hosts: vec!["bad host".into()],
            preview_domain: "bad..domain".into(),
            extra_ports: vec![],
        };
        assert!(c.validate().is_err());
        assert_eq!(route(&c, Some("bad host")), Route::NotFound);
        assert_eq!(route(&c, Some("user-1.bad..domain")), Route::NotFound);
    }

    #[test]
    fn validate_config() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.preview_domain = "localhost".into();
        assert!(c.validate().is_err(), "preview domain equal to a main host");
        let mut c = cfg();
        c.preview_domain = "127.0.0.1".into();
        assert!(c.validate().is_err(), "IP preview domain");
        let mut c = cfg();
        c.extra_ports = vec![0];
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.main_hosts.clear();
        assert!(c.validate().is_err());
    }

    #[test]
    fn sni_vs_host() {
        assert!(sni_matches_host("localhost", "localhost:8443"));
        assert!(sni_matches_host(
            "user-1.preview.localhost",
            "USER-1.preview.localhost."
        ));
        assert!(!sni_matches_host(
            "user-1.preview.localhost",
            "user-2.preview.localhost"
        ));
        assert!(!sni_matches_host("localhost", "bad host"));
        assert!(!sni_matches_host("", "localhost"));
        assert!(sni_matches_host("LocalHost.", "localhost"));
        assert!(!sni_matches_host("bad host", "localhost"));
        assert!(!sni_matches_host("localhost", ""));
        assert!(!sni_matches_host("127.0.0.1", "127.1"));
    }

    #[test]
    fn a_request_host_looked_at_once_routes_and_matches_as_the_raw_one() {
        let c = cfg();
        let router = Router::new(&c);
        for h in [
            "user-7.preview.localhost",
            "USER-7.Preview.Localhost.:8443",
            "3000-user-7.preview.localhost",
            "a.user-7.preview.localhost",
            "localhost",
            "[::1]:8443",
            "bad host",
            "127.1",
        ] {
            let req = http::Request::builder()
                .uri("/x")
                .header("host", h)
                .body(())
                .expect("valid request");
            let once = RequestHost::of(&req);
            assert_eq!(router.route_host(&once), route(&c, Some(h)), "{h}");
            assert_eq!(once.name(), normalize_host(h).as_deref(), "{h}");
            for sni in ["user-7.preview.localhost", "localhost", "LocalHost."] {
                let matched = once.name().is_some_and(|n| sni_matches(sni, n));
                assert_eq!(matched, sni_matches_host(sni, h), "{sni} {h}");
            }
        }
        let none = http::Request::builder()
            .uri("/x")
            .body(())
            .expect("valid request");
        assert_eq!(RequestHost::of(&none), RequestHost::Missing);
        assert_eq!(router.route_host(&RequestHost::Missing), Route::NotFound);
        let bad = http::Request::builder()
            .uri("/x")
            .header("host", "a..b")
            .body(())
            .expect("valid request");
        assert_eq!(RequestHost::of(&bad), RequestHost::Invalid);
        assert_eq!(router.route_host(&RequestHost::Invalid), Route::NotFound);
        // The authority wins over the Host header, as in `request_host`.
        let abs = http::Request::builder()
            .uri("https://localhost:8443/x")
            .header("host", "user-1.preview.localhost")
            .body(())
            .expect("valid request");
        assert_eq!(RequestHost::of(&abs).name(), Some("localhost"));
    }

    #[test]
    fn request_host_prefers_the_authority() {
        let req = http::Request::builder()
            .uri("/x")
            .header("host", "user-1.preview.localhost")
            .body(())
            .expect("valid request");
        assert_eq!(request_host(&req), Some("user-1.preview.localhost"));
        let req = http::Request::builder()
            .uri("https://localhost:8443/x")
            .header("host", "user-1.preview.localhost")
            .body(())
            .expect("valid request");
        assert_eq!(request_host(&req), Some("localhost:8443"));
        let req = http::Request::builder()
            .uri("/x")
            .body(())
            .expect("valid request");
        assert_eq!(request_host(&req), None);
        assert_eq!(route(&cfg(), request_host(&req)), Route::NotFound);
    }
}
