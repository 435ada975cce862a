//! An S3-compatible object store holding a shared cache: the few calls the
//! cache needs (get, put, create-only put, list, delete), made with a
//! blocking HTTP client so the engine stays synchronous.
//!
//! Requests are signed with AWS Signature V4 (rusty-s3 builds the signed
//! URLs; ureq, already used for MLflow, sends them). Settings come from the
//! usual AWS places: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
//! `AWS_SESSION_TOKEN`, else the `AWS_PROFILE` (default `default`) section
//! of `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`); the region from
//! `AWS_REGION`, `AWS_DEFAULT_REGION` or `~/.aws/config`
//! (`AWS_CONFIG_FILE`); an endpoint for MinIO, Ceph, R2 or a local server
//! from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (path-style URLs). With
//! no credentials anywhere, requests go unsigned (a public bucket).

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use rusty_s3::actions::{
    CompleteMultipartUpload, CreateMultipartUpload, DeleteObject, GetObject, ListObjectsV2,
    PutObject, S3Action, UploadPart,
};
use rusty_s3::{Bucket, Credentials, UrlStyle};

/// Files above this size upload in parts of this size, unless
/// RUNNER_REMOTE_PART_MIB says otherwise (S3's smallest part is 5 MiB).
pub const PART_BYTES: u64 = 64 << 20;
/// How long a signed URL stays valid: one request, retries included.
const URL_LIFETIME: Duration = Duration::from_secs(3600);
const TRIES: u32 = 4;

/// What went wrong talking to the remote.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL or the settings are wrong (a usage error).
    #[error("{0}")]
    Config(String),
    /// A request failed (after retries where that made sense).
    #[error("{what}: {detail}")]
    Request { what: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl RemoteError {
    fn request(what: impl Into<String>, detail: impl Into<String>) -> RemoteError {
        RemoteError::Request {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

/// A bucket and a prefix in it, as `s3://bucket/prefix` names them.
#[derive(Debug)]
pub struct Remote {
    url: String,
    bucket: Bucket,
    credentials: Option<Credentials>,
    /// Empty, or ending in `/`.
    prefix: String,
    agent: ureq::Agent,
    part_bytes: u64,
}

/// `s3://bucket[/prefix]` split: (bucket, prefix without slashes at its ends).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        format!("`{url}` is not an S3 URL: expected s3://bucket or s3://bucket/prefix")
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !valid {
        return Err(format!(
            "`{bucket}` is not a bucket name: 3 to 63 lowercase letters, digits, `-` or `.`"
        ));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

impl Remote {
    /// The remote at `url`, with endpoint, region and credentials from the environment.
    pub fn open(url: &str) -> Result<Remote, RemoteError> {
        let (bucket, prefix) = parse_url(url).map_err(RemoteError::Config)?;
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| aws_file_value("config", &profile, "region"))
            .unwrap_or_else(|| "us-east-1".into());
        let (endpoint, style) = match env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL"))
        {
            Some(e) => (e, UrlStyle::Path),
            // A dotted name breaks TLS as a host name: path style for it.
            None => (
                format!("https://s3.{region}.amazonaws.com"),
                if bucket.contains('.') {
                    UrlStyle::Path
                } else {
                    UrlStyle::VirtualHost
                },
            ),
        };
        let endpoint = endpoint
            .parse()
            .map_err(|e| RemoteError::Config(format!("endpoint `{endpoint}` is not a URL: {e}")))?;
        let bucket = Bucket::new(endpoint, style, bucket, region)
            .map_err(|e| RemoteError::Config(format!("remote {url}: {e}")))?;
        let credentials = Credentials::from_env().or_else(|| {
            let key = aws_file_value("credentials", &profile, "aws_access_key_id")?;
            let secret = aws_file_value("credentials", &profile, "aws_secret_access_key")?;
            Some(
                match aws_file_value("credentials", &profile, "aws_session_token") {
                    Some(token) => Credentials::new_with_token(key, secret, token),
                    None => Credentials::new(key, secret),
                },
            )
        });
        let part_bytes = match env("RUNNER_REMOTE_PART_MIB") {
            None => PART_BYTES,
            Some(v) => match v.parse::<u64>() {
                Ok(mib) if mib >= 5 => mib << 20,
                _ => {
                    return Err(RemoteError::Config(format!(
                        "RUNNER_REMOTE_PART_MIB={v}: expected a whole number of MiB, at least 5 (S3's smallest part)"
                    )))
                }
            },
        };
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Remote {
            url: url.trim_end_matches('/').to_string(),
            bucket,
            credentials,
            prefix: if prefix.is_empty() {
                prefix
            } else {
                format!("{prefix}/")
            },
            agent,
            part_bytes,
        })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn object(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }

    /// `s3://bucket/prefix/path`, for messages.
    pub fn show(&self, path: &str) -> String {
        format!("{}/{path}", self.url)
    }

    /// A small object's bytes; None when there is none.
    pub fn get(&self, path: &str) -> Result<Option<Vec<u8>>, RemoteError> {
        let object = self.object(path);
        let url =
            GetObject::new(&self.bucket, self.credentials.as_ref(), &object).sign(URL_LIFETIME);
        self.retrying(&format!("reading {}", self.show(path)), || {
            let mut response = self.agent.get(url.as_str()).call()?;
            match response.status().as_u16() {
                404 => Ok(Answer::Done(None)),
                200..=299 => Ok(Answer::Done(Some(
                    response
                        .body_mut()
                        .with_config()
                        .limit(64 << 20)
                        .read_to_vec()?,
                ))),
                _ => Ok(Answer::Status(describe(&mut response))),
            }
        })
    }

    /// Stream an object into `dest` (created or truncated), passing every
    /// chunk to `seen` (a hasher, a progress bar), which returns false to
    /// stop (Ctrl-C: an `Interrupted` error); false when there is none.
    pub fn download(
        &self,
        path: &str,
        dest: &Path,
        seen: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<bool, RemoteError> {
        let object = self.object(path);
        let url =
            GetObject::new(&self.bucket, self.credentials.as_ref(), &object).sign(URL_LIFETIME);
        let what = format!("downloading {}", self.show(path));
        let mut response = self
            .agent
            .get(url.as_str())
            .call()
            .map_err(|e| RemoteError::request(&what, e.to_string()))?;
        match response.status().as_u16() {
            404 => return Ok(false),
            200..=299 => {}
            _ => return Err(RemoteError::request(&what, describe(&mut response))),
        }
        let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
        let mut file = std::fs::File::create(dest)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| RemoteError::request(&what, e.to_string()))?;
            if n == 0 {
                break;
            }
            if !seen(&buf[..n]) {
                return Err(interrupted());
            }
            file.write_all(&buf[..n])?;
        }
        file.sync_all()?;
        Ok(true)
    }

    /// Write an object, replacing any.
    pub fn put(&self, path: &str, bytes: &[u8]) -> Result<(), RemoteError> {
        self.put_with(path, bytes, false).map(|_| ())
    }

    /// Write an object only if there is none (`If-None-Match: *`); false
    /// when one was there already, which is then left as it was.
    pub fn put_new(&self, path: &str, bytes: &[u8]) -> Result<bool, RemoteError> {
        self.put_with(path, bytes, true)
    }

    fn put_with(&self, path: &str, bytes: &[u8], only_new: bool) -> Result<bool, RemoteError> {
        let object = self.object(path);
        let mut action = PutObject::new(&self.bucket, self.credentials.as_ref(), &object);
        if only_new {
            action.headers_mut().insert("if-none-match", "*");
        }
        let url = action.sign(URL_LIFETIME);
        self.retrying(&format!("writing {}", self.show(path)), || {
            let mut request = self.agent.put(url.as_str());
            if only_new {
                request = request.header("If-None-Match", "*");
            }
            let mut response = request.send(bytes)?;
            match response.status().as_u16() {
                200..=299 => Ok(Answer::Done(true)),
                // 412: another writer got there first. (409, two conditional
                // writes racing, is retried as AWS asks: the other may fail.)
                412 if only_new => Ok(Answer::Done(false)),
                _ => Ok(Answer::Status(describe(&mut response))),
            }
        })
    }

    /// Upload a file, in parts above the part size; `sent` hears the bytes
    /// sent so far and returns false to stop between parts (Ctrl-C). A failed multipart upload is aborted, so nothing of it
    /// is left to read.
    pub fn upload(
        &self,
        path: &str,
        file: &Path,
        sent: &mut dyn FnMut(u64) -> bool,
    ) -> Result<(), RemoteError> {
        let len = std::fs::metadata(file)?.len();
        if len <= self.part_bytes {
            self.put(path, &std::fs::read(file)?)?;
            sent(len);
            return Ok(());
        }
        let object = self.object(path);
        let what = format!("uploading {} to {}", file.display(), self.show(path));
        let create = self.create_multipart_url(&object);
        let body = self.retrying(&what, || {
            let mut response = self.agent.post(create.as_str()).send_empty()?;
            match response.status().as_u16() {
                200..=299 => Ok(Answer::Done(response.body_mut().read_to_string()?)),
                _ => Ok(Answer::Status(describe(&mut response))),
            }
        })?;
        let upload_id = CreateMultipartUpload::parse_response(&body)
            .map_err(|e| RemoteError::request(&what, format!("unexpected answer: {e}")))?
            .upload_id()
            .to_string();
        let result = self.upload_parts(&object, &upload_id, file, len, &what, sent);
        if result.is_err() {
            let abort = rusty_s3::actions::AbortMultipartUpload::new(
                &self.bucket,
                self.credentials.as_ref(),
                &object,
                &upload_id,
            )
            .sign(URL_LIFETIME);
            let _ = self.agent.delete(abort.as_str()).call();
        }
        result
    }

    /// CreateMultipartUpload's URL with `?uploads=` as AWS's SDKs send it
    /// (rusty-s3 signs `uploads=1`, which AWS accepts and moto's server
    /// answers with HTTP 500).
    fn create_multipart_url(&self, object: &str) -> url::Url {
        let url = self.bucket.object_url(object);
        let query = [("uploads", "")];
        match &self.credentials {
            Some(c) => rusty_s3::signing::sign(
                &jiff::Timestamp::now(),
                rusty_s3::Method::Post,
                url,
                c.key(),
                c.secret(),
                c.token(),
                self.bucket.region(),
                URL_LIFETIME.as_secs(),
                query.into_iter(),
                std::iter::empty(),
            ),
            None => {
                let mut url = url;
                url.set_query(Some("uploads="));
                url
            }
        }
    }

    fn upload_parts(
        &self,
        object: &str,
        upload_id: &str,
        file: &Path,
        len: u64,
        what: &str,
        sent: &mut dyn FnMut(u64) -> bool,
    ) -> Result<(), RemoteError> {
        let mut reader = std::fs::File::open(file)?;
        let mut etags = Vec::new();
        let mut done = 0u64;
        let mut part = Vec::new();
        for number in 1u16.. {
            part.clear();
            (&mut reader).take(self.part_bytes).read_to_end(&mut part)?;
            if part.is_empty() {
                break;
            }
            let url = UploadPart::new(
                &self.bucket,
                self.credentials.as_ref(),
                object,
                number,
                upload_id,
            )
            .sign(URL_LIFETIME);
            let etag = self.retrying(what, || {
                let mut response = self.agent.put(url.as_str()).send(&part[..])?;
                match response.status().as_u16() {
                    200..=299 => Ok(Answer::Done(
                        response
                            .headers()
                            .get("etag")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string(),
                    )),
                    _ => Ok(Answer::Status(describe(&mut response))),
                }
            })?;
            etags.push(etag);
            done += part.len() as u64;
            if !sent(done) {
                return Err(interrupted());
            }
            if done >= len {
                break;
            }
        }
        let complete = CompleteMultipartUpload::new(
            &self.bucket,
            self.credentials.as_ref(),
            object,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = complete.sign(URL_LIFETIME);
        let body = complete.body();
        self.retrying(what, || {
            let mut response = self.agent.post(url.as_str()).send(body.as_bytes())?;
            let status = response.status().as_u16();
            // S3 may answer 200 with an error in the body.
            let text = response.body_mut().read_to_string().unwrap_or_default();
            match status {
                200..=299 if !text.contains("<Error>") => Ok(Answer::Done(())),
                _ => Ok(Answer::Status(format!("HTTP {status}: {}", brief(&text)))),
            }
        })
    }

    /// Every object under `path` (a folder, ending in `/`).
    pub fn list(&self, path: &str) -> Result<Vec<Listed>, RemoteError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let what = format!("listing {}", self.show(path));
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, self.credentials.as_ref());
            action.with_prefix(self.object(path));
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            }
            let url = action.sign(URL_LIFETIME);
            let body = self.retrying(&what, || {
                let mut response = self.agent.get(url.as_str()).call()?;
                match response.status().as_u16() {
                    200..=299 => Ok(Answer::Done(response.body_mut().read_to_string()?)),
                    _ => Ok(Answer::Status(describe(&mut response))),
                }
            })?;
            let page = ListObjectsV2::parse_response(&body)
                .map_err(|e| RemoteError::request(&what, format!("unexpected answer: {e}")))?;
            for item in page.contents {
                if let Some(rel) = item.key.strip_prefix(&self.prefix) {
                    out.push(Listed {
                        path: rel.to_string(),
                        size: item.size.unwrap_or(0),
                        etag: item.etag.clone().unwrap_or_default(),
                        modified: item
                            .last_modified
                            .as_deref()
                            .and_then(|t| humantime::parse_rfc3339_weak(t).ok()),
                    });
                }
            }
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(out)
    }

    /// Remove an object (none there is fine).
    pub fn delete(&self, path: &str) -> Result<(), RemoteError> {
        let object = self.object(path);
        let url =
            DeleteObject::new(&self.bucket, self.credentials.as_ref(), &object).sign(URL_LIFETIME);
        self.retrying(&format!("removing {}", self.show(path)), || {
            let mut response = self.agent.delete(url.as_str()).call()?;
            match response.status().as_u16() {
                200..=299 | 404 => Ok(Answer::Done(())),
                _ => Ok(Answer::Status(describe(&mut response))),
            }
        })
    }

    /// `send` tried up to `TRIES` times on a network error or a 5xx (or
    /// 429, or 409: conditional writes racing) answer, backing off; any
    /// other answer is final.
    fn retrying<T>(
        &self,
        what: &str,
        send: impl Fn() -> Result<Answer<T>, ureq::Error>,
    ) -> Result<T, RemoteError> {
        let started = Instant::now();
        let mut last = String::new();
        for attempt in 0..TRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(250 << attempt));
            }
            match send() {
                Ok(Answer::Done(value)) => return Ok(value),
                Ok(Answer::Status(why))
                    if ["HTTP 5", "HTTP 429", "HTTP 409"]
                        .iter()
                        .any(|s| why.starts_with(s)) =>
                {
                    last = why
                }
                Ok(Answer::Status(why)) => return Err(RemoteError::request(what, why)),
                Err(e) => last = e.to_string(),
            }
        }
        Err(RemoteError::request(
            what,
            format!(
                "{last} ({TRIES} tries in {:.0}s)",
                started.elapsed().as_secs_f64()
            ),
        ))
    }
}

/// What a transfer stopped by its caller (Ctrl-C) returns.
pub fn interrupted() -> RemoteError {
    RemoteError::Io(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        "interrupted",
    ))
}

/// One object of a listing.
#[derive(Clone, Debug)]
pub struct Listed {
    /// Below the remote's prefix.
    pub path: String,
    pub size: u64,
    /// S3's ETag: for an object uploaded in N parts it ends in `-N`.
    pub etag: String,
    pub modified: Option<std::time::SystemTime>,
}

/// A request's result: done, or an HTTP answer that is not (its description).
enum Answer<T> {
    Done(T),
    Status(String),
}

/// "HTTP 403: AccessDenied …" from an error answer.
fn describe(response: &mut ureq::http::Response<ureq::Body>) -> String {
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    format!("HTTP {status}: {}", brief(&text))
}

/// The `<Code>` and `<Message>` of an S3 error body, else its start.
fn brief(text: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find('<')? + start;
        Some(text[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => text.chars().take(200).collect(),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `key` in the `profile` section of `~/.aws/<file>` (INI). The config
/// file names sections `[profile NAME]` except `[default]`.
fn aws_file_value(file: &str, profile: &str, key: &str) -> Option<String> {
    let path = match file {
        "credentials" => env("AWS_SHARED_CREDENTIALS_FILE"),
        _ => env("AWS_CONFIG_FILE"),
    }
    .map(std::path::PathBuf::from)
    .or_else(|| Some(Path::new(&env("HOME")?).join(".aws").join(file)))?;
    let text = std::fs::read_to_string(path).ok()?;
    ini_value(&text, file == "config", profile, key)
}

/// The INI lookup of `aws_file_value`, on text.
pub fn ini_value(text: &str, config: bool, profile: &str, key: &str) -> Option<String> {
    let wanted = if config && profile != "default" {
        format!("profile {profile}")
    } else {
        profile.to_string()
    };
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == wanted;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().to_string());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_name_a_valid_bucket_and_an_optional_prefix() {
        assert_eq!(
            parse_url("s3://my-bucket").unwrap(),
            ("my-bucket".into(), "".into())
        );
        assert_eq!(
            parse_url("s3://b.c-1/team/runs/").unwrap(),
            ("b.c-1".into(), "team/runs".into())
        );
        assert!(parse_url("http://b/p")
            .unwrap_err()
            .contains("not an S3 URL"));
        for bad in [
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://a_b/x",
            &format!("s3://{}", "a".repeat(64)),
        ] {
            assert!(
                parse_url(bad).unwrap_err().contains("not a bucket name"),
                "{bad}"
            );
        }
    }

    #[test]
    fn aws_files_are_read_by_profile_as_the_cli_names_sections() {
        let credentials = "[default]\naws_access_key_id = AK\n\n[work]\naws_access_key_id=WK\naws_secret_access_key = ws\n";
        assert_eq!(
            ini_value(credentials, false, "default", "aws_access_key_id").as_deref(),
            Some("AK")
        );
        assert_eq!(
            ini_value(credentials, false, "work", "aws_access_key_id").as_deref(),
            Some("WK")
        );
        assert_eq!(
            ini_value(credentials, false, "default", "aws_secret_access_key"),
            None
        );
        assert_eq!(
            ini_value(credentials, false, "other", "aws_access_key_id"),
            None
        );
        // The config file writes `[profile NAME]`, except for the default.
        let config = "[default]\nregion = eu-west-1\n[profile work]\nregion = us-west-2\n[work]\nregion = wrong\n";
        assert_eq!(
            ini_value(config, true, "default", "region").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            ini_value(config, true, "work", "region").as_deref(),
            Some("us-west-2")
        );
    }

    #[test]
    fn error_bodies_are_shortened_to_their_code_and_message() {
        let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>";
        assert_eq!(
            brief(body),
            "NoSuchBucket: The specified bucket does not exist"
        );
        assert_eq!(brief("plain text"), "plain text");
    }
}
