//! Typed configuration shared by the Meridian binaries.
//!
//! Every setting is a serde field with `deny_unknown_fields`, durations in
//! humantime form (`500ms`, `10s`) and a `///` comment stating its default.
//! Loading is `file < env < flags`: the binaries parse their flags with clap
//! (which also reads the documented environment variables) and overlay them on
//! the file. [`validate`](ProxyConfig::validate) runs once at start and names the
//! offending key in its error.

mod proxy;

pub use proxy::*;

use std::path::Path;

/// A configuration error; the message always names the key or file involved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Reads and parses a TOML file into `T`.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.display().to_string(),
        source,
    })
}
