//! Where a store's database is, and which engine that is.
//!
//! sqlx's `Any` driver (one SQL dialect for both engines) connects only from a URL, so a SQLite
//! file given by path becomes a `sqlite://` URL here, and only here: every byte of the path
//! that a URL could read as something else (`#` a fragment, `?` a query, `%` an escape, spaces,
//! controls, non-ASCII) is percent-encoded, and sqlx decodes it back to the same path.

use std::path::{Path, PathBuf};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::SqlStoreError;

/// The database engine behind a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// The engine a URL names: `sqlite:…`, `postgres:…` or `postgresql:…`; `None` for others.
    pub fn of_url(url: &str) -> Option<Engine> {
        if url.starts_with("sqlite:") {
            Some(Engine::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Engine::Postgres)
        } else {
            None
        }
    }
}

/// Where a store's database is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (created if missing), by path: any path, `a#b?c%d/x.db` included.
    SqliteFile(PathBuf),
    /// A URL as the operator wrote it (`--database`): `sqlite://PATH` or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`.
    Url(String),
}

impl Location {
    /// The engine of this location; an unsupported URL is an error naming `what` (e.g.
    /// "read-model") and the URL without its password.
    pub fn engine(&self, what: &'static str) -> Result<Engine, SqlStoreError> {
        match self {
            Location::SqliteFile(_) => Ok(Engine::Sqlite),
            Location::Url(url) => {
                Engine::of_url(url).ok_or_else(|| SqlStoreError::UnsupportedUrl {
                    what,
                    url: redact(url),
                })
            }
        }
    }

    /// The URL sqlx connects to.
    pub fn url(&self, what: &'static str) -> Result<String, SqlStoreError> {
        match self {
            Location::SqliteFile(path) => sqlite_url(path, what),
            Location::Url(url) => Ok(url.clone()),
        }
    }
}

/// Bytes of a path left as they are in its URL: letters, digits and `/-_.~` (RFC 3986's
/// unreserved characters and the separator). Everything else is percent-encoded.
const PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The `sqlite://` URL of the file at `path`, created if missing (`mode=rwc`).
///
/// The path is made absolute first (its directory canonicalized when it exists), because the
/// URL parser resolves `.` and `..` segments lexically and would read a relative path's first
/// segment as a host. `what` names the store in errors ("read-model", "metering").
pub fn sqlite_url(path: &Path, what: &'static str) -> Result<String, SqlStoreError> {
    if path.as_os_str().is_empty() {
        return Err(SqlStoreError::EmptyPath { what });
    }
    let absolute = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => match dir.canonicalize() {
            Ok(dir) => dir.join(name),
            Err(_) => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        },
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    };
    let text = absolute.to_str().ok_or_else(|| SqlStoreError::NotUtf8 {
        what,
        path: path.to_path_buf(),
    })?;
    Ok(format!(
        "sqlite://{}?mode=rwc",
        utf8_percent_encode(text, PATH)
    ))
}

/// `url` without its password (`postgres://user:***@host/db`), for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::any::AnyConnectOptions;
    use sqlx::sqlite::SqliteConnectOptions;

    use super::*;

    /// The file sqlx's `Any` driver opens for `url`: parsed as `AnyPoolOptions::connect` does,
    /// then converted as the SQLite driver does.
    fn opened_file(url: &str) -> PathBuf {
        let any = AnyConnectOptions::from_str(url).expect("a URL the Any driver parses");
        let sqlite = SqliteConnectOptions::try_from(&any).expect("a SQLite URL");
        sqlite.get_filename().to_path_buf()
    }

    #[test]
    fn every_odd_path_comes_back_from_its_url_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical tempdir");
        for name in [
            "a#b?c%d",
            "100%",
            "%41%2F",
            "sp ace",
            "tab\there",
            "new\nline",
            "q\"uote'",
            "semi;colon&amp=eq+plus",
            "é中文",
            "back\\slash",
            "[brackets]{braces}<angle>",
            "@at:colon",
            "...",
        ] {
            let path = root.join(name).join("x.db");
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            let url = sqlite_url(&path, "test").expect("url");
            assert!(url.ends_with("?mode=rwc"), "{url}");
            assert_eq!(opened_file(&url), path, "through {url}");
        }
    }

    #[test]
    fn a_relative_path_is_made_absolute() {
        let url = sqlite_url(Path::new("rel#dir/x.db"), "test").expect("url");
        let expected = std::env::current_dir().expect("cwd").join("rel#dir/x.db");
        assert_eq!(opened_file(&url), expected);
        assert!(sqlite_url(Path::new(""), "test").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_non_utf8_path_is_refused_with_what_to_do() {
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/\xff/x.db"));
        let e = sqlite_url(path, "metering").unwrap_err().to_string();
        assert!(e.contains("metering") && e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn engines_are_told_by_scheme() {
        assert_eq!(Engine::of_url("sqlite:///x.db"), Some(Engine::Sqlite));
        assert_eq!(Engine::of_url("sqlite:x.db"), Some(Engine::Sqlite));
        assert_eq!(Engine::of_url("postgres://u@h/db"), Some(Engine::Postgres));
        assert_eq!(
            Engine::of_url("postgresql://u@h/db"),
            Some(Engine::Postgres)
        );
        assert_eq!(Engine::of_url("mysql://u@h/db"), None);
        let e = Location::Url("mysql://u:secret@h/db".into())
            .engine("metering")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metering") && e.contains("u:***@h") && !e.contains("secret"),
            "{e}"
        );
        assert_eq!(
            Location::SqliteFile("/x#y.db".into()).engine("m").unwrap(),
            Engine::Sqlite
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://tributary:secret@127.0.0.1:5432/db"),
            "postgres://tributary:***@127.0.0.1:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
