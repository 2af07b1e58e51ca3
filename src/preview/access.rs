//! `preview_access = "owner"`: the signed link that sets the owner's cookie, and the cookie
//! check on every request (README, "Preview").

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::{PreviewError, Proxy};
use crate::edge::listener::ConnInfo;
use crate::http::Body;
use crate::user::UserId;

/// Cookie that carries the owner's preview token (`preview_access = "owner"`).
pub const PREVIEW_COOKIE: &str = "sandboxd_preview";
/// Its name over HTTPS. Browsers accept a `__Host-` cookie only with `Secure`, `Path=/` and no
/// `Domain`, so a sibling preview host cannot toss one onto this host (cookie tossing).
pub const PREVIEW_COOKIE_TLS: &str = "__Host-sandboxd_preview";
/// Query parameter of the signed link that sets the cookie.
pub const LINK_PARAM: &str = "sandboxd_token";

impl Proxy {
    /// The owner's preview token, from the signed link (then set as a host-only cookie and
    /// redirected away from the URL: `Ok(Some(redirect))`) or from the cookie (`Ok(None)`).
    /// Another user's token or cookie does not open it.
    pub(super) fn check_owner(
        &self,
        req: &Request<Incoming>,
        user: &UserId,
        conn: &ConnInfo,
    ) -> Result<Option<Response<Body>>, PreviewError> {
        let verify =
            |t: &str| self.auth.verify_scoped(t, Some("preview")).ok().as_ref() == Some(user);
        let query = req.uri().query().unwrap_or("");
        let link_token = query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == LINK_PARAM)
            .map(|(_, v)| v);
        if let Some(t) = link_token {
            if verify(t) {
                let rest: Vec<&str> = query
                    .split('&')
                    .filter(|p| !p.starts_with(&format!("{LINK_PARAM}=")) && !p.is_empty())
                    .collect();
                let mut loc = req.uri().path().to_owned();
                if !rest.is_empty() {
                    loc.push('?');
                    loc.push_str(&rest.join("&"));
                }
                let cookie = owner_cookie(t, conn.tls, &self.cfg.preview_domain);
                let mut r = Response::new(crate::http::empty());
                *r.status_mut() = StatusCode::SEE_OTHER;
                if let (Ok(l), Ok(c)) =
                    (HeaderValue::from_str(&loc), HeaderValue::from_str(&cookie))
                {
                    r.headers_mut().insert(header::LOCATION, l);
                    r.headers_mut().insert(header::SET_COOKIE, c);
                }
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                return Ok(Some(r));
            }
        }
        // Any of the values may be the owner's: a tossed cookie in front must not lock them out.
        let name = if conn.tls {
            PREVIEW_COOKIE_TLS
        } else {
            PREVIEW_COOKIE
        };
        if cookie_values(req.headers(), name).any(verify) {
            return Ok(None);
        }
        Err(PreviewError::Private)
    }
}

/// Every value of the cookie `name` (a browser sends several when other hosts tossed some).
fn cookie_values<'a>(h: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The preview cookie is ours: the app in the sandbox never sees it.
pub(super) fn strip_preview_cookie(h: &mut HeaderMap) {
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| {
            !c.is_empty()
                && !c.starts_with(&format!("{PREVIEW_COOKIE}="))
                && !c.starts_with(&format!("{PREVIEW_COOKIE_TLS}="))
        })
        .map(str::to_owned)
        .collect();
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// The cookie a valid preview link sets. Always host-only (no `Domain`): it goes back to this
/// preview host only.
///
/// The console shows the preview in an iframe, and the preview domain is (and should be, see
/// the README) another site than the console, so the cookie must be `SameSite=None` to be set
/// and sent there; `Partitioned` (CHIPS) keys it to the top-level site that opened the link (the
/// console, or the preview itself in its own tab), so other sites that frame the preview do not
/// get it. Both need `Secure`:
/// - over HTTPS: `__Host-sandboxd_preview`, `Secure`, `SameSite=None`, `Partitioned` (the
///   `__Host-` prefix makes browsers refuse it from a sibling host);
/// - over plain HTTP on a `localhost` preview domain (the development set-up): browsers treat
///   `*.localhost` as a secure context and accept `Secure` cookies from it, so the same
///   attributes under the name `sandboxd_preview` (`__Host-` is reserved for HTTPS);
/// - over plain HTTP elsewhere: `sandboxd_preview` with `SameSite=Lax`, as `Secure` cookies
///   are refused there; the preview then opens in its own tab, not inside a console on another
///   site.
fn owner_cookie(token: &str, tls: bool, preview_domain: &str) -> String {
    const BASE: &str = "Path=/; HttpOnly; Max-Age=43200";
    let local = preview_domain == "localhost" || preview_domain.ends_with(".localhost");
    if tls {
        format!("{PREVIEW_COOKIE_TLS}={token}; {BASE}; Secure; SameSite=None; Partitioned")
    } else if local {
        format!("{PREVIEW_COOKIE}={token}; {BASE}; Secure; SameSite=None; Partitioned")
    } else {
        format!("{PREVIEW_COOKIE}={token}; {BASE}; SameSite=Lax")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_cookie_is_stripped_others_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; sandboxd_preview=tok; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_values(&h, PREVIEW_COOKIE).next(), Some("tok"));
        strip_preview_cookie(&mut h);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn owner_cookies_are_host_only_and_secure_where_browsers_allow_it() {
        let c = owner_cookie("t", true, "preview.example.com");
        assert_eq!(
            c,
            "__Host-sandboxd_preview=t; Path=/; HttpOnly; Max-Age=43200; Secure; SameSite=None; Partitioned"
        );
        let c = owner_cookie("t", false, "preview.localhost");
        assert!(c.starts_with("sandboxd_preview=t;"), "{c}");
        assert!(c.contains("; Secure; SameSite=None; Partitioned"), "{c}");
        let c = owner_cookie("t", false, "preview.example.com");
        assert_eq!(
            c,
            "sandboxd_preview=t; Path=/; HttpOnly; Max-Age=43200; SameSite=Lax"
        );
        for c in [
            owner_cookie("t", true, "preview.localhost"),
            owner_cookie("t", false, "x.test"),
        ] {
            assert!(!c.to_ascii_lowercase().contains("domain"), "{c}");
        }
    }
}
