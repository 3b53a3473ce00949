//! Reading a job's `dataset_url`: http(s) to public addresses (private ones only when
//! the config allows them), object storage (`s3://`, `gs://`, `az://`:
//! [`crate::dataset_object`]), local files only under the configured import folder, every
//! read bounded, credentials never stored or echoed.

use crate::error::ApiError;
pub use crate::fetched::{Fetched, file_name};
use loraloop_core::config::ImportConfig;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

const MAX_REDIRECTS: usize = 5;

/// Read `url` under `policy`, at most `limit` bytes.
pub async fn fetch_dataset(
    url: &str,
    policy: &ImportConfig,
    limit: u64,
) -> Result<Fetched, ApiError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| bad(format!("{} is not a valid URL: {e}", redact_text(url))))?;
        let source = redacted(&parsed);
        let bytes = download(&parsed, &source, policy.allow_private_addresses, limit).await?;
        Ok(Fetched {
            bytes,
            name: file_name(parsed.path()),
            source,
        })
    } else if crate::dataset_object::is_object_url(url) {
        crate::dataset_object::fetch_object(url, limit).await
    } else if url.contains("://") && !url.starts_with("file://") {
        Err(bad(format!(
            "{} is not a URL loraloop reads: use http(s)://, s3://, gs://, az:// or a file under the import folder",
            redact_text(url)
        )))
    } else {
        let asked = url.strip_prefix("file://").unwrap_or(url);
        let bytes = read_local(Path::new(asked), policy.dir.as_deref(), limit).await?;
        Ok(Fetched {
            bytes,
            name: file_name(asked),
            source: asked.to_string(),
        })
    }
}

fn bad(message: String) -> ApiError {
    ApiError::invalid("dataset_url", message)
}

/// The URL without credentials or query (a presigned URL's signature is a credential).
fn redacted(u: &reqwest::Url) -> String {
    let mut u = u.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// A string that did not parse as a URL, cut before anything that may be a credential.
fn redact_text(s: &str) -> String {
    let s = s.split(['?', '#']).next().unwrap_or(s);
    match (s.find("://"), s.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &s[..scheme], &s[at + 1..]),
        _ => s.chars().take(200).collect(),
    }
}

/// Whether an address is one anybody on the internet could reach: not loopback, private,
/// link-local (cloud metadata), shared, multicast, documentation or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10, carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24, protocol assignments
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15, benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xff9b)) // NAT64 maps to IPv4 of any kind
        }
    }
}

/// Resolves names to public addresses only, so neither the first request nor a
/// redirect nor a DNS answer that changes between checks reaches an internal address.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| is_public(a.ip()))
                .collect();
            if public.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = format!(
                    "{host} resolves only to private or local addresses (imports.allow_private_addresses allows them)"
                )
                .into();
                return Err(err);
            }
            let addrs: reqwest::dns::Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

/// A literal address in a URL, refused when it is not public and the policy says so
/// (the resolver never sees literal addresses).
fn literal_refused(u: &reqwest::Url, allow_private: bool) -> Option<String> {
    if allow_private {
        return None;
    }
    let ip = match u.host()? {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(d) if d.eq_ignore_ascii_case("localhost") => {
            return Some(format!("{d} is a local address"));
        }
        url::Host::Domain(_) => return None,
    };
    (!is_public(ip)).then(|| {
        format!("{ip} is a private or local address (imports.allow_private_addresses allows it)")
    })
}

async fn download(
    url: &reqwest::Url,
    shown: &str,
    allow_private: bool,
    limit: u64,
) -> Result<Vec<u8>, ApiError> {
    if let Some(why) = literal_refused(url, allow_private) {
        return Err(bad(format!("{shown} is not downloaded: {why}")));
    }
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else if !matches!(attempt.url().scheme(), "http" | "https") {
            attempt.error("a redirect to another scheme than http(s)")
        } else if let Some(why) = literal_refused(attempt.url(), allow_private) {
            attempt.error(format!("a redirect to {why}"))
        } else {
            attempt.follow()
        }
    });
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .connect_timeout(Duration::from_secs(15))
        .redirect(redirects);
    if !allow_private {
        builder = builder.dns_resolver(Arc::new(PublicOnly)).no_proxy();
    }
    let client = builder.build().map_err(ApiError::internal)?;
    // reqwest's errors print the URL, credentials and query included: say what failed
    // without it.
    let why = |e: reqwest::Error| {
        let mut cause = String::new();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            cause = s.to_string();
            source = s.source();
        }
        let kind = if e.is_timeout() {
            "timed out"
        } else if e.is_redirect() {
            "a redirect was refused"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "the download failed"
        };
        if cause.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}: {cause}")
        }
    };
    let mut resp = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| bad(format!("cannot download {shown}: {}", why(e))))?;
    if !resp.status().is_success() {
        return Err(bad(format!(
            "downloading {shown} answered {}",
            resp.status()
        )));
    }
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit).with_param("dataset_url"));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| bad(format!("downloading {shown}: {}", why(e))))?
    {
        bytes.extend_from_slice(&chunk);
        if bytes.len() as u64 > limit {
            return Err(ApiError::too_large(limit).with_param("dataset_url"));
        }
    }
    Ok(bytes)
}

/// `asked` (relative to `root`, or absolute) as a real path inside `root`; `None` when it
/// does not exist or lies elsewhere. Links are resolved before the check: a link in the
/// folder to /etc stays outside.
pub async fn resolve_inside(root: &Path, asked: &Path) -> Option<PathBuf> {
    let root = tokio::fs::canonicalize(root).await.ok()?;
    let joined = if asked.is_absolute() {
        asked.to_path_buf()
    } else {
        root.join(asked)
    };
    let real = tokio::fs::canonicalize(&joined).await.ok()?;
    real.starts_with(&root).then_some(real)
}

/// A local file, only under the import folder. Every refusal reads the same whether
/// the path exists or not, so the API does not tell which files the server has.
async fn read_local(asked: &Path, dir: Option<&Path>, limit: u64) -> Result<Vec<u8>, ApiError> {
    let Some(dir) = dir else {
        return Err(bad(
            "local files are not imported: set imports.dir in the config to a folder, then name a file in it".into(),
        ));
    };
    let refused = || {
        bad(format!(
            "{} is not a readable file in the import folder {}",
            asked.display(),
            dir.display()
        ))
    };
    let real = resolve_inside(dir, asked).await.ok_or_else(refused)?;
    let file = tokio::fs::File::open(&real).await.map_err(|_| refused())?;
    let meta = file.metadata().await.map_err(|_| refused())?;
    if !meta.is_file() {
        return Err(refused());
    }
    // The length on disk is not trusted (special files report 0): the read itself stops.
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|_| refused())?;
    if bytes.len() as u64 > limit {
        return Err(ApiError::too_large(limit).with_param("dataset_url"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_internet_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn stored_urls_hold_no_credentials() {
        let u = reqwest::Url::parse("https://me:secret@example.org/d.jsonl?sig=abc#x").unwrap();
        assert_eq!(redacted(&u), "https://example.org/d.jsonl");
        assert_eq!(
            redact_text("https://me:secret@ex ample/d?sig=1"),
            "https://…@ex ample/d"
        );
    }
}
