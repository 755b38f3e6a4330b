//! Images: parsing what a user gives (`https://` URL or `data:image/...;base64,`), checking bytes
//! by content (JPEG, PNG, WebP magic numbers, never the declared type alone), the 5 MB limit, and
//! fetching URLs without letting them reach loopback, private or link-local addresses (SSRF).
//!
//! The address check runs in the HTTP client's DNS resolver, at connect time, for every hop of a
//! redirect, so a name that resolves to a public address when validated and to 127.0.0.1 when
//! fetched (DNS rebinding) is still refused. IP-literal hosts skip the resolver and are checked on
//! the URL itself.

use base64::Engine;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// The largest image we accept, decoded.
pub const MAX_IMAGE_BYTES: usize = 5 * 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MediaError {
    #[error("image must be an https:// URL or a data:image/...;base64, URL")]
    UnsupportedSource,
    #[error("image URL is malformed: {0}")]
    BadUrl(String),
    #[error("image URL points to a non-public address ({0}); refused")]
    ForbiddenAddress(String),
    #[error("image is larger than 5 MB ({0} bytes)")]
    TooLarge(usize),
    #[error("image content is not JPEG, PNG or WebP")]
    NotAnImage,
    #[error("data URL declares {declared} but the content is {actual}")]
    TypeMismatch {
        declared: String,
        actual: &'static str,
    },
    #[error("data URL is not valid base64")]
    BadBase64,
    #[error("image could not be fetched: {0}")]
    Fetch(String),
}

/// A validated image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Bytes already checked by content.
    Inline { mime: &'static str, bytes: Vec<u8> },
    /// An https URL whose host is not a forbidden IP literal; fetched later through [`ImageFetcher`].
    Remote(Url),
}

impl ImageSource {
    pub fn parse(raw: &str) -> Result<Self, MediaError> {
        let raw = raw.trim();
        if let Some(rest) = raw.strip_prefix("data:") {
            return parse_data_url(rest);
        }
        if raw.len() > 2048 {
            return Err(MediaError::BadUrl("longer than 2048 characters".into()));
        }
        let url = Url::parse(raw).map_err(|e| MediaError::BadUrl(e.to_string()))?;
        if url.scheme() != "https" {
            return Err(MediaError::UnsupportedSource);
        }
        check_url(&url, AddressPolicy::PublicOnly)?;
        Ok(Self::Remote(url))
    }
}

fn parse_data_url(rest: &str) -> Result<ImageSource, MediaError> {
    let (meta, payload) = rest.split_once(',').ok_or(MediaError::UnsupportedSource)?;
    let declared = meta
        .strip_suffix(";base64")
        .ok_or(MediaError::UnsupportedSource)?;
    if !declared.starts_with("image/") {
        return Err(MediaError::UnsupportedSource);
    }
    // Refuse before decoding: base64 grows data by 4/3.
    let approx = payload.len() / 4 * 3;
    if approx > MAX_IMAGE_BYTES + 3 {
        return Err(MediaError::TooLarge(approx));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|_| MediaError::BadBase64)?;
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(MediaError::TooLarge(bytes.len()));
    }
    let actual = sniff(&bytes).ok_or(MediaError::NotAnImage)?;
    let declared_norm = if declared == "image/jpg" {
        "image/jpeg"
    } else {
        declared
    };
    if declared_norm != actual {
        return Err(MediaError::TypeMismatch {
            declared: declared.to_string(),
            actual,
        });
    }
    Ok(ImageSource::Inline {
        mime: actual,
        bytes,
    })
}

/// The image type by magic bytes, or `None`.
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) {
        Some("image/png")
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// Which addresses a fetch may reach. Production is always `PublicOnly`; `AllowLoopback` exists
/// so tests can serve images from 127.0.0.1 and is never chosen by configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressPolicy {
    PublicOnly,
    AllowLoopback,
}

impl AddressPolicy {
    fn allows(self, ip: IpAddr) -> bool {
        match self {
            Self::PublicOnly => is_public(ip),
            Self::AllowLoopback => is_public(ip) || ip.is_loopback(),
        }
    }
}

/// True for addresses on the public internet; false for loopback, private, link-local, CGNAT,
/// multicast, documentation, unspecified and the IPv6 forms that embed such an IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let seg = v6.segments();
            // NAT64 (64:ff9b::/96) embeds an IPv4 address in the last 32 bits.
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
                let v4 = Ipv4Addr::new(
                    (seg[6] >> 8) as u8,
                    seg[6] as u8,
                    (seg[7] >> 8) as u8,
                    seg[7] as u8,
                );
                return is_public_v4(v4);
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (seg[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || seg[0] == 0x2001 && seg[1] == 0x0db8 // documentation
                || seg[0] == 0x2002 // 6to4 can embed private IPv4
                || v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240)
}

fn check_url(url: &Url, policy: AddressPolicy) -> Result<(), MediaError> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err(MediaError::BadUrl(
            "credentials in URLs are not allowed".into(),
        ));
    }
    match url.host() {
        None => Err(MediaError::BadUrl("no host".into())),
        Some(url::Host::Ipv4(ip)) if !policy.allows(IpAddr::V4(ip)) => {
            Err(MediaError::ForbiddenAddress(ip.to_string()))
        }
        Some(url::Host::Ipv6(ip)) if !policy.allows(IpAddr::V6(ip)) => {
            Err(MediaError::ForbiddenAddress(ip.to_string()))
        }
        Some(url::Host::Domain(d))
            if d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost") =>
        {
            if policy == AddressPolicy::AllowLoopback {
                Ok(())
            } else {
                Err(MediaError::ForbiddenAddress(d.to_string()))
            }
        }
        _ => Ok(()),
    }
}

/// A DNS resolver that only hands the HTTP client addresses the policy allows.
struct GuardedResolver {
    policy: AddressPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| policy.allows(a.ip()))
                .collect();
            if allowed.is_empty() {
                let shown = addrs
                    .first()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_else(|| "no address".into());
                return Err(
                    Box::new(MediaError::ForbiddenAddress(format!("{host} -> {shown}")))
                        as Box<dyn std::error::Error + Send + Sync>,
                );
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Fetches remote images with the address guard, a timeout, a byte limit and a content check.
#[derive(Clone)]
pub struct ImageFetcher {
    client: reqwest::Client,
    policy: AddressPolicy,
    https_only: bool,
}

impl ImageFetcher {
    /// The production fetcher: https only, public addresses only.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_policy(AddressPolicy::PublicOnly, true)
    }

    /// Tests use `AllowLoopback` with plain http to serve images from a local server.
    pub fn with_policy(policy: AddressPolicy, https_only: bool) -> anyhow::Result<Self> {
        let redirect = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 3 {
                return attempt.error("too many redirects");
            }
            if https_only && attempt.url().scheme() != "https" {
                return attempt.error("redirect to a non-https URL");
            }
            match check_url(attempt.url(), policy) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        });
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { policy }))
            .redirect(redirect)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .user_agent("wabcast-image-fetcher/1")
            .build()?;
        Ok(Self {
            client,
            policy,
            https_only,
        })
    }

    /// Downloads and checks an image; returns its type and bytes.
    pub async fn fetch(&self, url: &Url) -> Result<(&'static str, Vec<u8>), MediaError> {
        if self.https_only && url.scheme() != "https" {
            return Err(MediaError::UnsupportedSource);
        }
        check_url(url, self.policy)?;
        let mut resp = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| fetch_error(&e))?;
        if !resp.status().is_success() {
            return Err(MediaError::Fetch(format!(
                "HTTP {}",
                resp.status().as_u16()
            )));
        }
        if let Some(len) = resp.content_length() {
            if len as usize > MAX_IMAGE_BYTES {
                return Err(MediaError::TooLarge(len as usize));
            }
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fetch_error(&e))? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_IMAGE_BYTES {
                return Err(MediaError::TooLarge(bytes.len()));
            }
        }
        let mime = sniff(&bytes).ok_or(MediaError::NotAnImage)?;
        Ok((mime, bytes))
    }
}

/// Surfaces the guard's own error from deep inside reqwest's error chain.
fn fetch_error(e: &reqwest::Error) -> MediaError {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        if let Some(m) = s.downcast_ref::<MediaError>() {
            return m.clone();
        }
        src = s.source();
    }
    MediaError::Fetch(e.to_string())
}

/// A tiny valid PNG (1×1), for demos and tests.
pub const TINY_PNG: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4,
    0x89, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0D, 0x0A, 0x2D, 0xB4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE,
    0x42, 0x60, 0x82,
];

/// `TINY_PNG` as a data URL.
pub fn tiny_png_data_url() -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(TINY_PNG)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_url(mime: &str, bytes: &[u8]) -> String {
        format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    #[test]
    fn data_urls_are_checked_by_content() {
        assert!(matches!(
            ImageSource::parse(&tiny_png_data_url()),
            Ok(ImageSource::Inline {
                mime: "image/png",
                ..
            })
        ));
        // A text file dressed up as a PNG.
        assert_eq!(
            ImageSource::parse(&data_url("image/png", b"<?php system($_GET['c']); ?>")),
            Err(MediaError::NotAnImage)
        );
        // A real PNG declared as JPEG.
        assert!(matches!(
            ImageSource::parse(&data_url("image/jpeg", TINY_PNG)),
            Err(MediaError::TypeMismatch { .. })
        ));
        assert_eq!(
            ImageSource::parse("data:image/png;base64,@@@"),
            Err(MediaError::BadBase64)
        );
        assert_eq!(
            ImageSource::parse("data:text/html;base64,PGgxPg=="),
            Err(MediaError::UnsupportedSource)
        );
    }

    #[test]
    fn oversized_images_are_refused_before_decoding() {
        let mut big = TINY_PNG.to_vec();
        big.resize(MAX_IMAGE_BYTES + 10, 0);
        assert!(matches!(
            ImageSource::parse(&data_url("image/png", &big)),
            Err(MediaError::TooLarge(_))
        ));
    }

    #[test]
    fn hostile_urls_are_refused() {
        for url in [
            "http://example.com/a.png",
            "ftp://example.com/a.png",
            "file:///etc/passwd",
            "https://127.0.0.1/a.png",
            "https://10.0.0.8/a.png",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::1]/a.png",
            "https://[::ffff:127.0.0.1]/a.png",
            "https://[fd00::1]/a.png",
            "https://100.64.1.1/a.png",
            "https://localhost/a.png",
            "https://user:pw@example.com/a.png",
            "https://0.0.0.0/a.png",
        ] {
            assert!(ImageSource::parse(url).is_err(), "{url} should be refused");
        }
        assert!(ImageSource::parse("https://cdn.example.com/a.png").is_ok());
        assert!(ImageSource::parse("https://93.184.216.34/a.png").is_ok());
    }

    #[test]
    fn sniff_knows_the_three_formats() {
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some("image/jpeg"));
        assert_eq!(sniff(TINY_PNG), Some("image/png"));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff(b"GIF89a"), None);
    }

    #[tokio::test]
    async fn resolver_refuses_names_that_resolve_to_loopback() {
        use reqwest::dns::Resolve;
        use std::str::FromStr;
        // A name (not an IP literal) is stopped by the resolver at connect time.
        let guard = GuardedResolver {
            policy: AddressPolicy::PublicOnly,
        };
        let err = guard
            .resolve(reqwest::dns::Name::from_str("localhost").unwrap())
            .await
            .err()
            .expect("localhost must be refused");
        assert!(err.to_string().contains("non-public"), "{err}");
        let loose = GuardedResolver {
            policy: AddressPolicy::AllowLoopback,
        };
        let addrs: Vec<SocketAddr> = loose
            .resolve(reqwest::dns::Name::from_str("localhost").unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    #[tokio::test]
    async fn fetcher_refuses_forbidden_literals_before_connecting() {
        let f = ImageFetcher::new().unwrap();
        for url in [
            "https://127.0.0.1/a.png",
            "https://[::1]/a.png",
            "http://example.com/a.png",
        ] {
            let url = Url::parse(url).unwrap();
            assert!(f.fetch(&url).await.is_err(), "{url}");
        }
    }

    /// A one-shot HTTP server on loopback answering every request with `body` (and optionally
    /// no Content-Length, streaming the body in chunks).
    async fn serve(body: Vec<u8>, with_length: bool) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    let head = if with_length {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string()
                    };
                    let _ = sock.write_all(head.as_bytes()).await;
                    for chunk in body.chunks(64 * 1024) {
                        if sock.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn fetcher_checks_size_and_content_of_what_it_downloads() {
        let f = ImageFetcher::with_policy(AddressPolicy::AllowLoopback, false).unwrap();
        let ok = serve(TINY_PNG.to_vec(), true).await;
        let (mime, bytes) = f
            .fetch(&Url::parse(&format!("http://{ok}/a.png")).unwrap())
            .await
            .unwrap();
        assert_eq!((mime, bytes.as_slice()), ("image/png", TINY_PNG));
        let mut big = TINY_PNG.to_vec();
        big.resize(MAX_IMAGE_BYTES + 100_000, 0);
        let declared = serve(big.clone(), true).await;
        assert!(matches!(
            f.fetch(&Url::parse(&format!("http://{declared}/big.png")).unwrap())
                .await,
            Err(MediaError::TooLarge(_))
        ));
        let streamed = serve(big, false).await;
        assert!(matches!(
            f.fetch(&Url::parse(&format!("http://{streamed}/big.png")).unwrap())
                .await,
            Err(MediaError::TooLarge(_))
        ));
        let html = serve(b"<html>not an image</html>".to_vec(), true).await;
        assert_eq!(
            f.fetch(&Url::parse(&format!("http://{html}/x.png")).unwrap())
                .await,
            Err(MediaError::NotAnImage)
        );
        // The production fetcher refuses the same loopback server outright.
        let prod = ImageFetcher::with_policy(AddressPolicy::PublicOnly, false).unwrap();
        assert!(matches!(
            prod.fetch(&Url::parse(&format!("http://{ok}/a.png")).unwrap())
                .await,
            Err(MediaError::ForbiddenAddress(_))
        ));
    }
}
