//! `dataset_url: s3://bucket/key` (and `gs://bucket/key`, `az://container/key`): datasets
//! in object storage, read through the `object_store` crate with the credentials each
//! cloud's own tools read from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for an S3-compatible server,
//! `AWS_ALLOW_HTTP`; `GOOGLE_SERVICE_ACCOUNT`; `AZURE_STORAGE_ACCOUNT_NAME`,
//! `AZURE_STORAGE_ACCOUNT_KEY`, ...). Bounded as http is: an object over the limit is
//! refused from its size before a byte of it is read.

use crate::error::ApiError;
use crate::fetched::{Fetched, file_name};
use futures_util::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use std::time::Duration;

/// The URL schemes read here.
const SCHEMES: &[&str] = &["s3", "s3a", "gs", "az", "azure", "abfs", "abfss"];

pub fn is_object_url(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()))
}

fn bad(message: String) -> ApiError {
    ApiError::invalid("dataset_url", message)
}

/// Read the object `url` names, at most `limit` bytes.
pub async fn fetch_object(url: &str, limit: u64) -> Result<Fetched, ApiError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| bad(format!("{url} is not a valid URL: {e}")))?;
    // `abfss://container@account...` names the container where others put a user.
    let user_is_container = parsed.scheme().starts_with("abfs");
    let mut source = parsed.clone();
    let _ = source.set_password(None);
    if !user_is_container {
        let _ = source.set_username("");
    }
    source.set_query(None);
    source.set_fragment(None);
    let source = source.to_string();
    let has_credentials = parsed.password().is_some()
        || (!user_is_container && !parsed.username().is_empty())
        || parsed.query().is_some();
    if has_credentials {
        return Err(bad(format!(
            "{source}: give object storage credentials in the environment, not in the URL"
        )));
    }
    let store = store_for(&parsed, url).map_err(|e| bad(format!("{source}: {e}")))?;
    let path = ObjectPath::from_url_path(parsed.path())
        .map_err(|e| bad(format!("{source}: not an object path: {e}")))?;
    if path.as_ref().is_empty() {
        return Err(bad(format!("{source} names a bucket, not an object in it")));
    }
    let unreadable = |e: object_store::Error| match e {
        object_store::Error::NotFound { .. } => bad(format!("there is no object at {source}")),
        e => bad(format!("cannot read {source}: {e}")),
    };
    let meta = store.head(&path).await.map_err(unreadable)?;
    if meta.size as u64 > limit {
        return Err(ApiError::too_large(limit).with_param("dataset_url"));
    }
    let mut stream = store.get(&path).await.map_err(unreadable)?.into_stream();
    let mut bytes = Vec::with_capacity(meta.size as usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(unreadable)?;
        // The object may have grown since `head`.
        if (bytes.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::too_large(limit).with_param("dataset_url"));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Fetched {
        bytes,
        name: file_name(parsed.path()),
        source,
    })
}

/// How a failing request to the store is retried. object_store's default retries for up
/// to three minutes (10 times, each attempt up to 30 s); the caller of an API request
/// waits for the answer, so: 3 times, none started after 20 s.
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

/// The store for the URL's scheme, configured from the environment and the URL.
fn store_for(parsed: &reqwest::Url, url: &str) -> object_store::Result<Box<dyn ObjectStore>> {
    Ok(match parsed.scheme() {
        "s3" | "s3a" => Box::new(
            object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .with_retry(retry())
                .build()?,
        ),
        "gs" => Box::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .with_retry(retry())
                .build()?,
        ),
        _ => Box::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url)
                .with_retry(retry())
                .build()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_urls_are_told_apart_from_others() {
        assert!(is_object_url("s3://bucket/data.jsonl"));
        assert!(is_object_url("GS://bucket/data.jsonl"));
        assert!(is_object_url("az://container/data.jsonl"));
        assert!(!is_object_url("https://example.com/s3://x"));
        assert!(!is_object_url("/data/s3.jsonl"));
    }
}
